//! A hand-written reader for SentencePiece `tokenizer.model` files (a `ModelProto`
//! protobuf message). Only the fields a tokenizer needs are decoded; everything else is
//! skipped by wire type.
//!
//! ```text
//! ModelProto      { 1: repeated SentencePiece pieces, 2: TrainerSpec, 3: NormalizerSpec }
//! SentencePiece   { 1: string piece, 2: float score, 3: Type type (default NORMAL) }
//! TrainerSpec     { 3: model_type, 35: byte_fallback, 40: unk_id, 41: bos_id,
//!                   42: eos_id, 43: pad_id }
//! NormalizerSpec  { 1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces,
//!                   5: escape_whitespaces }
//! ```

use anyhow::{anyhow, bail, Result};

/// SentencePiece `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpModelType {
    Unigram,
    Bpe,
    Word,
    Char,
    Other(i32),
}

impl SpModelType {
    fn from_i32(v: i32) -> Self {
        match v {
            1 => Self::Unigram,
            2 => Self::Bpe,
            3 => Self::Word,
            4 => Self::Char,
            v => Self::Other(v),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpPiece {
    pub piece: String,
    pub score: f32,
    /// 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE.
    pub kind: i32,
}

/// The decoded parts of a `ModelProto`, with protobuf defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<SpPiece>,
    pub model_type: SpModelType,
    pub byte_fallback: bool,
    /// Negative ids mean "disabled", as in SentencePiece.
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub normalizer_name: Option<String>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl SentencePieceModel {
    /// Parse a serialized `ModelProto`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut m = Self {
            pieces: Vec::new(),
            model_type: SpModelType::Unigram,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            normalizer_name: None,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut r = Reader::new(bytes, "ModelProto");
        while let Some((field, value)) = r.next_field()? {
            match (field, value) {
                (1, Value::Bytes(b)) => m.pieces.push(parse_piece(b, m.pieces.len())?),
                (2, Value::Bytes(b)) => m.parse_trainer_spec(b)?,
                (3, Value::Bytes(b)) => m.parse_normalizer_spec(b)?,
                (1..=3, v) => bail!(
                    "sentencepiece model: ModelProto field {field} has wire type {} (expected a length-delimited message)",
                    v.wire_name()
                ),
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            bail!("sentencepiece model: no pieces (not a tokenizer.model file?)");
        }
        Ok(m)
    }

    fn parse_trainer_spec(&mut self, bytes: &[u8]) -> Result<()> {
        let mut r = Reader::new(bytes, "TrainerSpec");
        while let Some((field, value)) = r.next_field()? {
            let int = || value.as_int("TrainerSpec", field);
            match field {
                3 => self.model_type = SpModelType::from_i32(int()? as i32),
                35 => self.byte_fallback = int()? != 0,
                40 => self.unk_id = int()? as i32,
                41 => self.bos_id = int()? as i32,
                42 => self.eos_id = int()? as i32,
                43 => self.pad_id = int()? as i32,
                _ => {}
            }
        }
        Ok(())
    }

    fn parse_normalizer_spec(&mut self, bytes: &[u8]) -> Result<()> {
        let mut r = Reader::new(bytes, "NormalizerSpec");
        while let Some((field, value)) = r.next_field()? {
            match (field, value) {
                (1, Value::Bytes(b)) => {
                    self.normalizer_name = Some(String::from_utf8(b.to_vec()).map_err(|_| {
                        anyhow!("sentencepiece model: normalizer name is not UTF-8")
                    })?)
                }
                (3, v) => self.add_dummy_prefix = v.as_int("NormalizerSpec", 3)? != 0,
                (4, v) => self.remove_extra_whitespaces = v.as_int("NormalizerSpec", 4)? != 0,
                (5, v) => self.escape_whitespaces = v.as_int("NormalizerSpec", 5)? != 0,
                _ => {}
            }
        }
        Ok(())
    }

    /// Serialize back into a `ModelProto` holding the fields this module reads (used by
    /// tests and fixture generation).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.pieces {
            let mut sp = Vec::new();
            put_bytes(&mut sp, 1, p.piece.as_bytes());
            put_key(&mut sp, 2, 5);
            sp.extend_from_slice(&p.score.to_le_bytes());
            put_varint_field(&mut sp, 3, p.kind as i64 as u64);
            put_bytes(&mut out, 1, &sp);
        }
        let mut ts = Vec::new();
        let model_type = match self.model_type {
            SpModelType::Unigram => 1,
            SpModelType::Bpe => 2,
            SpModelType::Word => 3,
            SpModelType::Char => 4,
            SpModelType::Other(v) => v,
        };
        put_varint_field(&mut ts, 3, model_type as i64 as u64);
        put_varint_field(&mut ts, 35, self.byte_fallback as u64);
        put_varint_field(&mut ts, 40, self.unk_id as i64 as u64);
        put_varint_field(&mut ts, 41, self.bos_id as i64 as u64);
        put_varint_field(&mut ts, 42, self.eos_id as i64 as u64);
        put_varint_field(&mut ts, 43, self.pad_id as i64 as u64);
        put_bytes(&mut out, 2, &ts);
        let mut ns = Vec::new();
        if let Some(name) = &self.normalizer_name {
            put_bytes(&mut ns, 1, name.as_bytes());
        }
        put_varint_field(&mut ns, 3, self.add_dummy_prefix as u64);
        put_varint_field(&mut ns, 4, self.remove_extra_whitespaces as u64);
        put_varint_field(&mut ns, 5, self.escape_whitespaces as u64);
        put_bytes(&mut out, 3, &ns);
        out
    }
}

fn parse_piece(bytes: &[u8], index: usize) -> Result<SpPiece> {
    let mut piece = None;
    let mut score = 0.0f32;
    let mut kind = 1i32;
    let mut r = Reader::new(bytes, "SentencePiece");
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => {
                piece = Some(String::from_utf8(b.to_vec()).map_err(|_| {
                    anyhow!("sentencepiece model: piece #{index} is not valid UTF-8")
                })?)
            }
            (2, Value::Fixed32(v)) => score = f32::from_bits(v),
            (3, v) => kind = v.as_int("SentencePiece", 3)? as i32,
            (1 | 2, v) => bail!(
                "sentencepiece model: piece #{index} field {field} has unexpected wire type {}",
                v.wire_name()
            ),
            _ => {}
        }
    }
    let piece = piece.ok_or_else(|| anyhow!("sentencepiece model: piece #{index} has no text"))?;
    Ok(SpPiece { piece, score, kind })
}

// ---------------------------------------------------------------------------------------
// Protobuf wire format
// ---------------------------------------------------------------------------------------

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl Value<'_> {
    fn wire_name(&self) -> &'static str {
        match self {
            Value::Varint(_) => "varint",
            Value::Fixed64 => "64-bit",
            Value::Bytes(_) => "length-delimited",
            Value::Fixed32(_) => "32-bit",
        }
    }

    fn as_int(&self, msg: &str, field: u32) -> Result<i64> {
        match self {
            Value::Varint(v) => Ok(*v as i64),
            other => bail!(
                "sentencepiece model: {msg} field {field} has wire type {} (expected varint)",
                other.wire_name()
            ),
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], msg: &'static str) -> Self {
        Self { buf, pos: 0, msg }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                bail!(
                    "sentencepiece model: truncated varint in {} at byte {}",
                    self.msg,
                    self.pos
                );
            };
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!(
            "sentencepiece model: varint longer than 10 bytes in {} at byte {}",
            self.msg,
            self.pos
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "sentencepiece model: truncated {} ({} bytes needed at byte {}, {} available)",
                self.msg,
                n,
                self.pos,
                self.buf.len() - self.pos
            );
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 || field > u32::MAX as u64 >> 3 {
            bail!(
                "sentencepiece model: invalid field number {field} in {} (not a protobuf file?)",
                self.msg
            );
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = self.varint()?;
                let len = usize::try_from(len).map_err(|_| {
                    anyhow!("sentencepiece model: length {len} too large in {}", self.msg)
                })?;
                Value::Bytes(self.take(len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into()?)),
            w => bail!(
                "sentencepiece model: unsupported protobuf wire type {w} in {} (not a tokenizer.model file?)",
                self.msg
            ),
        };
        Ok(Some((field as u32, value)))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SentencePieceModel {
        SentencePieceModel {
            pieces: vec![
                SpPiece {
                    piece: "<unk>".into(),
                    score: 0.0,
                    kind: 2,
                },
                SpPiece {
                    piece: "<s>".into(),
                    score: 0.0,
                    kind: 3,
                },
                SpPiece {
                    piece: "\u{2581}hi".into(),
                    score: -1.5,
                    kind: 1,
                },
            ],
            model_type: SpModelType::Bpe,
            byte_fallback: true,
            unk_id: 0,
            bos_id: 1,
            eos_id: -1,
            pad_id: -1,
            normalizer_name: Some("identity".into()),
            add_dummy_prefix: true,
            remove_extra_whitespaces: false,
            escape_whitespaces: true,
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.to_bytes();
        assert_eq!(SentencePieceModel::parse(&bytes).unwrap(), m);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let bytes = sample().to_bytes();
        for cut in [1, 5, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                SentencePieceModel::parse(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
        assert!(SentencePieceModel::parse(b"").is_err());
        assert!(SentencePieceModel::parse(b"{\"version\": 1}").is_err());
        assert!(SentencePieceModel::parse(&[0xff; 16]).is_err());
        // Unknown fields are skipped.
        let mut with_extra = bytes.clone();
        put_varint_field(&mut with_extra, 99, 7);
        assert_eq!(SentencePieceModel::parse(&with_extra).unwrap(), sample());
    }
}
