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
//! **The budget, in one sentence:** the share of the training's CPU time
//! stolen by the job over every [`ControllerConfig::horizon`] (10 s) of the
//! job stays under the budget (so over the whole job too; its first horizon
//! is judged whole, not at every moment of it); with a progress file, the
//! training's slowdown averaged over the same horizon is held to it too.
//! Quota cuts are the means only where they are seen to lower the steal;
//! where they are not, the evaluation keeps its CPU and the budget is held
//! by freezing the job in a duty cycle.
//!
//! The loop spends that budget rather than fearing it:
//! - the job starts in the idle scheduling class (unless configured off)
//!   without a quota: the idle class alone is never second-guessed until a
//!   measurement says it does not hold the budget;
//! - the budget used is the stolen fraction over the horizon (the whole job
//!   while it is shorter than that), and it works as a bucket: a cut comes
//!   only when the rate over the last [`ControllerConfig::lookahead`] (not
//!   before the last change, and over at least half a window), kept up
//!   until a cut made now could be judged (`lookahead`), would put the
//!   horizon ending then over the budget, with the rest of a job's first
//!   horizon assumed at the relax threshold (a start-up burst that the rest
//!   can make up for is waited out). A spike the bucket holds changes
//!   nothing, and a steady rate between the target and the budget is spent,
//!   not cut (the current rate and the horizon projected at it must also be
//!   over the target);
//! - tightening cuts the quota in proportion to how far the current rate is
//!   over the target (`spend × budget`; in a job's first horizon, over what
//!   the rest of it needs when that is lower), from the job's measured use
//!   when that is below the quota, never below the floor;
//! - one cut at a time, on a rate measured over at least half a window: a
//!   cut is a trial. Once the rate after it has been measured over
//!   [`ControllerConfig::lookahead`], it must have fallen from the rate over
//!   as long a span before it by at least
//!   [`ControllerConfig::trial_share`] of what a proportional response
//!   predicts (`value × (1 − quota now ÷ quota cut from)`). Another cut
//!   comes before the verdict only if waiting for it would spend the
//!   horizon's budget; it does not put the verdict off (due `lookahead`
//!   after the series' first cut, on at least half a window after the
//!   latest). A cut that did not pay is undone (with any made before its
//!   verdict, and with earlier cuts judged to pay when, counted from the
//!   rate before them, all the cuts together did not pay either: their
//!   verdict saw a spike pass, not the quota at work) and the steal cuts
//!   nothing for
//!   [`ControllerConfig::unpaid_hold`]: near the idle class's floor, the
//!   job's steal follows the training's wake-up latency, not the job's CPU
//!   time, and a cut only costs the evaluation. If the rate has overspent
//!   since the first cut, the job is frozen with the undo;
//! - relaxing, once the projection is under `relax_below × budget` and after
//!   a hold-off since the last tightening, grows the quota geometrically;
//!   past the node's CPU count it is removed (back to the idle class alone).
//!   A step that reaches the quota paid cuts started from waits, like a
//!   recheck, until the horizon can take the rate measured there.
//!   Between that and the target the quota holds, but grows one step after
//!   [`ControllerConfig::probe_after`] without a change, and cuts judged
//!   to pay are tried undone [`ControllerConfig::recheck_after`] after
//!   their verdict (twice as late each time the rate answers with cuts that
//!   pay again, up to [`ControllerConfig::recheck_max`]), when the horizon
//!   can take the rate from before them for a window: a cut that only
//!   seemed to pay does not stay for the rest of the job;
//! - past the quota, the idle class itself is loosened: with no quota and
//!   every signal under the relax threshold for
//!   [`ControllerConfig::lift_after`], the job is lifted into the normal
//!   class at the lowest weight, on trial. A current rate and the
//!   horizon's projection back over the relax threshold out of the class
//!   send it back (on trial, a current rate over the target alone; the
//!   slowdown once its readings have been over for
//!   [`ControllerConfig::slowdown_persist`]), before any cut or pause; at
//!   the verdict the job must have used
//!   [`ControllerConfig::lift_gain`] more CPU than in the class, or it goes
//!   back too. A training with a thread on every CPU leaves an idle-class
//!   job only the gaps, and a lowest-weight job within budget twice that;
//!   beside other trainings the same lift costs more than the budget, so
//!   it is an experiment, undone on the measured answer, not a rule;
//! - at the floor, or with cuts known not to pay, still over budget on the
//!   job's own steal for a sustained time, or as soon as the horizon is
//!   spent to the target (the last resort): the job is frozen until the
//!   horizon that ends with the freeze is back at the relax threshold
//!   (bounded; steal from just before it stays in the horizon until it
//!   drops out), then thawed at the quota it had. Without paying cuts that
//!   needs the horizon already spent to the relax threshold, not only a
//!   projection; while freezes hold the budget, cuts are not tried again;
//! - a slowdown over budget that the steal does not explain (cache, memory
//!   bandwidth, or load from outside the jobs) is blamed by experiment: the
//!   job is paused and the training's slowdown over the paused span alone
//!   (at least [`ControllerConfig::experiment_length`], at most
//!   [`ControllerConfig::experiment_limit`]) compared with the one before.
//!   The training's rate while the job is paused is its job-free rate
//!   now: the caller takes it as the new baseline (see
//!   [`Observation::paused_slowdown`]). A pause is made only when it could find
//!   the job guilty: the answer needs a fall of more than twice the
//!   readings' spread over the horizon, which a smaller slowdown cannot
//!   show, so it waits. If pausing helped, the job is the cause: its quota
//!   is cut and the slowdown is heeded as its own for a while. If not, the
//!   pause is undone and the slowdown ignored for a while.
//!
//! The training process is never touched: every output is a control on the
//! job's cgroup.
//!
//! Where the loop stands is one [`Phase`]; the slowdown signal's own state
//! (heeded, known to be the job's, or ignored for a while) is a
//! [`SlowdownHeed`].

use std::{collections::VecDeque, fmt, time::Duration, time::Instant};

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
    /// While the job is paused for a blame experiment, the same over the
    /// paused span alone (steps written once the pause took hold); `None`
    /// until that span holds enough steps. When the experiment answers, the
    /// caller makes the training's rate over that span its new baseline:
    /// the slowdown is the job's against what the training does without it
    /// now, not against a rate learnt before the job that may have drifted.
    pub paused_slowdown: Option<f64>,
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

    /// Whether this quota allows at least as much as `other`.
    pub fn at_least(self, other: Quota) -> bool {
        match (self, other) {
            (Quota::Unlimited, _) => true,
            (Quota::Cores(_), Quota::Unlimited) => false,
            (Quota::Cores(a), Quota::Cores(b)) => a >= b,
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

/// Who a slowdown the steal does not explain was found to come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Pausing the job lowered the slowdown: the job (cache, memory
    /// bandwidth, anything but CPU time).
    Job,
    /// Pausing the job changed nothing: load from outside the jobs.
    Elsewhere,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Job => "job",
            Cause::Elsewhere => "elsewhere",
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the controls changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// The job starts: idle class and the start quota.
    Start,
    /// The budget would be spent: the quota shrank. `value` is the current
    /// rate.
    Tighten { signal: Signal, value: f64 },
    /// Well under budget after the hold-off: the quota grew.
    Relax { signal: Signal, value: f64 },
    /// The quota grew past the node's CPUs: removed.
    Unlimit { signal: Signal, value: f64 },
    /// Under budget but not well under for `held`: the quota grew one step
    /// (or was removed) to see whether the job can have more. A rate that
    /// rises over the target with it is cut back as usual.
    Probe {
        signal: Signal,
        value: f64,
        held: Duration,
    },
    /// A steal-driven series of cuts did not pay: the stolen fraction went
    /// from `before` (the rate that started the series) only to `after`,
    /// less than `trial_share` of what a proportional response would give.
    /// The quota goes back to what it was before the series (before the
    /// earlier cuts judged to pay too, and `before` is their starting rate,
    /// when all of them together did not pay either), and the steal
    /// cuts nothing for `hold_for`. When the rate has overspent the horizon
    /// since the series began, the job is frozen at once for `frozen_for`
    /// (the duty cycle's freeze, without waiting for it again).
    CutDidNotPay {
        before: f64,
        after: f64,
        hold_for: Duration,
        frozen_for: Option<Duration>,
    },
    /// A slowdown-driven cut did not pay: the slowdown went from `before`
    /// (the reading it was made on) only to `after`, less than
    /// `trial_share` of what a response in proportion to the job's CPU
    /// would give, and not to the target. The quota goes back to what it
    /// was before the cut, and for `hold_for` the slowdown neither cuts nor
    /// pauses the job.
    SlowdownCutDidNotPay {
        before: f64,
        after: f64,
        hold_for: Duration,
    },
    /// At the floor, or with cuts known not to pay, the stolen fraction
    /// `value` still over budget for `over_for` unbroken, or (`horizon`) with
    /// the horizon's own fraction spent to the target over its last
    /// `over_for`: frozen for `length`.
    Freeze {
        value: f64,
        over_for: Duration,
        horizon: Option<f64>,
        length: Duration,
    },
    /// The freeze ran its time; the job resumes at the floor.
    Thaw { frozen_for: Duration },
    /// The job was moved to other CPUs (`cores` of them): the quota starts
    /// again from the start value within them.
    Placed { cores: f64 },
    /// A slowdown of `value` over budget that the job's steal (`steal`) does
    /// not explain, standing out of its readings' spread (`spread`, their
    /// standard deviation over the horizon): the job is paused for `length`
    /// to see whether it is the cause.
    Experiment {
        value: f64,
        steal: f64,
        spread: f64,
        length: Duration,
    },
    /// The experiment answered: pausing the job for `held` did not lower
    /// the slowdown (`value`) enough: it was `paused` over the paused span
    /// (`None`: the training wrote too few steps to tell). Not the job's
    /// doing: its controls go back to what they were before, and the
    /// slowdown is ignored for `ignore_for`.
    NotTheJob {
        value: f64,
        paused: Option<f64>,
        held: Duration,
        ignore_for: Duration,
    },
    /// The experiment answered: the slowdown fell from `value` to `paused`
    /// while the job was paused: the job is the cause. Its quota is cut and
    /// the slowdown counts as its own for `heed_for`.
    TheJob {
        value: f64,
        paused: f64,
        heed_for: Duration,
    },
    /// In the idle class without a quota, the larger signal (`value`) has
    /// stayed under the relax threshold for `held`: the job leaves the
    /// idle class for the normal class at the lowest weight, on trial (see
    /// [`ControllerConfig::lift_after`]).
    Lift {
        signal: Signal,
        value: f64,
        held: Duration,
    },
    /// Out of the idle class, the `signal` rose to `value`, back over the
    /// relax threshold with the horizon projected at it (or, on trial,
    /// `before_verdict`, over the target): the job goes back to the idle
    /// class, and is not lifted again for `hold_for`.
    Lower {
        signal: Signal,
        value: f64,
        before_verdict: bool,
        hold_for: Duration,
    },
    /// The lift's verdict: out of the idle class the job used `after` cores
    /// against `before` in it, less than [`ControllerConfig::lift_gain`]
    /// more: it was not short of CPU, and goes back to the idle class for
    /// at least `hold_for`.
    LiftDidNotPay {
        before: f64,
        after: f64,
        hold_for: Duration,
    },
}

impl Reason {
    /// A short name for events and reports.
    pub fn action(&self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Tighten { .. } => "tighten",
            Reason::Relax { .. } => "relax",
            Reason::Unlimit { .. } => "unlimit",
            Reason::Probe { .. } => "probe",
            Reason::CutDidNotPay { .. } => "cut_did_not_pay",
            Reason::SlowdownCutDidNotPay { .. } => "slowdown_cut_did_not_pay",
            Reason::Freeze { .. } => "freeze",
            Reason::Thaw { .. } => "thaw",
            Reason::Placed { .. } => "placed",
            Reason::Experiment { .. } => "blame_experiment",
            Reason::NotTheJob { .. } => "slowdown_not_from_job",
            Reason::TheJob { .. } => "slowdown_from_job",
            Reason::Lift { .. } => "lift",
            Reason::Lower { .. } => "lower",
            Reason::LiftDidNotPay { .. } => "lift_did_not_pay",
        }
    }

    /// The answer of a blame experiment, when this is one.
    pub fn blame(&self) -> Option<Cause> {
        match self {
            Reason::NotTheJob { .. } => Some(Cause::Elsewhere),
            Reason::TheJob { .. } => Some(Cause::Job),
            _ => None,
        }
    }
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
                "{signal} {:.1}% would spend budget {budget:.1}% over the horizon: quota {from} -> {to}",
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
            Reason::Probe {
                signal,
                value,
                held,
            } => write!(
                f,
                "{signal} {:.1}% under budget {budget:.1}% for {:.0}s: quota {from} -> {to} to see whether the job can have more",
                pct(value),
                held.as_secs_f64()
            ),
            Reason::CutDidNotPay {
                before,
                after,
                hold_for,
                frozen_for,
            } => {
                write!(
                    f,
                    "stolen fraction went only from {:.1}% to {:.1}% after the quota cuts: they did not pay; quota {from} -> {to}, no cut on steal for {:.0}s",
                    pct(before),
                    pct(after),
                    hold_for.as_secs_f64()
                )?;
                match frozen_for {
                    Some(l) => write!(
                        f,
                        "; over budget since the cuts: job frozen for {:.1}s",
                        l.as_secs_f64()
                    ),
                    None => Ok(()),
                }
            }
            Reason::SlowdownCutDidNotPay {
                before,
                after,
                hold_for,
            } => write!(
                f,
                "training slowdown went only from {:.1}% to {:.1}% after the quota cut: it did not pay; quota {from} -> {to}, no cut or pause on the slowdown for {:.0}s",
                pct(before),
                pct(after),
                hold_for.as_secs_f64()
            ),
            Reason::Freeze {
                value,
                over_for,
                horizon: None,
                length,
            } => write!(
                f,
                "stolen fraction {:.1}% still over budget {budget:.1}% at quota {to} for {:.1}s: job frozen for {:.1}s",
                pct(value),
                over_for.as_secs_f64(),
                length.as_secs_f64()
            ),
            Reason::Freeze {
                value,
                over_for,
                horizon: Some(h),
                length,
            } => write!(
                f,
                "stolen fraction {:.1}% over budget {budget:.1}% at quota {to} with {:.1}% spent over the last {:.1}s: job frozen for {:.1}s",
                pct(value),
                pct(h),
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
            Reason::Experiment {
                value,
                steal,
                spread,
                length,
            } => write!(
                f,
                "training slowdown {:.1}% (readings' spread {:.1}%) over budget {budget:.1}% not explained by the job's stolen fraction {:.1}%: job paused for at least {:.1}s to see whether it is the cause",
                pct(value),
                pct(spread),
                pct(steal),
                length.as_secs_f64()
            ),
            Reason::NotTheJob {
                value,
                paused: Some(paused),
                held,
                ignore_for,
            } => write!(
                f,
                "training slowdown {:.1}% was {:.1}% while the job was paused {:.1}s, not enough of a fall: not the job's doing; controls back to quota {to}, slowdown ignored for {:.0}s",
                pct(value),
                pct(paused),
                held.as_secs_f64(),
                ignore_for.as_secs_f64()
            ),
            Reason::NotTheJob {
                value,
                paused: None,
                held,
                ignore_for,
            } => write!(
                f,
                "training slowdown {:.1}%: too few training steps in the {:.1}s the job was paused to tell whether it fell; not blamed on the job: controls back to quota {to}, slowdown ignored for {:.0}s",
                pct(value),
                held.as_secs_f64(),
                ignore_for.as_secs_f64()
            ),
            Reason::TheJob {
                value,
                paused,
                heed_for,
            } => write!(
                f,
                "training slowdown fell from {:.1}% to {:.1}% while the job was paused: the job is the cause; quota {from} -> {to}, its slowdown heeded for {:.0}s",
                pct(value),
                pct(paused),
                heed_for.as_secs_f64()
            ),
            Reason::Lift {
                signal,
                value,
                held,
            } => write!(
                f,
                "{signal} {:.1}% well under budget {budget:.1}% for {:.0}s in the idle class: the job leaves it for the normal class at the lowest weight, on trial",
                pct(value),
                held.as_secs_f64()
            ),
            Reason::Lower {
                signal,
                value,
                before_verdict,
                hold_for,
            } => write!(
                f,
                "{signal} {:.1}% no longer well under budget {budget:.1}% out of the idle class{}: the job goes back to it, no lift for {:.0}s",
                pct(value),
                if before_verdict {
                    " (lift on trial)"
                } else {
                    ""
                },
                hold_for.as_secs_f64()
            ),
            Reason::LiftDidNotPay {
                before,
                after,
                hold_for,
            } => write!(
                f,
                "out of the idle class the job used {after:.2} cores against {before:.2} in it: not short of CPU; back to the idle class, no lift for {:.0}s",
                hold_for.as_secs_f64()
            ),
        }
    }
}

/// Tuning of the controller (the measurements behind the defaults are in
/// docs/measurements.md).
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerConfig {
    /// The budget on the stolen fraction and the slowdown, as a fraction.
    pub budget: f64,
    /// Put the job in the idle scheduling class.
    pub idle: bool,
    /// CPUs of the node: quotas at or above it mean unlimited.
    pub max_cores: f64,
    /// Quota the job starts with; `None` starts unlimited (the default: the
    /// idle class alone until a measurement says otherwise).
    pub start_cores: Option<f64>,
    /// The quota never goes below this, so evaluation always progresses.
    pub floor_cores: f64,
    /// The current rate: the stolen fraction over at most this much recent
    /// history, never over samples older than the last change.
    pub window: Duration,
    /// The budget holds over every span this long (and over the whole job).
    pub horizon: Duration,
    /// The budget used over the horizon is projected this far ahead at the
    /// current rate: about the time a change takes to show in the rate, and
    /// the time after which a cut is judged (the bucket keeps that much in
    /// hand).
    pub lookahead: Duration,
    /// Tighten when the projection is over `spend × budget`, the current
    /// rate is too, and the bucket would run dry before a cut could be
    /// judged; the cut aims the rate at that target.
    pub spend: f64,
    /// A fraction over less than this span (after a change) is not judged.
    pub min_span: Duration,
    /// Training on-CPU plus steal in the window below which the fraction
    /// means nothing (the training was idle): no decision.
    pub min_training_time: Duration,
    /// The mildest cut of a tightening (quota × this at most)...
    pub decrease: f64,
    /// ...and the strongest.
    pub decrease_far: f64,
    /// Relax only while the projection is below `relax_below × budget`;
    /// between that and `spend × budget` the quota holds (a dead band
    /// against sawtooth).
    pub relax_below: f64,
    /// A relax step grows the quota by at least this, in cores...
    pub increase_cores: f64,
    /// ...and at least by this factor.
    pub increase_factor: f64,
    /// Minimum time between two relax steps.
    pub increase_interval: Duration,
    /// Between the relax threshold and the target the quota holds, but
    /// after this long without a change it grows one step: a cut that
    /// seemed to pay (a start-up spike that passed as it was made) does not
    /// stay for the rest of the job, and the budget is spent.
    pub probe_after: Duration,
    /// Cuts judged to pay are tried undone this long after the verdict
    /// (the quota back to what it was before them, as a probe): a rate that
    /// fell only because a start-up spike passed as they were made does not
    /// cost the evaluation its CPU for long. A rate that rises again is cut
    /// as usual, and that cut is judged anew...
    pub recheck_after: Duration,
    /// ...and when it pays too, the next recheck waits twice as long, up to
    /// this: a job whose cuts keep paying is not let loose every few
    /// seconds. A recheck the rate does not answer with a cut within the
    /// horizon brings the wait back to `recheck_after`.
    pub recheck_max: Duration,
    /// No relax for this long after a tightening.
    pub hold_off: Duration,
    /// Slowdown is measured over seconds: it may tighten at most this often,
    /// so that one slow reading does not drive the quota to the floor.
    pub slowdown_interval: Duration,
    /// ...and only once it has been over budget for this long without a
    /// break: a single window's rate is noisy, so one high reading is not
    /// interference.
    pub slowdown_persist: Duration,
    /// A slowdown over budget that the steal does not explain for this long
    /// starts a blame experiment.
    pub slowdown_blame_after: Duration,
    /// The experiment's answer holds this long: an outside slowdown is
    /// ignored, the job's own is heeded without asking again.
    pub slowdown_ignore_for: Duration,
    /// How long the job is paused at least to see whether it causes a
    /// slowdown: the answer comes at the first period after this that has
    /// a reading over the paused span alone...
    pub experiment_length: Duration,
    /// ...or at this, without one (the job is not blamed).
    pub experiment_limit: Duration,
    /// The pause must lower the slowdown by this × budget for the job to be
    /// the cause (less is noise between rate windows).
    pub experiment_effect: f64,
    /// A steal-driven cut is a trial: once the rate after it has been
    /// measured over `lookahead`, the stolen fraction must have fallen by at
    /// least this share of what a proportional response predicts, or the
    /// cuts of the series are undone.
    pub trial_share: f64,
    /// After cuts that did not pay, the steal cuts nothing for this long
    /// (the freeze duty cycle still holds the horizon); after a slowdown
    /// cut that did not pay, the slowdown cuts and pauses nothing for as
    /// long. A slowdown cut is judged on `trial_share` too, alone,
    /// `slowdown_interval` after it.
    pub unpaid_hold: Duration,
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
    /// The idle class can leave the job short of CPU that the budget could
    /// pay for (a training with a thread on every CPU leaves it only the
    /// gaps). In the idle class without a quota, with every signal under
    /// `relax_below × budget` for this long and nothing on trial or held,
    /// the job is lifted out of it: the normal class at the lowest weight
    /// (its slice too). The lift is a trial: the stolen fraction or the
    /// slowdown back over the relax threshold (the current rate and the
    /// horizon projected at it; on trial, the current rate over the target
    /// alone; the slowdown's readings over for `slowdown_persist` without a
    /// break) sends the job back, and at the verdict (`lift_judge`) the job
    /// must have used `lift_gain` more CPU than in the class, or it goes
    /// back too. Either way no lift for `unpaid_hold`. `None`: the job
    /// never leaves the idle class.
    pub lift_after: Option<Duration>,
    /// How long after a lift it is judged on the job's CPU use.
    pub lift_judge: Duration,
    /// The share more CPU a lifted job must use to stay lifted.
    pub lift_gain: f64,
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
        Self {
            budget,
            idle: true,
            max_cores: cpus,
            start_cores: None,
            floor_cores: 0.1,
            window: Duration::from_secs(1),
            horizon: Duration::from_secs(10),
            lookahead: Duration::from_secs(2),
            spend: 0.9,
            min_span: Duration::from_millis(200),
            min_training_time: Duration::from_millis(20),
            decrease: 0.9,
            decrease_far: 0.5,
            relax_below: 0.7,
            increase_cores: 0.05,
            increase_factor: 1.15,
            increase_interval: Duration::from_millis(250),
            probe_after: Duration::from_secs(3),
            recheck_after: Duration::from_secs(5),
            recheck_max: Duration::from_secs(40),
            hold_off: Duration::from_secs(1),
            slowdown_interval: Duration::from_secs(2),
            slowdown_persist: Duration::from_secs(2),
            slowdown_blame_after: Duration::from_secs(3),
            slowdown_ignore_for: Duration::from_secs(30),
            experiment_length: Duration::from_millis(600),
            experiment_limit: Duration::from_millis(1500),
            experiment_effect: 0.5,
            trial_share: 0.5,
            unpaid_hold: Duration::from_secs(30),
            freeze_above: 1.0,
            freeze_after: Duration::from_secs(2),
            freeze_min: Duration::from_millis(500),
            freeze_max: Duration::from_secs(10),
            lift_after: Some(Duration::from_secs(3)),
            lift_judge: Duration::from_secs(3),
            lift_gain: 0.15,
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
    /// Over budget where no quota cut helps (at the floor, or after cuts
    /// that did not pay), unbroken since `since`: frozen once that lasts
    /// `freeze_after`, or as soon as the horizon is spent to the target.
    Overspending { since: Instant },
    /// The job was paused at `at` to see whether it causes a slowdown of
    /// `slowdown`; `before` are the controls to go back to, `job_cores` the
    /// job's CPU use before the pause (a cut starts from it).
    Experimenting {
        at: Instant,
        before: CpuControls,
        slowdown: f64,
        job_cores: Option<f64>,
        /// The standard deviation of the slowdown readings over the
        /// horizon before the pause: a fall within twice it is noise.
        noise: f64,
    },
    /// Frozen at `at` for `length`; thawed at the first period after.
    Frozen { at: Instant, length: Duration },
}

/// Whether slowdown readings count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlowdownHeed {
    /// They count; `over_since`: since when the slowdown has been over
    /// budget, unbroken. One the steal does not explain is blamed by
    /// experiment.
    Heeded { over_since: Option<Instant> },
    /// An experiment found the job to be the cause: until then a slowdown
    /// over budget tightens without another experiment.
    TheJobs {
        over_since: Option<Instant>,
        until: Instant,
    },
    /// Ignored until then (see [`Reason::NotTheJob`]).
    Ignored { until: Instant },
}

/// A series of steal-driven cuts whose effect is not judged yet.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trial {
    /// The quota before the series' first cut: where it goes back to when
    /// the series did not pay.
    undo_to: Quota,
    /// The rate that started the series...
    value: f64,
    /// ...and the cores it cut from (the quota or the job's use).
    base: f64,
    /// The series' first cut: the verdict comes `lookahead` after it, so
    /// that cuts made before it do not put it off while the budget runs
    /// out...
    first: Instant,
    /// ...and the latest: the rate is judged after it, over at least half a
    /// window.
    at: Instant,
}

/// A slowdown-driven cut whose effect is not judged yet. The slowdown is a
/// step rate read over seconds: each cut is judged alone, on the first
/// reading `slowdown_interval` after it, before another may come.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SlowdownTrial {
    /// The quota before the cut: where it goes back to when it did not pay...
    undo_to: Quota,
    /// ...and the one it set: a change by anything else ends the trial
    /// unjudged.
    cut_to: Quota,
    /// The slowdown it was made on...
    value: f64,
    /// ...and the share of the job's CPU it left: a slowdown in proportion
    /// to the job's CPU keeps this share of `value`.
    kept: f64,
    at: Instant,
}

impl SlowdownTrial {
    /// The cut from `undo_to` to `next` cores, made on the slowdown `value`
    /// from `base` cores (the quota or the job's use, whichever is lower).
    fn new(undo_to: Quota, next: f64, base: f64, value: f64, at: Instant) -> Self {
        Self {
            undo_to,
            cut_to: Quota::Cores(next),
            value,
            kept: (next / base.max(1e-9)).min(1.0),
            at,
        }
    }
}

/// Cuts judged to pay, from the first series of a chain of them on.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Paid {
    /// The quota before the chain's first cut...
    undo_to: Quota,
    /// ...the rate that started it, and the cores it cut from: a later
    /// series that does not pay judges the whole chain on them.
    value: f64,
    base: f64,
    /// The latest verdict (the chain is tried undone `recheck_wait` later).
    verdict: Instant,
}

/// The job out of the idle class, on trial until `judged`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Lifted {
    at: Instant,
    /// The job's CPU use in the idle class just before (over `lookahead`).
    cores_before: Option<f64>,
    judged: bool,
    /// Since when the slowdown has been over what the lift may spend,
    /// without a break.
    slowdown_over_since: Option<Instant>,
}

impl Trial {
    /// When the series is judged.
    fn verdict_at(&self, cfg: &ControllerConfig) -> Instant {
        (self.first + cfg.lookahead).max(self.at + cfg.window / 2)
    }
}

/// The budget used so far, as [`Controller::budget_used`] reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetUsed {
    /// Stolen fraction over the horizon (the whole job while shorter).
    pub steal: f64,
    /// Mean slowdown over the horizon, when the progress file gives one.
    pub slowdown: Option<f64>,
    /// The budget (fraction).
    pub budget: f64,
}

impl BudgetUsed {
    /// The larger of the two signals: what is held against the budget.
    pub fn used(&self) -> f64 {
        self.slowdown.map_or(self.steal, |s| s.max(self.steal))
    }
}

impl fmt::Display for BudgetUsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1}% of {:.1}%",
            self.used() * 100.0,
            self.budget * 100.0
        )
    }
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
    /// Slowdown readings over the horizon.
    slowdowns: VecDeque<(Instant, f64)>,
    phase: Phase,
    slowdown: SlowdownHeed,
    /// When the controls last changed (the signal is judged only after it).
    last_change: Option<Instant>,
    /// When the quota last shrank (relaxing waits `hold_off` after it).
    last_tighten: Option<Instant>,
    /// When the slowdown last shrank it (at most once a `slowdown_interval`).
    last_slowdown_tighten: Option<Instant>,
    /// The quota before the first slowdown cut of a series: an experiment
    /// that finds the slowdown is not the job's goes back to it.
    quota_before_slowdown: Option<Quota>,
    /// Steal-driven cuts not judged yet.
    trial: Option<Trial>,
    /// A slowdown-driven cut not judged yet.
    slowdown_trial: Option<SlowdownTrial>,
    /// A slowdown cut did not pay: the slowdown cuts and pauses nothing
    /// until then.
    slowdown_cuts_held_until: Option<Instant>,
    /// Cuts judged to pay (they are tried undone `recheck_wait` after the
    /// latest verdict).
    paid: Option<Paid>,
    /// How long after a verdict paid cuts are tried undone: from
    /// `recheck_after`, doubled each time a recheck was answered by cuts
    /// that paid again, up to `recheck_max`.
    recheck_wait: Duration,
    /// When the latest recheck was made, until it is answered (cuts that
    /// paid again) or the horizon passes without a cut.
    rechecked: Option<Instant>,
    /// Cuts did not pay: the steal cuts nothing until then.
    steal_cuts_held_until: Option<Instant>,
    last_fraction: Option<f64>,
    last_horizon: Option<f64>,
    last_blame: Option<Cause>,
    /// Out of the idle class (see [`ControllerConfig::lift_after`]).
    lifted: Option<Lifted>,
    /// A lift was undone: none until then.
    lift_held_until: Option<Instant>,
    /// Time out of the idle class in lifts already undone, and how many
    /// lifts were made.
    lifted_before: Duration,
    lifts: u32,
}

impl Controller {
    pub fn new(config: ControllerConfig) -> Self {
        let quota = config.start_quota();
        let recheck_wait = config.recheck_after;
        let controls = CpuControls {
            idle: config.idle,
            quota,
            frozen: false,
        };
        Self {
            node_cores: config.max_cores,
            samples: Window::new(config.horizon.max(config.window)),
            slowdowns: VecDeque::new(),
            config,
            controls,
            phase: Phase::Regulating,
            slowdown: SlowdownHeed::Heeded { over_since: None },
            last_change: None,
            last_tighten: None,
            last_slowdown_tighten: None,
            quota_before_slowdown: None,
            trial: None,
            slowdown_trial: None,
            slowdown_cuts_held_until: None,
            paid: None,
            recheck_wait,
            rechecked: None,
            steal_cuts_held_until: None,
            last_fraction: None,
            last_horizon: None,
            last_blame: None,
            lifted: None,
            lift_held_until: None,
            lifted_before: Duration::ZERO,
            lifts: 0,
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

    /// The budget used over the horizon at the last step; `None` before
    /// there was a usable steal signal.
    pub fn budget_used(&self) -> Option<BudgetUsed> {
        Some(BudgetUsed {
            steal: self.last_horizon?,
            slowdown: self.horizon_slowdown(),
            budget: self.config.budget,
        })
    }

    /// How long the job has been out of the idle class by `now` (all
    /// lifts together, the one still on included) and how many lifts were
    /// made: what the lift spent, for the report.
    pub fn out_of_idle_class(&self, now: Instant) -> (Duration, u32) {
        let current = self
            .lifted
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l.at));
        (self.lifted_before + current, self.lifts)
    }

    /// The answer of the last blame experiment, if one ran.
    pub fn last_blame(&self) -> Option<Cause> {
        self.last_blame
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
    /// frozen until its thaw (or the end of its experiment).
    pub fn placed(&mut self, now: Instant, cores: f64) -> Option<Decision> {
        self.config.max_cores = cores.min(self.node_cores).max(self.config.floor_cores);
        self.last_change = Some(now);
        if let Phase::Overspending { .. } = self.phase {
            self.phase = Phase::Regulating;
        }
        let quota = self.config.start_quota();
        if let Phase::Experimenting { before, .. } = &mut self.phase {
            before.quota = quota;
        }
        self.trial = None;
        self.slowdown_trial = None;
        self.paid = None;
        self.rechecked = None;
        if self.controls.frozen {
            return None;
        }
        self.last_tighten = None;
        Some(self.change(now, |c| c.quota = quota, Reason::Placed { cores }))
    }

    /// One control period: record `obs` taken at `now`, return the change to
    /// apply, if any.
    pub fn step(&mut self, obs: Observation, now: Instant) -> Option<Decision> {
        self.record(obs, now);
        let fraction = self.stolen_fraction(now);
        self.last_fraction = fraction;
        let horizon = self.horizon_fraction();
        self.last_horizon = horizon;
        let slowdown_reading = obs.training_slowdown.filter(|s| s.is_finite());

        match self.phase {
            Phase::Frozen { at, length } => {
                let frozen_for = now.saturating_duration_since(at);
                if frozen_for < length {
                    return None;
                }
                self.phase = Phase::Regulating;
                // The signal window must not judge the thawed job on the
                // frozen span, and the relax hold-off starts again.
                self.last_tighten = Some(now);
                return Some(self.change(now, |c| c.frozen = false, Reason::Thaw { frozen_for }));
            }
            Phase::Experimenting {
                at,
                before,
                slowdown,
                job_cores,
                noise,
            } => {
                let held = now.saturating_duration_since(at);
                let paused = obs.paused_slowdown.filter(|s| s.is_finite());
                if held < self.config.experiment_length
                    || (paused.is_none() && held < self.config.experiment_limit)
                {
                    return None;
                }
                return Some(self.conclude(
                    now,
                    held,
                    before,
                    (slowdown, paused, noise),
                    job_cores,
                ));
            }
            Phase::Regulating | Phase::Overspending { .. } => {}
        }
        if let Some(d) = self.judge_trial(now) {
            return Some(d);
        }
        if let Some(d) = self.judge_slowdown_trial(now, slowdown_reading) {
            return Some(d);
        }
        let slowdown_cuts_held = self
            .slowdown_cuts_held_until
            .is_some_and(|until| now < until);

        let heed_until = match self.slowdown {
            SlowdownHeed::Ignored { until } | SlowdownHeed::TheJobs { until, .. } => Some(until),
            SlowdownHeed::Heeded { .. } => None,
        };
        if heed_until.is_some_and(|until| now >= until) {
            self.slowdown = SlowdownHeed::Heeded { over_since: None };
        }
        let slowdown =
            slowdown_reading.filter(|_| !matches!(self.slowdown, SlowdownHeed::Ignored { .. }));
        let projected = self.projected(horizon, fraction);
        let slowdown_projected = slowdown.and_then(|s| {
            let mean = self.horizon_slowdown()?;
            Some(self.project(mean, s, self.slowdown_span(now)))
        });
        let target = self.config.spend * self.config.budget;
        if let Some(d) = self.judge_lift(now, (fraction, projected), (slowdown, slowdown_projected))
        {
            return Some(d);
        }
        // The budget would be spent: the horizon's projection and the
        // current rate are both over the target.
        let steal_cuts_held = self.steal_cuts_held_until.is_some_and(|until| now < until);
        // A cut only when the bucket would run dry before it could be
        // judged, on a rate measured over at least half a window; while a
        // cut is on trial, another only if waiting for its verdict would.
        let steal_over = !steal_cuts_held
            && projected.is_some_and(|p| p > target)
            && fraction.is_some_and(|f| f > target)
            && self.cannot_wait(now);
        let slowdown_over_now =
            slowdown.is_some_and(|s| s > target) && slowdown_projected.is_some_and(|p| p > target);
        let persisted = match &mut self.slowdown {
            SlowdownHeed::Heeded { over_since } | SlowdownHeed::TheJobs { over_since, .. } => {
                if slowdown_over_now {
                    let since = *over_since.get_or_insert(now);
                    Some(now.saturating_duration_since(since))
                } else {
                    *over_since = None;
                    None
                }
            }
            SlowdownHeed::Ignored { .. } => None,
        };
        let slowdown_over = persisted.is_some_and(|d| d >= self.config.slowdown_persist);

        // The job's steal accounts for about as much slowdown as it steals:
        // a slowdown further over that is someone's cache, memory bandwidth
        // or CPU, to be found out by experiment.
        let steal_level = horizon.unwrap_or(0.0).max(fraction.unwrap_or(0.0));
        let explained = slowdown
            .is_some_and(|s| steal_level + self.config.experiment_effect * self.config.budget >= s);
        // In a job's first horizon a slowdown the rest of it can make up
        // for is waited out: neither cut on nor paused for.
        let slowdown_waits = slowdown.is_some_and(|s| self.first_horizon_takes_slowdown(s));
        if let (Some(held), Some(s), SlowdownHeed::Heeded { .. }) =
            (persisted, slowdown, self.slowdown)
            && !explained
            && !slowdown_waits
            && !slowdown_cuts_held
            && held >= self.config.slowdown_blame_after
            && !self.controls.frozen
            && self.pause_could_tell(s)
        {
            return Some(self.experiment(now, s, steal_level));
        }

        let slowdown_can_tighten = (explained
            || matches!(self.slowdown, SlowdownHeed::TheJobs { .. }))
            && !slowdown_cuts_held
            && !slowdown_waits
            && slowdown_over
            && self
                .last_slowdown_tighten
                .is_none_or(|t| now.saturating_duration_since(t) >= self.config.slowdown_interval);
        if steal_cuts_held {
            // Cuts are known not to pay: only a freeze lowers the steal. It
            // needs a horizon already spent to the relax threshold (not
            // only a projection) and a projection over the target: short
            // runs and freezes keep every window under the budget, where
            // waiting for the budget itself would overshoot it for
            // `freeze_after`.
            let overspent = horizon
                .is_some_and(|h| h > self.config.relax_below * self.config.budget)
                && projected.is_some_and(|p| p > target);
            if let Some(d) = self.duty_cycle(now, fraction, overspent) {
                return Some(d);
            }
            if let Phase::Overspending { .. } = self.phase {
                return None;
            }
        }
        if steal_over || slowdown_can_tighten {
            let (signal, value) = match (fraction, slowdown) {
                (Some(f), Some(s)) if slowdown_can_tighten && s > f => (Signal::Slowdown, s),
                (Some(f), _) if steal_over => (Signal::Steal, f),
                (_, Some(s)) => (Signal::Slowdown, s),
                (Some(f), None) => (Signal::Steal, f),
                (None, None) => return None,
            };
            return self.over_budget(now, signal, value, fraction, projected);
        }
        if let Phase::Overspending { .. } = self.phase {
            self.phase = Phase::Regulating;
        }

        // Comfortably under budget on every available signal: relax.
        let relax_at = self.config.relax_below * self.config.budget;
        let (Some(p), Some(f)) = (projected, fraction) else {
            // Without the steal signal the loop holds: slowdown alone is too
            // slow and too noisy to grow the quota on.
            return None;
        };
        if p >= target || f >= target {
            return None;
        }
        let (signal, value) = match slowdown_projected {
            Some(s) if s >= target => return None,
            Some(s) if s > p => (Signal::Slowdown, s),
            _ => (Signal::Steal, p),
        };
        let since_change = self
            .last_change
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if let Some(Paid {
            undo_to,
            verdict,
            value: rate_before,
            ..
        }) = self.paid
            && now.saturating_duration_since(verdict) >= self.recheck_wait
            && self.can_afford(rate_before)
            // The rate since the last change is measured (the dead band's
            // one-step probes keep their own pace).
            && since_change >= self.config.lookahead
            && !self.controls.frozen
        {
            // Under the target a while after cuts that seemed to pay: try
            // them undone. If the rate rises over the target, the usual cut
            // follows and is judged anew.
            self.paid = None;
            self.rechecked = Some(now);
            self.trial = None;
            self.quota_before_slowdown = None;
            return Some(self.change(
                now,
                |c| c.quota = undo_to,
                Reason::Probe {
                    signal,
                    value,
                    held: since_change,
                },
            ));
        }
        // In the dead band between the relax threshold and the target the
        // quota holds, except for a probe once in a while.
        let probe = value >= relax_at;
        if probe && since_change < self.config.probe_after {
            return None;
        }
        let held_off = self
            .last_tighten
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.hold_off);
        if !held_off || since_change < self.config.increase_interval {
            return None;
        }
        let Quota::Cores(q) = self.controls.quota else {
            // No quota to grow: the idle class is what is left to loosen.
            return self.lift(now, signal, value, since_change);
        };
        let next = (q + self.config.increase_cores).max(q * self.config.increase_factor);
        let to = if next >= self.config.max_cores {
            Quota::Unlimited
        } else {
            Quota::Cores(next)
        };
        // Growing back to where paid cuts started is a recheck of them: the
        // rate there was measured, and the horizon must be able to take it
        // until a cut comes.
        let back_past_paid = self.paid.filter(|p| to.at_least(p.undo_to));
        if back_past_paid.is_some_and(|p| !self.can_afford(p.value)) {
            return None;
        }
        // Back on the normal path: a later slowdown series starts afresh,
        // and cuts that brought the rate this low paid.
        self.quota_before_slowdown = None;
        self.trial = None;
        if back_past_paid.is_some() {
            self.paid = None;
        }
        let reason = if probe {
            Reason::Probe {
                signal,
                value,
                held: since_change,
            }
        } else if to == Quota::Unlimited {
            Reason::Unlimit { signal, value }
        } else {
            Reason::Relax { signal, value }
        };
        Some(self.change(now, |c| c.quota = to, reason))
    }

    /// Lifts the job out of the idle class when it has held the budget
    /// well for [`ControllerConfig::lift_after`] (`held`, since the last
    /// change) with nothing else on trial or held: the larger signal
    /// `value` is under the relax threshold and the quota is already gone.
    fn lift(
        &mut self,
        now: Instant,
        signal: Signal,
        value: f64,
        held: Duration,
    ) -> Option<Decision> {
        let cfg = &self.config;
        let after = cfg.lift_after?;
        let passed = |until: Option<Instant>| until.is_none_or(|u| now >= u);
        let ready = cfg.idle
            && self.controls.idle
            && !self.controls.frozen
            && self.controls.quota == Quota::Unlimited
            && self.lifted.is_none()
            && value < cfg.relax_below * cfg.budget
            && held >= after
            && self.trial.is_none()
            && self.slowdown_trial.is_none()
            && self.paid.is_none()
            && self.quota_before_slowdown.is_none()
            // A slowdown found to be the job's is not risked again; one
            // from elsewhere is ignored here as everywhere (the steal
            // judges the lift).
            && !matches!(self.slowdown, SlowdownHeed::TheJobs { .. })
            && passed(self.lift_held_until)
            && passed(self.steal_cuts_held_until)
            && passed(self.slowdown_cuts_held_until);
        if !ready {
            return None;
        }
        let cores_before = self.job_cores_over(self.since_last_change(now, cfg.lookahead));
        self.lifts += 1;
        self.lifted = Some(Lifted {
            at: now,
            cores_before,
            judged: false,
            slowdown_over_since: None,
        });
        Some(self.change(
            now,
            |c| c.idle = false,
            Reason::Lift {
                signal,
                value,
                held,
            },
        ))
    }

    /// While the job is out of the idle class: back into it as soon as the
    /// steal's current rate and the horizon projected at it are over the
    /// relax threshold (on trial, the rate over the target alone), or once
    /// the slowdown has been so for [`ControllerConfig::slowdown_persist`]
    /// without a break, before any cut or pause is tried: the idle class is
    /// the remedy known to hold.
    /// At the verdict, [`ControllerConfig::lift_judge`] after the lift, the
    /// job must have used [`ControllerConfig::lift_gain`] more CPU than in
    /// the class (measured from a couple of periods after the lift, once
    /// its threads left `SCHED_IDLE`), or it goes back too.
    fn judge_lift(
        &mut self,
        now: Instant,
        (fraction, projected): (Option<f64>, Option<f64>),
        (slowdown, slowdown_projected): (Option<f64>, Option<f64>),
    ) -> Option<Decision> {
        let mut lifted = self.lifted?;
        let cfg = &self.config;
        let target = cfg.spend * cfg.budget;
        let hold_for = cfg.unpaid_hold;
        // The lift spends only what was well under the budget: the rate
        // and the horizon projected at it back over the relax threshold it
        // was made under end it (the slowdown is read against a baseline
        // learnt in seconds, a point or two off either way, and a lift
        // that kept it just under the target overshot the budget in the
        // contention bench). On trial a rate over the target ends it at
        // once, before the projection shows it.
        let relax = cfg.relax_below * cfg.budget;
        let over = |rate: Option<f64>, projected: Option<f64>| {
            rate.filter(|r| {
                (*r > relax && projected.is_some_and(|p| p > relax))
                    || (!lifted.judged && *r > target)
            })
        };
        // The steal is measured since the lift. A slowdown reading is the
        // training's rate over the progress tracker's window, seconds of
        // it from before the lift at first, and it wanders by a point or
        // more between windows: as everywhere else in the loop, it counts
        // only once over for `slowdown_persist` without a break (in the
        // contention matrix 12 of 17 lifts were undone within a second of
        // being made, nearly all on such a reading).
        // The projection keeps its own pace: the persistence counts from
        // the first reading over the threshold.
        let reading_over = slowdown.is_some_and(|s| s > relax);
        lifted.slowdown_over_since = if reading_over {
            lifted.slowdown_over_since.or(Some(now))
        } else {
            None
        };
        self.lifted = Some(lifted);
        let slowdown_persisted = lifted
            .slowdown_over_since
            .is_some_and(|since| now.saturating_duration_since(since) >= cfg.slowdown_persist);
        let lower = over(fraction, projected)
            .map(|v| (Signal::Steal, v))
            .or_else(|| {
                over(slowdown, slowdown_projected)
                    .filter(|_| slowdown_persisted)
                    .map(|v| (Signal::Slowdown, v))
            });
        if let Some((signal, value)) = lower {
            return Some(self.lower(
                now,
                Reason::Lower {
                    signal,
                    value,
                    before_verdict: !lifted.judged,
                    hold_for,
                },
            ));
        }
        if lifted.judged || now.saturating_duration_since(lifted.at) < cfg.lift_judge {
            return None;
        }
        // Nothing to compare with: the budget alone judges it.
        if let Some(before) = lifted.cores_before {
            let after = self.job_cores_over(lifted.at + cfg.min_span)?;
            if after <= before * (1.0 + cfg.lift_gain) {
                let reason = Reason::LiftDidNotPay {
                    before,
                    after,
                    hold_for,
                };
                return Some(self.lower(now, reason));
            }
        }
        self.lifted = Some(Lifted {
            judged: true,
            ..lifted
        });
        None
    }

    /// The job back in the idle class, and no lift for `unpaid_hold`.
    fn lower(&mut self, now: Instant, reason: Reason) -> Decision {
        if let Some(l) = self.lifted.take() {
            self.lifted_before += now.saturating_duration_since(l.at);
        }
        self.lift_held_until = Some(now + self.config.unpaid_hold);
        self.change(now, |c| c.idle = true, reason)
    }

    /// Pauses the job to see whether it causes the slowdown `value`.
    fn experiment(&mut self, now: Instant, value: f64, steal: f64) -> Decision {
        let length = self.config.experiment_length;
        let noise = self.slowdown_noise();
        self.slowdown_trial = None;
        self.phase = Phase::Experimenting {
            at: now,
            before: self.controls,
            slowdown: value,
            job_cores: self.job_cores(now),
            noise,
        };
        self.change(
            now,
            |c| c.frozen = true,
            Reason::Experiment {
                value,
                steal,
                spread: noise,
                length,
            },
        )
    }

    /// The experiment ran: compare the slowdown while paused with the one
    /// before (`slowdowns`: before, over the paused span alone), act on the
    /// answer.
    fn conclude(
        &mut self,
        now: Instant,
        held: Duration,
        before: CpuControls,
        (value, paused, noise): (f64, Option<f64>, f64),
        job_cores: Option<f64>,
    ) -> Decision {
        let cfg = &self.config;
        let heed_for = cfg.slowdown_ignore_for;
        self.phase = Phase::Regulating;
        self.trial = None;
        // The paused span must not count for or against the job.
        self.slowdowns.clear();
        self.last_tighten = Some(now);
        let needed = fall_needed(cfg, value, noise);
        let helped = paused.filter(|p| value - p >= needed);
        match helped {
            Some(paused) => {
                self.last_blame = Some(Cause::Job);
                self.slowdown = SlowdownHeed::TheJobs {
                    over_since: None,
                    until: now + heed_for,
                };
                self.last_slowdown_tighten = Some(now);
                self.quota_before_slowdown.get_or_insert(before.quota);
                let current = before.quota.cores().unwrap_or(cfg.max_cores);
                let base = job_cores.map_or(current, |u| u.min(current));
                let factor = (cfg.spend * cfg.budget / value).clamp(cfg.decrease_far, cfg.decrease);
                let next = (base * factor).max(cfg.floor_cores);
                self.slowdown_trial =
                    Some(SlowdownTrial::new(before.quota, next, base, value, now));
                self.change(
                    now,
                    |c| {
                        *c = before;
                        c.quota = Quota::Cores(next);
                    },
                    Reason::TheJob {
                        value,
                        paused,
                        heed_for,
                    },
                )
            }
            None => {
                self.last_blame = Some(Cause::Elsewhere);
                self.slowdown = SlowdownHeed::Ignored {
                    until: now + heed_for,
                };
                // Cuts an earlier answer made for this slowdown are undone
                // too.
                let quota = self.quota_before_slowdown.take().unwrap_or(before.quota);
                self.change(
                    now,
                    |c| {
                        *c = before;
                        c.quota = quota;
                    },
                    Reason::NotTheJob {
                        value,
                        paused,
                        held,
                        ignore_for: heed_for,
                    },
                )
            }
        }
    }

    fn over_budget(
        &mut self,
        now: Instant,
        signal: Signal,
        value: f64,
        fraction: Option<f64>,
        projected: Option<f64>,
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
        // Aim the rate at the target (lower in a job's first horizon when
        // a start-up was let run), assuming steal in proportion to the
        // job's CPU.
        let aim = match signal {
            Signal::Steal => self.first_horizon_aim(value),
            Signal::Slowdown => None,
        };
        let target = aim.unwrap_or(cfg.spend * cfg.budget);
        let factor = (target / value.max(1e-9)).clamp(cfg.decrease_far, cfg.decrease);
        let lowest = current * cfg.decrease_far * cfg.decrease_far;
        let mut next = (base * factor).max(lowest).max(cfg.floor_cores);
        // A step that would stop just above the floor goes to it: no
        // near-no-op change (0.105 -> 0.100) worth an event.
        if next < cfg.floor_cores * 1.25 {
            next = cfg.floor_cores;
        }
        let at_floor = current <= cfg.floor_cores + 1e-9;

        if at_floor {
            // Only the job's own steal may freeze it, and only when the
            // horizon is really being overspent.
            let overspent = projected.is_some_and(|p| p > cfg.budget);
            return self.duty_cycle(now, fraction, overspent);
        }
        self.last_tighten = Some(now);
        if signal == Signal::Slowdown {
            self.last_slowdown_tighten = Some(now);
            self.quota_before_slowdown
                .get_or_insert(self.controls.quota);
            self.slowdown_trial = Some(SlowdownTrial::new(
                self.controls.quota,
                next,
                base,
                value,
                now,
            ));
            // The slowdown's cut muddles what the steal's would show.
            self.trial = None;
        } else {
            // A later cut of the same series is judged with the first: the
            // rate that started the series against the quota now.
            // The rate it is judged against is measured over as long a
            // span as the verdict (`lookahead`, not before the last
            // change): the short window that triggered the cut picks the
            // noise's highs, and any rate after it would look lower.
            let before = self
                .samples
                .since(self.since_last_change(now, cfg.lookahead))
                .and_then(|span| self.fraction_over(span, cfg.window / 2))
                .unwrap_or(value);
            let first = self.trial.unwrap_or(Trial {
                undo_to: self.controls.quota,
                value: before,
                base,
                first: now,
                at: now,
            });
            self.trial = Some(Trial { at: now, ..first });
        }
        Some(self.change(
            now,
            |c| c.quota = Quota::Cores(next),
            Reason::Tighten { signal, value },
        ))
    }

    /// The last resort when no quota cut lowers the steal: with the job's
    /// own rate over the freeze threshold and the horizon `overspent`, for
    /// `freeze_after` unbroken or until the horizon is spent to the target,
    /// the job is frozen.
    fn duty_cycle(
        &mut self,
        now: Instant,
        fraction: Option<f64>,
        overspent: bool,
    ) -> Option<Decision> {
        let cfg = &self.config;
        // Just after a change there is no rate yet: that breaks nothing.
        let fraction = fraction?;
        let Some(f) = Some(fraction)
            .filter(|f| *f > cfg.freeze_above * cfg.budget)
            .filter(|_| overspent)
        else {
            if let Phase::Overspending { .. } = self.phase {
                self.phase = Phase::Regulating;
            }
            return None;
        };
        let since = match self.phase {
            Phase::Overspending { since } => since,
            _ => {
                self.phase = Phase::Overspending { since: now };
                now
            }
        };
        let over_for = now.saturating_duration_since(since);
        // The bucket: once the horizon itself is spent to the target, a job
        // still stealing over the budget is frozen at once, for as long as
        // brings the horizon back to the relax threshold. Waiting
        // `freeze_after` for an unbroken overspend would let a rate that
        // dips under the budget now and then spend the horizon past it.
        let bucket = self.horizon_spent();
        // Either way the freeze lasts until the horizon is back at the relax
        // threshold: a duty cycle of running and freezing.
        let (over_for, horizon) = match bucket {
            _ if over_for >= cfg.freeze_after => (over_for, None),
            Some(h) => (self.horizon_span(), Some(h)),
            None => return None,
        };
        let length = self.freeze_length();
        let cfg = &self.config;
        self.phase = Phase::Frozen { at: now, length };
        // The frozen span would pass for a cut that paid.
        self.trial = None;
        // While freezes hold the budget, cuts that did not pay are not
        // tried again: each new trial would overspend the horizon anew.
        if let Some(until) = &mut self.steal_cuts_held_until
            && now < *until
        {
            *until = (*until).max(now + length + cfg.unpaid_hold);
        }
        Some(self.change(
            now,
            |c| c.frozen = true,
            Reason::Freeze {
                value: f,
                over_for,
                horizon,
                length,
            },
        ))
    }

    /// How long a freeze lasts: until the horizon that ends with it is back
    /// at the relax threshold (within bounds). While the job is frozen it
    /// steals nothing and the training's time goes on, and the oldest part
    /// of the horizon drops out: steal from just before the freeze stays in
    /// the horizon, and a freeze shorter than that would let the thawed job
    /// spend it again at once. In a job's first horizon nothing drops out.
    fn freeze_length(&self) -> Duration {
        let cfg = &self.config;
        let threshold = cfg.relax_below * cfg.budget;
        let Some(whole) = self.samples.trailing(cfg.horizon) else {
            return cfg.freeze_min;
        };
        let (Some(first), Some(last)) = (whole.first.steal, whole.last.steal) else {
            return cfg.freeze_min;
        };
        let elapsed = whole.elapsed().as_secs_f64();
        if elapsed <= 0.0 {
            return cfg.freeze_min;
        }
        // The training's time (on a CPU or waiting) per second.
        let per_s = last.since(first).training_time().as_secs_f64() / elapsed;
        let mut length = cfg.freeze_min;
        while length < cfg.freeze_max {
            let kept = self
                .samples
                .trailing(cfg.horizon.saturating_sub(length))
                .and_then(|span| Some(last.since(span.first.steal?)))
                .unwrap_or_default();
            let time = kept.training_time().as_secs_f64() + per_s * length.as_secs_f64();
            if time <= 0.0 || kept.steal.as_secs_f64() / time <= threshold {
                return length;
            }
            // A tenth of a second: about one control period.
            length += cfg.min_span / 2;
        }
        cfg.freeze_max
    }

    /// A slowdown cut is judged like a steal cut: on the first reading
    /// `slowdown_interval` after it (a rate over seconds, all of them after
    /// the cut), the slowdown must have fallen by `trial_share` of what a
    /// response in proportion to the job's CPU predicts, or to the target.
    /// If not (the training's own noise, or interference that a smaller
    /// share of the CPU does not lower), the cut is undone, and for
    /// `unpaid_hold` the slowdown neither cuts nor pauses the job: the quota
    /// stays where the cuts that paid left it (a slowdown over the target
    /// still holds off relaxing).
    fn judge_slowdown_trial(&mut self, now: Instant, reading: Option<f64>) -> Option<Decision> {
        let t = self.slowdown_trial?;
        if self.controls.quota != t.cut_to {
            self.slowdown_trial = None;
            return None;
        }
        if now.saturating_duration_since(t.at) < self.config.slowdown_interval {
            return None;
        }
        let after = reading?;
        self.slowdown_trial = None;
        let cfg = &self.config;
        let predicted_fall = t.value * (1.0 - t.kept);
        let paid =
            t.value - after >= cfg.trial_share * predicted_fall || after <= cfg.spend * cfg.budget;
        if paid {
            return None;
        }
        let hold_for = cfg.unpaid_hold;
        self.slowdown_cuts_held_until = Some(now + hold_for);
        Some(self.change(
            now,
            |c| c.quota = t.undo_to,
            Reason::SlowdownCutDidNotPay {
                before: t.value,
                after,
                hold_for,
            },
        ))
    }

    /// Judges the cuts on trial `lookahead` after the first (and half a
    /// window after the latest, at least): a series that lowered the stolen
    /// fraction by less than `trial_share` of a proportional response is
    /// undone (with the paid cuts before it when the whole chain did not
    /// pay either), and the steal cuts nothing for `unpaid_hold`. Near the
    /// idle class's floor, steal follows the training's wake-up latency,
    /// not the job's CPU time, and a cut only costs the evaluation.
    fn judge_trial(&mut self, now: Instant) -> Option<Decision> {
        // A recheck the rate left unanswered for a horizon: the cuts were
        // not needed, and the next ones are rechecked soon again.
        if self.trial.is_none()
            && self
                .rechecked
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.horizon)
        {
            self.rechecked = None;
            self.recheck_wait = self.config.recheck_after;
        }
        let trial = self.trial?;
        let cfg = &self.config;
        if now < trial.verdict_at(cfg) {
            return None;
        }
        let after = self.fraction_over(self.samples.since(trial.at)?, cfg.window / 2)?;
        self.trial = None;
        let now_cores = self.controls.quota.cores().unwrap_or(cfg.max_cores);
        let paid_off = |value: f64, base: f64| {
            let expected = value * (1.0 - (now_cores / base).min(1.0));
            value - after >= cfg.trial_share * expected
        };
        if paid_off(trial.value, trial.base) {
            // Cuts that answer a recheck and pay again: the next recheck
            // waits longer.
            if self.rechecked.take().is_some_and(|t| trial.first >= t) {
                self.recheck_wait = (self.recheck_wait * 2).min(cfg.recheck_max);
            }
            // A chain keeps its first series' quota to go back to, and the
            // rate and cores it started from.
            self.paid = Some(match self.paid {
                Some(p) => Paid { verdict: now, ..p },
                None => Paid {
                    undo_to: trial.undo_to,
                    value: trial.value,
                    base: trial.base,
                    verdict: now,
                },
            });
            return None;
        }
        // The recheck before it, if any, was right.
        self.rechecked = None;
        // This series did not pay. Earlier cuts judged to pay are judged
        // again with it, from where the chain started: when the rate has not
        // fallen by its share of what all the cuts together predict, their
        // verdict was a passing spike (a start-up burst that ended as they
        // were made), not the quota, and they are undone too.
        let (undo_to, before) = match self.paid.take() {
            Some(p) if !paid_off(p.value, p.base) => (p.undo_to, p.value),
            _ => (trial.undo_to, trial.value),
        };
        let hold_for = cfg.unpaid_hold;
        self.steal_cuts_held_until = Some(now + hold_for);
        // The rate has been over the freeze threshold since the first cut:
        // a freeze, if the horizon needs one, need not wait for it again,
        // and when it has waited long enough, it comes with the undo (one
        // period later the bucket the cuts were made for would be empty).
        let over = after > cfg.freeze_above * cfg.budget;
        let over_for = now.saturating_duration_since(trial.first);
        let horizon = self.horizon_fraction();
        let overspent = horizon.is_some_and(|h| h > cfg.relax_below * cfg.budget)
            && self
                .projected(horizon, Some(after))
                .is_some_and(|p| p > cfg.spend * cfg.budget);
        let spent = self.horizon_spent().is_some();
        let frozen_for = (over && overspent && (over_for >= cfg.freeze_after || spent))
            .then(|| self.freeze_length());
        self.phase = match frozen_for {
            Some(length) => Phase::Frozen { at: now, length },
            None if over => Phase::Overspending { since: trial.first },
            None => Phase::Regulating,
        };
        Some(self.change(
            now,
            |c| {
                c.quota = undo_to;
                c.frozen = frozen_for.is_some();
            },
            Reason::CutDidNotPay {
                before,
                after,
                hold_for,
                frozen_for,
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
        if let Some(s) = obs.training_slowdown.filter(|s| s.is_finite()) {
            self.slowdowns.push_back((now, s));
        }
        let horizon = self.config.horizon;
        while self
            .slowdowns
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > horizon)
        {
            self.slowdowns.pop_front();
        }
    }

    /// The judged span: within the window, not before the last change.
    fn judged(&self, now: Instant) -> Option<crate::window::Span<'_, Instant, Sample>> {
        // The start may fall between samples: the last one before it still
        // bounds a span no longer than the window plus a period.
        self.samples
            .since(self.since_last_change(now, self.config.window))
    }

    /// `length` before `now`, or the last change if that was later.
    fn since_last_change(&self, now: Instant, length: Duration) -> Instant {
        let start = now.checked_sub(length).unwrap_or(now);
        match self.last_change {
            Some(c) if c > start => c,
            _ => start,
        }
    }

    /// Whether a steal cut cannot wait: the budget works as a bucket over
    /// the horizon, and a cut comes only when the rate would empty it
    /// before a correction is known to work. The horizon that ends at the
    /// verdict on a cut made now (`lookahead`: a cut that does not pay is
    /// undone then and the freeze takes over), or on the cut on trial,
    /// would be over the budget if the rate of the last `lookahead` (not
    /// before the last change) went on until then, even if it came down to
    /// the target right after. In a job's first horizon (judged whole, not
    /// at every moment of it) the question is whether the rest of it could
    /// still be held at the relax threshold: a later cut aims at what the
    /// rest needs ([`Self::first_horizon_aim`]), so a start-up burst is
    /// waited out as long as the horizon can take it. A rate measured over
    /// less than half a window (since the job started or the controls last
    /// changed) is mostly noise, or a start-up burst: no cut on it.
    fn cannot_wait(&self, now: Instant) -> bool {
        let cfg = &self.config;
        let measured = self
            .judged(now)
            .map_or(Duration::ZERO, |span| span.elapsed());
        if measured < cfg.window / 2 {
            return false;
        }
        let Some(rate) = self
            .samples
            .since(self.since_last_change(now, cfg.lookahead))
            .and_then(|span| self.fraction_over(span, cfg.window / 2))
        else {
            return false;
        };
        // The verdict on the cut on trial, or on the cut this would be.
        let verdict = self.trial.map_or(cfg.lookahead, |trial| {
            trial.verdict_at(cfg).saturating_duration_since(now)
        });
        // A decision and its effect take a couple of periods more.
        let wait = (verdict + cfg.min_span).min(cfg.horizon);
        let Some(spent) = self.horizon_fraction() else {
            return false;
        };
        if let Some(rest) = self.first_horizon_rest(rate, wait) {
            return rest < cfg.relax_below * cfg.budget;
        }
        // The oldest part drops out: what stays is the rate over the latest
        // `horizon - wait`.
        let kept = cfg.horizon - wait;
        let stays = self
            .samples
            .trailing(kept)
            .and_then(|s| self.fraction_over(s, cfg.min_span))
            .unwrap_or(spent);
        let projected =
            (stays * kept.as_secs_f64() + rate * wait.as_secs_f64()) / cfg.horizon.as_secs_f64();
        projected > cfg.budget
    }

    /// In a job's first horizon: the stolen fraction the rest of it may
    /// have for the whole of it to land at the budget, when `rate` goes on
    /// for `wait` from now; `None` when that horizon ends within `wait`, or
    /// nothing is measured yet.
    fn first_horizon_rest(&self, rate: f64, wait: Duration) -> Option<f64> {
        let cfg = &self.config;
        let whole = cfg.horizon.as_secs_f64();
        let span = self.horizon_span().as_secs_f64().min(whole);
        let wait = wait.as_secs_f64();
        let rest = whole - span - wait;
        if rest <= 0.0 {
            return None;
        }
        let spent = self.horizon_fraction()? * span;
        Some((cfg.budget * whole - spent - rate * wait) / rest)
    }

    /// The slowdown's bucket in a job's first horizon, as
    /// [`Self::cannot_wait`] is the steal's: the first 10 s are one window,
    /// judged whole. With the readings so far taken for the whole time the
    /// job has run, and `current` going on for `slowdown_interval` (what a
    /// cut takes to show in the step rate), the rest of that window must
    /// still be able to land it at the budget at the relax threshold or
    /// above; then the slowdown is waited out. `false` after the first
    /// horizon, or with no reading to go on.
    fn first_horizon_takes_slowdown(&self, current: f64) -> bool {
        let cfg = &self.config;
        let Some(mean) = self.horizon_slowdown() else {
            return false;
        };
        let whole = cfg.horizon.as_secs_f64();
        let span = self.horizon_span().as_secs_f64().min(whole);
        let wait = cfg.slowdown_interval.as_secs_f64();
        let rest = whole - span - wait;
        if rest <= 0.0 {
            return false;
        }
        let allowed = (cfg.budget * whole - mean * span - current * wait) / rest;
        allowed >= cfg.relax_below * cfg.budget
    }

    /// What a steal cut made now aims at in a job's first horizon: the rate
    /// that, after the current one went on until the cut's verdict
    /// (`lookahead` and a couple of periods), keeps that horizon at the
    /// budget, when that is under the target; `None` after the first
    /// horizon or when the target will do. [`Self::cannot_wait`] let the
    /// rate run while that stayed at or above the relax threshold.
    fn first_horizon_aim(&self, rate: f64) -> Option<f64> {
        let cfg = &self.config;
        let aim = self.first_horizon_rest(rate, cfg.lookahead + cfg.min_span)?;
        (aim < cfg.spend * cfg.budget).then_some(aim.max(0.0))
    }

    fn stolen_fraction(&self, now: Instant) -> Option<f64> {
        self.fraction_over(self.judged(now)?, self.config.min_span)
    }

    /// The stolen fraction over the horizon, whatever changed in it: the
    /// budget spent stays spent.
    fn horizon_fraction(&self) -> Option<f64> {
        self.fraction_over(
            self.samples.trailing(self.config.horizon)?,
            self.config.min_span,
        )
    }

    /// The stolen fraction over `span`, when it is at least `shortest`
    /// long and the training ran (or waited) enough in it to mean anything.
    fn fraction_over(
        &self,
        span: crate::window::Span<'_, Instant, Sample>,
        shortest: Duration,
    ) -> Option<f64> {
        if span.elapsed() < shortest {
            return None;
        }
        let delta = span.last.steal?.since(span.first.steal?);
        if delta.training_time() < self.config.min_training_time {
            return None;
        }
        delta.fraction()
    }

    /// The horizon's stolen fraction when it is spent to the target: a job
    /// that no cut helps and still steals over the budget is frozen then.
    fn horizon_spent(&self) -> Option<f64> {
        self.horizon_fraction()
            .filter(|h| *h >= self.config.spend * self.config.budget)
    }

    /// Whether the horizon can take `rate` for a window (about the time a
    /// cut takes to come: half a window measured, then a period or two)
    /// and stay under the target: a recheck goes back to the quota at which
    /// the rate was `rate`, and a job that stole half the training's CPU
    /// without a quota must not be let loose on a horizon that cannot hold
    /// that second.
    fn can_afford(&self, rate: f64) -> bool {
        let Some(horizon) = self.horizon_fraction() else {
            return false;
        };
        let exposed =
            (self.config.window.as_secs_f64() / self.config.horizon.as_secs_f64()).min(1.0);
        horizon * (1.0 - exposed) + rate * exposed <= self.config.spend * self.config.budget
    }

    fn horizon_span(&self) -> Duration {
        self.samples
            .trailing(self.config.horizon)
            .map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// The standard deviation of the slowdown readings over the horizon
    /// (0 with fewer than two).
    fn slowdown_noise(&self) -> f64 {
        let n = self.slowdowns.len();
        let Some(mean) = self.horizon_slowdown().filter(|_| n >= 2) else {
            return 0.0;
        };
        let var = self
            .slowdowns
            .iter()
            .map(|(_, s)| (s - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        var.sqrt()
    }

    /// Whether a pause could find the job to be the cause of the slowdown
    /// `value`: a pause that took all of it away must still show the fall
    /// [`fall_needed`] asks of the answer. Where the readings' own spread is
    /// larger than that, the answer could only be "not the job", and the
    /// pause would cost the evaluation its CPU to learn nothing: the
    /// slowdown waits, neither heeded nor blamed, for a reading that stands
    /// out of the spread.
    fn pause_could_tell(&self, value: f64) -> bool {
        value >= fall_needed(&self.config, value, self.slowdown_noise())
    }

    fn horizon_slowdown(&self) -> Option<f64> {
        if self.slowdowns.is_empty() {
            return None;
        }
        Some(self.slowdowns.iter().map(|(_, s)| s).sum::<f64>() / self.slowdowns.len() as f64)
    }

    fn slowdown_span(&self, now: Instant) -> Duration {
        self.slowdowns
            .front()
            .map_or(Duration::ZERO, |(t, _)| now.saturating_duration_since(*t))
    }

    /// What the mean `mean` over `span` becomes `lookahead` from now if the
    /// rate stays at `current` (over a full horizon the oldest part drops
    /// out; this assumes it was at the mean). A short history weighs little
    /// against the current rate.
    fn project(&self, mean: f64, current: f64, span: Duration) -> f64 {
        let ahead = self.config.lookahead.as_secs_f64();
        let weight = ahead / (span.as_secs_f64() + ahead).max(1e-9);
        mean + (current - mean) * weight
    }

    fn projected(&self, horizon: Option<f64>, fraction: Option<f64>) -> Option<f64> {
        let h = horizon?;
        Some(match fraction {
            Some(f) => self.project(h, f, self.horizon_span()),
            None => h,
        })
    }

    /// The job's CPU use over the judged span, in cores; `None` over less
    /// than half a window, too short for a use that ramps up or is sampled
    /// in clock ticks.
    fn job_cores(&self, now: Instant) -> Option<f64> {
        self.job_cores_over(self.since_last_change(now, self.config.window))
    }

    /// The job's CPU use since `from`, in cores; `None` over less than half
    /// a window.
    fn job_cores_over(&self, from: Instant) -> Option<f64> {
        let span = self.samples.since(from)?;
        if span.elapsed() < self.config.window / 2 {
            return None;
        }
        let used = span.last.job_cpu?.saturating_sub(span.first.job_cpu?);
        cores(used, span.elapsed())
    }
}

/// The fall of the slowdown `value` that a pause must show for the job to be
/// its cause: at least half the budget, at least half of the excess over the
/// target (a large slowdown from elsewhere moves by more than the noise
/// between two readings), and more than twice the readings' own spread
/// (`noise`) before it.
fn fall_needed(cfg: &ControllerConfig, value: f64, noise: f64) -> f64 {
    (cfg.experiment_effect * cfg.budget)
        .max(0.5 * (value - cfg.spend * cfg.budget))
        .max(2.0 * noise)
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
                paused_slowdown: None,
            }
        }

        fn elapsed(&self) -> Duration {
            self.now - self.t0
        }
    }

    fn controller() -> (Controller, Sim) {
        let sim = Sim::new();
        let mut cfg = ControllerConfig::new(0.05, 2.0);
        cfg.start_cores = Some(1.0);
        let mut c = Controller::new(cfg);
        let d = c.start(sim.now);
        assert_eq!(d.reason, Reason::Start);
        (c, sim)
    }

    /// [`controller`] where every cut counts as paid (a trial share of 0):
    /// for the rules at the floor, on plants whose steal stays constant
    /// whatever the quota.
    fn controller_cuts_pay() -> (Controller, Sim) {
        let sim = Sim::new();
        let mut cfg = ControllerConfig::new(0.05, 2.0);
        cfg.start_cores = Some(1.0);
        cfg.trial_share = 0.0;
        let mut c = Controller::new(cfg);
        c.start(sim.now);
        (c, sim)
    }

    fn quota(c: &Controller) -> f64 {
        c.controls().quota.cores().unwrap_or(f64::INFINITY)
    }

    /// A controller with the defaults (idle class, no quota) but no lift
    /// out of the class: the rules of cuts, relaxing and freezing, whose
    /// plants give the job the same CPU whatever its class. The lift has
    /// its own tests ([`lifting`]).
    fn idle_only() -> (Controller, Sim) {
        let sim = Sim::new();
        let mut cfg = ControllerConfig::new(0.05, 2.0);
        cfg.lift_after = None;
        let mut c = Controller::new(cfg);
        c.start(sim.now);
        (c, sim)
    }

    /// A controller with the defaults, the lift out of the idle class on.
    fn lifting() -> (Controller, Sim) {
        let sim = Sim::new();
        let mut c = Controller::new(ControllerConfig::new(0.05, 2.0));
        c.start(sim.now);
        (c, sim)
    }

    /// The stolen fraction of every full horizon (10 s) of a run, from the
    /// per-period fractions.
    fn horizon_fractions(per_period: &[f64]) -> Vec<f64> {
        let n = (Duration::from_secs(10).as_millis() / PERIOD.as_millis()) as usize;
        per_period
            .windows(n)
            .map(|w| w.iter().sum::<f64>() / n as f64)
            .collect()
    }

    #[test]
    fn starts_in_the_idle_class_without_a_quota() {
        let (c, _) = idle_only();
        assert_eq!(
            c.controls(),
            CpuControls {
                idle: true,
                quota: Quota::Unlimited,
                frozen: false
            }
        );
    }

    #[test]
    fn the_idle_class_alone_within_budget_is_left_alone() {
        // The issue's case: 2–3 % over the job, spikes of 6–11 % over a few
        // hundred ms. The horizon absorbs them: the job keeps all its CPU.
        // (Lifts out of the class may come and go, as the job already uses
        // both CPUs; no decision takes CPU from it.)
        let (mut c, mut sim) = lifting();
        for i in 0..600 {
            let f = match i % 20 {
                10..=12 => 0.11,
                _ => 0.015,
            };
            let obs = sim.advance(f, 2.0);
            if let Some(d) = c.step(obs, sim.now) {
                assert!(
                    matches!(
                        d.reason,
                        Reason::Lift { .. } | Reason::Lower { .. } | Reason::LiftDidNotPay { .. }
                    ),
                    "at {:?}: {d}",
                    sim.elapsed()
                );
            }
            assert_eq!(c.controls().quota, Quota::Unlimited);
            assert!(!c.controls().frozen);
        }
        let used = c.budget_used().expect("budget used");
        assert!(used.steal < 0.05, "{used}");
    }

    #[test]
    fn a_rate_that_would_spend_the_budget_tightens_in_proportion() {
        let (mut c, mut sim) = idle_only();
        let mut first = None;
        while sim.elapsed() < Duration::from_secs(1) {
            let obs = sim.advance(0.09, 2.0);
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
        // 9 % at once cannot be waited out: the rest of the first horizon
        // would need less than the relax threshold. The cut aims at what
        // the rest needs (3.5 %), but never more than halves.
        let q = d.controls.quota.cores().expect("a quota");
        assert!((q - 1.0).abs() < 1e-6, "quota {q}");
        // 6 %, in proportion to the job's cores: waited out while the rest
        // of the first 10 s could still be held at the relax threshold,
        // then cut in proportion to what the rest needs (× 3.5/6, not a
        // halving, and deeper than the target's × 0.75), and the first
        // horizon lands within the budget.
        let (mut c, mut sim) = idle_only();
        let (per_period, decisions) = drive(&mut c, &mut sim, 150, |_, cores| 0.03 * cores);
        let (at, d) = decisions.first().expect("tightened");
        assert!(
            (Duration::from_secs(3)..Duration::from_millis(4500)).contains(at),
            "cut at {at:?}: {d}"
        );
        let q = d.controls.quota.cores().expect("a quota");
        assert!((1.1..1.3).contains(&q), "quota {q}: {d}");
        let first_horizon = per_period[..100].iter().sum::<f64>() / 100.0;
        assert!(first_horizon <= 0.05 + 1e-9, "first 10 s {first_horizon}");
    }

    #[test]
    fn a_spike_is_cut_only_when_the_horizon_cannot_absorb_it() {
        // 1 % for 9 s, then 10 % : the horizon has room for a while.
        let (mut c, mut sim) = idle_only();
        for _ in 0..90 {
            let obs = sim.advance(0.01, 2.0);
            assert_eq!(c.step(obs, sim.now), None);
        }
        let mut cut_at = None;
        for _ in 0..100 {
            let obs = sim.advance(0.10, 2.0);
            if c.step(obs, sim.now).is_some() {
                cut_at = Some(sim.elapsed());
                break;
            }
        }
        let at = cut_at.expect("cut once the budget would be spent");
        assert!(at > Duration::from_millis(9500), "cut at {at:?}");
        // ...and before the horizon's fraction passed the budget.
        assert!(c.budget_used().expect("used").steal < 0.05);
    }

    #[test]
    fn relaxes_only_after_the_hold_off_and_back_to_unlimited() {
        let (mut c, mut sim) = idle_only();
        let mut tightened_at = None;
        while tightened_at.is_none() {
            let obs = sim.advance(0.2, 2.0);
            if c.step(obs, sim.now).is_some() {
                tightened_at = Some(sim.now);
            }
        }
        let tightened_at = tightened_at.expect("tightened");
        let mut relaxes = Vec::new();
        for _ in 0..300 {
            let obs = sim.advance(0.0, quota(&c).min(2.0));
            if let Some(d) = c.step(obs, sim.now) {
                assert!(
                    matches!(d.reason, Reason::Relax { .. } | Reason::Unlimit { .. }),
                    "{d}"
                );
                relaxes.push((sim.now - tightened_at, d));
            }
        }
        assert!(relaxes[0].0 >= Duration::from_secs(1), "{:?}", relaxes[0]);
        for w in relaxes.windows(2) {
            assert!(w[1].0 - w[0].0 >= Duration::from_millis(250));
        }
        assert_eq!(c.controls().quota, Quota::Unlimited);
    }

    /// A plant: the training loses `0.05 × cores` of the job to steal (10 %
    /// at two cores, the idle class alone).
    fn plant(quota: f64) -> f64 {
        0.05 * quota.min(2.0)
    }

    #[test]
    fn on_a_plant_the_budget_holds_over_every_horizon_and_is_spent() {
        let (mut c, mut sim) = idle_only();
        let mut per_period = Vec::new();
        for _ in 0..1200 {
            let q = quota(&c);
            let f = if c.controls().frozen { 0.0 } else { plant(q) };
            per_period.push(f);
            let obs = sim.advance(f, q.min(2.0));
            c.step(obs, sim.now);
        }
        let horizons = horizon_fractions(&per_period);
        let worst = horizons.iter().copied().fold(0.0, f64::max);
        let whole = per_period.iter().sum::<f64>() / per_period.len() as f64;
        assert!(worst <= 0.05 + 1e-9, "worst 10 s window {worst}");
        assert!(whole <= 0.05, "whole job {whole}");
        // Spent, not feared: the last minute runs at 70–100 % of the budget.
        let late = &horizons[horizons.len() - 500..];
        let least = late.iter().copied().fold(1.0, f64::min);
        assert!(least >= 0.7 * 0.05, "least 10 s window late {least}");
        let used = c.budget_used().expect("used");
        assert!(used.to_string().ends_with("of 5.0%"), "{used}");
    }

    #[test]
    fn cuts_that_keep_paying_are_rechecked_ever_less_often() {
        // 8 % without a quota, 3.8 % (between the relax threshold and the
        // target) with any: every recheck (the cuts tried undone at once)
        // lets the steal rise and is answered by a cut that pays again, so
        // the next recheck waits twice as long after its verdict, up to
        // 40 s. (The one-step probes of the dead band are put off here, so
        // that only rechecks undo cuts.)
        let mut sim = Sim::new();
        let mut cfg = ControllerConfig::new(0.05, 2.0);
        cfg.probe_after = Duration::from_secs(3600);
        let mut c = Controller::new(cfg);
        c.start(sim.now);
        let (per_period, decisions) = drive(&mut c, &mut sim, 2400, |_, cores| {
            if cores >= 2.0 { 0.08 } else { 0.038 }
        });
        let mut last_cut = None;
        let mut delays = Vec::new();
        for (at, d) in decisions {
            match d.reason.action() {
                "tighten" => last_cut = Some(at),
                "probe" => delays.push(at - last_cut.expect("a cut before")),
                other => panic!("{other}: {d}"),
            }
        }
        // A verdict comes 2 s after its cut, and the recheck 5, 10, 20, then
        // 40 s after the verdict; the first waits longer, until the first
        // horizon, which spent 8 % until the cut, can take 8 % for a window.
        let secs: Vec<u64> = delays.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![9, 12, 22, 42, 42, 42, 42], "{delays:?}");
        let worst = horizon_fractions(&per_period)
            .into_iter()
            .fold(0.0, f64::max);
        assert!(worst <= 0.05 + 1e-9, "worst 10 s window {worst}");
    }

    #[test]
    fn a_recheck_waits_until_the_horizon_can_take_the_rate_from_before_the_cuts() {
        // 50 % without a quota (jobs spinning on the training's CPU), 3 %
        // with any: going back to no quota for the second a cut takes
        // would put a 10 s window at 7.7 %. Neither a recheck nor the relax
        // steps go back to it; the quota grows to just short of it, and no
        // window is over budget.
        let (mut c, mut sim) = idle_only();
        let (per_period, decisions) = drive(&mut c, &mut sim, 1200, |_, cores| {
            if cores >= 2.0 { 0.50 } else { 0.03 }
        });
        for (at, d) in &decisions {
            assert!(d.controls.quota != Quota::Unlimited, "at {at:?}: {d}");
        }
        let worst = horizon_fractions(&per_period[20..])
            .into_iter()
            .fold(0.0, f64::max);
        assert!(
            worst <= 0.05 + 1e-9,
            "worst 10 s window after the start {worst}"
        );
    }

    /// Runs `c` for `periods` on a plant whose steal at period `i` is
    /// `steal(i, cores)`, the job using all of its quota up to the node's 2
    /// CPUs (so `cores` is 2 without a quota), and neither stealing nor
    /// running while frozen; returns the per-period fractions and the
    /// decisions with the time since the start.
    fn drive(
        c: &mut Controller,
        sim: &mut Sim,
        periods: usize,
        steal: impl Fn(usize, f64) -> f64,
    ) -> (Vec<f64>, Vec<(Duration, Decision)>) {
        let mut per_period = Vec::new();
        let mut decisions = Vec::new();
        for i in 0..periods {
            let running = !c.controls().frozen;
            let cores = quota(c).min(2.0);
            let f = if running { steal(i, cores) } else { 0.0 };
            per_period.push(f);
            let obs = sim.advance(f, if running { cores } else { 0.0 });
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        (per_period, decisions)
    }

    /// [`drive`] on the idle-only controller; the decisions without times.
    fn run_plant(
        periods: usize,
        steal: impl Fn(usize, f64) -> f64,
    ) -> (Controller, Vec<f64>, Vec<Decision>) {
        let (mut c, mut sim) = idle_only();
        let (per_period, decisions) = drive(&mut c, &mut sim, periods, steal);
        let decisions = decisions.into_iter().map(|(_, d)| d).collect();
        (c, per_period, decisions)
    }

    /// [`run_plant`] on a plant whose steal at period `i` is `steal(i)`
    /// whatever the quota.
    fn run_unresponsive(
        periods: usize,
        steal: impl Fn(usize) -> f64,
    ) -> (Controller, Vec<f64>, Vec<Decision>) {
        run_plant(periods, |i, _| steal(i))
    }

    /// The first decision with `action`.
    fn first<'a>(decisions: &'a [Decision], action: &str) -> &'a Decision {
        decisions
            .iter()
            .find(|d| d.reason.action() == action)
            .unwrap_or_else(|| panic!("no {action} in {decisions:#?}"))
    }

    #[test]
    fn cuts_that_do_not_lower_the_steal_are_undone_and_the_idle_class_keeps_its_cpu() {
        // 4 % whatever the quota (under budget, over the relax threshold:
        // a cut that stays is never relaxed), with 6 s at 6.5 % after 20 s
        // (which would make a 10 s window 5.5 %): the projection cuts, the
        // steal does not follow, the cuts are undone.
        let (c, per_period, decisions) =
            run_unresponsive(600, |i| if (200..260).contains(&i) { 0.065 } else { 0.04 });
        let actions: Vec<_> = decisions.iter().map(|d| d.reason.action()).collect();
        assert!(actions.contains(&"tighten"), "{actions:?}");
        let undo = first(&decisions, "cut_did_not_pay");
        assert_eq!(undo.controls.quota, Quota::Unlimited, "{undo}");
        assert!(undo.to_string().contains("did not pay"), "{undo}");
        assert!(undo.to_string().contains("cores -> unlimited"), "{undo}");
        // No cut survives, and none is made again while the answer holds.
        let last_cut = actions.iter().rposition(|a| *a == "tighten").expect("cut");
        let undone = actions
            .iter()
            .rposition(|a| *a == "cut_did_not_pay")
            .expect("undone");
        assert!(last_cut < undone, "{actions:?}");
        assert_eq!(c.controls().quota, Quota::Unlimited);
        assert!(c.controls().idle && !c.controls().frozen);
        let worst = horizon_fractions(&per_period)
            .into_iter()
            .fold(0.0, f64::max);
        assert!(worst <= 0.05 + 1e-9, "worst 10 s window {worst}");
    }

    #[test]
    fn a_start_up_burst_shorter_than_half_a_second_is_not_cut_on() {
        // 8 % for the first 300 ms (processes starting, buffers faulted
        // in), then 1 %: over half a second the rate is under 4.5 %, and
        // nothing is cut.
        let (c, _, decisions) = run_unresponsive(100, |i| if i < 3 { 0.08 } else { 0.01 });
        let actions: Vec<_> = decisions.iter().map(|d| d.reason.action()).collect();
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(c.controls().quota, Quota::Unlimited);
    }

    #[test]
    fn a_start_up_burst_the_first_horizon_can_take_is_waited_out() {
        // 8 % for the first second whatever the quota (an evaluation
        // starting its workers and faulting in its buffers, as measured
        // beside the loader training), then 2.5 %: the rest of the first
        // 10 s could still be held at the relax threshold, so nothing is
        // cut, and the first horizon stays within the budget.
        assert_left_alone_within_budget(200, |i| if i < 10 { 0.08 } else { 0.025 });
    }

    /// [`run_unresponsive`] on `steal`: the loop must not act at all, the
    /// job keeps no quota, and every full 10 s window is within the budget.
    fn assert_left_alone_within_budget(periods: usize, steal: impl Fn(usize) -> f64) {
        let (c, per_period, decisions) = run_unresponsive(periods, steal);
        let actions: Vec<_> = decisions.iter().map(|d| d.reason.action()).collect();
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(c.controls().quota, Quota::Unlimited);
        let worst = horizon_fractions(&per_period)
            .into_iter()
            .fold(0.0, f64::max);
        assert!(worst <= 0.05, "worst 10 s window {worst}");
    }

    #[test]
    fn a_steady_rate_between_the_target_and_the_budget_is_spent_not_cut() {
        // 4.8 % whatever the quota: every 10 s window is within the 5 %
        // budget, so the bucket never runs dry and nothing is cut (a rule
        // on the target, 4.5 %, would cut, find the cut did not pay and
        // undo it, again and again).
        assert_left_alone_within_budget(600, |_| 0.048);
    }

    #[test]
    fn over_budget_with_cuts_that_do_not_pay_the_duty_cycle_holds_the_horizon() {
        // 8 % whatever the quota: cuts are undone, then freezes hold it.
        let (c, per_period, decisions) = run_unresponsive(1200, |_| 0.08);
        let actions: Vec<_> = decisions.iter().map(|d| d.reason.action()).collect();
        assert!(actions.contains(&"cut_did_not_pay"), "{actions:?}");
        assert!(actions.contains(&"freeze"), "{actions:?}");
        // The freezes run at the quota the undo restored, not at the floor.
        let freeze = first(&decisions, "freeze");
        assert_eq!(freeze.controls.quota, Quota::Unlimited, "{freeze}");
        // Once the first cuts have been judged, every 10 s window holds.
        let horizons = horizon_fractions(&per_period);
        let worst = horizons[100..].iter().copied().fold(0.0, f64::max);
        let whole = per_period.iter().sum::<f64>() / per_period.len() as f64;
        assert!(
            worst <= 0.05 + 1e-9,
            "worst 10 s window {worst}: {actions:?}"
        );
        assert!(whole <= 0.05, "whole job {whole}");
        assert!(c.budget_used().expect("used").steal <= 0.05 + 1e-9);
    }

    #[test]
    fn on_a_proportional_plant_cuts_pay_and_stay() {
        let (mut c, mut sim) = idle_only();
        for _ in 0..600 {
            let q = quota(&c);
            let f = if c.controls().frozen { 0.0 } else { plant(q) };
            let obs = sim.advance(f, q.min(2.0));
            if let Some(d) = c.step(obs, sim.now) {
                assert_ne!(d.reason.action(), "cut_did_not_pay", "{d}");
            }
        }
        // The cuts stay, near the 1 core at which the plant steals the
        // whole budget (the bucket spends it; probes look above).
        assert!(quota(&c) < 1.2, "quota {}", quota(&c));
    }

    /// Deterministic noise in [-1, 1) (a linear congruential generator).
    fn noise(state: &mut u64) -> f64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn noisy_idle_class_steal_within_budget_is_cut_once_at_a_time_and_keeps_its_cpu() {
        // What the loader × threads bench showed: the idle-class job uses
        // 0.8 cores and steals 5 % in its first seconds, 3 % after, with
        // ±2.5 points of noise on every 100 ms; a quota takes off only a
        // fifth of what a proportional plant would. A series of cuts on
        // 200–300 ms windows drove it to the floor; judged one at a time
        // against the rate before it, they are undone.
        for seed in 1..=8u64 {
            let mut state = seed;
            let (mut c, mut sim) = idle_only();
            let (mut used, mut could) = (0.0, 0.0);
            let mut per_period = Vec::new();
            let mut actions = Vec::new();
            for i in 0..600 {
                let base = if i < 30 { 0.055 } else { 0.04 };
                let cores = quota(&c).min(0.8);
                let proportional = base * (0.8 + 0.2 * cores / 0.8);
                let running = !c.controls().frozen;
                let f = if running {
                    (proportional + 0.03 * noise(&mut state)).max(0.0)
                } else {
                    0.0
                };
                per_period.push(f);
                let job = if running { cores } else { 0.0 };
                used += job;
                could += 0.8;
                let obs = sim.advance(f, job);
                if let Some(d) = c.step(obs, sim.now) {
                    actions.push(d.reason.action());
                }
            }
            let share = used / could;
            assert!(
                share >= 0.9,
                "seed {seed}: {share:.2} of the CPU: {actions:?}"
            );
            let worst = horizon_fractions(&per_period)
                .into_iter()
                .fold(0.0, f64::max);
            assert!(worst <= 0.05, "seed {seed}: worst 10 s window {worst}");
        }
    }

    #[test]
    fn cuts_that_seemed_to_pay_as_a_start_up_spike_passed_are_tried_undone() {
        // 10 % for the first 1.5 s, then 3.8 % whatever the quota: the
        // cuts made on the spike look paid when it passes. 5 s after that
        // verdict they are tried undone, the rate does not rise, and the
        // job keeps its CPU from then on.
        let (c, per_period, decisions) =
            run_unresponsive(600, |i| if i < 15 { 0.10 } else { 0.038 });
        let actions: Vec<_> = decisions.iter().map(|d| d.reason.action()).collect();
        assert!(actions.contains(&"tighten"), "{actions:?}");
        assert!(!actions.contains(&"cut_did_not_pay"), "{actions:?}");
        let recheck = decisions
            .iter()
            .position(|d| d.reason.action() == "probe" && d.controls.quota == Quota::Unlimited)
            .unwrap_or_else(|| panic!("{actions:?}"));
        assert!(
            decisions[recheck + 1..]
                .iter()
                .all(|d| d.reason.action() != "tighten"),
            "{actions:?}"
        );
        assert_eq!(c.controls().quota, Quota::Unlimited);
        let worst = horizon_fractions(&per_period)
            .into_iter()
            .fold(0.0, f64::max);
        assert!(worst <= 0.05 + 1e-9, "worst 10 s window {worst}");
    }

    #[test]
    fn cuts_that_seemed_to_pay_are_undone_with_a_later_series_when_together_they_did_not_pay() {
        // Whatever the quota: 10 % for the first second (a start-up
        // burst), 4 % for three, then 7 %. The first cuts look paid as the
        // burst ends; the cuts the 7 % brings next do not pay, and counted
        // from the 10 % before the first, neither did all of them together.
        // Back to the idle class without a quota, not to the first cuts'.
        let (c, _, decisions) = run_unresponsive(100, |i| match i {
            0..10 => 0.10,
            10..40 => 0.04,
            _ => 0.07,
        });
        let first_cut = first(&decisions, "tighten");
        let undo = first(&decisions, "cut_did_not_pay");
        assert_ne!(undo.previous.quota, first_cut.controls.quota, "{undo}");
        assert_eq!(undo.controls.quota, Quota::Unlimited, "{undo}");
        assert!(undo.to_string().contains("from 10.0%"), "{undo}");
        // Over budget whatever the quota: the freezes hold it, not a quota.
        assert_eq!(c.controls().quota, Quota::Unlimited);
    }

    #[test]
    fn a_later_series_that_does_not_pay_keeps_earlier_cuts_that_did() {
        // After a quiet first horizon, 10 % at 2 cores, in proportion to
        // the quota down to 1.1 cores, and 5.5 % below: the first cut pays,
        // later ones hit the floor.
        // Counted from the first, the cuts together paid: only the later
        // series is undone, to the quota the first cut set.
        let (c, _, decisions) = run_plant(200, |i, cores| {
            if i < 100 {
                0.01
            } else {
                (0.05 * cores).max(0.055)
            }
        });
        let first_cut = first(&decisions, "tighten");
        let undo = first(&decisions, "cut_did_not_pay");
        assert_eq!(undo.controls.quota, first_cut.controls.quota, "{undo}");
        assert_ne!(c.controls().quota, Quota::Unlimited);
    }

    #[test]
    fn a_slowdown_the_steal_does_not_explain_is_blamed_by_a_pause_and_undone_when_it_did_not_help()
    {
        let (mut c, mut sim) = idle_only();
        let mut decisions = Vec::new();
        // 12 % slowdown from load outside the jobs, paused or not; the job
        // steals 1 %.
        for _ in 0..200 {
            let frozen = c.controls().frozen;
            let f = if frozen { 0.0 } else { 0.01 };
            let mut obs = sim.advance(f, 2.0);
            obs.training_slowdown = Some(0.12);
            obs.paused_slowdown = frozen.then_some(0.12);
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        let reasons: Vec<_> = decisions.iter().map(|(_, d)| d.reason.action()).collect();
        assert_eq!(
            reasons,
            ["blame_experiment", "slowdown_not_from_job"],
            "{decisions:?}"
        );
        let (start, pause) = &decisions[0];
        let (end, answer) = &decisions[1];
        assert!(pause.controls.frozen);
        assert!(*start >= Duration::from_secs(3), "{start:?}");
        // The shortest pause: the paused span had its reading at once.
        assert_eq!(*end - *start, Duration::from_millis(600));
        // Undone: the controls from before the pause.
        assert_eq!(answer.controls, pause.previous);
        assert_eq!(c.last_blame(), Some(Cause::Elsewhere));
        assert!(
            answer.to_string().contains(
                "was 12.0% while the job was paused 0.6s, not enough of a fall: not the job's doing"
            ),
            "{answer}"
        );
    }

    #[test]
    fn a_pause_without_a_reading_over_its_span_waits_for_one_then_blames_nobody() {
        let (mut c, mut sim) = idle_only();
        let mut decisions = Vec::new();
        // The training's steps are too slow for the paused span to hold a
        // rate until 1 s into the pause.
        let mut paused_at = None;
        for _ in 0..200 {
            let frozen = c.controls().frozen;
            let mut obs = sim.advance(if frozen { 0.0 } else { 0.01 }, 2.0);
            obs.training_slowdown = Some(0.12);
            if frozen {
                let at = *paused_at.get_or_insert(sim.now);
                obs.paused_slowdown = (sim.now - at >= Duration::from_secs(1)).then_some(0.0);
            }
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        let (start, _) = &decisions[0];
        let (end, answer) = &decisions[1];
        // Waited past the shortest pause for the reading, which found the
        // job guilty.
        assert!(*end - *start > Duration::from_millis(900), "{decisions:?}");
        assert_eq!(answer.reason.action(), "slowdown_from_job", "{answer}");

        // No reading ever: answered at the limit, the job not blamed.
        let (mut c, mut sim) = idle_only();
        let mut decisions = Vec::new();
        for _ in 0..200 {
            let f = if c.controls().frozen { 0.0 } else { 0.01 };
            let mut obs = sim.advance(f, 2.0);
            obs.training_slowdown = Some(0.12);
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        let (start, pause) = &decisions[0];
        let (end, answer) = &decisions[1];
        assert_eq!(*end - *start, Duration::from_millis(1500));
        assert_eq!(answer.controls, pause.previous);
        assert_eq!(c.last_blame(), Some(Cause::Elsewhere));
        assert!(
            answer.to_string().contains("too few training steps"),
            "{answer}"
        );
    }

    #[test]
    fn a_slowdown_that_a_pause_lowers_is_the_jobs_and_tightens_without_asking_again() {
        let (mut c, mut sim) = idle_only();
        let mut decisions = Vec::new();
        // Memory-bandwidth interference: a slowdown in proportion to the
        // job's CPU (8 % at two cores), none while it is paused; hardly any
        // steal.
        for _ in 0..600 {
            let q = quota(&c).min(2.0);
            let running = !c.controls().frozen;
            let f = if running { 0.005 } else { 0.0 };
            let mut obs = sim.advance(f, if running { q } else { 0.0 });
            obs.training_slowdown = Some(if running { 0.04 * q } else { 0.0 });
            obs.paused_slowdown = (!running).then_some(0.0);
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push(d);
            }
        }
        let reasons: Vec<_> = decisions.iter().map(|d| d.reason.action()).collect();
        assert_eq!(
            reasons[..2],
            ["blame_experiment", "slowdown_from_job"],
            "{reasons:?}"
        );
        assert_eq!(c.last_blame(), Some(Cause::Job));
        assert!(
            decisions[1].to_string().contains("the job is the cause"),
            "{}",
            decisions[1]
        );
        // The cut starts from what the job used before the pause (two
        // cores), not from the nothing it used while paused.
        let cut = decisions[1].controls.quota.cores().expect("a quota");
        assert!(cut >= 1.0, "cut to {cut}");
        // The answer holds 30 s: one experiment in that time; the slowdown
        // then tightens on its own and holds the budget over the horizon.
        let experiments = reasons.iter().filter(|r| **r == "blame_experiment").count();
        assert!(experiments <= 2, "{reasons:?}");
        let used = c.budget_used().expect("used");
        assert!(used.used() <= 0.05, "{used}: {reasons:?}");
        assert!(quota(&c) < 1.25, "quota {}", quota(&c));
    }

    #[test]
    fn a_slowdown_the_steal_explains_is_held_by_the_steal_not_blamed() {
        let (mut c, mut sim) = idle_only();
        for _ in 0..200 {
            let q = quota(&c);
            let f = if c.controls().frozen { 0.0 } else { plant(q) };
            let mut obs = sim.advance(f, q.min(2.0));
            obs.training_slowdown = Some(f);
            if let Some(d) = c.step(obs, sim.now) {
                assert!(d.reason.blame().is_none(), "{d}");
                assert!(!matches!(d.reason, Reason::Experiment { .. }), "{d}");
            }
        }
    }

    #[test]
    fn a_slowdown_over_budget_that_the_steal_explains_tightens_on_the_slowdown() {
        // 4 % steal (under the 4.5 % target) and a 6 % slowdown: the steal
        // accounts for it, no experiment, and the slowdown holds the budget.
        let (mut c, mut sim) = idle_only();
        let mut decisions = Vec::new();
        for _ in 0..50 {
            let mut obs = sim.advance(0.04, 2.0);
            obs.training_slowdown = Some(0.06);
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        let (at, d) = decisions.first().expect("tightened");
        assert!(
            matches!(
                d.reason,
                Reason::Tighten {
                    signal: Signal::Slowdown,
                    ..
                }
            ),
            "{decisions:?}"
        );
        // Not before the slowdown has been over for 2 s.
        assert!(*at >= Duration::from_secs(2), "{at:?}");
    }

    #[test]
    fn a_start_up_slowdown_the_first_horizon_can_take_is_neither_cut_nor_paused_for() {
        // 6 % for the first 3.5 s, then 2 %: the first 10 s land at 3.5 %.
        // With 4 % steal the slowdown is the steal's (a cut would come at
        // 2 s); with 1 % it is not (a pause would come at 3 s). Neither
        // comes: the rest of the first window makes up for it.
        for steal in [0.04, 0.01] {
            let (mut c, mut sim) = idle_only();
            let mut decisions = Vec::new();
            for i in 0..150 {
                let mut obs = sim.advance(steal, 2.0);
                obs.training_slowdown = Some(if i < 35 { 0.06 } else { 0.02 });
                if let Some(d) = c.step(obs, sim.now) {
                    decisions.push((sim.elapsed(), d));
                }
            }
            assert!(decisions.is_empty(), "steal {steal}: {decisions:#?}");
        }
    }

    #[test]
    fn a_slowdown_cut_that_does_not_lower_the_slowdown_is_undone_and_the_paid_one_holds() {
        // 4 % steal explains the slowdown, which follows the job's CPU from
        // 2 cores (6 %) down to 1.4 cores (4.8 %) and no further: the
        // first cut (to 1.5 cores) lowers it in proportion, the next one
        // (to 1.35) hardly at all. That one is undone, back to the first
        // cut's quota, and the slowdown cuts nothing more for 30 s.
        let (mut c, mut sim) = idle_only();
        let mut decisions = Vec::new();
        for _ in 0..300 {
            let q = quota(&c).min(2.0);
            let mut obs = sim.advance(0.04, q);
            obs.training_slowdown = Some(0.02 + 0.02 * q.clamp(1.4, 2.0));
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        let actions: Vec<_> = decisions.iter().map(|(_, d)| d.reason.action()).collect();
        assert_eq!(
            actions,
            ["tighten", "tighten", "slowdown_cut_did_not_pay"],
            "{decisions:#?}"
        );
        let (_, paid) = &decisions[0];
        let (_, unpaid) = &decisions[1];
        let (undone_at, undo) = &decisions[2];
        assert!((quota(&c) - 1.5).abs() < 0.01, "quota {}", quota(&c));
        assert_eq!(undo.controls.quota, paid.controls.quota, "{undo}");
        assert_eq!(undo.previous.quota, unpaid.controls.quota, "{undo}");
        assert!(undo.to_string().contains("from 5.0% to 4.8%"), "{undo}");
        // Held: nothing more in the 30 s after the undo (the run ends 30 s
        // after the start, within the hold).
        assert!(*undone_at < Duration::from_secs(10), "{undone_at:?}");
    }

    /// Runs `c` until an experiment starts under a constant `slowdown`
    /// (the job stealing 1 %), then feeds `paused` during the pause; returns
    /// the answer.
    fn experiment_answer(
        c: &mut Controller,
        sim: &mut Sim,
        slowdown: f64,
        paused: f64,
    ) -> Decision {
        for _ in 0..400 {
            let frozen = c.controls().frozen;
            let mut obs = sim.advance(
                if frozen { 0.0 } else { 0.01 },
                if frozen { 0.0 } else { 2.0 },
            );
            obs.training_slowdown = Some(if frozen { paused } else { slowdown });
            obs.paused_slowdown = frozen.then_some(paused);
            if let Some(d) = c.step(obs, sim.now)
                && d.reason.blame().is_some()
            {
                return d;
            }
        }
        panic!("no experiment answered");
    }

    /// Runs an idle-only job whose training reads `reading(i)` slowdown at
    /// period `i` while the job runs and `paused` while it is frozen, with
    /// 1 % steal; returns the experiment's answer.
    fn answer_with(reading: impl Fn(usize) -> f64, paused: f64) -> Decision {
        let (mut c, mut sim) = idle_only();
        for i in 0..400 {
            let frozen = c.controls().frozen;
            let mut obs = sim.advance(
                if frozen { 0.0 } else { 0.01 },
                if frozen { 0.0 } else { 2.0 },
            );
            obs.training_slowdown = Some(if frozen { paused } else { reading(i) });
            obs.paused_slowdown = frozen.then_some(paused);
            if let Some(d) = c.step(obs, sim.now)
                && d.reason.blame().is_some()
            {
                return d;
            }
        }
        panic!("no experiment answered");
    }

    /// Runs an idle-only job stealing 1 % whose training reads
    /// `reading(t)` slowdown at `t` after the start; returns when the first
    /// blame experiment started and its decision, if one did within 30 s.
    fn first_experiment(reading: impl Fn(Duration) -> f64) -> Option<(Duration, Decision)> {
        let (mut c, mut sim) = idle_only();
        for _ in 0..300 {
            let mut obs = sim.advance(0.01, 2.0);
            obs.training_slowdown = Some(reading(sim.elapsed()));
            if let Some(d) = c.step(obs, sim.now)
                && matches!(d.reason, Reason::Experiment { .. })
            {
                return Some((sim.elapsed(), d));
            }
        }
        None
    }

    #[test]
    fn a_slowdown_that_does_not_stand_out_of_its_readings_spread_is_not_paused_for() {
        // From 7 s on, a 9 % slowdown the steal does not explain. Before it,
        // the training read 4 % on average: steadily in one run, swinging
        // between 22 % and −14 % reading to reading in the other.
        let after = |t: Duration| t >= Duration::from_secs(7);
        let (quiet_at, quiet) =
            first_experiment(|t| if after(t) { 0.09 } else { 0.04 }).expect("an experiment");
        let swing = std::cell::Cell::new(0_u32);
        let (noisy_at, noisy) = first_experiment(|t| {
            if after(t) {
                return 0.09;
            }
            swing.set(swing.get() + 1);
            if swing.get().is_multiple_of(2) {
                0.22
            } else {
                -0.14
            }
        })
        .expect("an experiment once the swing left the horizon");
        // Quiet: paused for once 9 % has lasted the 3 s blame delay.
        assert!(quiet_at <= Duration::from_secs(11), "{quiet_at:?} {quiet}");
        // Noisy: a pause that took all 9 % away could not show a fall
        // beyond twice the spread of ±18 points, so none comes while the
        // swing is in the 10 s horizon; one comes once it has left.
        assert!(noisy_at >= Duration::from_secs(15), "{noisy_at:?} {noisy}");
        for d in [quiet, noisy] {
            let Reason::Experiment { value, spread, .. } = d.reason else {
                unreachable!()
            };
            assert!(value >= 2.0 * spread, "{d}");
            assert!(d.to_string().contains("readings' spread"), "{d}");
        }
    }

    #[test]
    fn a_fall_during_the_pause_within_the_readings_own_noise_is_not_the_jobs() {
        // Readings swing between 8 and 16 % (a training whose step rate is
        // noisy); the pause ends on 9 %: 7 points under the 16 % the pause
        // started on, more than half the excess, but within the swing.
        let swing = |i: usize| if i.is_multiple_of(2) { 0.16 } else { 0.08 };
        let d = answer_with(swing, 0.09);
        assert!(d.to_string().contains("16.0%"), "{d}");
        assert_eq!(d.reason.blame(), Some(Cause::Elsewhere), "{d}");
        // A pause that takes the same training to no slowdown is the job's.
        let d = answer_with(swing, 0.0);
        assert_eq!(d.reason.blame(), Some(Cause::Job), "{d}");
    }

    #[test]
    fn a_large_outside_slowdown_that_moves_by_noise_during_the_pause_is_not_the_jobs() {
        // 13 % from elsewhere, 10 % at the end of the pause: 3 points is the
        // noise between two readings, under half of the 8.5-point excess.
        let (mut c, mut sim) = idle_only();
        let d = experiment_answer(&mut c, &mut sim, 0.13, 0.10);
        assert_eq!(d.reason.blame(), Some(Cause::Elsewhere), "{d}");
        // The job's own 8 % that a pause takes down to 2 % is its own.
        let (mut c, mut sim) = idle_only();
        let d = experiment_answer(&mut c, &mut sim, 0.08, 0.02);
        assert_eq!(d.reason.blame(), Some(Cause::Job), "{d}");
    }

    #[test]
    fn an_answer_that_the_slowdown_is_not_the_jobs_undoes_the_cuts_made_for_it() {
        let (mut c, mut sim) = idle_only();
        // First answer: the job (the pause helped); the slowdown then cuts.
        let d = experiment_answer(&mut c, &mut sim, 0.08, 0.02);
        assert_eq!(d.reason.blame(), Some(Cause::Job));
        assert!(quota(&c) < 2.0);
        // Then the slowdown stays whatever the job does: the next answer,
        // after the first one's 30 s, finds it is not the job's.
        let d = experiment_answer(&mut c, &mut sim, 0.08, 0.08);
        assert_eq!(d.reason.blame(), Some(Cause::Elsewhere), "{d}");
        assert_eq!(d.controls.quota, Quota::Unlimited, "{d}");
        assert!(!d.controls.frozen);
    }

    #[test]
    fn slowdown_alone_pauses_the_job_only_for_the_experiment() {
        let (mut c, mut sim) = idle_only();
        let mut frozen_for = Duration::ZERO;
        for _ in 0..400 {
            let mut obs = sim.advance(0.0, 0.1);
            obs.training_slowdown = Some(0.5);
            c.step(obs, sim.now);
            if c.controls().frozen {
                frozen_for += PERIOD;
            }
        }
        // One experiment per answer's validity (30 s) at most.
        assert!(frozen_for <= Duration::from_millis(3000), "{frozen_for:?}");
        assert!(!c.controls().frozen);
    }

    #[test]
    fn a_placement_restarts_the_quota_within_the_new_cpus_and_judges_only_after_it() {
        let (mut c, mut sim) = controller();
        // Far over budget: the quota falls from the start value.
        for _ in 0..20 {
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
        // Over budget again: the tightening starts from the new CPUs (1 core),
        // once the rate since the move has been measured over half a second.
        let mut tightened = None;
        for _ in 0..7 {
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

    #[test]
    fn tightens_from_measured_use_when_the_quota_does_not_bind() {
        let (mut c, mut sim) = controller();
        // Under budget for a second (dead band: no change), then over.
        for _ in 0..10 {
            let obs = sim.advance(0.04, 0.6);
            assert_eq!(c.step(obs, sim.now), None);
        }
        let mut d = None;
        for _ in 0..10 {
            let obs = sim.advance(0.5, 0.6);
            d = d.or(c.step(obs, sim.now));
        }
        // A cut of the 0.6 core used, not of the 1 core quota.
        let q = d
            .expect("tightened")
            .controls
            .quota
            .cores()
            .expect("a quota");
        assert!((0.3 - 1e-9..=0.54 + 1e-9).contains(&q), "quota {q}");
    }

    #[test]
    fn a_starting_job_that_uses_little_is_not_sent_to_the_floor_at_once() {
        // No cut before half a second of rate; by then the tiny use counts,
        // but the first step is at most two halvings of the 1 core quota.
        let (mut c, mut sim) = controller();
        let mut d = None;
        for _ in 0..6 {
            let obs = sim.advance(0.5, 0.01);
            d = d.or(c.step(obs, sim.now));
        }
        assert_eq!(d.expect("tightened").controls.quota, Quota::Cores(0.25));
        // Even with a trusted, tiny use, one step is at most two halvings.
        let mut c = Controller::new(ControllerConfig::new(0.05, 2.0));
        let mut sim = Sim::new();
        c.start(sim.now);
        for _ in 0..10 {
            let obs = sim.advance(0.04, 0.01);
            c.step(obs, sim.now);
        }
        let mut d = None;
        for _ in 0..6 {
            let obs = sim.advance(0.5, 0.01);
            d = d.or(c.step(obs, sim.now));
        }
        let q = d
            .expect("tightened")
            .controls
            .quota
            .cores()
            .expect("a quota");
        assert!(q >= 0.25 - 1e-9, "quota {q}");
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
    fn holds_in_the_dead_band_and_probes_one_step_at_a_time() {
        let (mut c, mut sim) = controller();
        let mut probes = Vec::new();
        for _ in 0..80 {
            // 4 %: under the 4.5 % target, above the 3.5 % relax threshold.
            let obs = sim.advance(0.04, quota(&c));
            if let Some(d) = c.step(obs, sim.now) {
                assert_eq!(d.reason.action(), "probe", "{d}");
                assert!(d.to_string().contains("to see whether"), "{d}");
                probes.push((sim.elapsed(), d.controls.quota));
            }
        }
        // Held for 3 s, then one step, held again.
        assert_eq!(
            probes.iter().map(|p| p.1).collect::<Vec<_>>(),
            [Quota::Cores(1.15), Quota::Cores(1.15 * 1.15)],
            "{probes:?}"
        );
        assert!(probes[0].0 >= Duration::from_secs(3), "{probes:?}");
        assert!(
            probes[1].0 - probes[0].0 >= Duration::from_secs(3),
            "{probes:?}"
        );
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
        let (mut c, mut sim) = controller_cuts_pay();
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
            if let Some(d) = c.step(obs, sim.now) {
                assert_eq!(d.reason.action(), "probe", "{d}");
            }
            assert!(!c.controls().frozen);
        }
    }

    #[test]
    fn at_the_floor_a_job_that_spent_the_horizon_is_frozen_at_once_and_every_later_horizon_holds() {
        let (mut c, mut sim) = controller_cuts_pay();
        let mut events = Vec::new();
        // The training's cumulative steal and time at every period.
        let mut history = vec![(Duration::ZERO, 0.0, 0.0)];
        for _ in 0..400 {
            let f = if c.controls().frozen { 0.0 } else { 0.40 };
            let obs = sim.advance(f, quota(&c).min(2.0));
            let s = obs.steal.expect("steal");
            history.push((
                sim.elapsed(),
                s.steal.as_secs_f64(),
                (s.steal + s.training_on_cpu).as_secs_f64(),
            ));
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
        // 40 % spends the horizon within a period: no 2 s wait at the floor.
        assert!(*freeze_at < floor_at + Duration::from_secs(1), "{events:?}");
        let (_, thaw) = events
            .iter()
            .find(|(_, d)| matches!(d.reason, Reason::Thaw { .. }))
            .expect("thawed");
        assert!(!thaw.controls.frozen);
        assert_eq!(thaw.controls.quota, Quota::Cores(0.1));
        // Every 10 s window from the first freeze on stays under the budget:
        // the duty cycle holds it (the cuts before the floor spent the
        // first one).
        let mut worst: f64 = 0.0;
        for (t, steal, time) in history.iter().filter(|(t, ..)| *t >= *freeze_at) {
            let Some(start) = t.checked_sub(Duration::from_secs(10)) else {
                continue;
            };
            if start < *freeze_at {
                continue;
            }
            let (_, s0, t0) = history
                .iter()
                .rfind(|(u, ..)| *u <= start)
                .expect("a sample");
            worst = worst.max((steal - s0) / (time - t0));
        }
        assert!(worst > 0.03 && worst <= 0.05, "worst window {worst}");
    }

    #[test]
    fn phases_run_regulating_frozen_and_back_then_overspending_until_the_horizon_is_spent() {
        let (mut c, mut sim) = controller_cuts_pay();
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
                Phase::Overspending { .. } => "overspending",
                Phase::Experimenting { .. } => "experimenting",
                Phase::Frozen { .. } => "frozen",
            })
            .collect();
        // At the floor the first horizon is spent at once: frozen without
        // waiting. Thawed with the horizon at the relax threshold, the job
        // overspends until it is spent to the target again.
        assert_eq!(
            &names[..5],
            [
                "regulating",
                "frozen",
                "regulating",
                "overspending",
                "frozen"
            ],
            "{phases:?}"
        );
    }

    #[test]
    fn a_freeze_lasts_until_the_horizon_ending_with_it_is_back_at_the_relax_threshold() {
        // 10 % steal whatever the quota: cuts that do not pay, then the
        // freezes hold the budget.
        let (mut c, mut sim) = controller();
        let mut thawed = Vec::new();
        for _ in 0..600 {
            let f = if c.controls().frozen { 0.0 } else { 0.10 };
            let obs = sim.advance(f, quota(&c).min(2.0));
            if let Some(d) = c.step(obs, sim.now)
                && matches!(d.reason, Reason::Thaw { .. })
            {
                thawed.push(c.horizon_fraction().expect("a horizon"));
            }
        }
        // Back at 3.5 % (0.7 × 5 %), within a period's worth of steal, in
        // the first horizon and in the later ones, where the steal from
        // before the freeze stays in the horizon until it drops out.
        assert!(thawed.len() >= 3, "{thawed:?}");
        for h in &thawed {
            assert!((0.030..=0.0355).contains(h), "{thawed:?}");
        }
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
    fn stale_progress_file_means_steal_alone_decides() {
        let (mut c, mut sim) = controller();
        // The progress tracker reports `None` once the file is stale: the loop
        // neither tightens on the last slowdown it saw nor stops.
        for i in 0..25 {
            let mut obs = sim.advance(0.04, 1.0);
            obs.training_slowdown = if i < 1 { Some(0.02) } else { None };
            assert_eq!(c.step(obs, sim.now), None);
        }
        let d = (0..5).find_map(|_| {
            let obs = sim.advance(0.3, 1.0);
            c.step(obs, sim.now)
        });
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
                paused_slowdown: None,
            };
            assert_eq!(c.step(obs, sim.now), None);
            assert_eq!(c.step(Observation::default(), sim.now), None);
        }
    }

    #[test]
    fn every_decision_explains_itself() {
        let (mut c, mut sim) = controller();
        let mut d = None;
        for _ in 0..6 {
            let obs = sim.advance(0.3, 1.0);
            d = d.or(c.step(obs, sim.now));
        }
        let d = d.expect("tightened");
        let text = d.to_string();
        assert!(text.contains("stolen fraction 30.0%"), "{text}");
        assert!(text.contains("1.00 cores -> 0.50 cores"), "{text}");
    }

    /// A job beside a training with a thread on every CPU, as measured in
    /// the contention matrix: in the idle class it gets `idle.1` cores at
    /// `idle.0` steal, out of it `lifted.1` cores at `lifted.0` steal (and
    /// the training slows by `slowdown(lifted, period)` when given).
    /// Returns the per-period steal and the timed decisions.
    fn drive_classes(
        c: &mut Controller,
        sim: &mut Sim,
        periods: usize,
        idle: (f64, f64),
        lifted: impl Fn(usize) -> (f64, f64),
        slowdown: Option<&dyn Fn(bool, usize) -> f64>,
    ) -> (Vec<f64>, Vec<(Duration, Decision)>) {
        let mut per_period = Vec::new();
        let mut decisions = Vec::new();
        for i in 0..periods {
            let out = !c.controls().idle;
            let (f, cores) = if out { lifted(i) } else { idle };
            per_period.push(f);
            let mut obs = sim.advance(f, cores);
            obs.training_slowdown = slowdown.map(|s| s(out, i));
            if let Some(d) = c.step(obs, sim.now) {
                decisions.push((sim.elapsed(), d));
            }
        }
        (per_period, decisions)
    }

    fn actions(decisions: &[(Duration, Decision)]) -> Vec<&'static str> {
        decisions.iter().map(|(_, d)| d.reason.action()).collect()
    }

    #[test]
    fn a_job_short_of_cpu_in_the_idle_class_is_lifted_and_stays_out_while_the_budget_holds() {
        // The matrix's all-cpus × threads pair: the idle class gave the
        // job 0.14 CPUs at 2 % steal; the lowest weight 0.25 at about 3 %.
        let (mut c, mut sim) = lifting();
        let (per_period, decisions) =
            drive_classes(&mut c, &mut sim, 400, (0.02, 0.14), |_| (0.03, 0.25), None);
        assert_eq!(actions(&decisions), ["lift"], "{decisions:#?}");
        let (at, lift) = &decisions[0];
        assert_eq!(*at, Duration::from_secs(3), "{lift}");
        assert!(!c.controls().idle);
        assert_eq!(c.controls().quota, Quota::Unlimited);
        // The report's time out of the class counts the lift still on.
        assert_eq!(
            c.out_of_idle_class(sim.now),
            (sim.elapsed() - *at, 1),
            "{lift}"
        );
        let worst = horizon_fractions(&per_period)
            .into_iter()
            .fold(0.0, f64::max);
        assert!(worst < 0.045, "worst horizon {worst}");
    }

    #[test]
    fn a_lift_whose_steal_rises_over_the_target_is_undone_at_once_and_not_tried_again_for_the_hold()
    {
        // Out of the class the job steals 20 % (a bursty or memory-heavy
        // evaluation at the lowest weight): back within half a second, the
        // next try only after `unpaid_hold`, and no 10 s span of the run
        // over the budget.
        let (mut c, mut sim) = lifting();
        let (per_period, decisions) =
            drive_classes(&mut c, &mut sim, 600, (0.015, 0.14), |_| (0.2, 0.6), None);
        assert_eq!(
            actions(&decisions),
            ["lift", "lower", "lift", "lower"],
            "{decisions:#?}"
        );
        let times: Vec<Duration> = decisions.iter().map(|(t, _)| *t).collect();
        assert!(
            times[1] - times[0] <= Duration::from_millis(500),
            "{times:?}"
        );
        assert!(times[2] - times[1] >= c.config().unpaid_hold, "{times:?}");
        // Both lifts' spans out of the class, none of the time between.
        assert_eq!(
            c.out_of_idle_class(sim.now),
            ((times[1] - times[0]) + (times[3] - times[2]), 2),
            "{times:?}"
        );
        assert!(matches!(
            decisions[1].1.reason,
            Reason::Lower {
                signal: Signal::Steal,
                before_verdict: true,
                ..
            }
        ));
        assert!(c.controls().idle);
        let worst = horizon_fractions(&per_period)
            .into_iter()
            .fold(0.0, f64::max);
        assert!(worst < 0.05, "worst horizon {worst}");
    }

    #[test]
    fn a_lift_that_gives_the_job_no_more_cpu_is_undone_at_its_verdict() {
        // A job that already had what it wanted in the idle class (1 CPU
        // of 2) gains nothing out of it: back at the verdict, 3 s later.
        let (mut c, mut sim) = lifting();
        let (_, decisions) =
            drive_classes(&mut c, &mut sim, 100, (0.01, 1.0), |_| (0.012, 1.05), None);
        assert_eq!(actions(&decisions), ["lift", "lift_did_not_pay"]);
        let lift_at = decisions[0].0;
        let (verdict_at, verdict) = &decisions[1];
        assert_eq!(*verdict_at - lift_at, c.config().lift_judge, "{verdict}");
        match verdict.reason {
            Reason::LiftDidNotPay { before, after, .. } => {
                assert!((before - 1.0).abs() < 0.01 && (after - 1.05).abs() < 0.01);
            }
            r => panic!("{r:?}"),
        }
        assert!(c.controls().idle);
    }

    #[test]
    fn a_lifted_job_that_slows_the_training_goes_back_to_the_idle_class_before_any_cut_or_pause() {
        // Kept out of the class for 10 s, then the training slows by 8 %
        // with the steal still at 2 % (memory bandwidth): the class is the
        // remedy tried first, not a pause or a quota cut.
        let (mut c, mut sim) = lifting();
        let slowdown = |out: bool, i: usize| if out && i >= 150 { 0.08 } else { 0.01 };
        let (_, decisions) = drive_classes(
            &mut c,
            &mut sim,
            200,
            (0.02, 0.14),
            |_| (0.02, 0.25),
            Some(&slowdown),
        );
        assert_eq!(actions(&decisions), ["lift", "lower"], "{decisions:#?}");
        assert!(matches!(
            decisions[1].1.reason,
            Reason::Lower {
                signal: Signal::Slowdown,
                before_verdict: false,
                ..
            }
        ));
        // Once the readings have been over for `slowdown_persist`, not on
        // the first of them, and not much later.
        let slowed_at = PERIOD * 151;
        let persist = c.config().slowdown_persist;
        let lowered_at = decisions[1].0;
        assert!(
            lowered_at >= slowed_at + persist && lowered_at <= slowed_at + persist * 2,
            "slowed at {slowed_at:?}, lowered at {lowered_at:?}"
        );
        assert_eq!(c.controls().quota, Quota::Unlimited);
    }

    #[test]
    fn a_slowdown_reading_over_the_target_for_less_than_the_persistence_does_not_undo_a_lift() {
        // The first readings after a lift are the training's rate over a
        // window mostly from before it, and a reading wanders by points
        // between windows (the Python training of the matrix read 1.6 %
        // before a lift and 6.1 % a period after it). A second of readings
        // at 6 % is not the lift's doing: the job stays out of the class,
        // and its verdict on the CPU it gained keeps it out.
        let (mut c, mut sim) = lifting();
        let spike = |out: bool, i: usize| {
            if out && (31..41).contains(&i) {
                0.06
            } else {
                0.015
            }
        };
        let (_, decisions) = drive_classes(
            &mut c,
            &mut sim,
            200,
            (0.01, 0.14),
            |_| (0.015, 0.25),
            Some(&spike),
        );
        assert_eq!(actions(&decisions), ["lift"], "{decisions:#?}");
        assert!(!c.controls().idle);
    }

    #[test]
    fn a_lift_is_kept_only_while_the_training_stays_well_under_budget() {
        // Out of the class the training's slowdown settles at 4 %: under the
        // 4.5 % target, but over the 3.5 % the lift was made under. Once the
        // horizon's mean follows it there, the job goes back: the lift
        // spends only the margin it was made in.
        let (mut c, mut sim) = lifting();
        let slowdown = |out: bool, _: usize| if out { 0.04 } else { 0.015 };
        let (_, decisions) = drive_classes(
            &mut c,
            &mut sim,
            200,
            (0.01, 0.14),
            |_| (0.015, 0.25),
            Some(&slowdown),
        );
        assert_eq!(actions(&decisions), ["lift", "lower"], "{decisions:#?}");
        match decisions[1].1.reason {
            Reason::Lower { signal, value, .. } => {
                assert_eq!(signal, Signal::Slowdown);
                assert!((value - 0.04).abs() < 1e-9);
            }
            r => panic!("{r:?}"),
        }
        assert!(c.controls().idle);
    }

    #[test]
    fn no_lift_out_of_the_idle_class_when_it_is_configured_off_or_a_quota_holds() {
        for cfg in [
            ControllerConfig {
                lift_after: None,
                ..ControllerConfig::new(0.05, 2.0)
            },
            ControllerConfig {
                idle: false,
                ..ControllerConfig::new(0.05, 2.0)
            },
            ControllerConfig {
                start_cores: Some(0.5),
                max_cores: 64.0,
                ..ControllerConfig::new(0.05, 2.0)
            },
        ] {
            let mut sim = Sim::new();
            let mut c = Controller::new(cfg.clone());
            c.start(sim.now);
            let (_, decisions) =
                drive_classes(&mut c, &mut sim, 100, (0.01, 0.14), |_| (0.01, 0.25), None);
            assert!(
                decisions.iter().all(|(_, d)| d.reason.action() != "lift"),
                "{cfg:?}: {decisions:#?}"
            );
        }
    }
}
