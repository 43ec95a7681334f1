//! Inputs that crashed the GGUF reader (see `fuzz/fuzz_targets/gguf.rs` and docs/fuzz.md):
//! each is now one clean error naming the problem.

use lwm_core::weights::gguf::{read_content, GgufFile};

/// A GGUF v3 file: metadata `(key, type, value bytes)`, tensors `(name, dims innermost
/// first, ggml type, offset)`, then `data` after the aligned header.
fn gguf(
    meta: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, &[u64], u32, u64)],
    data: &[u8],
) -> Vec<u8> {
    let s = |v: &mut Vec<u8>, x: &str| {
        v.extend((x.len() as u64).to_le_bytes());
        v.extend(x.as_bytes());
    };
    let mut v = b"GGUF".to_vec();
    v.extend(3u32.to_le_bytes());
    v.extend((tensors.len() as u64).to_le_bytes());
    v.extend((meta.len() as u64).to_le_bytes());
    for (k, t, val) in meta {
        s(&mut v, k);
        v.extend(t.to_le_bytes());
        v.extend(val);
    }
    for (name, dims, t, off) in tensors {
        s(&mut v, name);
        v.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            v.extend(d.to_le_bytes());
        }
        v.extend(t.to_le_bytes());
        v.extend(off.to_le_bytes());
    }
    while !v.len().is_multiple_of(32) {
        v.push(0);
    }
    v.extend(data);
    v
}

fn str_val(x: &str) -> Vec<u8> {
    let mut v = (x.len() as u64).to_le_bytes().to_vec();
    v.extend(x.as_bytes());
    v
}

fn u32_val(x: u32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

fn write(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lwm-fuzz-regress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open_err(name: &str, bytes: &[u8]) -> String {
    let p = write(name, bytes);
    let e = match GgufFile::open(&p) {
        Ok(_) => panic!("{name}: opened"),
        Err(e) => format!("{e:#}"),
    };
    std::fs::remove_file(p).ok();
    e
}

#[test]
fn zero_alignment_is_refused_before_candle_divides_by_it() {
    // candle's reader computes `position.div_ceil(alignment)`: 0 panicked there.
    for t in [0u32, 2, 4] {
        let val = match t {
            0 => vec![0u8],
            2 => vec![0, 0],
            _ => vec![0, 0, 0, 0],
        };
        let f = gguf(&[("general.alignment", t, val)], &[], &[]);
        let e = open_err("align0.gguf", &f);
        assert!(e.contains("general.alignment is 0"), "{e}");
        let p = write("align0-tok.gguf", &f);
        let e = format!(
            "{:#}",
            lwm_core::tokenizer::Tokenizer::from_file(&p).err().unwrap()
        );
        assert!(e.contains("general.alignment is 0"), "{e}");
    }
    // A valid alignment after other keys (strings, arrays) is still found and used.
    let arr = {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend(2u64.to_le_bytes());
        v.extend(str_val("a"));
        v.extend(str_val("bc"));
        v
    };
    let f = gguf(
        &[("x", 9, arr), ("general.alignment", 4, u32_val(64))],
        &[],
        &[],
    );
    let p = write("align64.gguf", &f);
    let (c, _, _) = read_content(&p).unwrap();
    assert_eq!(c.tensor_data_offset % 64, 0);
}

#[test]
fn tensor_shape_whose_element_count_overflows_is_refused() {
    // 2^32 x 2^32 elements: the product overflowed.
    let f = gguf(&[], &[("t", &[1 << 32, 1 << 32], 0, 0)], &[]);
    let e = open_err("dims.gguf", &f);
    assert!(
        e.contains("tensor 't'") && e.contains("element count overflows"),
        "{e}"
    );
}

#[test]
fn tensor_offset_past_any_file_size_is_refused() {
    // data offset + tensor offset overflowed u64.
    let f = gguf(&[], &[("t", &[8], 0, u64::MAX - 4)], &[0; 32]);
    let e = open_err("offset.gguf", &f);
    assert!(
        e.contains("tensor 't'") && e.contains("ends past any possible file size"),
        "{e}"
    );
}

#[test]
fn token_embedding_without_dimensions_is_an_error() {
    // `embd.shape.dims()[0]` indexed an empty shape when vocab_size was absent.
    let meta = [
        ("general.architecture", 8, str_val("llama")),
        ("llama.embedding_length", 4, u32_val(4)),
        ("llama.attention.head_count", 4, u32_val(1)),
        ("llama.feed_forward_length", 4, u32_val(4)),
        ("llama.block_count", 4, u32_val(1)),
    ];
    let f = gguf(&meta, &[("token_embd.weight", &[], 0, 0)], &[0; 32]);
    let p = write("embd0.gguf", &f);
    let g = GgufFile::open(&p).unwrap();
    let e = format!("{:#}", g.config().unwrap_err());
    assert!(e.contains("'token_embd.weight' has no dimensions"), "{e}");
}

#[test]
fn tensor_without_elements_is_refused() {
    // Found by the gguf fuzz target (debug assertions on): a 0-element F32 tensor made
    // candle build a slice of f32 from the empty buffer's dangling, unaligned pointer
    // (`slice::from_raw_parts` precondition) when the tensor was loaded.
    let f = gguf(&[], &[("output_norm.weight", &[0], 0, 0)], &[0; 32]);
    let e = open_err("empty.gguf", &f);
    assert!(
        e.contains("tensor 'output_norm.weight' has shape [0], which holds no elements"),
        "{e}"
    );
}

/// A tokenizer.json whose vocabulary gives one token the id 3 888 888 888 (found by the
/// tokenizer fuzzer, `fuzz/found/tokenizer-huge-token-id`; its first byte picks the file
/// name): the id table would have taken 93 GB and the process aborted. Now one error naming
/// the token and its id.
#[test]
fn a_token_id_far_past_the_vocabulary_is_refused_before_sizing_a_table() {
    let err = tokenizer_json_err(
        "huge-id",
        include_bytes!("../../../fuzz/found/tokenizer-huge-token-id"),
    );
    assert!(err.contains("3888888888") && err.contains("\"l\""), "{err}");
}

/// The error of loading a tokenizer fuzz input (its first byte picks the file name; these
/// pick tokenizer.json) from its own directory `dir`.
fn tokenizer_json_err(dir: &str, input: &[u8]) -> String {
    assert_eq!(input[0] % 3, 0, "the fuzz input selects tokenizer.json");
    let p = write(&format!("{dir}/tokenizer.json"), &input[1..]);
    let err = match lwm_core::tokenizer::Tokenizer::from_file(&p) {
        Ok(_) => panic!("{dir}: loaded"),
        Err(e) => format!("{e:#}"),
    };
    std::fs::remove_file(p).ok();
    err
}

/// A BPE tokenizer.json whose vocabulary holds single letters and whose merges include
/// `l l` (found by the tokenizer fuzzer, `fuzz/found/tokenizer-merge-longer-than-vocab`):
/// the `tokenizers` crate sliced a buffer as long as the longest entry and panicked. Now
/// one error naming the merge.
#[test]
fn a_merge_longer_than_every_vocabulary_entry_is_refused_without_a_panic() {
    let err = tokenizer_json_err(
        "merges",
        include_bytes!("../../../fuzz/found/tokenizer-merge-longer-than-vocab"),
    );
    assert!(
        err.contains("\"H\" + \"e\"") && err.contains("longer than any"),
        "{err}"
    );
}

/// `general.alignment` 0 under the key `general.alignment\0\0\0` (found by the gguf fuzzer,
/// `fuzz/found/gguf-alignment-nul-padded-key`): the check compared the key as written,
/// candle drops trailing NULs and divided by the 0. Now the same error as the plain key.
#[test]
fn an_alignment_under_a_nul_padded_key_is_checked_as_candle_reads_it() {
    let input = include_bytes!("../../../fuzz/found/gguf-alignment-nul-padded-key");
    let err = open_err("nul-key.gguf", input);
    assert!(err.contains("general.alignment is 0"), "{err}");
    let p = write("nul-key-content.gguf", input);
    assert!(read_content(&p).is_err());
    std::fs::remove_file(p).ok();
}
