//! The per-job budget controller: a pure state machine that turns what was
//! measured about one evaluation job (the training's time stolen by it, the
//! training's true slowdown, the job's own CPU use) into CPU controls for the
//! job's cgroup.
//!
//! It owns no file, no clock and no cgroup: the supervisor feeds it
//! [`Observation`]s with a timestamp and applies the [`Decision`]s it returns
//! (the agent's `budget::actuator`). That keeps every rule testable on
//! synthetic or recorded signals, and lets `cargo xtask bench contention`
//! drive the very same code.
//!
//! The policy, in the order it is applied each control period:
//! - the job runs in the idle scheduling class (unless configured off) and
//!   starts under a quota of [`ControllerConfig::start_cores`];
//! - the signal is the stolen fraction over the recent window, but never over
//!   samples older than the last change (a tightening is judged on what
//!   happened after it, not before), and the true slowdown when the training
//!   progress file gives one;
//! - over budget: the quota shrinks multiplicatively (halved when far over),
//!   from the job's measured use when that is below the quota, never below the
//!   floor;
//! - under the relax threshold and after a hold-off since the last tightening:
//!   the quota grows by a fixed step; past the node's CPU count it is removed;
//! - at the floor, still over budget on the job's own steal for a sustained
//!   time (the last resort): the job is frozen, long enough that the steal
//!   averaged over the run at the floor and the freeze lands at the relax
//!   threshold (bounded), then thawed at the floor. Slowdown alone never
//!   freezes: it is not attributed to this job.
//!
//! The training process is never touched: every output is a control on the
//! job's cgroup.
//!
//! Where the loop stands is one [`Phase`]; the slowdown signal's own state
//! (heeded or ignored for a while) is a [`SlowdownHeed`].

use std::{fmt, time::Duration, time::Instant};

pub use crate::counters::StealCounters;
use crate::{counters::cores, window::Window};

/// What was measured at one control period.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// Cumulative steal counters; `None` when the meter gave nothing.
    pub steal: Option<StealCounters>,
    /// Cumulative CPU time used by the job's cgroup; lets a tightening start
    /// from what the job really uses when the quota is not binding.
    pub job_cpu: Option<Duration>,
    /// True slowdown of the training (1 − rate ÷ baseline) from its progress
    /// file; `None` when unavailable (no file, stale, no baseline yet).
    pub training_slowdown: Option<f64>,
}

/// The CPU limit on the job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quota {
    Unlimited,
    /// CPU time per wall time, in cores (0.5 = half of one CPU).
    Cores(f64),
}

impl Quota {
    /// The quota in cores, `None` when unlimited (the form the cgroup handle
    /// takes).
    pub fn cores(self) -> Option<f64> {
        match self {
            Quota::Unlimited => None,
            Quota::Cores(c) => Some(c),
        }
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quota::Unlimited => f.write_str("unlimited"),
            Quota::Cores(c) => write!(f, "{c:.2} cores"),
        }
    }
}

/// The full set of CPU controls the controller wants on the job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuControls {
    pub idle: bool,
    pub quota: Quota,
    pub frozen: bool,
}

/// Which measurement drove a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Steal,
    Slowdown,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Steal => "stolen fraction",
            Signal::Slowdown => "training slowdown",
        })
    }
}

/// Why the controls changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// The job starts: idle class and the start quota.
    Start,
    /// Over budget: the quota shrank.
    Tighten { signal: Signal, value: f64 },
    /// Under the relax threshold after the hold-off: the quota grew.
    Relax { signal: Signal, value: f64 },
    /// The quota grew past the node's CPUs: removed.
    Unlimit { signal: Signal, value: f64 },
    /// At the floor, still over budget for a sustained time: frozen for
    /// `length`.
    Freeze {
        value: f64,
        over_for: Duration,
        length: Duration,
    },
    /// The freeze ran its time; the job resumes at the floor.
    Thaw { frozen_for: Duration },
    /// The job was moved to other CPUs (`cores` of them): the quota starts
    /// again from the start value within them.
    Placed { cores: f64 },
    /// The slowdown stayed over budget for `held` with the job at the floor
    /// and its steal quiet: not the job's doing. Its quota goes back to what
    /// it was before the slowdown tightened it, and the slowdown is ignored
    /// for `ignore_for`.
    NotTheJob {
        value: f64,
        held: Duration,
        ignore_for: Duration,
    },
}

/// A change of the job's CPU controls, with the reason, for the actuator, the
/// event stream and the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub controls: CpuControls,
    pub previous: CpuControls,
    pub reason: Reason,
    /// The budget the decision was taken against (fraction).
    pub budget: f64,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (from, to) = (self.previous.quota, self.controls.quota);
        let pct = |v: f64| v * 100.0;
        let budget = pct(self.budget);
        match self.reason {
            Reason::Start => write!(
                f,
                "job starts in the {} class with quota {to}",
                if self.controls.idle { "idle" } else { "normal" }
            ),
            Reason::Tighten { signal, value } => write!(
                f,
                "{signal} {:.1}% over budget {budget:.1}%: quota {from} -> {to}",
                pct(value)
            ),
            Reason::Relax { signal, value } => write!(
                f,
                "{signal} {:.1}% well under budget {budget:.1}%: quota {from} -> {to}",
                pct(value)
            ),
            Reason::Unlimit { signal, value } => write!(
                f,
                "{signal} {:.1}% well under budget {budget:.1}%: quota {from} -> unlimited",
                pct(value)
            ),
            Reason::Freeze {
                value,
                over_for,
                length,
            } => write!(
                f,
                "stolen fraction {:.1}% still over budget {budget:.1}% at the floor quota {to} for {:.1}s: job frozen for {:.1}s",
                pct(value),
                over_for.as_secs_f64(),
                length.as_secs_f64()
            ),
            Reason::Thaw { frozen_for } => write!(
                f,
                "job thawed after {:.1}s frozen, at quota {to}",
                frozen_for.as_secs_f64()
            ),
            Reason::Placed { cores } => {
                write!(f, "job placed on {cores:.0} CPUs: quota {from} -> {to}")
            }
            Reason::NotTheJob {
                value,
                held,
                ignore_for,
            } => write!(
                f,
                "training slowdown {:.1}% stayed over budget {budget:.1}% for {:.1}s with the job at the floor and its steal quiet: not the job's doing; quota {from} -> {to}, slowdown ignored for {:.0}s",
                pct(value),
                held.as_secs_f64(),
                ignore_for.as_secs_f64()
            ),
        }
    }
}

/// Tuning of the controller. The defaults come from measurements on a
/// 2-vCPU node (BRIEF §3): idle class plus about one core of quota held
/// training slowdown at 0–3 %, smaller quotas throttle in bursts.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerConfig {
    /// The budget on the stolen fraction and the slowdown, as a fraction.
    pub budget: f64,
    /// Put the job in the idle scheduling class.
    pub idle: bool,
    /// CPUs of the node: quotas at or above it mean unlimited.
    pub max_cores: f64,
    /// Quota the job starts with; `None` starts unlimited.
    pub start_cores: Option<f64>,
    /// The quota never goes below this, so evaluation always progresses.
    pub floor_cores: f64,
    /// The signal window: the stolen fraction is taken over at most this much
    /// recent history.
    pub window: Duration,
    /// A fraction over less than this span (after a change) is not judged.
    pub min_span: Duration,
    /// Training on-CPU plus steal in the window below which the fraction
    /// means nothing (the training was idle): no decision.
    pub min_training_time: Duration,
    /// Multiplicative decrease when over budget...
    pub decrease: f64,
    /// ...and when over `2 × budget`.
    pub decrease_far: f64,
    /// Relax only while the signal is below `relax_below × budget`; between
    /// that and the budget the quota holds (a dead band against sawtooth).
    pub relax_below: f64,
    /// Additive increase per relax step, in cores.
    pub increase_cores: f64,
    /// Minimum time between two relax steps.
    pub increase_interval: Duration,
    /// No relax for this long after a tightening.
    pub hold_off: Duration,
    /// Slowdown is measured over seconds: it may tighten at most this often,
    /// so that one slow reading does not drive the quota to the floor.
    pub slowdown_interval: Duration,
    /// ...and only once it has been over budget for this long without a
    /// break: a single window's rate is noisy (±2–3 % from one 2 s window
    /// to the next on a busy 2-vCPU node), so one high reading is not
    /// interference.
    pub slowdown_persist: Duration,
    /// At the floor, with the job's stolen fraction under the relax
    /// threshold, a slowdown still over budget after this long is not the
    /// job's doing (other load on the node)...
    pub slowdown_blame_after: Duration,
    /// ...and is then ignored this long, with the job back at its quota from
    /// before the slowdown tightened it.
    pub slowdown_ignore_for: Duration,
    /// Freeze when the stolen fraction at the floor stays above
    /// `freeze_above × budget`...
    pub freeze_above: f64,
    /// ...for this long.
    pub freeze_after: Duration,
    /// A freeze lasts long enough that the steal averaged over the run at
    /// the floor and the freeze lands at the relax threshold, within these
    /// bounds; then the job is thawed at the floor.
    pub freeze_min: Duration,
    pub freeze_max: Duration,
}

impl ControllerConfig {
    /// The quota a job starts with (and starts again from after a move to
    /// other CPUs): `start_cores` within the node, never under the floor.
    pub fn start_quota(&self) -> Quota {
        match self.start_cores {
            Some(c) if c < self.max_cores => Quota::Cores(c.max(self.floor_cores)),
            _ => Quota::Unlimited,
        }
    }

    /// Defaults for a node with `cpus` CPUs and the given budget fraction.
    pub fn new(budget: f64, cpus: f64) -> Self {
        let cpus = cpus.max(1.0);
        let floor = 0.1;
        Self {
            budget,
            idle: true,
            max_cores: cpus,
            start_cores: Some((cpus / 2.0).max(1.0).min(cpus).max(floor)),
            floor_cores: floor,
            window: Duration::from_secs(1),
            min_span: Duration::from_millis(200),
            min_training_time: Duration::from_millis(20),
            decrease: 0.75,
            decrease_far: 0.5,
            relax_below: 0.6,
            increase_cores: 0.05,
            increase_interval: Duration::from_millis(250),
            hold_off: Duration::from_secs(1),
            slowdown_interval: Duration::from_secs(2),
            slowdown_persist: Duration::from_secs(2),
            slowdown_blame_after: Duration::from_secs(5),
            slowdown_ignore_for: Duration::from_secs(30),
            freeze_above: 1.0,
            freeze_after: Duration::from_secs(2),
            freeze_min: Duration::from_millis(500),
            freeze_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    steal: Option<StealCounters>,
    job_cpu: Option<Duration>,
}

/// Where the loop stands between two periods.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Tightening and relaxing the quota on the signals.
    Regulating,
    /// At the floor with the job's own steal over the freeze threshold,
    /// unbroken since `since`: frozen once that lasts `freeze_after`.
    OverAtFloor { since: Instant },
    /// At the floor with the slowdown over budget and the job's steal quiet
    /// since `since`: the quota holds while it is decided whose slowdown it
    /// is (see [`Reason::NotTheJob`]).
    Blaming { since: Instant },
    /// Frozen at `at` for `length`; thawed at the first period after.
    Frozen { at: Instant, length: Duration },
}

/// Whether slowdown readings count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlowdownHeed {
    /// They count; `over_since`: since when the slowdown has been over
    /// budget, unbroken.
    Heeded { over_since: Option<Instant> },
    /// Ignored until then (see [`Reason::NotTheJob`]).
    Ignored { until: Instant },
}

/// The controller for one job. Create it when the job starts, apply
/// [`Controller::start`], then call [`Controller::step`] every control period.
#[derive(Debug)]
pub struct Controller {
    config: ControllerConfig,
    /// `config.max_cores` as configured: placements only lower it.
    node_cores: f64,
    controls: CpuControls,
    samples: Window<Instant, Sample>,
    phase: Phase,
    slowdown: SlowdownHeed,
    /// When the controls last changed (the signal is judged only after it).
    last_change: Option<Instant>,
    /// When the quota last shrank (relaxing waits `hold_off` after it).
    last_tighten: Option<Instant>,
    /// When the slowdown last shrank it (at most once a `slowdown_interval`).
    last_slowdown_tighten: Option<Instant>,
    /// The quota before the first slowdown tightening of a series.
    quota_before_slowdown: Option<Quota>,
    last_fraction: Option<f64>,
}

impl Controller {
    pub fn new(config: ControllerConfig) -> Self {
        let quota = config.start_quota();
        let controls = CpuControls {
            idle: config.idle,
            quota,
            frozen: false,
        };
        Self {
            node_cores: config.max_cores,
            samples: Window::new(config.window),
            config,
            controls,
            phase: Phase::Regulating,
            slowdown: SlowdownHeed::Heeded { over_since: None },
            last_change: None,
            last_tighten: None,
            last_slowdown_tighten: None,
            quota_before_slowdown: None,
            last_fraction: None,
        }
    }

    /// Where the loop stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The controls currently asked for.
    pub fn controls(&self) -> CpuControls {
        self.controls
    }

    /// The stolen fraction the last step judged (over the recent window, not
    /// older than the last change); `None` when there was no usable signal.
    pub fn last_stolen_fraction(&self) -> Option<f64> {
        self.last_fraction
    }

    /// The controls to apply when the job starts.
    pub fn start(&mut self, now: Instant) -> Decision {
        self.last_change = Some(now);
        let unset = CpuControls {
            idle: false,
            quota: Quota::Unlimited,
            frozen: false,
        };
        Decision {
            controls: self.controls,
            previous: unset,
            reason: Reason::Start,
            budget: self.config.budget,
        }
    }

    /// The job now runs on `cores` CPUs (see `super::placement`): that is
    /// its node from now on, the quota starts again from the start value
    /// within it (the old one was found for other CPUs), and the signal is
    /// judged only on what happens after the move. A frozen job stays
    /// frozen until its thaw.
    pub fn placed(&mut self, now: Instant, cores: f64) -> Option<Decision> {
        self.config.max_cores = cores.min(self.node_cores).max(self.config.floor_cores);
        self.last_change = Some(now);
        if let Phase::OverAtFloor { .. } = self.phase {
            self.phase = Phase::Regulating;
        }
        if self.controls.frozen {
            return None;
        }
        let quota = self.config.start_quota();
        self.last_tighten = None;
        self.quota_before_slowdown = None;
        Some(self.change(now, |c| c.quota = quota, Reason::Placed { cores }))
    }

    /// One control period: record `obs` taken at `now`, return the change to
    /// apply, if any.
    pub fn step(&mut self, obs: Observation, now: Instant) -> Option<Decision> {
        self.record(obs, now);
        let fraction = self.stolen_fraction(now);
        self.last_fraction = fraction;

        if let Phase::Frozen { at, length } = self.phase {
            let frozen_for = now.saturating_duration_since(at);
            if frozen_for < length {
                return None;
            }
            self.phase = Phase::Regulating;
            // The signal window must not judge the thawed job on the frozen
            // span, and the relax hold-off starts again.
            self.last_tighten = Some(now);
            return Some(self.change(now, |c| c.frozen = false, Reason::Thaw { frozen_for }));
        }

        if let SlowdownHeed::Ignored { until } = self.slowdown
            && now >= until
        {
            self.slowdown = SlowdownHeed::Heeded { over_since: None };
        }
        let slowdown = obs
            .training_slowdown
            .filter(|s| s.is_finite())
            .filter(|_| matches!(self.slowdown, SlowdownHeed::Heeded { .. }));
        // The strongest of the two signals decides; slowdown may tighten only
        // once per `slowdown_interval` because it lags by its own window.
        let steal_over = fraction.is_some_and(|f| f > self.config.budget);
        let slowdown_can_tighten = self
            .last_slowdown_tighten
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.slowdown_interval);
        let slowdown_over = match &mut self.slowdown {
            SlowdownHeed::Heeded { over_since }
                if slowdown.is_some_and(|s| s > self.config.budget) =>
            {
                let since = *over_since.get_or_insert(now);
                now.saturating_duration_since(since) >= self.config.slowdown_persist
            }
            SlowdownHeed::Heeded { over_since } => {
                *over_since = None;
                false
            }
            SlowdownHeed::Ignored { .. } => false,
        };

        if let Some(decision) =
            self.blame_elsewhere(now, slowdown_over && !steal_over, fraction, slowdown)
        {
            return Some(decision);
        }
        if let Phase::Blaming { .. } = self.phase {
            // Held at the floor while it is decided whose slowdown it is.
            return None;
        }

        if steal_over || (slowdown_over && slowdown_can_tighten) {
            let (signal, value) = match (fraction, slowdown) {
                (Some(f), Some(s)) if slowdown_can_tighten && s > f => (Signal::Slowdown, s),
                (Some(f), _) if steal_over => (Signal::Steal, f),
                (_, Some(s)) => (Signal::Slowdown, s),
                (Some(f), None) => (Signal::Steal, f),
                (None, None) => return None,
            };
            return self.over_budget(now, signal, value, fraction);
        }
        if let Phase::OverAtFloor { .. } = self.phase {
            self.phase = Phase::Regulating;
        }

        // Under budget on every available signal: relax if comfortably under.
        let (signal, value) = match (fraction, slowdown) {
            (Some(f), Some(s)) if s > f => (Signal::Slowdown, s),
            (Some(f), _) => (Signal::Steal, f),
            // Without the steal signal the loop holds: slowdown alone is too
            // slow and too noisy to grow the quota on.
            (None, _) => return None,
        };
        if value >= self.config.relax_below * self.config.budget {
            return None;
        }
        let held_off = self
            .last_tighten
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.hold_off);
        let spaced = self
            .last_change
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.increase_interval);
        if !held_off || !spaced {
            return None;
        }
        // Back on the normal path: a later slowdown series starts afresh.
        self.quota_before_slowdown = None;
        match self.controls.quota {
            Quota::Unlimited => None,
            Quota::Cores(q) => {
                let next = q + self.config.increase_cores;
                if next >= self.config.max_cores {
                    Some(self.change(
                        now,
                        |c| c.quota = Quota::Unlimited,
                        Reason::Unlimit { signal, value },
                    ))
                } else {
                    Some(self.change(
                        now,
                        |c| c.quota = Quota::Cores(next),
                        Reason::Relax { signal, value },
                    ))
                }
            }
        }
    }

    fn over_budget(
        &mut self,
        now: Instant,
        signal: Signal,
        value: f64,
        fraction: Option<f64>,
    ) -> Option<Decision> {
        let cfg = &self.config;
        let current = match self.controls.quota {
            Quota::Unlimited => cfg.max_cores,
            Quota::Cores(q) => q,
        };
        // A quota above what the job uses does not bind: shrinking it would
        // change nothing for several periods. Start from the use instead,
        // but never more than two far steps at once: a job that is still
        // starting up uses little and would land on the floor.
        let base = self.job_cores(now).map_or(current, |u| u.min(current));
        let factor = if value > 2.0 * cfg.budget {
            cfg.decrease_far
        } else {
            cfg.decrease
        };
        let lowest = current * cfg.decrease_far * cfg.decrease_far;
        let mut next = (base * factor).max(lowest).max(cfg.floor_cores);
        // A step that would stop just above the floor goes to it: no
        // near-no-op change (0.105 -> 0.100) worth an event.
        if next < cfg.floor_cores * 1.25 {
            next = cfg.floor_cores;
        }
        let at_floor = current <= cfg.floor_cores + 1e-9;

        if at_floor {
            // Slowdown is not attributed to this job: only its own steal may
            // freeze it.
            let Some(f) = fraction.filter(|f| *f > cfg.freeze_above * cfg.budget) else {
                if let Phase::OverAtFloor { .. } = self.phase {
                    self.phase = Phase::Regulating;
                }
                return None;
            };
            let since = match self.phase {
                Phase::OverAtFloor { since } => since,
                _ => {
                    self.phase = Phase::OverAtFloor { since: now };
                    now
                }
            };
            let over_for = now.saturating_duration_since(since);
            if over_for < cfg.freeze_after {
                return None;
            }
            // Duty cycle: running `over_for` at `f`, then frozen for
            // `length`, averages to the relax threshold.
            let target = (cfg.relax_below * cfg.budget).max(1e-6);
            let length = over_for
                .mul_f64((f / target - 1.0).max(0.0))
                .clamp(cfg.freeze_min, cfg.freeze_max);
            self.phase = Phase::Frozen { at: now, length };
            return Some(self.change(
                now,
                |c| c.frozen = true,
                Reason::Freeze {
                    value: f,
                    over_for,
                    length,
                },
            ));
        }
        self.last_tighten = Some(now);
        if signal == Signal::Slowdown {
            self.last_slowdown_tighten = Some(now);
            self.quota_before_slowdown
                .get_or_insert(self.controls.quota);
        }
        Some(self.change(
            now,
            |c| c.quota = Quota::Cores(next),
            Reason::Tighten { signal, value },
        ))
    }

    /// At the floor, a slowdown over budget while the job's own steal is
    /// quiet: after `slowdown_blame_after` of that, it is not the job's (the
    /// floor left it nowhere lower to go and nothing improved).
    fn blame_elsewhere(
        &mut self,
        now: Instant,
        slowdown_only: bool,
        fraction: Option<f64>,
        slowdown: Option<f64>,
    ) -> Option<Decision> {
        let cfg = &self.config;
        let at_floor =
            matches!(self.controls.quota, Quota::Cores(q) if q <= cfg.floor_cores + 1e-9);
        let steal_quiet = fraction.is_some_and(|f| f < cfg.relax_below * cfg.budget);
        if !(at_floor && slowdown_only && steal_quiet && !self.controls.frozen) {
            if let Phase::Blaming { .. } = self.phase {
                self.phase = Phase::Regulating;
            }
            return None;
        }
        let since = match self.phase {
            Phase::Blaming { since } => since,
            _ => {
                self.phase = Phase::Blaming { since: now };
                now
            }
        };
        let held = now.saturating_duration_since(since);
        if held < cfg.slowdown_blame_after {
            return None;
        }
        let ignore_for = cfg.slowdown_ignore_for;
        let back = self
            .quota_before_slowdown
            .take()
            .unwrap_or_else(|| cfg.start_quota());
        self.phase = Phase::Regulating;
        self.slowdown = SlowdownHeed::Ignored {
            until: now + ignore_for,
        };
        Some(self.change(
            now,
            |c| c.quota = back,
            Reason::NotTheJob {
                value: slowdown.unwrap_or(0.0),
                held,
                ignore_for,
            },
        ))
    }

    fn change(
        &mut self,
        now: Instant,
        apply: impl FnOnce(&mut CpuControls),
        reason: Reason,
    ) -> Decision {
        let previous = self.controls;
        apply(&mut self.controls);
        self.last_change = Some(now);
        Decision {
            controls: self.controls,
            previous,
            reason,
            budget: self.config.budget,
        }
    }

    fn record(&mut self, obs: Observation, now: Instant) {
        self.samples.push(
            now,
            Sample {
                steal: obs.steal,
                job_cpu: obs.job_cpu,
            },
        );
    }

    /// The judged span: within the window, not before the last change.
    fn judged(&self, now: Instant) -> Option<crate::window::Span<'_, Instant, Sample>> {
        let horizon = now.checked_sub(self.config.window).unwrap_or(now);
        let start = match self.last_change {
            Some(c) if c > horizon => c,
            _ => horizon,
        };
        // `horizon` itself may fall between samples: the last one before it
        // still bounds a span no longer than the window plus a period.
        self.samples.since(start)
    }

    fn stolen_fraction(&self, now: Instant) -> Option<f64> {
        let span = self.judged(now)?;
        if span.elapsed() < self.config.min_span {
            return None;
        }
        let delta = span.last.steal?.since(span.first.steal?);
        if delta.training_time() < self.config.min_training_time {
            return None;
        }
        delta.fraction()
    }

    /// The job's CPU use over the judged span, in cores; `None` over less
    /// than half a window, too short for a use that ramps up or is sampled
    /// in clock ticks.
    fn job_cores(&self, now: Instant) -> Option<f64> {
        let span = self.judged(now)?;
        if span.elapsed() < self.config.window / 2 {
            return None;
        }
        let used = span.last.job_cpu?.saturating_sub(span.first.job_cpu?);
        cores(used, span.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(100);

    /// A synthetic job: the training runs on one CPU and loses `steal_rate`
    /// of each period to the job; the job uses `job_rate` cores.
    struct Sim {
        t0: Instant,
        now: Instant,
        steal: Duration,
        on_cpu: Duration,
        job_cpu: Duration,
    }

    impl Sim {
        fn new() -> Self {
            let t0 = Instant::now();
            Self {
                t0,
                now: t0,
                steal: Duration::ZERO,
                on_cpu: Duration::ZERO,
                job_cpu: Duration::ZERO,
            }
        }

        fn advance(&mut self, stolen_fraction: f64, job_cores: f64) -> Observation {
            self.now += PERIOD;
            self.steal += PERIOD.mul_f64(stolen_fraction);
            self.on_cpu += PERIOD.mul_f64(1.0 - stolen_fraction);
            self.job_cpu += PERIOD.mul_f64(job_cores);
            Observation {
                steal: Some(StealCounters {
                    steal: self.steal,
                    training_on_cpu: self.on_cpu,
                }),
                job_cpu: Some(self.job_cpu),
                training_slowdown: None,
            }
        }

        fn elapsed(&self) -> Duration {
            self.now - self.t0
        }
    }

    fn controller() -> (Controller, Sim) {
        let sim = Sim::new();
        let mut c = Controller::new(ControllerConfig::new(0.05, 2.0));
        let d = c.start(sim.now);
        assert_eq!(d.reason, Reason::Start);
        (c, sim)
    }

    fn quota(c: &Controller) -> f64 {
        c.controls().quota.cores().unwrap_or(f64::INFINITY)
    }

    #[test]
    fn a_placement_restarts_the_quota_within_the_new_cpus_and_judges_only_after_it() {
        let (mut c, mut sim) = controller();
        // Far over budget: the quota falls from the start value.
        for _ in 0..10 {
            let obs = sim.advance(0.3, 1.0);
            c.step(obs, sim.now);
        }
        assert!(quota(&c) < 0.5, "quota {}", quota(&c));
        // Placed on one CPU of two: the start quota (1 core) fills it.
        let d = c.placed(sim.now, 1.0).expect("a decision");
        assert_eq!(d.reason, Reason::Placed { cores: 1.0 });
        assert_eq!(d.controls.quota, Quota::Unlimited);
        assert_eq!(
            d.to_string(),
            format!(
                "job placed on 1 CPUs: quota {} -> unlimited",
                d.previous.quota
            )
        );
        // The steal before the move is not judged: a clean period after it
        // changes nothing.
        let obs = sim.advance(0.0, 1.0);
        assert_eq!(c.step(obs, sim.now), None);
        // Over budget again: the tightening starts from the new CPUs (1 core).
        let mut tightened = None;
        for _ in 0..5 {
            let obs = sim.advance(0.3, 1.0);
            tightened = tightened.or(c.step(obs, sim.now));
        }
        let q = tightened
            .expect("tightened")
            .controls
            .quota
            .cores()
            .expect("a quota");
        assert!(q <= 0.5 + 1e-9, "quota {q}");
    }

    /// A plant model: stolen fraction grows with the quota (what BRIEF §3
    /// measured: ~0 at 0.25 core, ~5 % at 1 core, much more above).
    fn plant(quota: f64) -> f64 {
        (quota.min(2.0) * 0.08 - 0.02).max(0.0)
    }

    #[test]
    fn starts_idle_with_half_the_cpus() {
        let (c, _) = controller();
        assert_eq!(
            c.controls(),
            CpuControls {
                idle: true,
                quota: Quota::Cores(1.0),
                frozen: false
            }
        );
    }

    #[test]
    fn over_budget_tightens_multiplicatively_within_a_second() {
        let (mut c, mut sim) = controller();
        let mut first = None;
        while sim.elapsed() < Duration::from_secs(1) {
            let obs = sim.advance(0.20, 1.0);
            if let Some(d) = c.step(obs, sim.now) {
                first.get_or_insert(d);
            }
        }
        let d = first.expect("a tightening within a second");
        assert!(matches!(
            d.reason,
            Reason::Tighten {
                signal: Signal::Steal,
                ..
            }
        ));
        // Far over (20 % > 2 × 5 %): halved from the 1.0 core the job used.
        assert_eq!(d.controls.quota, Quota::Cores(0.5));
        assert!(quota(&c) <= 0.25 + 1e-9, "quota {}", quota(&c));
    }

    #[test]
    fn tightens_from_measured_use_when_the_quota_does_not_bind() {
        let mut c = Controller::new(ControllerConfig::new(0.05, 2.0));
        let mut sim = Sim::new();
        c.start(sim.now);
        // Under budget for a second (dead band: no change), then over.
        for _ in 0..10 {
            let obs = sim.advance(0.04, 0.6);
            assert_eq!(c.step(obs, sim.now), None);
        }
        let mut d = None;
        for _ in 0..3 {
            let obs = sim.advance(0.5, 0.6);
            d = d.or(c.step(obs, sim.now));
        }
        // The first judgement sees 8.6 % over the 1 s window (over budget,
        // under 2 × budget): × 0.75 of the 0.6 core used, not of the quota.
        let d = d.expect("tightened");
        match d.controls.quota {
            Quota::Cores(q) => assert!((q - 0.45).abs() < 1e-6, "quota {q}"),
            Quota::Unlimited => panic!("still unlimited"),
        }
    }

    #[test]
    fn a_starting_job_that_uses_little_is_not_sent_to_the_floor_at_once() {
        let (mut c, mut sim) = controller();
        let mut d = None;
        for _ in 0..3 {
            let obs = sim.advance(0.5, 0.01);
            d = d.or(c.step(obs, sim.now));
        }
        assert_eq!(d.expect("tightened").controls.quota, Quota::Cores(0.5));
        // Even with a trusted, tiny use, one step is at most two halvings.
        let mut c = Controller::new(ControllerConfig::new(0.05, 2.0));
        let mut sim = Sim::new();
        c.start(sim.now);
        for _ in 0..10 {
            let obs = sim.advance(0.04, 0.01);
            c.step(obs, sim.now);
        }
        let mut d = None;
        for _ in 0..3 {
            let obs = sim.advance(0.5, 0.01);
            d = d.or(c.step(obs, sim.now));
        }
        assert_eq!(d.expect("tightened").controls.quota, Quota::Cores(0.25));
    }

    #[test]
    fn judges_a_tightening_on_samples_after_it_only() {
        let (mut c, mut sim) = controller();
        // Far over until the first tightening, then exactly at budget×0.8:
        // the old samples must not cause a second tightening.
        let mut tightenings = 0;
        let mut after = false;
        for _ in 0..20 {
            let f = if after { 0.04 } else { 0.30 };
            let obs = sim.advance(f, 1.0);
            if let Some(d) = c.step(obs, sim.now)
                && matches!(d.reason, Reason::Tighten { .. })
            {
                tightenings += 1;
                after = true;
            }
        }
        assert_eq!(tightenings, 1);
    }

    #[test]
    fn relaxes_additively_only_after_the_hold_off() {
        let (mut c, mut sim) = controller();
        // Force one tightening.
        let mut tightened_at = None;
        while tightened_at.is_none() {
            let obs = sim.advance(0.2, 1.0);
            if c.step(obs, sim.now).is_some() {
                tightened_at = Some(sim.now);
            }
        }
        let tightened_at = tightened_at.expect("tightened");
        let q0 = quota(&c);
        let mut relaxes = Vec::new();
        for _ in 0..40 {
            let obs = sim.advance(0.0, q0);
            if let Some(d) = c.step(obs, sim.now) {
                assert!(matches!(d.reason, Reason::Relax { .. }), "{d}");
                relaxes.push((sim.now - tightened_at, quota(&c)));
            }
        }
        let (first_at, first_q) = relaxes[0];
        assert!(
            first_at >= Duration::from_secs(1),
            "relaxed after {first_at:?}"
        );
        assert!((first_q - q0 - 0.05).abs() < 1e-9);
        for w in relaxes.windows(2) {
            assert!(w[1].0 - w[0].0 >= Duration::from_millis(250));
            assert!((w[1].1 - w[0].1 - 0.05).abs() < 1e-9);
        }
    }

    #[test]
    fn holds_in_the_dead_band_between_relax_threshold_and_budget() {
        let (mut c, mut sim) = controller();
        for _ in 0..50 {
            // 4 %: under the 5 % budget, above 0.6 × 5 % = 3 %.
            let obs = sim.advance(0.04, 1.0);
            assert_eq!(c.step(obs, sim.now), None);
        }
        assert_eq!(c.controls().quota, Quota::Cores(1.0));
    }

    #[test]
    fn relaxing_past_the_node_cpus_removes_the_quota() {
        let mut cfg = ControllerConfig::new(0.05, 2.0);
        cfg.start_cores = Some(1.9);
        let mut c = Controller::new(cfg);
        let mut sim = Sim::new();
        c.start(sim.now);
        let mut last = None;
        for _ in 0..20 {
            let obs = sim.advance(0.0, 1.0);
            if let Some(d) = c.step(obs, sim.now) {
                last = Some(d);
            }
        }
        let d = last.expect("relaxed");
        assert!(matches!(d.reason, Reason::Unlimit { .. }));
        assert_eq!(c.controls().quota, Quota::Unlimited);
    }

    #[test]
    fn never_goes_below_the_floor() {
        let (mut c, mut sim) = controller();
        for _ in 0..100 {
            let obs = sim.advance(0.055, quota(&c).min(2.0));
            c.step(obs, sim.now);
            assert!(quota(&c) >= 0.1 - 1e-9);
        }
        assert_eq!(c.controls().quota, Quota::Cores(0.1));
    }

    #[test]
    fn under_budget_at_the_floor_is_never_frozen() {
        let mut cfg = ControllerConfig::new(0.05, 2.0);
        cfg.start_cores = Some(0.1);
        let mut c = Controller::new(cfg);
        let mut sim = Sim::new();
        c.start(sim.now);
        for _ in 0..100 {
            // 4.5 %: in the dead band, under budget.
            let obs = sim.advance(0.045, 0.1);
            assert_eq!(c.step(obs, sim.now), None);
        }
        assert!(!c.controls().frozen);
    }

    #[test]
    fn freezes_at_the_floor_only_after_sustained_far_over_budget_and_thaws() {
        let (mut c, mut sim) = controller();
        let mut events = Vec::new();
        for _ in 0..200 {
            let f = if c.controls().frozen { 0.0 } else { 0.40 };
            let obs = sim.advance(f, quota(&c).min(2.0));
            if let Some(d) = c.step(obs, sim.now) {
                events.push((sim.elapsed(), d));
            }
        }
        let floor_at = events
            .iter()
            .find(|(_, d)| d.controls.quota == Quota::Cores(0.1))
            .map(|(t, _)| *t)
            .expect("reached the floor");
        let (freeze_at, _) = events
            .iter()
            .find(|(_, d)| matches!(d.reason, Reason::Freeze { .. }))
            .expect("froze");
        assert!(*freeze_at >= floor_at + Duration::from_secs(2));
        let (thaw_at, thaw) = events
            .iter()
            .find(|(_, d)| matches!(d.reason, Reason::Thaw { .. }))
            .expect("thawed");
        // 40 % at the floor against a 3 % target: the longest freeze.
        assert_eq!(*thaw_at - *freeze_at, Duration::from_secs(10));
        assert!(!thaw.controls.frozen);
        assert_eq!(thaw.controls.quota, Quota::Cores(0.1));
    }

    #[test]
    fn phases_run_regulating_over_at_floor_frozen_and_back() {
        let (mut c, mut sim) = controller();
        assert_eq!(c.phase(), Phase::Regulating);
        let mut phases = vec![c.phase()];
        for _ in 0..200 {
            let f = if c.controls().frozen { 0.0 } else { 0.40 };
            let obs = sim.advance(f, quota(&c).min(2.0));
            c.step(obs, sim.now);
            let p = c.phase();
            if std::mem::discriminant(&p) != std::mem::discriminant(phases.last().expect("one")) {
                phases.push(p);
            }
        }
        let names: Vec<_> = phases
            .iter()
            .map(|p| match p {
                Phase::Regulating => "regulating",
                Phase::OverAtFloor { .. } => "over at floor",
                Phase::Blaming { .. } => "blaming",
                Phase::Frozen { .. } => "frozen",
            })
            .collect();
        assert_eq!(
            &names[..4],
            ["regulating", "over at floor", "frozen", "regulating"],
            "{phases:?}"
        );
        let Some(Phase::Frozen { length, .. }) =
            phases.iter().find(|p| matches!(p, Phase::Frozen { .. }))
        else {
            panic!("{phases:?}")
        };
        assert_eq!(*length, Duration::from_secs(10));
    }

    #[test]
    fn a_slowdown_at_the_floor_with_quiet_steal_is_held_while_blamed() {
        let (mut c, mut sim) = controller();
        let mut blaming_from = None;
        for _ in 0..600 {
            let mut obs = sim.advance(0.0, 0.1);
            obs.training_slowdown = Some(0.12);
            let d = c.step(obs, sim.now);
            if let Phase::Blaming { since } = c.phase() {
                blaming_from.get_or_insert(since);
                assert_eq!(d, None, "the quota holds while blaming");
            }
            if d.is_some_and(|d| matches!(d.reason, Reason::NotTheJob { .. })) {
                assert_eq!(c.phase(), Phase::Regulating);
                let since = blaming_from.expect("blamed before deciding");
                assert!(sim.now - since >= Duration::from_secs(5));
                return;
            }
        }
        panic!("never decided the slowdown was not the job's");
    }

    #[test]
    fn freeze_length_brings_the_average_to_the_relax_threshold() {
        let (mut c, mut sim) = controller();
        let mut freeze = None;
        for _ in 0..200 {
            let f = if c.controls().frozen { 0.0 } else { 0.10 };
            let obs = sim.advance(f, quota(&c).min(2.0));
            if let Some(d) = c.step(obs, sim.now)
                && let Reason::Freeze {
                    over_for, length, ..
                } = d.reason
            {
                freeze = Some((over_for, length));
                break;
            }
        }
        let (run, length) = freeze.expect("froze at 2 × budget");
        // 10 % while running, 0 while frozen: average = 3 % = 0.6 × 5 %.
        let avg = 0.10 * run.as_secs_f64() / (run + length).as_secs_f64();
        assert!((avg - 0.03).abs() < 1e-3, "average {avg}");
    }

    #[test]
    fn slowdown_over_budget_tightens_although_steal_is_not() {
        let (mut c, mut sim) = controller();
        let mut decisions = Vec::new();
        for _ in 0..30 {
            let mut obs = sim.advance(0.01, 1.0);
            obs.training_slowdown = Some(0.08);
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        assert!(!decisions.is_empty());
        for (_, d) in &decisions {
            assert!(matches!(
                d.reason,
                Reason::Tighten {
                    signal: Signal::Slowdown,
                    ..
                }
            ));
        }
        // Not before it has been over for 2 s, then once per slowdown
        // interval (2 s): at 2.0 s only, within 3 s.
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        assert!(decisions[0].0 >= Duration::from_secs(2), "{decisions:?}");
    }

    #[test]
    fn one_high_slowdown_reading_between_normal_ones_does_not_tighten() {
        let (mut c, mut sim) = controller();
        for i in 0..60 {
            let mut obs = sim.advance(0.01, 1.0);
            // Noise: over budget for 1.5 s out of every 3 s.
            obs.training_slowdown = Some(if i % 30 < 15 { 0.07 } else { 0.02 });
            if let Some(d) = c.step(obs, sim.now) {
                assert!(
                    !matches!(d.reason, Reason::Tighten { .. }),
                    "at {:?}: {d}",
                    sim.elapsed()
                );
            }
        }
    }

    #[test]
    fn a_slowdown_that_outlasts_the_floor_with_quiet_steal_is_not_the_jobs() {
        let (mut c, mut sim) = controller();
        let start = c.controls().quota;
        let mut decisions = Vec::new();
        // 60 s of a constant 12 % slowdown (other load on the node) while the
        // job steals nothing.
        for _ in 0..600 {
            let mut obs = sim.advance(0.0, 0.1);
            obs.training_slowdown = Some(0.12);
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        let (at, blamed) = decisions
            .iter()
            .find(|(_, d)| matches!(d.reason, Reason::NotTheJob { .. }))
            .expect("the slowdown is found not to be the job's");
        // Tightened to the floor first, then 5 s there.
        assert_eq!(blamed.previous.quota, Quota::Cores(0.1), "{decisions:?}");
        assert_eq!(
            blamed.controls.quota, start,
            "back to the quota before the slowdown"
        );
        // Ignored for 30 s afterwards: no slowdown tightening in that time.
        assert!(
            decisions.iter().all(|(t, d)| *t <= *at
                || *t >= *at + Duration::from_secs(30)
                || !matches!(
                    d.reason,
                    Reason::Tighten {
                        signal: Signal::Slowdown,
                        ..
                    }
                )),
            "{decisions:?}"
        );
        assert!(
            blamed.to_string().contains("not the job's doing"),
            "{blamed}"
        );
    }

    #[test]
    fn a_slowdown_with_the_job_stealing_is_never_blamed_elsewhere() {
        let (mut c, mut sim) = controller();
        for _ in 0..600 {
            // Steal right at the budget: not quiet.
            let mut obs = sim.advance(0.05, 0.1);
            obs.training_slowdown = Some(0.12);
            if let Some(d) = c.step(obs, sim.now) {
                assert!(!matches!(d.reason, Reason::NotTheJob { .. }), "{d}");
            }
        }
    }

    #[test]
    fn slowdown_alone_never_freezes() {
        let mut cfg = ControllerConfig::new(0.05, 2.0);
        cfg.start_cores = Some(0.1);
        let mut c = Controller::new(cfg);
        let mut sim = Sim::new();
        c.start(sim.now);
        for _ in 0..100 {
            let mut obs = sim.advance(0.0, 0.1);
            obs.training_slowdown = Some(0.5);
            let d = c.step(obs, sim.now);
            assert!(d.is_none_or(|d| !d.controls.frozen));
        }
    }

    #[test]
    fn stale_progress_file_means_steal_alone_decides() {
        let (mut c, mut sim) = controller();
        // The progress tracker reports `None` once the file is stale: the loop
        // neither tightens on the last slowdown it saw nor stops.
        for i in 0..30 {
            let mut obs = sim.advance(0.04, 1.0);
            obs.training_slowdown = if i < 1 { Some(0.02) } else { None };
            assert_eq!(c.step(obs, sim.now), None);
        }
        let obs = sim.advance(0.3, 1.0);
        let obs2 = sim.advance(0.3, 1.0);
        let d = c.step(obs, sim.now).or(c.step(obs2, sim.now));
        assert!(matches!(
            d.map(|d| d.reason),
            Some(Reason::Tighten {
                signal: Signal::Steal,
                ..
            })
        ));
    }

    #[test]
    fn no_decision_without_training_activity_or_signal() {
        let (mut c, mut sim) = controller();
        for _ in 0..30 {
            sim.now += PERIOD;
            let obs = Observation {
                steal: Some(StealCounters {
                    steal: Duration::ZERO,
                    training_on_cpu: Duration::ZERO,
                }),
                job_cpu: None,
                training_slowdown: None,
            };
            assert_eq!(c.step(obs, sim.now), None);
            assert_eq!(c.step(Observation::default(), sim.now), None);
        }
    }

    #[test]
    fn on_a_plant_model_settles_under_budget_with_small_swing() {
        let (mut c, mut sim) = controller();
        let mut fractions = Vec::new();
        for _ in 0..600 {
            let q = quota(&c);
            let obs = sim.advance(plant(q), q.min(2.0));
            c.step(obs, sim.now);
            if sim.elapsed() >= Duration::from_secs(20)
                && let Some(f) = c.last_stolen_fraction()
            {
                fractions.push(f);
            }
        }
        let max = fractions.iter().copied().fold(0.0, f64::max);
        let min = fractions.iter().copied().fold(1.0, f64::min);
        assert!(max <= 0.05 + 1e-9, "max {max}");
        assert!(max - min <= 0.04, "swing {min}..{max}");
        // And it does not starve the job: the quota stays well above the floor.
        assert!(quota(&c) > 0.5, "quota {}", quota(&c));
    }

    #[test]
    fn every_decision_explains_itself() {
        let (mut c, mut sim) = controller();
        let mut d = None;
        for _ in 0..3 {
            let obs = sim.advance(0.3, 1.0);
            d = d.or(c.step(obs, sim.now));
        }
        let d = d.expect("tightened");
        let text = d.to_string();
        assert!(text.contains("stolen fraction 30.0%"), "{text}");
        assert!(text.contains("1.00 cores -> 0.50 cores"), "{text}");
    }
}
