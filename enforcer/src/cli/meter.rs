//! `enforcer meter`: measures, without enforcing anything, how much the tasks
//! of existing cgroups steal from a training workload (brief §2), with the
//! same kernel programs the supervisor uses.

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use enforcer_model::{StealCounters, StealDelta};
use serde_json::{Value, json};

use crate::{
    probe::steal::{JobCgroup, SOLE_TRAINING, StealMeter, StealSnapshot, TrainingSpec},
    units::Dur,
};

#[derive(Debug, Args)]
pub struct MeterArgs {
    /// PID of the training workload to protect (all its threads, and the
    /// threads it creates while metered).
    #[arg(long, value_name = "PID", required_unless_present = "training_cgroup")]
    pub protect: Option<crate::host::Pid>,

    /// Also count processes forked by the training workload (and theirs),
    /// found at start and whenever they fork.
    #[arg(long, requires = "protect")]
    pub follow_children: bool,

    /// Also meter this process as a training of its own (repeat for more,
    /// up to 7): nothing is reported for it. The programs then keep several
    /// trainings' state, as the agent's do on a node that protects several
    /// trainings; `cargo xtask bench probe` uses it to measure that cost.
    #[arg(long, value_name = "PID", requires = "protect")]
    pub also_protect: Vec<crate::host::Pid>,

    /// The training workload is every thread of this cgroup directory (v2 or
    /// v1) and its descendants, instead of a PID.
    #[arg(long, value_name = "DIR", conflicts_with = "protect")]
    pub training_cgroup: Option<PathBuf>,

    /// A cgroup v2 directory whose tasks (and those of its child cgroups) are
    /// measured as one job; repeat for several. On hybrid hosts, a directory
    /// under the unified hierarchy (/sys/fs/cgroup/unified).
    #[arg(long = "cgroup", value_name = "DIR")]
    pub cgroups: Vec<PathBuf>,

    /// Time between two printed lines, e.g. `500ms`, `1s`.
    #[arg(long, default_value = "1s")]
    pub interval: Dur,

    /// Stop after this long (e.g. `10s`, `2m`); without it, run until
    /// interrupted (SIGINT/SIGTERM), then print the summary.
    #[arg(long)]
    pub duration: Option<Dur>,

    /// One JSON object per line (`event`: start, interval, summary) instead
    /// of text.
    #[arg(long)]
    pub json: bool,

    /// Attach only empty programs on sched_switch and sched_wakeup (no
    /// steal is measured), until interrupted: the floor `cargo xtask bench
    /// probe` compares the meter's cost with.
    #[arg(long, hide = true)]
    pub floor: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn run(args: MeterArgs) -> ExitCode {
    match meter(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Job `key`'s steal and the training's on-CPU time from `from` to `to`.
fn steal_between(from: &StealSnapshot, to: &StealSnapshot, key: &str) -> StealDelta {
    let counters = |s: &StealSnapshot| {
        let job = s.jobs.get(key).copied().unwrap_or_default();
        StealCounters::from_ns(job.steal_ns, s.training.on_cpu_ns)
    };
    counters(to).since(counters(from))
}

struct Job {
    key: String,
    path: PathBuf,
    cgroup: JobCgroup,
}

/// The kernel's own accounting, sampled right after each probe snapshot so
/// that both cover the same interval: the training threads' schedstat
/// run_delay (from /proc, not from eBPF) and each job cgroup's CPU usage
/// (cpu.stat). For cross-checking the meter; `None` where unreadable.
#[derive(Debug, Clone)]
struct GroundTruth {
    run_delay_ns: Option<u64>,
    job_usage_ns: Vec<Option<u64>>,
}

impl GroundTruth {
    fn read(training: &TrainingSpec, jobs: &[Job]) -> Self {
        let run_delay_ns = match training {
            TrainingSpec::Pid { pid, .. } => crate::host::ProcFs::new().run_delay_ns(*pid),
            TrainingSpec::Cgroup(_) => None,
        };
        let job_usage_ns = jobs
            .iter()
            .map(|j| {
                std::fs::read_to_string(j.path.join("cpu.stat"))
                    .ok()?
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))?
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .map(|us| us * 1000)
            })
            .collect();
        Self {
            run_delay_ns,
            job_usage_ns,
        }
    }

    fn growth_json(&self, last: &Self) -> Value {
        let grow = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        json!({
            "training_schedstat_run_delay_ns": grow(self.run_delay_ns, last.run_delay_ns),
            "jobs_cpu_usage_ns": self
                .job_usage_ns
                .iter()
                .zip(&last.job_usage_ns)
                .map(|(a, b)| grow(*a, *b))
                .collect::<Vec<_>>(),
        })
    }
}

/// `--floor`: empty programs attached until a signal, then their cost.
fn floor(args: &MeterArgs) -> Result<()> {
    let probes = crate::probe::floor::FloorProbes::attach()
        .context("loading the empty programs (enforcer doctor says what this node lacks)")?;
    install_signal_handlers();
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", json!({"event": "start", "floor": true}))?;
    out.flush()?;
    while !STOP.load(Ordering::Relaxed) && args.duration.is_none_or(|d| started.elapsed() < d.0) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let programs: Vec<Value> = probes
        .program_stats()
        .into_iter()
        .map(program_json)
        .collect();
    writeln!(
        out,
        "{}",
        json!({"event": "summary", "duration_s": started.elapsed().as_secs_f64(), "programs": programs})
    )?;
    Ok(())
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn program_json(p: crate::probe::ProgramStats) -> Value {
    json!({
        "name": p.name,
        "run_count": p.run_count,
        "run_time_ns": p.run_time_ns,
        "ns_per_event": (p.run_count > 0).then(|| p.run_time_ns as f64 / p.run_count as f64),
    })
}

fn meter(args: &MeterArgs) -> Result<()> {
    if args.floor {
        return floor(args);
    }
    let training = match (args.protect, &args.training_cgroup) {
        (Some(pid), _) => TrainingSpec::Pid {
            pid,
            follow_children: args.follow_children,
        },
        (None, Some(dir)) => TrainingSpec::Cgroup(dir.clone()),
        (None, None) => bail!("--protect PID or --training-cgroup DIR is required"),
    };
    let interval = args.interval.0;
    let duration = args.duration.map(|d| d.0);
    if interval.is_zero() {
        bail!("--interval must be above zero");
    }
    let mut jobs = Vec::new();
    for (i, path) in args.cgroups.iter().enumerate() {
        let cgroup =
            JobCgroup::from_path(path).with_context(|| format!("--cgroup {}", path.display()))?;
        jobs.push(Job {
            key: format!("{i}"),
            path: path.clone(),
            cgroup,
        });
    }
    let mut meter = StealMeter::start(training.clone())
        .context("loading the steal probes (enforcer doctor says what this node lacks)")?;
    for job in &jobs {
        meter.add_job(SOLE_TRAINING, &job.key, job.cgroup.clone())?;
    }
    for &pid in &args.also_protect {
        let spec = TrainingSpec::Pid {
            pid,
            follow_children: false,
        };
        meter
            .add_training(&format!("also-{pid}"), spec)
            .with_context(|| format!("--also-protect {pid}"))?;
    }
    install_signal_handlers();
    let first = meter.read(SOLE_TRAINING)?;
    let truth_first = GroundTruth::read(&training, &jobs);
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    if args.json {
        let line = json!({
            "event": "start",
            "training": training_json(&training),
            "jobs": jobs.iter().map(|j| json!({
                "cgroup": j.path, "cgroup_id": j.cgroup.id, "level": j.cgroup.level,
            })).collect::<Vec<_>>(),
            "threads": first.training.threads,
            "also_protected": args.also_protect.len(),
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(
            out,
            "metering steal from {} ({} threads) by {} cgroup(s); Ctrl-C for the summary",
            describe(&training),
            first.training.threads,
            jobs.len()
        )?;
    }
    out.flush()?;

    let mut previous = first.clone();
    let mut truth_last;
    loop {
        let elapsed = started.elapsed();
        let mut next_tick = interval * (elapsed.as_nanos() / interval.as_nanos()) as u32 + interval;
        if let Some(limit) = duration {
            next_tick = next_tick.min(limit);
        }
        while started.elapsed() < next_tick && !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(
                Duration::from_millis(20).min(next_tick.saturating_sub(started.elapsed())),
            );
        }
        let now = meter.read(SOLE_TRAINING)?;
        let truth = GroundTruth::read(&training, &jobs);
        let done = STOP.load(Ordering::Relaxed)
            || duration.is_some_and(|limit| started.elapsed() >= limit);
        if !done {
            print_interval(
                &mut out,
                args.json,
                &jobs,
                &previous,
                &now,
                started.elapsed(),
            )?;
        }
        previous = now;
        truth_last = truth;
        if done {
            break;
        }
    }
    let mut summary = summary_json(&jobs, &first, &previous, started.elapsed(), &meter);
    summary["ground_truth"] = truth_first.growth_json(&truth_last);
    if args.json {
        writeln!(out, "{summary}")?;
    } else {
        print_summary(&mut out, &summary)?;
    }
    if previous.overflow.any() {
        tracing::warn!(overflow = ?previous.overflow, "the meter lost events: numbers are a lower bound");
    }
    Ok(())
}

fn training_json(training: &TrainingSpec) -> Value {
    match training {
        TrainingSpec::Pid {
            pid,
            follow_children,
        } => json!({"pid": pid, "follow_children": follow_children}),
        TrainingSpec::Cgroup(dir) => json!({"cgroup": dir}),
    }
}

fn describe(training: &TrainingSpec) -> String {
    match training {
        TrainingSpec::Pid {
            pid,
            follow_children: true,
        } => format!("PID {pid} and its children"),
        TrainingSpec::Pid { pid, .. } => format!("PID {pid}"),
        TrainingSpec::Cgroup(dir) => format!("cgroup {}", dir.display()),
    }
}

fn print_interval(
    out: &mut impl Write,
    json: bool,
    jobs: &[Job],
    from: &StealSnapshot,
    to: &StealSnapshot,
    elapsed: Duration,
) -> Result<()> {
    let on_cpu = to
        .training
        .on_cpu_ns
        .saturating_sub(from.training.on_cpu_ns);
    let wait = to
        .training
        .runq_wait_ns
        .saturating_sub(from.training.runq_wait_ns);
    let per_job: Vec<(&Job, StealDelta, u64)> = jobs
        .iter()
        .map(|j| {
            let a = from.jobs.get(&j.key).copied().unwrap_or_default();
            let b = to.jobs.get(&j.key).copied().unwrap_or_default();
            (
                j,
                steal_between(from, to, &j.key),
                b.preemptions.saturating_sub(a.preemptions),
            )
        })
        .collect();
    if json {
        let line = json!({
            "event": "interval",
            "t_s": elapsed.as_secs_f64(),
            "training": {"on_cpu_s": ns_to_s(on_cpu), "runq_wait_s": ns_to_s(wait), "threads": to.training.threads},
            "jobs": per_job.iter().map(|(j, steal, pre)| json!({
                "cgroup": j.path, "steal_s": steal.steal.as_secs_f64(),
                "stolen_fraction": steal.fraction_or_zero(), "preemptions": pre,
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{line}")?;
    } else {
        let mut line = format!(
            "{:7.1}s  training cpu {:6.3}s wait {:6.3}s threads {}",
            elapsed.as_secs_f64(),
            ns_to_s(on_cpu),
            ns_to_s(wait),
            to.training.threads
        );
        for (j, steal, pre) in per_job {
            line += &format!(
                "  | {}: steal {:.3}s {:5.2}% preempt {}",
                j.path.display(),
                steal.steal.as_secs_f64(),
                100.0 * steal.fraction_or_zero(),
                pre
            );
        }
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

fn summary_json(
    jobs: &[Job],
    first: &StealSnapshot,
    last: &StealSnapshot,
    elapsed: Duration,
    meter: &StealMeter,
) -> Value {
    let t0 = &first.training;
    let t1 = &last.training;
    let on_cpu = t1.on_cpu_ns.saturating_sub(t0.on_cpu_ns);
    let jobs: Vec<Value> = jobs
        .iter()
        .map(|j| {
            let a = first.jobs.get(&j.key).copied().unwrap_or_default();
            let b = last.jobs.get(&j.key).copied().unwrap_or_default();
            let steal = steal_between(first, last, &j.key);
            json!({
                "cgroup": j.path,
                "cgroup_id": j.cgroup.id,
                "steal_ns": u64::try_from(steal.steal.as_nanos()).unwrap_or(u64::MAX),
                "steal_s": steal.steal.as_secs_f64(),
                "stolen_fraction": steal.fraction_or_zero(),
                "preemptions": b.preemptions.saturating_sub(a.preemptions),
            })
        })
        .collect();
    let programs: Vec<Value> = meter
        .program_stats()
        .into_iter()
        .map(program_json)
        .collect();
    json!({
        "event": "summary",
        "duration_s": elapsed.as_secs_f64(),
        "window_s": (last.at.saturating_sub(first.at)).as_secs_f64(),
        "training": {
            "on_cpu_ns": on_cpu,
            "on_cpu_s": ns_to_s(on_cpu),
            "runq_wait_ns": t1.runq_wait_ns.saturating_sub(t0.runq_wait_ns),
            "runq_wait_s": ns_to_s(t1.runq_wait_ns.saturating_sub(t0.runq_wait_ns)),
            "attributed_wait_ns": t1.attributed_wait_ns.saturating_sub(t0.attributed_wait_ns),
            "threads": t1.threads,
            "threads_forked": t1.threads_forked.saturating_sub(t0.threads_forked),
            "threads_exited": t1.threads_exited.saturating_sub(t0.threads_exited),
            "migrations": t1.migrations.saturating_sub(t0.migrations),
        },
        "jobs": jobs,
        "overflow": last.overflow,
        "programs": programs,
    })
}

fn print_summary(out: &mut impl Write, summary: &Value) -> Result<()> {
    let t = &summary["training"];
    writeln!(
        out,
        "summary over {:.1}s: training on-CPU {:.3}s, run-queue wait {:.3}s, {} threads",
        summary["duration_s"].as_f64().unwrap_or_default(),
        t["on_cpu_s"].as_f64().unwrap_or_default(),
        t["runq_wait_s"].as_f64().unwrap_or_default(),
        t["threads"]
    )?;
    for job in summary["jobs"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {}: stole {:.3}s, stolen fraction {:.2}%, {} preemptions of training",
            job["cgroup"].as_str().unwrap_or_default(),
            job["steal_s"].as_f64().unwrap_or_default(),
            100.0 * job["stolen_fraction"].as_f64().unwrap_or_default(),
            job["preemptions"]
        )?;
    }
    writeln!(out, "  overflow: {}", summary["overflow"])?;
    Ok(())
}
