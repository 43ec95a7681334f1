//! Chat templates: turn a list of chat messages into the prompt string a model
//! was trained on.
//!
//! Two kinds exist:
//!
//! * [`ChatTemplate::Jinja`]: a Hugging Face style Jinja template (from
//!   `tokenizer_config.json` or the GGUF key `tokenizer.chat_template`),
//!   rendered with minijinja in the same environment HF uses.
//! * [`ChatTemplate::Lwm`]: the Vicuna-like format the LWM chat models were
//!   trained with (see [`ChatTemplate::Lwm`] for the exact strings).

use anyhow::{anyhow, bail, Result};
use minijinja::{Environment, Error, ErrorKind};

/// One chat turn. `role` is usually `"system"`, `"user"` or `"assistant"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, OpenAI's shape with each `function.arguments` an
    /// object (what Hugging Face templates iterate over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the name of the tool that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The default system prompt of the LWM format.
pub const LWM_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// How a conversation becomes a prompt string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// A Hugging Face Jinja chat template. Rendered with the variables
    /// `messages` (list of `{role, content}`), `add_generation_prompt`,
    /// `bos_token` and `eos_token`, the functions `raise_exception(msg)` and
    /// `strftime_now(fmt)`, Python string / dict methods (`.strip()`,
    /// `.startswith()`, `.split()`, `.items()`, ...), `trim_blocks` and
    /// `lstrip_blocks` on and the trailing newline of the template dropped.
    ///
    /// Build it with [`ChatTemplate::jinja`], which checks that it compiles.
    Jinja {
        source: String,
        bos_token: String,
        eos_token: String,
    },
    /// LWM's Vicuna-like text chat format (scripts/sample_pyt.py, issue #1).
    ///
    /// One turn with generation prompt:
    ///
    /// `"You are a helpful assistant. USER: {q} ASSISTANT:"`
    ///
    /// Multi-turn:
    ///
    /// `"You are a helpful assistant. USER: {u1} ASSISTANT: {a1} USER: {u2} ASSISTANT:"`
    ///
    /// Precisely: the parts are joined with a single space. The first part is
    /// the system prompt: the content of a leading `system` message if there is
    /// one (left out entirely if that content is empty), else
    /// [`LWM_SYSTEM_PROMPT`]. Each `user` message adds `"USER: {content}"`, each
    /// `assistant` message `"ASSISTANT: {content}"` (assistant content is
    /// trimmed, since decoded replies usually start with a space), and
    /// `add_generation_prompt` adds a final `"ASSISTANT:"` with no trailing
    /// space (the model continues with `" answer"`). User content is used
    /// verbatim.
    ///
    /// No BOS is written: the caller adds BOS (id 1) through the tokenizer, so
    /// `"<s>"` must not appear in the string. A `system` message anywhere but
    /// first, or any other role, is an error. Chats should stop on `"USER:"`
    /// (see [`ChatTemplate::stop_strings`]) besides EOS.
    Lwm,
}

/// The template a model without one gets (ChatML, llama-server's fallback too), so that
/// `lwm chat` and `/v1/chat/completions` still work; a warning names it at load.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Where an engine's chat template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// The model file's own (GGUF `tokenizer.chat_template`, `tokenizer_config.json`).
    Model,
    /// LWM's format (`--chat-format lwm`, an LWM preset, or a JAX checkpoint).
    Lwm,
    /// `--chat-template`.
    Override,
    /// [`DEFAULT_CHAT_TEMPLATE`]: the model has none.
    Default,
}

impl TemplateOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateOrigin::Model => "model",
            TemplateOrigin::Lwm => "lwm",
            TemplateOrigin::Override => "--chat-template",
            TemplateOrigin::Default => "default (ChatML)",
        }
    }
}

/// minijinja error → readable text, with its cause chain.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

const TEMPLATE_NAME: &str = "chat_template";

/// The environment HF's `apply_chat_template` effectively uses.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        strftime_utc(&fmt, secs)
    });
    env
}

impl ChatTemplate {
    /// A Jinja template; it is compiled now so that syntax errors surface here
    /// (the error names the problem and line).
    pub fn jinja(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = environment();
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| anyhow!("chat template: {}", describe(&e)))?;
        Ok(Self::Jinja {
            source,
            bos_token,
            eos_token,
        })
    }

    /// Render `messages` into a prompt string. With `add_generation_prompt`
    /// the string ends where the assistant's reply should begin.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with OpenAI tool definitions (`{"type": "function",
    /// "function": {...}}`), passed to a Jinja template as `tools` the way Hugging Face's
    /// `apply_chat_template(tools=...)` does. Templates that know nothing of tools need the
    /// messages prepared by [`ChatTemplate::prepare_tool_chat`] first.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        match self {
            Self::Jinja {
                source,
                bos_token,
                eos_token,
            } => {
                let mut env = environment();
                env.add_template_owned(TEMPLATE_NAME, source.clone())
                    .map_err(|e| anyhow!("chat template: {}", describe(&e)))?;
                let tmpl = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| anyhow!("chat template: {}", describe(&e)))?;
                // No tools: leave `tools` undefined, as HF does (templates test `tools is defined`).
                let tools = (!tools.is_empty()).then_some(tools);
                let ctx = minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos_token,
                    eos_token => eos_token,
                    tools => tools,
                };
                tmpl.render(ctx)
                    .map_err(|e| anyhow!("chat template: {}", describe(&e)))
            }
            Self::Lwm => render_lwm(messages, add_generation_prompt),
        }
    }

    /// Extra stop strings a chat using this template should stop on, besides
    /// EOS: `["USER:"]` for [`ChatTemplate::Lwm`], none for Jinja templates
    /// (they end turns with an EOS / end-of-turn token).
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            Self::Jinja { source, .. } if source == DEFAULT_CHAT_TEMPLATE => {
                vec!["<|im_end|>".to_string()]
            }
            Self::Jinja { .. } => Vec::new(),
            Self::Lwm => vec!["USER:".to_string()],
        }
    }
}

/// The system text a template that ignores `tools` gets instead (Hermes-style: the format
/// the tool grammar forces, so the prompt and the constraint agree).
pub fn tool_system_text(tools: &[serde_json::Value]) -> String {
    let mut s = String::from(
        "You can call tools. To call one, answer with only \
         <tool_call>{\"name\": <tool name>, \"arguments\": <the arguments as a JSON object>}</tool_call>\n\
         The tools, each with the JSON schema of its arguments:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str("</tools>");
    s
}

/// An assistant's tool calls as text, for templates that do not render `tool_calls`.
fn tool_calls_text(calls: &serde_json::Value) -> String {
    let mut out = Vec::new();
    for c in calls.as_array().into_iter().flatten() {
        // The layout the tool grammar produces (name first, ", " and ": " separators).
        let f = &c["function"];
        out.push(format!(
            "<tool_call>{{\"name\": {}, \"arguments\": {}}}</tool_call>",
            f["name"], f["arguments"]
        ));
    }
    out.join("\n")
}

impl ChatTemplate {
    fn source_mentions(&self, needle: &str) -> bool {
        matches!(self, Self::Jinja { source, .. } if source.contains(needle))
    }

    /// Rewrite a conversation with tools for this template: a template whose source never
    /// mentions `tools` gets the tool list as system text ([`tool_system_text`]); one that
    /// never mentions `tool_calls` gets an assistant's calls as `<tool_call>` text; one that
    /// knows no `tool` role gets tool results as a user turn wrapped in `<tool_response>`
    /// (the LWM format knows only system, user and assistant).
    pub fn prepare_tool_chat(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Vec<ChatMessage> {
        let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
        let tool_role = self.source_mentions("'tool'") || self.source_mentions("\"tool\"");
        let calls_known = self.source_mentions("tool_calls");
        for m in messages {
            let mut m = m.clone();
            if !calls_known {
                if let Some(calls) = m.tool_calls.take() {
                    let text = tool_calls_text(&calls);
                    m.content = if m.content.is_empty() {
                        text
                    } else {
                        format!("{}\n{text}", m.content)
                    };
                }
            }
            if m.role == "tool" && !tool_role {
                m = ChatMessage::user(format!("<tool_response>\n{}\n</tool_response>", m.content));
            }
            out.push(m);
        }
        if !tools.is_empty() && !self.source_mentions("tools") {
            let text = tool_system_text(tools);
            match out.first_mut() {
                Some(first) if first.role == "system" => {
                    first.content = format!("{}\n\n{text}", first.content);
                }
                _ => out.insert(0, ChatMessage::system(text)),
            }
        }
        out
    }
}

fn render_lwm(messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
    let mut parts: Vec<String> = Vec::with_capacity(messages.len() + 2);
    let rest = match messages.first() {
        Some(m) if m.role == "system" => {
            if !m.content.is_empty() {
                parts.push(m.content.clone());
            }
            &messages[1..]
        }
        _ => {
            parts.push(LWM_SYSTEM_PROMPT.to_string());
            messages
        }
    };
    for (i, m) in rest.iter().enumerate() {
        match m.role.as_str() {
            "user" => parts.push(format!("USER: {}", m.content)),
            "assistant" => parts.push(format!("ASSISTANT: {}", m.content.trim())),
            "system" => bail!(
                "chat template: the LWM format allows a system message only as the first message (found one at position {})",
                i + messages.len() - rest.len()
            ),
            other => bail!(
                "chat template: the LWM format knows the roles system, user and assistant, not {other:?}"
            ),
        }
    }
    if add_generation_prompt {
        parts.push("ASSISTANT:".to_string());
    }
    Ok(parts.join(" "))
}

// ---------------------------------------------------------------------------
// strftime for `strftime_now` (UTC; no time-zone database is used).

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..365, from March 1
    let mp = (5 * doy + 2) / 153; // 0 = March
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Format a Unix time (seconds, UTC) with the common strftime directives:
/// `%Y %y %m %d %e %H %I %M %S %p %B %b %h %A %a %j %w %u %F %T %D %R %Z %z %s %n %t %%`.
/// Unknown directives are copied through unchanged.
fn strftime_utc(fmt: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, min, sec) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[month as usize - 1] + day + u32::from(month > 2 && is_leap(year));
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[month as usize - 1];
    let day_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let s = match d {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'C' => format!("{:02}", year.div_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:2}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{hour12:02}"),
            'M' => format!("{min:02}"),
            'S' => format!("{sec:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'B' => month_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'A' => day_name.to_string(),
            'a' => day_name[..3].to_string(),
            'j' => format!("{yday:03}"),
            'w' => weekday.to_string(),
            'u' => (if weekday == 0 { 7 } else { weekday }).to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{min:02}:{sec:02}"),
            'R' => format!("{hour:02}:{min:02}"),
            'D' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            's' => unix_secs.to_string(),
            'n' => "\n".to_string(),
            't' => "\t".to_string(),
            '%' => "%".to_string(),
            other => format!("%{other}"),
        };
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: &[(&str, &str)]) -> Vec<ChatMessage> {
        v.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn tools_fall_back_to_system_text_and_tool_call_text() {
        let t = ChatTemplate::jinja(DEFAULT_CHAT_TEMPLATE.into(), String::new(), String::new())
            .unwrap();
        let tools = vec![
            serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}),
        ];
        let mut call = ChatMessage::assistant("");
        call.tool_calls = Some(serde_json::json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]));
        let mut result = ChatMessage::new("tool", "18 C");
        result.tool_call_id = Some("call_1".into());
        let msgs = vec![ChatMessage::user("Weather in Paris?"), call, result];
        let prepared = t.prepare_tool_chat(&msgs, &tools);
        assert_eq!(prepared[0].role, "system");
        assert!(prepared[0].content.contains("\"get_weather\""));
        assert!(
            prepared[2].content.contains(
                r#"<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>"#
            ),
            "{}",
            prepared[2].content
        );
        assert_eq!(prepared[3].role, "user");
        assert_eq!(
            prepared[3].content,
            "<tool_response>\n18 C\n</tool_response>"
        );
        let s = t.render_with_tools(&prepared, &tools, true).unwrap();
        assert!(s.contains("<tool_response>") && s.ends_with("<|im_start|>assistant\n"));
        // A template that renders tools itself gets them in its context, messages as they are.
        let own = ChatTemplate::jinja(
            "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% endif %};{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let prepared = own.prepare_tool_chat(&msgs, &tools);
        assert_eq!(prepared.len(), 3);
        let s = own.render_with_tools(&prepared, &tools, true).unwrap();
        assert_eq!(s, "[get_weather]user;assistantget_weather;user;");
    }

    #[test]
    fn lwm_single_turn() {
        let t = ChatTemplate::Lwm;
        let s = t
            .render(&msgs(&[("user", "What is the capital of France?")]), true)
            .unwrap();
        assert_eq!(
            s,
            "You are a helpful assistant. USER: What is the capital of France? ASSISTANT:"
        );
        assert_eq!(t.stop_strings(), vec!["USER:".to_string()]);
    }

    #[test]
    fn lwm_multi_turn_and_system() {
        let t = ChatTemplate::Lwm;
        let m = msgs(&[("user", "u1"), ("assistant", " a1"), ("user", "u2")]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "You are a helpful assistant. USER: u1 ASSISTANT: a1 USER: u2 ASSISTANT:"
        );
        assert_eq!(
            t.render(&m, false).unwrap(),
            "You are a helpful assistant. USER: u1 ASSISTANT: a1 USER: u2"
        );
        let m = msgs(&[("system", "Be brief."), ("user", "hi")]);
        assert_eq!(t.render(&m, true).unwrap(), "Be brief. USER: hi ASSISTANT:");
        let m = msgs(&[("system", ""), ("user", "hi")]);
        assert_eq!(t.render(&m, true).unwrap(), "USER: hi ASSISTANT:");
        assert!(t
            .render(&msgs(&[("user", "a"), ("system", "b")]), true)
            .is_err());
        assert!(t.render(&msgs(&[("tool", "x")]), true).is_err());
    }

    #[test]
    fn jinja_basics() {
        let t = ChatTemplate::jinja(
            "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}{{ eos_token }}\n"
                .to_string(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let s = t.render(&msgs(&[("user", "  hi  ")]), true).unwrap();
        assert_eq!(s, "<s>user: hi\nassistant:</s>");
        assert!(t.stop_strings().is_empty());
    }

    #[test]
    fn jinja_errors() {
        let e = ChatTemplate::jinja("{% if %}".into(), String::new(), String::new()).unwrap_err();
        assert!(e.to_string().starts_with("chat template:"), "{e}");
        let t = ChatTemplate::jinja(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
                .into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
        let e = t.render(&msgs(&[("assistant", "x")]), false).unwrap_err();
        assert!(e.to_string().contains("first must be user"), "{e}");
    }

    #[test]
    fn strftime() {
        // 2024-02-29T13:05:09Z, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime_utc("%d %B %Y", t), "29 February 2024");
        assert_eq!(
            strftime_utc("%a %b %e %I%p %j %%", t),
            "Thu Feb 29 01PM 060 %"
        );
        assert_eq!(strftime_utc("%F %T", 0), "1970-01-01 00:00:00");
        assert_eq!(strftime_utc("%A", 0), "Thursday");
        assert_eq!(strftime_utc("%F", 951_782_400), "2000-02-29");
        assert_eq!(strftime_utc("%F %j", -86_400), "1969-12-31 365");
        let t = ChatTemplate::jinja(
            "{{ strftime_now('%Y') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let y: i64 = t.render(&[], false).unwrap().parse().unwrap();
        assert!(y >= 2024);
    }
}
