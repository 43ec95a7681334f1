//! `lwm-server`: an OpenAI-compatible HTTP server (axum on tokio) in front of one engine
//! thread (see `scheduler`), on `lwm-engine`. `lwm serve` parses its flags into
//! `ServerOptions` and calls `run`.

mod metrics;
mod openai;
mod scheduler;

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lwm_engine::generate::{Engine, GenerateRequest};
use lwm_engine::sampling::SamplingParams;
use metrics::Metrics;
use openai::{ApiError, Params, Prompt};
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
        created: unix_now(),
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/", get(chat_page))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
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
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!("lwm serve: shutting down");
            })
            .await
            .context("server failed")
    })?;
    // The engine thread ends once every job sender is gone.
    drop(rt);
    let _ = engine_thread.join();
    Ok(())
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

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "lwm",
         "context_length": st.engine.context_length()}
    ]}))
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
        Ok((params, prompt_tokens, events)) => {
            respond(st.clone(), params, prompt_tokens, events, chat, t0).await
        }
        Err(e) => e.into_response(),
    };
    st.metrics
        .count_request(endpoint, response.status().as_u16());
    response
}

/// Read, check and tokenize a request, then queue it on the engine.
async fn start(
    st: &Shared,
    body: Body,
    chat: bool,
) -> Result<(Params, usize, UnboundedReceiver<Event>), ApiError> {
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
    let obj = openai::parse_body(&bytes)?;
    let params = openai::parse_params(&obj, chat)?;
    if let Some(m) = &params.model {
        if *m != st.model_id {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model '{m}' does not exist; this server serves '{}'",
                    st.model_id
                ),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
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
    let messages = if chat {
        Some(openai::parse_messages(&obj)?)
    } else {
        None
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
    let (ids, grammar) = tokio::task::spawn_blocking(move || {
        let ids = match (messages, prompt) {
            (Some(m), _) => engine.chat_prompt(&m).map(|(_, ids)| ids).map_err(|e| {
                ApiError::bad("messages", format!("cannot render the chat prompt: {e:#}"))
            })?,
            (None, Some(Prompt::Text(t))) => engine.tokenize(&t).map_err(|e| {
                ApiError::bad("prompt", format!("cannot tokenize the prompt: {e:#}"))
            })?,
            (None, Some(Prompt::Ids(ids))) => ids,
            (None, None) => Vec::new(),
        };
        let grammar = match &constraint {
            Some(c) => Some(
                engine
                    .compile_constraint(c)
                    .map_err(|e| ApiError::bad("response_format", format!("{e:#}")))?,
            ),
            None => None,
        };
        Ok::<_, ApiError>((ids, grammar))
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
    if st.metrics.queue_depth.load(Ordering::Relaxed) as usize >= st.max_queue {
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
        top_k: 0,
        top_p: params.top_p,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        presence_penalty: params.presence_penalty,
        frequency_penalty: params.frequency_penalty,
        seed,
    };
    let mut stop = params.stop.clone();
    if chat {
        if let Some(t) = &st.engine.chat_template {
            stop.extend(t.stop_strings());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let n_prompt = ids.len();
    let mut request = GenerateRequest::new(ids, max_tokens, sampling);
    request.stop = stop;
    request.grammar = grammar;
    request.top_logprobs = params.top_logprobs;
    request.prefill_chunk = st.prefill_chunk;
    let job = Job {
        request,
        events: tx,
        received: Instant::now(),
    };
    st.metrics
        .prompt_tokens
        .fetch_add(n_prompt as u64, Ordering::Relaxed);
    st.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the engine has stopped",
            )
        })?;
    Ok((params, n_prompt, rx))
}

/// The HTTP error for an engine error: by its type, the request's fault (400), the
/// machine's (503: not enough memory beside the requests in flight), or ours (500).
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

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
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

async fn respond(
    st: Shared,
    params: Params,
    _prompt_tokens: usize,
    mut events: UnboundedReceiver<Event>,
    chat: bool,
    t0: Instant,
) -> Response {
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = if chat {
        format!("chatcmpl-{n}")
    } else {
        format!("cmpl-{n}")
    };
    let created = unix_now();
    let model = st.model_id.clone();
    if !params.stream {
        let mut text = String::new();
        let mut lps: Vec<(usize, TokenLogprob)> = Vec::new();
        let finished = loop {
            match events.recv().await {
                Some(Event::Admitted) => {}
                Some(Event::Token { text: t, logprob }) => {
                    if let Some(lp) = logprob {
                        lps.push((text.chars().count(), lp));
                    }
                    text.push_str(&t);
                }
                Some(Event::Done(f)) => break f,
                Some(Event::Error(e)) => return engine_error(&e).into_response(),
                None => {
                    return ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the engine dropped the request",
                    )
                    .into_response()
                }
            }
        };
        st.metrics
            .cached_prompt_tokens
            .fetch_add(finished.cached_tokens as u64, Ordering::Relaxed);
        st.metrics
            .request_seconds
            .observe(t0.elapsed().as_secs_f64());
        let logprobs = params.top_logprobs.map(|_| {
            if chat {
                json!({"content": lps.iter().map(|(_, l)| chat_logprob(l)).collect::<Vec<_>>()})
            } else {
                completion_logprobs(&lps)
            }
        });
        let body = if chat {
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": logprobs, "finish_reason": finished.finish_reason}],
                "usage": usage(&finished),
            })
        } else {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                             "finish_reason": finished.finish_reason}],
                "usage": usage(&finished),
            })
        };
        return Json(body).into_response();
    }

    // Streaming: one SSE event per token, once the engine has admitted the request (a
    // request it refuses gets its HTTP status, not a 200 stream). Dropping this stream
    // (client gone) drops the receiver, which the engine sees as cancellation.
    match events.recv().await {
        Some(Event::Admitted) => {}
        Some(Event::Error(e)) => return engine_error(&e).into_response(),
        _ => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the engine dropped the request",
            )
            .into_response()
        }
    }
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |delta: Value, finish: Option<&str>, logprobs: Option<Value>| -> Value {
        let choice = if chat {
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let sse = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    let mut first = Vec::new();
    if chat {
        first.push(sse(&chunk(
            json!({"role": "assistant", "content": ""}),
            None,
            None,
        )));
    }
    let include_usage = params.include_usage;
    let want_logprobs = params.top_logprobs.is_some();
    let metrics = st.metrics.clone();
    let mut offset = 0usize;
    let mut done = false;
    let stream = tokio_stream::iter(first)
        .chain(
            tokio_stream::wrappers::UnboundedReceiverStream::new(events).map_while(move |ev| {
                if done {
                    return None;
                }
                let out = match ev {
                    Event::Admitted => Bytes::new(),
                    Event::Token { text, logprob } => {
                        if text.is_empty() && logprob.is_none() {
                            Bytes::new()
                        } else {
                            let lp = logprob.filter(|_| want_logprobs).map(|l| {
                                if chat {
                                    json!({"content": [chat_logprob(&l)]})
                                } else {
                                    completion_logprobs(&[(offset, l)])
                                }
                            });
                            offset += text.chars().count();
                            let delta = if chat {
                                json!({"content": text})
                            } else {
                                json!(text)
                            };
                            sse(&chunk(delta, None, lp))
                        }
                    }
                    Event::Done(f) => {
                        done = true;
                        metrics
                            .cached_prompt_tokens
                            .fetch_add(f.cached_tokens as u64, Ordering::Relaxed);
                        metrics.request_seconds.observe(t0.elapsed().as_secs_f64());
                        let empty = if chat { json!({}) } else { json!("") };
                        let mut last = chunk(empty, Some(f.finish_reason), None);
                        let mut s = String::new();
                        if include_usage {
                            last["usage"] = Value::Null;
                        }
                        s.push_str(&format!("data: {last}\n\n"));
                        if include_usage {
                            let mut u = chunk(json!({}), None, None);
                            u["choices"] = json!([]);
                            u["usage"] = usage(&f);
                            s.push_str(&format!("data: {u}\n\n"));
                        }
                        s.push_str("data: [DONE]\n\n");
                        Bytes::from(s)
                    }
                    Event::Error(e) => {
                        done = true;
                        let err = engine_error(&e);
                        Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", err.body()))
                    }
                };
                Some(out)
            }),
        )
        .map(Ok::<Bytes, std::convert::Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
