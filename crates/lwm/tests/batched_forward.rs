//! `Model::forward_batch` (continuous batching's forward) against `Model::forward` on the
//! default model: sequences in different states (fresh prompts, a decode step deep in a
//! cache, a prompt piece long enough for the blockwise attention path) run together give
//! each sequence the bits it gets alone, logits and KV cache alike, in llama.cpp's numerics
//! (f16 and q8_0 caches) and in exact numerics. `forward` itself is checked against
//! llama.cpp in default_model.rs.

mod common;
use common::*;
use lwm::generate::{Engine, LoadOptions};
use lwm::kv::{KvCache, KvTypes};
use lwm::model::{Numerics, SeqInput};

fn engine(numerics: Numerics) -> Option<Engine> {
    let path = default_model()?;
    let opts = LoadOptions {
        numerics: Some(numerics),
        ..Default::default()
    };
    Some(Engine::load(path.to_str().unwrap(), &opts).unwrap())
}

/// Token ids from a text long enough to cut prompts of any length from.
fn text_ids(engine: &Engine, n: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog while the cat watches from the \
                window, and far away a ship sails past the lighthouse into the evening. "
        .repeat(8);
    let ids = engine.tokenize(&text).unwrap();
    assert!(ids.len() >= n, "{} tokens", ids.len());
    ids[..n].to_vec()
}

/// (tokens already in the cache, tokens run this step) for each sequence of the batch.
const SHAPES: [(usize, usize); 5] = [(0, 5), (40, 1), (10, 70), (0, 1), (23, 1)];

fn check_batch_equals_alone(engine: &Engine, label: &str) {
    let model = &engine.model;
    let all = text_ids(engine, 120);
    // Each sequence its own text (shifted), its cache filled by a plain forward.
    let mut caches: Vec<KvCache> = Vec::new();
    let mut steps: Vec<Vec<u32>> = Vec::new();
    for (i, &(held, run)) in SHAPES.iter().enumerate() {
        let ids = &all[i..i + held + run];
        let mut cache = model.new_cache();
        if held > 0 {
            model.forward(&ids[..held], &mut cache, false).unwrap();
        }
        caches.push(cache);
        steps.push(ids[held..].to_vec());
    }
    let mut alone_caches = caches.clone();
    let alone: Vec<Vec<f32>> = alone_caches
        .iter_mut()
        .zip(&steps)
        .map(|(c, ids)| model.forward(ids, c, false).unwrap())
        .collect();
    let mut inputs: Vec<SeqInput<'_>> = caches
        .iter_mut()
        .zip(&steps)
        .map(|(cache, ids)| SeqInput {
            ids,
            cache,
            all_logits: false,
            vision: None,
        })
        .collect();
    let batched = model.forward_batch(&mut inputs).unwrap();
    drop(inputs);
    assert_eq!(batched.len(), SHAPES.len());
    for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(b.len(), model.config.vocab_size, "{label} seq {i}");
        let differ = b
            .iter()
            .zip(a)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{label} seq {i} {:?}: {differ} logits differ",
            SHAPES[i]
        );
        assert_eq!(
            caches[i].tokens(),
            alone_caches[i].tokens(),
            "{label} seq {i}"
        );
        assert_eq!(
            caches[i].layers[0].k, alone_caches[i].layers[0].k,
            "{label} seq {i}"
        );
        let last = model.n_layers() - 1;
        assert_eq!(
            caches[i].layers[last].v, alone_caches[i].layers[last].v,
            "{label} seq {i}"
        );
    }
    // Different sequences really got different answers (the batch did not mix them up).
    assert_ne!(batched[0], batched[1]);
}

#[test]
fn a_batch_of_sequences_gives_each_the_bits_it_gets_alone_ggml_numerics() {
    let Some(engine) = engine(Numerics::Ggml) else {
        return;
    };
    check_batch_equals_alone(&engine, "ggml f16 kv");
    let mut engine = engine;
    engine
        .model
        .set_kv_types(KvTypes::parse("q8_0").unwrap())
        .unwrap();
    check_batch_equals_alone(&engine, "ggml q8_0 kv");
}

#[test]
fn a_batch_of_sequences_gives_each_the_bits_it_gets_alone_exact_numerics() {
    let Some(engine) = engine(Numerics::Exact) else {
        return;
    };
    check_batch_equals_alone(&engine, "exact");
}

#[test]
fn all_logits_in_a_batch_and_a_failing_batch_leaves_every_cache_as_it_was() {
    let Some(engine) = engine(Numerics::Ggml) else {
        return;
    };
    let model = &engine.model;
    let ids = text_ids(&engine, 30);
    // all_logits for one sequence, last-row logits for another.
    let (mut c1, mut c2) = (model.new_cache(), model.new_cache());
    let out = model
        .forward_batch(&mut [
            SeqInput {
                ids: &ids[..7],
                cache: &mut c1,
                all_logits: true,
                vision: None,
            },
            SeqInput {
                ids: &ids[3..9],
                cache: &mut c2,
                all_logits: false,
                vision: None,
            },
        ])
        .unwrap();
    let vocab = model.config.vocab_size;
    assert_eq!(out[0].len(), 7 * vocab);
    assert_eq!(out[1].len(), vocab);
    let alone = model
        .forward(&ids[..7], &mut model.new_cache(), true)
        .unwrap();
    assert_eq!(out[0], alone);

    // A token outside the vocabulary in the second sequence: an error naming it, and
    // neither cache keeps a row of the step.
    let bad = [ids[9], vocab as u32 + 5];
    let e = model
        .forward_batch(&mut [
            SeqInput {
                ids: &ids[7..8],
                cache: &mut c1,
                all_logits: false,
                vision: None,
            },
            SeqInput {
                ids: &bad,
                cache: &mut c2,
                all_logits: false,
                vision: None,
            },
        ])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the model's vocabulary"), "{e}");
    assert_eq!((c1.len(), c2.len()), (7, 6));
    let rows = |c: &KvCache| c.layers[0].k[0].len() / c.types.k.row_bytes(c.head_dim);
    assert_eq!((rows(&c1), rows(&c2)), (7, 6));
    // An empty sequence in a batch is refused.
    let e = model
        .forward_batch(&mut [SeqInput {
            ids: &[],
            cache: &mut c1,
            all_logits: false,
            vision: None,
        }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tokens"), "{e}");
}
