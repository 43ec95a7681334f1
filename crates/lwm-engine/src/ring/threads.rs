//! In-process ring: one thread per worker, channels between every pair. The default
//! transport when `sp > 1` in one process. A channel send hands over a shared pointer, so
//! passing a key/value block on costs nothing and overlaps completely with compute.

use super::transport::{tag_error, timeout_error, Block, Ring, Tag};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Msg = (Tag, Block);

pub struct ThreadRing {
    rank: usize,
    /// `to[dst]`: channel to worker dst (None for self).
    to: Vec<Option<Sender<Msg>>>,
    /// `from[src]`: channel from worker src.
    from: Vec<Option<Receiver<Msg>>>,
    shutdown: Arc<AtomicBool>,
}

impl ThreadRing {
    /// Transports of `n` workers, fully connected, sharing one shutdown flag.
    pub fn mesh(n: usize) -> Vec<ThreadRing> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut rings: Vec<ThreadRing> = (0..n)
            .map(|rank| ThreadRing {
                rank,
                to: (0..n).map(|_| None).collect(),
                from: (0..n).map(|_| None).collect(),
                shutdown: shutdown.clone(),
            })
            .collect();
        for src in 0..n {
            for dst in 0..n {
                if src != dst {
                    let (tx, rx) = channel();
                    rings[src].to[dst] = Some(tx);
                    rings[dst].from[src] = Some(rx);
                }
            }
        }
        rings
    }
}

/// How often a blocked receive looks at the shutdown flag.
const POLL: Duration = Duration::from_millis(50);

impl Ring for ThreadRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn workers_in_process(&self) -> usize {
        self.size()
    }

    fn send(&mut self, dst: usize, tag: Tag, data: Block) -> Result<()> {
        let Some(Some(tx)) = self.to.get(dst) else {
            bail!("rank {} cannot send to rank {dst}", self.rank);
        };
        if tx.send((tag, data)).is_err() {
            bail!("ring worker rank {dst} has exited (its {tag:?} message cannot be delivered)");
        }
        Ok(())
    }

    fn recv(&mut self, src: usize, tag: Tag, timeout: Option<Duration>) -> Result<Block> {
        let Some(Some(rx)) = self.from.get(src) else {
            bail!("rank {} cannot receive from rank {src}", self.rank);
        };
        let start = Instant::now();
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                bail!("ring is shutting down (another worker failed)");
            }
            let wait = match timeout {
                Some(t) => {
                    let left = t.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Err(timeout_error(src, tag, t));
                    }
                    left.min(POLL)
                }
                None => POLL,
            };
            match rx.recv_timeout(wait) {
                Ok((got, data)) if got == tag => return Ok(data),
                Ok((got, _)) => return Err(tag_error(src, tag, got as i32)),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("ring worker rank {src} exited while rank {} waited for its {tag:?} message", self.rank)
                }
            }
        }
    }

    fn shut_down(&mut self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }

    fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

/// Run `f` with a ring of `sp` threads over `model`: the calling thread is rank 0 (the
/// session `f` drives), ranks 1..sp run `serve`. Errors of any worker are reported with
/// their rank.
pub fn with_thread_ring<R>(
    model: &lwm_core::model::Model,
    sp: usize,
    opts: super::RingOptions,
    f: impl FnOnce(&mut super::RingSession) -> Result<R>,
) -> Result<R> {
    if sp == 0 {
        bail!("a ring needs at least one worker");
    }
    let mut rings = ThreadRing::mesh(sp);
    let rest: Vec<ThreadRing> = rings.drain(1..).collect();
    let rank0 = rings.pop().expect("rank 0");
    std::thread::scope(|s| {
        let handles: Vec<_> = rest
            .into_iter()
            .map(|mut t| {
                std::thread::Builder::new()
                    .name(format!("ring-{}", t.rank))
                    .spawn_scoped(s, move || {
                        let r = super::serve(model, &mut t, opts);
                        if r.is_err() {
                            t.shut_down();
                        }
                        r
                    })
            })
            .collect::<std::io::Result<_>>()?;
        let mut session = super::RingSession::new(model, Box::new(rank0), opts);
        let out = f(&mut session);
        if out.is_err() {
            // Release workers blocked in a step, whatever the cause on this side.
            session.shut_down_ring();
        }
        drop(session);
        let mut worker_errors = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => worker_errors.push(format!("{e:#}")),
                Err(_) => worker_errors.push(format!("ring worker rank {} panicked", i + 1)),
            }
        }
        match out {
            Ok(v) if worker_errors.is_empty() => Ok(v),
            Ok(_) => bail!("{}", worker_errors.join("; ")),
            Err(e) if worker_errors.is_empty() => Err(e),
            Err(e) => Err(e.context(format!("worker errors: {}", worker_errors.join("; ")))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_neighbour_is_named_within_the_timeout() {
        let mut rings = ThreadRing::mesh(3);
        let t0 = Instant::now();
        let e = rings[0]
            .recv(2, Tag::KvBlock, Some(Duration::from_millis(200)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        // A worker that exited is reported at once, not after the timeout.
        let r1 = rings.remove(1);
        drop(r1);
        let e = rings[0]
            .recv(1, Tag::KvBlock, Some(Duration::from_secs(30)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 exited"), "{e}");
    }

    #[test]
    fn messages_arrive_in_order_and_tags_are_checked() {
        let mut rings = ThreadRing::mesh(2);
        let (a, b) = rings.split_at_mut(1);
        a[0].send(1, Tag::KvBlock, Arc::new(vec![1.0])).unwrap();
        a[0].send(1, Tag::Partial, Arc::new(vec![2.0])).unwrap();
        let got = b[0].recv(0, Tag::KvBlock, None).unwrap();
        assert_eq!(*got, vec![1.0]);
        let e = b[0].recv(0, Tag::Logits, None).unwrap_err().to_string();
        assert!(e.contains("protocol"), "{e}");
    }
}
