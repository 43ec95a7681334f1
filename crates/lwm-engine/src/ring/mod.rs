//! RingAttention: one sequence split over `sp` workers, so the context a model can hold
//! grows with the number of workers (LWM's sequence parallelism, `mesh_dim`'s `sp` axis).
//!
//! Every worker holds the model weights and a shard of the KV cache (`kv::KvShard`, in the
//! cache's element types). Positions are dealt by key block (`layout`), and every worker
//! runs the model's one forward (`Model::forward_layers`) on its rows with a ring attention
//! backend (`worker`): per layer it appends its keys/values to its shard and runs the ring
//! pass (`prefill`): shards rotate around the ring while every worker computes the
//! partials of its query tiles against the key blocks it holds, so after `sp` steps each
//! query has seen every key, never materialising more than one remote shard. A decode step
//! (one token) runs on every worker, each attends its own blocks, and the partials are
//! exchanged (`decode`). Partials are merged in ascending block order on every path, so the
//! ring's logits are one worker's, bit for bit.
//!
//! Transports (`transport::Ring`): threads in one process (`threads`), MPI processes
//! (`mpi`, cargo feature `mpi`). Rank 0 drives (`session`); the others `serve` its commands.
//! Every receive inside a step has a timeout, so a dead or hung worker makes the others fail
//! with an error naming its rank instead of hanging.

pub mod decode;
pub mod layout;
pub mod mesh;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod prefill;
pub mod session;
pub mod threads;
pub mod transport;
pub mod worker;

pub use mesh::MeshDim;
pub use session::{serve, RingSession, WorkerStats};
pub use threads::with_thread_ring;

use anyhow::{bail, Result};
use std::time::Duration;

/// How long a worker waits for a message inside a step before declaring its sender dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The worker returns an error (as a crash would) at its second layer.
    Fail,
    /// The worker stops answering at its second layer.
    Hang,
}

/// A fault to inject, for testing the fault handling (`LWM_RING_FAULT=fail:RANK|hang:RANK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy)]
pub struct RingOptions {
    pub timeout: Duration,
    pub fault: Option<Fault>,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            fault: None,
        }
    }
}

impl RingOptions {
    /// Defaults, with `LWM_RING_FAULT` (see `Fault`) read from the environment.
    pub fn from_env() -> Result<Self> {
        let mut o = Self::default();
        if let Ok(spec) = std::env::var("LWM_RING_FAULT") {
            let (kind, rank) = spec.split_once(':').unwrap_or((&spec, ""));
            let kind = match kind {
                "fail" => FaultKind::Fail,
                "hang" => FaultKind::Hang,
                _ => bail!("LWM_RING_FAULT='{spec}': use fail:RANK or hang:RANK"),
            };
            let Ok(rank) = rank.parse() else {
                bail!("LWM_RING_FAULT='{spec}': use fail:RANK or hang:RANK");
            };
            o.fault = Some(Fault { rank, kind });
        }
        Ok(o)
    }
}

/// Where a worker's time went: attention compute against key/value blocks vs waiting for
/// the next block or the other workers' partials (transfer not hidden behind compute).
#[derive(Debug, Clone, Copy, Default)]
pub struct RingTimes {
    pub compute_secs: f64,
    pub wait_secs: f64,
    /// Key/value blocks (prefill) attended.
    pub blocks: usize,
    pub bytes_sent: usize,
}
