//! OpenAI request parsing (field by field, so a wrong type names its parameter) and the
//! error shape `{"error": {"message", "type", "param", "code"}}`.

use crate::vision::ImagePart;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lwm_engine::chat_template::ChatMessage;
use lwm_engine::constrain::Constraint;
use serde_json::{json, Map, Value};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 404 for a model id this server does not serve (`served`).
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model '{asked}' does not exist; this server serves '{served}'"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// What a completion or chat request asks for, checked and typed.
#[derive(Debug)]
pub struct Params {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    /// None: no logprobs; Some(n): the chosen token plus n alternatives.
    pub top_logprobs: Option<usize>,
    pub constraint: Option<Constraint>,
    /// Choices to generate (checked against the server's limit by the caller).
    pub n: usize,
    pub top_k: usize,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// llama-server's `ignore_eos`: generate `max_tokens` whatever the model says (load
    /// tests, benchmarks).
    pub ignore_eos: bool,
    pub logit_bias: Vec<(u32, f32)>,
    /// The request's tools as given (what the chat template sees).
    pub tools: Vec<Value>,
    /// (name, JSON schema of the arguments) per tool.
    pub tool_schemas: Vec<(String, Value)>,
    pub tool_choice: ToolChoice,
}

/// `tool_choice`, checked against `tools`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The fields each endpoint accepts; anything else is a 400 naming it, so a client never
/// believes a setting took effect when it did not. `user`, `metadata` (tags for stored
/// completions; nothing is stored) and `service_tier` are accepted and have no effect;
/// `store` is accepted only when it is false.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "logit_bias",
    "response_format",
    "user",
    // llama-server's sampling extras.
    "top_k",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "ignore_eos",
];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "metadata",
    "service_tier",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "suffix", "best_of"];

/// Reject any field the endpoint does not implement (a null counts as absent).
pub fn check_fields(obj: &Map<String, Value>, chat: bool) -> Result<(), ApiError> {
    let own = if chat { CHAT_FIELDS } else { COMPLETION_FIELDS };
    for (k, v) in obj {
        if v.is_null() || COMMON_FIELDS.contains(&k.as_str()) || own.contains(&k.as_str()) {
            continue;
        }
        let endpoint = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        return Err(ApiError::bad(
            k,
            format!("'{k}' is not supported by {endpoint} on this server"),
        )
        .code("unsupported_parameter"));
    }
    // Accepted only in the form that changes nothing we do.
    if chat {
        if boolean(obj, "store")? == Some(true) {
            return Err(ApiError::bad(
                "store",
                "'store': true is not supported (this server stores nothing)",
            ));
        }
        if let Some(v) = opt(obj, "metadata") {
            let ok = v
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(ApiError::bad(
                    "metadata",
                    "'metadata' must be an object of strings",
                ));
            }
        }
        match opt(obj, "service_tier") {
            None => {}
            Some(Value::String(s)) if s == "auto" || s == "default" => {}
            Some(v) => {
                return Err(ApiError::bad(
                    "service_tier",
                    format!("'service_tier' must be \"auto\" or \"default\", got {v}"),
                ))
            }
        }
        boolean(obj, "parallel_tool_calls")?;
    } else {
        if boolean(obj, "echo")? == Some(true) {
            return Err(ApiError::bad("echo", "'echo': true is not supported"));
        }
        match opt(obj, "suffix") {
            None => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => return Err(ApiError::bad("suffix", "'suffix' is not supported")),
        }
        if let Some(b) = integer(obj, "best_of")? {
            if b != 1 {
                return Err(ApiError::bad(
                    "best_of",
                    "only 'best_of': 1 is supported (use 'n' for several choices)",
                ));
            }
        }
    }
    string(obj, "user")?;
    Ok(())
}

pub(crate) fn opt<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

pub(crate) fn number(
    obj: &Map<String, Value>,
    key: &str,
    lo: f64,
    hi: f64,
) -> Result<Option<f64>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(v) => {
            let x = v
                .as_f64()
                .ok_or_else(|| ApiError::bad(key, format!("'{key}' must be a number, got {v}")))?;
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::bad(
                    key,
                    format!("'{key}' must be between {lo} and {hi}, got {x}"),
                ));
            }
            Ok(Some(x))
        }
    }
}

pub(crate) fn string<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ApiError::bad(
            key,
            format!("'{key}' must be a string, got {v}"),
        )),
    }
}

/// `seed`: any integer (a negative one as its two's complement, as OpenAI's int64 seeds).
pub(crate) fn seed(obj: &Map<String, Value>) -> Result<Option<u64>, ApiError> {
    match opt(obj, "seed") {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(|s| s as u64)
            .or(v.as_u64())
            .map(Some)
            .ok_or_else(|| ApiError::bad("seed", format!("'seed' must be an integer, got {v}"))),
    }
}

pub(crate) fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                key,
                format!("'{key}' must be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn boolean(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, format!("'{key}' must be a boolean, got {v}"))),
    }
}

/// Parse the body as a JSON object.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields common to both endpoints. `chat` selects how logprobs are asked for; `vocab`
/// bounds the token ids of `logit_bias`.
pub fn parse_params(
    obj: &Map<String, Value>,
    chat: bool,
    vocab: usize,
) -> Result<Params, ApiError> {
    check_fields(obj, chat)?;
    let model = string(obj, "model")?.map(str::to_string);
    let n = match integer(obj, "n")? {
        None => 1,
        Some(0) => return Err(ApiError::bad("n", "'n' must be at least 1")),
        Some(n) => n.min(u32::MAX as u64) as usize,
    };
    let top_k = integer(obj, "top_k")?.unwrap_or(0).min(u32::MAX as u64) as usize;
    let min_p = number(obj, "min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32;
    let repeat_penalty = number(obj, "repeat_penalty", f64::MIN, f64::MAX)?.unwrap_or(1.0) as f32;
    if repeat_penalty <= 0.0 || !repeat_penalty.is_finite() {
        return Err(ApiError::bad(
            "repeat_penalty",
            "'repeat_penalty' must be greater than 0 (1 = off)",
        ));
    }
    let repeat_last_n = integer(obj, "repeat_last_n")?.unwrap_or(64).min(1 << 20) as usize;
    let ignore_eos = boolean(obj, "ignore_eos")?.unwrap_or(false);
    let logit_bias = parse_logit_bias(obj, vocab)?;
    let max_tokens = match integer(obj, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => integer(obj, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad(
            "max_tokens",
            "'max_tokens' must be at least 1",
        ));
    }
    let temperature = number(obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = number(obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
    if top_p <= 0.0 {
        return Err(ApiError::bad("top_p", "'top_p' must be greater than 0"));
    }
    let presence_penalty = number(obj, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
    let frequency_penalty = number(obj, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
    let stop = match opt(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for it in items {
                match it {
                    Value::String(s) => out.push(s.clone()),
                    other => {
                        return Err(ApiError::bad(
                            "stop",
                            format!(
                                "'stop' must be a string or an array of strings, found {other}"
                            ),
                        ))
                    }
                }
            }
            if out.len() > 4 {
                return Err(ApiError::bad("stop", "at most 4 stop sequences"));
            }
            out
        }
        Some(v) => {
            return Err(ApiError::bad(
                "stop",
                format!("'stop' must be a string or an array of strings, got {v}"),
            ))
        }
    };
    let seed = seed(obj)?;
    let stream = boolean(obj, "stream")?.unwrap_or(false);
    let include_usage = match opt(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")
            .map_err(|_| {
                ApiError::bad(
                    "stream_options",
                    "'stream_options.include_usage' must be a boolean",
                )
            })?
            .unwrap_or(false),
        Some(v) => {
            return Err(ApiError::bad(
                "stream_options",
                format!("'stream_options' must be an object, got {v}"),
            ))
        }
    };
    let top_logprobs = if chat {
        let want = boolean(obj, "logprobs")?.unwrap_or(false);
        let n = integer(obj, "top_logprobs")?;
        if let Some(n) = n {
            if n > 20 {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "'top_logprobs' must be between 0 and 20",
                ));
            }
            if !want {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "'top_logprobs' needs 'logprobs': true",
                ));
            }
        }
        want.then_some(n.unwrap_or(0) as usize)
    } else {
        match integer(obj, "logprobs")? {
            Some(n) if n > 5 => {
                return Err(ApiError::bad(
                    "logprobs",
                    "'logprobs' must be between 0 and 5",
                ))
            }
            n => n.map(|n| n as usize),
        }
    };
    let constraint = parse_response_format(obj)?;
    let (tools, tool_schemas) = if chat {
        parse_tools(obj)?
    } else {
        (Vec::new(), Vec::new())
    };
    let tool_choice = parse_tool_choice(obj, &tool_schemas)?;
    if tool_choice != ToolChoice::None && constraint.is_some() {
        return Err(ApiError::bad(
            "response_format",
            "'response_format' cannot be combined with tools unless 'tool_choice' is \"none\"",
        ));
    }
    Ok(Params {
        n,
        top_k,
        min_p,
        repeat_penalty,
        repeat_last_n,
        ignore_eos,
        logit_bias,
        tools,
        tool_schemas,
        tool_choice,
        model,
        max_tokens: max_tokens.map(|n| n as usize),
        temperature,
        top_p,
        presence_penalty,
        frequency_penalty,
        stop,
        seed,
        stream,
        include_usage,
        top_logprobs,
        constraint,
    })
}

/// OpenAI's `logit_bias`: token id (a string key) -> bias in [-100, 100].
fn parse_logit_bias(obj: &Map<String, Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let p = "logit_bias";
    let Some(v) = opt(obj, p) else {
        return Ok(Vec::new());
    };
    let Value::Object(m) = v else {
        return Err(ApiError::bad(
            p,
            format!("'logit_bias' must be an object of token id -> bias, got {v}"),
        ));
    };
    // Bounds the work per sampled token.
    if m.len() > 1024 {
        return Err(ApiError::bad(p, "'logit_bias' has more than 1024 entries"));
    }
    let mut out = Vec::with_capacity(m.len());
    for (k, b) in m {
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::bad(
                p,
                format!("'logit_bias' keys must be token ids, got \"{k}\""),
            )
        })?;
        if id as usize >= vocab {
            return Err(ApiError::bad(
                p,
                format!("'logit_bias': token id {id} is outside the vocabulary ({vocab})"),
            ));
        }
        let b = b.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
            ApiError::bad(
                p,
                format!("'logit_bias': the bias of token {id} must be a number in [-100, 100], got {b}"),
            )
        })?;
        out.push((id, b as f32));
    }
    Ok(out)
}

/// `tools`: function tools with a name, an optional description and the JSON schema of
/// their arguments (an object schema; none means no arguments).
#[allow(clippy::type_complexity)]
fn parse_tools(obj: &Map<String, Value>) -> Result<(Vec<Value>, Vec<(String, Value)>), ApiError> {
    let Some(v) = opt(obj, "tools") else {
        return Ok((Vec::new(), Vec::new()));
    };
    let Value::Array(items) = v else {
        return Err(ApiError::bad("tools", "'tools' must be an array"));
    };
    let mut tools = Vec::with_capacity(items.len());
    let mut schemas: Vec<(String, Value)> = Vec::with_capacity(items.len());
    for (i, t) in items.iter().enumerate() {
        let here = format!("tools[{i}]");
        let bad = |what: &str, msg: String| ApiError::bad(&format!("{here}{what}"), msg);
        let Value::Object(t) = t else {
            return Err(bad("", "each tool must be an object".into()));
        };
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(
                ".type",
                "only tools of type \"function\" are supported".into(),
            ));
        }
        if let Some(k) = t.keys().find(|k| *k != "type" && *k != "function") {
            return Err(bad(&format!(".{k}"), format!("unknown tool field '{k}'")));
        }
        let Some(Value::Object(f)) = t.get("function") else {
            return Err(bad(
                ".function",
                "a function tool needs a 'function' object".into(),
            ));
        };
        if let Some(k) = f
            .keys()
            .find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
        {
            return Err(bad(
                &format!(".function.{k}"),
                format!("unknown function field '{k}'"),
            ));
        }
        let name = match f.get("name") {
            Some(Value::String(n))
                if !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                n.clone()
            }
            other => {
                return Err(bad(
                    ".function.name",
                    format!(
                        "a function name must be 1-64 characters of a-z, A-Z, 0-9, _ and -, got {}",
                        other.map_or("nothing".into(), |v| v.to_string())
                    ),
                ))
            }
        };
        if schemas.iter().any(|(n, _)| *n == name) {
            return Err(bad(
                ".function.name",
                format!("two tools are named '{name}'"),
            ));
        }
        match f.get("description") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => {
                return Err(bad(
                    ".function.description",
                    "'description' must be a string".into(),
                ))
            }
        }
        if !matches!(
            f.get("strict"),
            None | Some(Value::Null) | Some(Value::Bool(_))
        ) {
            return Err(bad(".function.strict", "'strict' must be a boolean".into()));
        }
        let params = match f.get("parameters") {
            None | Some(Value::Null) => {
                serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false})
            }
            Some(p @ Value::Object(m)) => {
                // Arguments are a JSON object: a schema for anything else cannot be a tool's.
                match m.get("type") {
                    None => {}
                    Some(Value::String(t)) if t == "object" => {}
                    Some(other) => {
                        return Err(bad(
                            ".function.parameters",
                            format!("the parameters schema must have type \"object\", got {other}"),
                        ))
                    }
                }
                p.clone()
            }
            Some(other) => {
                return Err(bad(
                    ".function.parameters",
                    format!("'parameters' must be a JSON schema object, got {other}"),
                ))
            }
        };
        schemas.push((name, params));
        tools.push(Value::Object(t.clone()));
    }
    Ok((tools, schemas))
}

fn parse_tool_choice(
    obj: &Map<String, Value>,
    tools: &[(String, Value)],
) -> Result<ToolChoice, ApiError> {
    let p = "tool_choice";
    let choice = match opt(obj, p) {
        None if tools.is_empty() => return Ok(ToolChoice::None),
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::bad(
                    p,
                    format!("unknown tool_choice \"{other}\" (use none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}})"),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = (o.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str))
                .flatten()
                .ok_or_else(|| {
                    ApiError::bad(
                        p,
                        "an object tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !tools.iter().any(|(n, _)| n == name) {
                return Err(ApiError::bad(
                    p,
                    format!("tool_choice names the function '{name}', which is not among 'tools'"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(v) => return Err(ApiError::bad(p, format!("'tool_choice' must be a string or an object, got {v}"))),
    };
    if tools.is_empty() && choice != ToolChoice::None {
        return Err(ApiError::bad(p, "'tool_choice' needs 'tools'"));
    }
    Ok(choice)
}

fn parse_response_format(obj: &Map<String, Value>) -> Result<Option<Constraint>, ApiError> {
    let p = "response_format";
    let Some(rf) = opt(obj, p) else {
        return Ok(None);
    };
    let Value::Object(rf) = rf else {
        return Err(ApiError::bad(
            p,
            format!("'response_format' must be an object, got {rf}"),
        ));
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let Some(Value::Object(js)) = rf.get("json_schema") else {
                return Err(ApiError::bad(
                    p,
                    "response_format type json_schema needs a 'json_schema' object with a 'schema'",
                ));
            };
            match js.get("schema") {
                Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(Constraint::JsonSchema(s.clone())))
                }
                None => Ok(Some(Constraint::JsonObject)),
                Some(v) => Err(ApiError::bad(
                    p,
                    format!("'response_format.json_schema.schema' must be an object, got {v}"),
                )),
            }
        }
        Some(other) => Err(ApiError::bad(
            p,
            format!(
                "unknown response_format type '{other}' (use text, json_object or json_schema)"
            ),
        )),
        None => Err(ApiError::bad(p, "'response_format.type' must be a string")),
    }
}

/// Chat messages: role + content (a string or a list of text and image parts), and the
/// `image_url` parts of user messages, in order, each with where it was.
pub fn parse_messages(
    obj: &Map<String, Value>,
) -> Result<(Vec<ChatMessage>, Vec<ImagePart>), ApiError> {
    let p = "messages";
    let items = match opt(obj, p) {
        None => return Err(ApiError::bad(p, "'messages' is required")),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::bad(
                p,
                format!("'messages' must be an array, got {v}"),
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::bad(
            p,
            "'messages' must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    let mut images = Vec::new();
    for (i, m) in items.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::bad(
                &format!("messages[{i}]"),
                "each message must be an object",
            ));
        };
        // `name` (a participant's name) is accepted with no effect except on tool turns.
        if let Some((k, _)) = m.iter().find(|(k, v)| {
            !v.is_null()
                && !["role", "content", "name", "tool_calls", "tool_call_id"].contains(&k.as_str())
        }) {
            return Err(ApiError::bad(
                &format!("messages[{i}].{k}"),
                format!("the message field '{k}' is not supported"),
            ));
        }
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].role"),
                    "each message needs a string 'role'",
                ))
            }
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].role"),
                    format!("unsupported role '{other}' (use system, user, assistant or tool)"),
                ))
            }
        };
        let tool_calls = match opt(m, "tool_calls") {
            None => None,
            Some(_) if role != "assistant" => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].tool_calls"),
                    "only assistant messages carry 'tool_calls'",
                ))
            }
            Some(v) => Some(parse_tool_calls(v, i)?),
        };
        let tool_call_id = match (role, opt(m, "tool_call_id")) {
            ("tool", Some(Value::String(id))) if !id.is_empty() => Some(id.clone()),
            ("tool", _) => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].tool_call_id"),
                    "a tool message needs a non-empty string 'tool_call_id'",
                ))
            }
            _ => None,
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (Some("image_url"), _) if role == "user" => {
                            images.push(image_part(part, &format!("messages[{i}].content[{j}]"))?)
                        }
                        (Some("image_url"), _) => {
                            return Err(ApiError::bad(
                                &format!("messages[{i}].content[{j}]"),
                                "images may only be in a user message",
                            ))
                        }
                        _ => {
                            return Err(ApiError::bad(
                                &format!("messages[{i}].content[{j}]"),
                                "content parts are {\"type\": \"text\", \"text\": ...} or {\"type\": \"image_url\", \"image_url\": {\"url\": ...}}",
                            ))
                        }
                    }
                }
                text
            }
            _ => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].content"),
                    "'content' must be a string or an array of text parts",
                ))
            }
        };
        let mut msg = ChatMessage::new(role, content);
        msg.tool_calls = tool_calls;
        msg.tool_call_id = tool_call_id;
        if role == "tool" {
            msg.name = m.get("name").and_then(Value::as_str).map(str::to_string);
        }
        out.push(msg);
    }
    Ok((out, images))
}

/// One `image_url` content part (at `at`, `messages[i].content[j]`): its URL. OpenAI's
/// shape is `{"url": ..., "detail": ...}`; a bare string is accepted too.
fn image_part(part: &Value, at: &str) -> Result<ImagePart, ApiError> {
    let param = format!("{at}.image_url");
    let url = match part.get("image_url") {
        Some(Value::String(u)) => u,
        Some(Value::Object(o)) => match o.get("url") {
            Some(Value::String(u)) => u,
            _ => return Err(ApiError::bad(&param, "'image_url' needs a string 'url'")),
        },
        _ => {
            return Err(ApiError::bad(
                &param,
                "'image_url' must be {\"url\": \"data:image/png;base64,...\"}",
            ))
        }
    };
    Ok(ImagePart {
        url: url.clone(),
        param,
    })
}

/// An assistant message's `tool_calls`, checked; each `function.arguments` (a JSON string in
/// OpenAI's API) becomes the object Hugging Face templates expect.
fn parse_tool_calls(v: &Value, i: usize) -> Result<Value, ApiError> {
    let p = format!("messages[{i}].tool_calls");
    let shape = || {
        ApiError::bad(
            &p,
            "'tool_calls' must be an array of {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
        )
    };
    let Value::Array(calls) = v else {
        return Err(shape());
    };
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let id = c.get("id").and_then(Value::as_str).ok_or_else(shape)?;
        if c.get("type").and_then(Value::as_str).unwrap_or("function") != "function" {
            return Err(shape());
        }
        let f = c.get("function").ok_or_else(shape)?;
        let name = f.get("name").and_then(Value::as_str).ok_or_else(shape)?;
        let arguments = match f.get("arguments") {
            Some(Value::String(a)) => serde_json::from_str::<Value>(a).map_err(|e| {
                ApiError::bad(
                    &p,
                    format!("the arguments of tool call '{id}' are not valid JSON: {e}"),
                )
            })?,
            Some(a @ Value::Object(_)) => a.clone(),
            _ => return Err(shape()),
        };
        out.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}));
    }
    Ok(Value::Array(out))
}

/// A completion prompt: a string, a one-string array, or an array of token ids.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

pub fn parse_prompt(obj: &Map<String, Value>, vocab: usize) -> Result<Prompt, ApiError> {
    let p = "prompt";
    let bad_shape = || {
        ApiError::bad(
            p,
            "'prompt' must be a string, an array of one string, or an array of token ids",
        )
    };
    match opt(obj, p) {
        None => Err(ApiError::bad(p, "'prompt' is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
            let ids: Vec<u32> = a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect();
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(ApiError::bad(
                    p,
                    format!("token id {bad} is outside the vocabulary ({vocab})"),
                ));
            }
            Ok(Prompt::Ids(ids))
        }
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
            Err(ApiError::bad(p, "only one prompt per request is supported"))
        }
        Some(_) => Err(bad_shape()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn param_of(r: Result<Params, ApiError>) -> String {
        r.expect_err("an error").param.unwrap_or_default()
    }

    #[test]
    fn unknown_and_unimplemented_fields_are_named() {
        let chat = |v: Value| parse_params(&obj(v), true, 100);
        assert_eq!(
            param_of(chat(json!({"messages": [], "frobnicate": 1}))),
            "frobnicate"
        );
        assert_eq!(param_of(chat(json!({"audio": {}}))), "audio");
        assert_eq!(param_of(chat(json!({"store": true}))), "store");
        // Chat-only fields are unknown to completions, and the other way round.
        assert_eq!(
            param_of(parse_params(&obj(json!({"tools": []})), false, 100)),
            "tools"
        );
        assert_eq!(param_of(chat(json!({"echo": false}))), "echo");
        // Harmless ones pass; a null counts as absent.
        let p = chat(json!({"user": "u", "store": false, "metadata": {"a": "b"}, "service_tier": "auto", "audio": null})).unwrap();
        assert_eq!(p.n, 1);
    }

    #[test]
    fn sampling_extras_and_logit_bias_are_checked() {
        let p = parse_params(
            &obj(json!({"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.3, "n": 3, "logit_bias": {"7": -100, " 9": 2.5}})),
            false,
            100,
        )
        .unwrap();
        assert_eq!((p.top_k, p.n), (5, 3));
        assert!((p.min_p - 0.1).abs() < 1e-6 && (p.repeat_penalty - 1.3).abs() < 1e-6);
        let mut bias = p.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, -100.0), (9, 2.5)]);
        let bad = |v: Value| param_of(parse_params(&obj(v), false, 100));
        assert_eq!(bad(json!({"top_k": -1})), "top_k");
        assert_eq!(bad(json!({"min_p": 1.5})), "min_p");
        assert_eq!(bad(json!({"repeat_penalty": 0})), "repeat_penalty");
        assert_eq!(bad(json!({"n": 0})), "n");
        assert_eq!(bad(json!({"logit_bias": {"7": 101}})), "logit_bias");
        assert_eq!(bad(json!({"logit_bias": {"100": 1}})), "logit_bias");
        assert_eq!(bad(json!({"logit_bias": {"x": 1}})), "logit_bias");
        assert_eq!(bad(json!({"logit_bias": [1]})), "logit_bias");
    }

    #[test]
    fn tools_and_tool_choice_are_checked() {
        let f = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let chat = |v: Value| parse_params(&obj(v), true, 100);
        let p = chat(json!({"tools": [f]})).unwrap();
        assert_eq!(p.tool_choice, ToolChoice::Auto);
        assert_eq!(p.tool_schemas[0].0, "get_weather");
        let p = chat(json!({"tools": [f], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})).unwrap();
        assert_eq!(p.tool_choice, ToolChoice::Named("get_weather".into()));
        assert_eq!(
            param_of(chat(
                json!({"tools": [f], "tool_choice": {"type": "function", "function": {"name": "nope"}}})
            )),
            "tool_choice"
        );
        assert_eq!(
            param_of(chat(json!({"tool_choice": "required"}))),
            "tool_choice"
        );
        assert_eq!(
            param_of(chat(json!({"tools": [f], "tool_choice": "sometimes"}))),
            "tool_choice"
        );
        assert_eq!(
            param_of(chat(
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]})
            )),
            "tools[0].function.parameters"
        );
        assert_eq!(
            param_of(chat(
                json!({"tools": [{"type": "function", "function": {"name": "bad name!"}}]})
            )),
            "tools[0].function.name"
        );
        assert_eq!(
            param_of(chat(json!({"tools": [f, f]}))),
            "tools[1].function.name"
        );
        assert_eq!(
            param_of(chat(
                json!({"tools": [f], "tool_choice": "required", "response_format": {"type": "json_object"}})
            )),
            "response_format"
        );
    }

    #[test]
    fn tool_messages_are_checked() {
        let msgs = |v: Value| parse_messages(&obj(json!({"messages": v}))).map(|(m, _)| m);
        let ok = msgs(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}
        ]))
        .unwrap();
        assert_eq!(
            ok[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"]["a"],
            1
        );
        assert_eq!(ok[2].tool_call_id.as_deref(), Some("call_1"));
        let e = msgs(json!([{"role": "user", "content": "hi", "audio": {"id": "x"}}])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].audio"));
        let e = msgs(json!([{"role": "tool", "content": "42"}])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_call_id"));
        let e = msgs(json!([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_calls"));
    }
}
