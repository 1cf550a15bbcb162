//! [`BudgetMonitor`]: the budget controller plugged into the job supervisor.
//! Every control period it reads the job's steal (from a [`StealSource`], fed
//! by the steal meter), the job's CPU use and, when configured, the
//! training's progress file, steps the [`Controller`] and writes its
//! decisions to the job's cgroup. Each decision is a `budget` event and a
//! log line with its reason; once a second a `budget status` log line gives
//! the live numbers, with the budget used over the controller's horizon. At
//! the end it fills `budget_fraction`, `over_budget_s`, `budget_used` (the
//! worst 10 s window or the whole job), `training_slowdown` and
//! `slowdown_blame` (the last blame experiment's answer) in the report (null
//! with a reason when missing).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use enforcer_model::StealWindow;
use serde_json::json;

use super::{
    actuator::{CpuActuator, apply},
    controller::{Cause, Controller, ControllerConfig, Observation, Reason, StealCounters},
    placement::{Placement, PlacementConfig, PlacementDecision},
    progress::{ProgressTracker, Unavailable},
};
use crate::{
    cgroup::{CgroupError, JobCgroup, cpuset::CpuList},
    events::Event,
    job::{
        JobInfo, Monitor, MonitorError, TickContext,
        controls::{Actuator, Policy},
    },
    report::Report,
};

/// Where the job's steal comes from: cumulative counters for this job, or
/// why there are none right now.
pub trait StealSource: Send {
    /// Called once the job exists (its cgroup and first process).
    fn start(&mut self, _job: &JobInfo) -> Result<(), String> {
        Ok(())
    }
    fn counters(&mut self) -> Result<StealCounters, String>;
    /// The training's cumulative on-CPU time per CPU (index = CPU number),
    /// when the source knows it: what job placement is decided on.
    fn training_per_cpu(&mut self) -> Option<Vec<Duration>> {
        None
    }
}

/// The hand-over between the monitor that polls the steal meter and the
/// budget loop: the meter's monitor publishes each tick's counters for the
/// job when it senses (before any monitor ticks), the budget loop reads the
/// latest. One eBPF meter serves both.
#[derive(Debug, Clone, Default)]
pub struct StealFeed(Arc<Mutex<FeedSlot>>);

#[derive(Debug, Default)]
struct FeedSlot {
    counters: Option<Result<StealCounters, String>>,
    per_cpu: Option<Vec<Duration>>,
}

impl StealFeed {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes this tick's cumulative counters for the job, or why the
    /// meter has none.
    pub fn publish(&self, counters: Result<StealCounters, String>) {
        if let Ok(mut slot) = self.0.lock() {
            slot.counters = Some(counters);
        }
    }

    /// Publishes the training's cumulative on-CPU time per CPU.
    pub fn publish_per_cpu(&self, per_cpu: Vec<Duration>) {
        if let Ok(mut slot) = self.0.lock() {
            slot.per_cpu = Some(per_cpu);
        }
    }
}

impl StealSource for StealFeed {
    fn counters(&mut self) -> Result<StealCounters, String> {
        match self.0.lock() {
            Ok(slot) => slot
                .counters
                .clone()
                .unwrap_or_else(|| Err("the steal meter has published nothing yet".to_owned())),
            Err(_) => Err("the steal meter's monitor panicked".to_owned()),
        }
    }

    fn training_per_cpu(&mut self) -> Option<Vec<Duration>> {
        self.0.lock().ok()?.per_cpu.clone()
    }
}

/// The budget loop's wishes, applied by the job's one actuator (which caps
/// the quota at the user's static CPU limit: "unlimited" means back to it,
/// never above).
struct BudgetControls<'a>(&'a Actuator);

impl CpuActuator for BudgetControls<'_> {
    type Error = CgroupError;
    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError> {
        self.0.update(Policy::Budget, |w| w.quota = cores)
    }
    fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError> {
        self.0.update(Policy::Budget, |w| w.idle = Some(idle))
    }
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.0.update(Policy::Budget, |w| w.frozen = frozen)
    }
}

const STATUS_EVERY: Duration = Duration::from_secs(1);
const REPORT_WINDOW: Duration = Duration::from_secs(1);

/// The budget loop of one job.
pub struct BudgetMonitor {
    config: ControllerConfig,
    controller: Option<Controller>,
    steal: Box<dyn StealSource>,
    steal_error: Option<String>,
    progress: Option<ProgressTracker>,
    slowdown_error: Option<String>,
    slowdowns: Vec<f64>,
    /// The steal read so far: the reported 1 s fraction, the over-budget
    /// time and the whole-job fraction.
    window: StealWindow<Instant>,
    last_tick: Option<Instant>,
    last_status: Option<Instant>,
    last_cpu: Option<(Instant, Duration)>,
    decisions: u64,
    /// The largest stolen fraction over a full horizon seen so far.
    worst_horizon: Option<f64>,
    /// The answer of the last blame experiment.
    blame: Option<Cause>,
    job: String,
    /// The job's actuator, from the start.
    controls: Option<Arc<Actuator>>,
    /// Put the job's threads in SCHED_IDLE too (with the idle class).
    idle_tasks: bool,
    /// Threads already made SCHED_IDLE.
    idle_tids: std::collections::HashSet<i32>,
    /// Where the job runs; `None` when placement is off or impossible.
    placement: Option<Placement>,
    /// Place jobs at all (`place_jobs`).
    place_jobs: bool,
    /// The training's per-CPU time watched before the job started...
    history: Vec<(Instant, Vec<Duration>)>,
    /// ...and the placement it gave, applied at the first tick.
    pending_placement: Option<PlacementDecision>,
}

/// Reads the training's progress file (`training.progress_file`) for a few
/// seconds to learn its own step rate, while no job runs: call it before the
/// job starts. `None` when no training workload or no file is configured.
pub fn learn_before_job(config: &crate::config::Config) -> Option<ProgressTracker> {
    let t = &config.training;
    if t.pid.is_none() && t.cgroup.is_none() {
        return None;
    }
    let path = t.progress_file.as_ref()?;
    let progress = super::ProgressConfig::default();
    let learn = progress.baseline_min + Duration::from_millis(500);
    let mut tracker = ProgressTracker::for_file(path, progress, config.control_period.0);
    tracing::info!(
        file = %path.display(),
        seconds = learn.as_secs_f64(),
        "learning the training's step rate before the job"
    );
    let reading = tracker.learn(learn, config.control_period.0);
    match (tracker.baseline(), reading.slowdown) {
        (Some(rate), _) => tracing::info!(steps_per_s = rate, "training baseline learned"),
        (None, Err(reason)) => tracing::warn!(
            file = %path.display(),
            %reason,
            "no baseline step rate: training slowdown will be null"
        ),
        (None, Ok(_)) => {}
    }
    Some(tracker)
}

impl BudgetMonitor {
    /// The loop for a job of `enforcer run`/`attach`, from the config's
    /// budget, fed by the steal monitor through `feed`.
    pub fn for_job(
        config: &crate::config::Config,
        feed: StealFeed,
        progress: Option<ProgressTracker>,
    ) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        Self::new(
            ControllerConfig::new(config.budget.fraction(), cpus),
            Box::new(feed),
            progress,
        )
        .with_placement(config.place_jobs)
    }

    /// Whether to place the job on the CPUs the training leaves free (see
    /// [`super::placement`]); off by default for [`BudgetMonitor::new`].
    pub fn with_placement(mut self, on: bool) -> Self {
        self.place_jobs = on;
        self
    }

    pub fn new(
        config: ControllerConfig,
        steal: Box<dyn StealSource>,
        progress: Option<ProgressTracker>,
    ) -> Self {
        Self {
            window: StealWindow::new(config.budget),
            config,
            controller: None,
            steal,
            steal_error: None,
            progress,
            slowdown_error: None,
            slowdowns: Vec::new(),
            last_tick: None,
            last_status: None,
            last_cpu: None,
            decisions: 0,
            worst_horizon: None,
            blame: None,
            job: String::new(),
            controls: None,
            idle_tasks: false,
            idle_tids: std::collections::HashSet::new(),
            placement: None,
            place_jobs: false,
            history: Vec::new(),
            pending_placement: None,
        }
    }

    /// Samples of the training's cumulative per-CPU on-CPU time taken before
    /// the job started (`StealMonitor::watch_before_job`): the job is placed
    /// at its first tick instead of after a window of its own.
    pub fn with_training_history(mut self, samples: Vec<(Instant, Vec<Duration>)>) -> Self {
        self.history = samples;
        self
    }

    /// Steps the placement on the training's per-CPU time; a change is
    /// written to the job's cpuset, then the controller restarts its quota
    /// within the new CPUs. A host without a cpuset for jobs turns placement
    /// off, once, with the reason.
    /// Returns the event and how many CPUs the job has now.
    fn place(&mut self, controls: &Actuator, now: Instant) -> Option<(Event, f64)> {
        let d = match self.pending_placement.take() {
            Some(d) => d,
            None => {
                let per_cpu = self.steal.training_per_cpu()?;
                self.placement.as_mut()?.observe(&per_cpu, now)?
            }
        };
        let placement = self.placement.as_ref()?;
        let cpus = d.cpus.clone();
        if let Err(error) = controls.update(Policy::Placement, |w| w.cpus = cpus) {
            tracing::warn!(job = %self.job, %error, "the job cannot be placed on CPUs: placement off");
            self.placement = None;
            return None;
        }
        let cores = d.job_cores(placement.all());
        tracing::info!(job = %self.job, placement = %d, "budget decision");
        self.decisions += 1;
        let event = Event::new(
            "budget",
            json!({
                "action": "place",
                "message": d.to_string(),
                "cpus": d.cpus.as_ref().map(ToString::to_string),
                "previous_cpus": d.previous.as_ref().map(ToString::to_string),
                "training_cpus": d.training_cpus.to_string(),
                "training_cores": d.training_cores,
                "job_cores": cores,
            }),
        );
        Some((event, cores))
    }

    /// Why per-thread SCHED_IDLE as well as the cgroup's `cpu.idle`: the
    /// job's cgroup is idle only among its siblings inside the agent's
    /// slice; at the level where the slice meets the training the slice
    /// competes with its full weight, and a waking training thread does not
    /// preempt it at once. SCHED_IDLE threads are preempted at once by any
    /// normal thread on their CPU, whatever the hierarchy. Threads the job
    /// creates later inherit the policy; each tick picks up the rest (a
    /// thread that exited or changed meanwhile is skipped).
    fn make_tasks_idle(&mut self, cgroup: &JobCgroup) {
        let proc = crate::host::ProcFs::new();
        for pid in cgroup.pids().into_iter().filter_map(crate::host::Pid::new) {
            for tid in proc.threads(pid).into_iter().map(crate::host::Pid::as_raw) {
                if !self.idle_tids.insert(tid) {
                    continue;
                }
                // The tid belongs to the job's own cgroup.
                if let Err(error) = crate::sched::set_thread_policy(tid, libc::SCHED_IDLE, 0) {
                    tracing::debug!(tid, %error, "SCHED_IDLE for a job thread failed");
                }
            }
        }
        // Bound the memory of the set on jobs that churn threads.
        if self.idle_tids.len() > 65_536 {
            self.idle_tids.clear();
        }
    }

    fn trailing_fraction(&self) -> Option<f64> {
        let span = self.window.span(REPORT_WINDOW)?;
        if span.elapsed() < REPORT_WINDOW / 2 {
            return None;
        }
        span.last.since(*span.first).fraction()
    }
}

impl Monitor for BudgetMonitor {
    fn name(&self) -> &'static str {
        "budget"
    }

    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError> {
        self.job.clone_from(&job.name);
        // The job's own limits bound the loop: a static `--cpu` is its
        // ceiling, `--no-idle` keeps it out of the idle class.
        let mut config = self.config.clone();
        config.idle = job.limits.cpu_idle;
        if let Some(cap) = job.limits.cpu {
            config.max_cores = config.max_cores.min(cap);
            config.start_cores = config.start_cores.map(|s| s.min(cap));
        }
        self.controls = Some(job.controls.clone());
        self.idle_tasks = job.limits.cpu_idle;
        self.controller = Some(Controller::new(config));
        if self.place_jobs {
            self.placement = CpuList::online()
                .filter(|all| all.len() > 1)
                .map(|all| Placement::new(PlacementConfig::default(), all));
            if let Some(p) = self.placement.as_mut() {
                for (at, per_cpu) in std::mem::take(&mut self.history) {
                    self.pending_placement =
                        p.observe(&per_cpu, at).or(self.pending_placement.take());
                }
            }
        }
        if let Err(e) = self.steal.start(job) {
            tracing::warn!(job = %job.name, reason = %e, "no steal signal: the budget loop holds");
            self.steal_error = Some(e);
        }
        Ok(())
    }

    fn tick(&mut self, ctx: &mut TickContext<'_>) -> Result<(), MonitorError> {
        if self.idle_tasks && self.controller.is_some() {
            self.make_tasks_idle(ctx.cgroup);
        }
        let Some(controller) = self.controller.as_mut() else {
            return Ok(());
        };
        let now = ctx.now;
        let Some(controls) = self.controls.clone() else {
            return Ok(());
        };
        let capped = BudgetControls(&controls);
        if self.last_tick.is_none() {
            // The start decision is applied on the first tick: the cgroup
            // handle is only given to ticks.
            // The supervisor already put the job in (or out of) the idle
            // class from its limits: only the quota is the loop's to set.
            let d = controller.start(now);
            capped
                .set_cpu_quota(d.controls.quota.cores())
                .map_err(|e| MonitorError::new(format!("applying {d}: {e}")))?;
            tracing::info!(job = %self.job, decision = %d, "budget decision");
            ctx.emit(Event::new("budget", decision_json(&d)));
        }

        let steal = match self.steal.counters() {
            Ok(c) => {
                self.steal_error = None;
                Some(c)
            }
            Err(e) => {
                if self.steal_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(job = %self.job, reason = %e, "no steal signal: the budget loop holds");
                }
                self.steal_error = Some(e);
                None
            }
        };
        let slowdown = self.progress.as_mut().and_then(|p| {
            let r = p.poll(now, true);
            match r.slowdown {
                Ok(s) => {
                    self.slowdown_error = None;
                    self.slowdowns.push(s);
                    Some(s)
                }
                Err(u) => {
                    // Warming right after the start is normal: not an error.
                    if !matches!(u, Unavailable::Warming) {
                        self.slowdown_error = Some(u.to_string());
                    }
                    None
                }
            }
        });
        if let Some((event, cores)) = self.place(&controls, now) {
            ctx.emit(event);
            if let Some(controller) = self.controller.as_mut()
                && let Some(d) = controller.placed(now, cores)
            {
                self.decisions += 1;
                tracing::info!(job = %self.job, decision = %d, "budget decision");
                if let Err(e) = apply(&capped, &d) {
                    tracing::warn!(job = %self.job, error = %e, "applying a budget decision failed");
                }
                ctx.emit(Event::new("budget", decision_json(&d)));
            }
        }
        let Some(controller) = self.controller.as_mut() else {
            return Ok(());
        };
        let job_cpu = ctx.stats.cpu_usage;
        let obs = Observation {
            steal,
            job_cpu,
            training_slowdown: slowdown,
        };
        if let Some(d) = controller.step(obs, now) {
            self.decisions += 1;
            tracing::info!(job = %self.job, decision = %d, "budget decision");
            let applied = apply(&capped, &d);
            // A failed write (e.g. a job that just exited) is reported, and
            // the loop goes on with what it asked for.
            if let Err(e) = &applied {
                tracing::warn!(job = %self.job, error = %e, "applying a budget decision failed");
            }
            ctx.emit(Event::new("budget", decision_json(&d)));
            if let Reason::Freeze { .. } = d.reason {
                tracing::warn!(job = %self.job, "job frozen: last resort of the budget loop");
            }
            if let Some(cause) = d.reason.blame() {
                self.blame = Some(cause);
            }
        }

        if let Some(c) = steal {
            self.window.record(now, c);
        }
        let horizon = self.config.horizon;
        if let Some(span) = self.window.span(horizon)
            && span.elapsed() >= horizon
            && let Some(f) = span.last.since(*span.first).fraction()
        {
            self.worst_horizon = Some(self.worst_horizon.map_or(f, |w| w.max(f)));
        }
        let fraction = self.trailing_fraction();
        self.last_tick = Some(now);

        let cores = match (self.last_cpu, job_cpu) {
            (Some((t, a)), Some(b)) if now > t => {
                Some(b.saturating_sub(a).as_secs_f64() / now.duration_since(t).as_secs_f64())
            }
            _ => None,
        };
        if self
            .last_status
            .is_none_or(|t| now.saturating_duration_since(t) >= STATUS_EVERY)
        {
            let controls = self.controller.as_ref().map(Controller::controls);
            let used = self.controller.as_ref().and_then(Controller::budget_used);
            tracing::info!(
                job = %self.job,
                budget_used = used.map(|u| u.to_string()),
                stolen_fraction = fraction,
                training_slowdown = slowdown,
                quota_cores = controls.and_then(|c| c.quota.cores()),
                job_cpu_cores = cores,
                frozen = controls.is_some_and(|c| c.frozen),
                budget = self.config.budget,
                "budget status"
            );
            self.last_status = Some(now);
            if let Some(b) = job_cpu {
                self.last_cpu = Some((now, b));
            }
        }
        if self.last_cpu.is_none()
            && let Some(b) = job_cpu
        {
            self.last_cpu = Some((now, b));
        }
        Ok(())
    }

    fn finish(&mut self, report: &mut Report) {
        // Without a steal signal the budget was not held: the steal
        // monitor's null and reason stand.
        if !self.window.is_empty() {
            report.budget_fraction = Some(self.config.budget);
        }
        // The steal meter's own monitor fills these when it runs; the loop
        // measured the same counters.
        if let Some(total) = self.window.total() {
            if report.stolen_fraction.is_none() {
                report.stolen_fraction = total.fraction();
            }
            if report.stolen_from_training_s.is_none() {
                report.stolen_from_training_s = Some(total.steal.as_secs_f64());
            }
        }
        // The steal monitor's own over-budget time (same meter, same 1 s
        // window) wins when it filled one.
        if report.over_budget_s.is_none() {
            if self.last_tick.is_some() && self.steal_error.is_none() {
                report.over_budget_s = Some(self.window.over_budget().as_secs_f64());
            } else {
                report.unavailable(
                    "over_budget_s",
                    self.steal_error
                        .clone()
                        .unwrap_or_else(|| "the budget loop never ran".to_owned()),
                );
            }
        }
        let whole = self.window.fraction_total();
        match (self.worst_horizon, whole) {
            (None, None) => report.unavailable(
                "budget_used",
                self.steal_error
                    .clone()
                    .unwrap_or_else(|| "the budget loop never ran".to_owned()),
            ),
            (w, j) => report.budget_used = Some(w.unwrap_or(0.0).max(j.unwrap_or(0.0))),
        }
        report.slowdown_blame = self.blame.map(|c| c.as_str().to_owned());
        if self.slowdowns.is_empty() {
            report.training_slowdown = None;
            report.unavailable(
                "training_slowdown",
                match (&self.progress, &self.slowdown_error) {
                    (None, _) => "no training.progress_file configured".to_owned(),
                    (Some(_), Some(e)) => e.clone(),
                    (Some(_), None) => "the job was too short to measure a rate".to_owned(),
                },
            );
        } else {
            let mean = self.slowdowns.iter().sum::<f64>() / self.slowdowns.len() as f64;
            report.training_slowdown = Some(mean);
        }
    }
}

fn decision_json(d: &super::controller::Decision) -> serde_json::Value {
    json!({
        "action": d.reason.action(),
        "blame": d.reason.blame().map(|c| c.as_str()),
        "message": d.to_string(),
        "quota_cores": d.controls.quota.cores(),
        "previous_quota_cores": d.previous.quota.cores(),
        "idle": d.controls.idle,
        "frozen": d.controls.frozen,
        "budget": d.budget,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::cgroup::{Limits, Stats, fs::CgFs, v2::V2Job};

    /// Steal growing at a fixed fraction of each 100 ms tick.
    struct Scripted {
        fraction: f64,
        ticks: u32,
    }

    impl StealSource for Scripted {
        fn counters(&mut self) -> Result<StealCounters, String> {
            self.ticks += 1;
            let total = Duration::from_millis(100) * self.ticks;
            Ok(StealCounters {
                steal: total.mul_f64(self.fraction),
                training_on_cpu: total.mul_f64(1.0 - self.fraction),
            })
        }
    }

    fn fake_job(root: &Path) -> Arc<JobCgroup> {
        let dir = root.join("job");
        std::fs::create_dir_all(dir.join("main")).expect("fake cgroup dir");
        for f in ["cpu.max", "cpu.idle", "cpu.weight", "cgroup.freeze"] {
            std::fs::write(dir.join(f), "").expect("fake cgroup file");
        }
        Arc::new(JobCgroup::V2(V2Job::open(
            CgFs::new(vec![root.to_owned()]),
            dir.clone(),
            dir.join("main"),
        )))
    }

    fn info(started: Instant, limits: Limits, cg: &Arc<JobCgroup>) -> JobInfo {
        JobInfo {
            controls: Arc::new(Actuator::new(cg.clone(), limits.cpu)),
            name: "j".into(),
            cgroup: "job".into(),
            cgroup_mode: "unified".into(),
            v2_cgroup_id: None,
            pid: 1,
            limits,
            timeout: Duration::from_secs(60),
            control_period: Duration::from_millis(100),
            started,
        }
    }

    fn run_ticks(m: &mut BudgetMonitor, cg: &JobCgroup, started: Instant, n: u32) -> Vec<Event> {
        let mut events = Vec::new();
        for i in 1..=n {
            let now = started + Duration::from_millis(100) * i;
            let stats = Stats {
                cpu_usage: Some(Duration::from_millis(100) * i),
                ..Stats::default()
            };
            let mut ctx = TickContext::new(cg, &stats, now - started, now, &mut events);
            m.tick(&mut ctx).expect("tick");
        }
        events
    }

    #[test]
    fn over_budget_steal_tightens_the_job_cgroup_and_is_reported() {
        let d = tempfile::tempdir().expect("tempdir");
        let cg = fake_job(d.path());
        let started = Instant::now();
        let mut m = BudgetMonitor::new(
            ControllerConfig::new(0.05, 2.0),
            Box::new(Scripted {
                fraction: 0.3,
                ticks: 0,
            }),
            None,
        );
        m.start(&info(
            started,
            Limits {
                cpu_idle: true,
                ..Limits::default()
            },
            &cg,
        ))
        .expect("start");
        let events = run_ticks(&mut m, &cg, started, 10);
        let actions: Vec<&str> = events
            .iter()
            .filter(|e| e.event == "budget")
            .filter_map(|e| e.detail["action"].as_str())
            .collect();
        assert_eq!(actions.first(), Some(&"start"));
        assert!(actions.contains(&"tighten"), "{actions:?}");
        let max = std::fs::read_to_string(d.path().join("job/cpu.max")).expect("cpu.max written");
        let quota: f64 = max
            .split_whitespace()
            .next()
            .and_then(|q| q.parse().ok())
            .expect("a numeric quota");
        assert!(
            quota < 100_000.0,
            "cpu.max {max:?}: not tightened below 1 core"
        );

        let mut report = Report::new("j", &[], std::time::SystemTime::now());
        m.finish(&mut report);
        assert_eq!(report.budget_fraction, Some(0.05));
        assert!(report.over_budget_s.is_some_and(|s| s > 0.0));
        // One second of 30 %: shorter than the horizon, the whole job counts.
        let used = report.budget_used.expect("budget used");
        assert!((used - 0.3).abs() < 0.01, "budget used {used}");
        assert_eq!(report.slowdown_blame, None);
        assert_eq!(report.training_slowdown, None);
        assert!(
            report.unavailable["training_slowdown"].contains("progress_file"),
            "{:?}",
            report.unavailable
        );
    }

    #[test]
    fn a_static_cpu_limit_caps_the_loop() {
        let d = tempfile::tempdir().expect("tempdir");
        let cg = fake_job(d.path());
        let started = Instant::now();
        let mut m = BudgetMonitor::new(
            ControllerConfig::new(0.05, 2.0),
            Box::new(Scripted {
                fraction: 0.0,
                ticks: 0,
            }),
            None,
        );
        m.start(&info(
            started,
            Limits {
                cpu: Some(0.5),
                cpu_idle: true,
                ..Limits::default()
            },
            &cg,
        ))
        .expect("start");
        // As the session does when it creates the job.
        cg.set_cpu_quota(Some(0.5)).expect("static limit");
        // Far under budget for long enough to relax all the way.
        run_ticks(&mut m, &cg, started, 100);
        let max = std::fs::read_to_string(d.path().join("job/cpu.max")).expect("cpu.max written");
        assert!(
            max.starts_with("50000 "),
            "cpu.max {max:?}: above the static 0.5 CPU"
        );
    }

    #[test]
    fn a_blame_answer_is_a_budget_event_with_its_cause() {
        use super::super::controller::{CpuControls, Decision, Quota};
        let controls = CpuControls {
            idle: true,
            quota: Quota::Cores(0.5),
            frozen: false,
        };
        let d = Decision {
            controls,
            previous: CpuControls {
                frozen: true,
                quota: Quota::Unlimited,
                ..controls
            },
            reason: Reason::TheJob {
                value: 0.08,
                paused: 0.01,
                heed_for: Duration::from_secs(30),
            },
            budget: 0.05,
        };
        let v = decision_json(&d);
        assert_eq!(v["action"], "slowdown_from_job");
        assert_eq!(v["blame"], "job");
        assert_eq!(v["quota_cores"], 0.5);
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("the job is the cause")),
            "{v}"
        );
    }

    #[test]
    fn without_a_steal_signal_the_loop_holds_and_says_why() {
        struct Broken;
        impl StealSource for Broken {
            fn counters(&mut self) -> Result<StealCounters, String> {
                Err("meter not loaded".into())
            }
        }
        let d = tempfile::tempdir().expect("tempdir");
        let cg = fake_job(d.path());
        let started = Instant::now();
        let mut m = BudgetMonitor::new(ControllerConfig::new(0.05, 2.0), Box::new(Broken), None);
        m.start(&info(started, Limits::default(), &cg))
            .expect("start");
        let events = run_ticks(&mut m, &cg, started, 20);
        assert_eq!(events.len(), 1, "only the start decision");
        let mut report = Report::new("j", &[], std::time::SystemTime::now());
        m.finish(&mut report);
        assert_eq!(report.over_budget_s, None);
        assert_eq!(report.unavailable["over_budget_s"], "meter not loaded");
    }
}
