//! The evaluation set: needles, where they go, and the exact prompt token ids.
//!
//! A needle is LWM's sentence `"\nThe special magic {city} number is: {7 digits}\n"`.
//! A cell of context length `L` is a prompt of exactly `L - answer_tokens` tokens: the chat
//! format's prefix, the document (haystack tokens with the needles spliced in), and the
//! question suffix. Everything is assembled in token-id space with the model's tokenizer,
//! so the counts are exact and two cells from the same haystack share a token-identical
//! prefix up to their first needle (which the runner exploits to reuse KV).
//!
//! A needle at depth `d` goes at `int(n * d / 100)` of the `n` haystack tokens, moved back
//! to just after the previous period token (depth 100 appends), as in LWM's eval_needle.py.

use super::haystack::Haystack;
use anyhow::{bail, Context, Result};
use lwm_core::rng::XorShift;
use lwm_core::tokenizer::Tokenizer;
use lwm_engine::chat_template::{ChatMessage, ChatTemplate};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

/// Cities the needles are named after (unique: LWM's list repeats names, which silently
/// dropped needles in its multi-needle eval).
pub const CITIES: &[&str] = &[
    "Chicago",
    "Yangon",
    "Antananarivo",
    "Colombo",
    "Almaty",
    "Sydney",
    "Mexico City",
    "Seattle",
    "Lagos",
    "Amsterdam",
    "Belgrade",
    "Cairo",
    "Baghdad",
    "Damascus",
    "Kigali",
    "Dakar",
    "Sofia",
    "Victoria",
    "Tashkent",
    "Mumbai",
    "Barcelona",
    "Havana",
    "Kathmandu",
    "Helsinki",
    "Lima",
    "Oslo",
    "Jakarta",
    "Dublin",
    "Rome",
    "Toronto",
    "Montevideo",
    "Nairobi",
    "Lisbon",
    "Santiago",
    "Bangkok",
    "Istanbul",
    "Seoul",
    "Hanoi",
    "Quito",
    "Warsaw",
    "Prague",
    "Vienna",
    "Budapest",
    "Athens",
    "Riyadh",
    "Manila",
    "Bogota",
    "Caracas",
    "Accra",
    "Addis Ababa",
    "Dhaka",
    "Karachi",
    "Tehran",
    "Kabul",
    "Ulaanbaatar",
    "Vancouver",
    "Melbourne",
    "Auckland",
    "Reykjavik",
    "Copenhagen",
    "Stockholm",
    "Zurich",
    "Brussels",
    "Edinburgh",
    "Marrakesh",
    "Tunis",
    "Luanda",
    "Kinshasa",
    "Osaka",
];

/// Instruction after the question, single needle (eval_needle.py).
pub const SINGLE_INSTRUCTION: &str =
    "Don't give information outside the document or repeat your findings. Keep your response short and direct.";
/// Instruction after the question, multi needle (eval_needle_multi.py).
pub const MULTI_INSTRUCTION: &str = "Don't give information outside the document.";

/// The grid and the randomness of a set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetParams {
    pub context_lengths: Vec<usize>,
    pub depths: Vec<u32>,
    /// Needles per prompt (N).
    pub needles: usize,
    /// Needles asked for (R <= N).
    pub retrieve: usize,
    /// Prompts per cell, each over a different stretch of the haystack.
    pub samples: usize,
    pub seed: u64,
    /// Tokens left free for the answer: a prompt has `context_length - answer_tokens` tokens.
    pub answer_tokens: usize,
    pub haystack: String,
}

impl SetParams {
    pub fn validate(&self) -> Result<()> {
        if self.context_lengths.is_empty() {
            bail!("--context-lengths is empty");
        }
        if self.depths.is_empty() {
            bail!("--depths is empty");
        }
        if let Some(d) = self.depths.iter().find(|&&d| d > 100) {
            bail!("depth {d} is outside 0..=100 (depths are percentages)");
        }
        if self.needles == 0 {
            bail!("--needles must be at least 1");
        }
        if self.retrieve == 0 || self.retrieve > self.needles {
            bail!(
                "--retrieve must be between 1 and --needles ({}), got {}",
                self.needles,
                self.retrieve
            );
        }
        if self.needles > 1 && self.needles > self.depths.len() {
            bail!(
                "{} needles need as many distinct depths, but only {} were given",
                self.needles,
                self.depths.len()
            );
        }
        if self.needles > CITIES.len() {
            bail!("at most {} needles (one per city)", CITIES.len());
        }
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if self.answer_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        Ok(())
    }

    pub fn is_multi(&self) -> bool {
        self.needles > 1
    }
}

/// First line of a set file: what it was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetHeader {
    pub needle_set: SetParams,
    /// `lwm` or `model` (the model's own chat template).
    pub chat_format: String,
    pub model: String,
    pub vocab_size: usize,
    /// Token ids of a fixed probe sentence: a set only runs with the tokenizer it was cut with.
    pub tokenizer_probe: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Needle {
    pub city: String,
    pub number: u32,
    pub depth_percent: u32,
    /// Where the needle's first token sits in the document.
    pub token_offset: usize,
    /// Whether the question asks for it.
    pub retrieve: bool,
}

/// One prompt of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeedleCase {
    pub id: String,
    pub context_length: usize,
    pub sample: usize,
    /// The cell's depth (single needle); multi-needle prompts carry one depth per needle.
    pub depth_percent: Option<u32>,
    pub needles: Vec<Needle>,
    pub question: String,
    /// First haystack token of this sample's stretch.
    pub haystack_start: usize,
    /// Tokens of the chat-format prefix before the document.
    pub prefix_tokens: usize,
    pub document_tokens: usize,
    pub prompt_tokens: usize,
    /// The prompt decoded (for reading; `prompt_ids` is what runs).
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
}

/// A whole set: header plus cases in grid order.
#[derive(Debug, Clone, PartialEq)]
pub struct NeedleSet {
    pub header: SetHeader,
    pub cases: Vec<NeedleCase>,
}

/// Encode `text` as it tokenizes in the middle of a document: no BOS, no special tokens
/// parsed (unless `special`), and no SentencePiece dummy prefix (the text is encoded after
/// a newline, whose tokens are then dropped).
pub fn encode_segment(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>> {
    let lead = tok.encode("\n", false, false)?;
    let ids = tok.encode(&format!("\n{text}"), false, special)?;
    if !lead.is_empty() && ids.starts_with(&lead) {
        return Ok(ids[lead.len()..].to_vec());
    }
    tok.encode(text, false, special)
}

pub fn needle_sentence(city: &str, number: u32) -> String {
    format!("\nThe special magic {city} number is: {number}\n")
}

/// The question: LWM's single-needle wording for one needle, its multi-needle wording for
/// several.
pub fn question(cities: &[&str], multi: bool) -> String {
    match (cities, multi) {
        ([one], false) => format!("What is the special magic {one} number?"),
        ([one], true) => format!("What is the special magic number for {one}?"),
        ([a, b], _) => format!("What are the special magic numbers for {a} and {b}?"),
        (many, _) => {
            let (last, rest) = many.split_last().expect("at least one city");
            format!(
                "What are the special magic numbers for {}, and {last}?",
                rest.join(", ")
            )
        }
    }
}

pub fn tokenizer_probe(tok: &Tokenizer) -> Result<Vec<u32>> {
    encode_segment(tok, "The special magic Tokyo number is: 1234567.", false)
}

/// How a prompt wraps the document: `prefix + document + " " + question + instruction +
/// suffix`, in token ids.
pub struct PromptFormat<'a> {
    pub name: &'static str,
    template: &'a ChatTemplate,
    tokenizer: &'a Tokenizer,
}

const DOCUMENT_MARK: &str = "@@NEEDLE_DOCUMENT@@";

impl<'a> PromptFormat<'a> {
    pub fn new(template: Option<&'a ChatTemplate>, tokenizer: &'a Tokenizer) -> Result<Self> {
        let template = template.context(
            "this model has no chat template; pass --chat-format lwm (LWM's format) to evaluate it",
        )?;
        let name = match template {
            ChatTemplate::Lwm => "lwm",
            ChatTemplate::Jinja { .. } => "model",
        };
        Ok(Self {
            name,
            template,
            tokenizer,
        })
    }

    /// (prefix ids, suffix ids) around the document for `question`.
    pub fn parts(&self, question: &str, multi: bool) -> Result<(Vec<u32>, Vec<u32>)> {
        let instruction = if multi {
            MULTI_INSTRUCTION
        } else {
            SINGLE_INSTRUCTION
        };
        let tok = self.tokenizer;
        match self.template {
            // eval_needle.py: "You are a helpful assistant. USER: {context} {question}
            // {instruction} ASSISTANT: " (trailing space), one BOS.
            ChatTemplate::Lwm => {
                let prefix = tok.encode(
                    "You are a helpful assistant. USER:",
                    tok.bos_id().is_some(),
                    false,
                )?;
                let suffix = encode_segment(
                    tok,
                    &format!(" {question} {instruction} ASSISTANT: "),
                    false,
                )?;
                Ok((prefix, suffix))
            }
            ChatTemplate::Jinja { .. } => {
                let content = format!("{DOCUMENT_MARK} {question} {instruction}");
                let text = self.template.render(&[ChatMessage::user(content)], true)?;
                let at = text
                    .find(DOCUMENT_MARK)
                    .context("the chat template dropped the user's message")?;
                // Jinja templates write BOS themselves when they want one.
                let prefix = tok.encode(&text[..at], false, true)?;
                let suffix = encode_segment(tok, &text[at + DOCUMENT_MARK.len()..], true)?;
                Ok((prefix, suffix))
            }
        }
    }
}

fn is_period(tok: &Tokenizer, id: u32) -> bool {
    tok.token_bytes(id).trim_ascii_end().ends_with(b".")
}

/// Insertion point for depth `d` in `body`: `int(n * d / 100)`, moved back to just after the
/// previous period token; depth 100 appends.
pub fn insertion_point(tok: &Tokenizer, body: &[u32], depth: u32) -> usize {
    let n = body.len();
    if depth >= 100 {
        return n;
    }
    let mut p = n * depth as usize / 100;
    while p > 0 && !is_period(tok, body[p - 1]) {
        p -= 1;
    }
    p
}

/// A per-cell generator: the same (seed, length, depth, sample) always draws the same
/// needles, whatever else is in the grid.
fn cell_rng(seed: u64, parts: &[u64]) -> XorShift {
    let mut h = seed ^ 0x6A09_E667_F3BC_C908;
    for &p in parts {
        h = (h ^ p).wrapping_mul(0x1000_0000_01B3).rotate_left(29);
    }
    XorShift::new(h)
}

fn draw_number(rng: &mut XorShift) -> u32 {
    1_000_000 + (rng.next_u64() % 9_000_000) as u32
}

/// Draw `k` distinct indices below `n` (partial Fisher-Yates).
fn draw_distinct(rng: &mut XorShift, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

/// Build the set. `model` is recorded in the header only.
pub fn create_set(
    params: &SetParams,
    haystack: &Haystack,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    model: &str,
) -> Result<NeedleSet> {
    params.validate()?;
    let format = PromptFormat::new(template, tokenizer)?;
    let hay = encode_segment(tokenizer, &haystack.text, false)?;
    let max_len = *params.context_lengths.iter().max().expect("validated");
    let multi = params.is_multi();
    let mut cases = Vec::new();
    for sample in 0..params.samples {
        // Each sample reads its own stretch of the haystack, starting at a sentence.
        let mut rng = cell_rng(params.seed, &[0x5A, sample as u64]);
        let room = hay.len().saturating_sub(max_len);
        let mut start = if room == 0 {
            0
        } else {
            (rng.next_u64() % room as u64) as usize
        };
        while start > 0 && !is_period(tokenizer, hay[start - 1]) {
            start -= 1;
        }
        for &length in &params.context_lengths {
            let depth_cells: Vec<Option<u32>> = if multi {
                vec![None]
            } else {
                params.depths.iter().map(|&d| Some(d)).collect()
            };
            for depth in depth_cells {
                let mut rng = cell_rng(
                    params.seed,
                    &[
                        length as u64,
                        depth.map_or(u64::MAX, u64::from),
                        sample as u64,
                    ],
                );
                let cities: Vec<&str> = draw_distinct(&mut rng, CITIES.len(), params.needles)
                    .into_iter()
                    .map(|i| CITIES[i])
                    .collect();
                let depths: Vec<u32> = match depth {
                    Some(d) => vec![d],
                    None => draw_distinct(&mut rng, params.depths.len(), params.needles)
                        .into_iter()
                        .map(|i| params.depths[i])
                        .collect(),
                };
                let numbers: Vec<u32> =
                    (0..params.needles).map(|_| draw_number(&mut rng)).collect();
                let mut asked: Vec<usize> = if params.retrieve == params.needles {
                    (0..params.needles).collect()
                } else {
                    draw_distinct(&mut rng, params.needles, params.retrieve)
                };
                asked.sort_unstable();
                let asked_cities: Vec<&str> = asked.iter().map(|&i| cities[i]).collect();
                let q = question(&asked_cities, multi);
                let (prefix, suffix) = format.parts(&q, multi)?;
                let needle_ids: Vec<Vec<u32>> = (0..params.needles)
                    .map(|i| {
                        encode_segment(tokenizer, &needle_sentence(cities[i], numbers[i]), false)
                    })
                    .collect::<Result<_>>()?;
                let needle_total: usize = needle_ids.iter().map(|n| n.len()).sum();
                let fixed = prefix.len() + suffix.len() + needle_total + params.answer_tokens;
                if fixed >= length {
                    bail!(
                        "context length {length} is too short: the prompt's fixed parts (format, question, needles) and {} answer tokens already take {fixed} tokens",
                        params.answer_tokens
                    );
                }
                let n_hay = length - fixed;
                if start + n_hay > hay.len() {
                    bail!(
                        "the haystack ({}) has {} tokens, but context length {length} needs {n_hay} haystack tokens from token {start}; give a longer --haystack",
                        haystack.name,
                        hay.len()
                    );
                }
                let body = &hay[start..start + n_hay];
                // Insertion points in haystack coordinates, then splice in ascending order.
                let mut order: Vec<(usize, usize)> = (0..params.needles)
                    .map(|i| (insertion_point(tokenizer, body, depths[i]), i))
                    .collect();
                order.sort_unstable();
                let mut document = Vec::with_capacity(n_hay + needle_total);
                let mut offsets = vec![0usize; params.needles];
                let mut cursor = 0;
                for &(p, i) in &order {
                    document.extend_from_slice(&body[cursor..p]);
                    offsets[i] = document.len();
                    document.extend_from_slice(&needle_ids[i]);
                    cursor = p;
                }
                document.extend_from_slice(&body[cursor..]);
                let mut prompt_ids = prefix.clone();
                prompt_ids.extend_from_slice(&document);
                prompt_ids.extend_from_slice(&suffix);
                debug_assert_eq!(prompt_ids.len(), length - params.answer_tokens);
                let needles = (0..params.needles)
                    .map(|i| Needle {
                        city: cities[i].to_string(),
                        number: numbers[i],
                        depth_percent: depths[i],
                        token_offset: offsets[i],
                        retrieve: asked.contains(&i),
                    })
                    .collect();
                let id = match depth {
                    Some(d) => format!("L{length}-d{d}-s{sample}"),
                    None => format!("L{length}-s{sample}"),
                };
                cases.push(NeedleCase {
                    id,
                    context_length: length,
                    sample,
                    depth_percent: depth,
                    needles,
                    question: q,
                    haystack_start: start,
                    prefix_tokens: prefix.len(),
                    document_tokens: document.len(),
                    prompt_tokens: prompt_ids.len(),
                    prompt: tokenizer.decode(&prompt_ids, false),
                    prompt_ids,
                });
            }
        }
    }
    Ok(NeedleSet {
        header: SetHeader {
            needle_set: params.clone(),
            chat_format: format.name.to_string(),
            model: model.to_string(),
            vocab_size: tokenizer.vocab_size(),
            tokenizer_probe: tokenizer_probe(tokenizer)?,
        },
        cases,
    })
}

impl NeedleSet {
    /// JSONL: the header line, then one case per line.
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("jsonl.tmp");
        {
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut w = std::io::BufWriter::new(f);
            serde_json::to_writer(&mut w, &self.header)?;
            w.write_all(b"\n")?;
            for c in &self.cases {
                serde_json::to_writer(&mut w, c)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn read(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path)
            .with_context(|| format!("cannot open needle set {}", path.display()))?;
        let mut lines = std::io::BufReader::new(f).lines();
        let first = lines
            .next()
            .transpose()?
            .with_context(|| format!("needle set {} is empty", path.display()))?;
        let header: SetHeader = serde_json::from_str(&first).with_context(|| {
            format!(
                "{} line 1 is not a needle-set header (made by `lwm needle create`?)",
                path.display()
            )
        })?;
        let mut cases = Vec::new();
        for (i, line) in lines.enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            cases.push(serde_json::from_str(&line).with_context(|| {
                format!(
                    "{} line {} is not a valid needle case",
                    path.display(),
                    i + 2
                )
            })?);
        }
        Ok(Self { header, cases })
    }

    /// Refuse to run a set cut with another tokenizer or chat format.
    pub fn check_compatible(&self, tokenizer: &Tokenizer, format: &PromptFormat) -> Result<()> {
        let probe = tokenizer_probe(tokenizer)?;
        if self.header.vocab_size != tokenizer.vocab_size() || self.header.tokenizer_probe != probe
        {
            bail!(
                "this needle set was cut with another tokenizer (made for {}, vocabulary {} vs this model's {}); create it again with this --model",
                self.header.model,
                self.header.vocab_size,
                tokenizer.vocab_size()
            );
        }
        if self.header.chat_format != format.name {
            bail!(
                "this needle set uses the `{}` chat format but the model runs `{}`; pass --chat-format {} or create the set again",
                self.header.chat_format,
                format.name,
                self.header.chat_format
            );
        }
        Ok(())
    }
}
