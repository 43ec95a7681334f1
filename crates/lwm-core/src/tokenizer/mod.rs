//! Tokenizers: text ↔ token ids for LLaMA-family models.
//!
//! Three sources are supported, all behind one [`Tokenizer`] type:
//!
//! * a GGUF file's `tokenizer.ggml.*` metadata ([`GgufVocab`]), tokenized exactly like
//!   llama.cpp: `tokenizer.ggml.model = "llama"` uses the SPM algorithm (`spm.rs`),
//!   `"gpt2"` uses byte-level BPE with the pre-tokenizer regexes named by
//!   `tokenizer.ggml.pre` (`bpe.rs`, see [`known_pre_types`]);
//! * a SentencePiece `tokenizer.model` (read by hand in [`sentencepiece_model`]; BPE
//!   models such as LLaMA's), tokenized with the same SPM algorithm but SentencePiece's
//!   whitespace rules (space prefix only at the start of the text,
//!   `remove_extra_whitespaces`);
//! * a Hugging Face `tokenizer.json`, through the `tokenizers` crate (`hf.rs`).
//!
//! [`StreamDecoder`] turns ids back into text incrementally for streaming output.
//!
//! Behaviour worth knowing:
//! * `encode(.., parse_special = true)` splits out control/user-defined token strings the
//!   way llama.cpp's `tokenizer_st_partition` does (longest tokens first); for GGUF SPM
//!   vocabularies the space prefix is added at the start *and after every special
//!   token*, as llama.cpp does.
//! * `tokenizer.ggml.pre = "default"` (or a missing `pre`) means llama.cpp's default BPE
//!   pre-tokenizer (punctuation runs, GPT-2 regex, digit runs, 3-digit groups), not the
//!   plain GPT-2 regex; use "gpt-2" for that.
//! * `decode` never applies llama.cpp's `clean_spaces` punctuation clean-up, so
//!   byte-level vocabularies round-trip exactly; for vocabularies with a space prefix it
//!   drops the first token's leading space.
//! * A GPT-2 style vocabulary without `bos_token_id`/`eos_token_id` gets no BOS/EOS
//!   (llama.cpp would fall back to id 11).

mod bpe;
mod byte_level;
mod hf;
pub mod sentencepiece_model;
mod spm;
mod stream;
mod vocab;

use std::borrow::Cow;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;

pub use bpe::known_pre_types;
pub use sentencepiece_model::{SentencePieceModel, SpModelType, SpPiece};
pub use stream::StreamDecoder;

use bpe::BpeModel;
use hf::HfTokenizer;
use spm::SpmModel;
use vocab::{Fragment, PieceStyle, Vocab, VocabSpec, ATTR_CONTROL, ATTR_UNKNOWN};

// ---------------------------------------------------------------------------------------
// GGUF vocabulary
// ---------------------------------------------------------------------------------------

/// The tokenizer part of a GGUF file's metadata (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "llama" (SPM) or "gpt2" (byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: the BPE pre-tokenizer type.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Option<Vec<f32>>,
    pub token_types: Option<Vec<i32>>,
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub eot_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

type Metadata = std::collections::HashMap<String, gguf_file::Value>;

fn md_string(md: &Metadata, key: &str) -> Result<Option<String>> {
    match md.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => bail!(
            "GGUF key {key} should be a string, found {:?}",
            v.value_type()
        ),
    }
}

fn md_array<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a [gguf_file::Value]>> {
    match md.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::Array(a)) => Ok(Some(a)),
        Some(v) => bail!(
            "GGUF key {key} should be an array, found {:?}",
            v.value_type()
        ),
    }
}

fn md_strings(md: &Metadata, key: &str) -> Result<Option<Vec<String>>> {
    let Some(a) = md_array(md, key)? else {
        return Ok(None);
    };
    a.iter()
        .enumerate()
        .map(|(i, v)| match v {
            gguf_file::Value::String(s) => Ok(s.clone()),
            v => bail!(
                "GGUF key {key}: element {i} should be a string, found {:?}",
                v.value_type()
            ),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn value_f64(v: &gguf_file::Value) -> Option<f64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => *x as f64,
        V::I8(x) => *x as f64,
        V::U16(x) => *x as f64,
        V::I16(x) => *x as f64,
        V::U32(x) => *x as f64,
        V::I32(x) => *x as f64,
        V::U64(x) => *x as f64,
        V::I64(x) => *x as f64,
        V::F32(x) => *x as f64,
        V::F64(x) => *x,
        V::Bool(b) => *b as u8 as f64,
        _ => return None,
    })
}

fn value_i64(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => *x as i64,
        V::I8(x) => *x as i64,
        V::U16(x) => *x as i64,
        V::I16(x) => *x as i64,
        V::U32(x) => *x as i64,
        V::I32(x) => *x as i64,
        V::U64(x) => i64::try_from(*x).ok()?,
        V::I64(x) => *x,
        V::Bool(b) => *b as i64,
        _ => return None,
    })
}

fn md_numbers<T>(
    md: &Metadata,
    key: &str,
    conv: impl Fn(&gguf_file::Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(a) = md_array(md, key)? else {
        return Ok(None);
    };
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            conv(v).ok_or_else(|| {
                anyhow!(
                    "GGUF key {key}: element {i} should be a number, found {:?}",
                    v.value_type()
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn md_id(md: &Metadata, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => match value_i64(v) {
            // Negative ids (-1) mean "none".
            Some(x) if x < 0 => Ok(None),
            Some(x) => {
                Ok(Some(u32::try_from(x).map_err(|_| {
                    anyhow!("GGUF key {key}: id {x} out of range")
                })?))
            }
            None => bail!(
                "GGUF key {key} should be an integer, found {:?}",
                v.value_type()
            ),
        },
    }
}

fn md_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => match value_i64(v) {
            Some(x) => Ok(Some(x != 0)),
            None => bail!(
                "GGUF key {key} should be a bool, found {:?}",
                v.value_type()
            ),
        },
    }
}

impl GgufVocab {
    /// Read the `tokenizer.ggml.*` keys of a GGUF file.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        Self::from_metadata(&content.metadata)
    }

    fn from_metadata(md: &Metadata) -> Result<Self> {
        let model = md_string(md, "tokenizer.ggml.model")?.ok_or_else(|| {
            anyhow!("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        })?;
        let tokens = md_strings(md, "tokenizer.ggml.tokens")?.ok_or_else(|| {
            anyhow!("GGUF vocab has no tokens (tokenizer.ggml.tokens is missing)")
        })?;
        Ok(Self {
            model,
            pre: md_string(md, "tokenizer.ggml.pre")?,
            tokens,
            scores: md_numbers(md, "tokenizer.ggml.scores", |v| {
                value_f64(v).map(|x| x as f32)
            })?,
            token_types: md_numbers(md, "tokenizer.ggml.token_type", |v| {
                value_i64(v).and_then(|x| i32::try_from(x).ok())
            })?,
            merges: md_strings(md, "tokenizer.ggml.merges")?,
            bos_token_id: md_id(md, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: md_id(md, "tokenizer.ggml.eos_token_id")?,
            unknown_token_id: md_id(md, "tokenizer.ggml.unknown_token_id")?,
            padding_token_id: md_id(md, "tokenizer.ggml.padding_token_id")?,
            eot_token_id: md_id(md, "tokenizer.ggml.eot_token_id")?,
            add_bos_token: md_bool(md, "tokenizer.ggml.add_bos_token")?,
            add_eos_token: md_bool(md, "tokenizer.ggml.add_eos_token")?,
            add_space_prefix: md_bool(md, "tokenizer.ggml.add_space_prefix")?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------

/// A tokenizer; cheap to clone (the state is shared behind an `Arc`).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Backend>,
}

// Lives once behind an `Arc`, so the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Llama { vocab: Vocab, algo: Algo },
    Hf(HfTokenizer),
}

enum Algo {
    /// `sp` is set for vocabularies read from a SentencePiece `tokenizer.model`: the
    /// space prefix goes only at the start of the text and SentencePiece's whitespace
    /// normalization applies. Without it, llama.cpp's rules apply (a space prefix at the
    /// start and after every special token).
    Spm {
        model: SpmModel,
        sp: Option<SpNormalizer>,
    },
    Bpe(BpeModel),
}

struct SpNormalizer {
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl SpNormalizer {
    /// SentencePiece's `remove_extra_whitespaces`: drop leading and trailing spaces and
    /// squeeze runs of spaces into one.
    fn normalize<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if !self.remove_extra_whitespaces {
            return Cow::Borrowed(text);
        }
        let trimmed = text.trim_matches(' ');
        if !trimmed.contains("  ") {
            return Cow::Borrowed(trimmed);
        }
        let mut out = String::with_capacity(trimmed.len());
        let mut prev_space = false;
        for c in trimmed.chars() {
            if c == ' ' && prev_space {
                continue;
            }
            prev_space = c == ' ';
            out.push(c);
        }
        Cow::Owned(out)
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos_id())
            .field("eos", &self.eos_id())
            .finish()
    }
}

impl From<&Tokenizer> for Tokenizer {
    fn from(t: &Tokenizer) -> Self {
        t.clone()
    }
}

impl From<Arc<Tokenizer>> for Tokenizer {
    fn from(t: Arc<Tokenizer>) -> Self {
        (*t).clone()
    }
}

impl From<&Arc<Tokenizer>> for Tokenizer {
    fn from(t: &Arc<Tokenizer>) -> Self {
        (**t).clone()
    }
}

impl Tokenizer {
    /// Build from GGUF tokenizer metadata (see [`GgufVocab::from_gguf`]).
    pub fn from_gguf_vocab(v: GgufVocab) -> Result<Self> {
        let GgufVocab {
            model,
            pre,
            tokens,
            scores,
            token_types,
            merges,
            bos_token_id,
            eos_token_id,
            unknown_token_id,
            padding_token_id,
            eot_token_id,
            add_bos_token,
            add_eos_token,
            add_space_prefix,
        } = v;
        if tokens.is_empty() {
            bail!("GGUF vocab has no tokens (tokenizer.ggml.tokens is empty)");
        }
        let backend = match model.as_str() {
            "llama" => {
                let vocab = Vocab::build(VocabSpec {
                    tokens,
                    scores,
                    types: token_types,
                    bos: bos_token_id.or(Some(1)),
                    eos: eos_token_id.or(Some(2)),
                    unk: unknown_token_id.or(Some(0)),
                    eot: eot_token_id,
                    pad: padding_token_id,
                    add_bos: add_bos_token.unwrap_or(true),
                    add_eos: add_eos_token.unwrap_or(false),
                    add_space_prefix: add_space_prefix.unwrap_or(true),
                    style: PieceStyle::Spm,
                    source: "GGUF vocab",
                })?;
                let model = SpmModel::new(&vocab);
                Backend::Llama {
                    vocab,
                    algo: Algo::Spm { model, sp: None },
                }
            }
            "gpt2" => {
                let merges = merges.ok_or_else(|| {
                    anyhow!("GGUF vocab for model \"gpt2\" has no BPE merges (tokenizer.ggml.merges is missing)")
                })?;
                let mut vocab = Vocab::build(VocabSpec {
                    tokens,
                    scores,
                    types: token_types,
                    bos: bos_token_id,
                    eos: eos_token_id,
                    unk: unknown_token_id,
                    eot: eot_token_id,
                    pad: padding_token_id,
                    add_bos: false,
                    add_eos: add_eos_token.unwrap_or(false),
                    add_space_prefix: add_space_prefix.unwrap_or(false),
                    style: PieceStyle::ByteLevel,
                    source: "GGUF vocab",
                })?;
                let bpe = BpeModel::new(&vocab, &merges, pre.as_deref())?;
                vocab.add_bos = add_bos_token.unwrap_or(bpe.pre_add_bos) && vocab.bos.is_some();
                Backend::Llama {
                    vocab,
                    algo: Algo::Bpe(bpe),
                }
            }
            other => bail!(
                "unsupported tokenizer.ggml.model {other:?} (supported: \"llama\" for SentencePiece-style SPM, \"gpt2\" for byte-level BPE)"
            ),
        };
        Ok(Self {
            inner: Arc::new(backend),
        })
    }

    /// Build from a parsed SentencePiece model (BPE type, e.g. LLaMA's tokenizer.model).
    pub fn from_sentencepiece(m: &SentencePieceModel) -> Result<Self> {
        if m.model_type != SpModelType::Bpe {
            bail!(
                "sentencepiece model type {:?} is not supported (only BPE models, such as LLaMA's tokenizer.model)",
                m.model_type
            );
        }
        let id = |x: i32| u32::try_from(x).ok();
        let vocab = Vocab::build(VocabSpec {
            tokens: m.pieces.iter().map(|p| p.piece.clone()).collect(),
            scores: Some(m.pieces.iter().map(|p| p.score).collect()),
            types: Some(m.pieces.iter().map(|p| p.kind).collect()),
            bos: id(m.bos_id),
            eos: id(m.eos_id),
            unk: id(m.unk_id),
            eot: None,
            pad: id(m.pad_id),
            add_bos: id(m.bos_id).is_some(),
            add_eos: false,
            add_space_prefix: m.add_dummy_prefix,
            style: PieceStyle::Spm,
            source: "sentencepiece model",
        })?;
        let model = SpmModel::new(&vocab);
        let sp = SpNormalizer {
            remove_extra_whitespaces: m.remove_extra_whitespaces,
            escape_whitespaces: m.escape_whitespaces,
        };
        Ok(Self {
            inner: Arc::new(Backend::Llama {
                vocab,
                algo: Algo::Spm {
                    model,
                    sp: Some(sp),
                },
            }),
        })
    }

    /// Load `tokenizer.json`, a SentencePiece `tokenizer.model`, or the vocabulary of a
    /// `.gguf` file, chosen by file name and content.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut head = [0u8; 64];
        let n = {
            let mut f = std::fs::File::open(path)
                .with_context(|| format!("opening tokenizer file {}", path.display()))?;
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
                }
            }
            n
        };
        let head = &head[..n];
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let first = head.iter().find(|b| !b.is_ascii_whitespace()).copied();
        if head.starts_with(b"GGUF") {
            let (content, _, _) = crate::weights::gguf::read_content(path)?;
            let v = GgufVocab::from_gguf(&content)
                .with_context(|| format!("reading the vocabulary of {}", path.display()))?;
            return Self::from_gguf_vocab(v)
                .with_context(|| format!("building the tokenizer of {}", path.display()));
        }
        if name.ends_with(".json") || first == Some(b'{') {
            let hf = HfTokenizer::from_file(path)?;
            return Ok(Self {
                inner: Arc::new(Backend::Hf(hf)),
            });
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let m = SentencePieceModel::parse(&bytes)
            .with_context(|| format!("parsing {} as a sentencepiece model", path.display()))?;
        Self::from_sentencepiece(&m).with_context(|| format!("loading {}", path.display()))
    }

    /// Token ids for `text`. `add_bos` prepends the BOS token (when the vocabulary has
    /// one). With `parse_special`, control-token strings such as `<|im_start|>` in the
    /// text become their ids; otherwise they are tokenized as plain text (user-defined
    /// tokens are always recognized, as in llama.cpp).
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        match &*self.inner {
            Backend::Hf(h) => {
                if add_bos {
                    out.extend(h.bos);
                }
                out.extend(h.encode(text, parse_special)?);
            }
            Backend::Llama { vocab, algo } => {
                if add_bos {
                    out.extend(vocab.bos);
                }
                match algo {
                    Algo::Bpe(bpe) => {
                        for frag in vocab.partition(text, parse_special) {
                            match frag {
                                Fragment::Text(s) => bpe.tokenize(vocab, s, &mut out)?,
                                Fragment::Token(id) => out.push(id),
                            }
                        }
                    }
                    Algo::Spm { model, sp: None } => {
                        let mut prev_special = true;
                        for frag in vocab.partition(text, parse_special) {
                            match frag {
                                Fragment::Text(s) => {
                                    let mut t = String::with_capacity(s.len() + 1);
                                    if vocab.add_space_prefix && prev_special {
                                        t.push(' ');
                                    }
                                    t.push_str(s);
                                    model.tokenize(vocab, &spm::escape_whitespace(&t), &mut out);
                                    prev_special = false;
                                }
                                Fragment::Token(id) => {
                                    out.push(id);
                                    prev_special = true;
                                }
                            }
                        }
                    }
                    Algo::Spm {
                        model,
                        sp: Some(sp),
                    } => {
                        let norm = sp.normalize(text);
                        let text: Cow<str> = if vocab.add_space_prefix && !norm.is_empty() {
                            Cow::Owned(format!(" {norm}"))
                        } else {
                            norm
                        };
                        for frag in vocab.partition(&text, parse_special) {
                            match frag {
                                Fragment::Text(s) if sp.escape_whitespaces => {
                                    model.tokenize(vocab, &spm::escape_whitespace(s), &mut out)
                                }
                                Fragment::Text(s) => model.tokenize(vocab, s, &mut out),
                                Fragment::Token(id) => out.push(id),
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Text for `ids`. With `skip_special`, control (and unknown) tokens are left out.
    /// Ids outside the vocabulary are skipped. Invalid UTF-8 becomes U+FFFD. For SPM
    /// vocabularies that add a space prefix, the first token's leading space is dropped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        match &*self.inner {
            Backend::Hf(h) => h.decode(ids, skip_special),
            Backend::Llama { vocab, .. } => {
                String::from_utf8_lossy(&vocab.decode_bytes(ids, skip_special)).into_owned()
            }
        }
    }

    /// Raw bytes of one token's piece (byte-level / `▁` / `<0xXX>` decoded); special
    /// tokens give their text; out-of-range ids give nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match &*self.inner {
            Backend::Hf(h) => h.token_bytes(id),
            Backend::Llama { vocab, .. } => vocab.piece(id, false).to_vec(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &*self.inner {
            Backend::Hf(h) => h.vocab_size(),
            Backend::Llama { vocab, .. } => vocab.len(),
        }
    }

    /// Id of a raw vocabulary string (e.g. `"<|im_end|>"`, `"▁Hello"`, `"Ġthe"`).
    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        match &*self.inner {
            Backend::Hf(h) => h.token_to_id(piece),
            Backend::Llama { vocab, .. } => vocab.token_to_id.get(piece).copied(),
        }
    }

    /// The raw vocabulary string of `id`.
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        match &*self.inner {
            Backend::Hf(h) => h.id_to_piece(id),
            Backend::Llama { vocab, .. } => vocab.tokens.get(id as usize).cloned(),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        match &*self.inner {
            Backend::Hf(h) => h.bos,
            Backend::Llama { vocab, .. } => vocab.bos,
        }
    }

    pub fn eos_id(&self) -> Option<u32> {
        match &*self.inner {
            Backend::Hf(h) => h.eos,
            Backend::Llama { vocab, .. } => vocab.eos,
        }
    }

    /// The end-of-turn id (GGUF `tokenizer.ggml.eot_token_id`), when set.
    pub fn eot_id(&self) -> Option<u32> {
        match &*self.inner {
            Backend::Hf(_) => None,
            Backend::Llama { vocab, .. } => vocab.eot,
        }
    }

    /// The unknown-token id, when the vocabulary has one.
    pub fn unk_id(&self) -> Option<u32> {
        match &*self.inner {
            Backend::Hf(_) => None,
            Backend::Llama { vocab, .. } => vocab.unk,
        }
    }

    /// The padding-token id, when the vocabulary names one.
    pub fn pad_id(&self) -> Option<u32> {
        match &*self.inner {
            Backend::Hf(_) => None,
            Backend::Llama { vocab, .. } => vocab.pad,
        }
    }

    /// Whether prompts should start with BOS: GGUF `add_bos_token`, else true for SPM
    /// (and llama-3 style BPE), false for other BPE; for tokenizer.json,
    /// `tokenizer_config.json`'s `add_bos_token` or the post-processor's template.
    pub fn add_bos_by_default(&self) -> bool {
        match &*self.inner {
            Backend::Hf(h) => h.add_bos && h.bos.is_some(),
            Backend::Llama { vocab, .. } => vocab.add_bos && vocab.bos.is_some(),
        }
    }

    /// GGUF `add_eos_token` (never applied by [`Tokenizer::encode`]; callers that want
    /// a trailing EOS append [`Tokenizer::eos_id`] themselves).
    pub fn add_eos_by_default(&self) -> bool {
        match &*self.inner {
            Backend::Hf(_) => false,
            Backend::Llama { vocab, .. } => vocab.add_eos && vocab.eos.is_some(),
        }
    }

    /// EOS, EOT and the tokens llama.cpp stops generation on (`<|im_end|>`,
    /// `<|endoftext|>`, `<|eot_id|>`, `</s>`, ...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        match &*self.inner {
            Backend::Hf(h) => h.is_eog(id),
            Backend::Llama { vocab, .. } => vocab.eog.contains(&id),
        }
    }

    /// Control tokens (for tokenizer.json: added tokens marked special).
    pub fn is_special(&self, id: u32) -> bool {
        match &*self.inner {
            Backend::Hf(h) => h.is_special(id),
            Backend::Llama { vocab, .. } => vocab.attr(id) & ATTR_CONTROL != 0,
        }
    }

    /// Tokens that produce no text when decoding with `skip_special`.
    pub(crate) fn is_skipped_special(&self, id: u32) -> bool {
        match &*self.inner {
            Backend::Hf(h) => h.is_special(id),
            Backend::Llama { vocab, .. } => vocab.attr(id) & (ATTR_CONTROL | ATTR_UNKNOWN) != 0,
        }
    }

    /// "spm", "bpe" or "tokenizer.json".
    pub fn kind(&self) -> &'static str {
        match &*self.inner {
            Backend::Hf(_) => "tokenizer.json",
            Backend::Llama {
                algo: Algo::Spm { .. },
                ..
            } => "spm",
            Backend::Llama {
                algo: Algo::Bpe(_), ..
            } => "bpe",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn tokenizer_is_send_sync_clone() {
        assert_send_sync_clone::<Tokenizer>();
        assert_send_sync_clone::<StreamDecoder>();
    }

    fn spm_vocab() -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        for t in ["\u{2581}", "\u{2581}H", "\u{2581}Hi", "H", "i", "<|x|>"] {
            tokens.push(t.into());
            types.push(if t == "<|x|>" { 4 } else { 1 });
        }
        let n = tokens.len();
        let scores = (0..n).map(|i| -(i as f32)).collect();
        GgufVocab {
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_types: Some(types),
            ..Default::default()
        }
    }

    #[test]
    fn spm_prefix_and_specials() {
        let tok = Tokenizer::from_gguf_vocab(spm_vocab()).unwrap();
        assert_eq!(tok.kind(), "spm");
        assert!(tok.add_bos_by_default());
        let hi = tok.token_to_id("\u{2581}Hi").unwrap();
        assert_eq!(tok.encode("Hi", false, false).unwrap(), vec![hi]);
        assert_eq!(tok.encode("Hi", true, false).unwrap(), vec![1, hi]);
        // llama.cpp adds the space prefix again after a special token.
        assert_eq!(
            tok.encode("Hi</s>Hi", false, true).unwrap(),
            vec![hi, 2, hi]
        );
        // Without parse_special, "</s>" is plain text (bytes: '<' '/' 's' '>').
        let plain = tok.encode("</s>", false, false).unwrap();
        assert_eq!(plain.len(), 5);
        // User-defined tokens are always split out.
        let x = tok.token_to_id("<|x|>").unwrap();
        assert_eq!(tok.encode("Hi<|x|>", false, false).unwrap(), vec![hi, x]);
        assert_eq!(tok.decode(&[1, hi, 2], true), "Hi");
        assert_eq!(tok.decode(&[1, hi, 2], false), "<s> Hi</s>");
        assert_eq!(tok.decode(&[hi, 99_999], false), "Hi");
        assert!(tok.is_end_of_generation(2));
        assert!(tok.is_special(1) && !tok.is_special(hi));
        assert_eq!(tok.token_bytes(3 + 0x41), b"A");
        assert!(tok.token_bytes(u32::MAX).is_empty());
    }

    #[test]
    fn errors_are_clear() {
        let mut v = spm_vocab();
        v.model = "t5".into();
        let e = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(e.contains("unsupported tokenizer.ggml.model \"t5\""), "{e}");

        let v = GgufVocab {
            model: "llama".into(),
            ..Default::default()
        };
        let e = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(e.contains("no tokens"), "{e}");

        let gpt = GgufVocab {
            model: "gpt2".into(),
            pre: Some("gpt-2".into()),
            tokens: vec!["a".into(), "b".into(), "ab".into()],
            merges: Some(vec!["a b".into()]),
            ..Default::default()
        };
        let tok = Tokenizer::from_gguf_vocab(gpt.clone()).unwrap();
        assert_eq!(tok.encode("ab", false, false).unwrap(), vec![2]);

        let mut bad = gpt.clone();
        bad.merges = None;
        let e = Tokenizer::from_gguf_vocab(bad).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.merges"), "{e}");

        let mut bad = gpt.clone();
        bad.merges = Some(vec!["a c".into()]);
        let e = Tokenizer::from_gguf_vocab(bad).unwrap_err().to_string();
        assert!(e.contains("unknown token \"c\""), "{e}");

        let mut bad = gpt.clone();
        bad.merges = Some(vec!["ab".into()]);
        let e = Tokenizer::from_gguf_vocab(bad).unwrap_err().to_string();
        assert!(e.contains("no space"), "{e}");

        let mut bad = gpt;
        bad.pre = Some("martian".into());
        let e = Tokenizer::from_gguf_vocab(bad).unwrap_err().to_string();
        assert!(e.contains("\"martian\"") && e.contains("smollm"), "{e}");
    }

    #[test]
    fn gguf_metadata_errors() {
        use gguf_file::Value as V;
        let mut md = Metadata::new();
        let e = GgufVocab::from_metadata(&md).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.model is missing"), "{e}");
        md.insert("tokenizer.ggml.model".into(), V::String("llama".into()));
        let e = GgufVocab::from_metadata(&md).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.tokens is missing"), "{e}");
        md.insert("tokenizer.ggml.tokens".into(), V::U32(3));
        let e = GgufVocab::from_metadata(&md).unwrap_err().to_string();
        assert!(e.contains("should be an array"), "{e}");
        md.insert(
            "tokenizer.ggml.tokens".into(),
            V::Array(vec![V::String("a".into()), V::U8(1)]),
        );
        let e = GgufVocab::from_metadata(&md).unwrap_err().to_string();
        assert!(e.contains("element 1 should be a string"), "{e}");
        md.insert(
            "tokenizer.ggml.tokens".into(),
            V::Array(vec![V::String("<unk>".into()), V::String("a".into())]),
        );
        md.insert("tokenizer.ggml.scores".into(), V::Array(vec![V::F32(0.0)]));
        md.insert("tokenizer.ggml.bos_token_id".into(), V::I32(-1));
        md.insert("tokenizer.ggml.add_bos_token".into(), V::Bool(false));
        let v = GgufVocab::from_metadata(&md).unwrap();
        assert_eq!(v.bos_token_id, None);
        assert_eq!(v.add_bos_token, Some(false));
        // One score for two tokens.
        let e = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(e.contains("1 scores for 2 tokens"), "{e}");
    }

    #[test]
    fn sentencepiece_normalizer() {
        let n = SpNormalizer {
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        assert_eq!(n.normalize("  a   b  c "), "a b c");
        assert_eq!(n.normalize("   "), "");
        assert_eq!(n.normalize("a\t\tb"), "a\t\tb");
    }
}
