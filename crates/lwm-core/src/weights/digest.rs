//! Digests that identify a model's weights (part of a prompt-cache file's model identity)
//! without reading the tensors: the file size and its header bytes.

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;

/// A fast 64-bit checksum over 8-byte words (`h = rotl((h ^ w) · P, 29)`, tail zero-padded,
/// length mixed in at the end). Each step is a bijection of `h`, so any single changed
/// word always changes the result.
#[derive(Debug, Clone)]
pub struct Checksum {
    h: u64,
    len: u64,
    tail: Vec<u8>,
}

impl Default for Checksum {
    fn default() -> Self {
        Self {
            h: 0xcbf2_9ce4_8422_2325,
            len: 0,
            tail: Vec::with_capacity(8),
        }
    }
}

impl Checksum {
    const P: u64 = 0x0000_0100_0000_01b3 | (0x9e37_79b9 << 32);

    #[inline]
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(Self::P).rotate_left(29);
    }

    pub fn write(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if !self.tail.is_empty() {
            let take = (8 - self.tail.len()).min(bytes.len());
            self.tail.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.tail.len() < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.tail[..].try_into().expect("8 bytes"));
            self.word(w);
            self.tail.clear();
        }
        let mut words = bytes.chunks_exact(8);
        for c in &mut words {
            self.word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        self.tail.extend_from_slice(words.remainder());
    }

    pub fn finish(&self) -> u64 {
        let mut c = self.clone();
        if !c.tail.is_empty() {
            let mut b = [0u8; 8];
            b[..c.tail.len()].copy_from_slice(&c.tail);
            c.word(u64::from_le_bytes(b));
        }
        c.word(c.len);
        c.h
    }
}

/// Digest of a weights file's identity: its size and its first `header_bytes` bytes (a
/// GGUF file's metadata and tensor table; a safetensors file's header).
pub fn file_digest(path: &Path, header_bytes: u64) -> Result<u64> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut head = Vec::new();
    f.take(header_bytes.min(size)).read_to_end(&mut head)?;
    let mut c = Checksum::default();
    c.write(&size.to_le_bytes());
    c.write(&head);
    Ok(c.finish())
}
