//! One thread pool for the hot loops (matrix products, attention tiles).
//!
//! A decode step runs a few hundred parallel regions of some microseconds each, so waking
//! sleeping threads for every region would cost more than the math: workers spin between
//! regions. But a pool that only spins collapses when the machine is oversubscribed (other
//! processes, or more of our threads than cores): a caller spinning on a worker that the
//! OS has not scheduled burns its own time slice and the worker's, and decode fell from
//! ~45 tok/s on one thread to ~7 tok/s on two. So here:
//!
//! - items are claimed one at a time from a shared counter, so a descheduled worker holds
//!   at most the item it is running, never a share of the region decided in advance;
//! - waiting (the caller for the region's last items, workers for the next region) spins
//!   briefly, then yields the core (`sched_yield`: free when nobody else wants it), and
//!   workers finally park after ~2 ms without work;
//! - a second caller (threads of the thread ring) or a nested call runs inline.
//!
//! The worker count follows `RAYON_NUM_THREADS` (`lwm::set_threads`), else all cores, and is
//! fixed when the pool first runs.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Spins (pause instructions) before a waiter starts yielding its core.
const SPINS: u32 = 2_000;
/// How long an idle worker keeps polling (yielding) before it parks.
const IDLE_BEFORE_PARK: Duration = Duration::from_millis(2);

thread_local! {
    /// Set on pool workers and on a caller while it runs a region: nested calls run inline.
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

/// One parallel region: `run(data, i)` for every i in 0..n, claimed from `next`.
struct Job {
    data: usize,
    run: unsafe fn(usize, usize),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl Job {
    /// Claim and run items until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: `data` points at the caller's closure, which outlives every claimed
            // item: the caller returns only after `done == n` (`wait_done`).
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (self.run)(self.data, i) }));
            if let Err(p) = r {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire) >= self.n
    }
}

struct Shared {
    /// Bumped for every region; workers compare it with the last one they saw.
    generation: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    sleeping: AtomicUsize,
    wake: Condvar,
    wake_lock: Mutex<()>,
}

struct Pool {
    workers: usize,
    shared: Arc<Shared>,
    call_lock: Mutex<()>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            sleeping: AtomicUsize::new(0),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        });
        let workers = threads.saturating_sub(1);
        for w in 0..workers {
            let s = shared.clone();
            // A worker that cannot be spawned only means fewer helpers: items are claimed
            // dynamically, so the caller runs whatever nobody else takes.
            let _ = std::thread::Builder::new()
                .name(format!("lwm-pool-{w}"))
                .spawn(move || worker_loop(&s));
        }
        Pool {
            workers,
            shared,
            call_lock: Mutex::new(()),
        }
    })
}

/// Wait until `ready()`: spin, then yield the core between checks; `deadline` (workers
/// only) ends the wait unsuccessfully.
fn wait_until(ready: impl Fn() -> bool, deadline: Option<Duration>) -> bool {
    for _ in 0..SPINS {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
    }
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if deadline.is_some_and(|d| start.elapsed() > d) {
            return false;
        }
        std::thread::yield_now();
    }
}

fn worker_loop(s: &Shared) {
    IN_REGION.with(|f| f.set(true));
    let mut seen = 0u64;
    loop {
        let fresh = |seen: u64| s.generation.load(Ordering::SeqCst) != seen;
        if !wait_until(|| fresh(seen), Some(IDLE_BEFORE_PARK)) {
            let mut g = s.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            while !fresh(seen) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
        seen = s.generation.load(Ordering::SeqCst);
        let job = s.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

unsafe fn trampoline<F: Fn(usize) + Sync>(data: usize, i: usize) {
    (*(data as *const F))(i)
}

/// Threads a parallel region runs on (the pool's workers and the caller).
pub fn threads() -> usize {
    pool().workers + 1
}

/// Run `f(i)` for every i in 0..n_items across the pool (the caller's thread helps).
pub fn for_each<F: Fn(usize) + Sync>(n_items: usize, f: F) {
    if n_items <= 1 || IN_REGION.with(|r| r.get()) {
        // One item: waking the pool would only add a barrier. Nested: run inline.
        (0..n_items).for_each(f);
        return;
    }
    let p = pool();
    // No workers, or another thread (a ring worker) holds the pool: run inline.
    let owner = (p.workers > 0)
        .then(|| p.call_lock.try_lock().ok())
        .flatten();
    let Some(_owner) = owner else {
        (0..n_items).for_each(f);
        return;
    };
    let job = Arc::new(Job {
        data: &f as *const F as usize,
        run: trampoline::<F>,
        n: n_items,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panic: Mutex::new(None),
    });
    *p.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
    p.shared.generation.fetch_add(1, Ordering::SeqCst);
    if p.shared.sleeping.load(Ordering::SeqCst) > 0 {
        let _g = p.shared.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        p.shared.wake.notify_all();
    }
    // `work` catches each item's panic, so this returns normally and the wait below always
    // runs before `f` (which the workers' items borrow) goes out of scope.
    IN_REGION.with(|r| r.set(true));
    job.work();
    IN_REGION.with(|r| r.set(false));
    wait_until(|| job.finished(), None);
    *p.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let payload = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = payload {
        resume_unwind(payload);
    }
}

/// Fill `out` in parallel, chunk `i` (length `chunk`, the last may be shorter) by `f(i, chunk_slice)`.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let len = out.len();
    let chunk = chunk.max(1);
    let n = len.div_ceil(chunk);
    let ptr = out.as_mut_ptr() as usize;
    for_each(n, |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: chunks are disjoint ranges of `out`, which outlives the call
        // (`for_each` returns only after every item ran).
        let s = unsafe { std::slice::from_raw_parts_mut((ptr as *mut T).add(start), end - start) };
        f(i, s);
    });
}

/// Map 0..n in parallel, results in order.
pub fn map<R: Send + Default + Clone>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out = vec![R::default(); n];
    for_each_chunk_mut(&mut out, 1, |i, o| o[0] = f(i));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_and_nested_calls_run_inline() {
        for n in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                for_each(3, |_| {}); // nested
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
        let squares = map(50, |i| i * i);
        assert_eq!(squares, (0..50).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn concurrent_callers_and_a_panicking_item() {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for _ in 0..200 {
                        let total = AtomicUsize::new(0);
                        for_each(16, |i| {
                            total.fetch_add(i + t, Ordering::Relaxed);
                        });
                        assert_eq!(total.load(Ordering::Relaxed), 120 + 16 * t);
                    }
                });
            }
        });
        let r = catch_unwind(|| for_each(8, |i| assert!(i != 5, "item 5 fails")));
        assert!(r.is_err(), "a panicking item propagates to the caller");
        // The pool is still usable afterwards.
        assert_eq!(map(8, |i| i + 1).iter().sum::<usize>(), 36);
    }
}
