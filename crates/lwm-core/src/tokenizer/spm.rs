//! llama.cpp's SPM tokenizer (`llm_tokenizer_spm`): start from UTF-8 characters, keep
//! merging the adjacent pair whose concatenation is the highest-scoring vocabulary entry
//! (ties: leftmost pair first), then map every final symbol to its id, or to `<0xXX>`
//! byte tokens when the symbol is not in the vocabulary.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;

/// Per-vocabulary SPM state: the id of every byte's fallback token.
#[derive(Debug)]
pub(crate) struct SpmModel {
    byte_tokens: Vec<Option<u32>>,
}

impl SpmModel {
    pub(crate) fn new(vocab: &Vocab) -> Self {
        let mut byte_tokens = vec![None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            *slot = vocab.token_to_id.get(&hex).copied().or_else(|| {
                // llama.cpp falls back to the byte itself as a one-character token.
                let c = b as u8;
                if c.is_ascii() {
                    vocab
                        .token_to_id
                        .get((c as char).to_string().as_str())
                        .copied()
                } else {
                    None
                }
            });
        }
        Self { byte_tokens }
    }

    /// Tokenize `text`, which must already have spaces replaced by `▁` (and any space
    /// prefix added), appending ids to `out`.
    pub(crate) fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i as isize - 1,
                next: i as isize + 1,
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = -1;
        }

        let mut queue = BinaryHeap::new();
        let try_add = |syms: &[Symbol], queue: &mut BinaryHeap<Bigram>, l: isize, r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (&syms[l as usize], &syms[r as usize]);
            let piece = &text[ls.start..ls.start + ls.len + rs.len];
            if let Some(&id) = vocab.token_to_id.get(piece) {
                queue.push(Bigram {
                    score: vocab.scores[id as usize],
                    left: l as usize,
                    right: r as usize,
                    size: piece.len(),
                });
            }
        };
        for i in 1..syms.len() as isize {
            try_add(&syms, &mut queue, i - 1, i);
        }

        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue; // outdated: one side has been merged since
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            let next = syms[r].next;
            syms[l].next = next;
            if next >= 0 {
                syms[next as usize].prev = l as isize;
            }
            let prev = syms[l].prev;
            try_add(&syms, &mut queue, prev, l as isize);
            try_add(&syms, &mut queue, l as isize, next);
        }

        let mut i = 0isize;
        while i >= 0 {
            let s = &syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            match vocab.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(vocab.unk) {
                            out.push(id);
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
    prev: isize,
    next: isize,
}

#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
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
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        let by_score = if self.score < other.score {
            Ordering::Less
        } else if self.score > other.score {
            Ordering::Greater
        } else {
            Ordering::Equal
        };
        by_score.then_with(|| other.left.cmp(&self.left))
    }
}

/// Replace every space with `▁`.
pub(crate) fn escape_whitespace(text: &str) -> String {
    text.replace(' ', "\u{2581}")
}

#[cfg(test)]
mod tests {
    use super::super::vocab::{PieceStyle, VocabSpec};
    use super::*;

    fn vocab(tokens: &[(&str, f32, i32)]) -> Vocab {
        Vocab::build(VocabSpec {
            tokens: tokens.iter().map(|t| t.0.to_string()).collect(),
            scores: Some(tokens.iter().map(|t| t.1).collect()),
            types: Some(tokens.iter().map(|t| t.2).collect()),
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            eot: None,
            pad: None,
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
            style: PieceStyle::Spm,
            source: "test",
        })
        .unwrap()
    }

    #[test]
    fn merges_by_score_with_byte_fallback() {
        let v = vocab(&[
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0x0A>", 0.0, 6),
            ("<0xC3>", 0.0, 6),
            ("<0xA9>", 0.0, 6),
            ("\u{2581}", -1.0, 1),
            ("a", -2.0, 1),
            ("b", -2.0, 1),
            ("ab", -3.0, 1),
            ("\u{2581}a", -0.5, 1),
            ("\u{2581}ab", -0.1, 1),
            ("bb", -0.2, 1),
        ]);
        let m = SpmModel::new(&v);
        let mut out = Vec::new();
        m.tokenize(&v, "\u{2581}ab", &mut out);
        assert_eq!(out, vec![11]);
        out.clear();
        // "▁abb": best first pair is "bb" (-0.2) vs "▁a" (-0.5): bb wins, then ▁a.
        m.tokenize(&v, "\u{2581}abb", &mut out);
        assert_eq!(out, vec![10, 12]);
        out.clear();
        m.tokenize(&v, "a\né", &mut out);
        assert_eq!(out, vec![7, 3, 4, 5]);
    }
}
