//! Ring over MPI processes (cargo feature `mpi`; Open MPI, started by `mpirun -n SP`): one
//! worker per process, ranks as MPI ranks.
//!
//! A progress thread ("pump") makes every MPI call after start-up: it starts the sends the
//! worker hands it, receives whatever arrives into an inbox, and completes finished sends.
//! Why a thread: MPI moves a large message (over TCP, anything past the 64 KiB eager limit)
//! only inside MPI calls on both sides, and the receiver's side starts only once a receive
//! matches it. A worker busy in its attention compute makes no MPI calls, so without the
//! pump a key/value block crossed the network only when its receiver asked for it, after
//! the compute, and the ring's transfer never hid behind compute (measured across
//! network-namespace hosts: docs/scaling.md). Receives wait on the inbox and give up after
//! the timeout, naming the rank at the root of the stall.

use super::transport::{
    f32_to_u32, root_of_stall, tag_error, timeout_error, u32_to_f32, Block, Ring, Tag,
};
use anyhow::{bail, Result};
use mpi::environment::Threading;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Messages received and not yet taken: (source rank, tag, body), in arrival order.
#[derive(Default)]
struct Inbox {
    msgs: VecDeque<(usize, i32, Block)>,
}

type Shared = Arc<(Mutex<Inbox>, Condvar)>;

pub struct MpiRing {
    rank: usize,
    size: usize,
    inbox: Shared,
    outbox: Option<Sender<(usize, Tag, Block)>>,
    stop: Arc<AtomicBool>,
    shut_down: Arc<AtomicBool>,
    pump: Option<JoinHandle<()>>,
    // Last: MPI_Finalize runs when the universe drops, after the pump has been joined.
    _universe: mpi::environment::Universe,
}

/// How long the pump sleeps when nothing moved: short next to a block's compute, long
/// enough not to steal a core from the co-located workers.
const POLL: Duration = Duration::from_micros(100);

/// How long a rank that timed out listens for the others' reports before naming a culprit:
/// ranks stalled behind the same fault time out within a step's time of each other.
const BLAME_GRACE: Duration = Duration::from_secs(1);

impl MpiRing {
    /// Initialise MPI (once per process, with MPI_THREAD_MULTIPLE: the pump makes the
    /// transfers, the worker may abort) and start the pump.
    pub fn init() -> Result<Self> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple)
        else {
            bail!("MPI is already initialised in this process");
        };
        if threading != Threading::Multiple {
            bail!("this MPI library does not provide MPI_THREAD_MULTIPLE (got {threading:?}); the ring's progress thread needs it (Open MPI and MPICH builds from Debian have it)");
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let inbox: Shared = Arc::default();
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let shut_down = Arc::new(AtomicBool::new(false));
        let pump = {
            let (inbox, stop, shut_down) = (inbox.clone(), stop.clone(), shut_down.clone());
            std::thread::Builder::new()
                .name(format!("mpi-pump-{rank}"))
                .spawn(move || pump(rx, &inbox, &stop, &shut_down))?
        };
        Ok(Self {
            rank,
            size,
            inbox,
            outbox: Some(tx),
            stop,
            shut_down,
            pump: Some(pump),
            _universe: universe,
        })
    }

    /// The error for a receive from `src` that timed out, naming the rank at the root of the
    /// stall rather than the neighbour that merely waited behind it: this rank tells every
    /// other whom it waited on, listens for the same from the others for a short grace, and
    /// follows the chain (`root_of_stall`).
    fn blame(&mut self, src: usize, tag: Tag, after: Duration) -> anyhow::Error {
        let report = Arc::new(vec![u32_to_f32(src as u32)]);
        let me = self.rank;
        for dst in (0..self.size).filter(|&r| r != me) {
            let _ = self.send(dst, Tag::Silent, report.clone());
        }
        let mut waited_on = std::collections::BTreeMap::from([(self.rank, src)]);
        let deadline = Instant::now() + (after / 4).min(BLAME_GRACE);
        let (lock, cvar) = &*self.inbox;
        let mut inbox = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            inbox.msgs.retain(|(from, t, body)| {
                if *t != Tag::Silent as i32 {
                    return true;
                }
                if let Some(&x) = body.first() {
                    waited_on.insert(*from, f32_to_u32(x) as usize);
                }
                false
            });
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            inbox = cvar
                .wait_timeout(inbox, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(inbox);
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
}

/// The progress thread: every MPI call after start-up is made here.
fn pump(
    outbox: Receiver<(usize, Tag, Block)>,
    inbox: &Shared,
    stop: &AtomicBool,
    shut_down: &AtomicBool,
) {
    let world = SimpleCommunicator::world();
    // Sends in flight, each with the block it reads (kept alive until it completes).
    let mut pending: Vec<(Request<'static, [f32]>, Block)> = Vec::new();
    let mut stopping_since: Option<Instant> = None;
    loop {
        // Read before draining the outbox: the worker drops its sender before it sets
        // `stop`, so once `stop` is seen every message handed over is already queued.
        let stopping = stop.load(Ordering::Acquire);
        let mut moved = false;
        while let Ok((dst, tag, data)) = outbox.try_recv() {
            // SAFETY: the slice lives in `data`'s heap buffer, which `pending` keeps alive
            // (and unmodified: it is shared and immutable) until the request has completed.
            let buf: &'static [f32] = unsafe { &*(data.as_slice() as *const [f32]) };
            let req = world.process_at_rank(dst as i32).immediate_send_with_tag(
                StaticScope,
                buf,
                tag as i32,
            );
            pending.push((req, data));
            moved = true;
        }
        if let Some(matched) = world.any_process().immediate_matched_probe() {
            let (data, status) = matched.matched_receive_vec::<f32>();
            let (lock, cvar) = &**inbox;
            lock.lock()
                .unwrap_or_else(|e| e.into_inner())
                .msgs
                .push_back((status.source_rank() as usize, status.tag(), Arc::new(data)));
            cvar.notify_all();
            moved = true;
        }
        let mut still = Vec::with_capacity(pending.len());
        for (req, block) in pending.drain(..) {
            match req.test() {
                Ok(_) => drop(block),
                Err(req) => still.push((req, block)),
            }
        }
        pending = still;
        if stopping {
            // Finish the sends still in flight (bounded); after a failure the process exits
            // and mpirun ends the job, so unfinished requests are abandoned.
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if pending.is_empty()
                || shut_down.load(Ordering::Relaxed)
                || since.elapsed() > Duration::from_secs(2)
            {
                for (req, block) in pending.drain(..) {
                    std::mem::forget(req);
                    std::mem::forget(block);
                }
                return;
            }
        }
        if !moved {
            std::thread::sleep(POLL);
        }
    }
}

// SAFETY: the universe is only dropped (MPI_Finalize) by the thread owning the `MpiRing`,
// after the pump is joined; every other MPI call after start-up is the pump's own, and
// MPI was initialised with MPI_THREAD_MULTIPLE.
unsafe impl Send for MpiRing {}

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
        let sent = self.outbox.as_ref().map(|o| o.send((dst, tag, data)));
        if !matches!(sent, Some(Ok(()))) {
            bail!("the MPI progress thread of rank {} has stopped", self.rank);
        }
        Ok(())
    }

    fn recv(&mut self, src: usize, tag: Tag, timeout: Option<Duration>) -> Result<Block> {
        if src >= self.size || src == self.rank {
            bail!("rank {} cannot receive from rank {src}", self.rank);
        }
        let start = Instant::now();
        let (lock, cvar) = &*self.inbox;
        let mut inbox = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // The first message from `src` that is not a stall report; it must carry `tag`.
            let at = inbox
                .msgs
                .iter()
                .position(|(from, t, _)| *from == src && *t != Tag::Silent as i32);
            if let Some(i) = at {
                let (_, got, body) = inbox.msgs.remove(i).expect("position is in range");
                if got != tag as i32 {
                    return Err(tag_error(src, tag, got));
                }
                return Ok(body);
            }
            let wait = match timeout {
                Some(t) => {
                    let left = t.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        drop(inbox);
                        return Err(self.blame(src, tag, t));
                    }
                    left
                }
                None => Duration::from_millis(100),
            };
            inbox = cvar
                .wait_timeout(inbox, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn shut_down(&mut self) {
        self.shut_down.store(true, Ordering::Relaxed);
    }

    fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Relaxed)
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
        self.outbox = None;
        self.stop.store(true, Ordering::Release);
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
    }
}
