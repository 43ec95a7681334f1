//! The GPT-2 byte-level alphabet: each byte maps to one printable character, so byte-level
//! BPE vocabularies (`PieceStyle::ByteLevel`) store any byte sequence as text.

use std::collections::HashMap;
use std::sync::OnceLock;

struct ByteTables {
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
}

fn byte_tables() -> &'static ByteTables {
    static TABLES: OnceLock<ByteTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut byte_to_char = ['\0'; 256];
        let mut extra = 0u32;
        for (b, slot) in byte_to_char.iter_mut().enumerate() {
            let b = b as u32;
            let cp = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            *slot = char::from_u32(cp).unwrap_or('\u{fffd}');
        }
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        ByteTables {
            byte_to_char,
            char_to_byte,
        }
    })
}

/// Map raw bytes to the GPT-2 byte-level alphabet.
pub(crate) fn byte_level_encode(text: &str) -> String {
    let t = byte_tables();
    text.bytes().map(|b| t.byte_to_char[b as usize]).collect()
}

/// Map a byte-level token text back to raw bytes. Characters outside the alphabet are
/// kept as their own UTF-8 bytes.
pub(crate) fn byte_level_decode(text: &str) -> Vec<u8> {
    let t = byte_tables();
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match t.char_to_byte.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trip() {
        for s in ["hello world", "\n\t ", "héllo 🦙", "\u{0}\u{7f}"] {
            let enc = byte_level_encode(s);
            assert_eq!(byte_level_decode(&enc), s.as_bytes());
        }
        assert_eq!(byte_level_encode(" a\n"), "\u{120}a\u{10a}");
    }
}
