//! OpenAI request parsing (field by field, so a wrong type names its parameter) and the
//! error shape `{"error": {"message", "type", "param", "code"}}`.

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
}

fn opt<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn number(obj: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
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

fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
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

/// The fields common to both endpoints. `chat` selects how logprobs are asked for.
pub fn parse_params(obj: &Map<String, Value>, chat: bool) -> Result<Params, ApiError> {
    let model = match opt(obj, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(ApiError::bad(
                "model",
                format!("'model' must be a string, got {v}"),
            ))
        }
    };
    if let Some(n) = integer(obj, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
    }
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
    let seed =
        match opt(obj, "seed") {
            None => None,
            Some(v) => Some(v.as_i64().map(|s| s as u64).or(v.as_u64()).ok_or_else(|| {
                ApiError::bad("seed", format!("'seed' must be an integer, got {v}"))
            })?),
        };
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
    Ok(Params {
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

/// Chat messages: role + content (a string or a list of text parts).
pub fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
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
    for (i, m) in items.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::bad(
                &format!("messages[{i}]"),
                "each message must be an object",
            ));
        };
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
            other => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].role"),
                    format!("unsupported role '{other}' (use system, user or assistant)"),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad(
                                &format!("messages[{i}].content"),
                                "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
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
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
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
