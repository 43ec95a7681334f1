//! The ring interface: numbered workers exchanging f32 blocks, with non-blocking sends and
//! receives that give up after a timeout naming the silent rank. Two transports implement
//! it: threads in one process (`threads`) and MPI processes (`mpi`, cargo feature `mpi`).

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;

/// A message body. Shared, so a worker can pass a key/value block on to its neighbour and
/// keep computing on it without a copy (threads) or while MPI reads it (processes).
pub type Block = Arc<Vec<f32>>;

/// What a message carries; receivers check it, so a protocol slip is an error, not a hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Tag {
    /// Rank 0 to the others: what to run next.
    Command = 1,
    /// A worker's key/value shard of one layer, travelling around the ring.
    KvBlock = 2,
    /// A decode step's attention partials (output, max, sum) of one worker.
    Partial = 3,
    /// The last token's logits, from the worker owning it to rank 0.
    Logits = 4,
    /// Figures for `lwm bench --mesh-dim`: per-worker KV bytes and timings.
    Stats = 5,
    /// Training: a key/value block (with its dK/dV in the backward) going round the ring.
    TrainKv = 6,
    /// Training: gradients (and per-update scalars) summed over the ranks.
    Grads = 7,
}

pub trait Ring: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Start sending `data` to `dst`; returns without waiting for the receiver.
    fn send(&mut self, dst: usize, tag: Tag, data: Block) -> Result<()>;
    /// The next message from `src`, which must carry `tag`. `timeout` None waits for as long
    /// as it takes (an idle worker waiting for rank 0's next command); otherwise a silent
    /// `src` is an error naming it.
    fn recv(&mut self, src: usize, tag: Tag, timeout: Option<Duration>) -> Result<Block>;
    /// How many of the ring's workers share this process's memory (all of them for the
    /// threads ring, one per process under MPI).
    fn workers_in_process(&self) -> usize {
        1
    }
    /// Ask every worker blocked on this transport to give up (after an error).
    fn shut_down(&mut self) {}
    /// True once the ring is being torn down.
    fn is_shut_down(&self) -> bool {
        false
    }
    /// Right neighbour (receives what this worker passes on).
    fn next(&self) -> usize {
        (self.rank() + 1) % self.size()
    }
    /// Left neighbour (sends to this worker).
    fn prev(&self) -> usize {
        (self.rank() + self.size() - 1) % self.size()
    }
}

/// u32 values (token ids, positions, counts) travel bit-for-bit inside f32 blocks.
pub fn u32_to_f32(x: u32) -> f32 {
    f32::from_bits(x)
}

pub fn f32_to_u32(x: f32) -> u32 {
    x.to_bits()
}

pub fn timeout_error(src: usize, tag: Tag, after: Duration) -> anyhow::Error {
    anyhow::anyhow!(
        "ring worker rank {src} sent no {tag:?} message for {:.1}s: it died or hangs; giving up (raise --ring-timeout if its steps are that slow)",
        after.as_secs_f64()
    )
}

pub fn tag_error(src: usize, want: Tag, got: i32) -> anyhow::Error {
    anyhow::anyhow!("ring protocol error: rank {src} sent tag {got} where {want:?} was expected")
}
