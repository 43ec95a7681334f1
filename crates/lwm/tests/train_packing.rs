//! Masked sequence packing: a packed batch computes the same per-token losses as its
//! documents run one by one (segment ids block cross-document attention, positions
//! restart), and malformed data lines are reported with file and line.

use lwm::config::{ModelConfig, RopeLayout, RopeScaling};
use lwm::train::data::{ByteEncoder, DataFormat, DataSpec, DocumentReader, OnError};
use lwm::train::loss::{lwm_loss, token_nll, Targets};
use lwm::train::model::{BatchInput, TrainModel};
use lwm::train::packing::Packer;
use std::path::PathBuf;
use std::sync::Arc;

fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        vocab_size: 259,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        theta: 10_000.0,
        rope_layout: RopeLayout::RotateHalf,
        rope_scaling: RopeScaling::None,
        max_sequence_length: 512,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        vision_vocab_size: 0,
    }
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lwm-packing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn spec(files: Vec<PathBuf>, on_error: OnError) -> DataSpec {
    DataSpec {
        files,
        format: DataFormat::Json,
        fields: "[prompt],answer".into(),
        on_error,
    }
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn packed_batch_equals_documents_one_by_one() {
    let lines = [
        r#"{"prompt": "the key is", "answer": " 4817"}"#,
        r#"{"prompt": "q", "answer": "short"}"#,
        r#"{"prompt": "where is it?", "answer": " in the middle of the text"}"#,
        r#"{"prompt": "x", "answer": "y"}"#,
        r#"{"prompt": "a much longer prompt that fills a good part of a row", "answer": " yes"}"#,
    ];
    let path = temp_file("docs.jsonl", &lines.join("\n"));
    let model = TrainModel::init_normal(tiny_config(), 0.3, 5).unwrap();
    let mut reader = DocumentReader::new(
        spec(vec![path.clone()], OnError::Stop),
        Arc::new(ByteEncoder),
    )
    .unwrap();
    let mut packer = Packer::new(64, 2, false);
    let batch = packer.next_batch(&mut reader).unwrap();
    let segs = batch.input.segment_ids.clone().unwrap();
    assert!(segs[..64].contains(&1), "row 0 holds several documents");

    let logits = model.forward(&batch.input).unwrap();
    let packed_nll = flat(&token_nll(&logits.text, &batch.targets.tokens).unwrap());

    // Every document alone, unpacked: same per-token loss at the same slots.
    let mut reader =
        DocumentReader::new(spec(vec![path], OnError::Stop), Arc::new(ByteEncoder)).unwrap();
    let (mut slot, mut checked) = (0usize, 0usize);
    let (mut sum_alone, mut count_alone) = (0.0f64, 0.0f64);
    while checked < batch.input.tokens.len() {
        let doc = reader.next_document().unwrap();
        let n = doc.len() - 1;
        if slot % 64 + n > 64 {
            slot = (slot / 64 + 1) * 64; // the packer moved this document to the next row
        }
        if slot >= 128 {
            break;
        }
        let input = BatchInput::plain(1, n, doc.tokens[..n].to_vec());
        let targets = Targets {
            tokens: doc.tokens[1..].to_vec(),
            loss_mask: doc.loss[1..].to_vec(),
            vision_mask: None,
        };
        let alone = model.forward(&input).unwrap();
        let nll = flat(&token_nll(&alone.text, &targets.tokens).unwrap());
        for t in 0..n {
            assert_eq!(batch.input.tokens[slot + t], doc.tokens[t]);
            assert_eq!(batch.input.positions[slot + t], t as u32);
            let d = (nll[t] - packed_nll[slot + t]).abs();
            assert!(
                d < 1e-5,
                "doc token {t} at slot {}: {} vs {}",
                slot + t,
                nll[t],
                packed_nll[slot + t]
            );
            sum_alone += (nll[t] * targets.loss_mask[t]) as f64;
            count_alone += targets.loss_mask[t] as f64;
        }
        slot += n;
        checked = slot;
    }
    // Loss over the packed batch (token-weighted) equals the documents' loss one by one.
    let packed_sum: f64 = packed_nll
        .iter()
        .zip(&batch.targets.loss_mask)
        .map(|(l, w)| (l * w) as f64)
        .sum();
    let packed_count: f64 = batch.targets.loss_mask.iter().map(|&w| w as f64).sum();
    assert!(((packed_sum / packed_count) - sum_alone / count_alone).abs() < 1e-5);

    // Without segment ids the same packed row gives different losses (the mask matters).
    let mut leaky = batch.input.clone();
    leaky.segment_ids = None;
    let leaky_nll =
        flat(&token_nll(&model.forward(&leaky).unwrap().text, &batch.targets.tokens).unwrap());
    let max_gap = leaky_nll
        .iter()
        .zip(&packed_nll)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max_gap > 1e-2, "{max_gap}");
    // And the per-sequence-normalised loss is finite.
    let loss = lwm_loss(&logits.text, None, &batch.targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(loss.is_finite() && loss > 0.0);
}

#[test]
fn split_documents_continue_in_the_next_row() {
    let lines: Vec<String> = (0..6)
        .map(|i| format!(r#"{{"prompt": "document number {i} with some text", "answer": " end"}}"#))
        .collect();
    let path = temp_file("split.jsonl", &lines.join("\n"));
    let mut reader =
        DocumentReader::new(spec(vec![path], OnError::Stop), Arc::new(ByteEncoder)).unwrap();
    let mut packer = Packer::new(50, 1, true);
    let a = packer.next_batch(&mut reader).unwrap();
    let b = packer.next_batch(&mut reader).unwrap();
    // No padding when splitting; row b starts with the rest of the cut document at position 0.
    assert!(a
        .input
        .segment_ids
        .as_ref()
        .unwrap()
        .iter()
        .all(|&s| s != u32::MAX));
    assert_eq!(b.input.positions[0], 0);
    let all: Vec<u32> = a
        .input
        .tokens
        .iter()
        .chain(&b.input.tokens)
        .copied()
        .collect();
    let doc0 = byte_doc(&lines[0]);
    assert_eq!(&all[..doc0.len() - 1], &doc0[..doc0.len() - 1]);
}

fn byte_doc(line: &str) -> Vec<u32> {
    let rec: serde_json::Value = serde_json::from_str(line).unwrap();
    lwm::train::data::process_record(&rec, "[prompt],answer", false, &ByteEncoder)
        .unwrap()
        .tokens
}

#[test]
fn malformed_lines_name_file_and_line_and_follow_the_policy() {
    let text = "{\"prompt\": \"a\", \"answer\": \"b\"}\n{not json\n{\"prompt\": \"c\"}\n{\"prompt\": \"d\", \"answer\": \"e\"}\n";
    let path = temp_file("bad.jsonl", text);
    let mut stop = DocumentReader::new(
        spec(vec![path.clone()], OnError::Stop),
        Arc::new(ByteEncoder),
    )
    .unwrap();
    stop.next_document().unwrap();
    let e = format!("{:#}", stop.next_document().unwrap_err());
    assert!(
        e.contains("bad.jsonl:2") && e.contains("invalid JSON"),
        "{e}"
    );

    let mut skip =
        DocumentReader::new(spec(vec![path], OnError::Skip), Arc::new(ByteEncoder)).unwrap();
    skip.next_document().unwrap();
    let d = skip.next_document().unwrap();
    assert_eq!(d.tokens[1], b'd' as u32 + 3);
    assert_eq!(skip.skipped.len(), 2);
    assert!(
        skip.skipped[1].contains("bad.jsonl:3") && skip.skipped[1].contains("'answer' is missing"),
        "{:?}",
        skip.skipped
    );
    // The stream loops over the files (epochs), as the original's loader.
    let again = skip.next_document().unwrap();
    assert_eq!(again.tokens[1], b'a' as u32 + 3);
    assert_eq!(skip.position().epoch, 1);
}
