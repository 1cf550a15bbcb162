//! The synthetic workloads of `cargo xtask bench contention`, run as
//! `xtask bench worker train|eval` child processes so that each can be given
//! its own scheduling policy and cgroup.
//!
//! - training ([`TrainShape`]): CPU-bound steps of fixed work, rewriting a
//!   progress file with the step count after every step; it also keeps the
//!   schedstat of its threads (run time and run-queue wait) in a second
//!   file, the bench's kernel ground truth for how long the training waited
//!   for a CPU. Shapes: a fresh thread per step; a long-lived compute thread
//!   fed by data-loader threads through a bounded queue; one compute thread
//!   per CPU meeting at a barrier each step (data parallel). The Python
//!   shape is a script the bench runs with `python3` ([`PYTHON_TRAINING`]);
//! - evaluation ([`EvalShape`]): N threads that sweep a private buffer (CPU
//!   and memory bandwidth hungry), a pool of worker processes, bursty games,
//!   cache-thrashing random reads, or pure streaming memory bandwidth; each
//!   reports the work it did.

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
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

/// How the synthetic training spends its CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainShape {
    /// A fresh thread per step (placement can keep the job off its CPU).
    ThreadPerStep,
    /// A long-lived compute thread fed batches by data-loader threads
    /// through a bounded queue: threads on every CPU.
    Loader,
    /// One compute thread per CPU, meeting at a barrier every step.
    AllCpus,
    /// A Python loop (standard library only), when `python3` exists.
    Python,
}

impl TrainShape {
    pub const ALL: [TrainShape; 4] = [
        TrainShape::ThreadPerStep,
        TrainShape::Loader,
        TrainShape::AllCpus,
        TrainShape::Python,
    ];
}

/// How the synthetic evaluation spends its CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalShape {
    /// N threads sweeping a private buffer.
    Threads,
    /// A pool of N single-threaded worker processes (how Python evaluations
    /// run games in parallel).
    Procs,
    /// Short CPU bursts with pauses between them (games).
    Bursty,
    /// Random reads over a buffer about the size of a last-level cache.
    Cache,
    /// Streaming reads and writes over a large buffer: memory bandwidth.
    Membw,
}

impl EvalShape {
    pub const ALL: [EvalShape; 5] = [
        EvalShape::Threads,
        EvalShape::Procs,
        EvalShape::Bursty,
        EvalShape::Cache,
        EvalShape::Membw,
    ];
}

/// The Python training, `python3 -c PYTHON_TRAINING MODE ...`:
///
/// - `calibrate STEP_MS` prints the iterations of the pure-Python work loop
///   that take `STEP_MS` on an idle CPU (the fastest of several timings,
///   as [`calibrate`] does for the Rust shapes). The bench runs it once
///   before any round, so that every run of the Python training does the
///   same work per step and steps per second compare between runs;
/// - `train PROGRESS SCHEDSTAT ITERATIONS SECS` runs steps of that many
///   iterations, rewriting the progress file with the step count and the
///   schedstat file with its threads' `run_ns delay_ns` after every step.
///
/// (Each run used to time its own step as it started: one timing, taken
/// while the previous run's processes were still going away, so the work
/// per step differed between runs and so did their rates.)
pub const PYTHON_TRAINING: &str = r#"
import os, sys, time
def work(n):
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x
def timed(n):
    t = time.perf_counter(); work(n); return time.perf_counter() - t
def calibrate(step_ms):
    n = 1000
    while timed(n) <= 0.02:
        n *= 2
    best = min(timed(n) for _ in range(10))
    return max(1, int(n * step_ms / 1000.0 / best))
def write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f: f.write(text)
    os.replace(tmp, path)
def sched():
    run = delay = 0
    for t in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/schedstat" % t) as f:
                r, d, _ = f.read().split()
            run += int(r); delay += int(d)
        except (OSError, ValueError):
            pass
    return run, delay
def train(progress, schedstat, n, secs):
    write(progress, "0\n")
    end = time.monotonic() + secs
    steps = 0
    while time.monotonic() < end:
        work(n)
        steps += 1
        write(progress, "%d\n" % steps)
        write(schedstat, "%d %d\n" % sched())
if sys.argv[1] == "calibrate":
    print(calibrate(float(sys.argv[2])))
else:
    train(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
"#;

/// Iterations of the Python training's work loop per step of `step_ms`
/// (its `calibrate` mode), timed once on this machine.
pub fn calibrate_python(step_ms: f64) -> Result<u64> {
    let out = std::process::Command::new("python3")
        .args(["-c", PYTHON_TRAINING, "calibrate", &format!("{step_ms}")])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running python3 to time the Python training's step")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "python3 timing the Python training's step failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    text.trim().parse().with_context(|| {
        format!(
            "python3 printed {:?} for the step's iterations",
            text.trim()
        )
    })
}

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
    /// How the training spends its CPU (the Python shape is not run by
    /// this worker).
    #[arg(long, value_enum, default_value_t = TrainShape::ThreadPerStep)]
    pub shape: TrainShape,
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
    /// How the evaluation spends its CPU.
    #[arg(long, value_enum, default_value_t = EvalShape::Threads)]
    pub shape: EvalShape,
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
    match a.shape {
        TrainShape::ThreadPerStep => train_thread_per_step(a),
        TrainShape::Loader => train_loader(a),
        TrainShape::AllCpus => train_all_cpus(a),
        TrainShape::Python => anyhow::bail!("the Python training runs as python3 -c, not here"),
    }
}

/// `(run_ns, delay_ns)` summed over the live threads of this process: the
/// long-lived shapes keep their threads, so nothing is lost.
fn process_schedstat() -> (u64, u64) {
    let mut total = (0, 0);
    for t in fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let mut f = text
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        total.0 += f.next().unwrap_or(0);
        total.1 += f.next().unwrap_or(0);
    }
    total
}

/// Rewrites the progress and schedstat files after a step.
struct Recorder<'a> {
    a: &'a TrainArgs,
    progress_tmp: PathBuf,
    sched_tmp: PathBuf,
}

impl<'a> Recorder<'a> {
    fn new(a: &'a TrainArgs) -> Result<Self> {
        let r = Self {
            a,
            progress_tmp: a.progress.with_extension("tmp"),
            sched_tmp: a.schedstat.with_extension("tmp"),
        };
        write_atomic(&a.progress, &r.progress_tmp, "0\n")?;
        Ok(r)
    }

    fn step(&self, steps: u64) -> Result<()> {
        write_atomic(&self.a.progress, &self.progress_tmp, &format!("{steps}\n"))?;
        let (run, delay) = process_schedstat();
        write_atomic(
            &self.a.schedstat,
            &self.sched_tmp,
            &format!("{run} {delay}\n"),
        )
    }
}

fn train_loader(a: &TrainArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(a.secs);
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let loaders = cpus.saturating_sub(1).max(1);
    // A batch costs a loader a quarter of a step per loader thread: the
    // loaders together keep about a quarter of the compute thread busy.
    let batch_work = (a.step_work / 4).max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(2);
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..loaders)
        .map(|_| {
            let tx = tx.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if tx.send(spin(batch_work)).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let rec = Recorder::new(a)?;
    let mut steps = 0_u64;
    while Instant::now() < deadline {
        let batch = rx.recv().context("the data loaders stopped")?;
        black_box(spin(a.step_work ^ (batch & 1)));
        steps += 1;
        rec.step(steps)?;
    }
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn train_all_cpus(a: &TrainArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(a.secs);
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let barrier = Arc::new(std::sync::Barrier::new(cpus));
    let stop = Arc::new(AtomicBool::new(false));
    let work = a.step_work;
    let handles: Vec<_> = (1..cpus)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                loop {
                    black_box(spin(work));
                    barrier.wait();
                    // The leader decides after the barrier whether to go on.
                    barrier.wait();
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            })
        })
        .collect();
    let rec = Recorder::new(a)?;
    let mut steps = 0_u64;
    loop {
        black_box(spin(work));
        barrier.wait();
        steps += 1;
        rec.step(steps)?;
        let done = Instant::now() >= deadline;
        stop.store(done, Ordering::Relaxed);
        barrier.wait();
        if done {
            break;
        }
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn train_thread_per_step(a: &TrainArgs) -> Result<()> {
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
    match a.shape {
        EvalShape::Procs => eval_procs(a),
        _ => eval_threads(a),
    }
}

/// One worker process per thread asked for, each a one-thread evaluation
/// of the `threads` shape; their work is summed.
fn eval_procs(a: &EvalArgs) -> Result<()> {
    let start = Instant::now();
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let children = (0..a.threads.max(1))
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["bench", "worker", "eval", "--threads", "1", "--mem-mib"])
                .arg(a.mem_mib.to_string())
                .arg("--secs")
                .arg(a.secs.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting an evaluation worker process")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut total = 0_u64;
    for c in children {
        let out = c.wait_with_output()?;
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("worker process output {line:?}"))?;
        total += v["work"].as_u64().unwrap_or(0);
    }
    let secs = start.elapsed().as_secs_f64();
    let line = serde_json::json!({ "work": total, "secs": secs });
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

/// One unit of the evaluation's work over `buf`, from word `pos`; returns
/// where the next unit starts.
fn eval_unit(shape: EvalShape, buf: &mut [u64], pos: usize, x: &mut u64) -> usize {
    let words = buf.len();
    let unit = ((1 << 20) / 8).min(words);
    let mix = |x: &mut u64| {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
    };
    match shape {
        EvalShape::Cache => {
            // Random read-modify-writes: every one a likely cache miss.
            for _ in 0..unit / 8 {
                mix(x);
                let i = (*x as usize) % words;
                buf[i] = buf[i].wrapping_add(*x);
            }
            pos
        }
        EvalShape::Membw => {
            // Every word, no mixing: as fast as memory streams.
            let end = (pos + unit).min(words);
            let mut sum = 0_u64;
            for w in &mut buf[pos..end] {
                sum = sum.wrapping_add(*w);
                *w = sum;
            }
            *x ^= sum;
            if end == words { 0 } else { end }
        }
        _ => {
            // One read-modify-write per cache line plus some mixing.
            let end = (pos + unit).min(words);
            for i in (pos..end).step_by(8) {
                mix(x);
                buf[i] = buf[i].wrapping_add(*x);
            }
            if end == words { 0 } else { end }
        }
    }
}

fn eval_threads(a: &EvalArgs) -> Result<()> {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..a.threads.max(1))
        .map(|t| {
            let stop = Arc::clone(&stop);
            let work = Arc::clone(&work);
            let mib = match a.shape {
                // About a last-level cache per thread.
                EvalShape::Cache => 8,
                EvalShape::Membw => a.mem_mib.max(64),
                _ => a.mem_mib,
            };
            let words = mib.max(1) * (1 << 20) / 8;
            let shape = a.shape;
            thread::spawn(move || {
                let mut buf = vec![t as u64; words];
                let mut x = 1_u64 + t as u64;
                let mut pos = 0;
                let mut burst_from = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    pos = eval_unit(shape, &mut buf, pos, &mut x);
                    work.fetch_add(1, Ordering::Relaxed);
                    // Games: 20 ms of play, then 30 ms waiting for moves.
                    if shape == EvalShape::Bursty
                        && burst_from.elapsed() >= Duration::from_millis(20)
                    {
                        thread::sleep(Duration::from_millis(30));
                        burst_from = Instant::now();
                    }
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
