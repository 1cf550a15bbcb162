//! [`NodeBudget`]: the agent's budgets, one per protected training, each
//! shared by every job that protects that training.
//!
//! A training's steal is the sum of its jobs' steal. One [`Controller`] per
//! training holds that sum under the training's budget and decides how many
//! cores the training allows its jobs together; [`divide`] then splits those
//! cores among the jobs, max-min fair:
//! - every job is entitled to an equal share, re-divided whenever a job
//!   joins or leaves;
//! - a job that used less than its share in the last period is given what it
//!   used plus headroom ([`HEADROOM`], [`HEADROOM_CORES`]) so that it can
//!   show that it wants more, and the rest of its share goes to the jobs that
//!   used theirs (water filling);
//! - when every job is given what it wants, what is left is added equally
//!   to all, so the shares always add up to the training's quota.
//!
//! A freeze is the training's: every job of a training is frozen together.
//! The idle class is left to each job's own limits (the agent hands a job
//! only its quota and freeze). Two trainings never share anything: separate
//! controllers, counters and jobs.
//!
//! Pure: readings in (cumulative counters, timestamps), per-job wishes out;
//! the agent reads the meter and the job cgroups and hands each wish to the
//! job's actuator.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use enforcer_model::{BudgetEvent, LONG_WINDOW, SHORT_WINDOW, StealWindow};
use serde::Serialize;

use super::{
    controller::{Controller, ControllerConfig, CpuControls, Decision, Observation, Phase},
    progress::ProgressTracker,
};

/// A job that used less than its share is given `HEADROOM ×` its use...
pub const HEADROOM: f64 = 1.25;
/// ...plus this many cores.
pub const HEADROOM_CORES: f64 = 0.05;
/// The smallest quota a job is given, in cores: a job always progresses,
/// even when a training's floor is split among many jobs.
pub const MIN_JOB_CORES: f64 = 0.01;

/// A protected training, by the name the agent gave it.
pub type TrainingId = String;

/// Refusals of [`NodeBudget`]: each names the training or job at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NodeBudgetError {
    #[error("training {0:?} is already protected")]
    TrainingExists(TrainingId),
    #[error("no protected training {0:?}")]
    NoTraining(TrainingId),
    #[error("job {job:?} already protects training {training:?}")]
    JobExists { job: String, training: TrainingId },
    #[error("budget {0} is outside (0, 1): a fraction of the training's CPU time")]
    Budget(f64),
}

/// What one job's counters were at a tick, cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobReading {
    /// Training run-queue wait while the job ran, since the job was added
    /// to the meter.
    pub steal: Duration,
    /// CPU time of the job's cgroup; `None` when unreadable.
    pub cpu: Option<Duration>,
}

/// What one training's counters were at a tick, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrainingReading {
    /// On-CPU time of the training's threads.
    pub on_cpu: Duration,
    /// Its jobs; one missing here is taken as "no change".
    pub jobs: BTreeMap<String, JobReading>,
}

impl TrainingReading {
    /// The reading of a training from its meter's poll, with each job's
    /// CPU time from `cpu_of` (its cgroup's usage).
    pub fn from_snapshot(
        snapshot: &crate::probe::steal::StealSnapshot,
        cpu_of: impl Fn(&str) -> Option<Duration>,
    ) -> Self {
        Self {
            on_cpu: Duration::from_nanos(snapshot.training.on_cpu_ns),
            jobs: snapshot
                .jobs
                .iter()
                .map(|(key, c)| {
                    let reading = JobReading {
                        steal: Duration::from_nanos(c.steal_ns),
                        cpu: cpu_of(key),
                    };
                    (key.clone(), reading)
                })
                .collect(),
        }
    }
}

/// The controls a training's budget wants on one of its jobs, for that
/// job's actuator (its `Budget` policy).
#[derive(Debug, Clone, PartialEq)]
pub struct JobWish {
    pub job: String,
    pub training: TrainingId,
    /// Quota in cores; `None`: no limit from the budget.
    pub quota: Option<f64>,
    pub idle: bool,
    pub frozen: bool,
}

/// A change of a training's controls, for the event stream and the log.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingDecision {
    pub training: TrainingId,
    pub decision: Decision,
}

/// A training's stolen fraction (all its jobs together) crossed its budget.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingEvent {
    pub training: TrainingId,
    pub event: BudgetEvent,
    /// The jobs that protect it now (each is told).
    pub jobs: Vec<String>,
}

/// The result of one tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tick {
    /// Every job's wish (the actuator writes only what changed).
    pub wishes: Vec<JobWish>,
    pub decisions: Vec<TrainingDecision>,
    pub events: Vec<TrainingEvent>,
}

/// One job of a training, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobShareStatus {
    pub job: String,
    /// Its quota in cores; `None`: unlimited.
    pub share_cores: Option<f64>,
    /// Cores it used over the last period; `None` before two readings.
    pub used_cores: Option<f64>,
    /// Steal charged to it since it joined, seconds.
    pub steal_s: f64,
}

/// One protected training, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingStatus {
    pub training: TrainingId,
    /// The budget, a fraction.
    pub budget: f64,
    /// Stolen fraction (all its jobs together) over the last
    /// [`LONG_WINDOW`]; `None` before two readings.
    pub used: Option<f64>,
    /// ...over the last [`SHORT_WINDOW`].
    pub used_recent: Option<f64>,
    /// Time the recent fraction spent over the budget, seconds.
    pub over_budget_s: f64,
    /// True slowdown from its progress file, when it has one and it is
    /// known.
    pub slowdown: Option<f64>,
    /// Cores the training allows its jobs together; `None`: unlimited.
    pub quota_cores: Option<f64>,
    pub frozen: bool,
    pub phase: &'static str,
    pub jobs: Vec<JobShareStatus>,
}

#[derive(Debug, Default)]
struct JobState {
    /// The last reading taken into the sums (deltas are added from it).
    last: Option<(Instant, JobReading)>,
    /// Cores used over the last period.
    used_cores: Option<f64>,
    /// Steal since the job joined.
    steal: Duration,
    share: Option<f64>,
    /// The training's time over budget at the job's first reading.
    over_budget_at_join: Option<Duration>,
    /// The training's largest stolen fraction over `LONG_WINDOW` (all its
    /// jobs together) seen while the job was in it.
    worst_used: Option<f64>,
    /// The job's own steal against the training's on-CPU time since its
    /// first reading: its stolen fraction over `LONG_WINDOW` and over its
    /// whole time in the budget, as the model defines it (the training's
    /// window, not this one, raises the budget events).
    window: Option<StealWindow<Instant>>,
}

/// A job's steal figures for its report, from the budget it shared.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStealFigures {
    /// Steal charged to the job while it was metered.
    pub steal: Duration,
    /// That steal over the training's time meanwhile (its on-CPU time and
    /// that steal); `None` before two readings.
    pub stolen_fraction: Option<f64>,
    /// The job's stolen fraction over the last [`LONG_WINDOW`]; `None`
    /// before two readings.
    pub stolen_fraction_window: Option<f64>,
    /// The training's budget, a fraction.
    pub budget: f64,
    /// The larger of the training's worst stolen fraction over 10 s (all
    /// its jobs together) while the job ran and the job's own fraction.
    pub budget_used: Option<f64>,
    /// Time the training's stolen fraction was over its budget while the
    /// job ran.
    pub over_budget: Duration,
}

/// The budget of one protected training.
#[derive(Debug)]
struct TrainingBudget {
    controller: Controller,
    progress: Option<ProgressTracker>,
    jobs: BTreeMap<String, JobState>,
    /// Steal of all its jobs, summed from per-job deltas so that a job that
    /// joins or leaves never makes the sum jump.
    steal: Duration,
    /// CPU time of all its jobs, summed the same way.
    jobs_cpu: Duration,
    window: StealWindow<Instant>,
    slowdown: Option<f64>,
    started: bool,
}

impl TrainingBudget {
    fn step(&mut self, id: &str, now: Instant, reading: Option<&TrainingReading>) -> Tick {
        let mut tick = Tick::default();
        if !self.started {
            self.started = true;
            tick.decisions.push(TrainingDecision {
                training: id.to_owned(),
                decision: self.controller.start(now),
            });
        }
        let job_running = !self.jobs.is_empty();
        let (slowdown, paused_slowdown) = match self.progress.as_mut() {
            Some(p) => {
                let reading = p.poll(now, job_running);
                (reading.slowdown.ok(), reading.paused_slowdown)
            }
            None => (None, None),
        };
        self.slowdown = slowdown;
        if let Some(reading) = reading {
            self.sum(now, reading);
            let counters = enforcer_model::StealCounters {
                steal: self.steal,
                training_on_cpu: reading.on_cpu,
            };
            if let Some(event) = self.window.record(now, counters) {
                tick.events.push(TrainingEvent {
                    training: id.to_owned(),
                    event,
                    jobs: self.jobs.keys().cloned().collect(),
                });
            }
            if let Some(used) = self.window.fraction_over(LONG_WINDOW) {
                for job in self.jobs.values_mut() {
                    job.worst_used = Some(job.worst_used.map_or(used, |w| w.max(used)));
                }
            }
            // No job, no one to control: the controller waits for the next
            // one with the quota it had found.
            if job_running {
                let obs = Observation {
                    steal: Some(counters),
                    job_cpu: Some(self.jobs_cpu),
                    training_slowdown: self.slowdown,
                    paused_slowdown,
                };
                if let Some(decision) = self.controller.step(obs, now) {
                    if let Some(p) = self.progress.as_mut() {
                        p.follow_experiment(&decision.reason, now, id);
                    }
                    tick.decisions.push(TrainingDecision {
                        training: id.to_owned(),
                        decision,
                    });
                }
            }
        }
        self.divide();
        tick.wishes = self.wishes(id);
        tick
    }

    /// Adds each job's steal and CPU since its last reading to the sums.
    fn sum(&mut self, now: Instant, reading: &TrainingReading) {
        for (key, job) in &mut self.jobs {
            let Some(r) = reading.jobs.get(key).copied() else {
                continue;
            };
            job.over_budget_at_join
                .get_or_insert_with(|| self.window.over_budget());
            if let Some((at, last)) = job.last {
                let steal = r.steal.saturating_sub(last.steal);
                self.steal += steal;
                job.steal += steal;
                if let (Some(cpu), Some(last_cpu)) = (r.cpu, last.cpu) {
                    let used = cpu.saturating_sub(last_cpu);
                    self.jobs_cpu += used;
                    let elapsed = now.saturating_duration_since(at);
                    job.used_cores = enforcer_model::counters::cores(used, elapsed);
                }
            }
            job.last = Some((now, r));
            let budget = self.window.budget();
            job.window
                .get_or_insert_with(|| StealWindow::new(budget))
                .record(
                    now,
                    enforcer_model::StealCounters {
                        steal: job.steal,
                        training_on_cpu: reading.on_cpu,
                    },
                );
        }
    }

    /// Splits the training's quota among its jobs (see the module doc).
    fn divide(&mut self) {
        let total = self.controller.controls().quota.cores();
        let floor = self.controller.config().floor_cores;
        let demands: Vec<Option<f64>> = self
            .jobs
            .values()
            .map(|j| j.used_cores.map(|u| u * HEADROOM + HEADROOM_CORES))
            .collect();
        let shares = match total {
            None => vec![None; demands.len()],
            Some(total) => divide(total, floor, &demands)
                .into_iter()
                .map(Some)
                .collect(),
        };
        for (job, share) in self.jobs.values_mut().zip(shares) {
            job.share = share;
        }
    }

    fn wishes(&self, id: &str) -> Vec<JobWish> {
        let controls = self.controller.controls();
        self.jobs
            .iter()
            .map(|(key, job)| JobWish {
                job: key.clone(),
                training: id.to_owned(),
                quota: job.share,
                idle: controls.idle,
                frozen: controls.frozen,
            })
            .collect()
    }

    fn status(&self, id: &str) -> TrainingStatus {
        let CpuControls { quota, frozen, .. } = self.controller.controls();
        TrainingStatus {
            training: id.to_owned(),
            budget: self.window.budget(),
            used: self.window.fraction_over(LONG_WINDOW),
            used_recent: self.window.fraction_over(SHORT_WINDOW),
            over_budget_s: self.window.over_budget().as_secs_f64(),
            slowdown: self.slowdown,
            quota_cores: quota.cores(),
            frozen,
            phase: phase_name(self.controller.phase()),
            jobs: self
                .jobs
                .iter()
                .map(|(key, j)| JobShareStatus {
                    job: key.clone(),
                    share_cores: j.share,
                    used_cores: j.used_cores,
                    steal_s: j.steal.as_secs_f64(),
                })
                .collect(),
        }
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Regulating => "regulating",
        Phase::Overspending { .. } => "overspending",
        Phase::Experimenting { .. } => "experimenting",
        Phase::Frozen { .. } => "frozen",
    }
}

/// Splits `total` cores among jobs whose demands (cores they would use;
/// `None`: unknown, as much as they may) are given, max-min fair: jobs
/// that want less than an equal share get what they want, the others split
/// the rest equally; what nobody wants is added equally to all. No share is
/// below `floor / n` nor [`MIN_JOB_CORES`] (then the sum may exceed
/// `total`, by at most `n × MIN_JOB_CORES`).
pub fn divide(total: f64, floor: f64, demands: &[Option<f64>]) -> Vec<f64> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    let want = |i: usize| demands[i].unwrap_or(f64::INFINITY).max(0.0);
    order.sort_by(|&a, &b| want(a).total_cmp(&want(b)));
    let mut shares = vec![0.0; n];
    let mut left = total.max(0.0);
    for (k, &i) in order.iter().enumerate() {
        let give = want(i).min(left / (n - k) as f64);
        shares[i] = give;
        left -= give;
    }
    let min = (floor / n as f64).max(MIN_JOB_CORES);
    for share in &mut shares {
        *share = (*share + left / n as f64).max(min);
    }
    shares
}

/// The budgets of every protected training on the node.
#[derive(Debug, Default)]
pub struct NodeBudget {
    trainings: BTreeMap<TrainingId, TrainingBudget>,
    /// Which training each job protects.
    jobs: BTreeMap<String, TrainingId>,
}

impl NodeBudget {
    pub fn new() -> Self {
        Self::default()
    }

    /// Protects a training with a budget of `config.budget` and, when it
    /// has one, its progress file's slowdown.
    pub fn register_training(
        &mut self,
        id: &str,
        config: ControllerConfig,
        progress: Option<ProgressTracker>,
    ) -> Result<(), NodeBudgetError> {
        if self.trainings.contains_key(id) {
            return Err(NodeBudgetError::TrainingExists(id.to_owned()));
        }
        if !(config.budget > 0.0 && config.budget < 1.0) {
            return Err(NodeBudgetError::Budget(config.budget));
        }
        // The agent hands jobs only their quota and freeze, so the node's
        // loop never lifts them out of the idle class.
        let config = ControllerConfig {
            lift_after: None,
            ..config
        };
        let budget = TrainingBudget {
            window: StealWindow::new(config.budget),
            controller: Controller::new(config),
            progress,
            jobs: BTreeMap::new(),
            steal: Duration::ZERO,
            jobs_cpu: Duration::ZERO,
            slowdown: None,
            started: false,
        };
        self.trainings.insert(id.to_owned(), budget);
        Ok(())
    }

    /// Stops protecting a training; returns the jobs that protected it (no
    /// longer under any budget).
    pub fn unregister_training(&mut self, id: &str) -> Result<Vec<String>, NodeBudgetError> {
        let training = self
            .trainings
            .remove(id)
            .ok_or_else(|| NodeBudgetError::NoTraining(id.to_owned()))?;
        let jobs: Vec<String> = training.jobs.into_keys().collect();
        for job in &jobs {
            self.jobs.remove(job);
        }
        Ok(jobs)
    }

    /// Puts `job` under `training`'s budget; the shares are re-divided at
    /// the next tick. It gets an equal share until its use is known.
    pub fn add_job(&mut self, training: &str, job: &str) -> Result<(), NodeBudgetError> {
        if let Some(t) = self.jobs.get(job) {
            return Err(NodeBudgetError::JobExists {
                job: job.to_owned(),
                training: t.clone(),
            });
        }
        let t = self
            .trainings
            .get_mut(training)
            .ok_or_else(|| NodeBudgetError::NoTraining(training.to_owned()))?;
        t.jobs.insert(job.to_owned(), JobState::default());
        self.jobs.insert(job.to_owned(), training.to_owned());
        Ok(())
    }

    /// Takes `job` out of its training's budget (its share goes to the
    /// others at the next tick). Returns the training it protected.
    pub fn remove_job(&mut self, job: &str) -> Option<TrainingId> {
        let training = self.jobs.remove(job)?;
        if let Some(t) = self.trainings.get_mut(&training) {
            t.jobs.remove(job);
        }
        Some(training)
    }

    /// The steal figures of `job` as of the last tick, for its report.
    pub fn job_figures(&self, job: &str) -> Option<JobStealFigures> {
        let training = self.trainings.get(self.jobs.get(job)?)?;
        let state = training.jobs.get(job)?;
        let stolen_fraction = state.window.as_ref().and_then(StealWindow::fraction_total);
        let budget_used = match (state.worst_used, stolen_fraction) {
            (None, None) => None,
            (w, j) => Some(w.unwrap_or(0.0).max(j.unwrap_or(0.0))),
        };
        let over_budget = training
            .window
            .over_budget()
            .saturating_sub(state.over_budget_at_join.unwrap_or_default());
        Some(JobStealFigures {
            steal: state.steal,
            stolen_fraction,
            stolen_fraction_window: state
                .window
                .as_ref()
                .and_then(|w| w.fraction_over(LONG_WINDOW)),
            budget: training.window.budget(),
            budget_used,
            over_budget,
        })
    }

    /// The training `job` protects.
    pub fn training_of(&self, job: &str) -> Option<&str> {
        self.jobs.get(job).map(String::as_str)
    }

    /// Whether `id` is a protected training.
    pub fn has_training(&self, id: &str) -> bool {
        self.trainings.contains_key(id)
    }

    /// How many jobs protect training `id` now.
    pub fn job_count(&self, id: &str) -> usize {
        self.trainings.get(id).map_or(0, |t| t.jobs.len())
    }

    /// One control period: each training's loop steps on its reading (a
    /// training without one holds its controls) and divides its quota.
    pub fn tick(&mut self, now: Instant, readings: &BTreeMap<TrainingId, TrainingReading>) -> Tick {
        let mut out = Tick::default();
        for (id, training) in &mut self.trainings {
            let tick = training.step(id, now, readings.get(id));
            out.wishes.extend(tick.wishes);
            out.decisions.extend(tick.decisions);
            out.events.extend(tick.events);
        }
        out
    }

    /// Every protected training: budget, use, slowdown, jobs and shares.
    pub fn status(&self) -> Vec<TrainingStatus> {
        self.trainings.iter().map(|(id, t)| t.status(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(budget: f64) -> ControllerConfig {
        ControllerConfig::new(budget, 2.0)
    }

    fn sum(shares: &[f64]) -> f64 {
        shares.iter().sum()
    }

    #[test]
    fn equal_shares_when_every_job_wants_more() {
        let s = divide(1.0, 0.1, &[None, None]);
        assert_eq!(s, vec![0.5, 0.5]);
        let s = divide(0.9, 0.1, &[Some(5.0), Some(5.0), None]);
        assert!(s.iter().all(|&x| (x - 0.3).abs() < 1e-9), "{s:?}");
    }

    #[test]
    fn a_job_that_uses_less_leaves_the_rest_to_the_others() {
        let s = divide(1.0, 0.1, &[Some(0.2), None]);
        assert!(
            (s[0] - 0.2).abs() < 1e-9 && (s[1] - 0.8).abs() < 1e-9,
            "{s:?}"
        );
        let s = divide(1.2, 0.1, &[Some(0.1), Some(0.5), None]);
        assert!((s[0] - 0.1).abs() < 1e-9, "{s:?}");
        assert!((s[1] - 0.5).abs() < 1e-9, "{s:?}");
        assert!((s[2] - 0.6).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn what_nobody_wants_is_shared_by_all() {
        let s = divide(1.0, 0.1, &[Some(0.1), Some(0.3)]);
        assert!(
            (s[0] - 0.4).abs() < 1e-9 && (s[1] - 0.6).abs() < 1e-9,
            "{s:?}"
        );
        assert!((sum(&s) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn shares_never_go_below_the_minimum() {
        let s = divide(0.1, 0.1, &[None; 20]);
        assert!(s.iter().all(|&x| x >= MIN_JOB_CORES), "{s:?}");
    }

    /// Scripted counters for one training: each job steals `steal_rate` of
    /// wall time while it runs its full share, the training runs the rest of
    /// one core.
    struct Script {
        at: Instant,
        on_cpu: Duration,
        jobs: BTreeMap<String, JobReading>,
    }

    impl Script {
        fn new(at: Instant) -> Self {
            Self {
                at,
                on_cpu: Duration::ZERO,
                jobs: BTreeMap::new(),
            }
        }

        /// Advances by `dt`: each job in `steal` steals its given fraction
        /// of `dt` from the training and uses `cpu` of `dt` (cores).
        fn advance(&mut self, dt: Duration, steal: &[(&str, f64, f64)]) -> TrainingReading {
            self.at += dt;
            let mut stolen = Duration::ZERO;
            for &(job, fraction, cpu) in steal {
                let j = self.jobs.entry(job.to_owned()).or_default();
                j.steal += dt.mul_f64(fraction);
                j.cpu = Some(j.cpu.unwrap_or_default() + dt.mul_f64(cpu));
                stolen += dt.mul_f64(fraction);
            }
            self.on_cpu += dt.saturating_sub(stolen);
            TrainingReading {
                on_cpu: self.on_cpu,
                jobs: self.jobs.clone(),
            }
        }
    }

    fn readings(id: &str, r: TrainingReading) -> BTreeMap<TrainingId, TrainingReading> {
        BTreeMap::from([(id.to_owned(), r)])
    }

    fn quota_of(tick: &Tick, job: &str) -> Option<f64> {
        tick.wishes
            .iter()
            .find(|w| w.job == job)
            .and_then(|w| w.quota)
    }

    /// Each job steals in proportion to the quota it has (as on one shared
    /// CPU: the more it may run, the more the training waits).
    fn run(
        node: &mut NodeBudget,
        script: &mut Script,
        id: &str,
        jobs: &[&str],
        last: &mut Tick,
        ticks: usize,
    ) {
        let dt = Duration::from_millis(100);
        for _ in 0..ticks {
            let plan: Vec<(&str, f64, f64)> = jobs
                .iter()
                .map(|&j| {
                    let q = quota_of(last, j).unwrap_or(2.0).min(1.0);
                    (j, 0.2 * q, q)
                })
                .collect();
            let r = script.advance(dt, &plan);
            *last = node.tick(script.at, &readings(id, r));
        }
    }

    #[test]
    fn two_jobs_one_budget_hold_the_combined_steal() {
        let mut node = NodeBudget::new();
        node.register_training("t", config(0.05), None).unwrap();
        node.add_job("t", "a").unwrap();
        node.add_job("t", "b").unwrap();
        let start = Instant::now();
        let mut script = Script::new(start);
        let mut last = node.tick(start, &BTreeMap::new());
        assert_eq!(last.wishes.len(), 2);
        assert_eq!(
            quota_of(&last, "a"),
            quota_of(&last, "b"),
            "equal shares at start"
        );
        run(&mut node, &mut script, "t", &["a", "b"], &mut last, 400);
        let status = &node.status()[0];
        assert_eq!(status.jobs.len(), 2);
        let used = status.used.unwrap();
        // Each job alone would take 0.2 × its quota; together they are
        // held under the one budget (the controller's dead band sits under
        // it).
        assert!(used <= 0.05 * 1.1, "combined steal {used} over budget 0.05");
        let (a, b) = (quota_of(&last, "a").unwrap(), quota_of(&last, "b").unwrap());
        assert!(
            (a - b).abs() < 1e-9,
            "equal jobs get equal shares: {a} vs {b}"
        );
        let total = status.quota_cores.unwrap();
        assert!(
            (a + b - total).abs() < 0.03,
            "shares {a}+{b} add up to {total}"
        );
    }

    #[test]
    fn every_job_of_a_training_is_told_when_its_budget_is_exceeded() {
        let mut node = NodeBudget::new();
        node.register_training("t", config(0.05), None).unwrap();
        node.add_job("t", "a").unwrap();
        node.add_job("t", "b").unwrap();
        let start = Instant::now();
        let mut script = Script::new(start);
        node.tick(start, &BTreeMap::new());
        let mut events = Vec::new();
        for _ in 0..5 {
            let plan = [("a", 0.2, 1.0), ("b", 0.2, 1.0)];
            let r = script.advance(Duration::from_millis(100), &plan);
            events.extend(node.tick(script.at, &readings("t", r)).events);
        }
        assert!(
            matches!(
                &events[..],
                [TrainingEvent { event: BudgetEvent::Exceeded { .. }, jobs, .. }] if jobs.len() == 2
            ),
            "one exceeded event for the training, naming both jobs: {events:?}"
        );
    }

    #[test]
    fn a_joining_job_splits_the_quota_and_a_leaving_one_returns_it() {
        let mut node = NodeBudget::new();
        node.register_training("t", config(0.05), None).unwrap();
        node.add_job("t", "a").unwrap();
        let start = Instant::now();
        let mut script = Script::new(start);
        let mut last = node.tick(start, &BTreeMap::new());
        run(&mut node, &mut script, "t", &["a"], &mut last, 100);
        let alone = quota_of(&last, "a").unwrap();
        let total = node.status()[0].quota_cores.unwrap();
        assert!(
            (alone - total).abs() < 1e-9,
            "a lone job has the whole quota"
        );

        node.add_job("t", "b").unwrap();
        let r = script.advance(Duration::from_millis(100), &[("a", 0.2 * alone, alone)]);
        last = node.tick(script.at, &readings("t", r));
        let total = node.status()[0].quota_cores.unwrap();
        let (a, b) = (quota_of(&last, "a").unwrap(), quota_of(&last, "b").unwrap());
        assert!(
            (a - total / 2.0).abs() < 1e-9 && (b - total / 2.0).abs() < 1e-9,
            "re-divided on join: {a} {b} of {total}"
        );

        assert_eq!(node.remove_job("b").as_deref(), Some("t"));
        let r = script.advance(Duration::from_millis(100), &[("a", 0.2 * a, a)]);
        last = node.tick(script.at, &readings("t", r));
        assert_eq!(last.wishes.len(), 1);
        let total = node.status()[0].quota_cores.unwrap();
        assert!(
            (quota_of(&last, "a").unwrap() - total).abs() < 1e-9,
            "the leaving job's share returns"
        );
    }

    #[test]
    fn a_job_joining_late_does_not_count_its_earlier_steal() {
        let mut node = NodeBudget::new();
        node.register_training("t", config(0.05), None).unwrap();
        node.add_job("t", "a").unwrap();
        let start = Instant::now();
        let mut script = Script::new(start);
        // b's meter counters already hold 10 s of steal when it joins.
        script.jobs.insert(
            "b".into(),
            JobReading {
                steal: Duration::from_secs(10),
                cpu: Some(Duration::from_secs(10)),
            },
        );
        let r = script.advance(Duration::from_millis(100), &[("a", 0.0, 0.1)]);
        node.tick(script.at, &readings("t", r));
        node.add_job("t", "b").unwrap();
        for _ in 0..3 {
            let r = script.advance(Duration::from_millis(100), &[("a", 0.0, 0.1)]);
            node.tick(script.at, &readings("t", r));
        }
        let status = &node.status()[0];
        assert_eq!(status.used, Some(0.0));
        assert!(status.jobs.iter().all(|j| j.steal_s == 0.0), "{status:?}");
    }

    #[test]
    fn two_trainings_have_independent_budgets() {
        let mut node = NodeBudget::new();
        node.register_training("busy", config(0.05), None).unwrap();
        node.register_training("quiet", config(0.05), None).unwrap();
        node.add_job("busy", "a").unwrap();
        node.add_job("quiet", "b").unwrap();
        let start = Instant::now();
        let (mut busy, mut quiet) = (Script::new(start), Script::new(start));
        let mut last = node.tick(start, &BTreeMap::new());
        for _ in 0..100 {
            let qa = quota_of(&last, "a").unwrap_or(2.0).min(1.0);
            let qb = quota_of(&last, "b").unwrap_or(2.0).min(1.0);
            let dt = Duration::from_millis(100);
            let mut r = BTreeMap::new();
            r.insert("busy".to_owned(), busy.advance(dt, &[("a", 0.3 * qa, qa)]));
            r.insert("quiet".to_owned(), quiet.advance(dt, &[("b", 0.0, qb)]));
            last = node.tick(busy.at, &r);
        }
        let status = node.status();
        let by = |id: &str| status.iter().find(|s| s.training == id).unwrap().clone();
        let (busy, quiet) = (by("busy"), by("quiet"));
        assert!(busy.quota_cores.unwrap_or(f64::INFINITY) < 1.0, "{busy:?}");
        assert!(
            quiet.quota_cores.is_none_or(|q| q >= 1.0),
            "the quiet training's job is not held back by the busy one's steal: {quiet:?}"
        );
        assert_eq!(quiet.used, Some(0.0));
        assert_eq!(busy.jobs.len(), 1);
        assert_eq!(quiet.jobs[0].job, "b");
    }

    #[test]
    fn a_jobs_figures_are_its_own_steal_over_its_trainings_cpu_while_it_ran() {
        let mut node = NodeBudget::new();
        node.register_training("t", config(0.05), None).unwrap();
        node.add_job("t", "a").unwrap();
        let mut script = Script::new(Instant::now());
        let dt = Duration::from_millis(100);
        // Steal before the job's first reading is not its own.
        node.tick(
            script.at,
            &readings("t", script.advance(dt, &[("a", 0.5, 1.0)])),
        );
        for _ in 0..50 {
            let r = script.advance(dt, &[("a", 0.02, 1.0)]);
            node.tick(script.at, &readings("t", r));
        }
        let f = node.job_figures("a").expect("figures of a metered job");
        let fraction = f.stolen_fraction.expect("the training ran");
        assert!((fraction - 0.02).abs() < 1e-6, "{f:?}");
        assert!((f.steal.as_secs_f64() - 50.0 * 0.002).abs() < 1e-6, "{f:?}");
        assert_eq!(f.budget, 0.05);
        assert!(f.budget_used.is_some_and(|u| u >= fraction), "{f:?}");
        assert_eq!(node.job_figures("nobody"), None);
    }

    #[test]
    fn a_jobs_window_fraction_forgets_what_it_stole_more_than_10s_ago() {
        let mut node = NodeBudget::new();
        node.register_training("t", config(0.05), None).unwrap();
        node.add_job("t", "a").unwrap();
        let mut script = Script::new(Instant::now());
        let dt = Duration::from_millis(100);
        for _ in 0..100 {
            let r = script.advance(dt, &[("a", 0.2, 1.0)]);
            node.tick(script.at, &readings("t", r));
        }
        let f = node.job_figures("a").unwrap();
        let early = f.stolen_fraction_window.expect("two readings");
        assert!((early - 0.2).abs() < 1e-6, "{f:?}");
        for _ in 0..150 {
            let r = script.advance(dt, &[("a", 0.0, 1.0)]);
            node.tick(script.at, &readings("t", r));
        }
        let f = node.job_figures("a").unwrap();
        assert_eq!(f.stolen_fraction_window, Some(0.0), "{f:?}");
        assert!(f.stolen_fraction.is_some_and(|t| t > 0.05), "{f:?}");
    }

    #[test]
    fn refusals_name_the_training_and_job() {
        let mut node = NodeBudget::new();
        node.register_training("t", config(0.05), None).unwrap();
        assert_eq!(
            node.register_training("t", config(0.05), None),
            Err(NodeBudgetError::TrainingExists("t".into()))
        );
        assert_eq!(
            node.register_training("u", config(1.5), None),
            Err(NodeBudgetError::Budget(1.5))
        );
        assert_eq!(
            node.add_job("x", "a"),
            Err(NodeBudgetError::NoTraining("x".into()))
        );
        node.add_job("t", "a").unwrap();
        assert_eq!(
            node.add_job("t", "a"),
            Err(NodeBudgetError::JobExists {
                job: "a".into(),
                training: "t".into()
            })
        );
        assert_eq!(node.unregister_training("t"), Ok(vec!["a".to_owned()]));
        assert_eq!(node.training_of("a"), None);
    }
}
