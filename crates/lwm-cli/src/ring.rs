//! `--mesh-dim` for generate/chat/logits (sequence parallelism over a ring of workers) and
//! `lwm ring-bench`. Threads in one process by default; under `mpirun` (built with
//! `--features mpi`) one worker per MPI process, rank 0 printing.

use crate::ModelArgs;
use anyhow::{bail, Result};
use clap::Args;
use lwm::generate::Engine;
use lwm::ring::{MeshDim, RingOptions, RingSession, WorkerStats};
use std::time::{Duration, Instant};

#[derive(Args, Clone, Default)]
#[command(next_help_heading = "Ring")]
pub struct RingArgs {
    /// Device mesh `dp,fsdp,tp,sp` (the original's --mesh_dim; one axis may be -1 under
    /// mpirun). sp > 1 splits the sequence over a ring of sp workers: threads here, or the
    /// MPI processes when started by `mpirun -n SP` (binary built with --features mpi).
    #[arg(long)]
    pub mesh_dim: Option<String>,
    /// Seconds a ring worker waits for another before naming it dead or hung.
    #[arg(long, default_value_t = 10.0)]
    pub ring_timeout: f64,
    /// Print every worker's KV bytes and compute/wait time per key/value block to stderr.
    #[arg(long)]
    pub ring_stats: bool,
}

fn print_stats(s: &mut RingSession) -> Result<()> {
    for w in s.stats()? {
        let blocks = w.times.blocks.max(1) as f64;
        eprintln!(
            "ring rank {}: {} KV rows, {} KV bytes; {} blocks, compute {:.3} ms/block, wait {:.3} ms/block, {:.0} bytes sent/block; totals compute {:.3}s wait {:.3}s",
            w.rank,
            w.kv_rows,
            w.kv_bytes,
            w.times.blocks,
            1e3 * w.times.compute_secs / blocks,
            1e3 * w.times.wait_secs / blocks,
            w.times.bytes_sent as f64 / blocks,
            w.times.compute_secs,
            w.times.wait_secs
        );
    }
    Ok(())
}

/// How the command runs: alone, as the ring's rank 0 (it prints), or as another MPI rank.
pub enum Role<R> {
    Single,
    Root(R),
    /// Another MPI rank: it served rank 0 and prints nothing.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    Worker,
}

/// This process's rank in the MPI job that started us, if any (read from the launcher's
/// environment, so it is known before MPI is initialised: commands use it to keep ranks
/// other than 0 away from files they would otherwise all write).
pub fn mpi_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// Processes in the MPI job that started us (Open MPI or a PMI launcher), if any.
pub fn mpi_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

impl RingArgs {
    fn options(&self) -> Result<RingOptions> {
        if !(self.ring_timeout.is_finite() && self.ring_timeout > 0.0) {
            bail!("--ring-timeout must be a positive number of seconds");
        }
        let mut o = RingOptions::from_env()?;
        o.timeout = Duration::from_secs_f64(self.ring_timeout);
        Ok(o)
    }

    /// Run `f` with a ring session when `--mesh-dim` asks for sp > 1 (or we run under
    /// mpirun); `Role::Single` when the command should run on one worker as usual.
    pub fn run<R>(
        &self,
        engine: &Engine,
        f: impl FnOnce(&mut RingSession) -> Result<R>,
    ) -> Result<Role<R>> {
        let world = mpi_world_size().filter(|&n| n > 1);
        let Some(text) = &self.mesh_dim else {
            if let Some(n) = world {
                bail!("started by mpirun with {n} processes: give --mesh-dim 1,1,1,{n}");
            }
            return Ok(Role::Single);
        };
        let mesh = MeshDim::parse(text, world)?;
        let opts = self.options()?;
        let stats = self.ring_stats;
        let f = move |s: &mut RingSession| -> Result<R> {
            let out = f(s)?;
            if stats {
                print_stats(s)?;
            }
            Ok(out)
        };
        match world {
            None if mesh.sp == 1 => Ok(Role::Single),
            None => Ok(Role::Root(lwm::ring::with_thread_ring(
                &engine.model,
                mesh.sp,
                opts,
                f,
            )?)),
            Some(n) => run_mpi(engine, n, opts, f),
        }
    }
}

#[cfg(feature = "mpi")]
fn run_mpi<R>(
    engine: &Engine,
    _world: usize,
    opts: RingOptions,
    f: impl FnOnce(&mut RingSession) -> Result<R>,
) -> Result<Role<R>> {
    use lwm::ring::transport::Ring;
    let mut ring = lwm::ring::mpi::MpiRing::init()?;
    let rank = ring.rank();
    let result = if rank != 0 {
        lwm::ring::serve(&engine.model, &mut ring, opts).map(|_| Role::Worker)
    } else {
        let mut session = RingSession::new(&engine.model, Box::new(ring), opts);
        let out = f(&mut session);
        if out.is_err() {
            session.shut_down_ring();
        }
        return match out {
            Ok(r) => Ok(Role::Root(r)),
            Err(e) => abort_mpi_job(rank, e),
        };
    };
    result.or_else(|e| abort_mpi_job(rank, e))
}

/// A failed rank reports and ends the whole job (MPI_Abort): finalizing normally would
/// wait for the hung or dead peer forever.
#[cfg(feature = "mpi")]
fn abort_mpi_job<R>(rank: usize, e: anyhow::Error) -> Result<R> {
    use std::io::Write;
    eprintln!("error: [rank {rank}] {e:#}");
    let _ = std::io::stderr().flush();
    lwm::ring::mpi::abort_job(1)
}

#[cfg(not(feature = "mpi"))]
fn run_mpi<R>(
    _engine: &Engine,
    world: usize,
    _opts: RingOptions,
    _f: impl FnOnce(&mut RingSession) -> Result<R>,
) -> Result<Role<R>> {
    bail!("started by mpirun with {world} processes, but this lwm was built without MPI support (cargo build --features mpi)")
}

#[derive(Args)]
pub struct RingBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens to prefill (a deterministic synthetic prompt).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Ring sizes to measure, comma-separated (default 1,2,4; under mpirun the job's size,
    /// one MPI process per worker).
    #[arg(long)]
    pub sp: Option<String>,
    /// Runs per ring size (the spread is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn spread(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Prefill time, per-worker KV bytes and compute vs wait per key/value block, per ring size.
pub fn bench(a: RingBenchArgs) -> Result<()> {
    let engine = a.model.load()?;
    // Under mpirun the ring is the job's processes, over MPI (across hosts when the
    // hostfile says so): one ring size, the job's.
    let world = mpi_world_size().filter(|&n| n > 1);
    let sp_text = match (&a.sp, world) {
        (Some(s), Some(n)) if s.trim() != n.to_string() => {
            bail!("started by mpirun with {n} processes: --sp must be {n} (or left out)")
        }
        (_, Some(n)) => n.to_string(),
        (Some(s), None) => s.clone(),
        (None, None) => "1,2,4".to_string(),
    };
    let sps: Vec<usize> = sp_text
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--sp '{sp_text}' must be comma-separated sizes"))?;
    if sps.contains(&0) || a.tokens < 2 || a.repeats == 0 {
        bail!("--sp sizes, --repeats must be >= 1 and --tokens >= 2");
    }
    let vocab = engine.model.config.vocab_size as u64;
    let mut rng = lwm::rng::XorShift::new(1);
    let ids: Vec<u32> = (0..a.tokens)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let opts = RingOptions {
        timeout: Duration::from_secs(600),
        fault: None,
    };
    let pressure = std::fs::read_to_string("/proc/pressure/cpu").unwrap_or_default();
    // Each repeat prefills the same prompt into an empty ring; its figures are the
    // difference of the workers' counters around it.
    let measure = |s: &mut RingSession| -> Result<(Vec<f64>, Vec<WorkerStats>)> {
        let mut secs = Vec::new();
        let mut last = Vec::new();
        for _ in 0..a.repeats {
            s.clear()?;
            let before = s.stats()?;
            let t0 = Instant::now();
            s.prefill(&ids, a.model.prefill_chunk, |_| {})?;
            secs.push(t0.elapsed().as_secs_f64());
            last = s.stats()?;
            for (w, b) in last.iter_mut().zip(&before) {
                w.times.compute_secs -= b.times.compute_secs;
                w.times.wait_secs -= b.times.wait_secs;
                w.times.blocks -= b.times.blocks;
                w.times.bytes_sent -= b.times.bytes_sent;
            }
        }
        Ok((secs, last))
    };
    let mut rows = Vec::new();
    for &sp in &sps {
        let (secs, last) = match world {
            None => lwm::ring::with_thread_ring(&engine.model, sp, opts, measure)?,
            Some(n) => match run_mpi(&engine, n, opts, measure)? {
                Role::Root(r) => r,
                // The other ranks served rank 0's prefills; only rank 0 prints.
                _ => return Ok(()),
            },
        };
        let (lo, med, hi) = spread(&secs);
        let kv: Vec<usize> = last.iter().map(|s| s.kv_bytes).collect();
        let blocks: usize = last.iter().map(|s| s.times.blocks).sum::<usize>().max(1);
        let compute: f64 = last.iter().map(|s| s.times.compute_secs).sum();
        let wait: f64 = last.iter().map(|s| s.times.wait_secs).sum();
        let sent: usize = last.iter().map(|s| s.times.bytes_sent).sum();
        let row = serde_json::json!({
            "sp": sp,
            "tokens": a.tokens,
            "prefill_secs": {"min": lo, "median": med, "max": hi},
            "tokens_per_sec_median": a.tokens as f64 / med,
            "kv_bytes_per_worker": kv,
            "kv_bytes_total": kv.iter().sum::<usize>(),
            "attention_blocks": blocks,
            "compute_ms_per_block": 1e3 * compute / blocks as f64,
            "wait_ms_per_block": 1e3 * wait / blocks as f64,
            "bytes_per_block": sent as f64 / blocks as f64,
            "transport": if world.is_some() { "mpi" } else { "threads" },
            "prefill_chunk": a.model.prefill_chunk,
            "per_worker": last.iter().map(|w| serde_json::json!({
                "rank": w.rank,
                "blocks": w.times.blocks,
                "compute_secs": w.times.compute_secs,
                "wait_secs": w.times.wait_secs,
                "bytes_sent": w.times.bytes_sent,
            })).collect::<Vec<_>>(),
        });
        if !a.json {
            println!(
                "sp={sp}: prefill {} tokens {med:.2}s (min {lo:.2}, max {hi:.2}, {} runs), {:.0} tok/s; KV bytes per worker {kv:?}; per block: compute {:.2} ms, wait {:.2} ms, {:.0} KiB sent",
                a.tokens,
                a.repeats,
                a.tokens as f64 / med,
                1e3 * compute / blocks as f64,
                1e3 * wait / blocks as f64,
                sent as f64 / blocks as f64 / 1024.0
            );
        }
        rows.push(row);
    }
    if a.json {
        let v = serde_json::json!({"runs": rows, "cpu_pressure": pressure.trim()});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("cpu pressure: {}", pressure.replace('\n', " | "));
    }
    Ok(())
}
