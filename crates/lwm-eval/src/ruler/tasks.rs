//! RULER's synthetic tasks (NVIDIA/RULER `scripts/synthetic.yaml` and
//! `scripts/data/synthetic/constants.py`): each task's generator settings, prompt
//! template, answer prefix, answer budget and metric.

use anyhow::{bail, Result};

/// Where a needle-in-a-haystack task hides its needles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Haystack {
    /// "The grass is green. ..." repeated, one line per repeat.
    Noise,
    /// Prose (RULER: Paul Graham's essays; here the eval's haystack text), cut at sentences.
    Essay,
    /// Lines that are themselves needles with other keys: distractors.
    Needle,
}

/// What a needle's key or value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// A seven-digit number.
    Numbers,
    /// Two words joined by a hyphen (RULER: adjective-noun).
    Words,
    /// A version-4 UUID.
    Uuids,
}

impl Draw {
    /// The plural RULER writes into the template ("numbers", "words", "uuids").
    pub fn plural(self) -> &'static str {
        match self {
            Draw::Numbers => "numbers",
            Draw::Words => "words",
            Draw::Uuids => "uuids",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Niah {
        haystack: Haystack,
        key: Draw,
        value: Draw,
        /// Keys, values per key, and keys asked (RULER's num_needle_k/v/q).
        keys: usize,
        values: usize,
        queries: usize,
    },
    VariableTracking {
        chains: usize,
        hops: usize,
    },
    CommonWords {
        freq_common: usize,
        freq_uncommon: usize,
        common: usize,
    },
    FrequentWords {
        alpha: f64,
    },
    /// Question answering over documents: the gold paragraph(s) among distractors, from
    /// a local SQuAD (v2 JSON) or HotpotQA (JSON) file.
    Qa {
        dataset: QaDataset,
    },
}

/// How a prediction is scored against the reference answers (RULER's
/// `eval/synthetic/constants.py`): the share of references found in the prediction
/// (case-insensitive substring), or whether any is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    MatchAll,
    MatchPart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QaDataset {
    Squad,
    HotpotQa,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Task {
    pub name: &'static str,
    pub kind: Kind,
}

pub const NIAH_TEMPLATE: &str = "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?";
pub const NIAH_ANSWER: &str =
    " The special magic {type_needle_v} for {query} mentioned in the provided text are";
pub const VT_TEMPLATE: &str = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.";
pub const VT_ANSWER: &str = " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ";
pub const CWE_TEMPLATE: &str = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?";
pub const CWE_ANSWER: &str = " Answer: The top 10 words that appear most often in the list are:";
pub const FWE_TEMPLATE: &str = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?";
pub const FWE_ANSWER: &str =
    " Answer: According to the coded text above, the three most frequently appeared words are:";
pub const QA_TEMPLATE: &str = "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}";
pub const QA_ANSWER: &str = " Answer:";

const fn niah(
    name: &'static str,
    haystack: Haystack,
    key: Draw,
    value: Draw,
    keys: usize,
    values: usize,
    queries: usize,
) -> Task {
    Task {
        name,
        kind: Kind::Niah {
            haystack,
            key,
            value,
            keys,
            values,
            queries,
        },
    }
}

/// RULER's 13 tasks, in its order.
pub const TASKS: [Task; 13] = [
    niah(
        "niah_single_1",
        Haystack::Noise,
        Draw::Words,
        Draw::Numbers,
        1,
        1,
        1,
    ),
    niah(
        "niah_single_2",
        Haystack::Essay,
        Draw::Words,
        Draw::Numbers,
        1,
        1,
        1,
    ),
    niah(
        "niah_single_3",
        Haystack::Essay,
        Draw::Words,
        Draw::Uuids,
        1,
        1,
        1,
    ),
    niah(
        "niah_multikey_1",
        Haystack::Essay,
        Draw::Words,
        Draw::Numbers,
        4,
        1,
        1,
    ),
    niah(
        "niah_multikey_2",
        Haystack::Needle,
        Draw::Words,
        Draw::Numbers,
        1,
        1,
        1,
    ),
    niah(
        "niah_multikey_3",
        Haystack::Needle,
        Draw::Uuids,
        Draw::Uuids,
        1,
        1,
        1,
    ),
    niah(
        "niah_multivalue",
        Haystack::Essay,
        Draw::Words,
        Draw::Numbers,
        1,
        4,
        1,
    ),
    niah(
        "niah_multiquery",
        Haystack::Essay,
        Draw::Words,
        Draw::Numbers,
        1,
        1,
        4,
    ),
    Task {
        name: "vt",
        kind: Kind::VariableTracking { chains: 1, hops: 4 },
    },
    Task {
        name: "cwe",
        kind: Kind::CommonWords {
            freq_common: 30,
            freq_uncommon: 3,
            common: 10,
        },
    },
    Task {
        name: "fwe",
        kind: Kind::FrequentWords { alpha: 2.0 },
    },
    Task {
        name: "qa_1",
        kind: Kind::Qa {
            dataset: QaDataset::Squad,
        },
    },
    Task {
        name: "qa_2",
        kind: Kind::Qa {
            dataset: QaDataset::HotpotQa,
        },
    },
];

impl Task {
    pub fn by_name(name: &str) -> Option<Task> {
        TASKS.iter().copied().find(|t| t.name == name)
    }

    /// Tokens the answer may take (RULER's tokens_to_generate).
    pub fn tokens_to_generate(&self) -> usize {
        match self.kind {
            Kind::Niah { .. } => 128,
            Kind::VariableTracking { .. } => 30,
            Kind::CommonWords { .. } => 120,
            Kind::FrequentWords { .. } => 50,
            Kind::Qa { .. } => 32,
        }
    }

    /// (task template, answer prefix).
    pub fn template(&self) -> (&'static str, &'static str) {
        match self.kind {
            Kind::Niah { .. } => (NIAH_TEMPLATE, NIAH_ANSWER),
            Kind::VariableTracking { .. } => (VT_TEMPLATE, VT_ANSWER),
            Kind::CommonWords { .. } => (CWE_TEMPLATE, CWE_ANSWER),
            Kind::FrequentWords { .. } => (FWE_TEMPLATE, FWE_ANSWER),
            Kind::Qa { .. } => (QA_TEMPLATE, QA_ANSWER),
        }
    }

    pub fn metric(&self) -> Metric {
        match self.kind {
            Kind::Qa { .. } => Metric::MatchPart,
            _ => Metric::MatchAll,
        }
    }

    /// The QA dataset a task reads, if it is a QA task.
    pub fn qa_dataset(&self) -> Option<QaDataset> {
        match self.kind {
            Kind::Qa { dataset } => Some(dataset),
            _ => None,
        }
    }
}

/// The metric of a task name as RULER's evaluate.py picks it (its `task` field): QA tasks
/// (`qa_*`) match any reference, every other task all of them.
pub fn metric_for_name(name: &str) -> Metric {
    match Task::by_name(name) {
        Some(t) => t.metric(),
        None if name.starts_with("qa") => Metric::MatchPart,
        None => Metric::MatchAll,
    }
}

/// Parse `--tasks`: `all` (the 11 synthetic tasks, and the QA tasks whose data file is
/// given), or a comma list of task names. `qa_files` says which QA datasets are at hand.
pub fn parse_tasks(spec: &str, qa_files: &[QaDataset]) -> Result<Vec<Task>> {
    let spec = spec.trim();
    let at_hand = |t: &Task| t.qa_dataset().is_none_or(|d| qa_files.contains(&d));
    if spec == "all" {
        return Ok(TASKS.iter().copied().filter(at_hand).collect());
    }
    let mut out: Vec<Task> = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some(t) = Task::by_name(name) else {
            let known: Vec<&str> = TASKS.iter().map(|t| t.name).collect();
            bail!(
                "--tasks: unknown task '{name}'; the tasks are all, {}",
                known.join(", ")
            );
        };
        if !at_hand(&t) {
            let flag = match t.qa_dataset() {
                Some(QaDataset::Squad) => "--qa-squad FILE (SQuAD v2 dev JSON)",
                _ => "--qa-hotpotqa FILE (HotpotQA dev JSON)",
            };
            bail!(
                "--tasks: {name} answers questions over documents lwm does not ship; give {flag}, or run RULER's own file with --input"
            );
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        bail!("--tasks: no task named");
    }
    Ok(out)
}
