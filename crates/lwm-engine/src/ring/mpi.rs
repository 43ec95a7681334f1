//! Ring over MPI processes (cargo feature `mpi`; Open MPI, started by `mpirun -n SP`): one
//! worker per process, ranks as MPI ranks. Sends are `MPI_Isend` kept in flight while the
//! worker computes; receives poll `MPI_Improbe` so a silent rank is named after the
//! timeout instead of blocking forever.

use super::transport::{f32_to_u32, root_of_stall, timeout_error, u32_to_f32, Block, Ring, Tag};
use anyhow::{bail, Result};
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::time::{Duration, Instant};

pub struct MpiRing {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Sends in flight, each with the block it reads (kept alive until it completes).
    pending: Vec<(Request<'static, [f32]>, Block)>,
    shut_down: bool,
    // Last: MPI_Finalize runs when the universe drops, after everything above.
    _universe: mpi::environment::Universe,
}

impl MpiRing {
    /// Initialise MPI (once per process).
    pub fn init() -> Result<Self> {
        let Some(universe) = mpi::initialize() else {
            bail!("MPI is already initialised in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            world,
            rank,
            size,
            pending: Vec::new(),
            shut_down: false,
            _universe: universe,
        })
    }

    /// The error for a receive from `src` that timed out, naming the rank at the root of the
    /// stall rather than the neighbour that merely waited behind it: this rank tells every
    /// other whom it waited on, listens for the same from the others for a short grace, and
    /// follows the chain (`root_of_stall`).
    fn blame(&mut self, src: usize, tag: Tag, after: Duration) -> anyhow::Error {
        let report = std::sync::Arc::new(vec![u32_to_f32(src as u32)]);
        let me = self.rank;
        for dst in (0..self.size).filter(|&r| r != me) {
            let _ = self.send(dst, Tag::Silent, report.clone());
        }
        let mut waited_on = std::collections::BTreeMap::from([(self.rank, src)]);
        let grace = (after / 4).min(BLAME_GRACE);
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            let probe = self
                .world
                .any_process()
                .immediate_matched_probe_with_tag(Tag::Silent as i32);
            match probe {
                Some(matched) => {
                    let (data, status) = matched.matched_receive_vec::<f32>();
                    if let Some(&x) = data.first() {
                        waited_on.insert(status.source_rank() as usize, f32_to_u32(x) as usize);
                    }
                }
                None => std::thread::sleep(POLL),
            }
        }
        let root = root_of_stall(src, &waited_on);
        if root == src {
            return timeout_error(src, tag, after);
        }
        let chain: Vec<String> = waited_on
            .iter()
            .map(|(r, on)| format!("{r} on {on}"))
            .collect();
        anyhow::anyhow!(
            "ring worker rank {root} stalled the ring: it died, hangs or lost its link, and rank {src}, whose {tag:?} this rank waited {:.1}s for, was waiting behind it (ranks that timed out, waiting: {}); giving up (raise --ring-timeout if its steps are that slow)",
            after.as_secs_f64(),
            chain.join(", ")
        )
    }

    /// Complete the sends the receivers have taken (lets MPI make progress, too).
    fn reap(&mut self) {
        let mut still = Vec::with_capacity(self.pending.len());
        for (req, block) in self.pending.drain(..) {
            match req.test() {
                Ok(_) => drop(block),
                Err(req) => still.push((req, block)),
            }
        }
        self.pending = still;
    }
}

// SAFETY: MPI is initialised single-threaded and an `MpiRing` is created, used and dropped
// by the process's main thread only; `Ring: Send` exists for the threads transport, and the
// MPI path never moves its ring to another thread.
unsafe impl Send for MpiRing {}

/// How long a polling receive sleeps between probes: short next to a block's compute,
/// long enough not to steal a core from the co-located workers.
const POLL: Duration = Duration::from_micros(200);

/// How long a rank that timed out listens for the others' reports before naming a culprit:
/// ranks stalled behind the same fault time out within a step's time of each other.
const BLAME_GRACE: Duration = Duration::from_secs(1);

impl Ring for MpiRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&mut self, dst: usize, tag: Tag, data: Block) -> Result<()> {
        if dst >= self.size || dst == self.rank {
            bail!("rank {} cannot send to rank {dst}", self.rank);
        }
        // SAFETY: the slice lives in `data`'s heap buffer, which `pending` keeps alive (and
        // unmodified: it is shared and immutable) until the request has completed.
        let buf: &'static [f32] = unsafe { &*(data.as_slice() as *const [f32]) };
        let req = self
            .world
            .process_at_rank(dst as i32)
            .immediate_send_with_tag(StaticScope, buf, tag as i32);
        self.pending.push((req, data));
        self.reap();
        Ok(())
    }

    fn recv(&mut self, src: usize, tag: Tag, timeout: Option<Duration>) -> Result<Block> {
        if src >= self.size || src == self.rank {
            bail!("rank {} cannot receive from rank {src}", self.rank);
        }
        let start = Instant::now();
        loop {
            let probe = self
                .world
                .process_at_rank(src as i32)
                .immediate_matched_probe_with_tag(tag as i32);
            if let Some(matched) = probe {
                let (data, _) = matched.matched_receive_vec::<f32>();
                self.reap();
                return Ok(std::sync::Arc::new(data));
            }
            self.reap();
            if let Some(t) = timeout {
                if start.elapsed() >= t {
                    return Err(self.blame(src, tag, t));
                }
            }
            std::thread::sleep(POLL);
        }
    }

    fn shut_down(&mut self) {
        self.shut_down = true;
    }

    fn is_shut_down(&self) -> bool {
        self.shut_down
    }
}

/// End the whole MPI job after a failure. `MPI_Finalize` is collective: a rank that dropped
/// its `MpiRing` after an error would wait there forever for a hung or dead peer, so a
/// failed rank calls `MPI_Abort` instead, and mpirun ends every process of the job.
pub fn abort_job(code: i32) -> ! {
    mpi::topology::SimpleCommunicator::world().abort(code)
}

impl Drop for MpiRing {
    fn drop(&mut self) {
        // Wait for sends still in flight (bounded); after a failure the process exits and
        // mpirun ends the job, so unfinished requests are abandoned instead of waited on.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.pending.is_empty() && !self.shut_down && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(POLL);
        }
        for (req, block) in self.pending.drain(..) {
            std::mem::forget(req);
            std::mem::forget(block);
        }
    }
}
