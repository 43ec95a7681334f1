//! Prometheus text exposition of the server's counters, gauges and latency histograms.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Cumulative histogram over fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                s.0[i] += 1;
            }
        }
        s.1 += v;
        s.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&s.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.2);
        let _ = writeln!(out, "{name}_sum {}", s.1);
        let _ = writeln!(out, "{name}_count {}", s.2);
    }
}

pub struct Metrics {
    /// Requests by (endpoint, HTTP status).
    requests: Mutex<Vec<(String, u16, u64)>>,
    pub prompt_tokens: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    /// Forward passes of the engine and the sequences they carried (continuous batching:
    /// sequences / steps is the mean batch).
    pub forward_steps: AtomicU64,
    pub batched_sequences: AtomicU64,
    pub queue_depth: AtomicU64,
    pub active: AtomicU64,
    /// KV bytes written, and reserved (written or not), by the caches of the requests in
    /// flight and the idle caches kept for prefix reuse.
    pub kv_bytes: AtomicU64,
    pub kv_reserved_bytes: AtomicU64,
    pub request_seconds: Histogram,
    pub queue_wait: Histogram,
    pub time_to_first_token: Histogram,
    pub generation_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(Vec::new()),
            prompt_tokens: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            forward_steps: AtomicU64::new(0),
            batched_sequences: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active: AtomicU64::new(0),
            kv_bytes: AtomicU64::new(0),
            kv_reserved_bytes: AtomicU64::new(0),
            request_seconds: Histogram::new(LATENCY_BOUNDS),
            queue_wait: Histogram::new(LATENCY_BOUNDS),
            time_to_first_token: Histogram::new(LATENCY_BOUNDS),
            generation_seconds: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match r.iter_mut().find(|(e, s, _)| e == endpoint && *s == status) {
            Some(entry) => entry.2 += 1,
            None => r.push((endpoint.to_string(), status, 1)),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP lwm_requests_total HTTP requests by endpoint and status.\n# TYPE lwm_requests_total counter\n");
        for (e, s, n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "lwm_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        let counters = [
            ("lwm_prompt_tokens_total", "Prompt tokens of accepted requests.", &self.prompt_tokens),
            ("lwm_prefill_tokens_total", "Prompt tokens actually run through the model (the rest came from the prompt cache).", &self.prefill_tokens),
            ("lwm_cached_prompt_tokens_total", "Prompt tokens reused from the prompt cache.", &self.cached_prompt_tokens),
            ("lwm_completion_tokens_total", "Generated tokens.", &self.completion_tokens),
            ("lwm_cancelled_requests_total", "Requests dropped because the client went away.", &self.cancelled),
            ("lwm_forward_steps_total", "Forward passes of the engine (one per batch).", &self.forward_steps),
            ("lwm_batched_sequences_total", "Sequences carried by those forward passes (divided by the steps: the mean batch).", &self.batched_sequences),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "lwm_queue_depth",
                "Requests waiting for a generation slot.",
                &self.queue_depth,
            ),
            (
                "lwm_active_requests",
                "Requests being generated.",
                &self.active,
            ),
            (
                "lwm_kv_cache_bytes",
                "KV bytes held by the caches of the requests in flight and the idle caches.",
                &self.kv_bytes,
            ),
            (
                "lwm_kv_cache_reserved_bytes",
                "KV bytes reserved (held or not yet written) by those caches.",
                &self.kv_reserved_bytes,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        if let Some(rss) = current_rss_bytes() {
            let _ = writeln!(out, "# HELP lwm_resident_memory_bytes Resident set size.\n# TYPE lwm_resident_memory_bytes gauge\nlwm_resident_memory_bytes {rss}");
        }
        self.request_seconds.render(
            &mut out,
            "lwm_request_duration_seconds",
            "Time from request to last byte of the response.",
        );
        self.queue_wait.render(
            &mut out,
            "lwm_queue_wait_seconds",
            "Time a request waited for a generation slot.",
        );
        self.time_to_first_token.render(
            &mut out,
            "lwm_time_to_first_token_seconds",
            "Time from request to its first sampled token.",
        );
        self.generation_seconds.render(
            &mut out,
            "lwm_generation_duration_seconds",
            "Time from request to the end of its generation.",
        );
        out
    }
}

/// Current resident set size (`VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
