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
    /// After a timeout, to every rank: which rank this one waited on in vain (MPI).
    Silent = 8,
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

/// The rank at the root of a stall. Every rank that timed out reports whom it waited on
/// (`waited_on[r]`); a rank waiting on a rank that itself waited follows the chain to the
/// first rank that reported nothing: that one died, hangs or lost its link, while the
/// others only waited behind it. Stops at a cycle (ranks all waiting on each other).
pub fn root_of_stall(first: usize, waited_on: &std::collections::BTreeMap<usize, usize>) -> usize {
    let mut at = first;
    let mut seen = std::collections::BTreeSet::new();
    while let Some(&next) = waited_on.get(&at) {
        if !seen.insert(at) {
            break;
        }
        at = next;
    }
    at
}

pub fn tag_error(src: usize, want: Tag, got: i32) -> anyhow::Error {
    anyhow::anyhow!("ring protocol error: rank {src} sent tag {got} where {want:?} was expected")
}

#[cfg(test)]
mod tests {
    use super::root_of_stall;
    use std::collections::BTreeMap;

    #[test]
    fn the_stall_is_traced_to_the_rank_that_reported_nothing() {
        // sp = 4, rank 2 hung: 3 waits on 2, 0 on 3, 1 on 0.
        let waited: BTreeMap<usize, usize> = [(3, 2), (0, 3), (1, 0)].into();
        for first in [3, 0, 1, 2] {
            assert_eq!(root_of_stall(first, &waited), 2, "from {first}");
        }
        // Only this rank's own report: the neighbour it waited on is named.
        assert_eq!(root_of_stall(1, &[(0, 1)].into()), 1);
        // Everyone waiting on everyone (no report missing): stops, names a rank of the cycle.
        let cycle: BTreeMap<usize, usize> = [(0, 1), (1, 2), (2, 0)].into();
        assert!(root_of_stall(0, &cycle) < 3);
    }
}
