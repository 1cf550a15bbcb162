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
use serde_json::{Value, json};

use crate::probe::steal::{JobCgroup, StealMeter, StealSnapshot, TrainingSpec};

#[derive(Debug, Args)]
pub struct MeterArgs {
    /// PID of the training workload to protect (all its threads, and the
    /// threads it creates while metered).
    #[arg(long, value_name = "PID", required_unless_present = "training_cgroup")]
    pub protect: Option<u32>,

    /// Also count processes forked by the training workload (and theirs),
    /// found at start and whenever they fork.
    #[arg(long, requires = "protect")]
    pub follow_children: bool,

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
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Stop after this long (e.g. `10s`, `2m`); without it, run until
    /// interrupted (SIGINT/SIGTERM), then print the summary.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// One JSON object per line (`event`: start, interval, summary) instead
    /// of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses `250ms`, `1s`, `1.5s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with a unit, e.g. 1s or 500ms"))?;
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{s:?}: {e}"))
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

fn fraction(steal: u64, on_cpu: u64) -> f64 {
    if steal + on_cpu == 0 {
        0.0
    } else {
        steal as f64 / (steal + on_cpu) as f64
    }
}

struct Job {
    key: String,
    path: PathBuf,
    cgroup: JobCgroup,
}

fn meter(args: &MeterArgs) -> Result<()> {
    let training = match (args.protect, &args.training_cgroup) {
        (Some(pid), _) => TrainingSpec::Pid {
            pid,
            follow_children: args.follow_children,
        },
        (None, Some(dir)) => TrainingSpec::Cgroup(dir.clone()),
        (None, None) => bail!("--protect PID or --training-cgroup DIR is required"),
    };
    if args.interval.is_zero() {
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
        meter.add_job(&job.key, job.cgroup)?;
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let first = meter.read()?;
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
    loop {
        let elapsed = started.elapsed();
        let mut next_tick =
            args.interval * (elapsed.as_nanos() / args.interval.as_nanos()) as u32 + args.interval;
        if let Some(limit) = args.duration {
            next_tick = next_tick.min(limit);
        }
        while started.elapsed() < next_tick && !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(next_tick - started.elapsed()));
        }
        let now = meter.read()?;
        let done = STOP.load(Ordering::Relaxed)
            || args
                .duration
                .is_some_and(|limit| started.elapsed() >= limit);
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
        if done {
            break;
        }
    }
    let summary = summary_json(&jobs, &first, &previous, started.elapsed(), &meter);
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
    let per_job: Vec<(&Job, u64, u64)> = jobs
        .iter()
        .map(|j| {
            let a = from.jobs.get(&j.key).copied().unwrap_or_default();
            let b = to.jobs.get(&j.key).copied().unwrap_or_default();
            (
                j,
                b.steal_ns.saturating_sub(a.steal_ns),
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
                "cgroup": j.path, "steal_s": ns_to_s(*steal),
                "stolen_fraction": fraction(*steal, on_cpu), "preemptions": pre,
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
                ns_to_s(steal),
                100.0 * fraction(steal, on_cpu),
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
            let steal = b.steal_ns.saturating_sub(a.steal_ns);
            json!({
                "cgroup": j.path,
                "cgroup_id": j.cgroup.id,
                "steal_ns": steal,
                "steal_s": ns_to_s(steal),
                "stolen_fraction": fraction(steal, on_cpu),
                "preemptions": b.preemptions.saturating_sub(a.preemptions),
            })
        })
        .collect();
    let programs: Vec<Value> = meter
        .program_stats()
        .into_iter()
        .map(|p| {
            json!({
                "name": p.name,
                "run_count": p.run_count,
                "run_time_ns": p.run_time_ns,
                "ns_per_event": (p.run_count > 0).then(|| p.run_time_ns as f64 / p.run_count as f64),
            })
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("1fortnight").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
