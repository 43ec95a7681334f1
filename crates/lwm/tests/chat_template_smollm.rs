//! SmolLM2-135M-Instruct's chat template (GGUF key `tokenizer.chat_template`),
//! rendered through `lwm::chat_template`, compared with Python jinja2's output.

use lwm::chat_template::{ChatMessage, ChatTemplate};

/// Copied verbatim from SmolLM2-135M-Instruct.Q4_1.gguf, `tokenizer.chat_template`.
const SMOLLM2_TEMPLATE: &str = r#"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"#;

fn smollm2() -> ChatTemplate {
    ChatTemplate::jinja(
        SMOLLM2_TEMPLATE.to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
    )
    .expect("SmolLM2 template compiles")
}

#[test]
fn smollm2_single_user_turn_matches_jinja2() {
    let out = smollm2()
        .render(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn smollm2_system_and_multi_turn() {
    let msgs = [
        ChatMessage::system("Be terse."),
        ChatMessage::user("Hi"),
        ChatMessage::assistant("Hello."),
        ChatMessage::user("Bye"),
    ];
    let t = smollm2();
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    );
    assert!(t.stop_strings().is_empty());
}

#[test]
fn raise_exception_becomes_error() {
    let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
               {{ raise_exception('Only user and assistant roles are supported!') }}\
               {% endif %}{{ m.content }}{% endfor %}";
    let t = ChatTemplate::jinja(src.to_string(), String::new(), String::new()).unwrap();
    assert_eq!(t.render(&[ChatMessage::user("ok")], false).unwrap(), "ok");
    let err = t
        .render(&[ChatMessage::new("tool", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("chat template:"), "{err}");
    assert!(
        err.contains("Only user and assistant roles are supported!"),
        "{err}"
    );
}

#[test]
fn syntax_error_rejected() {
    for bad in [
        "{% for m in messages %}{{ m.content }}",
        "{{ messages[0].content ",
        "{% if add_generation_prompt %}x{% endfor %}",
    ] {
        let err = ChatTemplate::jinja(bad.to_string(), String::new(), String::new())
            .err()
            .unwrap_or_else(|| panic!("{bad:?} should not compile"))
            .to_string();
        assert!(err.starts_with("chat template:"), "{err}");
        assert!(err.contains("syntax error"), "{err}");
    }
}

#[test]
fn trim_and_lstrip_blocks_like_hf() {
    // With trim_blocks + lstrip_blocks, block tags on their own lines leave no
    // whitespace behind; the template's final newline is dropped.
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content | trim }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:\n{% endif %}\n";
    let t = ChatTemplate::jinja(src.to_string(), String::new(), String::new()).unwrap();
    let out = t.render(&[ChatMessage::user(" q ")], true).unwrap();
    assert_eq!(out, "U:q\nA:\n");
}

#[test]
fn python_string_methods() {
    let src = "{% for m in messages %}{% if m.content.startswith('/') %}{{ m.content[1:].upper() }}{% else %}{{ m.content.split(',') | join('|') }}{% endif %};{% endfor %}";
    let t = ChatTemplate::jinja(src.to_string(), String::new(), String::new()).unwrap();
    let out = t
        .render(
            &[ChatMessage::user("/cmd"), ChatMessage::user("a,b,c")],
            false,
        )
        .unwrap();
    assert_eq!(out, "CMD;a|b|c;");
}

#[test]
fn lwm_format_exact_strings() {
    let t = ChatTemplate::Lwm;
    assert_eq!(
        t.render(&[ChatMessage::user("What is the capital of France?")], true)
            .unwrap(),
        "You are a helpful assistant. USER: What is the capital of France? ASSISTANT:"
    );
    let msgs = [
        ChatMessage::user("u1"),
        ChatMessage::assistant("a1"),
        ChatMessage::user("u2"),
    ];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "You are a helpful assistant. USER: u1 ASSISTANT: a1 USER: u2 ASSISTANT:"
    );
    let msgs = [
        ChatMessage::system("You are a pirate."),
        ChatMessage::user("Hi"),
    ];
    let out = t.render(&msgs, true).unwrap();
    assert_eq!(out, "You are a pirate. USER: Hi ASSISTANT:");
    assert!(!out.contains("<s>"));
    assert_eq!(t.stop_strings(), vec!["USER:".to_string()]);
}
