//! `cargo xtask bench contention`: a synthetic training beside a synthetic
//! evaluation under every CPU policy, side by side in one run, in alternating
//! rounds, medians reported.
//!
//! Every run starts a fresh training (`bench worker train`), lets it run alone
//! for the warm-up, then starts the evaluation (`bench worker eval`) under the
//! policy and samples both every control period: the training's step count
//! (its progress file), its threads' run time and run-queue wait (schedstat,
//! the kernel's ground truth for how long it waited for a CPU), and the
//! evaluation's CPU time. Slowdown is against the training-alone run of the
//! same round.
//!
//! The static quota and weight rows run the evaluation as a job of
//! `enforcer run --cpu 0.5 --no-idle` / `--cpu-weight 1 --no-idle`; the
//! enforcer row as `enforcer run --protect <training> --budget`, with the
//! training's progress file in its config. The `budget loop` rows run the
//! enforcer's own controller (`enforcer_model::controller`, the crate the
//! agent runs it from) in this process on a v1 `cpu` cgroup it creates under its own
//! and removes afterwards, fed with the training's schedstat wait instead of
//! the eBPF steal meter: that counts waits behind any task, so it
//! over-reports steal on a shared host (erring on the training's side); they
//! also compare a 100 ms and a 10 ms CFS period for the dynamic quota.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;

use enforcer_host::{CpuTicks, Hierarchy, Pid, ProcFs};
use enforcer_model::{
    StealCounters, Window,
    controller::{Controller, ControllerConfig, CpuControls, Observation, Quota},
};

use super::{
    plot, targets,
    workload::{self, EvalShape, TrainShape},
};

const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Training alone: the baseline.
    Alone,
    /// Evaluation with no limit.
    Unlimited,
    /// Evaluation at nice 19.
    Nice,
    /// Evaluation in SCHED_IDLE.
    Idle,
    /// SCHED_IDLE as a job of `enforcer run --protect <training>
    /// --measure-only`: the idle class with the enforcer present and its
    /// steal measured, nothing held. Says whether the idle class alone kept
    /// the training within budget, which the enforcer row must then match.
    IdleMeasured,
    /// Static quota: 50 % of one CPU (cfs_quota_us), normal class.
    Quota,
    /// `enforcer run --cpu-weight 1 --no-idle`: the job's lowest weight
    /// (v1 `cpu.shares` 10), normal class; its evaluation slice takes the
    /// same weight, so the job ranks below the training (the slice kept
    /// the default weight before d9db937).
    Weight,
    /// The budget controller, cfs period 100 ms.
    Loop,
    /// The budget controller, cfs period 10 ms.
    LoopShort,
    /// `enforcer run --protect <training> --budget`: the real agent, eBPF
    /// steal meter and all.
    Enforcer,
}

impl Policy {
    const ALL: [Policy; 10] = [
        Policy::Alone,
        Policy::Unlimited,
        Policy::Nice,
        Policy::Idle,
        Policy::IdleMeasured,
        Policy::Quota,
        Policy::Weight,
        Policy::Loop,
        Policy::LoopShort,
        Policy::Enforcer,
    ];

    fn label(self) -> &'static str {
        match self {
            Policy::Alone => "training alone",
            Policy::Unlimited => "evaluation unlimited",
            Policy::Nice => "nice 19",
            Policy::Idle => "SCHED_IDLE",
            Policy::IdleMeasured => "SCHED_IDLE, enforcer --measure-only",
            Policy::Quota => "enforcer run --cpu 0.5 --no-idle",
            Policy::Weight => "enforcer run --cpu-weight 1 --no-idle",
            Policy::Loop => "budget loop, idle + quota/100ms",
            Policy::LoopShort => "budget loop, idle + quota/10ms",
            Policy::Enforcer => "enforcer run --budget",
        }
    }

    fn cfs_period_us(self) -> u64 {
        if self == Policy::LoopShort {
            10_000
        } else {
            100_000
        }
    }
}

#[derive(Debug, Args)]
pub struct ContentionArgs {
    /// Rounds; each round runs every policy once, in a rotated order.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds of each run with the evaluation in place.
    #[arg(long, default_value_t = 8.0)]
    pub round_secs: f64,
    /// Seconds the training runs alone before the evaluation starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Evaluation threads (default: the number of CPUs).
    #[arg(long)]
    pub eval_threads: Option<usize>,
    /// Evaluation buffer per thread, MiB.
    #[arg(long, default_value_t = 32)]
    pub eval_mem_mib: usize,
    /// Training step length on an idle CPU, ms (calibrated once per bench).
    #[arg(long, default_value_t = 2.4)]
    pub step_ms: f64,
    /// Budget for the loop rows, percent.
    #[arg(long, default_value_t = 5.0)]
    pub budget_pct: f64,
    /// Policies to run (comma separated); default: all but the in-bench
    /// `loop` and `loop-short` rows (the controller on the unattributed
    /// schedstat wait, to compare CFS periods on a quiet host).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub policies: Vec<Policy>,
    /// The enforcer binary for the `enforcer` row (relative to the
    /// workspace).
    #[arg(long, default_value = "target/debug/enforcer")]
    pub enforcer: PathBuf,
    /// Directory for the JSON and the plot (relative to the workspace).
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// The training's shape (`python` needs `python3`).
    #[arg(long, value_enum, default_value_t = TrainShape::ThreadPerStep)]
    pub training: TrainShape,
    /// The evaluation's shape.
    #[arg(long = "eval", value_enum, default_value_t = EvalShape::Threads)]
    pub eval_shape: EvalShape,
    /// Run every pair of training and evaluation shapes (the Python
    /// training only where `python3` runs), each with every policy; writes
    /// target/bench/contention-matrix.json (each pair's rows, and the
    /// decisions of every loop round) and .svg and prints one table.
    #[arg(long, conflicts_with_all = ["training", "eval_shape"])]
    pub matrix: bool,
    /// With `--matrix`: only these trainings' rows (comma separated), every
    /// evaluation shape beside each; the table, the plot and the verdict
    /// cover those pairs alone. To re-measure one row after a change
    /// without the whole matrix's hour.
    #[arg(long, value_enum, value_delimiter = ',', requires = "matrix")]
    pub matrix_training: Vec<TrainShape>,
    /// Run nothing: judge the three targets on a matrix already
    /// written (a contention-matrix.json, relative to the workspace) and
    /// print the verdict, as a `--matrix` run does at its end. Several
    /// (comma separated), e.g. rows re-run with `--matrix-training`, are
    /// judged as one matrix: they must share the budget and no pair.
    #[arg(
        long,
        value_name = "JSON",
        value_delimiter = ',',
        conflicts_with_all = ["matrix", "training", "eval_shape"]
    )]
    pub judge: Vec<PathBuf>,
    /// Where the training writes its progress file (and its schedstat
    /// file), one small file replaced by rename every step. Default: the
    /// bench's scratch directory under `--out`, on the workspace's
    /// filesystem. Its filesystem matters: on a disk-backed ext4 a rename
    /// that replaces a file can wait for the disk, and that wait is slowed
    /// by any busy evaluation whatever its CPU class (docs/measurements.md);
    /// a tmpfs such as `/dev/shm` leaves only the CPU's part. Created if
    /// missing; the bench's files in it are removed at the end, and so is
    /// the directory if the bench created it and it is empty.
    #[arg(long, value_name = "DIR")]
    pub progress_dir: Option<PathBuf>,
}

/// The rows of one training × evaluation pair.
#[derive(Debug, Clone, Serialize)]
struct PairResult {
    training: TrainShape,
    eval: EvalShape,
    /// Spread of the training-alone rate between rounds: the noise floor.
    alone_spread: Option<f64>,
    /// The same spread once each round's rate is divided by the share of
    /// the machine's CPU time the hypervisor left it (`1 − host_steal`):
    /// how much of the noise the host's own neighbours explain.
    alone_spread_host_adjusted: Option<f64>,
    rows: Vec<Row>,
    /// Every policy's numbers round by round: what the medians were taken
    /// over, and what the targets compare within each round.
    rounds: Vec<RoundCell>,
    /// The loop rows' decisions, round by round: what a matrix cell's
    /// number came from.
    decisions: Vec<RoundDecisions>,
}

/// One policy's numbers in one round.
#[derive(Debug, Clone, Serialize)]
struct RoundCell {
    policy: Policy,
    round: usize,
    /// Against the same round's `training alone`.
    slowdown: Option<f64>,
    /// The same, with both rates divided by `1 − host_steal` of their run.
    slowdown_host_adjusted: Option<f64>,
    /// The share of the machine's CPU time the hypervisor stole during the
    /// run (`/proc/stat`'s steal); 0 on bare metal.
    host_steal: Option<f64>,
    eval_work_per_s: Option<f64>,
    eval_cpu_cores: Option<f64>,
}

/// What the budget loop decided in one round of one policy.
#[derive(Debug, Clone, Serialize)]
struct RoundDecisions {
    policy: Policy,
    round: usize,
    eval_work_per_s: Option<f64>,
    decisions: Vec<String>,
}

/// One tick of one run.
#[derive(Debug, Clone, Serialize)]
struct Tick {
    t: f64,
    step: u64,
    run_ns: u64,
    delay_ns: u64,
    eval_cpu_s: f64,
    quota_cores: Option<f64>,
    frozen: bool,
    /// The controller's judged stolen fraction, loop rows only.
    judged: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct RunResult {
    policy: Policy,
    round: usize,
    train_steps_per_s: f64,
    /// The share of the machine's CPU time the hypervisor stole over the
    /// measured span, all CPUs together.
    host_steal: Option<f64>,
    wait_fraction: f64,
    eval_work_per_s: Option<f64>,
    eval_cpu_cores: Option<f64>,
    decisions: Vec<String>,
    /// Loop rows: seconds whose trailing 1 s wait fraction was over budget.
    over_budget_s: Option<f64>,
    /// Loop rows: first time the trailing 1 s fraction is under budget.
    under_budget_after_s: Option<f64>,
    /// Loop rows: range of the trailing 1 s fraction after 2 s.
    steady_min: Option<f64>,
    steady_max: Option<f64>,
    /// Enforcer row: what its job report said.
    reported_stolen_fraction: Option<f64>,
    reported_slowdown: Option<f64>,
    reported_over_budget_s: Option<f64>,
    /// The report's `budget_used`: the largest stolen fraction over any
    /// 10 s window of the job, or over the whole job when larger.
    reported_budget_used: Option<f64>,
    ticks: Vec<Tick>,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    policy: Policy,
    label: &'static str,
    train_steps_per_s: f64,
    slowdown: Option<f64>,
    eval_work_per_s: Option<f64>,
    eval_vs_idle: Option<f64>,
    eval_cpu_cores: Option<f64>,
    wait_fraction: f64,
    over_budget_s: Option<f64>,
    under_budget_after_s: Option<f64>,
    steady_min: Option<f64>,
    steady_max: Option<f64>,
    reported_stolen_fraction: Option<f64>,
    reported_slowdown: Option<f64>,
    reported_over_budget_s: Option<f64>,
    /// The report's `budget_used`: the largest stolen fraction over any
    /// 10 s window of the job, or over the whole job when larger.
    reported_budget_used: Option<f64>,
}

pub fn run(args: &ContentionArgs, root: &Path) -> Result<()> {
    if !args.judge.is_empty() {
        let mut matrices = Vec::new();
        for json in &args.judge {
            let path = root.join(json);
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let (pairs, budget) = targets::from_matrix_json(&text)
                .with_context(|| format!("reading the matrix in {}", path.display()))?;
            matrices.push((json.display().to_string(), pairs, budget));
        }
        let (pairs, budget) = targets::merge(matrices)?;
        if args.judge.len() > 1 {
            eprintln!(
                "bench contention: judging {} pairs from {} matrices together",
                pairs.len(),
                args.judge.len()
            );
        }
        print_verdict(&targets::judge(&pairs, budget));
        return Ok(());
    }
    // The pairs first: a training this machine cannot run is refused
    // before anything is calibrated or created.
    let pairs: Vec<(TrainShape, EvalShape)> = if args.matrix {
        let python = python_ok();
        if !python {
            if args.matrix_training.contains(&TrainShape::Python) {
                bail!("--matrix-training python needs python3 on the PATH");
            }
            eprintln!(
                "bench contention: no python3: the python training is left out of the matrix"
            );
        }
        TrainShape::ALL
            .into_iter()
            .filter(|t| *t != TrainShape::Python || python)
            .filter(|t| args.matrix_training.is_empty() || args.matrix_training.contains(t))
            .flat_map(|t| EvalShape::ALL.into_iter().map(move |e| (t, e)))
            .collect()
    } else {
        if args.training == TrainShape::Python && !python_ok() {
            bail!("--training python needs python3 on the PATH");
        }
        vec![(args.training, args.eval_shape)]
    };
    let enforcer = root.join(&args.enforcer);
    let enforcer_ok = supports_protect(&enforcer);
    let run_ok = Command::new(&enforcer)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let policies: Vec<Policy> = if args.policies.is_empty() {
        if !enforcer_ok {
            eprintln!(
                "bench contention: {} has no `run --protect` on this build: the enforcer row is left out",
                enforcer.display()
            );
        }
        if !run_ok {
            eprintln!(
                "bench contention: {} has no `run` (build it: cargo build -p enforcer): the static quota and weight rows are left out",
                enforcer.display()
            );
        }
        Policy::ALL
            .into_iter()
            .filter(|p| !p.needs_cgroup())
            .filter(|p| !p.protects() || enforcer_ok)
            .filter(|p| !p.via_enforcer() || run_ok)
            .collect()
    } else {
        let mut p = args.policies.clone();
        if !p.contains(&Policy::Alone) {
            p.insert(0, Policy::Alone);
        }
        p
    };
    if policies.iter().any(|p| p.protects()) && !enforcer_ok {
        bail!(
            "{} has no `run --protect`: build the enforcer with the budget loop wired",
            enforcer.display()
        );
    }
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let eval_threads = args.eval_threads.unwrap_or(cpus);
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let cpu_root = own_v1_cpu_cgroup();
    if let Err(e) = &cpu_root
        && policies.iter().any(|p| p.needs_cgroup())
    {
        bail!("the cgroup policies need a v1 cpu hierarchy until `enforcer run` lands: {e}");
    }
    let step_work = workload::calibrate(Duration::from_secs_f64(args.step_ms / 1000.0));
    // The Python step is timed once too, before anything runs, so that
    // every run of that training does the same work per step.
    let python_step_work = if pairs.iter().any(|(t, _)| *t == TrainShape::Python) {
        Some(workload::calibrate_python(args.step_ms)?)
    } else {
        None
    };
    let scratch = root.join(&args.out).join("contention-scratch");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    // A directory of its own inside --progress-dir, so that the clean-up
    // removes only what the bench wrote; --progress-dir itself too, empty,
    // if the bench made it.
    let made_progress_parent = args.progress_dir.as_ref().is_some_and(|d| !d.exists());
    let progress_dir = match &args.progress_dir {
        Some(d) => {
            let d = d.join(format!("enforcer-bench-progress-{}", std::process::id()));
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => scratch.clone(),
    };
    let progress_fs = filesystem_of(&progress_dir);
    let load_before = loadavg();
    eprintln!(
        "bench contention: {} policies × {} rounds × {:.0}+{:.0} s, {cpus} CPUs, step work {step_work} (≈{} ms), eval {eval_threads} threads × {} MiB, progress file on {progress_fs} ({}), load {load_before}",
        policies.len(),
        args.rounds,
        args.warmup_secs,
        args.round_secs,
        args.step_ms,
        args.eval_mem_mib,
        progress_dir.display()
    );
    if let Some(n) = python_step_work {
        eprintln!(
            "bench contention: Python step {n} iterations (≈{} ms)",
            args.step_ms
        );
    }

    let ctx = BenchContext {
        policies: &policies,
        cpus,
        eval_threads,
        exe: &exe,
        cpu_root: cpu_root.as_ref().ok().map(PathBuf::as_path),
        step_work,
        python_step_work,
        scratch: &scratch,
        progress_dir: &progress_dir,
        progress_fs: &progress_fs,
        enforcer: &enforcer,
        load_before: &load_before,
    };
    let mut matrix = Vec::new();
    for (training, eval) in pairs {
        eprintln!("bench contention: training {training:?} × evaluation {eval:?}");
        matrix.push(run_pair(args, root, &ctx, training, eval, !args.matrix)?);
    }
    if args.matrix {
        print_matrix(&matrix, args.budget_pct);
        let verdict = targets::judge(&target_cells(&matrix), args.budget_pct / 100.0);
        print_verdict(&verdict);
        let path = root.join(&args.out).join("contention-matrix.json");
        let json = serde_json::json!({
            "machine": {
                "cpus": cpus,
                "loadavg_before": load_before,
                "loadavg_after": loadavg(),
            },
            "config": {
                "rounds": args.rounds,
                "round_secs": args.round_secs,
                "step_work": step_work,
                "python_step_work": python_step_work,
                "budget_pct": args.budget_pct,
                "progress_fs": progress_fs,
            },
            "pairs": matrix,
            "targets": verdict,
        });
        fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        let panels: Vec<plot::MatrixPanel> = matrix
            .iter()
            .map(|p| plot::MatrixPanel {
                title: format!("{} × {}", slug(p.training), slug(p.eval)),
                points: p
                    .rows
                    .iter()
                    .filter_map(|r| {
                        Some((
                            policy_slug(r.policy),
                            r.slowdown? * 100.0,
                            r.eval_vs_idle? * 100.0,
                        ))
                    })
                    .collect(),
            })
            .collect();
        let svg = root.join(&args.out).join("contention-matrix.svg");
        plot::draw_matrix(&svg, &panels, args.budget_pct)?;
        eprintln!("wrote {}", svg.display());
    }
    let _ = fs::remove_dir_all(&scratch);
    if let Some(parent) = &args.progress_dir {
        let _ = fs::remove_dir_all(&progress_dir);
        if made_progress_parent {
            // remove_dir: only if nothing else was put there meanwhile.
            let _ = fs::remove_dir(parent);
        }
    }
    Ok(())
}

/// The filesystem type of the mount that holds `dir` (the longest mount
/// point that is a prefix of its canonical path), e.g. `ext4`, `tmpfs`.
fn filesystem_of(dir: &Path) -> String {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            Some((point.replace("\\040", " "), fstype))
        })
        .filter(|(point, _)| dir.starts_with(point))
        .max_by_key(|(point, _)| point.len())
        .map_or_else(|| "unknown".to_owned(), |(_, t)| t.to_owned())
}

/// What every pair of a bench run shares.
struct BenchContext<'a> {
    policies: &'a [Policy],
    cpus: usize,
    eval_threads: usize,
    exe: &'a Path,
    cpu_root: Option<&'a Path>,
    step_work: u64,
    python_step_work: Option<u64>,
    scratch: &'a Path,
    /// Where the training's progress and schedstat files go.
    progress_dir: &'a Path,
    /// That directory's filesystem type (from /proc/self/mounts).
    progress_fs: &'a str,
    enforcer: &'a Path,
    load_before: &'a str,
}

/// Whether `python3` runs here (for the Python training).
fn python_ok() -> bool {
    Command::new("python3")
        .args(["-c", "import os"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Every policy in alternating rounds on one pair of shapes; with `single`
/// also the pair's JSON and plot.
fn run_pair(
    args: &ContentionArgs,
    root: &Path,
    ctx: &BenchContext<'_>,
    training: TrainShape,
    eval: EvalShape,
    single: bool,
) -> Result<PairResult> {
    let policies = ctx.policies;
    let cpus = ctx.cpus;
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        let n = policies.len();
        for i in 0..n {
            let policy = policies[(i + round) % n];
            let spec = RunSpec {
                exe: ctx.exe,
                scratch: ctx.scratch,
                progress_dir: ctx.progress_dir,
                step_work: ctx.step_work,
                python_step_work: ctx.python_step_work,
                training,
                eval,
                warmup: Duration::from_secs_f64(args.warmup_secs),
                secs: Duration::from_secs_f64(args.round_secs),
                eval_threads: ctx.eval_threads,
                eval_mem_mib: args.eval_mem_mib,
                budget: args.budget_pct / 100.0,
                cpus: ctx.cpus as f64,
                cpu_root: ctx.cpu_root,
                enforcer: ctx.enforcer,
            };
            let r = run_one(policy, round, &spec)
                .with_context(|| format!("round {round}, policy {}", policy.label()))?;
            eprintln!(
                "  round {round} {:<38} {:>7.1} steps/s  wait {:>5.1}%  host steal {}  eval {}",
                policy.label(),
                r.train_steps_per_s,
                r.wait_fraction * 100.0,
                r.host_steal
                    .map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0)),
                r.eval_work_per_s
                    .map_or("-".to_owned(), |w| format!("{w:.0} units/s"))
            );
            runs.push(r);
        }
    }
    let load_after = loadavg();
    let rows = summarise(policies, &runs);
    print_table(&rows, args.budget_pct, cpus, ctx.load_before, &load_after);
    let alone: Vec<&RunResult> = runs.iter().filter(|r| r.policy == Policy::Alone).collect();
    let alone_rates: Vec<f64> = alone.iter().map(|r| r.train_steps_per_s).collect();
    let alone_spread = spread(&alone_rates);
    let adjusted: Option<Vec<f64>> = alone.iter().map(|r| host_adjusted_rate(r)).collect();
    let alone_spread_host_adjusted = adjusted.as_deref().and_then(spread);
    if let Some(noise) = alone_spread {
        let steal: Vec<String> = alone
            .iter()
            .map(|r| {
                r.host_steal
                    .map_or("-".to_owned(), |h| format!("{:.1}", h * 100.0))
            })
            .collect();
        eprintln!(
            "noise: the training-alone rate spread {:.1}% between rounds; {} with each divided by 1 − the host's steal ({}% by round)",
            noise * 100.0,
            alone_spread_host_adjusted.map_or("-".to_owned(), |n| format!("{:.1}%", n * 100.0)),
            steal.join(", ")
        );
    }
    let result = PairResult {
        training,
        eval,
        alone_spread,
        alone_spread_host_adjusted,
        rows: rows.clone(),
        rounds: round_cells(&runs),
        decisions: runs
            .iter()
            .filter(|r| !r.decisions.is_empty())
            .map(|r| RoundDecisions {
                policy: r.policy,
                round: r.round,
                eval_work_per_s: r.eval_work_per_s,
                decisions: r.decisions.clone(),
            })
            .collect(),
    };
    if !single {
        return Ok(result);
    }

    let out = root.join(&args.out);
    let json_path = out.join("contention.json");
    let json = serde_json::json!({
        "machine": {
            "cpus": cpus,
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_before": ctx.load_before,
            "loadavg_after": load_after,
        },
        "config": {
            "rounds": args.rounds,
            "round_secs": args.round_secs,
            "warmup_secs": args.warmup_secs,
            "eval_threads": ctx.eval_threads,
            "eval_mem_mib": args.eval_mem_mib,
            "step_ms": args.step_ms,
            "step_work": ctx.step_work,
            "python_step_work": ctx.python_step_work,
            "budget_pct": args.budget_pct,
            "progress_fs": ctx.progress_fs,
        },
        "training": training,
        "eval": eval,
        "rows": rows,
        "runs": runs,
    });
    fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!("wrote {}", json_path.display());

    let alone = median(
        runs.iter()
            .filter(|r| r.policy == Policy::Alone)
            .map(|r| r.train_steps_per_s),
    );
    let shown = [Policy::Enforcer, Policy::LoopShort, Policy::Loop]
        .into_iter()
        .find(|p| policies.contains(p));
    if let (Some(policy), Some(alone)) = (shown, alone) {
        // The median round of that row, by slowdown, is the one plotted.
        let mut of_row: Vec<&RunResult> = runs.iter().filter(|r| r.policy == policy).collect();
        of_row.sort_by(|a, b| a.train_steps_per_s.total_cmp(&b.train_steps_per_s));
        if let Some(r) = of_row.get(of_row.len() / 2) {
            let svg = out.join("contention.svg");
            let series = plot::Series::from_ticks(
                &r.ticks
                    .iter()
                    .map(|t| plot::Point {
                        t: t.t,
                        step: t.step,
                        run_ns: t.run_ns,
                        delay_ns: t.delay_ns,
                        eval_cpu_s: t.eval_cpu_s,
                        quota: t.quota_cores,
                        stolen: t.judged,
                    })
                    .collect::<Vec<_>>(),
                alone,
            );
            plot::draw(
                &svg,
                &format!("{} (round {})", policy.label(), r.round),
                &series,
                args.budget_pct,
                cpus as f64,
            )?;
            eprintln!("wrote {}", svg.display());
        }
    }
    Ok(result)
}

#[expect(clippy::print_stdout, reason = "the table is the bench's output")]
fn print_matrix(pairs: &[PairResult], budget_pct: f64) {
    println!(
        "\ncontention matrix, budget {budget_pct:.0}%: slowdown % / evaluation work vs SCHED_IDLE % (budget used % where the enforcer measured), medians over rounds"
    );
    let Some(first) = pairs.first() else {
        return;
    };
    let shown: Vec<&Row> = first
        .rows
        .iter()
        .filter(|r| r.policy != Policy::Alone)
        .collect();
    print!("{:<30} {:>13}", "training × evaluation", "noise% (host)");
    for r in &shown {
        print!(" {:>22}", policy_slug(r.policy));
    }
    println!();
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1}", v * 100.0));
    for p in pairs {
        print!(
            "{:<30} {:>13}",
            format!("{} × {}", slug(p.training), slug(p.eval)),
            format!(
                "{} ({})",
                pct(p.alone_spread),
                pct(p.alone_spread_host_adjusted)
            )
        );
        for shown_row in &shown {
            let cell =
                p.rows
                    .iter()
                    .find(|r| r.policy == shown_row.policy)
                    .map_or("-".to_owned(), |r| match r.reported_budget_used {
                        // Where the enforcer measured, the budget it saw used.
                        Some(used) if r.policy.protects() => format!(
                            "{}/{} ({})",
                            pct(r.slowdown),
                            pct(r.eval_vs_idle),
                            pct(Some(used))
                        ),
                        _ => format!("{}/{}", pct(r.slowdown), pct(r.eval_vs_idle)),
                    });
            print!(" {cell:>22}");
        }
        println!();
    }
    println!(
        "noise% = spread of the training-alone rate between rounds (max − min over the median); \
         (host) = the same with each round's rate divided by 1 − the hypervisor's steal of the machine's CPU in it"
    );
}

/// Each pair's medians as the targets judge them (rows without a slowdown
/// or a work ratio are left out).
fn target_cells(pairs: &[PairResult]) -> Vec<targets::PairCells> {
    pairs
        .iter()
        .map(|p| targets::PairCells {
            name: format!("{} × {}", slug(p.training), slug(p.eval)),
            flagship: p.training == TrainShape::ThreadPerStep && p.eval == EvalShape::Threads,
            noise: p.alone_spread,
            cells: p
                .rows
                .iter()
                .filter_map(|r| {
                    Some(targets::Cell {
                        policy: r.policy,
                        slowdown: r.slowdown?,
                        work: r.eval_vs_idle?,
                        rounds: p
                            .rounds
                            .iter()
                            .filter(|c| c.policy == r.policy)
                            .filter_map(|c| {
                                Some(targets::RoundPoint {
                                    round: c.round,
                                    slowdown: c.slowdown?,
                                    work_per_s: c.eval_work_per_s?,
                                })
                            })
                            .collect(),
                    })
                })
                .collect(),
        })
        .collect()
}

#[expect(clippy::print_stdout, reason = "the verdict is the bench's output")]
fn print_verdict(verdict: &targets::Verdict) {
    println!();
    for line in verdict.lines() {
        println!("{line}");
    }
}

fn slug(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned())
}

impl Policy {
    /// The in-bench loops drive a v1 cgroup of their own.
    fn needs_cgroup(self) -> bool {
        matches!(self, Policy::Loop | Policy::LoopShort)
    }

    /// The evaluation runs as a job of `enforcer run`.
    fn via_enforcer(self) -> bool {
        matches!(
            self,
            Policy::Quota | Policy::Weight | Policy::Enforcer | Policy::IdleMeasured
        )
    }

    /// The evaluation is a job of `enforcer run --protect <training>`.
    fn protects(self) -> bool {
        matches!(self, Policy::Enforcer | Policy::IdleMeasured)
    }
}

struct RunSpec<'a> {
    exe: &'a Path,
    scratch: &'a Path,
    progress_dir: &'a Path,
    step_work: u64,
    /// Iterations per step of the Python training, timed once per bench.
    python_step_work: Option<u64>,
    training: TrainShape,
    eval: EvalShape,
    warmup: Duration,
    secs: Duration,
    eval_threads: usize,
    eval_mem_mib: usize,
    budget: f64,
    cpus: f64,
    cpu_root: Option<&'a Path>,
    enforcer: &'a Path,
}

/// Kills and reaps a child on every exit path.
struct Reaped(Option<Child>);

impl Reaped {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
    /// The exit status, if the child has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn wait_output(mut self) -> Result<std::process::Output> {
        let child = self.0.take().context("child already reaped")?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SIGCONT first: a frozen (stopped) child would not die of a
            // pending SIGKILL any later, but a stopped one lingers oddly.
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A v1 cpu cgroup created for one run, removed on drop.
struct BenchCgroup {
    dir: PathBuf,
}

impl BenchCgroup {
    fn create(parent: &Path, name: &str) -> Result<Self> {
        let dir = parent.join(name);
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.dir.join(file);
        fs::write(&p, value).with_context(|| format!("writing {value:?} to {}", p.display()))
    }

    fn add(&self, pid: u32) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    fn set_quota(&self, cores: Option<f64>, period_us: u64) -> Result<()> {
        self.write("cpu.cfs_period_us", &period_us.to_string())?;
        let quota = cores.map_or(-1, |c| ((c * period_us as f64) as i64).max(1000));
        self.write("cpu.cfs_quota_us", &quota.to_string())
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // The killed processes leave the cgroup asynchronously.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.dir.display());
    }
}

fn run_one(policy: Policy, round: usize, s: &RunSpec<'_>) -> Result<RunResult> {
    let tag = format!("{}-{round}-{}", std::process::id(), policy_slug(policy));
    let report = s.scratch.join(format!("report-{tag}.json"));
    let status = Arc::new(Mutex::new(Status::default()));
    let progress = s.progress_dir.join(format!("progress-{tag}"));
    let schedstat = s.progress_dir.join(format!("schedstat-{tag}"));
    // The training outlives the run (it is killed at the end): the enforcer
    // row first loads its meter and learns the training's rate.
    let total = s.warmup + s.secs + Duration::from_secs(60);
    let mut train_cmd = if s.training == TrainShape::Python {
        let mut c = Command::new("python3");
        c.args(["-c", workload::PYTHON_TRAINING, "train"])
            .arg(&progress)
            .arg(&schedstat)
            .arg(
                s.python_step_work
                    .context("the Python step was not timed")?
                    .to_string(),
            )
            .arg(format!("{:.3}", total.as_secs_f64()));
        c
    } else {
        let mut c = Command::new(s.exe);
        c.args(["bench", "worker", "train", "--progress"])
            .arg(&progress)
            .arg("--schedstat")
            .arg(&schedstat)
            .args(["--step-work", &s.step_work.to_string()])
            .args(["--secs", &format!("{:.3}", total.as_secs_f64())])
            .args(["--shape", &slug(s.training)]);
        c
    };
    let train = Reaped(Some(
        train_cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the training worker")?,
    ));
    thread::sleep(s.warmup);

    let cgroup = match (policy.needs_cgroup(), s.cpu_root) {
        (true, Some(root)) => Some(BenchCgroup::create(root, &format!("enforcer-bench-{tag}"))?),
        (true, None) => bail!("no v1 cpu cgroup"),
        (false, _) => None,
    };
    let eval_args = [
        "bench".to_owned(),
        "worker".to_owned(),
        "eval".to_owned(),
        "--threads".to_owned(),
        s.eval_threads.to_string(),
        "--mem-mib".to_owned(),
        s.eval_mem_mib.to_string(),
        "--secs".to_owned(),
        format!("{:.3}", s.secs.as_secs_f64()),
        "--shape".to_owned(),
        slug(s.eval),
    ];
    let mut controller = None;
    let mut eval = if policy == Policy::Alone {
        None
    } else {
        let mut cmd = match policy {
            Policy::Nice => {
                let mut c = Command::new("nice");
                c.args(["-n", "19"]).arg(s.exe);
                c
            }
            Policy::Idle => {
                let mut c = Command::new("chrt");
                c.args(["-i", "0"]).arg(s.exe);
                c
            }
            Policy::Quota | Policy::Weight => {
                let mut c = Command::new(s.enforcer);
                c.args(["run", "--no-wait", "--no-idle", "--config"])
                    .arg(enforcer_config(s.scratch, &tag, None)?);
                if policy == Policy::Quota {
                    c.args(["--cpu", "0.5"]);
                } else {
                    c.args(["--cpu-weight", "1"]);
                }
                c.arg("--report").arg(&report).arg("--").arg(s.exe);
                c
            }
            Policy::Enforcer | Policy::IdleMeasured => {
                // The progress file lets the enforcer report true slowdown.
                let config = enforcer_config(s.scratch, &tag, Some(&progress))?;
                let mut c = Command::new(s.enforcer);
                c.args(["--log-format", "json", "run", "--no-wait", "--config"])
                    .arg(&config);
                if policy == Policy::IdleMeasured {
                    c.arg("--measure-only");
                }
                c.arg("--protect")
                    .arg(train.pid().to_string())
                    .arg("--budget")
                    .arg(format!("{}%", s.budget * 100.0))
                    .arg("--report")
                    .arg(&report)
                    .arg("--")
                    .arg(s.exe);
                c
            }
            _ => Command::new(s.exe),
        };
        cmd.args(&eval_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if policy == Policy::Enforcer {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if cgroup.is_some() {
            // The in-process loop writes only the cgroup's cpu.idle and
            // quota (no thread policies, no slice): no lift out of the
            // idle class, which `enforcer` itself makes.
            controller = Some(Controller::new(ControllerConfig {
                lift_after: None,
                ..ControllerConfig::new(s.budget, s.cpus)
            }));
        }
        let now = Instant::now();
        if let (Some(cg), Some(c)) = (&cgroup, controller.as_mut()) {
            let d = c.start(now);
            apply(cg, None, &d.controls, policy.cfs_period_us())?;
        }
        let mut child = cmd.spawn().context("starting the evaluation worker")?;
        if let Some(stderr) = child.stderr.take() {
            let status = Arc::clone(&status);
            thread::spawn(move || follow_status(stderr, &status, false));
        }
        let eval = Reaped(Some(child));
        if let Some(cg) = &cgroup {
            // v1 moves every thread of the process; the worker has had no
            // time to start its threads yet, and would be moved with them.
            cg.add(eval.pid())?;
        }
        Some(eval)
    };

    if policy.via_enforcer()
        && let Some(e) = &mut eval
    {
        // The enforcer loads its meter and learns the training's rate before
        // it starts the job: the run starts with the job.
        let deadline = Instant::now() + Duration::from_secs(60);
        while child_pids(e.pid()).is_empty() {
            if let Some(status) = e.exited() {
                bail!("enforcer run exited ({status}) before it started the evaluation");
            }
            if Instant::now() > deadline {
                bail!("enforcer run did not start the evaluation within 60 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    let t0 = Instant::now();
    let host_before = host_cpu_ticks();
    let base = read_schedstat(&schedstat);
    let mut ticks = Vec::new();
    let mut decisions = Vec::new();
    let clk_tck = clock_ticks();
    let mut next = t0;
    loop {
        let now = Instant::now();
        let (run_ns, delay_ns) = read_schedstat(&schedstat);
        let step = read_step(&progress);
        let eval_cpu_s = match &eval {
            // The evaluation runs as the enforcer's child: its CPU is the
            // tree's minus the enforcer's own.
            Some(e) if policy.via_enforcer() => {
                tree_cpu_secs(e.pid(), clk_tck) - process_cpu_secs(e.pid(), clk_tck).unwrap_or(0.0)
            }
            // A pool of worker processes: their time is the tree's.
            Some(e) => tree_cpu_secs(e.pid(), clk_tck),
            None => 0.0,
        };
        // Once the evaluation exits, its time leaves the tree (it becomes
        // the enforcer's children time): never let the counter go back.
        let eval_cpu_s = ticks
            .last()
            .map_or(eval_cpu_s, |t: &Tick| eval_cpu_s.max(t.eval_cpu_s));
        let mut judged = None;
        if let (Some(c), Some(cg)) = (controller.as_mut(), &cgroup) {
            let obs = Observation {
                steal: Some(StealCounters {
                    steal: Duration::from_nanos(delay_ns.saturating_sub(base.1)),
                    training_on_cpu: Duration::from_nanos(run_ns.saturating_sub(base.0)),
                }),
                job_cpu: Some(Duration::from_secs_f64(eval_cpu_s)),
                training_slowdown: None,
                paused_slowdown: None,
            };
            let before = c.controls();
            if let Some(d) = c.step(obs, now) {
                apply(cg, Some(&before), &d.controls, policy.cfs_period_us())?;
                if d.controls.frozen != before.frozen
                    && let Some(e) = &eval
                {
                    let sig = if d.controls.frozen {
                        libc::SIGSTOP
                    } else {
                        libc::SIGCONT
                    };
                    // SAFETY: kill on our own child's pid.
                    unsafe { libc::kill(e.pid() as i32, sig) };
                }
                decisions.push(format!("{:.1}s {d}", now.duration_since(t0).as_secs_f64()));
            }
            judged = c.last_stolen_fraction();
        }
        let controls = controller.as_ref().map(Controller::controls);
        let (quota_cores, frozen) = if policy == Policy::Enforcer {
            let st = status.lock().map(|s| s.clone()).unwrap_or_default();
            judged = st.stolen_fraction;
            (st.quota_cores, st.frozen)
        } else {
            (
                controls.and_then(|c| c.quota.cores()),
                controls.is_some_and(|c| c.frozen),
            )
        };
        ticks.push(Tick {
            t: now.duration_since(t0).as_secs_f64(),
            step,
            run_ns,
            delay_ns,
            eval_cpu_s,
            quota_cores,
            frozen,
            judged,
        });
        if now.duration_since(t0) >= s.secs {
            break;
        }
        next += TICK;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }

    let host_steal = host_before
        .zip(host_cpu_ticks())
        .and_then(|(before, after)| after.steal_fraction_since(&before));
    if policy == Policy::Enforcer
        && let Ok(st) = status.lock()
    {
        decisions.clone_from(&st.decisions);
    }
    let eval_work_per_s = match eval {
        Some(e) => {
            // SAFETY: kill on our own child's pid; a frozen job must finish.
            unsafe { libc::kill(e.pid() as i32, libc::SIGCONT) };
            let out = e.wait_output()?;
            let line = String::from_utf8_lossy(&out.stdout);
            let line = line
                .lines()
                .rev()
                .find(|l| l.contains("\"work\""))
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("evaluation output {:?} ({})", out.stdout, out.status))?;
            let work = v["work"].as_f64().context("evaluation reported no work")?;
            let secs = v["secs"].as_f64().context("evaluation reported no secs")?;
            Some(work / secs)
        }
        None => None,
    };
    drop(train);
    drop(cgroup);
    let _ = fs::remove_file(&progress);
    let _ = fs::remove_file(&schedstat);
    let reported: Option<serde_json::Value> = fs::read(&report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let _ = fs::remove_file(&report);
    if policy.via_enforcer() && reported.is_none() {
        bail!("enforcer run wrote no report at {}", report.display());
    }
    let field = |k: &str| reported.as_ref().and_then(|r| r[k].as_f64());

    let first = ticks.first().context("no ticks")?;
    let last = ticks.last().context("no ticks")?;
    let dt = (last.t - first.t).max(1e-3);
    let train_steps_per_s = (last.step.saturating_sub(first.step)) as f64 / dt;
    let wait_fraction = fraction(first, last);
    let eval_cpu_cores =
        (policy != Policy::Alone).then(|| (last.eval_cpu_s - first.eval_cpu_s) / dt);
    let is_loop = controller.is_some() || policy == Policy::Enforcer;
    // The enforcer row is judged on what the enforcer measured (its eBPF
    // steal, a trailing 1 s window, logged once a second); the in-bench
    // loops on the schedstat wait they ran on.
    let trailing = if policy == Policy::Enforcer {
        let mut v: Vec<(f64, f64)> = Vec::new();
        for t in &ticks {
            if let Some(j) = t.judged
                && v.last().is_none_or(|(_, last)| *last != j)
            {
                v.push((t.t, j));
            }
        }
        v
    } else {
        trailing_fractions(&ticks)
    };
    let trailing_step = if policy == Policy::Enforcer {
        1.0
    } else {
        TICK.as_secs_f64()
    };
    let over_budget_s = is_loop
        .then(|| trailing.iter().filter(|(_, f)| *f > s.budget).count() as f64 * trailing_step);
    // When the fraction first came back under budget after the evaluation
    // started: 0 when no window was ever over it.
    let under_budget_after_s = if is_loop {
        match trailing.iter().position(|(_, f)| *f > s.budget) {
            None => Some(0.0),
            Some(i) => trailing[i..]
                .iter()
                .find(|(_, f)| *f <= s.budget)
                .map(|(t, _)| *t),
        }
    } else {
        None
    };
    let steady: Vec<f64> = trailing
        .iter()
        .filter(|(t, _)| *t >= 2.0)
        .map(|(_, f)| *f)
        .collect();
    let (steady_min, steady_max) = if is_loop && !steady.is_empty() {
        (
            Some(steady.iter().copied().fold(1.0, f64::min)),
            Some(steady.iter().copied().fold(0.0, f64::max)),
        )
    } else {
        (None, None)
    };
    Ok(RunResult {
        policy,
        round,
        train_steps_per_s,
        host_steal,
        wait_fraction,
        eval_work_per_s,
        eval_cpu_cores,
        decisions,
        over_budget_s,
        under_budget_after_s,
        steady_min,
        steady_max,
        reported_stolen_fraction: field("stolen_fraction"),
        reported_slowdown: field("training_slowdown"),
        reported_over_budget_s: field("over_budget_s"),
        reported_budget_used: field("budget_used"),
        ticks,
    })
}

fn apply(
    cg: &BenchCgroup,
    before: Option<&CpuControls>,
    to: &CpuControls,
    period_us: u64,
) -> Result<()> {
    if before.is_none_or(|b| b.idle != to.idle) {
        cg.write("cpu.idle", if to.idle { "1" } else { "0" })?;
    }
    if before.is_none_or(|b| b.quota != to.quota) {
        let cores = match to.quota {
            Quota::Unlimited => None,
            Quota::Cores(c) => Some(c),
        };
        cg.set_quota(cores, period_us)?;
    }
    Ok(())
}

pub(super) fn policy_slug(p: Policy) -> String {
    p.to_possible_value()
        .map_or_else(|| format!("{p:?}"), |v| v.get_name().to_owned())
}

/// The training's schedstat wait as the steal counters of the loop rows.
fn counters(t: &Tick) -> StealCounters {
    StealCounters::from_ns(t.delay_ns, t.run_ns)
}

fn fraction(a: &Tick, b: &Tick) -> f64 {
    counters(b).since(counters(a)).fraction_or_zero()
}

/// `(t, fraction over [t − 1 s, t])` for every tick at least 1 s in.
fn trailing_fractions(ticks: &[Tick]) -> Vec<(f64, f64)> {
    const LENGTH: Duration = Duration::from_secs(1);
    let mut window = Window::new(LENGTH);
    ticks
        .iter()
        .filter_map(|tick| {
            window.push(Duration::from_secs_f64(tick.t), counters(tick));
            let span = window.trailing(LENGTH)?;
            (span.elapsed() >= Duration::from_millis(950))
                .then(|| (tick.t, span.last.since(*span.first).fraction_or_zero()))
        })
        .collect()
}

/// The training's slowdown in `run` against the same round's `training
/// alone`; none for that row itself or where that round has no such row.
fn round_slowdown(run: &RunResult, runs: &[RunResult]) -> Option<f64> {
    if run.policy == Policy::Alone {
        return None;
    }
    runs.iter()
        .find(|x| x.policy == Policy::Alone && x.round == run.round)
        .map(|alone| 1.0 - run.train_steps_per_s / alone.train_steps_per_s)
}

/// The training's rate per second of CPU time the hypervisor left the
/// machine: what the rate would have been with no host steal, for a
/// training bound by CPU.
fn host_adjusted_rate(run: &RunResult) -> Option<f64> {
    run.host_steal
        .filter(|h| *h < 1.0)
        .map(|h| run.train_steps_per_s / (1.0 - h))
}

/// [`round_slowdown`] on host-adjusted rates.
fn round_slowdown_host_adjusted(run: &RunResult, runs: &[RunResult]) -> Option<f64> {
    if run.policy == Policy::Alone {
        return None;
    }
    let alone = runs
        .iter()
        .find(|x| x.policy == Policy::Alone && x.round == run.round)?;
    Some(1.0 - host_adjusted_rate(run)? / host_adjusted_rate(alone)?)
}

/// Max − min over the median: the spread between rounds.
fn spread(values: &[f64]) -> Option<f64> {
    // One round has no spread to show: no noise rather than a noise of 0.
    if values.len() < 2 {
        return None;
    }
    let m = median(values.iter().copied())?;
    let hi = values.iter().copied().fold(f64::MIN, f64::max);
    let lo = values.iter().copied().fold(f64::MAX, f64::min);
    Some((hi - lo) / m.max(1e-9))
}

/// `/proc/stat`'s ticks over every CPU; `None` where it cannot be read.
fn host_cpu_ticks() -> Option<CpuTicks> {
    ProcFs::new().cpu_times().ok().map(|t| t.all)
}

fn round_cells(runs: &[RunResult]) -> Vec<RoundCell> {
    runs.iter()
        .map(|r| RoundCell {
            policy: r.policy,
            round: r.round,
            slowdown: round_slowdown(r, runs),
            slowdown_host_adjusted: round_slowdown_host_adjusted(r, runs),
            host_steal: r.host_steal,
            eval_work_per_s: r.eval_work_per_s,
            eval_cpu_cores: r.eval_cpu_cores,
        })
        .collect()
}

fn summarise(policies: &[Policy], runs: &[RunResult]) -> Vec<Row> {
    let idle_work = median(
        runs.iter()
            .filter(|r| r.policy == Policy::Idle)
            .filter_map(|r| r.eval_work_per_s),
    );
    policies
        .iter()
        .map(|&p| {
            let of: Vec<&RunResult> = runs.iter().filter(|r| r.policy == p).collect();
            let eval_work = median(of.iter().filter_map(|r| r.eval_work_per_s));
            Row {
                policy: p,
                label: p.label(),
                train_steps_per_s: median(of.iter().map(|r| r.train_steps_per_s)).unwrap_or(0.0),
                slowdown: median(of.iter().filter_map(|r| round_slowdown(r, runs))),
                eval_work_per_s: eval_work,
                eval_vs_idle: eval_work.zip(idle_work).map(|(w, i)| w / i),
                eval_cpu_cores: median(of.iter().filter_map(|r| r.eval_cpu_cores)),
                wait_fraction: median(of.iter().map(|r| r.wait_fraction)).unwrap_or(0.0),
                over_budget_s: median(of.iter().filter_map(|r| r.over_budget_s)),
                under_budget_after_s: median(of.iter().filter_map(|r| r.under_budget_after_s)),
                steady_min: median(of.iter().filter_map(|r| r.steady_min)),
                steady_max: median(of.iter().filter_map(|r| r.steady_max)),
                reported_stolen_fraction: median(
                    of.iter().filter_map(|r| r.reported_stolen_fraction),
                ),
                reported_slowdown: median(of.iter().filter_map(|r| r.reported_slowdown)),
                reported_over_budget_s: median(of.iter().filter_map(|r| r.reported_over_budget_s)),
                reported_budget_used: median(of.iter().filter_map(|r| r.reported_budget_used)),
            }
        })
        .collect()
}

#[expect(clippy::print_stdout, reason = "the table is the bench's output")]
fn print_table(rows: &[Row], budget_pct: f64, cpus: usize, before: &str, after: &str) {
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1}", v * 100.0));
    let num = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| format!("{v:.d$}"));
    println!(
        "\ncontention bench: {cpus} CPUs, budget {budget_pct:.0}%, load {before} -> {after}; medians over rounds"
    );
    println!(
        "{:<38} {:>8} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>10} {:>12} {:>9} {:>9} {:>7}",
        "policy",
        "steps/s",
        "slowdown%",
        "eval u/s",
        "eval/idle%",
        "eval CPU",
        "wait%",
        "over s",
        "under at s",
        "steady wait%",
        "rep.steal%",
        "rep.slow%",
        "rep.over"
    );
    for r in rows {
        let steady = match (r.steady_min, r.steady_max) {
            (Some(a), Some(b)) => format!("{:.1}-{:.1}", a * 100.0, b * 100.0),
            _ => "-".to_owned(),
        };
        println!(
            "{:<38} {:>8.1} {:>9} {:>10} {:>9} {:>9} {:>8.1} {:>8} {:>10} {:>12} {:>9} {:>9} {:>7}",
            r.label,
            r.train_steps_per_s,
            pct(r.slowdown),
            num(r.eval_work_per_s, 0),
            pct(r.eval_vs_idle),
            num(r.eval_cpu_cores, 2),
            r.wait_fraction * 100.0,
            num(r.over_budget_s, 1),
            num(r.under_budget_after_s, 1),
            steady,
            pct(r.reported_stolen_fraction),
            pct(r.reported_slowdown),
            num(r.reported_over_budget_s, 1),
        );
    }
    println!(
        "wait% = training run-queue wait ÷ (run + wait) from its threads' schedstat (waits behind any task, not only the evaluation); \
         over s / under at s (0 = never over) / steady (from 2 s on): trailing 1 s fraction vs the budget, s from the evaluation's start \
         (loop rows: the schedstat wait; enforcer row: its eBPF stolen fraction, logged once a second); rep.* = the enforcer's own job report"
    );
}

pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(super) fn read_step(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub(super) fn read_schedstat(path: &Path) -> (u64, u64) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut f = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

pub(super) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads), in seconds.
pub(super) fn process_cpu_secs(pid: u32, clk_tck: f64) -> Option<f64> {
    let stat = ProcFs::new().stat(Pid::try_from(pid).ok()?).ok()?;
    Some(stat.cpu_ticks as f64 / clk_tck)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The bench's own cgroup in the v1 `cpu` hierarchy.
fn own_v1_cpu_cgroup() -> Result<PathBuf> {
    let proc = ProcFs::new();
    let own = proc.self_cgroup()?;
    let rel = own.v1("cpu").context("/proc/self/cgroup has no cpu line")?;
    proc.mountinfo()?
        .dir_of(&Hierarchy::V1("cpu".into()), rel)
        .context("no v1 cgroup hierarchy with the cpu controller is mounted")
}

/// The latest `budget status` log line of an enforcer.
#[derive(Debug, Default, Clone)]
pub(super) struct Status {
    pub stolen_fraction: Option<f64>,
    pub training_slowdown: Option<f64>,
    pub quota_cores: Option<f64>,
    pub job_cpu_cores: Option<f64>,
    pub frozen: bool,
    /// A status line has been seen.
    pub seen: bool,
    /// Every `budget decision` line, in order.
    pub decisions: Vec<String>,
}

/// Whether this enforcer binary has `run --protect` (the budget loop).
pub(super) fn supports_protect(enforcer: &Path) -> bool {
    Command::new(enforcer)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--protect")
        })
}

/// Reads an enforcer's JSON log lines and keeps the latest budget status;
/// with `echo`, passes every other line through to stderr.
pub(super) fn follow_status(stderr: impl std::io::Read, status: &Mutex<Status>, echo: bool) {
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            if echo {
                eprintln!("{line}");
            }
            continue;
        };
        let fields = &v["fields"];
        if fields["message"].as_str() == Some("budget status") {
            if let Ok(mut s) = status.lock() {
                s.stolen_fraction = fields["stolen_fraction"].as_f64();
                s.training_slowdown = fields["training_slowdown"].as_f64();
                s.quota_cores = fields["quota_cores"].as_f64();
                s.job_cpu_cores = fields["job_cpu_cores"].as_f64();
                s.frozen = fields["frozen"].as_bool().unwrap_or(false);
                s.seen = true;
            }
            continue;
        }
        if fields["message"].as_str() == Some("budget decision")
            && let Ok(mut s) = status.lock()
        {
            let at = v["timestamp"].as_str().unwrap_or("");
            let d = fields["decision"].as_str().unwrap_or("");
            s.decisions.push(format!("{at} {d}"));
        }
        if echo && !(fields["message"] == "job event" && fields["event"] == "budget") {
            // Budget events repeat the `budget decision` line: not echoed.
            let rest: serde_json::Map<String, serde_json::Value> = fields
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| *k != "message")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            eprintln!(
                "  [enforcer] {} {}",
                fields["message"].as_str().unwrap_or(""),
                serde_json::Value::Object(rest)
            );
        }
    }
}

/// A config for one `enforcer run` of the bench: a private state directory
/// (its job slots are not shared with other enforcers on the host) and, for
/// the enforcer row, the training's progress file.
fn enforcer_config(scratch: &Path, tag: &str, progress: Option<&Path>) -> Result<PathBuf> {
    let path = scratch.join(format!("config-{tag}.toml"));
    let state = scratch.join(format!("state-{tag}"));
    let mut text = format!("state_dir = {:?}\n", state.display().to_string());
    if let Some(p) = progress {
        text.push_str(&format!(
            "\n[training]\nprogress_file = {:?}\n",
            p.display().to_string()
        ));
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The direct children of a process.
fn child_pids(pid: u32) -> Vec<u32> {
    Pid::try_from(pid)
        .map(|p| ProcFs::new().children(p))
        .unwrap_or_default()
        .into_iter()
        .map(u32::from)
        .collect()
}

/// CPU seconds of a process and all its descendants.
pub(super) fn tree_cpu_secs(pid: u32, clk: f64) -> f64 {
    process_cpu_secs(pid, clk).unwrap_or(0.0)
        + child_pids(pid)
            .into_iter()
            .map(|c| tree_cpu_secs(c, clk))
            .sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_files_filesystem_is_that_of_the_longest_mount_holding_it() {
        // /proc/self is on proc, not on the root's filesystem.
        assert_eq!(filesystem_of(Path::new("/proc/self")), "proc");
        assert_eq!(filesystem_of(Path::new("/sys/kernel")), "sysfs");
    }

    fn tick(t: f64, delay_ms: u64, run_ms: u64) -> Tick {
        Tick {
            t,
            step: 0,
            run_ns: run_ms * 1_000_000,
            delay_ns: delay_ms * 1_000_000,
            eval_cpu_s: 0.0,
            quota_cores: None,
            frozen: false,
            judged: None,
        }
    }

    #[test]
    fn trailing_fractions_start_a_second_in_and_cover_the_last_second() {
        // 10 % wait for the first second, 30 % after, 100 ms ticks.
        let mut ticks = Vec::new();
        let (mut delay, mut run) = (0, 0);
        for i in 0..=20u64 {
            ticks.push(tick(i as f64 / 10.0, delay, run));
            let d = if i < 10 { 10 } else { 30 };
            delay += d;
            run += 100 - d;
        }
        let out = trailing_fractions(&ticks);
        assert_eq!(out.len(), 11, "{out:?}");
        assert!((out[0].0 - 1.0).abs() < 1e-9 && (out[0].1 - 0.1).abs() < 1e-9);
        let (t, f) = out[10];
        assert!((t - 2.0).abs() < 1e-9 && (f - 0.3).abs() < 1e-9, "{t} {f}");
        assert!((fraction(&ticks[0], &ticks[20]) - 0.2).abs() < 1e-9);
    }

    fn run(policy: Policy, round: usize, rate: f64, host_steal: Option<f64>) -> RunResult {
        RunResult {
            policy,
            round,
            train_steps_per_s: rate,
            host_steal,
            wait_fraction: 0.0,
            eval_work_per_s: None,
            eval_cpu_cores: None,
            decisions: Vec::new(),
            over_budget_s: None,
            under_budget_after_s: None,
            steady_min: None,
            steady_max: None,
            reported_stolen_fraction: None,
            reported_slowdown: None,
            reported_over_budget_s: None,
            reported_budget_used: None,
            ticks: Vec::new(),
        }
    }

    #[test]
    fn the_host_adjusted_slowdown_takes_out_what_the_hypervisor_stole_in_each_run() {
        // Alone lost 5 % of the machine to the host, the policy's run none:
        // raw, the policy looks 5 % faster; per CPU second it is even.
        let runs = [
            run(Policy::Alone, 0, 95.0, Some(0.05)),
            run(Policy::Idle, 0, 100.0, Some(0.0)),
        ];
        let raw = round_slowdown(&runs[1], &runs).unwrap();
        let adjusted = round_slowdown_host_adjusted(&runs[1], &runs).unwrap();
        assert!((raw + 5.0 / 95.0).abs() < 1e-9, "{raw}");
        assert!(adjusted.abs() < 1e-9, "{adjusted}");
        // Without a steal reading there is no adjusted number, not a raw one.
        let unread = [run(Policy::Alone, 0, 95.0, None), runs[1].clone()];
        assert_eq!(round_slowdown_host_adjusted(&unread[1], &unread), None);
    }

    #[test]
    fn the_spread_between_rounds_needs_two_rounds() {
        assert_eq!(spread(&[100.0]), None);
        let s = spread(&[90.0, 100.0, 110.0]).unwrap();
        assert!((s - 0.2).abs() < 1e-9, "{s}");
    }
}
