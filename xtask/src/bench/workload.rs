//! The synthetic workloads of `cargo xtask bench contention`, run as
//! `xtask bench worker train|eval` child processes so that each can be given
//! its own scheduling policy and cgroup.
//!
//! - training: CPU-bound steps of fixed work, each on a fresh thread (like a
//!   data loader handing a batch to a step), rewriting a progress file with
//!   the step count after every step; it also keeps the schedstat of its
//!   threads (run time and run-queue wait) in a second file, the bench's
//!   kernel ground truth for how long the training waited for a CPU;
//! - evaluation: N threads that sweep a private buffer (CPU and memory
//!   bandwidth hungry) and report the work they did.

use std::{
    fs,
    hint::black_box,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum Worker {
    /// Synthetic training: fixed-work steps, a thread per step.
    Train(TrainArgs),
    /// Synthetic evaluation: CPU and memory hungry threads.
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// File rewritten with the step count after every step.
    #[arg(long)]
    pub progress: PathBuf,
    /// File rewritten with `run_ns delay_ns` of the training's threads.
    #[arg(long)]
    pub schedstat: PathBuf,
    /// Iterations of the work loop per step.
    #[arg(long)]
    pub step_work: u64,
    /// Stop after this many seconds.
    #[arg(long)]
    pub secs: f64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Buffer per thread, in MiB.
    #[arg(long, default_value_t = 32)]
    pub mem_mib: usize,
    /// Stop after this many seconds.
    #[arg(long)]
    pub secs: f64,
}

pub fn run(worker: Worker) -> Result<()> {
    match worker {
        Worker::Train(a) => train(&a),
        Worker::Eval(a) => eval(&a),
    }
}

/// The unit of training work: a dependent chain of integer mixing that the
/// compiler cannot shorten.
pub fn spin(iterations: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(black_box(i));
    }
    x
}

/// Iterations of [`spin`] that take `target` on this CPU right now (best of
/// several tries, so that a busy host overestimates the step less).
pub fn calibrate(target: Duration) -> u64 {
    let probe = 200_000;
    let best = (0..20)
        .map(|_| {
            let t = Instant::now();
            black_box(spin(probe));
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::from_millis(1));
    ((probe as f64) * target.as_secs_f64() / best.as_secs_f64().max(1e-9)) as u64
}

/// `(run_ns, delay_ns)` of the calling thread.
fn thread_schedstat() -> (u64, u64) {
    let text = fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut f = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

fn write_atomic(path: &Path, tmp: &Path, text: &str) -> Result<()> {
    let mut f = fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(tmp, path).with_context(|| format!("renaming onto {}", path.display()))
}

fn train(a: &TrainArgs) -> Result<()> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.secs);
    let progress_tmp = a.progress.with_extension("tmp");
    let sched_tmp = a.schedstat.with_extension("tmp");
    let (mut run_ns, mut delay_ns) = (0_u64, 0_u64);
    let mut steps = 0_u64;
    write_atomic(&a.progress, &progress_tmp, "0\n")?;
    while Instant::now() < deadline {
        let work = a.step_work;
        let (r, d) = thread::spawn(move || {
            black_box(spin(work));
            thread_schedstat()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("training step thread panicked"))?;
        run_ns += r;
        delay_ns += d;
        steps += 1;
        write_atomic(&a.progress, &progress_tmp, &format!("{steps}\n"))?;
        // The main thread waits for each step's wake-up too.
        let (mr, md) = thread_schedstat();
        write_atomic(
            &a.schedstat,
            &sched_tmp,
            &format!("{} {}\n", run_ns + mr, delay_ns + md),
        )?;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "training: {steps} steps in {secs:.1}s = {:.1} steps/s",
        steps as f64 / secs
    );
    Ok(())
}

fn eval(a: &EvalArgs) -> Result<()> {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..a.threads.max(1))
        .map(|t| {
            let stop = Arc::clone(&stop);
            let work = Arc::clone(&work);
            let words = a.mem_mib.max(1) * (1 << 20) / 8;
            thread::spawn(move || {
                let mut buf = vec![t as u64; words];
                let mut x = 1_u64;
                // One unit = one sweep over 1 MiB with a read-modify-write
                // per cache line plus some mixing per word touched.
                let unit = (1 << 20) / 8;
                let mut pos = 0;
                while !stop.load(Ordering::Relaxed) {
                    let end = (pos + unit).min(words);
                    for i in (pos..end).step_by(8) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        buf[i] = buf[i].wrapping_add(x);
                    }
                    pos = if end == words { 0 } else { end };
                    work.fetch_add(1, Ordering::Relaxed);
                }
                black_box(&buf);
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(a.secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("evaluation thread panicked"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let total = work.load(Ordering::Relaxed);
    let line = serde_json::json!({ "work": total, "secs": secs });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}
