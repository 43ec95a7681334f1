//! `lwm-eval`: long-context evaluation on `lwm-engine` — the needle-in-a-haystack
//! benchmark (sets, resumable runs, scores, reports, heatmaps) and a RULER-style suite
//! (synthetic retrieval, tracing and aggregation tasks, effective length).

pub mod jsonl;
pub mod needle;
pub mod plot;
pub mod ruler;
