//! A minimal streaming msgpack reader: just what the tux/flax checkpoint format needs
//! (arrays, maps, strings, ints, bools, bin and ext headers). Values are read one marker at a
//! time from any `Read`, so a multi-gigabyte `bin` payload is never buffered here: the caller
//! gets its length and reads (or skips) the bytes itself.
//!
//! The matching writer (`Writer`) emits the same subset, for `lwm convert`.

use anyhow::{bail, Result};
use std::io::{self, Read, Seek, SeekFrom, Write};

/// A reader that counts the bytes consumed (for error messages and bounds checks).
pub struct Reader<R> {
    inner: R,
    pub pos: u64,
    /// Total length of the stream, when known: lengths beyond it are rejected before any
    /// allocation.
    pub len: Option<u64>,
}

/// The header of one msgpack value.
#[derive(Debug, Clone, PartialEq)]
pub enum Header {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(usize),
    Bin(usize),
    Array(usize),
    Map(usize),
    /// (type code, payload length)
    Ext(i8, usize),
}

impl Header {
    pub fn kind(&self) -> &'static str {
        match self {
            Header::Nil => "nil",
            Header::Bool(_) => "bool",
            Header::Int(_) => "int",
            Header::Float(_) => "float",
            Header::Str(_) => "str",
            Header::Bin(_) => "bin",
            Header::Array(_) => "array",
            Header::Map(_) => "map",
            Header::Ext(..) => "ext",
        }
    }
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R, len: Option<u64>) -> Self {
        Self { inner, pos: 0, len }
    }

    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Next byte, or `None` at a clean end of stream.
    pub fn peek_end(&mut self) -> io::Result<Option<u8>> {
        let mut b = [0u8; 1];
        loop {
            match self.inner.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    self.pos += 1;
                    return Ok(Some(b[0]));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn be(&mut self, n: usize) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b[8 - n..])?;
        Ok(u64::from_be_bytes(b))
    }

    /// Check a length against what is left of the stream.
    fn bounded(&self, n: u64) -> Result<usize> {
        if let Some(len) = self.len {
            if self.pos + n > len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "a value of {n} bytes at offset {} runs past the end of the stream ({len} bytes)",
                        self.pos
                    ),
                )
                .into());
            }
        }
        Ok(n as usize)
    }

    pub fn header(&mut self) -> Result<Header> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b)?;
        self.header_after(b[0])
    }

    /// Decode a header whose first byte (`marker`) was already consumed.
    pub fn header_after(&mut self, marker: u8) -> Result<Header> {
        let at = self.pos - 1;
        Ok(match marker {
            0x00..=0x7f => Header::Int(marker as i64),
            0x80..=0x8f => Header::Map((marker & 0x0f) as usize),
            0x90..=0x9f => Header::Array((marker & 0x0f) as usize),
            0xa0..=0xbf => Header::Str(self.bounded((marker & 0x1f) as u64)?),
            0xc0 => Header::Nil,
            0xc2 => Header::Bool(false),
            0xc3 => Header::Bool(true),
            0xc4 => Header::Bin(self.sized(1)?),
            0xc5 => Header::Bin(self.sized(2)?),
            0xc6 => Header::Bin(self.sized(4)?),
            0xc7..=0xc9 => {
                let n = self.sized(1 << (marker - 0xc7))?;
                let t = self.be(1)? as u8 as i8;
                Header::Ext(t, n)
            }
            0xca => Header::Float(f32::from_bits(self.be(4)? as u32) as f64),
            0xcb => Header::Float(f64::from_bits(self.be(8)?)),
            0xcc => Header::Int(self.be(1)? as i64),
            0xcd => Header::Int(self.be(2)? as i64),
            0xce => Header::Int(self.be(4)? as i64),
            0xcf => {
                let v = self.be(8)?;
                if v > i64::MAX as u64 {
                    bail!("msgpack: uint64 {v} at offset {at} is out of range");
                }
                Header::Int(v as i64)
            }
            0xd0 => Header::Int(self.be(1)? as u8 as i8 as i64),
            0xd1 => Header::Int(self.be(2)? as u16 as i16 as i64),
            0xd2 => Header::Int(self.be(4)? as u32 as i32 as i64),
            0xd3 => Header::Int(self.be(8)? as i64),
            0xd4..=0xd8 => {
                let n = 1usize << (marker - 0xd4);
                let t = self.be(1)? as u8 as i8;
                Header::Ext(t, self.bounded(n as u64)?)
            }
            0xd9 => Header::Str(self.sized(1)?),
            0xda => Header::Str(self.sized(2)?),
            0xdb => Header::Str(self.sized(4)?),
            0xdc => Header::Array(self.be(2)? as usize),
            0xdd => Header::Array(self.be(4)? as usize),
            0xde => Header::Map(self.be(2)? as usize),
            0xdf => Header::Map(self.be(4)? as usize),
            0xe0..=0xff => Header::Int(marker as i8 as i64),
            0xc1 => bail!("msgpack: invalid marker 0xc1 at offset {at}"),
        })
    }

    fn sized(&mut self, width: usize) -> Result<usize> {
        let n = self.be(width)?;
        self.bounded(n)
    }

    pub fn expect_array(&mut self, what: &str) -> Result<usize> {
        match self.header()? {
            Header::Array(n) => Ok(n),
            h => bail!("{what}: expected a msgpack array, found {}", h.kind()),
        }
    }

    pub fn expect_map(&mut self, what: &str) -> Result<usize> {
        match self.header()? {
            Header::Map(n) => Ok(n),
            h => bail!("{what}: expected a msgpack map, found {}", h.kind()),
        }
    }

    pub fn expect_int(&mut self, what: &str) -> Result<i64> {
        match self.header()? {
            Header::Int(v) => Ok(v),
            h => bail!("{what}: expected an integer, found {}", h.kind()),
        }
    }

    pub fn expect_bin(&mut self, what: &str) -> Result<usize> {
        match self.header()? {
            Header::Bin(n) => Ok(n),
            h => bail!("{what}: expected msgpack bin data, found {}", h.kind()),
        }
    }

    /// The body of a `Str` header of `n` bytes.
    pub fn str_body(&mut self, n: usize, what: &str) -> Result<String> {
        let mut buf = vec![0u8; n];
        self.read_exact(&mut buf)?;
        String::from_utf8(buf).map_err(|_| anyhow::anyhow!("{what}: string is not UTF-8"))
    }

    pub fn expect_str(&mut self, what: &str) -> Result<String> {
        match self.header()? {
            Header::Str(n) => self.str_body(n, what),
            h => bail!("{what}: expected a string, found {}", h.kind()),
        }
    }
}

impl<R: Read + Seek> Reader<R> {
    /// Skip `n` bytes without reading them (headers-only scans of huge files).
    pub fn skip(&mut self, n: usize) -> Result<()> {
        self.bounded(n as u64)?;
        self.inner.seek(SeekFrom::Current(n as i64))?;
        self.pos += n as u64;
        Ok(())
    }
}

/// Writes the msgpack subset the reader understands, with the smallest encodings (as
/// msgpack-python does, so files written here match the original's bytes).
pub struct Writer<W> {
    pub inner: W,
}

impl<W: Write> Writer<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    fn sized(&mut self, n: usize, small: Option<(u8, usize)>, markers: [u8; 3]) -> Result<()> {
        let w = &mut self.inner;
        match small {
            Some((base, max)) if n <= max => w.write_all(&[base | n as u8])?,
            _ if n <= 0xff && markers[0] != 0 => w.write_all(&[markers[0], n as u8])?,
            _ if n <= 0xffff => {
                w.write_all(&[markers[1]])?;
                w.write_all(&(n as u16).to_be_bytes())?;
            }
            _ => {
                w.write_all(&[markers[2]])?;
                w.write_all(&(n as u32).to_be_bytes())?;
            }
        }
        Ok(())
    }

    pub fn array(&mut self, n: usize) -> Result<()> {
        self.sized(n, Some((0x90, 15)), [0, 0xdc, 0xdd])
    }

    pub fn map(&mut self, n: usize) -> Result<()> {
        self.sized(n, Some((0x80, 15)), [0, 0xde, 0xdf])
    }

    pub fn str(&mut self, s: &str) -> Result<()> {
        self.sized(s.len(), Some((0xa0, 31)), [0xd9, 0xda, 0xdb])?;
        self.inner.write_all(s.as_bytes())?;
        Ok(())
    }

    pub fn bin_header(&mut self, n: usize) -> Result<()> {
        self.sized(n, None, [0xc4, 0xc5, 0xc6])
    }

    pub fn bool(&mut self, b: bool) -> Result<()> {
        self.inner.write_all(&[if b { 0xc3 } else { 0xc2 }])?;
        Ok(())
    }

    pub fn uint(&mut self, v: u64) -> Result<()> {
        let w = &mut self.inner;
        if v < 0x80 {
            w.write_all(&[v as u8])?;
        } else if v <= 0xff {
            w.write_all(&[0xcc, v as u8])?;
        } else if v <= 0xffff {
            w.write_all(&[0xcd])?;
            w.write_all(&(v as u16).to_be_bytes())?;
        } else if v <= 0xffff_ffff {
            w.write_all(&[0xce])?;
            w.write_all(&(v as u32).to_be_bytes())?;
        } else {
            w.write_all(&[0xcf])?;
            w.write_all(&v.to_be_bytes())?;
        }
        Ok(())
    }

    pub fn ext_header(&mut self, code: i8, n: usize) -> Result<()> {
        let w = &mut self.inner;
        let fixed = match n {
            1 => Some(0xd4),
            2 => Some(0xd5),
            4 => Some(0xd6),
            8 => Some(0xd7),
            16 => Some(0xd8),
            _ => None,
        };
        match fixed {
            Some(m) => w.write_all(&[m, code as u8])?,
            None if n <= 0xff => w.write_all(&[0xc7, n as u8, code as u8])?,
            None if n <= 0xffff => {
                w.write_all(&[0xc8])?;
                w.write_all(&(n as u16).to_be_bytes())?;
                w.write_all(&[code as u8])?;
            }
            None => {
                w.write_all(&[0xc9])?;
                w.write_all(&(n as u32).to_be_bytes())?;
                w.write_all(&[code as u8])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_writer() {
        let mut buf = Vec::new();
        {
            let mut w = Writer::new(&mut buf);
            w.array(2).unwrap();
            w.str("scan_decoder").unwrap();
            w.map(70_000).unwrap();
            w.uint(300).unwrap();
            w.bin_header(70_000).unwrap();
            w.ext_header(1, 16).unwrap();
            w.ext_header(1, 1000).unwrap();
            w.bool(true).unwrap();
        }
        let mut r = Reader::new(&buf[..], None);
        assert_eq!(r.header().unwrap(), Header::Array(2));
        assert_eq!(r.expect_str("k").unwrap(), "scan_decoder");
        assert_eq!(r.header().unwrap(), Header::Map(70_000));
        assert_eq!(r.header().unwrap(), Header::Int(300));
        assert_eq!(r.header().unwrap(), Header::Bin(70_000));
        assert_eq!(r.header().unwrap(), Header::Ext(1, 16));
        assert_eq!(r.header().unwrap(), Header::Ext(1, 1000));
        assert_eq!(r.header().unwrap(), Header::Bool(true));
    }

    #[test]
    fn lengths_past_the_end_are_rejected_before_allocating() {
        let buf = [0xc6u8, 0x7f, 0xff, 0xff, 0xff];
        let mut r = Reader::new(&buf[..], Some(buf.len() as u64));
        let e = r.header().unwrap_err();
        assert!(format!("{e}").contains("past the end"), "{e}");
    }
}
