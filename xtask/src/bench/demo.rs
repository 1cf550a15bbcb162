//! `cargo xtask bench demo` (run by `scripts/demo`): a synthetic training runs
//! alone for a while, then an evaluation job starts beside it under
//! `enforcer run --protect <training> --budget`, one live line a second
//! (training rate, slowdown, steal, budget, quota, evaluation CPU), then the
//! job report.
//!
//! The training rate and slowdown are measured here, from the training's
//! progress file against its own rate before the job, and so is its
//! run-queue wait (its threads' schedstat: waits behind any task); steal, quota and the
//! job's CPU come from the enforcer's once-a-second `budget status` log line.
//! When this build's `enforcer` has no `run --protect`, the demo says so and
//! shows the evaluation in SCHED_IDLE without the enforcer instead: real
//! numbers for what is wired, `n/a` for what is not.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Args;

use super::{contention, workload};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The enforcer binary.
    #[arg(long, default_value = "target/debug/enforcer")]
    pub enforcer: PathBuf,
    /// Seconds the training runs alone first (its baseline rate).
    #[arg(long, default_value_t = 15)]
    pub alone_secs: u64,
    /// Seconds the evaluation job runs.
    #[arg(long, default_value_t = 45)]
    pub job_secs: u64,
    /// The steal budget, percent.
    #[arg(long, default_value_t = 5.0)]
    pub budget_pct: f64,
    /// Evaluation threads (default: the number of CPUs).
    #[arg(long)]
    pub eval_threads: Option<usize>,
}

#[expect(clippy::print_stdout, reason = "the demo's live lines are its output")]
pub fn run(args: &DemoArgs, root: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let enforcer = root.join(&args.enforcer);
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let dir = std::env::temp_dir().join(format!("enforcer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveDir(dir.clone());
    let progress = dir.join("progress");
    let schedstat = dir.join("schedstat");
    let report = dir.join("report.json");
    let step_work = workload::calibrate(Duration::from_micros(2400));
    // The training outlives the demo (it is killed at the end): the
    // enforcer first loads its meter and learns the training's rate.
    let total = args.alone_secs + args.job_secs + 60;

    let mut training = Command::new(&exe)
        .args(["bench", "worker", "train", "--progress"])
        .arg(&progress)
        .arg("--schedstat")
        .arg(&schedstat)
        .args(["--step-work", &step_work.to_string()])
        .args(["--secs", &total.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the synthetic training")?;
    let training_pid = training.id();
    println!(
        "demo: synthetic training pid {training_pid} (a thread per fixed-work step, progress file {}), alone for {} s",
        progress.display(),
        args.alone_secs
    );

    let wired = contention::supports_protect(&enforcer);
    if !wired {
        println!(
            "demo: {} has no `run --protect` on this build: the budget loop is not wired yet. \
             Showing the evaluation in SCHED_IDLE without the enforcer instead; steal, budget and quota are n/a.",
            enforcer.display()
        );
    }

    let clk = contention::clock_ticks();
    let start = Instant::now();
    let mut prev = (start, contention::read_step(&progress), 0.0_f64);
    let mut prev_sched = contention::read_schedstat(&schedstat);
    let mut baseline_from = None;
    let mut baseline = None;
    let status = Arc::new(Mutex::new(contention::Status::default()));
    let mut job: Option<std::process::Child> = None;
    let mut job_started = None;
    for second in 1..=(args.alone_secs + args.job_secs) {
        thread::sleep(
            (start + Duration::from_secs(second)).saturating_duration_since(Instant::now()),
        );
        let now = Instant::now();
        let step = contention::read_step(&progress);
        let eval_cpu = job.as_ref().map_or(0.0, |j| {
            contention::tree_cpu_secs(j.id(), clk)
                - contention::process_cpu_secs(j.id(), clk).unwrap_or(0.0)
        });
        let dt = now.duration_since(prev.0).as_secs_f64().max(1e-3);
        let rate = step.saturating_sub(prev.1) as f64 / dt;
        let eval_cores = (eval_cpu - prev.2).max(0.0) / dt;
        prev = (now, step, eval_cpu);
        let sched = contention::read_schedstat(&schedstat);
        let (run, wait) = (
            sched.0.saturating_sub(prev_sched.0) as f64,
            sched.1.saturating_sub(prev_sched.1) as f64,
        );
        prev_sched = sched;
        let runq_wait = (run + wait > 0.0).then(|| wait / (run + wait));

        if second == 2 {
            baseline_from = Some((now, step));
        }
        if job.is_none() && second == args.alone_secs {
            if let Some((t, s)) = baseline_from {
                let span = now.duration_since(t).as_secs_f64();
                baseline = (span >= 1.0).then(|| step.saturating_sub(s) as f64 / span);
            }
            let threads = args.eval_threads.unwrap_or(cpus).to_string();
            let secs = args.job_secs.to_string();
            let eval: Vec<String> = [
                exe.to_string_lossy().as_ref(),
                "bench",
                "worker",
                "eval",
                "--threads",
                &threads,
                "--secs",
                &secs,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            let mut cmd = if wired {
                // The progress file lets the enforcer measure true slowdown.
                let config = dir.join("enforcer.toml");
                std::fs::write(
                    &config,
                    format!(
                        "[training]\nprogress_file = {:?}\n",
                        progress.display().to_string()
                    ),
                )
                .with_context(|| format!("writing {}", config.display()))?;
                let mut c = Command::new(&enforcer);
                c.args(["--log-format", "json", "run", "--config"])
                    .arg(&config)
                    .arg("--protect")
                    .arg(training_pid.to_string())
                    .arg("--budget")
                    .arg(format!("{}%", args.budget_pct))
                    .arg("--report")
                    .arg(&report)
                    .arg("--")
                    .args(&eval);
                c
            } else {
                let mut c = Command::new("chrt");
                c.args(["-i", "0"]).args(&eval);
                c
            };
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting the evaluation job")?;
            let stderr = child.stderr.take().context("no stderr pipe")?;
            let status = Arc::clone(&status);
            thread::spawn(move || contention::follow_status(stderr, &status, true));
            job = Some(child);
            job_started = Some(now);
            println!(
                "demo: training baseline {:.0} steps/s; evaluation job starts ({})",
                baseline.unwrap_or(0.0),
                if wired {
                    format!(
                        "enforcer run --protect {training_pid} --budget {}%",
                        args.budget_pct
                    )
                } else {
                    "chrt -i 0, no enforcer".to_owned()
                }
            );
            continue;
        }
        let s = status.lock().map(|s| s.clone()).unwrap_or_default();
        let pct = |v: Option<f64>| v.map_or("  n/a".to_owned(), |v| format!("{:5.1}", v * 100.0));
        let slowdown = baseline.map(|b| 1.0 - rate / b);
        let phase = match job_started {
            None => "alone".to_owned(),
            Some(t) => format!("job +{:>2}s", now.duration_since(t).as_secs()),
        };
        println!(
            "t={second:>3}s {phase:<9} training {rate:>5.0} steps/s  slowdown {}%  runq wait {}%  steal {}% (budget {:.0}%)  enforcer slowdown {}%  quota {}  eval CPU {:.2}{}",
            pct(slowdown),
            pct(runq_wait),
            pct(s.stolen_fraction),
            args.budget_pct,
            pct(s.training_slowdown),
            match (s.seen, s.quota_cores) {
                (false, _) => "n/a".to_owned(),
                (true, None) => "unlimited".to_owned(),
                (true, Some(q)) => format!("{q:.2}"),
            },
            s.job_cpu_cores.unwrap_or(eval_cores),
            if s.frozen { "  FROZEN" } else { "" },
        );
        let _ = std::io::stdout().flush();
    }

    if let Some(mut j) = job {
        let st = j.wait().context("waiting for the evaluation job")?;
        println!("demo: evaluation job ended: {st}");
    }
    let _ = training.kill();
    let _ = training.wait();
    match std::fs::read_to_string(&report) {
        Ok(text) => println!("demo: job report\n{text}"),
        Err(_) if !wired => {
            println!("demo: no job report (the job did not run under the enforcer)")
        }
        Err(e) => println!("demo: no job report at {}: {e}", report.display()),
    }
    Ok(())
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
