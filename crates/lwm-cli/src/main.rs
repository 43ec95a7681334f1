//! `lwm`: the command-line front end. Parses flags, calls the `lwm` library, prints.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lwm::attention::Chunking;
use lwm::chat_template::ChatMessage;
use lwm::generate::{Engine, GenerateOutput, GenerateRequest, LoadOptions};
use lwm::model::ForwardOptions;
use lwm::sampling::SamplingParams;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod bench;
mod chat;
mod convert;
mod eval;
mod needle;
mod pull;
mod ring;
mod serve;
mod structured;
mod train;
mod vision;

#[derive(Parser)]
#[command(
    name = "lwm",
    version,
    about = "Large World Model: long-context LLaMA models in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level of messages on stderr: error, warn, info, debug or trace (or a RUST_LOG
    /// filter such as `lwm=debug`); RUST_LOG, when set, wins.
    #[arg(long, global = true, default_value = "warn", help_heading = "Output")]
    log_level: String,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming tokens to stdout.
    #[command(
        after_help = "Examples:\n  lwm generate -p 'Once upon a time' -n 64\n  lwm generate -m model.gguf -f prompt.txt --temp 0 -c 32768 -ctk q8_0 --json\n  lwm generate -m params::LWM-Text-1M-Jax/params --preset lwm-text-1m -p '...' --mesh-dim 1,1,1,4"
    )]
    Generate(GenerateArgs),
    /// Chat with the model's template: interactive, or one-shot with --message.
    #[command(
        after_help = "Examples:\n  lwm chat\n  lwm chat --message 'What is the capital of France?' -sys 'Answer in one word.'\n  lwm chat -m hf:ORG/NAME:Q4_K_M -f report.txt --message 'Summarize this.'\n  lwm chat --message 'List three colors' --json-schema colors.schema.json"
    )]
    Chat(ChatArgs),
    /// Next-token logits after a prompt (top-k ids, pieces and logits).
    Logits(LogitsArgs),
    /// Show the token ids of a text.
    #[command(
        after_help = "Examples:\n  lwm tokenize -p 'Hello world' --json\n  lwm tokenize --tokenizer ggml-vocab-llama-spm.gguf -f text.txt"
    )]
    Tokenize(TokenizeArgs),
    /// Architecture, parameters, quantization and the memory a context needs.
    #[command(
        after_help = "Examples:\n  lwm info\n  lwm info -m model.gguf --context 32768 --kv-type q8_0\n  lwm info -m model.gguf --metadata"
    )]
    Info(InfoArgs),
    /// Prefill and decode speed and peak memory.
    Bench(bench::BenchArgs),
    /// RingAttention figures: prefill time, per-worker KV bytes, compute vs wait per block.
    RingBench(ring::RingBenchArgs),
    /// Convert LWM JAX params <-> Hugging Face safetensors (byte-exact round trip).
    Convert(convert::ConvertArgs),
    /// Needle-in-a-haystack evaluation: create a set, run it, report (heatmap + table).
    Needle(needle::NeedleArgs),
    /// Long-context evaluation: RULER's synthetic tasks (or its own files), effective length.
    Eval(eval::EvalArgs),
    /// Train or extend a model from a TOML config (stages, checkpoints, --resume).
    Train(train::TrainArgs),
    /// Training tokens/s and peak memory per sequence length (blockwise attention).
    TrainBench(train::TrainBenchArgs),
    /// OpenAI-compatible HTTP server (chat/completions, completions, models, metrics).
    #[command(
        after_help = "Examples:\n  lwm serve --port 8080\n  curl localhost:8080/v1/chat/completions -H 'content-type: application/json' -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}'"
    )]
    Serve(serve::ServeArgs),
    /// Ask an LWM vision-language model about an image or a video.
    VisionChat(vision::VisionChatArgs),
    /// Generate an image or a video (classifier-free guidance, VQGAN-decoded).
    VisionGenerate(vision::VisionGenerateArgs),
    /// Download a model into its cache: `default` (SmolLM2-135M-Instruct Q4_1) or hf:ORG/NAME[:QUANT].
    #[command(alias = "fetch")]
    Pull(pull::PullArgs),
    /// The cached models: the default model, the hub cache's repos (files, sizes, quants).
    List(pull::ListArgs),
    /// Remove a cached model: `default`, hf:ORG/NAME, or one quant hf:ORG/NAME:QUANT.
    Rm(pull::RmArgs),
    /// Print a shell completion script: `lwm completions bash > ~/.local/share/bash-completion/completions/lwm`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// llama.cpp's multi-letter single-dash flags, as our long names (clap's short flags are
/// one letter).
const LLAMA_CPP_FLAGS: [(&str, &str); 3] = [
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-sys", "--system-prompt"),
];

/// The command line with llama.cpp's `-ctk q8_0`-style flags spelled as ours.
fn llama_cpp_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| {
        match LLAMA_CPP_FLAGS
            .iter()
            .find(|(short, _)| a.to_str() == Some(short))
        {
            Some((_, long)) => long.into(),
            None => a,
        }
    })
    .collect()
}

/// Logs to stderr through `tracing`: RUST_LOG when set, else `--log-level`.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face directory, params::FILE (LWM JAX), `default`, or
    /// hf:ORG/NAME[:QUANT] (pulled into the hub cache when missing).
    #[arg(short, long, default_value = "default", help_heading = "Model")]
    pub model: String,
    /// LWM preset (theta and context of a released LWM model), e.g. lwm-text-1m.
    #[arg(long, help_heading = "Model")]
    pub preset: Option<String>,
    /// Tokenizer file override (tokenizer.json, tokenizer.model or .gguf).
    #[arg(long, help_heading = "Model")]
    pub tokenizer: Option<PathBuf>,
    /// Chat format: `model` (the model's Jinja template) or `lwm`.
    #[arg(long, help_heading = "Model")]
    pub chat_format: Option<String>,
    /// A Jinja chat template (a file, or the template text) used instead of the model's.
    #[arg(long, visible_alias = "chat-template-file", help_heading = "Model")]
    pub chat_template: Option<String>,
    /// Worker threads (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0, help_heading = "Model")]
    pub threads: usize,
    /// Dequantize the weights to f32 at load (4 bytes per parameter): no activation is
    /// rounded to 8 bits, so results move only by float noise when sums are reordered
    /// (for comparing chunkings, rings and other engines).
    #[arg(long, help_heading = "Model")]
    pub dequantize: bool,
    /// Forward-pass arithmetic: `ggml` (llama.cpp's, f16 KV cache; default for GGUF) or
    /// `exact` (f32 throughout, blockwise attention; default for other formats).
    #[arg(long, help_heading = "Model")]
    pub numerics: Option<String>,
    /// Context length override (also the RoPE table length, as in LWM).
    #[arg(
        short = 'c',
        long,
        visible_alias = "ctx-size",
        help_heading = "Context"
    )]
    pub max_sequence_length: Option<usize>,
    /// RoPE base frequency override.
    #[arg(long, visible_alias = "rope-freq-base", help_heading = "Context")]
    pub theta: Option<f64>,
    /// Tokens per prefill forward pass.
    #[arg(
        short = 'b',
        long,
        visible_alias = "batch-size",
        default_value_t = 512,
        help_heading = "Context"
    )]
    pub prefill_chunk: usize,
    /// Query rows per attention tile.
    #[arg(long, default_value_t = 64, help_heading = "Attention")]
    pub scan_query_chunk_size: usize,
    /// Key rows per attention tile.
    #[arg(long, default_value_t = 256, help_heading = "Attention")]
    pub scan_key_chunk_size: usize,
    /// Tokens per feed-forward chunk.
    #[arg(long, default_value_t = 512, help_heading = "Attention")]
    pub scan_mlp_chunk_size: usize,
    /// KV cache element type: f32, f16, bf16, q8_0, q4_0, or `K,V` (e.g. q8_0,f16).
    /// Default: f16 with ggml numerics (llama.cpp's default), f32 with exact numerics.
    #[arg(long, help_heading = "Attention")]
    pub kv_type: Option<String>,
    /// KV cache type of the keys only (overrides --kv-type; llama.cpp's -ctk).
    #[arg(long, visible_alias = "cache-type-k", help_heading = "Attention")]
    pub kv_type_k: Option<String>,
    /// KV cache type of the values only (overrides --kv-type; llama.cpp's -ctv).
    #[arg(long, visible_alias = "cache-type-v", help_heading = "Attention")]
    pub kv_type_v: Option<String>,
}

impl ModelArgs {
    /// `--chat-template`: a file's text, or the value itself when it is a template.
    fn chat_template_source(&self) -> Result<Option<String>> {
        let Some(v) = &self.chat_template else {
            return Ok(None);
        };
        let p = std::path::Path::new(v);
        if p.is_file() {
            return std::fs::read_to_string(p)
                .map(Some)
                .with_context(|| format!("--chat-template: cannot read {}", p.display()));
        }
        if v.contains("{{") || v.contains("{%") {
            return Ok(Some(v.clone()));
        }
        bail!("--chat-template '{v}': neither a file nor a Jinja template")
    }

    pub fn load(&self) -> Result<Engine> {
        for (name, v) in [
            ("--scan-query-chunk-size", self.scan_query_chunk_size),
            ("--scan-key-chunk-size", self.scan_key_chunk_size),
            ("--scan-mlp-chunk-size", self.scan_mlp_chunk_size),
            ("--prefill-chunk", self.prefill_chunk),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        lwm::set_threads(self.threads);
        let numerics = match self.numerics.as_deref() {
            None => None,
            Some("exact") => Some(lwm::model::Numerics::Exact),
            Some("ggml") => Some(lwm::model::Numerics::Ggml),
            Some(other) => bail!("unknown --numerics '{other}' (use exact or ggml)"),
        };
        let opts = LoadOptions {
            preset: self.preset.clone(),
            theta: self.theta,
            max_sequence_length: self.max_sequence_length,
            tokenizer: self.tokenizer.clone(),
            chat_format: self.chat_format.clone(),
            chat_template: self.chat_template_source()?,
            numerics,
            forward: ForwardOptions {
                chunking: Chunking {
                    query_chunk: self.scan_query_chunk_size,
                    key_chunk: self.scan_key_chunk_size,
                },
                mlp_chunk: self.scan_mlp_chunk_size,
                ..Default::default()
            },
        };
        let mut engine = Engine::load(&self.model, &opts)?;
        if self.dequantize {
            engine.dequantize()?;
        }
        let mut kv = match &self.kv_type {
            Some(t) => lwm::kv::KvTypes::parse(t)?,
            None => engine.model.options.kv_types(),
        };
        if let Some(k) = &self.kv_type_k {
            kv.k = lwm::kv::KvType::parse(k)?;
        }
        if let Some(v) = &self.kv_type_v {
            kv.v = lwm::kv::KvType::parse(v)?;
        }
        engine.model.set_kv_types(kv)?;
        Ok(engine)
    }
}

#[derive(Args, Clone)]
#[command(next_help_heading = "Sampling")]
struct SamplingArgs {
    /// Tokens to generate at most (llama.cpp's -n / --n-predict).
    #[arg(
        short = 'n',
        long,
        visible_alias = "n-predict",
        alias = "max-new-tokens",
        default_value_t = 256
    )]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, visible_alias = "temp", default_value_t = 0.8)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probabilities sum to p (1 = all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Divide the logits of recently seen tokens by this (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed of the sampler (the same seed gives the same text).
    #[arg(short = 's', long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text is produced (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    ring: ring::RingArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    structured: structured::StructuredArgs,
    /// The prompt text.
    #[arg(short, long, conflicts_with = "prompt_file", help_heading = "Input")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long, visible_alias = "file", help_heading = "Input")]
    prompt_file: Option<PathBuf>,
    /// Keep the prompt's KV state in this file and reuse it when a later prompt starts with
    /// the same tokens (checked against the model and the tokens; a bad file is ignored).
    #[arg(long, help_heading = "Input")]
    prompt_cache: Option<PathBuf>,
    /// KV-cache policy: `full`, `sinks:N,window:W` (attention sinks plus a recent window)
    /// or `snapkv:BUDGET[,window:OBS][,kernel:K]` (SnapKV: keep what the prompt's last
    /// queries attend to). One process only (not the ring).
    #[arg(
        long,
        default_value = "full",
        conflicts_with = "prompt_cache",
        help_heading = "Context"
    )]
    kv_policy: lwm::kv::KvPolicy,
    /// Print timing to stderr at the end.
    #[arg(long, help_heading = "Output")]
    verbose: bool,
    /// Print one JSON object (text, token counts, timings, finish reason) instead of
    /// streaming the text.
    #[arg(long, help_heading = "Output")]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    ring: ring::RingArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    structured: structured::StructuredArgs,
    /// One message: answer it and exit (otherwise read turns from stdin; the commands
    /// /clear, /save FILE, /load FILE and /exit work there).
    #[arg(long, help_heading = "Input")]
    message: Option<String>,
    /// A system message (llama.cpp's -sys).
    #[arg(long, visible_alias = "system-prompt", help_heading = "Input")]
    system: Option<String>,
    /// Attach a document: its text goes before the first message.
    #[arg(short = 'f', long, help_heading = "Input")]
    file: Option<PathBuf>,
    /// Keep the conversation's KV state in this file and reuse it when a later prompt starts
    /// with the same tokens (checked against the model and the tokens; a bad file is ignored).
    #[arg(long, help_heading = "Input")]
    prompt_cache: Option<PathBuf>,
    /// Print the rendered prompt to stderr.
    #[arg(long, help_heading = "Output")]
    show_prompt: bool,
    /// Print each answer as one JSON line (the answer, token counts, timings, finish
    /// reason) instead of streaming it.
    #[arg(long, help_heading = "Output")]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    ring: ring::RingArgs,
    /// The prompt text.
    #[arg(short, long, help_heading = "Input")]
    prompt: String,
    /// How many top entries.
    #[arg(long, default_value_t = 10, help_heading = "Output")]
    top: usize,
    /// Print JSON (prompt ids and the top entries).
    #[arg(long, help_heading = "Output")]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to tokenize.
    #[arg(short, long, conflicts_with = "file", help_heading = "Input")]
    prompt: Option<String>,
    /// Read the text from a file.
    #[arg(short = 'f', long, help_heading = "Input")]
    file: Option<PathBuf>,
    /// Don't add BOS even if the tokenizer would.
    #[arg(long, help_heading = "Input")]
    no_bos: bool,
    /// Print JSON (ids, pieces, count).
    #[arg(long, help_heading = "Output")]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Report the memory this many tokens of context need (with --frames: the text tokens
    /// beside the frames, default 512).
    #[arg(long, help_heading = "Context")]
    context: Option<usize>,
    /// For an LWM vision-language model: the memory of a vision chat over this many video
    /// frames (257 tokens each at 256×256).
    #[arg(long, help_heading = "Context")]
    frames: Option<usize>,
    /// Also list every GGUF metadata key and every tensor (name, type, shape, offset).
    #[arg(long, help_heading = "Output")]
    metadata: bool,
    /// Print JSON.
    #[arg(long, help_heading = "Output")]
    json: bool,
}

fn read_text(inline: &Option<String>, file: &Option<PathBuf>, what: &str) -> Result<String> {
    match (inline, file) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(p)) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        }
        (None, None) => bail!("give {what} with --prompt TEXT or --prompt-file FILE"),
    }
}

/// Ctrl-C stops generation cleanly (what was produced stays printed).
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    flag
}

/// Streams text to stdout (unless `quiet`, for --json); false once Ctrl-C was pressed.
fn stream_to_stdout(stop: Arc<AtomicBool>, quiet: bool) -> impl FnMut(&str) -> bool {
    move |t: &str| {
        if !quiet {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        }
        !stop.load(Ordering::SeqCst)
    }
}

/// `--json` output of one generation.
fn output_json(out: &GenerateOutput) -> serde_json::Value {
    serde_json::json!({
        "text": out.text,
        "finish_reason": out.finish_reason.as_str(),
        "prompt_tokens": out.prompt_tokens,
        "reused_prompt_tokens": out.reused_tokens,
        "completion_tokens": out.ids.len(),
        "completion_token_ids": out.ids,
        "prefill_seconds": out.prefill_secs,
        "decode_seconds": out.decode_secs,
        "prefill_tokens_per_second": (out.prompt_tokens - out.reused_tokens) as f64 / out.prefill_secs.max(1e-9),
        "decode_tokens_per_second": out.ids.len() as f64 / out.decode_secs.max(1e-9),
        "kv_cache_bytes": out.kv_bytes,
    })
}

/// A progress bar (tokens/s, ETA) for prompts long enough to make the wait noticeable.
fn prefill_bar(n_prompt: usize) -> Option<lwm::generate::PrefillProgress> {
    if n_prompt < 2048 {
        return None;
    }
    let bar = indicatif::ProgressBar::new(n_prompt as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "prefill {bar:40} {pos}/{len} tokens {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(Arc::new(move |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if done >= total {
            bar.finish_and_clear();
        }
    }))
}

/// The `--prompt-cache` file's KV state when valid for this model, else an empty cache
/// (with a warning naming why the file was not used).
fn open_prompt_cache(engine: &Engine, path: &Option<PathBuf>) -> lwm::kv::KvCache {
    let Some(p) = path else {
        return engine.model.new_cache();
    };
    let (cache, why) = engine.open_prompt_cache(p);
    if let Some(why) = why {
        eprintln!("warning: ignoring the prompt cache: {why}");
    }
    cache
}

/// Report what the prompt cache saved and store the prompt's KV state.
fn save_prompt_cache(
    engine: &Engine,
    path: &Option<PathBuf>,
    cache: &lwm::kv::KvCache,
    out: &lwm::generate::GenerateOutput,
) -> Result<()> {
    let Some(p) = path else { return Ok(()) };
    eprintln!(
        "prompt cache: reused {} of {} prompt tokens, prefilled {}",
        out.reused_tokens,
        out.prompt_tokens,
        out.prompt_tokens - out.reused_tokens
    );
    engine.save_prompt_cache(p, cache, out.prompt_tokens)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let prompt = read_text(&a.prompt, &a.prompt_file, "a prompt")?;
    let engine = a.model.load()?;
    let ids = engine.tokenize(&prompt)?;
    let mut req = GenerateRequest::new(ids, a.sampling.max_tokens, a.sampling.params());
    req.stop = a.sampling.stop.clone();
    req.ignore_eos = a.sampling.ignore_eos;
    req.prefill_chunk = a.model.prefill_chunk;
    req.on_prefill = prefill_bar(req.prompt_ids.len());
    req.grammar = a.structured.grammar(&engine)?;
    req.kv_policy = a.kv_policy;
    let stop = interrupt_flag();
    let on_ring = |s: &mut lwm::ring::RingSession| {
        engine.generate_on_ring(&req, s, &mut stream_to_stdout(stop.clone(), a.json))
    };
    let mut cache = open_prompt_cache(&engine, &a.prompt_cache);
    let mut cache_used = true;
    let out = match a.ring.run(&engine, on_ring)? {
        ring::Role::Single => {
            engine.generate_with_cache(&req, &mut cache, &mut stream_to_stdout(stop, a.json))?
        }
        ring::Role::Root(out) => {
            if a.prompt_cache.is_some() {
                eprintln!("warning: --prompt-cache is not used by the ring (sp > 1)");
            }
            cache_used = false;
            out
        }
        ring::Role::Worker => return Ok(()),
    };
    if a.json {
        println!("{}", output_json(&out));
    } else {
        println!();
    }
    if cache_used {
        save_prompt_cache(&engine, &a.prompt_cache, &cache, &out)?;
    }
    if a.verbose {
        eprintln!(
            "prompt {} tokens in {:.2}s ({:.1} tok/s); generated {} tokens in {:.2}s ({:.1} tok/s); finish: {}",
            out.prompt_tokens,
            out.prefill_secs,
            out.prompt_tokens as f64 / out.prefill_secs,
            out.ids.len(),
            out.decode_secs,
            out.ids.len() as f64 / out.decode_secs.max(1e-9),
            out.finish_reason.as_str()
        );
    }
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let engine = a.model.load()?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    let system = messages.clone();
    let mut document = match &a.file {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => None,
    };
    let mut stops = a.sampling.stop.clone();
    if let Some(t) = &engine.chat_template {
        stops.extend(t.stop_strings());
    }
    let stop_flag = interrupt_flag();
    let grammar = a.structured.grammar(&engine)?;
    // The whole conversation, over whichever generator runs it (one worker or the ring).
    let mut conversation = Some(|generate: &mut Generator| -> Result<()> {
        let mut turn = |messages: &mut Vec<ChatMessage>, user: String| -> Result<()> {
            let content = match document.take() {
                Some(doc) => format!("{doc}\n\n{user}"),
                None => user,
            };
            messages.push(ChatMessage::user(content));
            let (text, ids) = engine.chat_prompt(messages)?;
            if a.show_prompt {
                eprintln!("--- prompt ({} tokens) ---\n{text}\n---", ids.len());
            }
            let mut req = GenerateRequest::new(ids, a.sampling.max_tokens, a.sampling.params());
            req.stop = stops.clone();
            req.ignore_eos = a.sampling.ignore_eos;
            req.prefill_chunk = a.model.prefill_chunk;
            req.on_prefill = prefill_bar(req.prompt_ids.len());
            req.grammar = grammar.clone();
            stop_flag.store(false, Ordering::SeqCst);
            let out = generate(&req, &mut stream_to_stdout(stop_flag.clone(), a.json))?;
            if a.json {
                println!("{}", output_json(&out));
            } else {
                println!();
            }
            messages.push(ChatMessage::assistant(out.text.trim().to_string()));
            Ok(())
        };
        if let Some(m) = &a.message {
            return turn(&mut messages, m.clone());
        }
        eprintln!(
            "chatting with {} (empty line or Ctrl-D to quit; /help for commands)",
            engine.location.path().display()
        );
        let mut lines = chat::Lines::open();
        while let Some(line) = lines.next("> ")? {
            match chat::parse(&line) {
                None if line.trim().is_empty() => break,
                None => turn(&mut messages, line)?,
                Some(chat::Slash::Exit) => break,
                Some(chat::Slash::Clear) => {
                    messages = system.clone();
                    eprintln!("(conversation cleared)");
                }
                Some(chat::Slash::Save(p)) => match chat::save(&p, &messages) {
                    Ok(()) => eprintln!("(saved {} messages to {})", messages.len(), p.display()),
                    Err(e) => eprintln!("error: {e:#}"),
                },
                Some(chat::Slash::Load(p)) => match chat::load(&p) {
                    Ok(m) => {
                        eprintln!("(loaded {} messages from {})", m.len(), p.display());
                        messages = m;
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                },
                Some(chat::Slash::Help) => eprintln!("{}", chat::HELP),
                Some(chat::Slash::Bad(why)) => eprintln!("{why}; {}", chat::HELP),
            }
        }
        Ok(())
    });
    let mut run = |g: &mut Generator| conversation.take().expect("runs once")(g);
    let on_ring = |s: &mut lwm::ring::RingSession| {
        // The ring keeps earlier turns when the new prompt extends them.
        run(&mut |req, on_text| engine.generate_on_ring(req, s, on_text))
    };
    match a.ring.run(&engine, on_ring)? {
        ring::Role::Single => {
            // The cache keeps earlier turns: only the part of the prompt it does not already
            // hold (checked token by token) is prefilled.
            let mut cache = open_prompt_cache(&engine, &a.prompt_cache);
            run(&mut |req, on_text| {
                let out = engine.generate_with_cache(req, &mut cache, on_text)?;
                save_prompt_cache(&engine, &a.prompt_cache, &cache, &out)?;
                Ok(out)
            })
        }
        ring::Role::Root(()) | ring::Role::Worker => Ok(()),
    }
}

/// Runs one generation request, streaming text (see `cmd_chat`).
type Generator<'a> =
    dyn FnMut(&GenerateRequest, &mut dyn FnMut(&str) -> bool) -> Result<GenerateOutput> + 'a;

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let engine = a.model.load()?;
    let ids = engine.tokenize(&a.prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty (no tokens)");
    }
    if ids.len() > engine.context_length() {
        bail!(
            "the prompt has {} tokens but the context is {}",
            ids.len(),
            engine.context_length()
        );
    }
    let chunk = a.model.prefill_chunk;
    let logits = match a.ring.run(&engine, |s| s.prefill(&ids, chunk, |_| {}))? {
        ring::Role::Single => {
            let mut cache = engine.model.new_cache();
            engine.model.prefill(&ids, &mut cache, chunk, |_| {})?
        }
        ring::Role::Root(logits) => logits,
        ring::Role::Worker => return Ok(()),
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = a.top.min(order.len());
    order.select_nth_unstable_by(k.saturating_sub(1), |&x, &y| {
        logits[y].total_cmp(&logits[x])
    });
    order.truncate(k);
    order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
    let piece =
        |id: usize| String::from_utf8_lossy(&engine.tokenizer.token_bytes(id as u32)).into_owned();
    if a.json {
        let top: Vec<_> = order
            .iter()
            .map(|&id| serde_json::json!({"id": id, "piece": piece(id), "logit": logits[id]}))
            .collect();
        let v = serde_json::json!({"prompt": a.prompt, "prompt_token_ids": ids, "top": top});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("prompt ids: {ids:?}");
        for (rank, &id) in order.iter().enumerate() {
            println!(
                "{:>3} {:>7} {:>10.4} {:?}",
                rank + 1,
                id,
                logits[id],
                piece(id)
            );
        }
    }
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let text = match (&a.prompt, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        (None, None) => bail!("give the text with --prompt TEXT or --file FILE"),
    };
    // Only the tokenizer is read: a vocab-only GGUF or a tokenizer file is enough.
    let tokenizer = Engine::load_tokenizer(&a.model.model, a.model.tokenizer.as_deref())?;
    let bos = tokenizer.add_bos_by_default() && !a.no_bos;
    let ids = tokenizer.encode(&text, bos, true)?;
    if a.json {
        let pieces: Vec<String> = ids
            .iter()
            .map(|&i| String::from_utf8_lossy(&tokenizer.token_bytes(i)).into_owned())
            .collect();
        println!(
            "{}",
            serde_json::json!({"ids": ids, "pieces": pieces, "count": ids.len()})
        );
    } else {
        println!(
            "{}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        eprintln!("{} tokens", ids.len());
    }
    Ok(())
}

fn human(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// `lwm info --metadata` and vocab-only files: the GGUF's keys and tensors, read without
/// loading any weight. Returns true when the file has no tensors (nothing more to show).
fn info_gguf(a: &InfoArgs, path: &std::path::Path) -> Result<bool> {
    let (content, _, _) = lwm::weights::gguf::read_content(path)?;
    let vocab_only = content.tensor_infos.is_empty();
    if !(a.metadata || vocab_only) {
        return Ok(false);
    }
    let metadata = lwm::weights::gguf::metadata_json(&content, 16);
    let tensors = lwm::weights::gguf::tensor_table(&content);
    let tokenizer = if vocab_only {
        Some(Engine::load_tokenizer(
            &a.model.model,
            a.model.tokenizer.as_deref(),
        )?)
    } else {
        None
    };
    if a.json {
        let v = serde_json::json!({
            "model": path,
            "vocab_only": vocab_only,
            "tokenizer": tokenizer.as_ref().map(|t| serde_json::json!({"kind": t.kind(), "tokens": t.vocab_size()})),
            "metadata": serde_json::Map::from_iter(metadata),
            "tensors": tensors.iter().map(|(n, t, s, o)| serde_json::json!({"name": n, "type": t, "shape": s, "offset": o})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(true);
    }
    println!("file           {}", path.display());
    if let Some(t) = &tokenizer {
        println!(
            "vocab only     {} tokenizer, {} tokens (no tensors)",
            t.kind(),
            t.vocab_size()
        );
    }
    println!("metadata       {} keys", metadata.len());
    for (k, v) in &metadata {
        println!("  {k} = {v}");
    }
    println!("tensors        {}", tensors.len());
    for (n, t, s, o) in &tensors {
        println!("  {n:<32} {t:<6} {s:?} @ {o}");
    }
    if !vocab_only {
        println!();
    }
    Ok(vocab_only)
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    if let lwm::model_source::ModelLocation::Gguf(p) = lwm::model_source::resolve(&a.model.model)? {
        if info_gguf(&a, &p)? || (a.metadata && a.json) {
            return Ok(());
        }
    }
    let engine = a.model.load()?;
    let c = engine.config();
    let context = match a.frames {
        Some(n) if c.vision_vocab_size == 0 => bail!(
            "--frames {n}: {} is not an LWM vision-language model (no vision vocabulary)",
            a.model.model
        ),
        Some(n) => n * lwm::vision_model::FRAME_TOKENS + a.context.unwrap_or(512),
        None => a.context.unwrap_or(c.max_sequence_length),
    };
    let plan = engine.memory_plan(context, a.model.prefill_chunk);
    if a.json {
        let v = serde_json::json!({
            "model": engine.location.path(),
            "config": c,
            "parameters": c.parameter_count(),
            "quantization": engine.quantization,
            "file_bytes": engine.file_bytes,
            "tokenizer": engine.tokenizer.kind(),
            "chat_template": engine.chat_template_origin.as_str(),
            "frames": a.frames,
            "memory": {"context": context, "weights_bytes": plan.weights_bytes, "kv_cache_bytes": plan.kv_bytes, "activation_bytes": plan.activation_bytes, "scratch_bytes": plan.scratch_bytes, "total_bytes": plan.total_bytes(), "kv_type": plan.kv_types.name(), "available_bytes": lwm::memory_plan::available_memory().map(|a| a.bytes)},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model          {}", engine.location.path().display());
    println!(
        "architecture   {} ({} layers, hidden {}, {} heads / {} KV heads, head dim {}, FFN {})",
        c.architecture,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size
    );
    println!("parameters     {:.1}M", c.parameter_count() as f64 / 1e6);
    println!(
        "vocabulary     {} ({} tokenizer)",
        c.vocab_size,
        engine.tokenizer.kind()
    );
    println!(
        "weights        {} ({})",
        engine.quantization,
        human(engine.file_bytes as f64)
    );
    println!(
        "rope           theta {} ({:?}), max sequence length {}",
        c.theta, c.rope_layout, c.max_sequence_length
    );
    println!("chat template  {}", engine.chat_template_origin.as_str());
    if let Some(n) = a.frames {
        println!(
            "vision chat    {n} frames × {} tokens + {} text tokens = {context} tokens",
            lwm::vision_model::FRAME_TOKENS,
            context - n * lwm::vision_model::FRAME_TOKENS
        );
    }
    println!("memory @ {context} tokens: {}", plan.describe());
    if let Some(avail) = lwm::memory_plan::available_memory() {
        let fits = plan.check_fits(0, &avail).is_ok();
        println!(
            "available      {} ({}): {}",
            human(avail.bytes as f64),
            avail.source,
            if fits { "fits" } else { "does NOT fit" }
        );
    }
    if context > c.max_sequence_length {
        println!(
            "note: {context} tokens is beyond the model's max sequence length {}",
            c.max_sequence_length
        );
    }
    Ok(())
}

fn main() {
    // `lwm info --metadata | head` ends quietly, as other Unix tools do, instead of
    // panicking on the closed pipe.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse_from(llama_cpp_args(std::env::args_os()));
    init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Logits(a) => cmd_logits(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Info(a) => cmd_info(a),
        Command::Bench(a) => bench::run(a),
        Command::RingBench(a) => ring::bench(a),
        Command::Convert(a) => convert::run(a),
        Command::Needle(a) => needle::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Train(a) => train::cmd_train(a),
        Command::TrainBench(a) => train::cmd_train_bench(a),
        Command::Serve(a) => serve::run(a),
        Command::VisionChat(a) => vision::run(a),
        Command::VisionGenerate(a) => vision::run_generate(a),
        Command::Pull(a) => pull::run_pull(a),
        Command::List(a) => pull::run_list(a),
        Command::Rm(a) => pull::run_rm(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "lwm", &mut std::io::stdout());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every subcommand says what it does and every flag has a line of help.
    #[test]
    fn every_flag_and_subcommand_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "lwm", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn llama_cpp_flag_names_mean_the_same_here() {
        let argv = [
            "lwm", "generate", "-m", "x.gguf", "-c", "4096", "--temp", "0", "-ctk", "q8_0", "-ctv",
            "f16", "-f", "p.txt", "-n", "8", "-s", "3", "-b", "256", "-t", "2",
        ];
        let cli = Cli::try_parse_from(llama_cpp_args(argv.iter().map(Into::into))).unwrap();
        let Command::Generate(g) = cli.command else {
            panic!("not generate")
        };
        assert_eq!(g.model.model, "x.gguf");
        assert_eq!(g.model.max_sequence_length, Some(4096));
        assert_eq!(g.sampling.temperature, 0.0);
        assert_eq!(g.model.kv_type_k.as_deref(), Some("q8_0"));
        assert_eq!(g.model.kv_type_v.as_deref(), Some("f16"));
        assert_eq!(g.prompt_file, Some(PathBuf::from("p.txt")));
        assert_eq!(g.sampling.max_tokens, 8);
        assert_eq!(g.sampling.seed, 3);
        assert_eq!(g.model.prefill_chunk, 256);
        assert_eq!(g.model.threads, 2);
        let argv = [
            "lwm",
            "chat",
            "-sys",
            "Be brief.",
            "--ctx-size",
            "512",
            "--n-predict",
            "4",
        ];
        let cli = Cli::try_parse_from(llama_cpp_args(argv.iter().map(Into::into))).unwrap();
        let Command::Chat(c) = cli.command else {
            panic!("not chat")
        };
        assert_eq!(c.system.as_deref(), Some("Be brief."));
        assert_eq!(c.model.max_sequence_length, Some(512));
        assert_eq!(c.sampling.max_tokens, 4);
    }

    #[test]
    fn help_is_grouped_under_headings() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("generate")
            .unwrap()
            .render_help()
            .to_string();
        for heading in [
            "Model:",
            "Context:",
            "Attention:",
            "Ring:",
            "Sampling:",
            "Structured output:",
            "Input:",
            "Output:",
        ] {
            assert!(help.contains(heading), "no {heading} in\n{help}");
        }
    }
}
