//! Incremental detokenization for streaming output: feed token ids one at a time and get
//! back only complete UTF-8 text, holding back a multi-byte character split across
//! tokens until its remaining bytes arrive.

use super::Tokenizer;

/// Streaming decoder. Each token contributes its raw bytes ([`Tokenizer::token_bytes`]);
/// nothing is stripped, so an SPM token `▁Paris` streams as `" Paris"` (a continuation of
/// the prompt). Control tokens (e.g. `<|im_end|>`) produce no text unless the decoder
/// was made with [`StreamDecoder::with_special`].
#[derive(Clone)]
pub struct StreamDecoder {
    tok: Tokenizer,
    pending: Vec<u8>,
    render_special: bool,
}

impl StreamDecoder {
    /// Accepts a `Tokenizer`, a `&Tokenizer` or an `Arc<Tokenizer>` (all cheap clones).
    pub fn new(tok: impl Into<Tokenizer>) -> Self {
        Self {
            tok: tok.into(),
            pending: Vec::new(),
            render_special: false,
        }
    }

    /// Like [`StreamDecoder::new`], choosing whether control tokens are rendered as
    /// their text.
    pub fn with_special(tok: impl Into<Tokenizer>, render_special: bool) -> Self {
        Self {
            render_special,
            ..Self::new(tok)
        }
    }

    /// Add one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        if !self.render_special && self.tok.is_skipped_special(id) {
            return String::new();
        }
        self.pending.extend_from_slice(&self.tok.token_bytes(id));
        self.take_complete()
    }

    /// Return whatever is still held back (incomplete sequences become U+FFFD).
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    /// Bytes received but not yet returned.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is UTF-8 by construction.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete sequence at the end: keep it for the next token.
                        None => {
                            rest = after;
                            break;
                        }
                        // Invalid bytes: emit a replacement character and go on.
                        Some(n) => {
                            out.push('\u{fffd}');
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }
}
