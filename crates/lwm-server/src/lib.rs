//! `lwm-server`: an OpenAI-compatible HTTP server (axum on tokio) in front of one engine
//! thread (see `scheduler`), on `lwm-engine`. `lwm serve` parses its flags into
//! `ServerOptions` and calls `run`.

mod images;
mod metrics;
mod openai;
mod scheduler;
mod vision;

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lwm_engine::chat_template::{ChatMessage, ChatTemplate};
use lwm_engine::constrain::{tool_call_grammar, Constraint, ToolMode};
use lwm_engine::generate::{Engine, GenerateRequest};
use lwm_engine::sampling::SamplingParams;
use metrics::Metrics;
use openai::{ApiError, Params, Prompt, ToolChoice};
use scheduler::{Event, Finished, Job, SchedulerLimits, TokenLogprob};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::StreamExt;

/// How the server listens and what it accepts (the `lwm serve` flags).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    /// The model id clients must use (default: the model file's name without extension).
    pub served_model_name: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Largest prompt accepted, in tokens (default: the context length minus one).
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for (also the default when it asks for none).
    pub max_tokens_limit: usize,
    /// Requests generated at once (round-robin, one step each per round).
    pub max_active: usize,
    /// Requests waiting beyond the active ones; more are refused with 429.
    pub max_queue: usize,
    /// Idle KV caches kept for prompt-prefix reuse.
    pub prompt_cache: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Most choices (`n`) one request may ask for.
    pub max_n: usize,
    /// When set, every endpoint but /health (and the page at /) needs `Authorization:
    /// Bearer KEY`.
    pub api_key: Option<String>,
    /// Origins allowed to call the API from a browser (`*` for any); none: no CORS headers.
    pub cors_origins: Vec<String>,
    /// For an LWM vision-language model: the VQGAN weights that encode request images
    /// (default: `vqgan` next to the model's params, when there).
    pub vqgan: Option<std::path::PathBuf>,
    /// Frame size fed to the VQGAN (256 for LWM's).
    pub frame_size: usize,
    /// Images may also be local files under this directory (`file://` URLs).
    pub allowed_media_path: Option<std::path::PathBuf>,
    /// Most images (frames) one request may carry.
    pub max_images: usize,
}

struct AppState {
    engine: Arc<Engine>,
    model_id: String,
    jobs: Mutex<mpsc::Sender<Job>>,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    max_prompt_tokens: usize,
    max_tokens_limit: usize,
    max_queue: usize,
    prefill_chunk: usize,
    max_n: usize,
    max_active: usize,
    api_key: Option<String>,
    cors_origins: Vec<String>,
    /// The VQGAN and image rules, for a vision-language model with its VQGAN found.
    vision: Option<Arc<vision::VisionInput>>,
    /// Image generations run one at a time (`images`).
    image_jobs: tokio::sync::Semaphore,
    /// Image requests waiting for `image_jobs`.
    image_waiting: std::sync::atomic::AtomicUsize,
    created: u64,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serve `engine` until Ctrl-C.
pub fn run(engine: Engine, a: ServerOptions) -> Result<()> {
    let engine = Arc::new(engine);
    let model_id = a.served_model_name.clone().unwrap_or_else(|| {
        engine
            .location
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lwm".into())
    });
    let ctx = engine.context_length();
    // A vision-language model reads images with its VQGAN: the one given, else the `vqgan`
    // file next to its params (the released layout); without one, images are refused.
    let vqgan_path = a.vqgan.clone().or_else(|| {
        lwm_vision::vqgan::beside(engine.location.path())
            .filter(|p| engine.model.has_vision() && p.is_file())
    });
    let vision = match vqgan_path {
        Some(p) if engine.model.has_vision() => Some(Arc::new(vision::VisionInput::load(
            &p,
            a.frame_size,
            a.allowed_media_path.as_deref(),
            a.max_images,
        )?)),
        Some(p) => anyhow::bail!(
            "--vqgan {}: the model is not an LWM vision-language checkpoint",
            p.display()
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel::<Job>();
    let limits = SchedulerLimits {
        max_active: a.max_active,
        prompt_cache: a.prompt_cache,
    };
    let engine_thread = {
        let engine = engine.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("lwm-engine".into())
            .spawn(move || scheduler::run(engine, rx, limits, metrics))
            .context("cannot start the engine thread")?
    };
    let state = Arc::new(AppState {
        engine,
        model_id: model_id.clone(),
        jobs: Mutex::new(tx),
        metrics,
        max_body_bytes: a.max_body_bytes,
        max_prompt_tokens: a.max_prompt_tokens.unwrap_or(ctx - 1).min(ctx - 1),
        max_tokens_limit: a.max_tokens_limit.max(1),
        max_queue: a.max_queue,
        prefill_chunk: a.prefill_chunk,
        max_n: a.max_n.max(1),
        max_active: a.max_active.max(1),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        cors_origins: a.cors_origins.clone(),
        vision,
        image_jobs: tokio::sync::Semaphore::new(1),
        image_waiting: std::sync::atomic::AtomicUsize::new(0),
        created: unix_now(),
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/", get(chat_page))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route(
            "/v1/images/generations",
            post(|State(st): State<Shared>, body: Body| images::generations(st, body)),
        )
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/props", get(props))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let addr = format!("{}:{}", a.host, a.port);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        // Tests and scripts wait for this line.
        eprintln!("lwm serve: model '{model_id}' listening on http://{local}");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("server failed")
    })?;
    // The engine thread ends once every job sender is gone.
    drop(rt);
    let _ = engine_thread.join();
    Ok(())
}

/// Ctrl-C, or SIGTERM (what systemd, Docker and Kubernetes send to stop a service): stop
/// accepting, let the requests in flight finish, then exit 0.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("lwm serve: shutting down");
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
    )
    .code("not_found")
}

/// The chat page: one self-contained file (inline CSS and JS, nothing fetched from
/// elsewhere), so it works offline; the CSP holds the page to that and to this server.
async fn chat_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
            ),
        ],
        include_str!("chat.html"),
    )
        .into_response()
}

/// Every request passes here: CORS (preflights are answered here, before the key check,
/// since browsers send no credentials on them), the API key, and one access-log line.
async fn gate(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed_origin = origin
        .as_ref()
        .and_then(|o| cors_allow(&st.cors_origins, o));
    let mut response = if method == Method::OPTIONS && !st.cors_origins.is_empty() {
        preflight(req.headers())
    } else if !authorized(&st, &method, &path, req.headers()) {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid or missing API key: send 'Authorization: Bearer KEY'",
        )
        .code("invalid_api_key")
        .into_response()
    } else {
        next.run(req).await
    };
    if let Some(o) = allowed_origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    tracing::info!(
        target: "lwm_server::access",
        "{method} {path} {} {:.1} ms",
        response.status().as_u16(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    response
}

/// The Access-Control-Allow-Origin value for a request from `origin`, if it may call us.
fn cors_allow(origins: &[String], origin: &HeaderValue) -> Option<HeaderValue> {
    if origins.iter().any(|o| o == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let o = origin.to_str().ok()?;
    origins.iter().any(|a| a == o).then(|| origin.clone())
}

fn preflight(headers: &axum::http::HeaderMap) -> Response {
    let allow_headers = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

fn authorized(st: &AppState, method: &Method, path: &str, headers: &axum::http::HeaderMap) -> bool {
    let Some(key) = &st.api_key else {
        return true;
    };
    // Liveness probes and the static page carry no data.
    if path == "/health" || (path == "/" && method == Method::GET) {
        return true;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    // Compare every byte so the time taken does not tell how much of a guess was right.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "lwm",
         "context_length": st.engine.context_length()}
    ]}))
}

async fn model_by_id(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    if id != st.model_id {
        return ApiError::model_not_found(&id, &st.model_id).into_response();
    }
    Json(
        json!({"id": st.model_id, "object": "model", "created": st.created, "owned_by": "lwm",
                "context_length": st.engine.context_length()}),
    )
    .into_response()
}

/// llama-server's /props: what this server runs and with which defaults.
async fn props(State(st): State<Shared>) -> Json<Value> {
    let template = match &st.engine.chat_template {
        Some(ChatTemplate::Jinja { source, .. }) => json!(source),
        Some(ChatTemplate::Lwm) => json!("lwm"),
        None => Value::Null,
    };
    Json(json!({
        "model_path": st.engine.location.path().display().to_string(),
        "model_alias": st.model_id,
        "n_ctx": st.engine.context_length(),
        "chat_template": template,
        "chat_template_origin": st.engine.chat_template_origin.as_str(),
        "total_slots": st.max_active,
        // Images in chat and /v1/images/generations (an LWM vision model with its VQGAN).
        "modalities": {"vision": st.vision.is_some(), "audio": false},
        "default_generation_settings": {
            "n_ctx": st.engine.context_length(),
            "params": {
                "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                "repeat_penalty": 1.0, "repeat_last_n": 64, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "n_predict": st.max_tokens_limit, "n": 1,
            },
        },
        "limits": {
            "max_tokens": st.max_tokens_limit, "max_prompt_tokens": st.max_prompt_tokens,
            "max_n": st.max_n, "max_queue": st.max_queue, "max_body_bytes": st.max_body_bytes,
        },
    }))
}

async fn read_json(st: &Shared, body: Body) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, st.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the request body is over the limit of {} bytes",
                    st.max_body_bytes
                ),
            )
            .code("request_too_large")
        })?;
    openai::parse_body(&bytes)
}

/// Reject fields outside `known` (llama-server's shapes for /tokenize and /detokenize).
fn only_fields(obj: &serde_json::Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad(k, format!("unknown field '{k}'"))),
        None => Ok(()),
    }
}

/// POST /tokenize {"content", "add_special", "with_pieces"} -> {"tokens": [...]}.
async fn tokenize(State(st): State<Shared>, body: Body) -> Response {
    let run = async {
        let obj = read_json(&st, body).await?;
        only_fields(&obj, &["content", "add_special", "with_pieces"])?;
        let content = match obj.get("content") {
            Some(Value::String(c)) => c.clone(),
            _ => return Err(ApiError::bad("content", "'content' must be a string")),
        };
        let flag = |k: &str| match obj.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::bad(
                k,
                format!("'{k}' must be a boolean, got {v}"),
            )),
        };
        // add_special: BOS as the tokenizer adds it by default (`lwm tokenize`'s default).
        let add_special = flag("add_special")?;
        let with_pieces = flag("with_pieces")?;
        let tok = &st.engine.tokenizer;
        let ids = tok
            .encode(&content, add_special && tok.add_bos_by_default(), true)
            .map_err(|e| ApiError::bad("content", format!("cannot tokenize: {e:#}")))?;
        let tokens: Vec<Value> = if with_pieces {
            ids.iter()
                .map(|&id| {
                    let b = tok.token_bytes(id);
                    // Pieces that are not whole UTF-8 go out as bytes, as llama-server does.
                    let piece = match String::from_utf8(b) {
                        Ok(s) => json!(s),
                        Err(e) => json!(e.into_bytes()),
                    };
                    json!({"id": id, "piece": piece})
                })
                .collect()
        } else {
            ids.iter().map(|&id| json!(id)).collect()
        };
        Ok::<_, ApiError>(Json(json!({"tokens": tokens})))
    };
    match run.await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// POST /detokenize {"tokens": [...]} -> {"content": str}.
async fn detokenize(State(st): State<Shared>, body: Body) -> Response {
    let run = async {
        let obj = read_json(&st, body).await?;
        only_fields(&obj, &["tokens"])?;
        let Some(Value::Array(items)) = obj.get("tokens") else {
            return Err(ApiError::bad(
                "tokens",
                "'tokens' must be an array of token ids",
            ));
        };
        let vocab = st.engine.tokenizer.vocab_size();
        let mut ids = Vec::with_capacity(items.len());
        for v in items {
            match v.as_u64() {
                Some(id) if (id as usize) < vocab => ids.push(id as u32),
                _ => {
                    return Err(ApiError::bad(
                        "tokens",
                        format!("{v} is not a token id of this vocabulary (0..{vocab})"),
                    ))
                }
            }
        }
        Ok::<_, ApiError>(Json(
            json!({"content": st.engine.tokenizer.decode(&ids, false)}),
        ))
    };
    match run.await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_text(State(st): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn chat_completions(State(st): State<Shared>, body: Body) -> Response {
    handle(st, body, true).await
}

async fn completions(State(st): State<Shared>, body: Body) -> Response {
    handle(st, body, false).await
}

async fn handle(st: Shared, body: Body, chat: bool) -> Response {
    let t0 = Instant::now();
    let endpoint = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let response = match start(&st, body, chat).await {
        Ok((params, events)) => respond(st.clone(), params, events, chat, t0).await,
        Err(e) => e.into_response(),
    };
    st.metrics
        .count_request(endpoint, response.status().as_u16());
    response
}

/// Everything the server checks of a request body before it needs a model: the JSON, the
/// fields (`parse_params`), the messages or prompt, the tools' call grammar, and the chat
/// rendered through the fallback ChatML template and the LWM format. The request fuzzer
/// (`fuzz/fuzz_targets/server_request.rs`) runs it on arbitrary bytes; `Err` is the message
/// a client would get.
pub fn check_request(body: &[u8], chat: bool, vocab: usize) -> Result<String, String> {
    use lwm_engine::chat_template::DEFAULT_CHAT_TEMPLATE;
    let obj = openai::parse_body(body).map_err(|e| e.message)?;
    let params = openai::parse_params(&obj, chat, vocab).map_err(|e| e.message)?;
    if !params.tool_schemas.is_empty() {
        let mode = if params.tool_choice == ToolChoice::Auto {
            ToolMode::Auto
        } else {
            ToolMode::Required
        };
        tool_call_grammar(&params.tool_schemas, mode).map_err(|e| format!("tools: {e:#}"))?;
    }
    if !chat {
        return match openai::parse_prompt(&obj, vocab).map_err(|e| e.message)? {
            Prompt::Text(t) => Ok(t),
            Prompt::Ids(ids) => Ok(format!("{} token ids", ids.len())),
        };
    }
    let (messages, _images) = openai::parse_messages(&obj).map_err(|e| e.message)?;
    let chatml = ChatTemplate::jinja(DEFAULT_CHAT_TEMPLATE.into(), "<s>".into(), "</s>".into())
        .map_err(|e| format!("{e:#}"))?;
    let mut out = String::new();
    for template in [chatml, ChatTemplate::Lwm] {
        let prepared = template.prepare_tool_chat(&messages, &params.tools);
        match template.render_with_tools(&prepared, &params.tools, true) {
            Ok(text) => out.push_str(&text),
            Err(e) => return Err(format!("cannot render the chat prompt: {e:#}")),
        }
    }
    Ok(out)
}

/// Render a chat with tools: the template gets `tools` (and its fallbacks, see
/// `ChatTemplate::prepare_tool_chat`), then the text is tokenized as `Engine::chat_prompt`
/// does.
fn tool_chat_prompt(
    engine: &Engine,
    messages: &[ChatMessage],
    tools: &[Value],
) -> anyhow::Result<Vec<u32>> {
    let Some(template) = engine.chat_template.as_ref() else {
        return engine.chat_prompt(messages).map(|(_, ids)| ids);
    };
    let prepared = template.prepare_tool_chat(messages, tools);
    let text = template.render_with_tools(&prepared, tools, true)?;
    let add_bos = matches!(template, ChatTemplate::Lwm) && engine.tokenizer.bos_id().is_some();
    engine.tokenizer.encode(&text, add_bos, true)
}

/// Read, check and tokenize a request, then queue its `n` generations on the engine.
async fn start(
    st: &Shared,
    body: Body,
    chat: bool,
) -> Result<(Params, Vec<UnboundedReceiver<Event>>), ApiError> {
    let obj = read_json(st, body).await?;
    let params = openai::parse_params(&obj, chat, st.engine.tokenizer.vocab_size())?;
    if let Some(m) = &params.model {
        if *m != st.model_id {
            return Err(ApiError::model_not_found(m, &st.model_id));
        }
    }
    if params.n > st.max_n {
        return Err(ApiError::bad(
            "n",
            format!(
                "'n' is {} but this server allows at most {} (--max-n)",
                params.n, st.max_n
            ),
        ));
    }
    let max_tokens = params.max_tokens.unwrap_or(st.max_tokens_limit);
    if max_tokens > st.max_tokens_limit {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "'max_tokens' is {max_tokens} but this server allows at most {}",
                st.max_tokens_limit
            ),
        ));
    }
    let (messages, images) = if chat {
        let (m, images) = openai::parse_messages(&obj)?;
        (Some(m), images)
    } else {
        (None, Vec::new())
    };
    let vision = match (images.first(), &st.vision) {
        (None, _) => None,
        (Some(p), _) if !st.engine.model.has_vision() => {
            return Err(ApiError::bad(
                &p.param,
                format!(
                    "the model '{}' does not take images (not an LWM vision-language checkpoint)",
                    st.model_id
                ),
            ))
        }
        (Some(p), None) => {
            return Err(ApiError::bad(
                &p.param,
                "this server has no VQGAN to encode images: start lwm serve with --vqgan FILE",
            ))
        }
        (Some(p), Some(_)) if !params.tools.is_empty() => {
            return Err(ApiError::bad(&p.param, "images and tools in one request are not supported"))
        }
        (Some(_), Some(_)) if messages.as_ref().is_some_and(|m| m.len() != 1) => {
            return Err(ApiError::bad(
                "messages",
                "an LWM vision chat is one user message: its text and its images (the frames, in order)",
            ))
        }
        (Some(_), Some(v)) => Some(v.clone()),
    };
    let prompt = if chat {
        None
    } else {
        Some(openai::parse_prompt(
            &obj,
            st.engine.tokenizer.vocab_size(),
        )?)
    };
    // Tokenizing and compiling a grammar take CPU time: keep them off the async workers.
    let engine = st.engine.clone();
    let constraint = params.constraint.clone();
    let tools = params.tools.clone();
    let tool_schemas = params.tool_schemas.clone();
    let tool_choice = params.tool_choice.clone();
    let (ids, grammar, vision_mask) = tokio::task::spawn_blocking(move || {
        let mut vision_mask = None;
        let ids = match (messages, prompt, vision) {
            (Some(m), _, Some(v)) => {
                // The VQGAN runs here, off the async workers (seconds per frame).
                let frames = v.encode(&images)?;
                let (ids, mask) =
                    lwm_vision::vision_chat::chat_prompt(&engine.tokenizer, &m[0].content, &frames)
                        .map_err(|e| {
                            ApiError::bad(
                                "messages",
                                format!("cannot build the vision prompt: {e:#}"),
                            )
                        })?;
                vision_mask = Some(mask);
                ids
            }
            (Some(m), _, _) if !tools.is_empty() => {
                tool_chat_prompt(&engine, &m, &tools).map_err(|e| {
                    ApiError::bad("messages", format!("cannot render the chat prompt: {e:#}"))
                })?
            }
            (Some(m), _, _) => engine.chat_prompt(&m).map(|(_, ids)| ids).map_err(|e| {
                ApiError::bad("messages", format!("cannot render the chat prompt: {e:#}"))
            })?,
            (None, Some(Prompt::Text(t)), _) => engine.tokenize(&t).map_err(|e| {
                ApiError::bad("prompt", format!("cannot tokenize the prompt: {e:#}"))
            })?,
            (None, Some(Prompt::Ids(ids)), _) => ids,
            (None, None, _) => Vec::new(),
        };
        // Every tool schema is compiled on its own, even under tool_choice "none", so a
        // malformed one is reported by its place whatever the choice (inside the combined
        // grammar an unusable alternative could silently drop out).
        for (i, (_, params)) in tool_schemas.iter().enumerate() {
            engine
                .compile_constraint(&Constraint::JsonSchema(params.clone()))
                .map_err(|e| {
                    ApiError::bad(
                        &format!("tools[{i}].function.parameters"),
                        format!("the parameters schema is not usable: {e:#}"),
                    )
                })?;
        }
        let tool_grammar = if tool_schemas.is_empty() || tool_choice == ToolChoice::None {
            None
        } else {
            let schemas: Vec<(String, Value)> = match &tool_choice {
                ToolChoice::Named(name) => tool_schemas
                    .into_iter()
                    .filter(|(n, _)| n == name)
                    .collect(),
                _ => tool_schemas,
            };
            let mode = if tool_choice == ToolChoice::Auto {
                ToolMode::Auto
            } else {
                ToolMode::Required
            };
            let c = tool_call_grammar(&schemas, mode)
                .map_err(|e| ApiError::bad("tools", format!("{e:#}")))?;
            Some(
                engine
                    .compile_constraint(&c)
                    .map_err(|e| ApiError::bad("tools", format!("{e:#}")))?,
            )
        };
        let grammar = match (&constraint, tool_choice) {
            (Some(c), _) => Some(
                engine
                    .compile_constraint(c)
                    .map_err(|e| ApiError::bad("response_format", format!("{e:#}")))?,
            ),
            (None, ToolChoice::None) => None,
            (None, _) => tool_grammar,
        };
        Ok::<_, ApiError>((ids, grammar, vision_mask))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })??;
    let param = if chat { "messages" } else { "prompt" };
    if ids.is_empty() {
        return Err(ApiError::bad(param, "the prompt is empty (no tokens)"));
    }
    if ids.len() > st.max_prompt_tokens {
        return Err(ApiError::bad(
            param,
            format!(
                "the prompt has {} tokens but at most {} are allowed (context {})",
                ids.len(),
                st.max_prompt_tokens,
                st.engine.context_length()
            ),
        )
        .code("context_length_exceeded"));
    }
    if st.metrics.queue_depth.load(Ordering::Relaxed) as usize + params.n > st.max_queue {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "{} requests are already waiting; try again later",
                st.max_queue
            ),
        ));
    }
    let seed = params.seed.unwrap_or_else(|| {
        // No seed: a different draw per request.
        let n = st.next_id.fetch_add(1, Ordering::Relaxed);
        (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0))
            ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let sampling = SamplingParams {
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        min_p: params.min_p,
        repeat_penalty: params.repeat_penalty,
        repeat_last_n: params.repeat_last_n,
        presence_penalty: params.presence_penalty,
        frequency_penalty: params.frequency_penalty,
        seed,
        logit_bias: params.logit_bias.clone(),
    };
    let mut stop = params.stop.clone();
    if chat {
        if let Some(t) = &st.engine.chat_template {
            stop.extend(t.stop_strings());
        }
    }
    let n_prompt = ids.len();
    let mut receivers = Vec::with_capacity(params.n);
    let jobs = st.jobs.lock().unwrap_or_else(|p| p.into_inner());
    for i in 0..params.n {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Choice i draws with seed + i: a seeded request stays reproducible choice by choice.
        let mut sampling = sampling.clone();
        sampling.seed = seed.wrapping_add(i as u64);
        let mut request = GenerateRequest::new(ids.clone(), max_tokens, sampling);
        request.stop = stop.clone();
        request.grammar = grammar.clone();
        request.top_logprobs = params.top_logprobs;
        request.ignore_eos = params.ignore_eos;
        request.prefill_chunk = st.prefill_chunk;
        request.vision_mask = vision_mask.clone();
        let job = Job {
            request,
            events: tx,
            received: Instant::now(),
        };
        jobs.send(job).map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the engine has stopped",
            )
        })?;
        receivers.push(rx);
    }
    drop(jobs);
    st.metrics
        .prompt_tokens
        .fetch_add(n_prompt as u64, Ordering::Relaxed);
    Ok((params, receivers))
}

fn engine_error(e: &anyhow::Error) -> ApiError {
    let message = format!("{e:#}");
    match lwm_core::Error::of(e) {
        Some(lwm_core::Error::ContextExceeded { .. }) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
                .code("context_length_exceeded")
        }
        Some(lwm_core::Error::EmptyPrompt | lwm_core::Error::InvalidRequest(_)) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
        Some(lwm_core::Error::OutOfMemory(_)) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                .code("insufficient_memory")
        }
        None => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
    }
}

fn chat_logprob(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
        "top_logprobs": lp.top.iter().map(|(t, b, l)| json!({"token": t, "logprob": l, "bytes": b})).collect::<Vec<_>>(),
    })
}

/// Completions-style logprobs over the tokens so far (`text_offset` counts characters).
fn completion_logprobs(lps: &[(usize, TokenLogprob)]) -> Value {
    json!({
        "tokens": lps.iter().map(|(_, l)| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|(_, l)| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|(_, l)| {
            let m: serde_json::Map<String, Value> = l.top.iter().map(|(t, _, v)| (t.clone(), json!(v))).collect();
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": lps.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
    })
}

/// The tool calls in a choice's text, OpenAI's shape, when the text is a Hermes-style call
/// (`<tool_call>{"name", "arguments"}</tool_call>`, what the tool grammar forces); `arguments`
/// goes out as a JSON string.
fn tool_calls_of(text: &str, id: &str) -> Option<Value> {
    let inner = text
        .trim()
        .strip_prefix("<tool_call>")?
        .strip_suffix("</tool_call>")?;
    let call: Value = serde_json::from_str(inner).ok()?;
    let name = call.get("name")?.as_str()?;
    let arguments = call.get("arguments")?;
    Some(json!([{"id": id, "type": "function",
                 "function": {"name": name, "arguments": arguments.to_string()}}]))
}

/// How a streamed chat choice is being sent: text as it comes, or held back because it is
/// (or may be) a tool call, which goes out whole once it is complete.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Text,
    Call,
    /// tool_choice "auto" before the first character: the grammar lets a call start only
    /// with '<' and text never, so that character decides.
    Undecided,
}

struct StreamChoice {
    mode: Mode,
    held: String,
    offset: usize,
}

fn sum_usage(finished: &[Finished]) -> Value {
    // The choices share one prompt: it counts once.
    let prompt = finished.first().map_or(0, |f| f.prompt_tokens);
    let cached = finished.first().map_or(0, |f| f.cached_tokens);
    let completion: usize = finished.iter().map(|f| f.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn dropped() -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the engine dropped the request",
    )
    .into_response()
}

async fn respond(
    st: Shared,
    params: Params,
    mut events: Vec<UnboundedReceiver<Event>>,
    chat: bool,
    t0: Instant,
) -> Response {
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = if chat {
        format!("chatcmpl-{n}")
    } else {
        format!("cmpl-{n}")
    };
    let call_id = move |i: usize| format!("call_{n}_{i}");
    let created = unix_now();
    let model = st.model_id.clone();
    let tools_on = chat && params.tool_choice != ToolChoice::None;
    if !params.stream {
        // The choices run side by side in the engine; their events wait in their channels.
        let mut choices = Vec::with_capacity(events.len());
        let mut finished_all = Vec::with_capacity(events.len());
        for (index, rx) in events.iter_mut().enumerate() {
            let mut text = String::new();
            let mut lps: Vec<(usize, TokenLogprob)> = Vec::new();
            let finished = loop {
                match rx.recv().await {
                    Some(Event::Admitted) => {}
                    Some(Event::Token { text: t, logprob }) => {
                        if let Some(lp) = logprob {
                            lps.push((text.chars().count(), lp));
                        }
                        text.push_str(&t);
                    }
                    Some(Event::Done(f)) => break f,
                    Some(Event::Error(e)) => return engine_error(&e).into_response(),
                    None => return dropped(),
                }
            };
            let logprobs = params.top_logprobs.map(|_| {
                if chat {
                    json!({"content": lps.iter().map(|(_, l)| chat_logprob(l)).collect::<Vec<_>>()})
                } else {
                    completion_logprobs(&lps)
                }
            });
            let calls = if tools_on {
                tool_calls_of(&text, &call_id(index))
            } else {
                None
            };
            choices.push(match (chat, calls) {
                (true, Some(calls)) => json!({"index": index,
                    "message": {"role": "assistant", "content": null, "tool_calls": calls},
                    "logprobs": logprobs, "finish_reason": "tool_calls"}),
                (true, None) => json!({"index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finished.finish_reason}),
                (false, _) => json!({"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": finished.finish_reason}),
            });
            finished_all.push(finished);
        }
        st.metrics.cached_prompt_tokens.fetch_add(
            finished_all.first().map_or(0, |f| f.cached_tokens) as u64,
            Ordering::Relaxed,
        );
        st.metrics
            .request_seconds
            .observe(t0.elapsed().as_secs_f64());
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": choices, "usage": sum_usage(&finished_all),
        }))
        .into_response();
    }

    // Streaming: one SSE event per token, once the engine has admitted every choice (a
    // request it refuses gets its HTTP status, not a 200 stream). Dropping this stream
    // (client gone) drops the receivers, which the engine sees as cancellation.
    for rx in events.iter_mut() {
        match rx.recv().await {
            Some(Event::Admitted) => {}
            Some(Event::Error(e)) => return engine_error(&e).into_response(),
            _ => return dropped(),
        }
    }
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |index: usize,
                      delta: Value,
                      finish: Option<&str>,
                      logprobs: Option<Value>|
          -> Value {
        let choice = if chat {
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            json!({"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let sse = |v: &Value| format!("data: {v}\n\n");
    let n_choices = events.len();
    let mut first = Vec::new();
    if chat {
        for i in 0..n_choices {
            first.push(Bytes::from(sse(&chunk(
                i,
                json!({"role": "assistant", "content": ""}),
                None,
                None,
            ))));
        }
    }
    let start_mode = match params.tool_choice {
        _ if !chat => Mode::Text,
        ToolChoice::None => Mode::Text,
        ToolChoice::Auto => Mode::Undecided,
        ToolChoice::Required | ToolChoice::Named(_) => Mode::Call,
    };
    let mut state: Vec<StreamChoice> = (0..n_choices)
        .map(|_| StreamChoice {
            mode: start_mode,
            held: String::new(),
            offset: 0,
        })
        .collect();
    let mut finished_all: Vec<Finished> = Vec::new();
    let mut merged = tokio_stream::StreamMap::new();
    for (i, rx) in events.into_iter().enumerate() {
        merged.insert(i, tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    }
    let include_usage = params.include_usage;
    let want_logprobs = params.top_logprobs.is_some();
    let metrics = st.metrics.clone();
    let mut ended = false;
    let stream = tokio_stream::iter(first)
        .chain(merged.map_while(move |(i, ev)| {
            if ended {
                return None;
            }
            let c = &mut state[i];
            let mut out = String::new();
            match ev {
                Event::Admitted => {}
                Event::Token { text, logprob } => {
                    if c.mode == Mode::Undecided && !text.is_empty() {
                        c.mode = if text.starts_with('<') {
                            Mode::Call
                        } else {
                            Mode::Text
                        };
                    }
                    if c.mode != Mode::Text {
                        c.held.push_str(&text);
                    } else if !text.is_empty() || logprob.is_some() {
                        let lp = logprob.filter(|_| want_logprobs).map(|l| {
                            if chat {
                                json!({"content": [chat_logprob(&l)]})
                            } else {
                                completion_logprobs(&[(c.offset, l)])
                            }
                        });
                        c.offset += text.chars().count();
                        let delta = if chat {
                            json!({"content": text})
                        } else {
                            json!(text)
                        };
                        out.push_str(&sse(&chunk(i, delta, None, lp)));
                    }
                }
                Event::Done(f) => {
                    let held = std::mem::take(&mut c.held);
                    let mut reason = f.finish_reason;
                    if c.mode == Mode::Call {
                        if let Some(calls) = tool_calls_of(&held, &call_id(i)) {
                            if let Some(call) = calls.get(0) {
                                let mut call = call.clone();
                                call["index"] = json!(0);
                                out.push_str(&sse(&chunk(
                                    i,
                                    json!({"tool_calls": [call]}),
                                    None,
                                    None,
                                )));
                            }
                            reason = "tool_calls";
                        } else if !held.is_empty() {
                            // Cut short (max_tokens): what there is goes out as text.
                            out.push_str(&sse(&chunk(i, json!({"content": held}), None, None)));
                        }
                    }
                    let empty = if chat { json!({}) } else { json!("") };
                    let mut last = chunk(i, empty, Some(reason), None);
                    if include_usage {
                        last["usage"] = Value::Null;
                    }
                    out.push_str(&sse(&last));
                    finished_all.push(f);
                    if finished_all.len() == n_choices {
                        ended = true;
                        metrics.cached_prompt_tokens.fetch_add(
                            finished_all.first().map_or(0, |f| f.cached_tokens) as u64,
                            Ordering::Relaxed,
                        );
                        metrics.request_seconds.observe(t0.elapsed().as_secs_f64());
                        if include_usage {
                            let mut u = chunk(0, json!({}), None, None);
                            u["choices"] = json!([]);
                            u["usage"] = sum_usage(&finished_all);
                            out.push_str(&sse(&u));
                        }
                        out.push_str("data: [DONE]\n\n");
                    }
                }
                Event::Error(e) => {
                    ended = true;
                    let err = engine_error(&e);
                    out.push_str(&format!("data: {}\n\ndata: [DONE]\n\n", err.body()));
                }
            }
            Some(Bytes::from(out))
        }))
        .map(Ok::<Bytes, std::convert::Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
