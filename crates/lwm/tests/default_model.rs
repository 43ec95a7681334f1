//! The default model against llama.cpp's reference (../shared/fixtures/smollm2-reference.json).

mod common;
use common::*;
use lwm::model::{ForwardOptions, Model};
use lwm::weights::gguf::GgufFile;

fn load(opts: ForwardOptions) -> Option<Model> {
    let path = default_model()?;
    let file = GgufFile::open(&path).unwrap();
    let cfg = file.config().unwrap();
    Some(Model::load(&file, cfg, opts).unwrap())
}

#[test]
fn top10_logits_match_llama_cpp() {
    let Some(model) = load(ForwardOptions::default()) else {
        return;
    };
    let r = reference_json();
    let ids = ids(&r["prompt_token_ids"]);
    let mut cache = model.new_cache();
    let logits = model.forward(&ids, &mut cache, false).unwrap();
    let ours = top_k(&logits, 10);
    let want: Vec<(u32, f32)> = r["top10"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
        .collect();
    eprintln!("ours {ours:?}\nwant {want:?}");
    for (i, (id, l)) in want.iter().enumerate() {
        assert_eq!(
            ours[i].0,
            *id,
            "rank {i}: ours {:?} want {:?}",
            ours[i],
            (id, l)
        );
        let got = logits[*id as usize];
        assert!(
            (got - l).abs() < 0.3,
            "token {id}: logit {got} vs llama.cpp {l}"
        );
    }
}
