//! Generating RULER's synthetic samples: the same templates, needles, haystacks, chains,
//! word lists and answers as RULER's `scripts/data/synthetic/*.py` for the same settings,
//! drawn from our own seeded generator, each prompt grown to the largest haystack whose
//! tokens (the model's tokenizer and chat format) plus the answer budget fit the length.
//!
//! Where lwm differs from RULER, and why: the essay haystack is the evaluation's prose
//! (by default the bundled public-domain KJV text, not Paul Graham's essays, which cannot
//! be redistributed); word keys and the common-words list are drawn from that prose's
//! vocabulary (RULER: wonderwords' adjective, noun and verb lists); sentences are split at
//! `.`, `!` or `?` before a space (RULER: nltk's punkt); each sample's haystack size is
//! searched for that sample (RULER searches once per task, then steps down per sample).

use super::tasks::{Draw, Haystack, Kind, QaDataset, Task};
use anyhow::{bail, Context, Result};
use lwm_core::rng::XorShift;
use lwm_core::tokenizer::Tokenizer;
use lwm_engine::chat_template::{ChatMessage, ChatTemplate};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One prompt in RULER's file format (`index`, `input`, `outputs`, `length`,
/// `answer_prefix`), plus where it belongs in the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// `task/context_length/index`: unique in a run.
    pub id: String,
    pub task: String,
    /// The length it was cut for (RULER's max_seq_length).
    pub context_length: usize,
    pub index: usize,
    /// The prompt up to the answer prefix, chat format included (as RULER writes it).
    pub input: String,
    pub answer_prefix: String,
    /// The reference answers.
    pub outputs: Vec<String>,
    /// Prompt tokens plus the answer budget (RULER's `length`).
    pub length: usize,
    pub tokens_to_generate: usize,
}

const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// How a prompt wraps the task text: `prefix + task + suffix + answer prefix` (RULER's
/// model templates; for LWM exactly its `lwm-chat`), tokenized with or without BOS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatWrap {
    pub name: String,
    pub prefix: String,
    pub suffix: String,
    pub add_bos: bool,
}

const TASK_MARK: &str = "@@RULER_TASK@@";

impl ChatWrap {
    pub fn new(template: Option<&ChatTemplate>, tok: &Tokenizer) -> Result<Self> {
        Ok(match template {
            // RULER's 'lwm-chat': "You are a helpful assistant. USER: {task_template} ASSISTANT: "
            Some(ChatTemplate::Lwm) => Self {
                name: "lwm-chat".into(),
                prefix: "You are a helpful assistant. USER: ".into(),
                suffix: " ASSISTANT: ".into(),
                add_bos: tok.bos_id().is_some(),
            },
            Some(t @ ChatTemplate::Jinja { .. }) => {
                let text = t.render(&[ChatMessage::user(TASK_MARK)], true)?;
                let at = text
                    .find(TASK_MARK)
                    .context("the chat template dropped the user's message")?;
                // Jinja templates write BOS themselves when they want one.
                Self {
                    name: "model".into(),
                    prefix: text[..at].to_string(),
                    suffix: text[at + TASK_MARK.len()..].to_string(),
                    add_bos: false,
                }
            }
            // RULER's 'base'.
            None => Self {
                name: "base".into(),
                prefix: String::new(),
                suffix: String::new(),
                add_bos: tok.bos_id().is_some(),
            },
        })
    }

    /// RULER's `config['template']`: model template around the task template, then the
    /// answer prefix.
    fn template(&self, task_template: &str, answer_prefix: &str) -> String {
        format!(
            "{}{task_template}{}{answer_prefix}",
            self.prefix, self.suffix
        )
    }

    /// Prompt token ids of `input + answer_prefix`.
    pub fn encode(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        tok.encode(text, self.add_bos, true)
    }
}

/// The random source of one sample: the same (seed, task, length, index) always draws the
/// same sample, whatever else is in the run.
pub fn sample_rng(seed: u64, task: &str, length: usize, index: usize) -> Rng {
    let mut h = seed ^ 0x6A09_E667_F3BC_C908;
    for b in task
        .bytes()
        .map(u64::from)
        .chain([length as u64, index as u64])
    {
        h = (h ^ b).wrapping_mul(0x1000_0000_01B3).rotate_left(29);
    }
    Rng(XorShift::new(h))
}

#[derive(Clone)]
pub struct Rng(XorShift);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in lo..=hi.
    fn int(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.0.next_u64() % (hi - lo + 1)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    /// `k` distinct indices below `n`, in draw order (Python's `random.sample(range(n), k)`).
    fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }

    fn upper_letters(&mut self, k: usize) -> String {
        (0..k)
            .map(|_| (b'A' + self.below(26) as u8) as char)
            .collect()
    }

    fn lower_letters(&mut self, k: usize) -> String {
        (0..k)
            .map(|_| (b'a' + self.below(26) as u8) as char)
            .collect()
    }
}

/// The words the generators draw from, and the essay haystack split into words.
pub struct Material {
    /// Distinct lowercase words of three or more letters, sorted.
    pub vocab: Vec<String>,
    /// The haystack text split at whitespace (RULER: `re.sub(r'\s+', " ", essay).split(" ")`).
    pub essay_words: Vec<String>,
    /// QA questions and documents, per dataset given.
    pub qa: Vec<(QaDataset, QaData)>,
}

impl Material {
    pub fn from_text(text: &str) -> Result<Self> {
        let essay_words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        let vocab: BTreeSet<String> = text
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| w.len() >= 3)
            .map(|w| w.to_ascii_lowercase())
            .collect();
        if vocab.len() < 100 {
            bail!(
                "the haystack has only {} distinct words; RULER's word tasks need a few hundred (give a longer --haystack)",
                vocab.len()
            );
        }
        Ok(Self {
            vocab: vocab.into_iter().collect(),
            essay_words,
            qa: Vec::new(),
        })
    }

    fn draw(&self, rng: &mut Rng, what: Draw) -> String {
        match what {
            Draw::Numbers => rng.int(1_000_000, 9_999_999).to_string(),
            Draw::Words => format!(
                "{}-{}",
                self.vocab[rng.below(self.vocab.len())],
                self.vocab[rng.below(self.vocab.len())]
            ),
            Draw::Uuids => uuid4(rng),
        }
    }

    /// `n` distinct words (when the vocabulary is short, two words joined make more).
    fn distinct_words(&self, rng: &mut Rng, n: usize) -> Vec<String> {
        if n <= self.vocab.len() {
            return rng
                .sample(self.vocab.len(), n)
                .into_iter()
                .map(|i| self.vocab[i].clone())
                .collect();
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let w = format!(
                "{}{}",
                self.vocab[rng.below(self.vocab.len())],
                self.vocab[rng.below(self.vocab.len())]
            );
            if seen.insert(w.clone()) {
                out.push(w);
            }
        }
        out
    }
}

/// `uuid.UUID(int=getrandbits(128), version=4)`.
fn uuid4(rng: &mut Rng) -> String {
    let hi = (rng.0.next_u64() & !0xF000) | 0x4000;
    let lo = (rng.0.next_u64() & !(0xC000 << 48)) | (0x8000 << 48);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFF_FFFF_FFFF
    )
}

/// RULER's needle depths: `np.round(np.linspace(0, 100, 40))`.
fn depths() -> Vec<usize> {
    (0..40)
        .map(|i| (i as f64 * 100.0 / 39.0).round() as usize)
        .collect()
}

/// Split prose into sentences after `.`, `!` or `?` (and closing quotes or brackets)
/// followed by whitespace.
pub fn split_sentences(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if matches!(b[i], b'.' | b'!' | b'?') {
            let mut j = i + 1;
            while j < b.len() && matches!(b[j], b'"' | b'\'' | b')' | b']') {
                j += 1;
            }
            if j < b.len() && b[j].is_ascii_whitespace() {
                let s = text[start..j].trim();
                if !s.is_empty() {
                    out.push(s);
                }
                start = j;
                i = j;
                continue;
            }
        }
        i += 1;
    }
    let s = text[start..].trim();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// Insert `items` into the essay's first `n_words` words at sentence boundaries, at depths
/// drawn from RULER's 40 (niah.py and variable_tracking.py, essay haystack).
fn essay_with(m: &Material, n_words: usize, items: &[String], rng: &mut Rng) -> String {
    let words: Vec<&str> = m
        .essay_words
        .iter()
        .cycle()
        .take(n_words)
        .map(String::as_str)
        .collect();
    let text = words.join(" ");
    let sents = split_sentences(&text);
    let d = depths();
    let mut at: Vec<usize> = rng
        .sample(d.len(), items.len())
        .into_iter()
        .map(|i| sents.len() * d[i] / 100)
        .collect();
    at.sort_unstable();
    let mut bounds = vec![0];
    bounds.extend(at);
    bounds.push(sents.len());
    let mut parts = Vec::new();
    for i in 1..bounds.len() {
        parts.push(sents[bounds[i - 1]..bounds[i]].join(" "));
        if let Some(item) = items.get(i - 1) {
            parts.push(item.clone());
        }
    }
    parts.join(" ")
}

/// A prompt text (model template, task, answer prefix) and its answers, for a haystack of
/// `n` units (words, lines or list entries).
struct Draft {
    text: String,
    outputs: Vec<String>,
}

fn niah(task: &Task, wrap: &ChatWrap, m: &Material, n: usize, rng: &mut Rng) -> Result<Draft> {
    let Kind::Niah {
        haystack,
        key,
        value,
        keys,
        values,
        queries,
    } = task.kind
    else {
        unreachable!("niah() on {}", task.name)
    };
    let keys_n = keys.max(queries);
    let type_v = value.plural();
    let needle = |k: &str, v: &str| format!("One of the special magic {type_v} for {k} is: {v}.");
    let (mut ks, mut vs, mut needles) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..keys_n {
        let k = m.draw(rng, key);
        let mut vals = Vec::new();
        for _ in 0..values {
            let v = m.draw(rng, value);
            needles.push(needle(&k, &v));
            vals.push(v);
        }
        ks.push(k);
        vs.push(vals);
    }
    rng.shuffle(&mut needles);
    let context = match haystack {
        Haystack::Essay => essay_with(m, n, &needles, rng),
        Haystack::Noise | Haystack::Needle => {
            let mut lines: Vec<String> = (0..n)
                .map(|_| match haystack {
                    Haystack::Noise => NOISE.to_string(),
                    _ => needle(&m.draw(rng, key), &m.draw(rng, value)),
                })
                .collect();
            let mut at = rng.sample(n, needles.len());
            at.sort_unstable_by(|a, b| b.cmp(a));
            for (i, nd) in at.into_iter().zip(&needles) {
                lines.insert(i, nd.clone());
            }
            lines.join("\n")
        }
    };
    let asked = rng.sample(keys_n, queries);
    let qs: Vec<&str> = asked.iter().map(|&i| ks[i].as_str()).collect();
    let outputs: Vec<String> = asked.iter().flat_map(|&i| vs[i].clone()).collect();
    let query = match qs.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{}, and {last}", rest.join(", ")),
        _ => qs[0].to_string(),
    };
    let (tt, ap) = task.template();
    let mut template = wrap.template(tt, ap);
    let mut type_v = type_v.to_string();
    if queries * values == 1 {
        // RULER's singular wording, applied to the whole template as it does.
        template = template
            .replace("Some", "A")
            .replace("are all", "is")
            .replace("are", "is")
            .replace("answers", "answer");
        type_v.pop();
    }
    let text = template
        .replace("{type_needle_v}", &type_v)
        .replace("{query}", &query)
        .replace("{context}", &context);
    Ok(Draft { text, outputs })
}

/// Variable chains `VAR A = 12345`, `VAR B = VAR A `, ... hidden among noise lines
/// (variable_tracking.py, noise haystack); returns the chains' variables and the text.
fn vt_context(
    n: usize,
    chains: usize,
    hops: usize,
    icl: bool,
    rng: &mut Rng,
) -> (Vec<Vec<String>>, String, String) {
    let k = if icl { 3 } else { 5 };
    let mut names: Vec<String> = Vec::new();
    while names.len() < chains * (hops + 1) {
        let v = rng.upper_letters(k);
        if !names.contains(&v) {
            names.push(v);
        }
    }
    let mut vars = Vec::new();
    let mut lines: Vec<String> = vec![NOISE.to_string(); n];
    let mut value = String::new();
    for c in 0..chains {
        let these = names[c * (hops + 1)..(c + 1) * (hops + 1)].to_vec();
        let v = rng.int(10_000, 99_998).to_string();
        if c == 0 {
            value = v.clone();
        }
        let mut chain = vec![format!("VAR {} = {v}", these[0])];
        for j in 0..hops {
            chain.push(format!("VAR {} = VAR {} ", these[j + 1], these[j]));
        }
        let mut at = rng.sample(lines.len(), chain.len());
        at.sort_unstable();
        for (j, (p, line)) in at.into_iter().zip(chain).enumerate() {
            lines.insert(p + j, line);
        }
        vars.push(these);
    }
    let context = lines.join("\n").replace(". \n", ".\n");
    (vars, context, value)
}

/// The one worked example RULER puts before the variable-tracking task: the task
/// template alone (no model template) over at most 500 tokens of noise, with 3-letter
/// names, its answer after it.
fn vt_example(task: &Task, tok: &Tokenizer, rng: &mut Rng) -> Result<String> {
    let Kind::VariableTracking { chains, hops } = task.kind else {
        unreachable!("vt_example() on {}", task.name)
    };
    let (tt, ap) = task.template();
    let bare = format!("{tt}{ap}");
    let hops = hops.min(10);
    let draw = |n: usize, rng: &Rng| {
        let mut r = rng.clone();
        let (vars, ctx, value) = vt_context(n, chains, hops, true, &mut r);
        (vt_fill(&bare, hops, &ctx, &value), vars)
    };
    let (mut a, mut b) = (5usize, 500usize);
    let mut best = draw(5, rng);
    while a <= b {
        let mid = a + (b - a) / 2;
        let d = draw(mid, rng);
        if tok.encode(&d.0, false, true)?.len() <= 500 {
            best = d;
            a = mid + 1;
        } else {
            b = mid - 1;
        }
    }
    Ok(format!("{} {}\n", best.0, best.1[0].join(" ")))
}

fn vt_fill(template: &str, hops: usize, context: &str, value: &str) -> String {
    template
        .replace("{num_v}", &(hops + 1).to_string())
        .replace("{query}", value)
        .replace("{context}", context)
}

fn vt(task: &Task, wrap: &ChatWrap, example: &str, n: usize, rng: &mut Rng) -> Result<Draft> {
    let Kind::VariableTracking { chains, hops } = task.kind else {
        unreachable!("vt() on {}", task.name)
    };
    let (tt, ap) = task.template();
    let (vars, ctx, value) = vt_context(n, chains, hops, false, rng);
    let input = vt_fill(&wrap.template(tt, ap), hops, &ctx, &value);
    // The example goes between the model template and the task text.
    let cut = input
        .find(&tt[..20])
        .context("the chat format dropped the task text")?;
    let text = format!("{}{example}\n{}", &input[..cut], &input[cut..]);
    Ok(Draft {
        text,
        outputs: vars[0].clone(),
    })
}

fn numbered(words: &[String]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

fn cwe(
    task: &Task,
    wrap: &ChatWrap,
    m: &Material,
    n: usize,
    short: bool,
    rng: &mut Rng,
) -> Result<Draft> {
    let Kind::CommonWords {
        freq_common,
        freq_uncommon,
        common,
    } = task.kind
    else {
        unreachable!("cwe() on {}", task.name)
    };
    let (tt, ap) = task.template();
    let template = wrap.template(tt, ap);
    let example = |rng: &mut Rng, words: usize, cr: usize, ur: usize| {
        let all = m.distinct_words(rng, words.max(common));
        let (c, u) = all.split_at(common);
        let mut list: Vec<String> = Vec::new();
        for _ in 0..cr {
            list.extend(c.iter().cloned());
        }
        for _ in 0..ur {
            list.extend(u.iter().cloned());
        }
        rng.shuffle(&mut list);
        (numbered(&list), c.to_vec())
    };
    // RULER: below 4096 tokens a lighter list (6x/1x) and a smaller example.
    let ((ex_ctx, ex_ans), (ctx, ans)) = if short {
        (example(rng, 20, 3, 1), example(rng, n, 6, 1))
    } else {
        (
            example(rng, 40, 10, 3),
            example(rng, n, freq_common, freq_uncommon),
        )
    };
    let shot = format!(
        "{} {}",
        template
            .replace("{context}", &ex_ctx)
            .replace("{query}", ""),
        numbered(&ex_ans)
    );
    let text = format!(
        "{shot}\n{}",
        template.replace("{query}", "").replace("{context}", &ctx)
    );
    Ok(Draft { text, outputs: ans })
}

/// Riemann zeta for alpha > 1: the partial sum, then the Euler-Maclaurin tail.
fn zeta(alpha: f64) -> f64 {
    let n = 10_000usize;
    let s: f64 = (1..n).map(|k| (k as f64).powf(-alpha)).sum();
    let nf = n as f64;
    s + nf.powf(1.0 - alpha) / (alpha - 1.0) + 0.5 * nf.powf(-alpha)
}

fn fwe(task: &Task, wrap: &ChatWrap, vocab_size: usize, n: usize, rng: &mut Rng) -> Result<Draft> {
    let Kind::FrequentWords { alpha } = task.kind else {
        unreachable!("fwe() on {}", task.name)
    };
    let (tt, ap) = task.template();
    let mut set = BTreeSet::new();
    while set.len() < vocab_size {
        set.insert(rng.lower_letters(6));
    }
    let mut vocab: Vec<String> = set.into_iter().collect();
    rng.shuffle(&mut vocab);
    // The most frequent rank is noise: the dots the question says to ignore.
    vocab[0] = "...".to_string();
    let z = zeta(alpha);
    let mut words: Vec<&str> = Vec::new();
    for (k, w) in vocab.iter().enumerate() {
        let count = (n as f64 * ((k + 1) as f64).powf(-alpha) / z) as usize;
        words.extend(std::iter::repeat_n(w.as_str(), count));
    }
    rng.shuffle(&mut words);
    let text = wrap
        .template(tt, ap)
        .replace("{query}", "")
        .replace("{context}", &words.join(" "));
    Ok(Draft {
        text,
        outputs: vocab[1..4].to_vec(),
    })
}

/// One QA question: its answers, the documents that hold them, and (SQuAD) the other
/// paragraphs of the same article, which RULER adds first as distractors.
#[derive(Debug, Clone)]
pub struct QaItem {
    pub query: String,
    pub outputs: Vec<String>,
    pub context: Vec<usize>,
    pub more_context: Vec<usize>,
}

/// A QA dataset as RULER reads it (qa.py): the distinct documents, sorted, and the
/// answerable questions in file order.
#[derive(Debug, Clone, Default)]
pub struct QaData {
    pub qas: Vec<QaItem>,
    pub docs: Vec<String>,
}

impl QaData {
    pub fn read(path: &std::path::Path, dataset: QaDataset) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read QA file {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let d = match dataset {
            QaDataset::Squad => Self::squad(&v),
            QaDataset::HotpotQa => Self::hotpotqa(&v),
        }
        .with_context(|| {
            format!(
                "{} is not a {} file",
                path.display(),
                match dataset {
                    QaDataset::Squad => "SQuAD v2 (data/paragraphs/qas)",
                    QaDataset::HotpotQa => "HotpotQA (question/answer/context)",
                }
            )
        })?;
        if d.qas.is_empty() {
            bail!("{} holds no answerable question", path.display());
        }
        Ok(d)
    }

    fn index(docs: Vec<String>) -> (Vec<String>, std::collections::HashMap<String, usize>) {
        let set: BTreeSet<String> = docs.into_iter().collect();
        let docs: Vec<String> = set.into_iter().collect();
        let at = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.clone(), i))
            .collect();
        (docs, at)
    }

    fn squad(v: &serde_json::Value) -> Option<Self> {
        let data = v.get("data")?.as_array()?;
        let para = |p: &serde_json::Value| p.get("context")?.as_str().map(str::to_string);
        let mut all = Vec::new();
        for d in data {
            for p in d.get("paragraphs")?.as_array()? {
                all.push(para(p)?);
            }
        }
        let (docs, at) = Self::index(all);
        let mut qas = Vec::new();
        for d in data {
            let ps = d.get("paragraphs")?.as_array()?;
            let article: Vec<usize> = ps
                .iter()
                .filter_map(|p| at.get(&para(p)?).copied())
                .collect();
            for p in ps {
                let me = at[&para(p)?];
                for q in p.get("qas")?.as_array()? {
                    if q.get("is_impossible")
                        .and_then(|x| x.as_bool())
                        .unwrap_or(false)
                    {
                        continue;
                    }
                    let outputs: Vec<String> = q
                        .get("answers")?
                        .as_array()?
                        .iter()
                        .filter_map(|a| a.get("text")?.as_str().map(str::to_string))
                        .collect();
                    qas.push(QaItem {
                        query: q.get("question")?.as_str()?.to_string(),
                        outputs,
                        context: vec![me],
                        more_context: article.iter().copied().filter(|&i| i != me).collect(),
                    });
                }
            }
        }
        Some(Self { qas, docs })
    }

    fn hotpotqa(v: &serde_json::Value) -> Option<Self> {
        let data = v.as_array()?;
        // A document is its title, a newline, then its sentences joined.
        let doc = |c: &serde_json::Value| -> Option<String> {
            let c = c.as_array()?;
            let title = c.first()?.as_str()?;
            let sents: Vec<&str> = c
                .get(1)?
                .as_array()?
                .iter()
                .filter_map(|s| s.as_str())
                .collect();
            Some(format!("{title}\n{}", sents.concat()))
        };
        let mut all = Vec::new();
        for d in data {
            for c in d.get("context")?.as_array()? {
                all.push(doc(c)?);
            }
        }
        let (docs, at) = Self::index(all);
        let mut qas = Vec::new();
        for d in data {
            let context = d
                .get("context")?
                .as_array()?
                .iter()
                .map(|c| doc(c).map(|x| at[&x]))
                .collect::<Option<Vec<_>>>()?;
            qas.push(QaItem {
                query: d.get("question")?.as_str()?.to_string(),
                outputs: vec![d.get("answer")?.as_str()?.to_string()],
                context,
                more_context: Vec::new(),
            });
        }
        Some(Self { qas, docs })
    }
}

/// QA (qa.py): question `index`'s gold documents, then its article's other paragraphs,
/// then random others, `n` documents in all, shuffled, numbered "Document i:".
fn qa(
    task: &Task,
    wrap: &ChatWrap,
    data: &QaData,
    index: usize,
    n: usize,
    rng: &mut Rng,
) -> Result<Draft> {
    let item = &data.qas[index % data.qas.len()];
    let mut docs: Vec<usize> = item.context.clone();
    if n < data.docs.len() {
        let want = n.saturating_sub(docs.len());
        if want > item.more_context.len() {
            docs.extend(&item.more_context);
            let others: Vec<usize> = (0..data.docs.len()).filter(|i| !docs.contains(i)).collect();
            let extra = want - item.more_context.len();
            docs.extend(
                rng.sample(others.len(), extra)
                    .into_iter()
                    .map(|i| others[i]),
            );
        } else {
            let pick = rng.sample(item.more_context.len(), want);
            docs.extend(pick.into_iter().map(|i| item.more_context[i]));
        }
    } else {
        docs = (0..n).map(|i| i % data.docs.len()).collect();
    }
    rng.shuffle(&mut docs);
    let context = docs
        .iter()
        .enumerate()
        .map(|(i, &d)| format!("Document {}:\n{}", i + 1, data.docs[d]))
        .collect::<Vec<_>>()
        .join("\n\n");
    let (tt, ap) = task.template();
    let text = wrap
        .template(tt, ap)
        .replace("{query}", &item.query)
        .replace("{context}", &context);
    Ok(Draft {
        text,
        outputs: item.outputs.clone(),
    })
}

/// Build sample `index` of `task` at `length`: the largest haystack whose prompt tokens
/// plus the answer budget fit `length`.
pub fn make_sample(
    task: &Task,
    length: usize,
    index: usize,
    seed: u64,
    wrap: &ChatWrap,
    tok: &Tokenizer,
    m: &Material,
) -> Result<Sample> {
    let gen = task.tokens_to_generate();
    let base = sample_rng(seed, task.name, length, index);
    let budget = length
        .checked_sub(gen)
        .filter(|&b| b > 0)
        .with_context(|| {
            format!(
                "length {length} leaves no room for {}'s prompt next to its {gen}-token answer",
                task.name
            )
        })?;
    let fwe_vocab = (budget / 50).max(4);
    let example = match task.kind {
        Kind::VariableTracking { .. } => vt_example(
            task,
            tok,
            &mut sample_rng(seed ^ 1, task.name, length, index),
        )?,
        _ => String::new(),
    };
    let draft = |n: usize| -> Result<Draft> {
        let mut rng = base.clone();
        match task.kind {
            Kind::Niah { .. } => niah(task, wrap, m, n, &mut rng),
            Kind::VariableTracking { .. } => vt(task, wrap, &example, n, &mut rng),
            Kind::CommonWords { .. } => cwe(task, wrap, m, n, length < 4096, &mut rng),
            Kind::FrequentWords { .. } => fwe(task, wrap, fwe_vocab, n, &mut rng),
            Kind::Qa { dataset } => {
                let data =
                    m.qa.iter()
                        .find(|(d, _)| *d == dataset)
                        .map(|(_, q)| q)
                        .with_context(|| format!("{}: no QA file was given", task.name))?;
                qa(task, wrap, data, index, n, &mut rng)
            }
        }
    };
    let tokens = |d: &Draft| -> Result<usize> { Ok(wrap.encode(tok, &d.text)?.len()) };
    // The smallest haystack each generator accepts.
    let lo = match task.kind {
        Kind::CommonWords { common, .. } => common + 1,
        Kind::Qa { dataset } => {
            m.qa.iter()
                .find(|(d, _)| *d == dataset)
                .map_or(1, |(_, q)| q.qas[index % q.qas.len()].context.len().max(1))
        }
        Kind::FrequentWords { .. } => 1,
        _ => 1,
    };
    let fits = |n: usize| -> Result<Option<(Draft, usize)>> {
        let d = draft(n)?;
        let t = tokens(&d)?;
        Ok((t <= budget).then_some((d, t)))
    };
    if let Kind::FrequentWords { .. } = task.kind {
        // RULER's own walk for this task (freq_words_extraction.py): from budget/6 words
        // up in steps of budget/32 while the prompt stays under the budget, one step
        // back, then down while over it. It stops short of the budget by up to a step.
        let step = (budget / 32).max(1);
        let mut n = (budget / 6).max(1);
        while tokens(&draft(n)?)? < budget {
            n += step;
        }
        n = n.saturating_sub(step).max(1);
        loop {
            let d = draft(n)?;
            let t = tokens(&d)?;
            if t <= budget || n <= step {
                if t > budget {
                    bail!("fwe at length {length}: the shortest coded text takes {t} tokens, over the {budget} available");
                }
                return finish(task, length, index, d, t, gen);
            }
            n -= step;
        }
    }
    let Some(mut best) = fits(lo)?.map(|x| (lo, x)) else {
        let t = tokens(&draft(lo)?)?;
        bail!(
            "{} at length {length}: even the smallest prompt takes {t} tokens, over the {budget} left after the {gen}-token answer; use a longer length",
            task.name
        );
    };
    // Exponential then binary search for the largest n that fits.
    let mut hi = lo.max(1) * 2;
    loop {
        match fits(hi)? {
            Some(x) => {
                best = (hi, x);
                hi *= 2;
            }
            None => break,
        }
        if hi > 1 << 28 {
            bail!("{}: the prompt does not grow with its haystack", task.name);
        }
    }
    let (mut a, mut b) = (best.0 + 1, hi - 1);
    while a <= b {
        let mid = a + (b - a) / 2;
        match fits(mid)? {
            Some(x) => {
                best = (mid, x);
                a = mid + 1;
            }
            None => b = mid - 1,
        }
    }
    let (_, (d, t)) = best;
    finish(task, length, index, d, t, gen)
}

fn finish(
    task: &Task,
    length: usize,
    index: usize,
    d: Draft,
    t: usize,
    gen: usize,
) -> Result<Sample> {
    let (_, ap) = task.template();
    // RULER cuts at the last occurrence of the answer prefix's first 10 characters.
    let at = d
        .text
        .rfind(&ap[..ap.len().min(10)])
        .context("the answer prefix went missing from the prompt")?;
    Ok(Sample {
        id: format!("{}/{length}/{index}", task.name),
        task: task.name.to_string(),
        context_length: length,
        index,
        input: d.text[..at].to_string(),
        answer_prefix: d.text[at..].to_string(),
        outputs: d.outputs,
        length: t + gen,
        tokens_to_generate: gen,
    })
}
