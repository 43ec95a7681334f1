//! `tokenizer.json` support through the `tokenizers` crate, plus what that crate does not
//! say directly: which ids are BOS / EOS / end-of-generation, whether BOS is added by
//! default, and the raw bytes of every token (for streaming decode).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::byte_level::byte_level_decode;
use super::vocab::{parse_byte_token, EOG_TEXTS};

const BOS_NAMES: &[&str] = &[
    "<s>",
    "<|begin_of_text|>",
    "<bos>",
    "<|startoftext|>",
    "<\u{ff5c}begin\u{2581}of\u{2581}sentence\u{ff5c}>",
];
const EOS_NAMES: &[&str] = &[
    "</s>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<eos>",
    "<|im_end|>",
    "<|eot_id|>",
];

#[derive(Debug, Clone)]
pub(crate) struct HfTokenizer {
    /// Special added tokens in the text are recognized.
    tok: tokenizers::Tokenizer,
    /// Special added tokens in the text are encoded as plain text.
    tok_plain: tokenizers::Tokenizer,
    pieces: Vec<Vec<u8>>,
    special: HashSet<u32>,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    pub(crate) add_bos: bool,
    eog: HashSet<u32>,
}

/// What the `decoder` section says about turning token strings into bytes.
#[derive(Default)]
struct DecoderInfo {
    byte_level: bool,
    byte_fallback: bool,
    metaspace: bool,
    wordpiece: bool,
}

fn collect_types(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(t)) = map.get("type") {
                out.push(t.clone());
            }
            if let (Some(Value::String(t)), Some(Value::Object(pat)), Some(Value::String(c))) =
                (map.get("type"), map.get("pattern"), map.get("content"))
            {
                if t == "Replace"
                    && pat.get("String").and_then(Value::as_str) == Some("\u{2581}")
                    && c == " "
                {
                    out.push("Metaspace".into());
                }
            }
            for v in map.values() {
                collect_types(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_types(v, out)),
        _ => {}
    }
}

fn special_token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// Find the first token a post-processor puts in front of a single sequence.
fn post_processor_bos(pp: &Value) -> Option<String> {
    let obj = pp.as_object()?;
    match obj.get("type").and_then(Value::as_str)? {
        "TemplateProcessing" => {
            let first = obj.get("single")?.as_array()?.first()?;
            let st = first.get("SpecialToken")?;
            st.get("id").and_then(Value::as_str).map(String::from)
        }
        "RobertaProcessing" | "BertProcessing" => obj
            .get("cls")?
            .as_array()?
            .first()?
            .as_str()
            .map(String::from),
        "Sequence" => obj
            .get("processors")?
            .as_array()?
            .iter()
            .find_map(post_processor_bos),
        _ => None,
    }
}

/// A BPE merge `a b` makes the token `a` + `b` (less `b`'s continuing-subword prefix),
/// which must be in the vocabulary. The `tokenizers` crate (0.23) builds the merged string
/// in a buffer as long as the longest vocabulary entry before it looks the token up, and
/// panics when the merge is longer (a vocabulary of single letters with the merge `l l`;
/// found by the tokenizer fuzzer) or `b` is shorter than the prefix. Refused here with the
/// crate's own reason instead.
fn check_bpe_merges(json: &Value) -> Result<()> {
    let Some(model) = json.get("model").filter(|m| m["type"] == "BPE") else {
        return Ok(());
    };
    let (Some(vocab), Some(merges)) = (model["vocab"].as_object(), model["merges"].as_array())
    else {
        return Ok(()); // the crate reports the missing parts itself
    };
    let longest = vocab.keys().map(String::len).max().unwrap_or(0);
    let prefix = model["continuing_subword_prefix"]
        .as_str()
        .map_or(0, str::len);
    for m in merges {
        let pair = match m {
            Value::String(s) => s.split_once(' '),
            Value::Array(v) if v.len() == 2 => v[0].as_str().zip(v[1].as_str()),
            _ => None,
        };
        let Some((a, b)) = pair else { continue };
        if b.len() < prefix || a.len() + b.len() - prefix > longest {
            bail!(
                "the merge {a:?} + {b:?} makes a token longer than any in the vocabulary \
                 ({longest} bytes), so it is not in the vocabulary"
            );
        }
    }
    Ok(())
}

/// Token ids a tokenizer.json may use (the largest real vocabularies hold about 2^18).
const MAX_TOKEN_IDS: usize = 1 << 24;

impl HfTokenizer {
    pub(crate) fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let json: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        check_bpe_merges(&json).with_context(|| format!("tokenizer.json {}", path.display()))?;
        // The `tokenizers` crate panics on some malformed files (the merge check above
        // covers the one the fuzzer found); any other panic is this file's error too.
        let tok = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                anyhow!(
                    "loading tokenizer.json {}: the tokenizers library failed on it ({why})",
                    path.display()
                )
            })?
            .map_err(|e| anyhow!("loading tokenizer.json {}: {e}", path.display()))?;
        let config = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .filter(|p| p.is_file())
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        Self::new(tok, &json, config.as_ref())
    }

    fn new(tok: tokenizers::Tokenizer, json: &Value, config: Option<&Value>) -> Result<Self> {
        let mut types = Vec::new();
        if let Some(d) = json.get("decoder") {
            collect_types(d, &mut types);
        }
        let has = |t: &str| types.iter().any(|x| x == t);
        let dec = DecoderInfo {
            byte_level: has("ByteLevel"),
            byte_fallback: has("ByteFallback"),
            metaspace: has("Metaspace"),
            wordpiece: has("WordPiece"),
        };

        let vocab = tok.get_vocab(true);
        let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        // Pieces are a table indexed by id, so an id far past the entries would size it:
        // one id of 3.9e9 asked for 93 GB (found by the tokenizer fuzzer). Real vocabularies
        // number their tokens nearly densely and stay under 2^24.
        let room = (2 * vocab.len())
            .max(vocab.len() + 65_536)
            .min(MAX_TOKEN_IDS);
        if n > room {
            let (text, id) = vocab
                .iter()
                .max_by_key(|(_, &id)| id)
                .map(|(t, &id)| (t.as_str(), id))
                .unwrap_or_default();
            bail!(
                "tokenizer.json gives token {text:?} the id {id}, beyond what {} tokens can number \
                 (ids must stay below {room})",
                vocab.len()
            );
        }
        let added = tok.get_added_tokens_decoder();
        let mut pieces = vec![Vec::new(); n];
        for (text, &id) in &vocab {
            let bytes = if let Some(a) = added.get(&id) {
                a.content.as_bytes().to_vec()
            } else if dec.byte_level {
                byte_level_decode(text)
            } else if let Some(b) = parse_byte_token(text).filter(|_| dec.byte_fallback) {
                vec![b]
            } else if dec.metaspace {
                text.replace('\u{2581}', " ").into_bytes()
            } else if dec.wordpiece {
                text.strip_prefix("##").unwrap_or(text).as_bytes().to_vec()
            } else {
                text.as_bytes().to_vec()
            };
            pieces[id as usize] = bytes;
        }
        let special: HashSet<u32> = added
            .iter()
            .filter(|(_, a)| a.special)
            .map(|(&id, _)| id)
            .collect();

        let id_of = |name: &str| tok.token_to_id(name);
        let cfg_token = |key: &str| {
            config
                .and_then(|c| c.get(key))
                .and_then(special_token_content)
                .and_then(|s| id_of(&s))
        };
        let pp_bos = json
            .get("post_processor")
            .and_then(post_processor_bos)
            .and_then(|s| id_of(&s));
        let bos = cfg_token("bos_token")
            .or(pp_bos)
            .or_else(|| BOS_NAMES.iter().find_map(|n| id_of(n)));
        let eos = cfg_token("eos_token").or_else(|| EOS_NAMES.iter().find_map(|n| id_of(n)));
        let add_bos = config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(pp_bos.is_some());

        let mut eog: HashSet<u32> = EOG_TEXTS.iter().filter_map(|t| id_of(t)).collect();
        eog.extend(eos);

        let mut tok_plain = tok.clone();
        tok_plain.set_encode_special_tokens(true);
        Ok(Self {
            tok,
            tok_plain,
            pieces,
            special,
            bos,
            eos,
            add_bos,
            eog,
        })
    }

    pub(crate) fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let t = if parse_special {
            &self.tok
        } else {
            &self.tok_plain
        };
        let enc = t
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer.json encode failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub(crate) fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < self.pieces.len())
            .collect();
        match self.tok.decode(&ids, skip_special) {
            Ok(s) => s,
            Err(_) => {
                let bytes: Vec<u8> = ids
                    .iter()
                    .filter(|id| !(skip_special && self.special.contains(id)))
                    .flat_map(|&id| self.pieces[id as usize].iter().copied())
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    pub(crate) fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.pieces.get(id as usize).cloned().unwrap_or_default()
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub(crate) fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.tok.token_to_id(piece)
    }

    pub(crate) fn id_to_piece(&self, id: u32) -> Option<String> {
        self.tok.id_to_token(id)
    }

    pub(crate) fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub(crate) fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }
}
