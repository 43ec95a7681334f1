//! Needle-in-a-haystack evaluation on the default model: the set is reproducible with exact
//! token counts and needles where the depth says; a tiny run scores, resumes after an
//! interrupted write and matches answers recorded from llama.cpp; the report re-renders.

mod common;

use lwm::generate::{Engine, LoadOptions};
use lwm::needle::haystack::Haystack;
use lwm::needle::results::{CellResult, ResultsFile};
use lwm::needle::run::{order_for_prefix_reuse, planned_prefill, run_cells, RunOptions};
use lwm::needle::set::{
    create_set, encode_segment, needle_sentence, NeedleSet, PromptFormat, SetParams,
};
use lwm::needle::{write_report, RESULTS_FILE, SET_FILE};
use std::sync::atomic::AtomicBool;

fn engine() -> Option<Engine> {
    let path = common::default_model()?;
    Some(Engine::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap())
}

fn params(lengths: &[usize], depths: &[u32], needles: usize, retrieve: usize) -> SetParams {
    SetParams {
        context_lengths: lengths.to_vec(),
        depths: depths.to_vec(),
        needles,
        retrieve,
        samples: 2,
        seed: 1234,
        answer_tokens: 16,
        haystack: Haystack::default_text().name,
    }
}

fn make(e: &Engine, p: &SetParams) -> NeedleSet {
    create_set(
        p,
        &Haystack::default_text(),
        &e.tokenizer,
        e.chat_template.as_ref(),
        "default",
    )
    .unwrap()
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-needle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn create_is_reproducible_from_the_seed() {
    let Some(e) = engine() else { return };
    let p = params(&[512, 1024], &[0, 50, 100], 1, 1);
    let dir = tmpdir("repro");
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    make(&e, &p).write(&a).unwrap();
    make(&e, &p).write(&b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // The file reads back to the same set.
    assert_eq!(NeedleSet::read(&a).unwrap(), make(&e, &p));
    // Another seed draws other needles.
    let other = make(
        &e,
        &SetParams {
            seed: 99,
            ..p.clone()
        },
    );
    assert_ne!(other.cases[0].needles, make(&e, &p).cases[0].needles);
}

#[test]
fn needles_sit_at_their_depth_with_exact_token_counts() {
    let Some(e) = engine() else { return };
    let tok = &e.tokenizer;
    for p in [
        params(&[300, 1000, 2048], &[0, 10, 25, 50, 75, 90, 100], 1, 1),
        params(&[1000, 2048], &[0, 20, 40, 60, 80, 100], 4, 2),
    ] {
        let set = make(&e, &p);
        let per_cell = if p.needles > 1 { 1 } else { p.depths.len() };
        assert_eq!(
            set.cases.len(),
            p.context_lengths.len() * per_cell * p.samples
        );
        for c in &set.cases {
            // Prompt + answer budget is exactly the context length.
            assert_eq!(
                c.prompt_ids.len(),
                c.context_length - p.answer_tokens,
                "{}",
                c.id
            );
            // Assembled in id space, the prompt is (up to a whitespace seam where a needle
            // meets a blank line) what the tokenizer makes of its text.
            let text = tok.decode(&c.prompt_ids, false);
            let natural = tok.encode(&text, false, true).unwrap();
            assert!(
                natural.len().abs_diff(c.prompt_ids.len()) <= 2 * c.needles.len(),
                "{}: {} tokens as text vs {}",
                c.id,
                natural.len(),
                c.prompt_ids.len()
            );
            for n in &c.needles {
                assert!(
                    text.contains(&needle_sentence(&n.city, n.number)),
                    "{}",
                    c.id
                );
            }
            let doc = &c.prompt_ids[c.prefix_tokens..c.prefix_tokens + c.document_tokens];
            let needle_total: usize = c
                .needles
                .iter()
                .map(|n| {
                    encode_segment(tok, &needle_sentence(&n.city, n.number), false)
                        .unwrap()
                        .len()
                })
                .sum();
            let n_hay = c.document_tokens - needle_total;
            assert_eq!(c.needles.iter().filter(|n| n.retrieve).count(), p.retrieve);
            let mut cities: Vec<&str> = c.needles.iter().map(|n| n.city.as_str()).collect();
            cities.sort();
            cities.dedup();
            assert_eq!(cities.len(), p.needles, "distinct cities");
            for n in &c.needles {
                let ids = encode_segment(tok, &needle_sentence(&n.city, n.number), false).unwrap();
                assert_eq!(
                    &doc[n.token_offset..n.token_offset + ids.len()],
                    &ids[..],
                    "{}",
                    c.id
                );
                assert!((1_000_000..10_000_000).contains(&n.number));
                assert!(c.question.contains(&n.city) == n.retrieve, "{}", c.question);
                // Haystack tokens before this needle (other needles excluded).
                let before: usize = c
                    .needles
                    .iter()
                    .filter(|m| m.token_offset < n.token_offset)
                    .map(|m| {
                        encode_segment(tok, &needle_sentence(&m.city, m.number), false)
                            .unwrap()
                            .len()
                    })
                    .sum();
                let hay_pos = n.token_offset - before;
                let target = n_hay * n.depth_percent as usize / 100;
                if n.depth_percent == 100 {
                    assert_eq!(hay_pos, n_hay, "{}: depth 100 appends", c.id);
                } else {
                    assert!(hay_pos <= target, "{}: needle after its depth", c.id);
                    // Moved back only to the previous sentence end (KJV sentences are
                    // well under 200 tokens).
                    assert!(target - hay_pos < 200, "{}: {hay_pos} vs {target}", c.id);
                    if hay_pos > 0 {
                        let prev = tok.token_bytes(doc[n.token_offset - 1]);
                        assert!(
                            prev.trim_ascii_end().ends_with(b"."),
                            "{}: not after a period",
                            c.id
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bad_grids_fail_with_clear_messages() {
    let Some(e) = engine() else { return };
    let hay = Haystack::default_text();
    let err = |p: SetParams, h: &Haystack| {
        create_set(&p, h, &e.tokenizer, e.chat_template.as_ref(), "default")
            .unwrap_err()
            .to_string()
    };
    assert!(err(params(&[64], &[0], 1, 1), &hay).contains("too short"));
    let short = Haystack {
        name: "tiny.txt".into(),
        text: "In the beginning. There was a short text. ".repeat(20),
    };
    let m = err(params(&[2048], &[50], 1, 1), &short);
    assert!(
        m.contains("tiny.txt") && m.contains("longer --haystack"),
        "{m}"
    );
    assert!(err(params(&[1024], &[0, 50], 3, 1), &hay).contains("distinct depths"));
    assert!(err(params(&[1024], &[0, 150], 1, 1), &hay).contains("0..=100"));
    assert!(err(params(&[1024], &[0, 50], 2, 3), &hay).contains("--retrieve"));
    let missing = Haystack::load(&["/nonexistent/hay.txt".into()]).unwrap_err();
    assert!(missing.to_string().contains("does not exist"));
}

/// Answers of the tiny grid below, recorded from llama.cpp (llama-cpp-python 0.3.36, the
/// same GGUF, greedy, a fresh context per prompt) with scripts/needle_llamacpp.py.
fn llamacpp_answers() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(common::fixture("needle/llamacpp-answers.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn tiny_run_scores_resumes_and_matches_llamacpp() {
    let Some(e) = engine() else { return };
    let p = SetParams {
        samples: 1,
        ..params(&[384, 640], &[0, 50, 100], 1, 1)
    };
    let set = make(&e, &p);
    let dir = tmpdir("run");
    set.write(&dir.join(SET_FILE)).unwrap();
    let opts = RunOptions {
        answer_tokens: p.answer_tokens,
        prefill_chunk: 512,
        trained_length: e.context_length(),
        stop: Vec::new(),
    };
    let cases: Vec<_> = set.cases.iter().collect();
    let ordered = order_for_prefix_reuse(&cases);
    let plan = planned_prefill(&ordered);
    let never = AtomicBool::new(false);
    let file = ResultsFile::new(dir.join(RESULTS_FILE));

    // First two cells, then a write cut off in the middle of the third line.
    let mut first: Vec<CellResult> = Vec::new();
    run_cells(&e, &ordered[..2], &opts, &never, &mut |r| {
        file.append(r)?;
        first.push(r.clone());
        Ok(())
    })
    .unwrap();
    let line = serde_json::to_string(&first[0]).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file.path)
        .unwrap();
    std::io::Write::write_all(&mut f, &line.as_bytes()[..line.len() / 2]).unwrap();
    drop(f);
    let loaded = file.load_for_resume().unwrap();
    assert_eq!(loaded.results, first, "finished cells survive");
    assert!(loaded.repaired.unwrap().contains("cut off"));
    assert!(dir.join("results.jsonl.partial").exists());

    // Resume: the remaining cells, one cache, prefix reuse as planned.
    let done: Vec<&str> = loaded.results.iter().map(|r| r.id.as_str()).collect();
    let rest: Vec<_> = ordered
        .iter()
        .copied()
        .filter(|c| !done.contains(&c.id.as_str()))
        .collect();
    assert_eq!(rest.len(), ordered.len() - 2);
    run_cells(&e, &rest, &opts, &never, &mut |r| file.append(r)).unwrap();
    let all = file.load().unwrap();
    assert_eq!(all.len(), set.cases.len());
    // Cells within a sample after the first reuse the shared prefix: 3 cells at 640 reuse
    // what the cell before them holds (checked against the plan from the prompt ids).
    let by_id = |id: &str| all.iter().find(|r| r.id == id).unwrap();
    for (c, planned) in rest.iter().zip(&plan[2..]).skip(1) {
        assert_eq!(by_id(&c.id).prefilled_tokens, *planned, "{}", c.id);
    }
    assert!(all.iter().map(|r| r.reused_tokens).sum::<usize>() > 300);

    // Reused KV gives the same answers as llama.cpp's fresh contexts.
    let reference = llamacpp_answers();
    for r in &all {
        let want = &reference[&r.id];
        assert_eq!(
            want["prompt_ids_len"].as_u64().unwrap() as usize,
            r.prompt_tokens,
            "{}",
            r.id
        );
        let theirs = common::ids(&want["answer_ids"]);
        if theirs == r.response_ids {
            assert_eq!(
                want["found"].as_bool().unwrap(),
                r.correct,
                "{}: score",
                r.id
            );
        } else {
            // Greedy answers may part where two logits nearly tie (llama.cpp and lwm round
            // differently); then the two tokens must be lwm's top two, within 0.5.
            let k = theirs
                .iter()
                .zip(&r.response_ids)
                .take_while(|(a, b)| a == b)
                .count();
            let case = set.cases.iter().find(|c| c.id == r.id).unwrap();
            let mut ids = case.prompt_ids.clone();
            ids.extend_from_slice(&r.response_ids[..k]);
            let mut cache = e.model.new_cache();
            let logits = e.model.prefill(&ids, &mut cache, 512, |_| {}).unwrap();
            let top = common::top_k(&logits, 2);
            let pair = [theirs[k], r.response_ids[k]];
            assert!(
                pair.contains(&top[0].0) && pair.contains(&top[1].0),
                "{}: answers part at token {k} on {pair:?}, lwm's top two are {top:?}",
                r.id
            );
            assert!(
                top[0].1 - top[1].1 < 0.5,
                "{}: not a near tie: {top:?}",
                r.id
            );
            eprintln!("{}: answers part at token {k} on a near tie {top:?}", r.id);
        }
        // Scoring: found exactly when the number is in the text.
        let n = &r.needles[0];
        assert_eq!(n.found, r.response.contains(&n.number.to_string()));
    }

    // The report re-renders from the files alone.
    let summary = write_report(&dir).unwrap();
    assert_eq!(summary.cells_done, set.cases.len());
    let correct = all.iter().filter(|r| r.correct).count();
    assert!((summary.accuracy - correct as f64 / all.len() as f64).abs() < 1e-12);
    let table = summary.table();
    assert!(table.contains("384") && table.contains("640"), "{table}");
    let png = std::fs::File::open(dir.join("heatmap.png")).unwrap();
    let reader = png::Decoder::new(std::io::BufReader::new(png))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (1000, 640));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["grid"].as_array().unwrap().len(), 6);

    // A corrupted line in the middle is refused, and the file is left as it was.
    let path = dir.join(RESULTS_FILE);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.insert_str(0, "{not json\n");
    std::fs::write(&path, &text).unwrap();
    let msg = file.load_for_resume().err().unwrap().to_string();
    assert!(msg.contains("line 1") && msg.contains("corrupted"), "{msg}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prompt_format_follows_the_chat_template() {
    let Some(e) = engine() else { return };
    let f = PromptFormat::new(e.chat_template.as_ref(), &e.tokenizer).unwrap();
    assert_eq!(f.name, "model");
    let (prefix, suffix) = f
        .parts("What is the special magic Oslo number?", false)
        .unwrap();
    let pre = e.tokenizer.decode(&prefix, false);
    let suf = e.tokenizer.decode(&suffix, false);
    assert!(pre.ends_with("<|im_start|>user\n"), "{pre:?}");
    assert!(
        suf.starts_with(" What is the special magic Oslo number? Don't give information outside the document or repeat your findings. Keep your response short and direct.<|im_end|>"),
        "{suf:?}"
    );
    assert!(suf.ends_with("<|im_start|>assistant\n"), "{suf:?}");
}
