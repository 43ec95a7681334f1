//! `lwm chat/generate` with structured-output flags: answers obey the constraint; a bad
//! schema file or regex ends in one `error:` line, never a panic.

mod common;
use common::{default_model, lwm};

#[test]
fn choices_and_regex_flags_constrain_the_answer() {
    let Some(model) = default_model() else { return };
    let out = lwm(&[
        "chat",
        "--model",
        &model,
        "--choices",
        "yes,no,maybe",
        "--temperature",
        "1.2",
        "--seed",
        "4",
        "--message",
        "Is the sky blue?",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        ["yes", "no", "maybe"].contains(&answer.as_str()),
        "{answer:?}"
    );

    let out = lwm(&[
        "generate",
        "--model",
        &model,
        "--regex",
        "[0-9]{3}-[0-9]{4}",
        "--temperature",
        "1.0",
        "--prompt",
        "Phone: ",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let b = text.as_bytes();
    assert!(
        b.len() == 8
            && b[3] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 3 || c.is_ascii_digit()),
        "{text:?}"
    );
}

#[test]
fn bad_constraints_are_clean_errors() {
    let Some(model) = default_model() else { return };
    let dir = std::env::temp_dir().join(format!("lwm-structured-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_json = dir.join("schema.json");
    std::fs::write(&not_json, "{not json").unwrap();
    let bad_schema = dir.join("bad.json");
    std::fs::write(
        &bad_schema,
        r#"{"type": "array", "minItems": 3, "maxItems": 1}"#,
    )
    .unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--json-schema", "/no/such/schema.json"], "cannot read"),
        (
            vec!["--json-schema", not_json.to_str().unwrap()],
            "not valid JSON",
        ),
        (
            vec!["--json-schema", bad_schema.to_str().unwrap()],
            "invalid JSON schema",
        ),
        (vec!["--regex", "(unclosed"], "invalid regex"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["chat", "--model", &model, "--message", "hi", "-n", "4"];
        args.extend(flags);
        let out = lwm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("error:") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
