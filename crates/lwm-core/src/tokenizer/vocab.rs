//! The vocabulary shared by the llama.cpp-style tokenizers (SPM and byte-level BPE): token
//! strings, scores, per-token attributes, special ids, the special-token partition step
//! and the per-token byte pieces used for decoding.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};

/// Token attribute bits (llama.cpp's `llama_token_attr`, restricted to what we use).
pub(crate) const ATTR_NORMAL: u16 = 1;
pub(crate) const ATTR_UNKNOWN: u16 = 1 << 1;
pub(crate) const ATTR_CONTROL: u16 = 1 << 2;
pub(crate) const ATTR_USER_DEFINED: u16 = 1 << 3;
pub(crate) const ATTR_UNUSED: u16 = 1 << 4;
pub(crate) const ATTR_BYTE: u16 = 1 << 5;

/// Map a GGUF / sentencepiece token type code to attribute bits.
/// 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte; anything else is
/// "undefined" (no bits), which decodes to nothing.
pub(crate) fn attr_from_type(t: i32) -> u16 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => 0,
    }
}

/// Token texts that llama.cpp treats as end-of-generation (and forces to control type).
pub(crate) const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];

/// Fill-in-the-middle pad / repo / file-separator tokens, which llama.cpp also stops on.
pub(crate) const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// How a normal token's text maps to bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// SentencePiece: `▁` stands for a space.
    Spm,
    /// GPT-2 byte-level: every char stands for one byte.
    ByteLevel,
}

/// One piece of input after splitting out special tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

#[derive(Debug)]
pub(crate) struct Vocab {
    pub tokens: Vec<String>,
    pub token_to_id: HashMap<String, u32>,
    pub scores: Vec<f32>,
    pub attrs: Vec<u16>,
    /// `token_to_piece(id, special = true)` for every id.
    pub pieces: Vec<Vec<u8>>,
    /// Control, user-defined and unknown tokens, longest text first.
    pub special_cache: Vec<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub eot: Option<u32>,
    pub pad: Option<u32>,
    pub eog: HashSet<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

/// Everything needed to build a [`Vocab`].
pub(crate) struct VocabSpec {
    pub tokens: Vec<String>,
    pub scores: Option<Vec<f32>>,
    pub types: Option<Vec<i32>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub eot: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub style: PieceStyle,
    /// Where the vocabulary came from, for error messages.
    pub source: &'static str,
}

impl Vocab {
    pub(crate) fn build(spec: VocabSpec) -> Result<Self> {
        let VocabSpec {
            mut tokens,
            scores,
            types,
            bos,
            eos,
            unk,
            eot,
            pad,
            add_bos,
            add_eos,
            add_space_prefix,
            style,
            source,
        } = spec;
        let n = tokens.len();
        if n == 0 {
            bail!("{source}: the vocabulary has no tokens");
        }
        if n > u32::MAX as usize {
            bail!("{source}: the vocabulary has too many tokens ({n})");
        }
        let scores = match scores {
            Some(s) if s.len() < n => {
                bail!("{source}: {} scores for {n} tokens", s.len())
            }
            Some(mut s) => {
                s.truncate(n);
                s
            }
            None => vec![0.0; n],
        };
        let mut attrs = match types {
            Some(t) if t.len() < n => {
                bail!("{source}: {} token types for {n} tokens", t.len())
            }
            Some(t) => t[..n].iter().map(|&t| attr_from_type(t)).collect(),
            None => vec![ATTR_NORMAL; n],
        };

        let mut token_to_id = HashMap::with_capacity(n);
        for (i, tok) in tokens.iter_mut().enumerate() {
            if tok.is_empty() {
                // llama.cpp renames empty tokens so they can never match anything.
                *tok = format!("[EMPTY_{i}]");
            }
            match token_to_id.get(tok.as_str()) {
                None => {
                    token_to_id.insert(tok.clone(), i as u32);
                }
                // Invalid UTF-8 in a GGUF string is read lossily, which can make distinct
                // byte strings collide; keep the first of those instead of failing.
                Some(_) if tok.contains('\u{fffd}') => {}
                Some(prev) => bail!(
                    "{source}: duplicate token {tok:?} in the vocabulary (ids {prev} and {i})"
                ),
            }
        }

        let in_range = |id: Option<u32>| id.filter(|&id| (id as usize) < n);
        let (bos, eos, unk, eot, pad) = (
            in_range(bos),
            in_range(eos),
            in_range(unk),
            in_range(eot),
            in_range(pad),
        );

        // End-of-generation tokens, detected by text like llama.cpp does; they are
        // forced to control type.
        let mut eog = HashSet::new();
        for (i, tok) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&tok.as_str()) || FIM_EOG_TEXTS.contains(&tok.as_str()) {
                eog.insert(i as u32);
                attrs[i] |= ATTR_CONTROL;
            }
        }
        eog.extend(eos);
        eog.extend(eot);

        let mut special_cache: Vec<u32> = (0..n as u32)
            .filter(|&i| attrs[i as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
            .collect();
        special_cache.sort_by(|&a, &b| {
            tokens[b as usize]
                .len()
                .cmp(&tokens[a as usize].len())
                .then(a.cmp(&b))
        });

        let pieces = tokens
            .iter()
            .zip(&attrs)
            .map(|(t, &a)| piece_bytes(t, a, style))
            .collect();

        Ok(Self {
            tokens,
            token_to_id,
            scores,
            attrs,
            pieces,
            special_cache,
            bos,
            eos,
            unk,
            eot,
            pad,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    pub(crate) fn attr(&self, id: u32) -> u16 {
        self.attrs.get(id as usize).copied().unwrap_or(0)
    }

    /// Split `text` at occurrences of special-token strings, longest tokens first, the
    /// way llama.cpp's `tokenizer_st_partition` does. User-defined tokens are always
    /// split out; control and unknown tokens only when `parse_special`.
    pub(crate) fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(text));
        for &id in &self.special_cache {
            let attr = self.attrs[id as usize];
            if !parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let hit = frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(s) if s.contains(needle)));
            if !hit {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(s) if s.contains(needle) => {
                        let mut last = 0;
                        for (pos, m) in s.match_indices(needle) {
                            if pos > last {
                                next.push(Fragment::Text(&s[last..pos]));
                            }
                            next.push(Fragment::Token(id));
                            last = pos + m.len();
                        }
                        if last < s.len() {
                            next.push(Fragment::Text(&s[last..]));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        frags
    }

    /// Bytes of one token for decoding. With `skip_special`, control and unknown
    /// tokens give nothing. Out-of-range ids give nothing.
    pub(crate) fn piece(&self, id: u32, skip_special: bool) -> &[u8] {
        let Some(p) = self.pieces.get(id as usize) else {
            return &[];
        };
        if skip_special && self.attrs[id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
            return &[];
        }
        p
    }

    /// Detokenize like llama.cpp's `detokenize` without space clean-up: concatenate the
    /// pieces; when the vocabulary adds a space prefix, drop one leading space from the
    /// first piece if nothing has been emitted before it.
    pub(crate) fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut strip = self.add_space_prefix;
        for &id in ids {
            let p = self.piece(id, skip_special);
            if p.is_empty() {
                continue;
            }
            if strip && self.attr(id) & ATTR_NORMAL != 0 {
                out.extend_from_slice(p.strip_prefix(b" ").unwrap_or(p));
            } else {
                out.extend_from_slice(p);
            }
            strip = false;
        }
        out
    }
}

/// llama.cpp's `token_to_piece(special = true)` for one token.
fn piece_bytes(text: &str, attr: u16, style: PieceStyle) -> Vec<u8> {
    if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED) != 0 {
        return text.as_bytes().to_vec();
    }
    if attr & ATTR_NORMAL != 0 {
        return match style {
            PieceStyle::Spm => text.replace('\u{2581}', " ").into_bytes(),
            PieceStyle::ByteLevel => super::byte_level::byte_level_decode(text),
        };
    }
    if attr & ATTR_BYTE != 0 {
        return match parse_byte_token(text) {
            Some(b) => vec![b],
            None => text.as_bytes().to_vec(),
        };
    }
    Vec::new()
}

/// `<0xAB>` → 0xAB.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str], types: &[i32]) -> Vocab {
        Vocab::build(VocabSpec {
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            scores: None,
            types: Some(types.to_vec()),
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
    fn partition_longest_first() {
        let v = vocab(
            &["<unk>", "<s>", "</s>", "<s>x", "a", "<u>"],
            &[2, 3, 3, 3, 1, 4],
        );
        let f = v.partition("a<s>xb<s>c</s>", true);
        assert_eq!(
            f,
            vec![
                Fragment::Text("a"),
                Fragment::Token(3),
                Fragment::Text("b"),
                Fragment::Token(1),
                Fragment::Text("c"),
                Fragment::Token(2),
            ]
        );
        // Control tokens stay text without parse_special; user-defined ones split anyway.
        let f = v.partition("a<s>b<u>", false);
        assert_eq!(f, vec![Fragment::Text("a<s>b"), Fragment::Token(5)]);
        assert!(v.partition("", true).is_empty());
    }

    #[test]
    fn duplicate_tokens_are_an_error() {
        let err = Vocab::build(VocabSpec {
            tokens: vec!["a".into(), "a".into()],
            scores: None,
            types: None,
            bos: None,
            eos: None,
            unk: None,
            eot: None,
            pad: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
            style: PieceStyle::Spm,
            source: "test",
        })
        .unwrap_err();
        assert!(err.to_string().contains("duplicate token"), "{err}");
    }

    #[test]
    fn byte_tokens() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x0>"), None);
        assert_eq!(parse_byte_token("x"), None);
    }
}
