//! GPT-2 style byte-level BPE as llama.cpp does it (`llm_tokenizer_bpe`): split the text
//! with the pre-tokenizer regexes of `tokenizer.ggml.pre`, map each piece's bytes to the
//! GPT-2 byte alphabet, then apply merges lowest rank first (ties: leftmost).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use fancy_regex::Regex;

use super::byte_level::byte_level_encode;
use super::vocab::Vocab;

// ---------------------------------------------------------------------------------------
// Pre-tokenizer
// ---------------------------------------------------------------------------------------

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO_RE: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const TEKKEN_RE: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_RE: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE_RE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const DEEPSEEK_LLM_LETTERS_RE: &str = "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼ\u{1FBE}ῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";
const DEEPSEEK3_MAIN_RE: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;

/// Pre-tokenizer settings for one `tokenizer.ggml.pre` value.
struct PreSpec {
    regexes: &'static [&'static str],
    /// Words already in the vocabulary are emitted whole (llama-3 style).
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` before `tokenizer.ggml.add_bos_token` is read.
    add_bos: bool,
}

const fn spec(regexes: &'static [&'static str]) -> PreSpec {
    PreSpec {
        regexes,
        ignore_merges: false,
        add_bos: false,
    }
}

const PRE_DEFAULT: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_RE,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
const PRE_GPT2: &[&str] = &[GPT2_RE];
const PRE_DIGITS_GPT2: &[&str] = &[r"\p{N}", GPT2_RE];
const PRE_LLAMA3: &[&str] = &[LLAMA3_RE];
const PRE_QWEN2: &[&str] = &[QWEN2_RE];
const PRE_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE, r"[0-9][0-9][0-9]"];
const PRE_DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    DEEPSEEK_LLM_LETTERS_RE,
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
];
const PRE_DEEPSEEK_CODER: &[&str] = &[
    "[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
];
const PRE_DEEPSEEK3: &[&str] = &[r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3_MAIN_RE];
const PRE_PORO: &[&str] = &[PORO_RE];
const PRE_VIKING: &[&str] = &[PORO_RE, r"\p{N}"];
const PRE_TEKKEN: &[&str] = &[TEKKEN_RE];
const PRE_GPT4O: &[&str] = &[GPT4O_RE];
const PRE_SEED_CODER: &[&str] = &[SEED_CODER_RE];
const PRE_BAILINGMOE: &[&str] = &[BAILINGMOE_RE];
const PRE_CHAMELEON: &[&str] = &[
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    GPT2_RE,
];

/// `tokenizer.ggml.pre` values understood here, grouped as llama.cpp groups them.
const PRE_TYPES: &[(&[&str], PreSpec)] = &[
    (&["default"], spec(PRE_DEFAULT)),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        PreSpec {
            regexes: PRE_LLAMA3,
            ignore_merges: true,
            add_bos: true,
        },
    ),
    (
        &["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"],
        spec(PRE_LLAMA3),
    ),
    (&["deepseek-llm"], spec(PRE_DEEPSEEK_LLM)),
    (&["deepseek-coder"], spec(PRE_DEEPSEEK_CODER)),
    (
        &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        spec(PRE_DEEPSEEK3),
    ),
    (&["falcon"], spec(PRE_FALCON)),
    (
        &[
            "gpt-2",
            "gpt2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ],
        spec(PRE_GPT2),
    ),
    (
        &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        spec(PRE_DIGITS_GPT2),
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        spec(PRE_QWEN2),
    ),
    (&["poro-chat", "bloom", "gpt3-finnish"], spec(PRE_PORO)),
    (&["viking"], spec(PRE_VIKING)),
    (
        &["tekken"],
        PreSpec {
            regexes: PRE_TEKKEN,
            ignore_merges: true,
            add_bos: true,
        },
    ),
    (
        &["chameleon"],
        PreSpec {
            regexes: PRE_CHAMELEON,
            ignore_merges: false,
            add_bos: true,
        },
    ),
    (&["gpt-4o", "llama4", "kanana2", "talkie"], spec(PRE_GPT4O)),
    (&["seed-coder"], spec(PRE_SEED_CODER)),
    (
        &["bailingmoe", "bailingmoe2", "llada-moe"],
        spec(PRE_BAILINGMOE),
    ),
];

fn find_pre(name: &str) -> Option<&'static PreSpec> {
    PRE_TYPES
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|(_, s)| s)
}

/// All `tokenizer.ggml.pre` values this module understands.
pub fn known_pre_types() -> Vec<&'static str> {
    PRE_TYPES
        .iter()
        .flat_map(|(names, _)| names.iter().copied())
        .collect()
}

/// A sequence of split regexes: each one splits the pieces produced by the previous one,
/// keeping both the matches and the text between them.
#[derive(Debug, Clone)]
pub(crate) struct PreTokenizer {
    name: String,
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    /// The patterns are the fixed ones of `PRE_TYPES`, so each is compiled once per process
    /// and cloned after (a clone shares the compiled program): compiling the lookaround
    /// patterns costs about a millisecond, paid by every tokenizer built (tests, fuzzing,
    /// tools that load several vocabularies).
    fn compile(name: &str, patterns: &[&'static str]) -> Result<Self> {
        static COMPILED: OnceLock<Mutex<HashMap<&'static str, Regex>>> = OnceLock::new();
        let cache = COMPILED.get_or_init(Default::default);
        let regexes = patterns
            .iter()
            .map(|&p| {
                if let Some(re) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(p) {
                    return Ok(re.clone());
                }
                let re = Regex::new(p)
                    .with_context(|| format!("compiling pre-tokenizer regex {p:?} for {name:?}"))?;
                cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(p, re.clone());
                Ok(re)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: name.to_string(),
            regexes,
        })
    }

    pub(crate) fn split<'a>(&self, text: &'a str) -> Result<Vec<&'a str>> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    let m = m.map_err(|e| {
                        anyhow!("pre-tokenizer {:?}: regex matching failed: {e}", self.name)
                    })?;
                    if m.start() == m.end() {
                        continue;
                    }
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    next.push(m.as_str());
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        Ok(pieces)
    }
}

// ---------------------------------------------------------------------------------------
// BPE model
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
pub(crate) struct BpeModel {
    /// (left id, right id) → (rank, id of the merged text if it is in the vocabulary).
    merges: HashMap<(u32, u32), (u32, Option<u32>)>,
    pre: PreTokenizer,
    ignore_merges: bool,
    pub(crate) pre_add_bos: bool,
}

impl BpeModel {
    /// `pre`: the `tokenizer.ggml.pre` value (`None` means llama.cpp's "default").
    pub(crate) fn new(vocab: &Vocab, merges: &[String], pre: Option<&str>) -> Result<Self> {
        let pre_name = pre.unwrap_or("default");
        let spec = find_pre(pre_name).ok_or_else(|| {
            anyhow!(
                "unknown pre-tokenizer type (tokenizer.ggml.pre) {pre_name:?}; known types: {}",
                known_pre_types().join(", ")
            )
        })?;
        let pre_tok = PreTokenizer::compile(pre_name, spec.regexes)?;

        let mut map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let space = m.as_bytes().iter().skip(1).position(|&b| b == b' ');
            let Some(pos) = space.map(|p| p + 1) else {
                bail!("BPE merge #{rank} {m:?} has no space separating its two parts");
            };
            let (a, b) = (&m[..pos], &m[pos + 1..]);
            let id_of = |part: &str| {
                vocab.token_to_id.get(part).copied().ok_or_else(|| {
                    anyhow!("BPE merge #{rank} {m:?} refers to unknown token {part:?}")
                })
            };
            let (ia, ib) = (id_of(a)?, id_of(b)?);
            let merged = vocab.token_to_id.get(&format!("{a}{b}")).copied();
            map.entry((ia, ib)).or_insert((rank as u32, merged));
        }
        Ok(Self {
            merges: map,
            pre: pre_tok,
            ignore_merges: spec.ignore_merges,
            pre_add_bos: spec.add_bos,
        })
    }

    /// Tokenize raw text (no special tokens in it), appending ids to `out`.
    pub(crate) fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<()> {
        for word in self.pre.split(text)? {
            self.tokenize_word(vocab, &byte_level_encode(word), out);
        }
        Ok(())
    }

    fn tokenize_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = vocab.token_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(word.len());
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            syms.push(Symbol {
                start,
                len,
                id: vocab.token_to_id.get(&word[start..start + len]).copied(),
                prev: i as isize - 1,
                next: i as isize + 1,
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = -1;
        }

        let mut queue = BinaryHeap::new();
        let add = |syms: &[Symbol], queue: &mut BinaryHeap<Bigram>, l: isize, r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (&syms[l as usize], &syms[r as usize]);
            let (Some(a), Some(b)) = (ls.id, rs.id) else {
                return;
            };
            if let Some(&(rank, merged)) = self.merges.get(&(a, b)) {
                queue.push(Bigram {
                    rank,
                    left: l as usize,
                    right: r as usize,
                    size: ls.len + rs.len,
                    merged,
                });
            }
        };
        for i in 1..syms.len() as isize {
            add(&syms, &mut queue, i - 1, i);
        }

        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue; // outdated
            }
            syms[l].len += syms[r].len;
            syms[l].id = b.merged;
            syms[r].len = 0;
            let next = syms[r].next;
            syms[l].next = next;
            if next >= 0 {
                syms[next as usize].prev = l as isize;
            }
            let prev = syms[l].prev;
            add(&syms, &mut queue, prev, l as isize);
            add(&syms, &mut queue, l as isize, next);
        }

        let mut i = 0isize;
        while i >= 0 {
            let s = &syms[i as usize];
            match s.id {
                Some(id) => out.push(id),
                None => {
                    // Not in the vocabulary: llama.cpp looks up every byte on its own,
                    // which can only succeed for ASCII.
                    for &b in &word.as_bytes()[s.start..s.start + s.len] {
                        if b.is_ascii() {
                            if let Some(&id) =
                                vocab.token_to_id.get((b as char).to_string().as_str())
                            {
                                out.push(id);
                            }
                        }
                    }
                }
            }
            i = s.next;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    id: Option<u32>,
    prev: isize,
    next: isize,
}

#[derive(Debug)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    size: usize,
    merged: Option<u32>,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: lowest rank first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.left.cmp(&self.left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        let spec = find_pre(pre).unwrap();
        let p = PreTokenizer::compile(pre, spec.regexes).unwrap();
        p.split(text)
            .unwrap()
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn gpt2_split() {
        assert_eq!(
            split("gpt-2", "Hello, y'all!  How\n  are 123"),
            vec!["Hello", ",", " y", "'", "all", "!", " ", " How", "\n ", " are", " 123"]
        );
    }

    #[test]
    fn smollm_splits_digits_first() {
        assert_eq!(
            split("smollm", "a 1234b"),
            vec!["a", " ", "1", "2", "3", "4", "b"]
        );
    }

    #[test]
    fn default_split_is_llama_cpp_default() {
        assert_eq!(
            split("default", "a ,b 12345"),
            vec!["a", " ", ",", "b", " ", "123", "45"]
        );
        assert_eq!(split("gpt-2", "a ,b 12345"), vec!["a", " ,", "b", " 12345"]);
    }

    #[test]
    fn llama3_split() {
        assert_eq!(
            split("llama3", "I'VE 12345 words\n\n"),
            vec!["I", "'VE", " ", "123", "45", " words", "\n\n"]
        );
    }

    #[test]
    fn every_known_pre_type_compiles() {
        for (names, spec) in PRE_TYPES {
            PreTokenizer::compile(names[0], spec.regexes).unwrap();
        }
        assert!(find_pre("no-such-pre").is_none());
    }
}
