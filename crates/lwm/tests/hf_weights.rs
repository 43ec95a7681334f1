//! `lwm::weights::hf`: Hugging Face model directories (safetensors single/sharded, PyTorch
//! zip pickles) and every kind of bad input they can come with. The files are written here by
//! hand (safetensors header + data; PyTorch zip with a hand-assembled pickle) so the tests do
//! not depend on the reader's own writer.

use candle_core::DType;
use lwm::weights::hf::{load_hf_config, HfWeights};
use lwm::weights::{Weight, WeightSource};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

// ------------------------------------------------------------------------------- helpers

fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "lwm-hf-test-{}-{tag}-{n}-{nanos}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the directory when the test ends (also on panic).
struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let text = format!("{e:#}");
            eprintln!("error: {text}");
            text
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect()
}
fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect()
}
fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

struct St<'a> {
    name: &'a str,
    dtype: &'a str,
    shape: &'a [usize],
    data: Vec<u8>,
}

/// Serialize a safetensors file: u64 LE header length, JSON header (space-padded to 8), data.
fn safetensors_bytes(tensors: &[St]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut data = Vec::new();
    for t in tensors {
        header.insert(
            t.name.into(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
        data.extend_from_slice(&t.data);
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// Raw header bytes + data: for corrupt-header cases.
fn safetensors_raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

const EMB: [f32; 12] = [
    0.5, -1.0, 2.0, 0.25, -0.125, 3.0, 1.5, -2.5, 0.0, 4.0, -0.75, 1.0,
];
const NORM: [f32; 4] = [1.0, 0.5, -0.25, 2.0];

/// The tensor widened to f32 (HF weights load dense, in the file's float type).
fn dense(w: Weight) -> candle_core::Tensor {
    match w {
        Weight::Dense(t) => t.to_dtype(DType::F32).unwrap(),
        Weight::Quant(_) => panic!("HF weights must load dense"),
    }
}

/// Shape, stored dtype and values (widened to f32).
fn values(w: Weight) -> (Vec<usize>, DType, Vec<f32>) {
    let dtype = match &w {
        Weight::Dense(t) => t.dtype(),
        Weight::Quant(_) => panic!("HF weights must load dense"),
    };
    let t = dense(w);
    let dims = t.dims().to_vec();
    (
        dims,
        dtype,
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )
}

fn basic_model(dir: &Path) {
    let bytes = safetensors_bytes(&[
        St {
            name: "model.embed_tokens.weight",
            dtype: "F32",
            shape: &[3, 4],
            data: f32_bytes(&EMB),
        },
        St {
            name: "model.norm.weight",
            dtype: "F16",
            shape: &[4],
            data: f16_bytes(&NORM),
        },
        St {
            name: "lm_head.weight",
            dtype: "BF16",
            shape: &[3, 4],
            data: bf16_bytes(&EMB),
        },
    ]);
    write(&dir.join("model.safetensors"), &bytes);
}

// ------------------------------------------------------------------------------- good paths

#[test]
fn single_safetensors_loads_f32_f16_bf16_dense_in_their_own_type() {
    let dir = temp_dir("single");
    let _c = Cleanup(dir.clone());
    basic_model(&dir);
    let w = HfWeights::open(&dir).unwrap();
    assert_eq!(w.origin(), dir.display().to_string());
    assert_eq!(
        w.names(),
        vec![
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.norm.weight"
        ]
    );
    assert!(w.contains("model.norm.weight"));
    assert!(!w.contains("model.layers.0.mlp.up_proj.weight"));
    assert_eq!(w.shape("lm_head.weight"), Some(vec![3, 4]));
    assert_eq!(w.stored_dtype("model.norm.weight").as_deref(), Some("F16"));

    let (dims, dtype, v) = values(w.load("model.embed_tokens.weight").unwrap());
    assert_eq!((dims, dtype), (vec![3, 4], DType::F32));
    assert_eq!(v, EMB);
    let (dims, dtype, v) = values(w.load("model.norm.weight").unwrap());
    assert_eq!((dims, dtype), (vec![4], DType::F16));
    assert_eq!(v, NORM); // exactly representable in f16
    let (dims, dtype, v) = values(w.load("lm_head.weight").unwrap());
    assert_eq!((dims, dtype), (vec![3, 4], DType::BF16));
    assert_eq!(v, EMB); // exactly representable in bf16
    assert_eq!(w.load("lm_head.weight").unwrap().type_name(), "BF16");
}

#[test]
fn sharded_safetensors_follow_the_index() {
    let dir = temp_dir("sharded");
    let _c = Cleanup(dir.clone());
    let s1 = safetensors_bytes(&[
        St {
            name: "model.embed_tokens.weight",
            dtype: "F32",
            shape: &[3, 4],
            data: f32_bytes(&EMB),
        },
        St {
            name: "model.layers.0.input_layernorm.weight",
            dtype: "F32",
            shape: &[4],
            data: f32_bytes(&NORM),
        },
    ]);
    let s2 = safetensors_bytes(&[
        St {
            name: "model.norm.weight",
            dtype: "BF16",
            shape: &[4],
            data: bf16_bytes(&NORM),
        },
        St {
            name: "lm_head.weight",
            dtype: "F16",
            shape: &[3, 4],
            data: f16_bytes(&EMB),
        },
    ]);
    write(&dir.join("model-00001-of-00002.safetensors"), &s1);
    write(&dir.join("model-00002-of-00002.safetensors"), &s2);
    let index = serde_json::json!({
        "metadata": {"total_size": 0},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.input_layernorm.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    });
    write(
        &dir.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    );

    let w = HfWeights::open(&dir).unwrap();
    assert_eq!(w.files().len(), 2);
    assert_eq!(w.names().len(), 4);
    assert_eq!(
        values(w.load("model.layers.0.input_layernorm.weight").unwrap()).2,
        NORM
    );
    assert_eq!(values(w.load("model.norm.weight").unwrap()).2, NORM);
    let (dims, dtype, v) = values(w.load("lm_head.weight").unwrap());
    assert_eq!((dims, dtype, v), (vec![3, 4], DType::F16, EMB.to_vec()));
}

// --- PyTorch zip pickles, assembled by hand (protocol 2, as torch.save writes state dicts)

fn pkl_str(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
}
fn pkl_int(p: &mut Vec<u8>, v: usize) {
    p.push(b'J');
    p.extend((v as i32).to_le_bytes());
}
fn pkl_global(p: &mut Vec<u8>, module: &str, name: &str) {
    p.push(b'c');
    p.extend(module.as_bytes());
    p.push(b'\n');
    p.extend(name.as_bytes());
    p.push(b'\n');
}
fn pkl_ordered_dict(p: &mut Vec<u8>) {
    pkl_global(p, "collections", "OrderedDict");
    p.push(b')'); // EMPTY_TUPLE
    p.push(b'R'); // REDUCE
}

/// (name, storage class, shape, raw little-endian data)
type PtEntry<'a> = (&'a str, &'a str, &'a [usize], Vec<u8>);

fn pytorch_zip(path: &Path, entries: &[PtEntry]) {
    let mut p = vec![0x80, 2];
    pkl_ordered_dict(&mut p);
    p.push(b'('); // MARK for SETITEMS
    for (key, (name, storage, shape, data)) in entries.iter().enumerate() {
        let elem = match *storage {
            "FloatStorage" => 4,
            "HalfStorage" | "BFloat16Storage" => 2,
            "LongStorage" | "DoubleStorage" => 8,
            _ => 1,
        };
        let numel: usize = shape.iter().product();
        assert_eq!(numel * elem, data.len());
        pkl_str(&mut p, name);
        pkl_global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.push(b'('); // args
        p.push(b'('); // persistent id tuple
        pkl_str(&mut p, "storage");
        pkl_global(&mut p, "torch", storage);
        pkl_str(&mut p, &key.to_string());
        pkl_str(&mut p, "cpu");
        pkl_int(&mut p, numel);
        p.push(b't');
        p.push(b'Q'); // BINPERSID
        pkl_int(&mut p, 0); // storage offset
        p.push(b'(');
        for d in shape.iter() {
            pkl_int(&mut p, *d);
        }
        p.push(b't');
        p.push(b'(');
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        for s in &stride {
            pkl_int(&mut p, *s);
        }
        p.push(b't');
        p.push(0x89); // requires_grad = False
        pkl_ordered_dict(&mut p); // backward hooks
        p.push(b't');
        p.push(b'R');
    }
    p.push(b'u'); // SETITEMS
    p.push(b'.');

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&p).unwrap();
    for (key, (_, _, _, data)) in entries.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn pytorch_bin_loads_and_rejects_integer_tensors() {
    let dir = temp_dir("pth");
    let _c = Cleanup(dir.clone());
    pytorch_zip(
        &dir.join("pytorch_model.bin"),
        &[
            (
                "model.embed_tokens.weight",
                "FloatStorage",
                &[3, 4],
                f32_bytes(&EMB),
            ),
            (
                "model.norm.weight",
                "BFloat16Storage",
                &[4],
                bf16_bytes(&NORM),
            ),
            ("lm_head.weight", "HalfStorage", &[3, 4], f16_bytes(&EMB)),
            (
                "model.position_ids",
                "LongStorage",
                &[2],
                i64_bytes(&[0, 1]),
            ),
        ],
    );
    let w = HfWeights::open(&dir).unwrap();
    assert_eq!(w.names().len(), 4, "{:?}", w.names());
    let (dims, dtype, v) = values(w.load("model.embed_tokens.weight").unwrap());
    assert_eq!((dims, dtype, v), (vec![3, 4], DType::F32, EMB.to_vec()));
    assert_eq!(values(w.load("model.norm.weight").unwrap()).2, NORM);
    assert_eq!(values(w.load("lm_head.weight").unwrap()).2, EMB);
    let e = err_text(w.load("model.position_ids"));
    assert!(
        e.contains("model.position_ids") && e.contains("I64") && e.contains("pytorch_model.bin"),
        "{e}"
    );
}

#[test]
fn sharded_pytorch_bin_follow_the_index() {
    let dir = temp_dir("pth-sharded");
    let _c = Cleanup(dir.clone());
    pytorch_zip(
        &dir.join("pytorch_model-00001-of-00002.bin"),
        &[(
            "model.embed_tokens.weight",
            "FloatStorage",
            &[3, 4],
            f32_bytes(&EMB),
        )],
    );
    pytorch_zip(
        &dir.join("pytorch_model-00002-of-00002.bin"),
        &[("model.norm.weight", "FloatStorage", &[4], f32_bytes(&NORM))],
    );
    let index = serde_json::json!({"weight_map": {
        "model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin",
        "model.norm.weight": "pytorch_model-00002-of-00002.bin",
    }});
    write(
        &dir.join("pytorch_model.bin.index.json"),
        index.to_string().as_bytes(),
    );
    let w = HfWeights::open(&dir).unwrap();
    assert_eq!(
        w.names(),
        vec!["model.embed_tokens.weight", "model.norm.weight"]
    );
    assert_eq!(values(w.load("model.norm.weight").unwrap()).2, NORM);
    assert_eq!(values(w.load("model.embed_tokens.weight").unwrap()).2, EMB);
}

#[test]
fn tiny_llama_fixture_has_every_canonical_tensor() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/hf");
    let cfg = load_hf_config(&dir).unwrap();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (256, 64, 160, 2)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (4, 2, 16)
    );
    assert_eq!(cfg.theta, 10000.0);
    assert!(!cfg.tie_word_embeddings);
    let w = HfWeights::open(&dir).unwrap();
    let (h, f, v, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let q = cfg.num_attention_heads * cfg.head_dim;
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
        ("lm_head.weight".into(), vec![v, h]),
    ];
    for i in 0..cfg.num_hidden_layers {
        let l = |s: &str| format!("model.layers.{i}.{s}");
        expected.extend([
            (l("input_layernorm.weight"), vec![h]),
            (l("post_attention_layernorm.weight"), vec![h]),
            (l("self_attn.q_proj.weight"), vec![q, h]),
            (l("self_attn.k_proj.weight"), vec![kv, h]),
            (l("self_attn.v_proj.weight"), vec![kv, h]),
            (l("self_attn.o_proj.weight"), vec![h, q]),
            (l("mlp.gate_proj.weight"), vec![f, h]),
            (l("mlp.up_proj.weight"), vec![f, h]),
            (l("mlp.down_proj.weight"), vec![h, f]),
        ]);
    }
    assert_eq!(w.names().len(), expected.len());
    for (name, dims) in expected {
        let t = dense(w.load(&name).unwrap());
        assert_eq!(t.dims(), dims.as_slice(), "{name}");
        assert_eq!(t.dtype(), DType::F32);
    }
}

// ------------------------------------------------------------------------------- bad input

#[test]
fn missing_directory_is_named() {
    let dir = std::env::temp_dir().join("lwm-hf-test-definitely-missing-dir");
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("does not exist") && e.contains(&dir.display().to_string()),
        "{e}"
    );
}

#[test]
fn directory_without_weights_is_named() {
    let dir = temp_dir("empty");
    let _c = Cleanup(dir.clone());
    write(&dir.join("config.json"), b"{}");
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("no model.safetensors, model.safetensors.index.json or pytorch_model.bin in")
            && e.contains(&dir.display().to_string()),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_are_rejected_at_open() {
    let dir = temp_dir("truncated");
    let _c = Cleanup(dir.clone());
    basic_model(&dir);
    let path = dir.join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    write(&path, &full[..full.len() - 5]);
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("truncated") && e.contains("model.safetensors"),
        "{e}"
    );
    // The named tensor is the one that runs past the end.
    assert!(
        e.contains("lm_head.weight")
            || e.contains("model.norm.weight")
            || e.contains("model.embed_tokens.weight"),
        "{e}"
    );

    // Cut inside the header: the header length now exceeds the file.
    write(&path, &full[..40]);
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("truncated") && e.contains("model.safetensors"),
        "{e}"
    );

    // Shorter than the 8-byte length prefix.
    write(&path, &full[..5]);
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("truncated") && e.contains("model.safetensors"),
        "{e}"
    );

    // Empty file.
    write(&path, b"");
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("truncated") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn offsets_past_the_end_are_caught_even_with_a_valid_header() {
    let dir = temp_dir("offsets");
    let _c = Cleanup(dir.clone());
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"lm_head.weight":{"dtype":"F32","shape":[1000],"data_offsets":[16,4016]}}"#;
    write(
        &dir.join("model.safetensors"),
        &safetensors_raw(header, &f32_bytes(&[1.0; 8])),
    );
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("truncated") && e.contains("lm_head.weight") && e.contains("4016"),
        "{e}"
    );
}

#[test]
fn corrupt_headers_are_rejected() {
    let dir = temp_dir("corrupt");
    let _c = Cleanup(dir.clone());
    let path = dir.join("model.safetensors");

    write(
        &path,
        &safetensors_raw(
            b"{\"model.norm.weight\": {\"dtype\": \"F32\", \"sha",
            &[0u8; 16],
        ),
    );
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("corrupt") && e.contains("model.safetensors"),
        "{e}"
    );

    write(&path, &safetensors_raw(&[0xff; 24], &[0u8; 16]));
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("corrupt") && e.contains("model.safetensors"),
        "{e}"
    );

    // An entry with the wrong field types.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":"four","data_offsets":[0,16]}}"#;
    write(&path, &safetensors_raw(header, &[0u8; 16]));
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("corrupt") && e.contains("model.norm.weight"),
        "{e}"
    );

    // Shape and byte span disagree.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#;
    write(&path, &safetensors_raw(header, &[0u8; 16]));
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("model.norm.weight") && e.contains("16 bytes"),
        "{e}"
    );

    // Reversed offsets.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#;
    write(&path, &safetensors_raw(header, &[0u8; 16]));
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("corrupt") && e.contains("model.norm.weight"),
        "{e}"
    );
}

#[test]
fn index_naming_a_missing_shard_is_named() {
    let dir = temp_dir("missing-shard");
    let _c = Cleanup(dir.clone());
    let s1 = safetensors_bytes(&[St {
        name: "model.norm.weight",
        dtype: "F32",
        shape: &[4],
        data: f32_bytes(&NORM),
    }]);
    write(&dir.join("model-00001-of-00002.safetensors"), &s1);
    let index = serde_json::json!({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }});
    write(
        &dir.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    );
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("model-00002-of-00002.safetensors")
            && e.contains("missing")
            && e.contains("model.safetensors.index.json"),
        "{e}"
    );

    // The index points a tensor at a shard that does not hold it.
    let index = serde_json::json!({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00001-of-00002.safetensors",
    }});
    write(
        &dir.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    );
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("lm_head.weight") && e.contains("model-00001-of-00002.safetensors"),
        "{e}"
    );

    // Not JSON at all.
    write(
        &dir.join("model.safetensors.index.json"),
        b"{\"weight_map\": ",
    );
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("not a valid shard index"),
        "{e}"
    );

    // A shard path that escapes the directory.
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "../model-00001-of-00002.safetensors"}});
    write(
        &dir.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    );
    let e = err_text(HfWeights::open(&dir));
    assert!(e.contains("invalid shard file"), "{e}");
}

#[test]
fn missing_tensor_on_load_names_tensor_and_directory() {
    let dir = temp_dir("missing-tensor");
    let _c = Cleanup(dir.clone());
    basic_model(&dir);
    let w = HfWeights::open(&dir).unwrap();
    let e = err_text(w.load("model.layers.7.self_attn.q_proj.weight"));
    assert_eq!(
        e,
        format!(
            "tensor 'model.layers.7.self_attn.q_proj.weight' not found in {}",
            dir.display()
        )
    );
}

#[test]
fn integer_weights_are_an_unsupported_dtype() {
    let dir = temp_dir("dtype");
    let _c = Cleanup(dir.clone());
    let bytes = safetensors_bytes(&[
        St {
            name: "model.norm.weight",
            dtype: "F32",
            shape: &[4],
            data: f32_bytes(&NORM),
        },
        St {
            name: "model.embed_tokens.weight",
            dtype: "I64",
            shape: &[2, 2],
            data: i64_bytes(&[1, 2, 3, 4]),
        },
    ]);
    write(&dir.join("model.safetensors"), &bytes);
    let w = HfWeights::open(&dir).unwrap();
    assert_eq!(
        w.stored_dtype("model.embed_tokens.weight").as_deref(),
        Some("I64")
    );
    let e = err_text(w.load("model.embed_tokens.weight"));
    assert!(
        e.contains("model.embed_tokens.weight")
            && e.contains("I64")
            && e.contains("model.safetensors")
            && e.contains("not a supported"),
        "{e}"
    );
    // The other tensors of the file still load.
    assert_eq!(values(w.load("model.norm.weight").unwrap()).2, NORM);
}

#[test]
fn corrupt_pytorch_bin_is_named() {
    let dir = temp_dir("bad-pth");
    let _c = Cleanup(dir.clone());
    write(&dir.join("pytorch_model.bin"), b"this is not a zip archive");
    let e = err_text(HfWeights::open(&dir));
    assert!(
        e.contains("pytorch_model.bin") && e.contains("not a readable PyTorch checkpoint"),
        "{e}"
    );
}

#[test]
fn load_hf_config_names_the_missing_or_bad_file() {
    let dir = temp_dir("config");
    let _c = Cleanup(dir.clone());
    let e = err_text(load_hf_config(&dir));
    assert!(
        e.contains(&dir.join("config.json").display().to_string()),
        "{e}"
    );
    write(&dir.join("config.json"), b"{\"model_type\": \"llama\"");
    let e = err_text(load_hf_config(&dir));
    assert!(
        e.contains(&dir.join("config.json").display().to_string()),
        "{e}"
    );
    write(
        &dir.join("config.json"),
        br#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"rope_theta":500000.0}"#,
    );
    let cfg = load_hf_config(&dir).unwrap();
    assert_eq!(
        (cfg.head_dim, cfg.num_key_value_heads, cfg.theta),
        (4, 1, 5e5)
    );
}

/// Position 0 attends only to itself and RoPE is the identity there, so its logits follow from
/// the HF weights with plain matmuls. Matching llama.cpp's row 0 checks that every tensor is
/// read with the right values and orientation (the full-sequence check belongs to the model tests).
#[test]
fn tiny_llama_position_zero_matches_llama_cpp() -> anyhow::Result<()> {
    use candle_core::{Tensor, D};
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let dir = fixture.join("hf");
    let cfg = load_hf_config(&dir)?;
    let w = HfWeights::open(&dir)?;
    let ids: Vec<u32> =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("input_ids.json"))?)?;
    assert_eq!(ids.len(), 48);
    let expected = Tensor::read_npy(fixture.join("logits.npy"))?;
    assert_eq!(expected.dims(), &[48, cfg.vocab_size]);
    assert_eq!(expected.dtype(), DType::F32);

    let get = |name: &str| -> anyhow::Result<Tensor> { Ok(dense(w.load(name)?)) };
    let rms = |x: &Tensor, weight: &Tensor| -> anyhow::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(x.broadcast_div(&(ms + cfg.rms_norm_eps)?.sqrt()?)?
            .broadcast_mul(weight)?)
    };
    let linear =
        |x: &Tensor, name: &str| -> anyhow::Result<Tensor> { Ok(x.matmul(&get(name)?.t()?)?) };
    let mut x = get("model.embed_tokens.weight")?.narrow(0, ids[0] as usize, 1)?; // (1, hidden)
    let rep = cfg.num_attention_heads / cfg.num_key_value_heads;
    for i in 0..cfg.num_hidden_layers {
        let l = |s: &str| format!("model.layers.{i}.{s}");
        let h = rms(&x, &get(&l("input_layernorm.weight"))?)?;
        let v = linear(&h, &l("self_attn.v_proj.weight"))?; // (1, kv_heads * head_dim)
                                                            // Softmax over one key is 1: head j outputs the value of kv head j / rep.
        let heads: Vec<Tensor> = (0..cfg.num_attention_heads)
            .map(|j| v.narrow(1, (j / rep) * cfg.head_dim, cfg.head_dim))
            .collect::<candle_core::Result<_>>()?;
        let o = Tensor::cat(&heads, 1)?;
        x = (x + linear(&o, &l("self_attn.o_proj.weight"))?)?;
        let h = rms(&x, &get(&l("post_attention_layernorm.weight"))?)?;
        let g = linear(&h, &l("mlp.gate_proj.weight"))?;
        let u = linear(&h, &l("mlp.up_proj.weight"))?;
        let act = (candle_core::Tensor::silu(&g)? * u)?;
        x = (x + linear(&act, &l("mlp.down_proj.weight"))?)?;
    }
    let logits = linear(&rms(&x, &get("model.norm.weight")?)?, "lm_head.weight")?;
    let diff = (logits - expected.narrow(0, 0, 1)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(
        diff < 1e-4,
        "position-0 logits differ from llama.cpp by {diff}"
    );
    Ok(())
}
