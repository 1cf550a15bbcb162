//! The steal meter as a job supervisor [`Monitor`]: loads the probes when
//! the job starts, reads them every control period, keeps the job's stolen
//! fraction over 1 s, 10 s and the whole job against the budget, emits
//! `budget_exceeded` / `budget_recovered`, prints a live status line with
//! `--progress`, and fills the steal fields of the report.
//!
//! Null-safe: when the probes cannot run (no BTF, no privilege, a verifier
//! refusal, no training workload), it says why once, the job is still
//! enforced, and the steal fields stay `null` with the reason in
//! `unavailable`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{
    steal::{JobCgroup, SOLE_TRAINING, StealMeter, StealSnapshot, TrainingSpec},
    window::{BudgetEvent, LONG_WINDOW, SHORT_WINDOW, StealWindow},
};
use crate::{
    events::Event,
    host::{Pid, ProcFs},
    job::{JobInfo, Monitor, MonitorError, Sample, StealReading, TickContext, Wishes},
    report::Report,
};

/// Event names this monitor emits.
pub const BUDGET_EXCEEDED: &str = "budget_exceeded";
pub const BUDGET_RECOVERED: &str = "budget_recovered";

const JOB_KEY: &str = "job";

/// Resolves `training.cgroup` (absolute, or relative to the cgroup v2 root)
/// into a directory.
pub fn training_cgroup_dir(path: &Path) -> PathBuf {
    if path.is_absolute() && path.is_dir() {
        return path.to_owned();
    }
    let rel = path.strip_prefix("/").unwrap_or(path);
    cgroup2_mount().join(rel)
}

/// Where the cgroup v2 hierarchy is mounted (the unified one on hybrid
/// hosts).
/// Where the v2 hierarchy is mounted (`/sys/fs/cgroup` when not found).
pub fn cgroup2_mount() -> PathBuf {
    ProcFs::new()
        .mountinfo()
        .ok()
        .and_then(|t| t.cgroup2().map(|m| m.mount_point.clone()))
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// Depth below the v2 root and directory of the job cgroup `id`, found among the v2
/// ancestors of its process `pid` (which may sit in a child of the job
/// cgroup, e.g. its `main` leaf). `None` when it is not one of them.
fn job_dir(pid: i32, id: u64) -> Option<(u32, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let membership = ProcFs::new().cgroup(Pid::new(pid)?).ok()?;
    let path = membership.unified()?;
    let mount = cgroup2_mount();
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    (0..=parts.len()).rev().find_map(|depth| {
        let dir = parts[..depth].iter().fold(mount.clone(), |d, c| d.join(c));
        let ino = std::fs::metadata(&dir).ok()?.ino();
        (ino == id).then_some((depth as u32, dir))
    })
}

struct Running {
    meter: StealMeter,
    window: StealWindow,
    first: StealSnapshot,
    last: StealSnapshot,
    next_progress: Instant,
    progress_from: (Instant, Option<Duration>),
}

enum State {
    NotStarted,
    Unavailable(String),
    Running(Box<Running>),
}

/// See the module docs.
pub struct StealMonitor {
    training: Option<TrainingSpec>,
    budget: f64,
    progress: bool,
    state: State,
    /// A meter loaded before the job existed ([`StealMonitor::watch_before_job`]).
    early: Option<StealMeter>,
    /// This tick's sample, taken in [`Monitor::sense`].
    sampled: Option<Result<StealSnapshot, String>>,
    /// Why the steal fields are null when there is no training to meter.
    absent: &'static str,
}

impl StealMonitor {
    /// `training`: the workload to protect (`None`: nothing to measure);
    /// `budget`: a fraction (0.05 for 5 %); `progress`: print a status line
    /// on stderr once a second.
    pub fn new(training: Option<TrainingSpec>, budget: f64, progress: bool) -> Self {
        Self {
            training,
            budget,
            progress,
            state: State::NotStarted,
            early: None,
            sampled: None,
            absent: crate::report::NO_TRAINING,
        }
    }

    /// The job's training is metered by the node agent: the report's steal
    /// fields say so instead of "no training".
    pub fn metered_by_agent(mut self) -> Self {
        self.absent = crate::report::METERED_BY_AGENT;
        self
    }

    /// Loads the probes before the job exists (so that its first instruction
    /// is metered) and watches the training for `span`: returns samples of its cumulative on-CPU time per CPU, so that
    /// the job can be placed before its first instruction. The meter is kept
    /// for the job. Nothing (and the reason at debug level, the job start
    /// says it again) when there is no training or the probes cannot load.
    pub fn watch_before_job(&mut self, span: Duration) -> Vec<(Instant, Vec<Duration>)> {
        let Some(training) = self.training.clone() else {
            return Vec::new();
        };
        let mut meter = match StealMeter::start(training) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "no early steal meter");
                return Vec::new();
            }
        };
        let sample = |meter: &mut StealMeter| {
            meter
                .read(SOLE_TRAINING)
                .ok()
                .map(|s| (Instant::now(), s.training_on_cpu_per_cpu()))
        };
        let mut samples: Vec<_> = sample(&mut meter).into_iter().collect();
        if !span.is_zero() {
            std::thread::sleep(span);
            samples.extend(sample(&mut meter));
        }
        self.early = Some(meter);
        samples
    }

    fn unavailable(&mut self, reason: String) {
        tracing::warn!("steal not measured: {reason}; the job's limits are still enforced");
        self.state = State::Unavailable(reason);
    }
}

/// What the policies need of a snapshot: the job's cumulative counters and
/// the training's per-CPU time.
fn reading_of(snap: &StealSnapshot) -> StealReading {
    let (steal, _) = steal_of(snap);
    StealReading {
        counters: crate::budget::StealCounters {
            steal: Duration::from_nanos(steal),
            training_on_cpu: Duration::from_nanos(snap.training.on_cpu_ns),
        },
        training_per_cpu: snap.training_on_cpu_per_cpu(),
    }
}

fn steal_of(s: &StealSnapshot) -> (u64, u64) {
    s.jobs
        .get(JOB_KEY)
        .map_or((0, 0), |j| (j.steal_ns, j.preemptions))
}

impl Monitor for StealMonitor {
    fn name(&self) -> &'static str {
        "steal"
    }

    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError> {
        let Some(training) = self.training.clone() else {
            self.state = State::Unavailable(self.absent.to_owned());
            return Ok(());
        };
        let Some(id) = job.v2_cgroup_id else {
            self.unavailable(format!(
                "the job cgroup {} has no cgroup v2 twin to recognise its tasks by",
                job.cgroup.display()
            ));
            return Ok(());
        };
        let started = match self.early.take() {
            Some(m) => Ok(m),
            None => StealMeter::start(training),
        };
        let mut meter = match started {
            Ok(m) => m,
            Err(e) => {
                self.unavailable(format!("the steal probes could not be loaded: {e}"));
                return Ok(());
            }
        };
        let found = job_dir(job.pid, id);
        let cgroup = JobCgroup {
            id,
            level: found.as_ref().map(|(level, _)| *level),
            dir: found.map(|(_, dir)| dir),
        };
        tracing::debug!(?cgroup, job_cgroup = %job.cgroup.display(), "metering the job's v2 cgroup");
        if let Err(e) = meter.add_job(SOLE_TRAINING, JOB_KEY, cgroup) {
            self.unavailable(format!("registering the job with the steal probes: {e}"));
            return Ok(());
        }
        let first = match meter.read(SOLE_TRAINING) {
            Ok(s) => s,
            Err(e) => {
                self.unavailable(format!("reading the steal probes: {e}"));
                return Ok(());
            }
        };
        let mut window = StealWindow::new(self.budget);
        let (steal, _) = steal_of(&first);
        window.push(first.at, steal, first.training.on_cpu_ns);
        tracing::info!(
            budget = %format!("{:.1}%", self.budget * 100.0),
            threads = first.training.threads,
            "steal meter attached"
        );
        self.state = State::Running(Box::new(Running {
            meter,
            window,
            last: first.clone(),
            first,
            next_progress: Instant::now() + Duration::from_secs(1),
            progress_from: (Instant::now(), None),
        }));
        Ok(())
    }

    /// Reads the meter into the sample (or why it could not), for this
    /// monitor's own tick and the budget loop's.
    fn sense(&mut self, sample: &mut Sample) {
        match &mut self.state {
            State::Running(run) => {
                let read = run
                    .meter
                    .read(SOLE_TRAINING)
                    .map_err(|e| format!("reading the steal probes: {e}"));
                sample.steal = Some(read.as_ref().map(reading_of).map_err(String::clone));
                self.sampled = Some(read);
            }
            State::Unavailable(reason) => sample.steal = Some(Err(reason.clone())),
            State::NotStarted => {}
        }
    }

    fn tick(&mut self, sample: &Sample, ctx: &mut TickContext<'_>) -> Result<Wishes, MonitorError> {
        let State::Running(run) = &mut self.state else {
            return Ok(Wishes::new());
        };
        let snap = match self.sampled.take() {
            Some(Ok(s)) => s,
            Some(Err(reason)) => return Err(MonitorError::new(reason)),
            None => return Ok(Wishes::new()),
        };
        let (steal, _) = steal_of(&snap);
        match run.window.push(snap.at, steal, snap.training.on_cpu_ns) {
            Some(BudgetEvent::Exceeded { fraction }) => ctx.emit(Event::new(
                BUDGET_EXCEEDED,
                json!({
                    "stolen_fraction": fraction,
                    "budget_fraction": self.budget,
                    "window_s": SHORT_WINDOW.as_secs_f64(),
                }),
            )),
            Some(BudgetEvent::Recovered { fraction, over_for }) => ctx.emit(Event::new(
                BUDGET_RECOVERED,
                json!({
                    "stolen_fraction": fraction,
                    "budget_fraction": self.budget,
                    "over_for_s": over_for.as_secs_f64(),
                }),
            )),
            None => {}
        }
        if snap.overflow.any() && !run.last.overflow.any() {
            tracing::warn!(overflow = ?snap.overflow, "the steal meter lost events: steal is a lower bound");
        }
        if self.progress && sample.now >= run.next_progress {
            let (since, cpu_then) = run.progress_from;
            let cpu_now = sample.stats.cpu_usage;
            let job_cpu = match (cpu_then, cpu_now) {
                (Some(a), Some(b)) => format!(
                    "{:.2} CPU",
                    b.saturating_sub(a).as_secs_f64()
                        / sample.now.duration_since(since).as_secs_f64().max(1e-3)
                ),
                _ => "-".to_owned(),
            };
            let pct = |f: Option<f64>| f.map_or("-".to_owned(), |f| format!("{:.2}%", f * 100.0));
            // The budget holds over the last 10 s and the whole job: what
            // is used of it is the larger of the two.
            let used = run
                .window
                .fraction_over(LONG_WINDOW)
                .into_iter()
                .chain(run.window.fraction_total())
                .reduce(f64::max);
            eprintln!(
                "[{:6.1}s] steal {} (1s) {} (10s) {} (job), used {} of budget {:.1}%{} | job {job_cpu}",
                sample.elapsed.as_secs_f64(),
                pct(run.window.fraction_over(SHORT_WINDOW)),
                pct(run.window.fraction_over(LONG_WINDOW)),
                pct(run.window.fraction_total()),
                pct(used),
                self.budget * 100.0,
                if used.is_some_and(|u| u > self.budget) {
                    " OVER"
                } else {
                    ""
                },
            );
            run.next_progress = sample.now + Duration::from_secs(1);
            run.progress_from = (sample.now, cpu_now);
        }
        run.last = snap;
        Ok(Wishes::new())
    }

    fn finish(&mut self, report: &mut Report) {
        match &mut self.state {
            State::Running(run) => {
                // A last reading, so that the report covers the whole job.
                if let Ok(snap) = run.meter.read(SOLE_TRAINING) {
                    let (steal, _) = steal_of(&snap);
                    run.window.push(snap.at, steal, snap.training.on_cpu_ns);
                    run.last = snap;
                }
                let (_, pre0) = steal_of(&run.first);
                let (_, pre1) = steal_of(&run.last);
                let wait = run
                    .last
                    .training
                    .runq_wait_ns
                    .saturating_sub(run.first.training.runq_wait_ns);
                report.stolen_from_training_s = Some(run.window.steal_ns() as f64 / 1e9);
                report.stolen_fraction = Some(run.window.fraction_total().unwrap_or(0.0));
                report.preemptions_of_training = Some(pre1.saturating_sub(pre0));
                report.training_runq_wait_s = Some(wait as f64 / 1e9);
                report.budget_fraction = Some(self.budget);
                report.over_budget_s = Some(run.window.over_budget().as_secs_f64());
                for f in crate::report::STEAL_FIELDS {
                    report.unavailable.remove(f);
                }
                // The budget loop fills it when it runs (it finishes later).
                report.unavailable(
                    "budget_used",
                    "measured only: budget use is reported by the budget loop, which did not run",
                );
            }
            State::Unavailable(reason) => {
                for f in crate::report::STEAL_FIELDS {
                    report.unavailable(f, reason.clone());
                }
            }
            State::NotStarted => {}
        }
    }
}
