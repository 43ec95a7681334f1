//! `lwm-eval`: long-context evaluation on `lwm-engine` — the needle-in-a-haystack
//! benchmark (sets, resumable runs, scores, reports, heatmaps).

pub mod needle;
