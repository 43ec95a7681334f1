//! Prompt-cache files (`--prompt-cache FILE`): the KV state of a prefilled prompt, saved so
//! a later prompt that starts with the same tokens skips their prefill.
//!
//! Layout (little-endian):
//!
//! ```text
//!   magic     8 bytes  "LWMKVC\0\0"
//!   version   u32      1
//!   identity  u64      model identity (weights file metadata, config, numerics)
//!   k_type    u8       KvType code      v_type u8     reserved u16 (0)
//!   n_layers  u32      n_kv_heads u32   head_dim u32
//!   n_tokens  u64
//!   tokens    n_tokens × u32
//!   rows      per layer, per KV head: n_tokens key rows, then n_tokens value rows
//!   checksum  u64      `Checksum` of every byte before it
//! ```
//!
//! A file is only used when every header field matches the running model and cache types
//! and the checksum and exact length agree; anything else is reported and ignored. Writes go
//! to a temporary file in the same directory, then rename, so a reader never sees half a file.

use anyhow::{bail, Context, Result};
use lwm_core::config::ModelConfig;
use lwm_core::kv::KvType;
use lwm_core::kv::{KvCache, KvTypes};
use lwm_core::model::Numerics;
use lwm_core::weights::digest::Checksum;
use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"LWMKVC\0\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 8 + 4 + 12 + 8;

/// Identity of a running model: its weights digest, the config in effect (theta, scaling,
/// shapes) and the numerics, everything that changes the keys and values.
pub fn model_identity(weights_digest: u64, config: &ModelConfig, numerics: Numerics) -> u64 {
    let mut c = Checksum::default();
    c.write(&weights_digest.to_le_bytes());
    c.write(serde_json::to_string(config).unwrap_or_default().as_bytes());
    c.write(format!("{numerics:?}").as_bytes());
    c.finish()
}

/// Save the first `n_tokens` tokens of `cache` to `path` (atomically).
pub fn save(path: &Path, identity: u64, cache: &KvCache, n_tokens: usize) -> Result<()> {
    if cache.has_evicted() {
        bail!("a KV cache whose rows a KV policy evicted cannot be saved as a prompt cache");
    }
    let n = n_tokens.min(cache.len());
    let d = cache.head_dim;
    let (kb, vb) = (cache.types.k.row_bytes(d), cache.types.v.row_bytes(d));
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let write = || -> Result<()> {
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        let mut sum = Checksum::default();
        let mut put = |b: &[u8]| -> Result<()> {
            sum.write(b);
            out.write_all(b)?;
            Ok(())
        };
        put(MAGIC)?;
        put(&VERSION.to_le_bytes())?;
        put(&identity.to_le_bytes())?;
        put(&[cache.types.k.code(), cache.types.v.code(), 0, 0])?;
        let n_kv = cache.layers.first().map_or(0, |l| l.k.len());
        put(&(cache.layers.len() as u32).to_le_bytes())?;
        put(&(n_kv as u32).to_le_bytes())?;
        put(&(d as u32).to_le_bytes())?;
        put(&(n as u64).to_le_bytes())?;
        let ids: Vec<u8> = cache.tokens()[..n]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        put(&ids)?;
        for l in &cache.layers {
            for h in 0..n_kv {
                put(&l.k[h][..n * kb])?;
                put(&l.v[h][..n * vb])?;
            }
        }
        let total = sum.finish();
        out.write_all(&total.to_le_bytes())?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write prompt cache {}", path.display())));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move prompt cache into place at {}", path.display()))?;
    if let Some(dir) = dir {
        // Make the rename durable; failure here loses nothing but durability.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

impl crate::generate::Engine {
    /// Identity of this model as loaded (weights, config in effect, numerics).
    pub fn model_identity(&self) -> u64 {
        model_identity(
            self.weights_digest,
            &self.model.config,
            self.model.options.numerics,
        )
    }

    /// What a prompt-cache file must hold to be used with this engine.
    pub fn prompt_cache_expect(&self) -> Expect {
        let c = &self.model.config;
        Expect {
            identity: self.model_identity(),
            types: self.model.options.kv_types(),
            n_layers: c.num_hidden_layers,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
        }
    }

    /// The cache stored in `path` when it is valid for this engine; otherwise an empty
    /// cache and the reason the file was not used (`None` reason when there is no file).
    pub fn open_prompt_cache(&self, path: &Path) -> (KvCache, Option<String>) {
        if !path.exists() {
            return (self.model.new_cache(), None);
        }
        match load(path, &self.prompt_cache_expect()) {
            Ok(c) => (c, None),
            Err(e) => (self.model.new_cache(), Some(format!("{e:#}"))),
        }
    }

    /// Save the first `n_tokens` tokens of `cache` to `path` (atomic), unless the file
    /// already starts with exactly those tokens (nothing new to keep).
    pub fn save_prompt_cache(&self, path: &Path, cache: &KvCache, n_tokens: usize) -> Result<()> {
        let n = n_tokens.min(cache.len());
        if let Some(old) = peek_tokens(path, &self.prompt_cache_expect()) {
            if old.len() >= n && old[..n] == cache.tokens()[..n] {
                return Ok(());
            }
        }
        save(path, self.model_identity(), cache, n)
    }
}

/// What a running model expects of a cache file.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub identity: u64,
    pub types: KvTypes,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
}

/// The token ids of a cache file whose header matches `want`, reading only the header and
/// ids (to decide whether saving would add anything; never used to trust the rows).
fn peek_tokens(path: &Path, want: &Expect) -> Option<Vec<u32>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; HEADER_BYTES];
    f.read_exact(&mut head).ok()?;
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    let ok = &head[..8] == MAGIC
        && u32_at(8) == VERSION
        && u64_at(12) == want.identity
        && KvType::from_code(head[20]) == Some(want.types.k)
        && KvType::from_code(head[21]) == Some(want.types.v);
    let n = u64_at(36) as usize;
    if !ok || n > f.metadata().ok()?.len() as usize / 4 {
        return None;
    }
    let mut ids = vec![0u8; 4 * n];
    f.read_exact(&mut ids).ok()?;
    Some(
        ids.chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
    )
}

/// Load a cache file, checking every field against `want`; any mismatch or damage is an
/// error naming it (the caller warns and starts from an empty cache).
pub fn load(path: &Path, want: &Expect) -> Result<KvCache> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes, want).with_context(|| format!("prompt cache {}", path.display()))
}

fn parse(bytes: &[u8], want: &Expect) -> Result<KvCache> {
    if bytes.len() < HEADER_BYTES + 8 || &bytes[..8] != MAGIC {
        bail!("not an lwm prompt cache (bad magic or too short)");
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        bail!("format version {version}, this lwm reads version {VERSION}");
    }
    let body = &bytes[..bytes.len() - 8];
    let mut sum = Checksum::default();
    sum.write(body);
    if sum.finish() != u64_at(bytes.len() - 8) {
        bail!("checksum mismatch (the file is corrupt or truncated)");
    }
    if u64_at(12) != want.identity {
        bail!("it was made by a different model or settings (weights, config, theta or numerics differ)");
    }
    let (k_type, v_type) = (
        KvType::from_code(bytes[20]).context("unknown key type code")?,
        KvType::from_code(bytes[21]).context("unknown value type code")?,
    );
    let types = KvTypes {
        k: k_type,
        v: v_type,
    };
    if types != want.types {
        bail!(
            "it holds a {} KV cache, this run uses {}",
            types.name(),
            want.types.name()
        );
    }
    let (n_layers, n_kv, d) = (
        u32_at(24) as usize,
        u32_at(28) as usize,
        u32_at(32) as usize,
    );
    if (n_layers, n_kv, d) != (want.n_layers, want.n_kv_heads, want.head_dim) {
        bail!("shape {n_layers} layers × {n_kv} KV heads × {d} does not match the model");
    }
    let n = u64_at(36) as usize;
    let (kb, vb) = (types.k.row_bytes(d), types.v.row_bytes(d));
    let expect_len = (n as u128) * 4 + (n_layers * n_kv) as u128 * n as u128 * (kb + vb) as u128;
    if (body.len() - HEADER_BYTES) as u128 != expect_len {
        bail!("length does not match its header ({n} tokens)");
    }
    let mut off = HEADER_BYTES;
    let tokens: Vec<u32> = bytes[off..off + 4 * n]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= want.vocab_size) {
        bail!("token id {t} is outside the vocabulary");
    }
    off += 4 * n;
    let mut cache = KvCache::with_types(n_layers, n_kv, d, types);
    for l in &mut cache.layers {
        for h in 0..n_kv {
            l.k[h] = bytes[off..off + n * kb].to_vec();
            off += n * kb;
            l.v[h] = bytes[off..off + n * vb].to_vec();
            off += n * vb;
        }
    }
    cache.commit(&tokens);
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (KvCache, Expect) {
        let types = KvTypes::parse("q8_0,f16").unwrap();
        let mut c = KvCache::with_types(2, 3, 32, types);
        let x = lwm_core::rng::XorShift::new(5).vec(7 * 3 * 32, -1.0, 1.0);
        for l in 0..2 {
            c.append(l, &x, &x, 7);
        }
        c.commit(&[1, 2, 3, 4, 5, 6, 7]);
        let want = Expect {
            identity: 42,
            types,
            n_layers: 2,
            n_kv_heads: 3,
            head_dim: 32,
            vocab_size: 100,
        };
        (c, want)
    }

    #[test]
    fn roundtrip_and_every_damage_is_refused() {
        let (c, want) = sample();
        let dir = std::env::temp_dir().join(format!("lwm-pc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.kvc");
        save(&p, 42, &c, 5).unwrap();
        let back = load(&p, &want).unwrap();
        assert_eq!(back.tokens(), &[1, 2, 3, 4, 5]);
        let mut c5 = c.clone();
        c5.truncate(5);
        assert_eq!(back.layers[1].v[2], c5.layers[1].v[2]);
        assert_eq!(back.layers[0].k[0], c5.layers[0].k[0]);
        let good = std::fs::read(&p).unwrap();
        let refuse = |bytes: &[u8], want: &Expect, needle: &str| {
            let e = parse(bytes, want).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x10;
        refuse(&flipped, &want, "checksum");
        refuse(&good[..good.len() - 3], &want, "checksum");
        refuse(&good[..10], &want, "magic");
        refuse(
            &good,
            &Expect {
                identity: 7,
                ..want
            },
            "different model",
        );
        refuse(
            &good,
            &Expect {
                types: KvTypes::F16,
                ..want
            },
            "q8_0,f16 KV cache",
        );
        refuse(
            &good,
            &Expect {
                head_dim: 64,
                ..want
            },
            "shape",
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
