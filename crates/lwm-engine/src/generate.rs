//! The engine: a loaded model with its tokenizer and chat template, and the one generation
//! state machine (`Generation`: prefill in pieces, sample under an optional grammar, stream
//! text, stop on end-of-generation, stop strings or the budget) every front end drives.

use crate::chat_template::{ChatMessage, ChatTemplate, TemplateOrigin, DEFAULT_CHAT_TEMPLATE};
use crate::constrain::{Constraint, Grammar, GrammarCompiler, GrammarState};
use crate::model_source::{resolve, ModelLocation};
use crate::sampling::{logprobs, Sampler, SamplingParams};
use anyhow::{bail, Context, Result};
use lwm_core::config::{lwm_preset, ModelConfig};
use lwm_core::kv::{KvCache, KvPolicy, KvTypes};
use lwm_core::memory_plan::MemoryPlan;
use lwm_core::model::{ForwardOptions, Model, Numerics, PolicyState};
use lwm_core::tokenizer::{GgufVocab, StreamDecoder, Tokenizer};
use lwm_core::weights::gguf::GgufFile;
use lwm_core::weights::hf::{load_hf_config, HfWeights};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to load a model (the `--model`, `--preset`, `--theta` ... flags).
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// An LWM preset name (`lwm-text-1m`, ...): sets theta and max_sequence_length and
    /// selects LWM's chat format.
    pub preset: Option<String>,
    pub theta: Option<f64>,
    pub max_sequence_length: Option<usize>,
    /// Override the tokenizer (a tokenizer.json / tokenizer.model / .gguf file).
    pub tokenizer: Option<PathBuf>,
    /// Force a chat format: "lwm" or "model" (the model's own Jinja template).
    pub chat_format: Option<String>,
    /// A Jinja chat template's source, used instead of the model's (`--chat-template`).
    pub chat_template: Option<String>,
    /// Arithmetic of the forward pass; `None` picks `Ggml` for GGUF files (llama.cpp parity)
    /// and `Exact` otherwise.
    pub numerics: Option<Numerics>,
    pub forward: ForwardOptions,
}

pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The template chats are rendered with: the model's, LWM's, `--chat-template`, or
    /// [`crate::chat_template::DEFAULT_CHAT_TEMPLATE`] for a model without one.
    pub chat_template: Option<ChatTemplate>,
    pub chat_template_origin: TemplateOrigin,
    pub location: ModelLocation,
    /// Storage types of the weights, for `lwm info`.
    pub quantization: String,
    pub file_bytes: u64,
    /// Digest of the weight files' metadata (part of the prompt-cache model identity).
    pub weights_digest: u64,
    /// The vocabulary indexed for structured output, built on first use.
    pub(crate) grammar_compiler: std::sync::OnceLock<std::result::Result<GrammarCompiler, String>>,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The chat template of a Hugging Face directory (`tokenizer_config.json`), if any.
fn hf_chat_template(dir: &Path, tok: &Tokenizer) -> Result<Option<ChatTemplate>> {
    let p = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))?;
    let source = match &v["chat_template"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(list) => match list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
        {
            Some(s) => s.to_string(),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let piece = |id: Option<u32>| id.and_then(|i| tok.id_to_piece(i)).unwrap_or_default();
    Ok(Some(ChatTemplate::jinja(
        source,
        piece(tok.bos_id()),
        piece(tok.eos_id()),
    )?))
}

/// A forward pass allocates its activations afresh (a 512-token prefill of a 7B layer: tens
/// of MB per product). glibc serves blocks over its mmap threshold (at most 32 MiB) with
/// fresh mappings and unmaps them on free, so every forward paid page faults, zeroing and
/// TLB-shootdown interrupts for the same buffers again: a fifth of a bf16 prefill's time
/// on the 2-core VM (perf). With blocks up to 512 MiB taken from the heap, and up to 1 GiB
/// of freed heap kept before trimming, they are reused instead: 217 -> 286 tok/s for that
/// prefill. Set once the model is loaded, not before: the load's own large temporaries
/// (repacked weights) keep their mappings and go back whole, else they left heap holes
/// that raised a Q8_0 model's peak RSS by 270 MB. The server still hands freed memory back
/// (`malloc_trim`). `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES`
/// set by the user win.
fn reuse_activation_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::Once;
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let by_user = [
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
                "GLIBC_TUNABLES",
            ]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
            if !by_user {
                // SAFETY: mallopt takes no pointers and only sets allocator parameters
                // (glibc serialises it with its own lock).
                unsafe {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                }
            }
        });
    }
}

impl Engine {
    /// Only the tokenizer of `spec` (a `--model` value), or the `tokenizer` file when given:
    /// no weights are read, so a vocab-only GGUF or a bare tokenizer.json is enough.
    pub fn load_tokenizer(spec: &str, tokenizer: Option<&Path>) -> Result<Tokenizer> {
        if let Some(p) = tokenizer {
            return Tokenizer::from_file(p);
        }
        let location = resolve(spec)?;
        let found = match &location {
            ModelLocation::Gguf(p) => Some(p.clone()),
            ModelLocation::HfDir(dir) => ["tokenizer.json", "tokenizer.model"]
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.exists()),
            ModelLocation::JaxParams(params) => lwm_core::weights::jax::tokenizer_next_to(params),
        };
        let p = found.with_context(|| {
            format!(
                "{}: no tokenizer found (tokenizer.json or tokenizer.model); pass --tokenizer FILE",
                location.path().display()
            )
        })?;
        Tokenizer::from_file(&p)
    }

    /// Load `spec` (a `--model` value) with `opts`.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let location = resolve(spec)?;
        let digest;
        let (mut config, weights, mut tokenizer, mut template, quantization, file_bytes): (
            ModelConfig,
            Box<dyn lwm_core::weights::WeightSource>,
            Option<Tokenizer>,
            Option<ChatTemplate>,
            String,
            u64,
        ) = match &location {
            ModelLocation::Gguf(path) => {
                let file = GgufFile::open(path)?;
                let config = file.config()?;
                // With --tokenizer the file's vocabulary is not needed (it may have none).
                let tok = match &opts.tokenizer {
                    Some(p) => Tokenizer::from_file(p)?,
                    None => Tokenizer::from_gguf_vocab(
                        GgufVocab::from_gguf(file.content())
                            .with_context(|| format!("{}: tokenizer metadata", path.display()))?,
                    )
                    .with_context(|| format!("{}: tokenizer", path.display()))?,
                };
                let template = match file.meta_str("tokenizer.chat_template") {
                    Some(src) => {
                        let piece = |id: Option<u32>| {
                            id.and_then(|i| tok.id_to_piece(i)).unwrap_or_default()
                        };
                        Some(
                            ChatTemplate::jinja(src, piece(tok.bos_id()), piece(tok.eos_id()))
                                .with_context(|| {
                                    format!("{}: tokenizer.chat_template", path.display())
                                })?,
                        )
                    }
                    None => None,
                };
                let q = file.quantization_summary();
                let bytes = file.file_bytes();
                digest = lwm_core::weights::digest::file_digest(
                    path,
                    file.content().tensor_data_offset,
                )?;
                (config, Box::new(file), Some(tok), template, q, bytes)
            }
            ModelLocation::JaxParams(params) => {
                let (config, weights, tok) = lwm_core::weights::jax::open_model(params)?;
                let template = tok.as_ref().map(|_| ChatTemplate::Lwm);
                let dtype = lwm_core::weights::jax::dtype_name(weights.dtype).to_string();
                let bytes = std::fs::metadata(params).map(|m| m.len()).unwrap_or(0);
                // msgpack has no header: the first MiB holds the first layers' arrays.
                digest = lwm_core::weights::digest::file_digest(params, 1 << 20)?;
                (config, Box::new(weights), tok, template, dtype, bytes)
            }
            ModelLocation::HfDir(dir) => {
                let config = load_hf_config(dir)?;
                let weights = HfWeights::open(dir)?;
                let tok = ["tokenizer.json", "tokenizer.model"]
                    .iter()
                    .map(|f| dir.join(f))
                    .find(|p| p.exists())
                    .map(|p| Tokenizer::from_file(&p))
                    .transpose()?;
                let template = match &tok {
                    Some(t) => hf_chat_template(dir, t)?,
                    None => None,
                };
                let mut sum = lwm_core::weights::digest::Checksum::default();
                for f in weights.files().iter().chain([&dir.join("config.json")]) {
                    if f.exists() {
                        sum.write(
                            &lwm_core::weights::digest::file_digest(f, 1 << 20)?.to_le_bytes(),
                        );
                    }
                }
                digest = sum.finish();
                let dtypes = weights
                    .stored_dtype("model.embed_tokens.weight")
                    .unwrap_or_else(|| "f32".into());
                (
                    config,
                    Box::new(weights),
                    tok,
                    template,
                    dtypes,
                    dir_bytes(dir),
                )
            }
        };
        if let Some(p) = &opts.tokenizer {
            tokenizer = Some(Tokenizer::from_file(p)?);
        }
        let tokenizer = tokenizer.with_context(|| {
            format!(
                "{}: no tokenizer found (tokenizer.json or tokenizer.model); pass --tokenizer FILE",
                location.path().display()
            )
        })?;
        if tokenizer.vocab_size() > config.vocab_size {
            bail!(
                "tokenizer has {} tokens but the model's vocabulary is {} ({}): they do not belong together",
                tokenizer.vocab_size(),
                config.vocab_size,
                location.path().display()
            );
        }
        let mut lwm_format = false;
        if let Some(name) = &opts.preset {
            config.apply_preset(lwm_preset(name)?);
            lwm_format = true;
        }
        if let Some(t) = opts.theta {
            config.theta = t;
        }
        if let Some(m) = opts.max_sequence_length {
            config.max_sequence_length = m;
        }
        match opts.chat_format.as_deref() {
            None => {}
            Some("lwm") => lwm_format = true,
            Some("model") => lwm_format = false,
            Some(other) => bail!("unknown chat format '{other}' (use lwm or model)"),
        }
        let mut origin = if matches!(template, Some(ChatTemplate::Lwm)) {
            TemplateOrigin::Lwm
        } else {
            TemplateOrigin::Model
        };
        if lwm_format {
            template = Some(ChatTemplate::Lwm);
            origin = TemplateOrigin::Lwm;
        }
        let piece = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_piece(i))
                .unwrap_or_default()
        };
        let (bos, eos) = (piece(tokenizer.bos_id()), piece(tokenizer.eos_id()));
        if let Some(src) = &opts.chat_template {
            template = Some(ChatTemplate::jinja(src.clone(), bos, eos).context("--chat-template")?);
            origin = TemplateOrigin::Override;
        } else if template.is_none() {
            tracing::warn!(
                "{} has no chat template: chats use the default (ChatML); pass --chat-template FILE or --chat-format lwm",
                location.path().display()
            );
            template = Some(ChatTemplate::jinja(
                DEFAULT_CHAT_TEMPLATE.to_string(),
                bos,
                eos,
            )?);
            origin = TemplateOrigin::Default;
        }
        let mut forward = opts.forward;
        forward.numerics = opts.numerics.unwrap_or(match location {
            ModelLocation::Gguf(_) => Numerics::Ggml,
            ModelLocation::HfDir(_) | ModelLocation::JaxParams(_) => Numerics::Exact,
        });
        let model = Model::load(weights.as_ref(), config, forward)?;
        reuse_activation_buffers();
        Ok(Self {
            model,
            tokenizer,
            chat_template: template,
            chat_template_origin: origin,
            location,
            quantization,
            file_bytes,
            weights_digest: digest,
            grammar_compiler: std::sync::OnceLock::new(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The model's own chat template (or LWM's, or `--chat-template`): `None` when chats
    /// would fall back to the default, which a needle evaluation should not silently use.
    pub fn own_chat_template(&self) -> Option<&ChatTemplate> {
        match self.chat_template_origin {
            TemplateOrigin::Default => None,
            _ => self.chat_template.as_ref(),
        }
    }

    /// Tokenize a plain prompt (BOS as the tokenizer's default, special tokens parsed).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, self.tokenizer.add_bos_by_default(), true)
    }

    /// Render a conversation with the chat template and tokenize it.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<(String, Vec<u32>)> {
        let template = self.chat_template.as_ref().context(
            "this model has no chat template; use `lwm generate`, or --chat-format lwm for LWM models",
        )?;
        let text = template.render(messages, true)?;
        // Jinja templates write BOS themselves when they want it; LWM's format relies on the
        // tokenizer's BOS (the trained layout has exactly one).
        let add_bos = matches!(template, ChatTemplate::Lwm) && self.tokenizer.bos_id().is_some();
        let ids = self.tokenizer.encode(&text, add_bos, true)?;
        Ok((text, ids))
    }

    /// Memory a run of `context` tokens needs with this model (`lwm info`, and the check
    /// every generation makes before it allocates).
    pub fn memory_plan(&self, context: usize, prefill_chunk: usize) -> MemoryPlan {
        self.memory_plan_for(context, prefill_chunk, self.model.options.kv_types())
    }

    fn memory_plan_for(&self, context: usize, prefill_chunk: usize, kv: KvTypes) -> MemoryPlan {
        MemoryPlan::new(
            &self.model.config,
            self.model.weight_bytes() as u64,
            context,
            kv,
            &self.model.options,
            prefill_chunk,
            lwm_core::memory_plan::worker_threads(),
        )
    }

    /// Compile a structured-output constraint against this model's vocabulary (the
    /// vocabulary index is built once, on the first call).
    pub fn compile_constraint(&self, constraint: &Constraint) -> Result<Grammar> {
        let compiler = self
            .grammar_compiler
            .get_or_init(|| {
                GrammarCompiler::new(&self.tokenizer, self.model.config.vocab_size)
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        compiler.compile(constraint)
    }

    /// Context length in effect.
    pub fn context_length(&self) -> usize {
        self.model.config.max_sequence_length
    }

    /// Accept sequences up to `tokens` (a needle run beyond the trained context, a ring
    /// rank serving rank 0's longest sequence).
    pub fn set_context_length(&mut self, tokens: usize) {
        self.model.config.max_sequence_length = tokens;
    }

    /// Run on f32 copies of the weights (`--dequantize`). Other arithmetic gives other KV
    /// states, so prompt-cache files of the quantized model no longer apply.
    pub fn dequantize(&mut self) -> Result<()> {
        self.model.dequantize_weights()?;
        self.quantization = format!("{} (dequantized to f32)", self.quantization);
        self.weights_digest = !self.weights_digest;
        Ok(())
    }

    /// Generate a continuation of `req.prompt_ids` in a fresh KV cache.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateOutput> {
        let mut cache = self.model.new_cache();
        self.generate_with_cache(req, &mut cache, on_text)
    }

    /// Generate, reusing the longest prefix of the prompt that `cache` already holds (the
    /// cache is cut back to that prefix first, so a cache from any earlier request is safe;
    /// one whose rows a KV policy evicted is emptied). The cache keeps rows as
    /// `req.kv_policy` says (`Model::forward_policy`); `kv_bytes` reports what it holds at
    /// the end.
    pub fn generate_with_cache(
        &self,
        req: &GenerateRequest,
        cache: &mut KvCache,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateOutput> {
        let reuse = self.prepare_cache(req, cache, 0)?;
        let mut policy = PolicyState::new(req.kv_policy, req.prompt_ids.len());
        let mut step = |ids: &[u32]| self.model.forward_policy(ids, cache, &mut policy);
        let mut out = self.generate_on(req, reuse, &mut step, on_text)?;
        out.kv_bytes = cache.bytes() as u64;
        Ok(out)
    }

    /// Make `cache` ready for `req`: check the prompt, keep the longest prefix of it the
    /// cache holds (checked id by id; at least one prompt token must run to produce
    /// logits), refuse before anything grows when the run cannot fit beside
    /// `pending_bytes` already promised elsewhere (other requests' caches), and reserve
    /// the cache's room (under `req.kv_policy`: the rows it may hold; SnapKV's last OBS
    /// prompt tokens always run, it observes their queries). Returns how many prompt tokens
    /// are held.
    pub fn prepare_cache(
        &self,
        req: &GenerateRequest,
        cache: &mut KvCache,
        pending_bytes: u64,
    ) -> Result<usize> {
        let total = req.run_tokens(self.context_length())?;
        let n_prompt = req.prompt_ids.len();
        let reuse = cache
            .common_prefix(&req.prompt_keys())
            .min(n_prompt - 1)
            .min(req.kv_policy.reusable_prefix(n_prompt));
        cache.truncate(reuse);
        // Rows held at most: sinks + window between steps, plus a step's own rows.
        let rows = match req.kv_policy {
            KvPolicy::SinksWindow { .. } => {
                (req.kv_policy.max_rows(total) + req.prefill_chunk.max(1)).min(total)
            }
            _ => total,
        };
        if let Some(mut avail) = lwm_core::memory_plan::available_memory() {
            avail.bytes = avail.bytes.saturating_sub(pending_bytes);
            self.memory_plan_for(rows, req.prefill_chunk, cache.types)
                .check_fits(cache.bytes() as u64, &avail)?;
        }
        cache.reserve_total(rows);
        Ok(reuse)
    }

    /// Generate over a sequence-parallel ring session: keep the prompt prefix the ring
    /// holds (a chat's earlier turns), check this process's share of the memory plan (its
    /// workers' KV shards and activations) before anything grows, then run the one
    /// generation loop with the ring as the forward pass.
    pub fn generate_on_ring(
        &self,
        req: &GenerateRequest,
        ring: &mut crate::ring::RingSession,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateOutput> {
        if !req.kv_policy.is_full() {
            return Err(lwm_core::Error::InvalidRequest(format!(
                "kv policy {} is not supported on the ring",
                req.kv_policy
            ))
            .into());
        }
        let total = req.run_tokens(self.context_length())?;
        let reuse = ring.reuse_prefix(&req.prompt_ids)?;
        if let Some(avail) = lwm_core::memory_plan::available_memory() {
            let share = self
                .memory_plan(total, req.prefill_chunk)
                .ring_share(ring.sp(), ring.workers_in_process());
            let held = share.kv_bytes * reuse as u64 / total.max(1) as u64;
            share.check_fits(held, &avail)?;
        }
        self.generate_on(req, reuse, &mut |ids| ring.forward(ids), on_text)
    }

    /// Start a generation whose first `reuse` prompt tokens the forward pass holds.
    pub fn start(&self, req: &GenerateRequest, reuse: usize) -> Result<Generation> {
        Generation::new(&self.tokenizer, self.context_length(), req, reuse)
    }

    /// Run a generation to its end over any forward pass, streaming text to `on_text`
    /// (return false to stop). `step(ids)` runs tokens after those already held and
    /// returns the last one's logits; the first `reuse` prompt tokens are held already.
    /// The engine's model + KV cache (`generate_with_cache`) and a sequence-parallel
    /// ring session (`crate::ring`) both drive it.
    pub fn generate_on(
        &self,
        req: &GenerateRequest,
        reuse: usize,
        step: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerateOutput> {
        let mut generation = self.start(req, reuse)?;
        loop {
            match generation.step(step)? {
                Step::Prefilled { .. } => {}
                Step::Token { text, .. } => {
                    if !text.is_empty() && !on_text(&text) {
                        generation.cancel();
                        break;
                    }
                }
                Step::Finished { text, .. } => {
                    if !text.is_empty() {
                        on_text(&text);
                    }
                    break;
                }
            }
        }
        Ok(generation.into_output())
    }
}

/// One token's log-probability and its most likely alternatives (the OpenAI `logprobs`).
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What one [`Generation::step`] did.
#[derive(Debug)]
pub enum Step {
    /// A piece of `tokens` prompt tokens ran; `done` of the `total` to prefill are in.
    Prefilled {
        tokens: usize,
        done: usize,
        total: usize,
    },
    /// A token was sampled. `text` is what became printable (empty while a stop string
    /// or a UTF-8 character is still pending).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The generation ended; `text` is what was held back until now.
    Finished { reason: FinishReason, text: String },
}

/// One generation in progress: the state machine every front end drives (`generate`,
/// `chat`, the server's scheduler, vision chat, needle runs, the ring). Each `step` runs
/// one prompt piece or samples one token, so a caller may interleave many generations or
/// stop between any two steps. The forward pass is the caller's: `forward(ids)` runs
/// tokens after those already held and returns the last one's logits.
pub struct Generation {
    tok: Tokenizer,
    n_prompt: usize,
    reused: usize,
    prefilled: usize,
    prefill_chunk: usize,
    on_prefill: Option<PrefillProgress>,
    budget: usize,
    ignore_eos: bool,
    top_logprobs: Option<usize>,
    sampler: Sampler,
    grammar: Option<GrammarState>,
    /// Prompt and generated ids (the repetition penalties read it).
    history: Vec<u32>,
    /// The last sampled token, not yet run (it runs at the start of the next step, so
    /// its text reaches the caller before the forward pass and a cancel wastes none).
    unrun: Option<u32>,
    ending: Option<FinishReason>,
    finished: Option<FinishReason>,
    logits: Vec<f32>,
    decoder: StreamDecoder,
    stops: StopMatcher,
    text: String,
    started: Instant,
    prefill_secs: f64,
    decode_started: Option<Instant>,
    /// The prompt's vision mask (`GenerateRequest::vision_mask`).
    vision_mask: Option<Vec<bool>>,
}

impl Generation {
    /// Check `req` against a context of `context_length` tokens and set it up; the first
    /// `reused` prompt tokens are already held by the forward pass.
    pub fn new(
        tok: &Tokenizer,
        context_length: usize,
        req: &GenerateRequest,
        reused: usize,
    ) -> Result<Self> {
        let n_prompt = req.prompt_ids.len();
        let budget = req.run_tokens(context_length)? - n_prompt;
        if reused >= n_prompt {
            bail!("{reused} of {n_prompt} prompt tokens are held already: at least one must run");
        }
        if let Some(m) = &req.vision_mask {
            if m.len() != n_prompt {
                bail!(
                    "the vision mask has {} entries for {n_prompt} prompt tokens",
                    m.len()
                );
            }
        }
        Ok(Self {
            tok: tok.clone(),
            n_prompt,
            reused,
            prefilled: reused,
            prefill_chunk: req.prefill_chunk.max(1),
            on_prefill: req.on_prefill.clone(),
            budget,
            ignore_eos: req.ignore_eos,
            top_logprobs: req.top_logprobs,
            sampler: Sampler::new(req.sampling.clone())
                .map_err(|e| lwm_core::Error::InvalidRequest(format!("{e:#}")))?,
            grammar: req.grammar.as_ref().map(Grammar::start),
            history: req.prompt_ids.clone(),
            unrun: None,
            ending: None,
            finished: None,
            logits: Vec::new(),
            decoder: StreamDecoder::new(tok),
            stops: StopMatcher::new(&req.stop),
            text: String::new(),
            started: Instant::now(),
            prefill_secs: 0.0,
            decode_started: None,
            vision_mask: req.vision_mask.clone(),
        })
    }

    /// The tokens the next `step` passes to its forward pass: the next prompt piece, the
    /// last sampled token, or none (that step only samples or finishes). A batching caller
    /// runs these for many generations in one forward and hands each its logits.
    pub fn pending_input(&self) -> Option<&[u32]> {
        if self.finished.is_some() {
            return None;
        }
        if let Some(piece) = self.prompt_piece() {
            return Some(&self.history[piece]);
        }
        if self.ending.is_some() {
            return None;
        }
        self.unrun.as_ref().map(std::slice::from_ref)
    }

    /// The vision mask of `pending_input()`'s ids when they are a piece of a vision prompt;
    /// `None` for text (and for every generated token: answers are text).
    pub fn pending_vision(&self) -> Option<&[bool]> {
        let mask = self.vision_mask.as_ref()?;
        if self.finished.is_some() {
            return None;
        }
        self.prompt_piece().map(|piece| &mask[piece])
    }

    /// The prompt positions the next prefill step runs (at most `prefill_chunk`), while
    /// the prompt is not all prefilled.
    fn prompt_piece(&self) -> Option<std::ops::Range<usize>> {
        (self.prefilled < self.n_prompt)
            .then(|| self.prefilled..(self.prefilled + self.prefill_chunk).min(self.n_prompt))
    }

    /// Prompt tokens whose keys/values are held (reused or prefilled).
    pub fn prefilled_tokens(&self) -> usize {
        self.prefilled
    }

    /// Whether the prompt is still being prefilled.
    pub fn prefilling(&self) -> bool {
        self.prefilled < self.n_prompt
    }

    /// Advance by one prompt piece or one token.
    pub fn step(&mut self, forward: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>) -> Result<Step> {
        if let Some(reason) = self.finished {
            bail!("the generation has finished ({})", reason.as_str());
        }
        if let Some(piece) = self.prompt_piece() {
            let end = piece.end;
            self.logits = forward(&self.history[piece]).context("prefill failed")?;
            let tokens = end - self.prefilled;
            self.prefilled = end;
            let (done, total) = (end - self.reused, self.n_prompt - self.reused);
            if let Some(progress) = &self.on_prefill {
                progress(done, total);
            }
            if end == self.n_prompt {
                self.prefill_secs = self.started.elapsed().as_secs_f64();
                self.decode_started = Some(Instant::now());
            }
            return Ok(Step::Prefilled {
                tokens,
                done,
                total,
            });
        }
        if let Some(reason) = self.ending {
            return Ok(self.finish(reason));
        }
        if let Some(id) = self.unrun.take() {
            self.logits = forward(&[id]).context("decode failed")?;
        }
        if self.generated() >= self.budget {
            return Ok(self.finish(FinishReason::Length));
        }
        let id = match self.grammar.as_mut() {
            Some(g) => {
                let allowed = g.allowed(self.logits.len())?;
                self.sampler
                    .sample_masked(&self.logits, &self.history, Some(allowed))
            }
            None => self.sampler.sample(&self.logits, &self.history),
        };
        match self.grammar.as_mut() {
            // The grammar allows its end token only once the output is complete.
            Some(g) if id == g.eos_id() => return Ok(self.finish(FinishReason::Stop)),
            Some(g) => g.consume(id)?,
            None if !self.ignore_eos && self.tok.is_end_of_generation(id) => {
                return Ok(self.finish(FinishReason::Stop))
            }
            None => {}
        }
        let logprob = self.top_logprobs.map(|n| self.logprob(id, n));
        self.history.push(id);
        let piece = self.decoder.push(id);
        let (text, hit) = self.stops.push(&piece);
        self.text.push_str(&text);
        if hit || self.grammar.as_ref().is_some_and(|g| g.is_finished()) {
            self.ending = Some(FinishReason::Stop);
        } else if self.generated() >= self.budget {
            self.ending = Some(FinishReason::Length);
        } else {
            self.unrun = Some(id);
        }
        Ok(Step::Token { id, text, logprob })
    }

    /// Stop here (the client went away, Ctrl-C): the output keeps what was generated.
    pub fn cancel(&mut self) {
        if self.finished.is_none() {
            self.finish(FinishReason::Cancelled);
        }
    }

    fn finish(&mut self, reason: FinishReason) -> Step {
        // After a stop string nothing held back belongs to the output.
        let text = if self.stops.hit {
            String::new()
        } else {
            self.stops.flush(&self.decoder.flush())
        };
        self.text.push_str(&text);
        self.finished = Some(reason);
        Step::Finished { reason, text }
    }

    fn logprob(&self, id: u32, top_n: usize) -> TokenLogprob {
        let (logprob, top) = logprobs(&self.logits, id, top_n);
        let piece = |t: u32| {
            let b = self.tok.token_bytes(t);
            (String::from_utf8_lossy(&b).into_owned(), b)
        };
        let (token, bytes) = piece(id);
        TokenLogprob {
            token,
            bytes,
            logprob,
            top: top
                .into_iter()
                .map(|(t, l)| {
                    let (s, b) = piece(t);
                    (s, b, l)
                })
                .collect(),
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.history.len() - self.n_prompt
    }

    pub fn prompt_tokens(&self) -> usize {
        self.n_prompt
    }

    /// Prompt tokens whose KV was held before this generation started.
    pub fn reused_tokens(&self) -> usize {
        self.reused
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The result (the finish reason is `Length` if it never finished).
    pub fn into_output(self) -> GenerateOutput {
        GenerateOutput {
            ids: self.history[self.n_prompt..].to_vec(),
            text: self.text,
            finish_reason: self.finished.unwrap_or(FinishReason::Length),
            prompt_tokens: self.n_prompt,
            reused_tokens: self.reused,
            prefill_secs: self.prefill_secs,
            decode_secs: self
                .decode_started
                .map_or(0.0, |t| t.elapsed().as_secs_f64()),
            kv_bytes: 0,
        }
    }
}

/// The checks every prompt gets before anything runs.
fn check_prompt(n_prompt: usize, context: usize) -> Result<()> {
    if n_prompt == 0 {
        return Err(lwm_core::Error::EmptyPrompt.into());
    }
    if n_prompt >= context {
        return Err(lwm_core::Error::ContextExceeded {
            prompt: n_prompt,
            context,
        }
        .into());
    }
    Ok(())
}

#[derive(Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Tokens per prefill forward (bounds activation memory).
    pub prefill_chunk: usize,
    /// Called with (prompt tokens done, prompt tokens to prefill) after each prefill chunk.
    pub on_prefill: Option<PrefillProgress>,
    /// Structured output: every sampled token must keep the text inside this grammar.
    pub grammar: Option<Grammar>,
    /// Report each token's log-probability with this many alternatives.
    pub top_logprobs: Option<usize>,
    /// An LWM vision-language prompt: which prompt ids are vision ids (frame codes and
    /// markers); `None`: all text.
    pub vision_mask: Option<Vec<bool>>,
    /// Which KV rows the cache keeps (`Engine::generate_with_cache`; the ring and the
    /// server run `Full` only).
    pub kv_policy: KvPolicy,
}

/// Progress callback of a long prefill.
pub type PrefillProgress = std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>;

impl GenerateRequest {
    /// Positions the run takes in a context of `context` tokens: the prompt plus as many
    /// new tokens as `max_tokens` and the context allow (after the checks every prompt gets).
    pub fn run_tokens(&self, context: usize) -> Result<usize> {
        let n_prompt = self.prompt_ids.len();
        check_prompt(n_prompt, context)?;
        Ok(n_prompt + self.max_tokens.min(context - n_prompt))
    }

    pub fn new(prompt_ids: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt_ids,
            max_tokens,
            sampling,
            stop: Vec::new(),
            ignore_eos: false,
            prefill_chunk: 512,
            on_prefill: None,
            grammar: None,
            top_logprobs: None,
            vision_mask: None,
            kv_policy: KvPolicy::Full,
        }
    }

    /// The ids a KV cache records for the prompt (vision ids apart from text ones): what
    /// prefix reuse compares.
    pub fn prompt_keys(&self) -> std::borrow::Cow<'_, [u32]> {
        match &self.vision_mask {
            Some(m) => lwm_core::vision_model::cache_keys(&self.prompt_ids, m).into(),
            None => (&self.prompt_ids[..]).into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
    /// The caller's callback asked to stop (client gone, Ctrl-C).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the cache instead of a prefill.
    pub reused_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Bytes of keys and values the KV cache holds at the end (what a KV policy saves);
    /// 0 on the ring (its shards live in the workers).
    pub kv_bytes: u64,
}

/// Streams text while watching for stop strings: text that could still turn into a stop
/// string is held back until it can't; on a match, everything from the stop string on is
/// dropped.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    pub hit: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            hit: false,
        }
    }

    /// Add new text; returns (text safe to emit, whether a stop string matched).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.hit = true;
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        // Longest suffix of `held` that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// End of generation: release what was held (plus a final piece).
    pub fn flush(&mut self, piece: &str) -> String {
        let (mut out, hit) = self.push(piece);
        if !hit {
            out.push_str(&self.held);
        }
        self.held.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    /// KV policies through the engine on the tiny LLaMA fixture (f32, exact numerics).
    mod kv_policy {
        use super::super::*;
        use lwm_core::weights::gguf::GgufFile;

        fn tiny_engine() -> Engine {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lwm/tests/fixtures");
            let path = dir.join("tiny-llama/tiny-llama-f32.gguf");
            let file = GgufFile::open(&path).unwrap();
            let cfg = file.config().unwrap();
            Engine {
                model: Model::load(&file, cfg, ForwardOptions::default()).unwrap(),
                tokenizer: Tokenizer::from_file(&dir.join("tokenizer/spm-tiny.model")).unwrap(),
                chat_template: None,
                chat_template_origin: TemplateOrigin::Default,
                location: ModelLocation::Gguf(path),
                quantization: "f32".into(),
                file_bytes: 0,
                weights_digest: 0,
                grammar_compiler: std::sync::OnceLock::new(),
            }
        }

        fn request(prompt: usize, max_tokens: usize, policy: &str) -> GenerateRequest {
            let ids = (0..prompt as u32).map(|i| (i * 37 + 11) % 256).collect();
            let mut req = GenerateRequest::new(ids, max_tokens, SamplingParams::greedy());
            req.ignore_eos = true;
            req.prefill_chunk = 16;
            req.kv_policy = policy.parse().unwrap();
            req
        }

        /// Bytes of one row in every layer and KV head.
        fn row_bytes(e: &Engine) -> u64 {
            let c = e.config();
            (c.num_hidden_layers
                * c.num_key_value_heads
                * e.model.options.kv_types().row_pair_bytes(c.head_dim)) as u64
        }

        fn generate(e: &Engine, req: &GenerateRequest, cache: &mut KvCache) -> GenerateOutput {
            e.generate_with_cache(req, cache, &mut |_| true).unwrap()
        }

        #[test]
        fn policies_that_evict_nothing_generate_what_full_does() {
            let e = tiny_engine();
            let full = e.generate(&request(40, 12, "full"), &mut |_| true).unwrap();
            assert_eq!(full.ids.len(), 12);
            // The last sampled token never runs: 40 + 11 rows.
            assert_eq!(full.kv_bytes, 51 * row_bytes(&e));
            for policy in ["sinks:4,window:60", "snapkv:48", "snapkv:40,window:8"] {
                let out = e.generate(&request(40, 12, policy), &mut |_| true).unwrap();
                assert_eq!(out.ids, full.ids, "{policy}");
                assert_eq!(out.kv_bytes, full.kv_bytes, "{policy}");
            }
        }

        #[test]
        fn evicting_policies_hold_their_rows_and_follow_the_model() {
            let e = tiny_engine();
            for (policy, rows) in [
                ("sinks:4,window:8", 12),
                ("snapkv:16,window:4,kernel:3", 16 + 9),
            ] {
                let req = request(40, 10, policy);
                let mut cache = e.model.new_cache();
                let out = generate(&e, &req, &mut cache);
                assert_eq!(cache.rows(), rows, "{policy}");
                assert_eq!(out.kv_bytes, rows as u64 * row_bytes(&e), "{policy}");
                // The engine's tokens are the greedy ones of the model under the policy.
                let mut own = e.model.new_cache();
                let mut st = PolicyState::new(req.kv_policy, 40);
                let mut logits = Vec::new();
                for piece in req.prompt_ids.chunks(16) {
                    logits = e.model.forward_policy(piece, &mut own, &mut st).unwrap();
                }
                let mut ids = Vec::new();
                for _ in 0..10 {
                    let id = logits
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0 as u32;
                    ids.push(id);
                    logits = e.model.forward_policy(&[id], &mut own, &mut st).unwrap();
                }
                assert_eq!(out.ids, ids, "{policy}");
                // An evicted cache is not reused: the same request again starts afresh.
                let again = generate(&e, &req, &mut cache);
                assert_eq!(again.reused_tokens, 0, "{policy}");
                assert_eq!(again.ids, out.ids, "{policy}");
            }
        }

        #[test]
        fn a_full_prefix_is_reused_only_where_the_policy_would_hold_the_same_rows() {
            let e = tiny_engine();
            let mut cache = e.model.new_cache();
            generate(&e, &request(40, 2, "full"), &mut cache);
            let snap = generate(&e, &request(40, 4, "snapkv:16,window:4"), &mut cache);
            assert_eq!(snap.reused_tokens, 36);
            let fresh = e.generate(&request(40, 4, "snapkv:16,window:4"), &mut |_| true);
            assert_eq!(snap.ids, fresh.unwrap().ids);
            let mut cache = e.model.new_cache();
            generate(&e, &request(40, 2, "full"), &mut cache);
            let sinks = generate(&e, &request(40, 4, "sinks:4,window:8"), &mut cache);
            assert_eq!(sinks.reused_tokens, 12);
        }
    }

    #[test]
    fn stop_strings_split_across_pieces_are_caught_and_cut() {
        let mut m = StopMatcher::new(&["USER:".to_string()]);
        let mut out = String::new();
        for piece in ["Paris", " is it. U", "SE", "R: more"] {
            let (e, hit) = m.push(piece);
            out.push_str(&e);
            if hit {
                break;
            }
        }
        assert!(m.hit);
        assert_eq!(out, "Paris is it. ");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_stops_matching() {
        let mut m = StopMatcher::new(&["</s>".to_string()]);
        let (a, _) = m.push("a <");
        assert_eq!(a, "a ");
        let (b, _) = m.push("b");
        assert_eq!(b, "<b");
        assert_eq!(m.flush("!"), "!");
    }
}
