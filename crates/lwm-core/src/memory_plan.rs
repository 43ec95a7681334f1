//! Memory planner: what a context of N tokens costs (weights + KV cache + activations +
//! per-thread scratch) and whether it fits in the memory this process may still use
//! (`MemAvailable` from /proc/meminfo, lowered by a cgroup v2/v1 limit when one is set).
//! Runs are refused before the KV cache or activations are allocated, with the numbers.

use crate::config::ModelConfig;
use crate::kv::KvTypes;
use crate::model::ForwardOptions;
use anyhow::Result;

/// Bytes a run needs, by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    pub context: usize,
    pub kv_types: KvTypes,
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    /// Live buffers of one prefill chunk (residual stream, projections, FFN chunk, logits).
    pub activation_bytes: u64,
    /// Per-thread attention tiles (decoded key/value blocks, scores, partials).
    pub scratch_bytes: u64,
}

impl MemoryPlan {
    /// The plan for `context` tokens with prefill chunks of `prefill_chunk` tokens on
    /// `threads` workers.
    pub fn new(
        config: &ModelConfig,
        weights_bytes: u64,
        context: usize,
        kv_types: KvTypes,
        opts: &ForwardOptions,
        prefill_chunk: usize,
        threads: usize,
    ) -> Self {
        let c = config;
        let d = c.head_dim;
        let kv_bytes = (c.num_hidden_layers * c.num_key_value_heads) as u64
            * context as u64
            * kv_types.row_pair_bytes(d) as u64;
        let rows = prefill_chunk.clamp(1, context.max(1)) as u64;
        let ffn_rows = (opts.mlp_chunk.max(1) as u64).min(rows);
        let (h, f, v) = (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.vocab_size as u64,
        );
        let q_dim = (c.num_attention_heads * d) as u64;
        let kv_dim = (c.num_key_value_heads * d) as u64;
        // f32: residual + normed + o-projection (3h), q + attention output + its tile
        // partials (3 q_dim), k + v (2 kv_dim) per row; gate, up, activation (3f) and
        // normed + down (2h) per FFN row; one logits row; activation quantization (~1.1
        // bytes per input value) for the widest input.
        let activation_bytes = 4 * rows * (3 * h + 3 * q_dim + 2 * kv_dim)
            + 4 * ffn_rows * (3 * f + 2 * h)
            + 4 * v
            + rows * f.max(h) * 9 / 8;
        let kc = opts.chunking.key_chunk.max(1) as u64;
        let qc = opts.chunking.query_chunk.max(1) as u64;
        let group = (c.num_attention_heads / c.num_key_value_heads.max(1)).max(1) as u64;
        let scratch_bytes =
            threads.max(1) as u64 * 4 * (2 * kc * d as u64 + kc + group * qc * (d as u64 + 2));
        Self {
            context,
            kv_types,
            weights_bytes,
            kv_bytes,
            activation_bytes,
            scratch_bytes,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes + self.kv_bytes + self.activation_bytes + self.scratch_bytes
    }

    /// One-line summary with every part.
    pub fn describe(&self) -> String {
        format!(
            "weights {} + KV cache ({}, {} tokens) {} + activations {} + scratch {} = {}",
            human_bytes(self.weights_bytes),
            self.kv_types.name(),
            self.context,
            human_bytes(self.kv_bytes),
            human_bytes(self.activation_bytes),
            human_bytes(self.scratch_bytes),
            human_bytes(self.total_bytes())
        )
    }

    /// Refuse when the part still to be allocated (everything but the loaded weights and
    /// `held_kv_bytes` of cache already held) exceeds what the process may still use.
    /// The part of this plan one process of a ring of `sp` workers carries when `here` of
    /// them run in it: their shards of the KV cache (1/sp each) and their own activations
    /// and attention scratch.
    pub fn ring_share(&self, sp: usize, here: usize) -> MemoryPlan {
        let (sp, here) = (sp.max(1) as u64, here.max(1) as u64);
        MemoryPlan {
            kv_bytes: (self.kv_bytes * here).div_ceil(sp),
            activation_bytes: self.activation_bytes * here,
            scratch_bytes: self.scratch_bytes * here,
            ..*self
        }
    }

    pub fn check_fits(&self, held_kv_bytes: u64, available: &Available) -> Result<()> {
        let needed = self.kv_bytes.saturating_sub(held_kv_bytes)
            + self.activation_bytes
            + self.scratch_bytes;
        if needed > available.bytes {
            return Err(crate::Error::OutOfMemory(format!(
                "not enough memory for {} tokens of context: it needs {} more ({}), but only {} is available ({}); use a shorter context, fewer --max-tokens, a smaller --kv-type (q8_0, q4_0) or a smaller --prefill-chunk",
                self.context,
                human_bytes(needed),
                self.describe(),
                human_bytes(available.bytes),
                available.source
            ))
            .into());
        }
        Ok(())
    }
}

/// Memory the process may still allocate, and where the figure came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

/// `MemAvailable`, lowered to the cgroup's remaining allowance when a limit is set.
/// `None` where neither can be read (non-Linux): nothing is refused then.
pub fn available_memory() -> Option<Available> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let mem = meminfo.as_deref().and_then(parse_meminfo_available);
    let cgroup = cgroup_remaining();
    match (mem, cgroup) {
        (Some(m), Some((c, src))) if c < m => Some(Available {
            bytes: c,
            source: src,
        }),
        (Some(m), _) => Some(Available {
            bytes: m,
            source: "MemAvailable in /proc/meminfo".into(),
        }),
        (None, Some((c, src))) => Some(Available {
            bytes: c,
            source: src,
        }),
        (None, None) => None,
    }
}

/// `MemAvailable:` of /proc/meminfo in bytes.
pub fn parse_meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Limit minus usage of this process's memory cgroup (v2 `memory.max`/`memory.current`,
/// or v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`), when a limit is set.
fn cgroup_remaining() -> Option<(u64, String)> {
    let rel = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in rel.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (dir, max_file, cur_file) = if controllers.is_empty() {
            ("/sys/fs/cgroup".to_string(), "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                "/sys/fs/cgroup/memory".to_string(),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        for base in [format!("{dir}{path}"), dir.clone()] {
            let read = |f: &str| std::fs::read_to_string(format!("{base}/{f}")).ok();
            let (Some(max), Some(cur)) = (read(max_file), read(cur_file)) else {
                continue;
            };
            let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) else {
                continue; // "max": no limit
            };
            if max >= 1 << 60 {
                continue; // v1's "unlimited"
            }
            return Some((
                max.saturating_sub(cur),
                format!(
                    "cgroup limit {} minus usage {} ({base})",
                    human_bytes(max),
                    human_bytes(cur)
                ),
            ));
        }
    }
    None
}

/// Worker threads the kernels use (`RAYON_NUM_THREADS`, as `set_threads` sets it, else
/// every core).
pub fn worker_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// 1.5 GiB, 512.0 MiB, ...
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvType;

    fn smollm2() -> ModelConfig {
        ModelConfig {
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            hidden_size: 576,
            intermediate_size: 1536,
            vocab_size: 49152,
            ..ModelConfig::llama2_7b()
        }
    }

    #[test]
    fn kv_bytes_follow_the_stored_row_sizes() {
        let c = smollm2();
        let o = ForwardOptions::default();
        let plan = |t| MemoryPlan::new(&c, 0, 131072, KvTypes::same(t), &o, 512, 2).kv_bytes;
        // 30 layers · 3 heads · 131072 tokens · (K + V row bytes)
        let per = 30 * 3 * 131072u64;
        assert_eq!(plan(KvType::F32), per * 2 * 256);
        assert_eq!(plan(KvType::F16), per * 2 * 128);
        assert_eq!(plan(KvType::Q8_0), per * 2 * 68);
        assert_eq!(plan(KvType::Q4_0), per * 2 * 36);
        // Activations depend on the chunk, not the context.
        let a = MemoryPlan::new(&c, 0, 1 << 20, KvTypes::F16, &o, 512, 2);
        let b = MemoryPlan::new(&c, 0, 1 << 12, KvTypes::F16, &o, 512, 2);
        assert_eq!(a.activation_bytes, b.activation_bytes);
        let small = MemoryPlan::new(&c, 0, 1 << 20, KvTypes::F16, &o, 64, 2);
        assert!(small.activation_bytes < a.activation_bytes / 4);
    }

    #[test]
    fn refusal_names_the_numbers() {
        let c = smollm2();
        let plan = MemoryPlan::new(
            &c,
            100 << 20,
            1 << 20,
            KvTypes::F16,
            &ForwardOptions::default(),
            512,
            2,
        );
        let avail = Available {
            bytes: 1 << 30,
            source: "test".into(),
        };
        let e = plan.check_fits(0, &avail).unwrap_err().to_string();
        assert!(
            e.contains("1048576 tokens") && e.contains("22.5 GiB") && e.contains("1.0 GiB"),
            "{e}"
        );
        // The part already held does not count again.
        assert!(plan
            .check_fits(
                plan.kv_bytes,
                &Available {
                    bytes: 1 << 28,
                    source: "t".into()
                }
            )
            .is_ok());
        assert_eq!(
            parse_meminfo_available("MemTotal: 10 kB\nMemAvailable:   2048 kB\n"),
            Some(2 << 20)
        );
    }

    #[test]
    fn a_ring_process_carries_its_workers_shards() {
        let c = smollm2();
        let o = ForwardOptions::default();
        let whole = MemoryPlan::new(&c, 0, 131072, KvTypes::F16, &o, 512, 2);
        // One MPI rank of four: a quarter of the cache (30 · 3 · 131072 · 256 bytes / 4),
        // its own activations.
        let rank = whole.ring_share(4, 1);
        assert_eq!(rank.kv_bytes, 30 * 3 * 131072 * 256 / 4);
        assert_eq!(rank.activation_bytes, whole.activation_bytes);
        // Four threads in one process: the whole cache, four workers' activations.
        let threads = whole.ring_share(4, 4);
        assert_eq!(threads.kv_bytes, whole.kv_bytes);
        assert_eq!(threads.activation_bytes, 4 * whole.activation_bytes);
        assert_eq!(whole.ring_share(1, 1), whole);
    }
}
