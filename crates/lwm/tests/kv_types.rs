//! KV cache element types: byte layout against the `gguf` Python package (ggml's reference
//! quantizers; fixture from scripts/kv_quant_fixture.py), storage size, and the attention
//! driver reading each type against plain softmax attention.

mod common;
use common::*;
use lwm::attention::{causal_attention_quant, reference_attention, Chunking};
use lwm::kv::KvType;
use lwm::kv::{KvCache, KvTypes};

fn fixture_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("kv_quant_gguf.json")).unwrap()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn stored_bytes_equal_ggml_reference_quantizers() {
    let f = fixture_json();
    let x: Vec<f32> = f["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (name, t) in [
        ("f16", KvType::F16),
        ("bf16", KvType::Bf16),
        ("q8_0", KvType::Q8_0),
        ("q4_0", KvType::Q4_0),
    ] {
        let want = hex(f[name].as_str().unwrap());
        let mut got = vec![0u8; t.row_bytes(x.len())];
        assert_eq!(got.len(), want.len(), "{name}: row size");
        t.encode_row(&x, &mut got);
        assert_eq!(got, want, "{name}: bytes differ from gguf's quantize");
        // And decoding gives gguf's dequantization (same formulas: q·d, (q−8)·d).
        let mut back = vec![0.0f32; x.len()];
        t.decode_row(&want, &mut back);
        let deq = gguf_dequantize(t, &want);
        assert_eq!(back, deq, "{name}: dequantized values");
    }
}

/// ggml's `dequantize_row_*` written out from the block layout, for the check above.
fn gguf_dequantize(t: KvType, b: &[u8]) -> Vec<f32> {
    let h = |i: usize| half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
    match t {
        KvType::F16 => (0..b.len() / 2).map(|i| h(2 * i)).collect(),
        KvType::Bf16 => (0..b.len() / 2)
            .map(|i| f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16))
            .collect(),
        KvType::Q8_0 => b
            .chunks(34)
            .flat_map(|blk| {
                let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
                blk[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
        KvType::Q4_0 => b
            .chunks(18)
            .flat_map(|blk| {
                let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
                let lo = blk[2..]
                    .iter()
                    .map(move |&q| ((q & 15) as i32 - 8) as f32 * d);
                let hi = blk[2..]
                    .iter()
                    .map(move |&q| ((q >> 4) as i32 - 8) as f32 * d);
                lo.chain(hi).collect::<Vec<_>>()
            })
            .collect(),
        KvType::F32 => unreachable!(),
    }
}

#[test]
fn cache_stores_each_type_at_its_native_size() {
    let (layers, heads, d, n) = (2, 3, 64, 10);
    let x = lwm::rng::XorShift::new(1).vec(n * heads * d, -1.0, 1.0);
    for (t, bytes_per_row) in [
        (KvType::F32, 256),
        (KvType::F16, 128),
        (KvType::Bf16, 128),
        (KvType::Q8_0, 68),
        (KvType::Q4_0, 36),
    ] {
        let mut c = KvCache::with_types(layers, heads, d, KvTypes::same(t));
        for l in 0..layers {
            c.append(l, &x, &x, n);
        }
        c.commit(&[0; 10]);
        assert_eq!(c.bytes(), layers * heads * 2 * n * bytes_per_row, "{t:?}");
        c.truncate(4);
        assert_eq!(c.bytes(), layers * heads * 2 * 4 * bytes_per_row, "{t:?}");
    }
    // Keys and values may differ.
    let mut c = KvCache::with_types(1, 1, 64, KvTypes::parse("q8_0,f16").unwrap());
    c.append(0, &x[..64], &x[..64], 1);
    assert_eq!(c.bytes(), 68 + 128);
    assert!(KvTypes::parse("q5_0").is_err());
    assert!(KvTypes::same(KvType::Q4_0).check_dim(48).is_err());
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// For every type (and a mixed pair): the driver over the stored cache equals plain softmax
/// attention over the *decoded* keys/values to f32 rounding (the kernel reads the type
/// exactly), and stays within the type's own error of attention over the f32 originals.
///
/// Bound for the second check: with key errors δk and value errors δv,
/// |Δo| ≤ max|δv| + 2·max|v|·(e^{2ε} − 1), ε = scale·max_j |q·δk_j| (each softmax weight
/// moves by at most a factor e^{±2ε}); measured from the decoded data, not assumed.
#[test]
fn attention_reads_every_type_within_its_error() {
    let (heads, kv_heads, d, n) = (4, 2, 64, 300);
    let q = lwm::rng::XorShift::new(11).vec(n * heads * d, -1.0, 1.0);
    let k = lwm::rng::XorShift::new(12).vec(n * kv_heads * d, -1.0, 1.0);
    let v = lwm::rng::XorShift::new(13).vec(n * kv_heads * d, -1.0, 1.0);
    let per_head = |x: &[f32], h: usize, width: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|i| x[i * width + h * d..][..d].to_vec())
            .collect()
    };
    let scale = 1.0 / (d as f32).sqrt();
    let mut types: Vec<KvTypes> = KvType::ALL.into_iter().map(KvTypes::same).collect();
    types.push(KvTypes::parse("q8_0,f16").unwrap());
    for types in types {
        let mut c = KvCache::with_types(1, kv_heads, d, types);
        c.append(0, &k, &v, n);
        let chunking = Chunking {
            query_chunk: 32,
            key_chunk: 64,
        };
        let prefill = causal_attention_quant(&q, n, 0, heads, d, &c.quant_view(0), chunking);
        let decode = causal_attention_quant(
            &q[(n - 1) * heads * d..],
            1,
            n - 1,
            heads,
            d,
            &c.quant_view(0),
            chunking,
        );
        let view = c.quant_view(0);
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let (mut kd, mut vd) = (Vec::new(), Vec::new());
            view.decode_block(g, 0, n, &mut kd, &mut vd);
            let qh = per_head(&q, h, heads * d);
            let got = per_head(&prefill, h, heads * d);
            let exact_on_decoded = reference_attention(&qh, &kd, &vd, d, 0, true, None);
            assert!(
                max_diff(&got, &exact_on_decoded) < 2e-5,
                "{types:?} head {h}: kernel vs decoded reference {}",
                max_diff(&got, &exact_on_decoded)
            );
            assert!(
                max_diff(
                    &decode[h * d..(h + 1) * d],
                    &exact_on_decoded[(n - 1) * d..]
                ) < 2e-5,
                "{types:?} head {h}: decode row"
            );
            let (kh, vh) = (per_head(&k, g, kv_heads * d), per_head(&v, g, kv_heads * d));
            let original = reference_attention(&qh, &kh, &vh, d, 0, true, None);
            let dv = max_diff(&vh, &vd);
            let mut eps = 0.0f32;
            for i in 0..n {
                for j in 0..n {
                    let dot: f32 = (0..d)
                        .map(|t| qh[i * d + t] * (kh[j * d + t] - kd[j * d + t]))
                        .sum();
                    eps = eps.max((dot * scale).abs());
                }
            }
            let bound = dv + 2.0 * 1.0 * ((2.0 * eps).exp() - 1.0) + 1e-5;
            let err = max_diff(&got, &original);
            assert!(
                err <= bound,
                "{types:?} head {h}: error {err} over bound {bound}"
            );
            if types.k == KvType::F32 && types.v == KvType::F32 {
                assert!(err < 2e-5);
            }
        }
    }
}

/// The default model with every cache type: the next-token logits of a ~100-token prompt
/// (prefill through the blockwise path) and of one decode step stay close to the f32-cache
/// logits over the whole vocabulary, with the same top token. Bounds are twice the measured
/// deviation (f16, bf16, q8_0 ≈ 0.4–0.5; q4_0 ≈ 3) against logits spanning ~30; for
/// scale, ggml vs exact numerics on the same model differ by up to 0.3 in the top 10.
#[test]
fn default_model_logits_with_each_cache_type() {
    let Some(path) = default_model() else { return };
    let mut engine =
        lwm::generate::Engine::load(path.to_str().unwrap(), &Default::default()).unwrap();
    let prompt = "The history of the printing press begins in East Asia, where woodblock printing spread with Buddhism. ".repeat(6);
    let ids = engine.tokenize(&prompt).unwrap();
    assert!(ids.len() > 64, "{}", ids.len());
    let mut run = |types: KvTypes| -> (Vec<f32>, Vec<f32>) {
        engine.model.set_kv_types(types).unwrap();
        let mut cache = engine.model.new_cache();
        assert_eq!(cache.types, types);
        let prefill = engine.model.forward(&ids, &mut cache, false).unwrap();
        let next = top_k(&prefill, 1)[0].0;
        let decode = engine.model.forward(&[next], &mut cache, false).unwrap();
        (prefill, decode)
    };
    let (p32, d32) = run(KvTypes::F32);
    for (t, bound) in [
        (KvType::F16, 1.0),
        (KvType::Bf16, 1.0),
        (KvType::Q8_0, 1.0),
        (KvType::Q4_0, 6.0),
    ] {
        let (p, d) = run(KvTypes::same(t));
        let (ep, ed) = (max_diff(&p, &p32), max_diff(&d, &d32));
        eprintln!("{t:?}: prefill logits max |diff| {ep}, decode {ed}");
        assert!(ep < bound && ed < bound, "{t:?}: {ep} {ed} over {bound}");
        assert_eq!(
            top_k(&p, 1)[0].0,
            top_k(&p32, 1)[0].0,
            "{t:?} prefill top-1"
        );
        assert_eq!(top_k(&d, 1)[0].0, top_k(&d32, 1)[0].0, "{t:?} decode top-1");
    }
}
