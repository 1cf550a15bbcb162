//! [`BudgetMonitor`]: the budget controller plugged into the job supervisor.
//! Every control period it takes the job's steal (the steal meter's part of
//! the tick's [`Sample`]), the job's CPU use and, when configured, the
//! training's progress (which it polls itself, as the progress file's
//! sensor), steps the [`Controller`] and returns the controls it wants to
//! the job's actuator. Each decision is a `budget` event and a log line
//! with its reason; once a second a `budget status` log line gives the live
//! numbers, with the budget used over the controller's horizon. At the end
//! it fills `budget_fraction`, `over_budget_s`, `budget_used` (the worst
//! 10 s window or the whole job), `training_slowdown` and `slowdown_blame`
//! (the last blame experiment's answer) in the report (null with a reason
//! when missing).

use std::{
    cell::RefCell,
    convert::Infallible,
    time::{Duration, Instant},
};

use enforcer_model::StealWindow;
use serde_json::json;

use super::{
    actuator::{CpuActuator, apply},
    controller::{Cause, Controller, ControllerConfig, Observation, Reason, Signal},
    placement::{Placement, PlacementConfig, PlacementDecision},
    progress::{ProgressTracker, Unavailable},
};
use crate::{
    cgroup::cpuset::CpuList,
    events::Event,
    job::{
        JobInfo, Monitor, MonitorError, Sample, TickContext, Wishes,
        controls::{Control, Controls, Policy},
    },
    report::Report,
};

/// The budget loop's wish, built by its decisions as they are applied (the
/// job's actuator caps the quota at the user's static CPU limit:
/// "unlimited" means back to it, never above).
#[derive(Debug, Default)]
struct BudgetWish(RefCell<Controls>);

impl CpuActuator for BudgetWish {
    type Error = Infallible;
    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), Infallible> {
        self.0.borrow_mut().quota = cores;
        Ok(())
    }
    fn set_cpu_idle(&self, idle: bool) -> Result<(), Infallible> {
        self.0.borrow_mut().idle = Some(idle);
        Ok(())
    }
    fn freeze(&self, frozen: bool) -> Result<(), Infallible> {
        self.0.borrow_mut().frozen = frozen;
        Ok(())
    }
}

/// Why there is no steal signal when the sample has no steal at all.
const NO_METER: &str = "the steal meter has published nothing yet";

const STATUS_EVERY: Duration = Duration::from_secs(1);
const REPORT_WINDOW: Duration = Duration::from_secs(1);

/// The budget loop of one job.
pub struct BudgetMonitor {
    config: ControllerConfig,
    controller: Option<Controller>,
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
    /// What the loop wants of the job's quota, idle class and freezer.
    wish: BudgetWish,
    /// Where the job runs; `None` when placement is off or impossible.
    placement: Option<Placement>,
    /// Place jobs at all (`place_jobs`).
    place_jobs: bool,
    /// The training's per-CPU time watched before the job started...
    history: Vec<(Instant, Vec<Duration>)>,
    /// The placement proposed and not wished yet: from the watch before
    /// the job, or held until the steal asks for it (`placement_armed`).
    pending_placement: Option<PlacementDecision>,
    /// Whether the job's steal has asked for placement: a placement is a
    /// remedy for measured steal, like a quota cut, so the job runs on every
    /// CPU until the budget loop first cuts (or freezes) it on steal. Then
    /// the proposal held so far is applied instead of the cut (the cut
    /// stands only until the cpuset holds the placement, whose decision
    /// starts the quota again), and placement follows the training from
    /// then on. Where the idle class alone keeps the budget, the job is
    /// never confined.
    placement_armed: bool,
    /// The CPUs placement wants (`Some(None)`: none in particular; `None`:
    /// placement never wished).
    cpus_wish: Option<Option<CpuList>>,
    /// A placement wished but not yet seen written: the controller is told
    /// of it once the job's cpuset holds it.
    unconfirmed: Option<PlacementDecision>,
    /// The job's first placement, on trial like a quota cut: judged a
    /// window after the cpuset held it ([`Self::judge_placement`]).
    placement_trial: Option<PlacementTrial>,
    /// No placement until then: the last one did not lower the steal.
    placement_held_until: Option<Instant>,
}

/// A placement on trial. It takes CPUs from the job to take the training's
/// CPUs out of the job's reach, so it predicts that the steal goes (nearly)
/// away; where the training uses every CPU it can only crowd the job onto
/// a CPU the training still uses, and the steal rises instead.
#[derive(Debug)]
struct PlacementTrial {
    decision: PlacementDecision,
    /// When the cpuset held it, and the steal counters then.
    at: Instant,
    counters: enforcer_model::StealCounters,
    /// The stolen fraction over the controller's `lookahead` before it.
    before: f64,
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
    /// budget, on the steal the steal meter puts in each sample.
    pub fn for_job(config: &crate::config::Config, progress: Option<ProgressTracker>) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        Self::new(
            ControllerConfig::new(config.budget.fraction(), cpus),
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

    pub fn new(config: ControllerConfig, progress: Option<ProgressTracker>) -> Self {
        Self {
            window: StealWindow::new(config.budget),
            config,
            controller: None,
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
            wish: BudgetWish::default(),
            placement: None,
            place_jobs: false,
            history: Vec::new(),
            pending_placement: None,
            placement_armed: false,
            cpus_wish: None,
            unconfirmed: None,
            placement_trial: None,
            placement_held_until: None,
        }
    }

    /// Samples of the training's cumulative per-CPU on-CPU time taken before
    /// the job started (`StealMonitor::watch_before_job`): the job is placed
    /// at its first tick instead of after a window of its own.
    pub fn with_training_history(mut self, samples: Vec<(Instant, Vec<Duration>)>) -> Self {
        self.history = samples;
        self
    }

    /// Steps the placement on the training's per-CPU time; a new placement
    /// becomes the placement's wish, confirmed by [`Self::placed`] once the
    /// cpuset holds it. Until the steal asks for placement
    /// (`placement_armed`), the latest proposal is only held.
    fn place(&mut self, sample: &Sample) {
        if self.unconfirmed.is_some() || self.placement.is_none() {
            return;
        }
        if let Some(Ok(steal)) = &sample.steal
            && let Some(mut d) = self
                .placement
                .as_mut()
                .and_then(|p| p.observe(&steal.training_per_cpu, sample.now))
        {
            // A proposal replacing a held one moves the job from where it
            // really is: every CPU, as nothing was wished yet.
            if let Some(held) = self.pending_placement.take() {
                d.previous = held.previous;
            }
            self.pending_placement = Some(d);
        }
        self.wish_placement();
    }

    /// Wishes the proposal held, once the steal has asked for placement.
    fn wish_placement(&mut self) {
        if !self.placement_armed || self.unconfirmed.is_some() || self.placement.is_none() {
            return;
        }
        let Some(d) = self.pending_placement.take() else {
            return;
        };
        if d.cpus == d.previous {
            // Held proposals that came back to where the job is.
            return;
        }
        self.cpus_wish = Some(d.cpus.clone());
        self.unconfirmed = Some(d);
    }

    /// Whether `reason` is the budget loop acting on the job's steal: what
    /// arms placement.
    fn steal_asks_for_placement(reason: &Reason) -> bool {
        matches!(
            reason,
            Reason::Tighten {
                signal: Signal::Steal,
                ..
            } | Reason::Freeze { .. }
                | Reason::CutDidNotPay {
                    frozen_for: Some(_),
                    ..
                }
        )
    }

    /// A placement the job's cpuset now holds: its event, and how many CPUs
    /// the job has now. A host without a cpuset for jobs turns placement
    /// off, once, with the reason.
    fn placed(&mut self, sample: &Sample) -> Option<(Event, f64)> {
        let d = self.unconfirmed.take()?;
        if sample.rejected == Some(Control::Cpus) {
            tracing::warn!(job = %self.job, "the job cannot be placed on CPUs: placement off");
            self.placement = None;
            // Withdrawn, so that the refused write is not retried.
            self.cpus_wish = Some(None);
            return None;
        }
        if sample.applied.cpus != d.cpus {
            // Not written yet (an earlier control's write failed).
            self.unconfirmed = Some(d);
            return None;
        }
        let placement = self.placement.as_ref()?;
        let cores = d.job_cores(placement.all());
        tracing::info!(job = %self.job, decision = %format!("placement: {d}"), "budget decision");
        // The move off every CPU is judged; later moves follow the
        // training within the placement it earned.
        self.placement_trial = None;
        if d.previous.is_none()
            && d.cpus.is_some()
            && let Some(Ok(reading)) = &sample.steal
            && let Some(before) = self.window.fraction_over(self.config.lookahead)
        {
            self.placement_trial = Some(PlacementTrial {
                decision: d.clone(),
                at: sample.now,
                counters: reading.counters,
                before,
            });
        }
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

    /// Judges the placement on trial once the steal after it has been
    /// measured for a window, as a quota cut is judged: it must have lowered
    /// the stolen fraction by [`ControllerConfig::trial_share`] of what it
    /// predicts (all of it), or to the target. One that did not is undone:
    /// the job goes back to every CPU (the controller starts its quota again
    /// there, as after any move) and is not placed again for
    /// [`ControllerConfig::unpaid_hold`], then only when its steal asks anew.
    /// Returns the verdict's event when it undoes.
    fn judge_placement(&mut self, sample: &Sample) -> Option<Event> {
        let trial = self.placement_trial.as_ref()?;
        if self.unconfirmed.is_some() {
            // Moved on before the verdict: the move is the placement now.
            self.placement_trial = None;
            return None;
        }
        let Some(Ok(reading)) = &sample.steal else {
            return None;
        };
        let measured = sample.now.saturating_duration_since(trial.at);
        if measured < self.config.window {
            return None;
        }
        // A training that neither ran nor waited since says nothing yet.
        let after = reading.counters.since(trial.counters).fraction()?;
        let trial = self.placement_trial.take()?;
        let cfg = &self.config;
        let target = cfg.spend * cfg.budget;
        if after <= target || trial.before - after >= cfg.trial_share * trial.before {
            tracing::info!(
                job = %self.job,
                before = trial.before,
                after,
                "the placement lowered the steal: it stands"
            );
            return None;
        }
        let placement = self.placement.as_mut()?;
        let undo = placement.undo(sample.now, &trial.decision);
        let hold = cfg.unpaid_hold;
        let message = format!(
            "placement did not pay: stolen fraction {:.1}% over {:.1}s before it, {:.1}% over \
             {:.1}s on CPUs {}: back to every CPU, no placement for {}s",
            trial.before * 100.0,
            cfg.lookahead.as_secs_f64(),
            after * 100.0,
            measured.as_secs_f64(),
            undo.previous
                .as_ref()
                .map_or("all".to_owned(), ToString::to_string),
            hold.as_secs(),
        );
        tracing::info!(job = %self.job, decision = %message, "budget decision");
        self.decisions += 1;
        self.placement_armed = false;
        self.placement_held_until = Some(sample.now + hold);
        self.pending_placement = None;
        self.cpus_wish = Some(undo.cpus.clone());
        self.unconfirmed = Some(undo);
        Some(Event::new(
            "budget",
            json!({
                "action": "placement_did_not_pay",
                "message": message,
                "before": trial.before,
                "after": after,
                "hold_for_s": hold.as_secs_f64(),
            }),
        ))
    }

    /// What the loop wants of the job's controls now.
    fn wishes(&self) -> Wishes {
        let mut wishes = vec![(Policy::Budget, self.wish.0.borrow().clone())];
        if let Some(cpus) = &self.cpus_wish {
            wishes.push((
                Policy::Placement,
                Controls {
                    cpus: cpus.clone(),
                    ..Controls::default()
                },
            ));
        }
        wishes
    }

    /// This tick's steal counters, or `None` (and the reason kept, logged
    /// when it changes).
    fn steal(&mut self, sample: &Sample) -> Option<enforcer_model::StealCounters> {
        let error = match &sample.steal {
            Some(Ok(r)) => {
                self.steal_error = None;
                return Some(r.counters);
            }
            Some(Err(e)) => e.clone(),
            // The meter's monitor stopped after its last error: that stands.
            None => self
                .steal_error
                .clone()
                .unwrap_or_else(|| NO_METER.to_owned()),
        };
        if self.steal_error.as_deref() != Some(error.as_str()) {
            tracing::warn!(job = %self.job, reason = %error, "no steal signal: the budget loop holds");
        }
        self.steal_error = Some(error);
        None
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
        Ok(())
    }

    /// The progress file's sensor: polled every tick while the job runs.
    fn sense(&mut self, sample: &mut Sample) {
        if let Some(p) = self.progress.as_mut() {
            sample.progress = Some(p.poll(sample.now, true));
        }
    }

    fn tick(&mut self, sample: &Sample, ctx: &mut TickContext<'_>) -> Result<Wishes, MonitorError> {
        let Some(controller) = self.controller.as_mut() else {
            return Ok(Wishes::new());
        };
        let now = sample.now;
        if self.last_tick.is_none() {
            // The supervisor already put the job in (or out of) the idle
            // class from its limits: only the quota is the loop's to set.
            let d = controller.start(now);
            let Ok(()) = self.wish.set_cpu_quota(d.controls.quota.cores());
            tracing::info!(job = %self.job, decision = %d, "budget decision");
            ctx.emit(Event::new("budget", decision_json(&d)));
        }

        let steal = self.steal(sample);
        let slowdown = match sample.progress.as_ref().map(|r| &r.slowdown) {
            Some(Ok(s)) => {
                self.slowdown_error = None;
                self.slowdowns.push(*s);
                Some(*s)
            }
            Some(Err(u)) => {
                // Warming right after the start is normal: not an error.
                if !matches!(u, Unavailable::Warming) {
                    self.slowdown_error = Some(u.to_string());
                }
                None
            }
            None => None,
        };
        if let Some((event, cores)) = self.placed(sample) {
            ctx.emit(event);
            if let Some(controller) = self.controller.as_mut()
                && let Some(d) = controller.placed(now, cores)
            {
                self.decisions += 1;
                tracing::info!(job = %self.job, decision = %d, "budget decision");
                let Ok(()) = apply(&self.wish, &d);
                ctx.emit(Event::new("budget", decision_json(&d)));
            }
        }
        if let Some(event) = self.judge_placement(sample) {
            ctx.emit(event);
        }
        self.place(sample);
        let Some(controller) = self.controller.as_mut() else {
            return Ok(Wishes::new());
        };
        let mut arm = false;
        let job_cpu = sample.stats.cpu_usage;
        let obs = Observation {
            steal,
            job_cpu,
            training_slowdown: slowdown,
            paused_slowdown: sample.progress.as_ref().and_then(|r| r.paused_slowdown),
        };
        if let Some(d) = controller.step(obs, now) {
            self.decisions += 1;
            tracing::info!(job = %self.job, decision = %d, "budget decision");
            // A failed write (e.g. a job that just exited) is retried by the
            // actuator, and the loop goes on with what it asked for.
            let Ok(()) = apply(&self.wish, &d);
            ctx.emit(Event::new("budget", decision_json(&d)));
            if let Reason::Freeze { .. }
            | Reason::CutDidNotPay {
                frozen_for: Some(_),
                ..
            } = d.reason
            {
                tracing::warn!(job = %self.job, "job frozen: last resort of the budget loop");
            }
            if let Some(cause) = d.reason.blame() {
                self.blame = Some(cause);
            }
            if let Some(p) = self.progress.as_mut() {
                p.follow_experiment(&d.reason, now, &self.job);
            }
            arm = !self.placement_armed
                && Self::steal_asks_for_placement(&d.reason)
                && self.placement_held_until.is_none_or(|until| now >= until);
        }
        if arm && self.placement.is_some() {
            tracing::info!(job = %self.job, "the job's steal asks for placement");
            self.placement_armed = true;
            self.wish_placement();
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
                idle_class = controls.map(|c| c.idle),
                out_of_idle_class_s = self
                    .controller
                    .as_ref()
                    .map(|c| c.out_of_idle_class(now).0.as_secs_f64()),
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
        Ok(self.wishes())
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
        let lifts = match (&self.controller, self.last_tick) {
            (Some(c), Some(at)) if c.config().idle && c.config().lift_after.is_some() => {
                Ok(c.out_of_idle_class(at))
            }
            (Some(c), Some(_)) if !c.config().idle => {
                Err("the job ran outside the idle class (--no-idle)")
            }
            (Some(_), Some(_)) => Err("the budget loop was configured not to lift"),
            _ => Err("the budget loop never ran"),
        };
        match lifts {
            Ok((out, lifts)) => {
                report.out_of_idle_class_s = Some(out.as_secs_f64());
                report.idle_class_lifts = Some(lifts);
            }
            Err(why) => {
                for field in crate::report::LIFT_FIELDS {
                    report.unavailable(field, why);
                }
            }
        }
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

    use std::sync::Arc;

    use super::*;
    use crate::{
        budget::StealCounters,
        cgroup::{JobCgroup, Limits, Stats, fs::CgFs, v2::V2Job},
        job::{StealReading, controls::Actuator},
    };

    /// Steal growing at `fraction` of each 100 ms tick, as the steal meter
    /// puts it in the sample.
    fn scripted(fraction: f64) -> impl FnMut(u32) -> Option<Result<StealReading, String>> {
        move |tick| {
            let total = Duration::from_millis(100) * tick;
            Some(Ok(StealReading {
                counters: StealCounters {
                    steal: total.mul_f64(fraction),
                    training_on_cpu: total.mul_f64(1.0 - fraction),
                },
                training_per_cpu: Vec::new(),
            }))
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

    /// Ticks as the supervisor does: a sample with `steal`'s reading, the
    /// loop's wishes applied through the job's actuator.
    fn run_ticks(
        m: &mut BudgetMonitor,
        job: &JobInfo,
        cg: &JobCgroup,
        n: u32,
        mut steal: impl FnMut(u32) -> Option<Result<StealReading, String>>,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for i in 1..=n {
            let now = job.started + Duration::from_millis(100) * i;
            let stats = Stats {
                cpu_usage: Some(Duration::from_millis(100) * i),
                ..Stats::default()
            };
            let mut sample = Sample::new(now, now - job.started, stats).actuated_by(&job.controls);
            sample.steal = steal(i);
            m.sense(&mut sample);
            let mut ctx = TickContext::new(cg, &mut events);
            for (policy, controls) in m.tick(&sample, &mut ctx).expect("tick") {
                job.controls.want(policy, controls);
            }
            // A refused write is the next sample's `rejected`.
            job.controls.apply().ok();
        }
        events
    }

    #[test]
    fn over_budget_steal_tightens_the_job_cgroup_and_is_reported() {
        let d = tempfile::tempdir().expect("tempdir");
        let cg = fake_job(d.path());
        let started = Instant::now();
        let mut m = BudgetMonitor::new(ControllerConfig::new(0.05, 2.0), None);
        let job = info(
            started,
            Limits {
                cpu_idle: true,
                ..Limits::default()
            },
            &cg,
        );
        m.start(&job).expect("start");
        let events = run_ticks(&mut m, &job, &cg, 10, scripted(0.3));
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
    fn the_report_counts_the_time_the_loop_had_the_job_out_of_the_idle_class() {
        // No steal at all: the loop lifts the job after 3 s; the fake job
        // uses one core in and out of the class, so the lift's verdict 3 s
        // later puts it back. The report says 3 s out in one lift.
        let d = tempfile::tempdir().expect("tempdir");
        let cg = fake_job(d.path());
        let mut m = BudgetMonitor::new(ControllerConfig::new(0.05, 2.0), None);
        let job = info(
            Instant::now(),
            Limits {
                cpu_idle: true,
                ..Limits::default()
            },
            &cg,
        );
        m.start(&job).expect("start");
        let events = run_ticks(&mut m, &job, &cg, 90, scripted(0.0));
        let actions: Vec<&str> = events
            .iter()
            .filter(|e| e.event == "budget")
            .filter_map(|e| e.detail["action"].as_str())
            .collect();
        assert_eq!(actions, ["start", "lift", "lift_did_not_pay"]);
        let idle = std::fs::read_to_string(d.path().join("job/cpu.idle")).expect("cpu.idle");
        assert_eq!(idle.trim(), "1", "the job is back in the idle class");

        let mut report = Report::new("j", &[], std::time::SystemTime::now());
        m.finish(&mut report);
        report.reconcile();
        let out = report.out_of_idle_class_s.expect("time out of the class");
        assert!((out - 3.0).abs() < 0.15, "out of the idle class {out}s");
        assert_eq!(report.idle_class_lifts, Some(1));
        assert!(!report.unavailable.contains_key("out_of_idle_class_s"));
        assert!(
            report
                .summary()
                .contains("out of the idle class 3.0s in 1 lift\n"),
            "{}",
            report.summary()
        );

        // A --no-idle job was never in the class: null, and why.
        let mut m = BudgetMonitor::new(ControllerConfig::new(0.05, 2.0), None);
        let job = info(Instant::now(), Limits::default(), &cg);
        m.start(&job).expect("start");
        run_ticks(&mut m, &job, &cg, 10, scripted(0.0));
        let mut report = Report::new("j", &[], std::time::SystemTime::now());
        m.finish(&mut report);
        report.reconcile();
        assert_eq!(report.out_of_idle_class_s, None);
        assert!(
            report.unavailable["out_of_idle_class_s"].contains("--no-idle"),
            "{:?}",
            report.unavailable
        );
    }

    #[test]
    fn a_static_cpu_limit_caps_the_loop() {
        let d = tempfile::tempdir().expect("tempdir");
        let cg = fake_job(d.path());
        let started = Instant::now();
        let mut m = BudgetMonitor::new(ControllerConfig::new(0.05, 2.0), None);
        let job = info(
            started,
            Limits {
                cpu: Some(0.5),
                cpu_idle: true,
                ..Limits::default()
            },
            &cg,
        );
        m.start(&job).expect("start");
        // As the session does when it creates the job.
        cg.set_cpu_quota(Some(0.5)).expect("static limit");
        // Far under budget for long enough to relax all the way.
        run_ticks(&mut m, &job, &cg, 100, scripted(0.0));
        let max = std::fs::read_to_string(d.path().join("job/cpu.max")).expect("cpu.max written");
        assert!(
            max.starts_with("50000 "),
            "cpu.max {max:?}: above the static 0.5 CPU"
        );
    }

    #[test]
    fn a_placement_reaches_the_controller_once_the_cpuset_holds_it_and_a_refused_one_turns_placement_off()
     {
        for cpuset in [true, false] {
            let d = tempfile::tempdir().expect("tempdir");
            let (mut m, job, cg, cpus_file) = monitor_holding_a_placement(d.path(), cpuset);
            m.placement_armed = true;
            let events = run_ticks(&mut m, &job, &cg, 3, scripted(0.0));
            let places: Vec<_> = events
                .iter()
                .filter(|e| e.detail["action"] == "place")
                .collect();
            if cpuset {
                assert_eq!(places.len(), 1, "{events:?}");
                assert_eq!(places[0].detail["job_cores"], 2.0);
                assert_eq!(std::fs::read_to_string(&cpus_file).unwrap(), "2-3");
                assert!(m.placement.is_some());
            } else {
                assert!(places.is_empty(), "{events:?}");
                assert!(m.placement.is_none(), "placement stays on");
                assert_eq!(job.controls.merged().cpus, None, "the refused wish stays");
                assert_eq!(
                    job.controls.rejected(),
                    None,
                    "the refused write is retried"
                );
            }
        }
    }

    /// A started monitor on a fake 4-CPU job (with a cpuset file when
    /// `cpuset`), holding what the watch before the job proposed (the
    /// training on CPUs 0-1, the job on 2-3), not armed.
    fn monitor_holding_a_placement(
        root: &Path,
        cpuset: bool,
    ) -> (BudgetMonitor, JobInfo, Arc<JobCgroup>, std::path::PathBuf) {
        let cg = fake_job(root);
        let cpus_file = root.join("job/cpuset.cpus");
        if cpuset {
            std::fs::write(&cpus_file, "").expect("fake cpuset file");
        }
        let mut m = BudgetMonitor::new(ControllerConfig::new(0.05, 4.0), None);
        let job = info(Instant::now(), Limits::default(), &cg);
        m.start(&job).expect("start");
        m.placement = Some(Placement::new(
            PlacementConfig::default(),
            CpuList::new([0, 1, 2, 3]),
        ));
        m.pending_placement = Some(PlacementDecision {
            cpus: Some(CpuList::new([2, 3])),
            previous: None,
            training_cpus: CpuList::new([0, 1]),
            training_cores: 2.0,
        });
        (m, job, cg, cpus_file)
    }

    /// A plant for the placement: cumulative readings of 100 ms ticks in
    /// which the training runs two threads, one on each of CPUs 0-1, and
    /// `rate(tick, placed)` of its time is stolen, `placed` while the job's
    /// cpuset file holds 2-3. (Two cores' worth: the placement keeps both
    /// CPUs for it.)
    fn placement_plant(
        cpus_file: std::path::PathBuf,
        rate: impl Fn(u32, bool) -> f64,
    ) -> impl FnMut(u32) -> Option<Result<StealReading, String>> {
        // Two threads' worth of time in each 100 ms tick.
        let per_tick = Duration::from_millis(100) * 2;
        let (mut stolen, mut total) = (Duration::ZERO, Duration::ZERO);
        move |i| {
            let placed = std::fs::read_to_string(&cpus_file).is_ok_and(|c| c == "2-3");
            stolen += per_tick.mul_f64(rate(i, placed));
            total += per_tick;
            let on_cpu = total - stolen;
            Some(Ok(StealReading {
                counters: StealCounters {
                    steal: stolen,
                    training_on_cpu: on_cpu,
                },
                training_per_cpu: vec![on_cpu / 2, on_cpu / 2, Duration::ZERO, Duration::ZERO],
            }))
        }
    }

    fn actions(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| e.detail["action"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// `ticks` periods of [`placement_plant`] with `rate` on a monitor
    /// holding a placement to CPUs 2-3: the events, their actions and what
    /// the job's cpuset file holds at the end.
    fn run_placement_plant(
        ticks: u32,
        rate: impl Fn(u32, bool) -> f64,
    ) -> (Vec<Event>, Vec<String>, String) {
        let d = tempfile::tempdir().expect("tempdir");
        let (mut m, job, cg, cpus_file) = monitor_holding_a_placement(d.path(), true);
        let plant = placement_plant(cpus_file.clone(), rate);
        let events = run_ticks(&mut m, &job, &cg, ticks, plant);
        let actions = actions(&events);
        let cpus = std::fs::read_to_string(&cpus_file).expect("the cpuset file");
        (events, actions, cpus)
    }

    #[test]
    fn a_placement_waits_until_the_steal_cuts_the_job_and_then_replaces_the_cut() {
        // 3 s within budget (1 %), then 20 % of the training's time stolen
        // where the job shares its CPUs, none once it is off them.
        let rate = |tick, placed| match (tick, placed) {
            (..=30, _) => 0.01,
            (_, true) => 0.0,
            (_, false) => 0.2,
        };
        let (events, actions, cpus) = run_placement_plant(60, rate);
        let tighten = actions.iter().position(|a| a == "tighten");
        let place = actions.iter().position(|a| a == "place");
        let (Some(tighten), Some(place)) = (tighten, place) else {
            panic!("a steal cut and a placement: {actions:?}");
        };
        assert!(
            tighten < place,
            "placed before the steal asked: {actions:?}"
        );
        assert_eq!(
            actions.get(place + 1).map(String::as_str),
            Some("placed"),
            "the placement starts the quota again: {actions:?}"
        );
        assert!(events[place + 1].detail["quota_cores"].is_null());
        assert!(
            !actions.iter().any(|a| a == "placement_did_not_pay"),
            "{actions:?}"
        );
        assert_eq!(cpus, "2-3");
    }

    #[test]
    fn a_placement_that_raises_the_steal_is_undone_and_not_made_again_for_the_hold() {
        // A training on every CPU: crowded onto CPUs it still uses, the
        // job steals 40 % instead of 12 %.
        let rate = |tick, placed| match (tick, placed) {
            (..=30, _) => 0.01,
            (_, true) => 0.4,
            (_, false) => 0.12,
        };
        let (events, actions, cpus) = run_placement_plant(150, rate);
        let places: Vec<_> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.detail["action"] == "place")
            .map(|(i, e)| (i, e.detail["cpus"].as_str()))
            .collect();
        let undo = actions
            .iter()
            .position(|a| a == "placement_did_not_pay")
            .unwrap_or_else(|| panic!("the placement is judged: {actions:?}"));
        let detail = &events[undo].detail;
        assert!(
            detail["before"].as_f64().is_some_and(|b| b < 0.2),
            "{detail}"
        );
        assert!(
            detail["after"].as_f64().is_some_and(|a| a > 0.3),
            "{detail}"
        );
        // Placed once, then back to every CPU, and not again within the
        // hold (15 s of 30), though the steal keeps cutting the quota.
        assert!(
            matches!(places.as_slice(), [(p, Some("2-3")), (back, None)] if *p < undo && undo < *back),
            "{places:?} / {actions:?}"
        );
        assert!(
            actions[places[1].0..].iter().any(|a| a == "tighten"),
            "the quota takes over: {actions:?}"
        );
        assert_eq!(cpus, "\n");
    }

    #[test]
    fn a_placement_is_never_made_while_the_idle_class_holds_the_budget() {
        let d = tempfile::tempdir().expect("tempdir");
        let (mut m, job, cg, cpus_file) = monitor_holding_a_placement(d.path(), true);
        let events = run_ticks(&mut m, &job, &cg, 150, scripted(0.03));
        assert!(
            events.iter().all(|e| e.detail["action"] != "place"),
            "{events:?}"
        );
        assert_eq!(std::fs::read_to_string(&cpus_file).unwrap(), "");
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
        let d = tempfile::tempdir().expect("tempdir");
        let cg = fake_job(d.path());
        let started = Instant::now();
        let mut m = BudgetMonitor::new(ControllerConfig::new(0.05, 2.0), None);
        let job = info(started, Limits::default(), &cg);
        m.start(&job).expect("start");
        let events = run_ticks(&mut m, &job, &cg, 20, |_| {
            Some(Err("meter not loaded".to_owned()))
        });
        assert_eq!(events.len(), 1, "only the start decision");
        let mut report = Report::new("j", &[], std::time::SystemTime::now());
        m.finish(&mut report);
        assert_eq!(report.over_budget_s, None);
        assert_eq!(report.unavailable["over_budget_s"], "meter not loaded");
    }
}
