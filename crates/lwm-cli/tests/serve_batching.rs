//! Continuous batching in `lwm serve` on the default model: concurrent requests share
//! forward passes (the server's own counters show batches of several sequences), and a
//! batch never changes an answer: the greedy answers of 8 concurrent chats equal the same
//! chats sent one at a time, token for token. A short prompt sent after a long one is
//! answered before the long one's prefill ends (chunked prefill, shortest prompt first).

mod common;
use common::{default_model, post, start_server};
use std::time::Instant;

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Why is the sky blue? Answer briefly.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "List two planets of the solar system.",
];

fn chat(url: &str, question: &str, max_tokens: usize) -> String {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string();
    let (status, reply) = post(url, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (forward steps, sequences carried) from the server's /metrics.
fn batch_counters(url: &str) -> (u64, u64) {
    let (status, text) = common::http(url, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let read = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    (
        read("lwm_forward_steps_total"),
        read("lwm_batched_sequences_total"),
    )
}

#[test]
fn eight_concurrent_greedy_chats_equal_the_same_chats_one_at_a_time() {
    let Some(model) = default_model() else { return };
    let (_server, url) = start_server(&model, &["--max-active", "8"]);
    let alone: Vec<String> = QUESTIONS.iter().map(|q| chat(&url, q, 24)).collect();
    let (steps0, seqs0) = batch_counters(&url);
    // Mean batch of one while requests come one at a time.
    assert_eq!(steps0, seqs0);

    let barrier = std::sync::Arc::new(std::sync::Barrier::new(QUESTIONS.len()));
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = QUESTIONS
            .iter()
            .map(|q| {
                let (url, barrier) = (url.clone(), barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    chat(&url, q, 24)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (steps1, seqs1) = batch_counters(&url);
    let (steps, seqs) = (steps1 - steps0, seqs1 - seqs0);
    eprintln!(
        "concurrent phase: {seqs} sequences in {steps} forward steps (mean batch {:.2})",
        seqs as f64 / steps as f64
    );
    assert!(
        seqs as f64 >= 2.0 * steps as f64,
        "8 concurrent requests should share forward passes: {seqs} sequences in {steps} steps"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(!a.is_empty(), "question {i} got an empty answer");
        assert_eq!(a, t, "question {i}: alone vs batched");
    }
    let distinct: std::collections::HashSet<&String> = alone.iter().collect();
    assert!(distinct.len() >= 6, "answers should differ: {alone:?}");
}

#[test]
fn a_short_prompt_is_answered_before_a_long_prompt_finishes_its_prefill() {
    let Some(model) = default_model() else { return };
    // 64-token prompt pieces: the long prompt needs some 40 steps of prefill.
    let (_server, url) = start_server(&model, &["--prefill-chunk", "64"]);
    let long = format!(
        "Summarize this text in one word. {}",
        "The river runs past the old mill and the children play by the water. ".repeat(160)
    );
    let t0 = Instant::now();
    let (long_done, short_done) = std::thread::scope(|s| {
        let url2 = url.clone();
        let long = s.spawn(move || {
            chat(&url2, &long, 1);
            t0.elapsed()
        });
        // Sent once the long request is surely admitted and prefilling.
        std::thread::sleep(std::time::Duration::from_millis(150));
        let short = s.spawn(|| {
            chat(&url, "Say yes.", 2);
            t0.elapsed()
        });
        (long.join().unwrap(), short.join().unwrap())
    });
    eprintln!("short answered after {short_done:?}, long after {long_done:?}");
    assert!(
        short_done < long_done,
        "the short request ({short_done:?}) waited for the long prompt ({long_done:?})"
    );
}
