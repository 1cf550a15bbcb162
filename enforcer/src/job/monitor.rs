//! The supervisor's extension point. Each control period the supervisor
//! reads the job cgroup's counters into one [`Sample`]; every [`Monitor`]
//! that is a sensor (the steal meter, the progress file, the GPU telemetry)
//! fills its part of it in [`Monitor::sense`]; then every monitor that is a
//! policy (the budget loop, placement, the node agent's budget) gets the
//! whole sample in [`Monitor::tick`] and returns the controls it wants. The
//! job's one actuator ([`JobInfo::controls`]) merges those wishes and writes
//! the result once per tick. A monitor fills its part of the report at the
//! end.
//!
//! A monitor that returns an error is logged and disabled; enforcement
//! (limits, deadlines, kill) never depends on a monitor.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use enforcer_model::StealCounters;

use super::controls::{Actuator, Control, Controls, Policy};
use crate::{
    budget::progress::ProgressReading,
    cgroup::{JobCgroup, Limits, Stats},
    events::Event,
    gpu::guard::GpuReading,
    report::Report,
};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MonitorError(pub String);

impl MonitorError {
    pub fn new(msg: impl Into<String>) -> Self {
        MonitorError(msg.into())
    }
}

/// What a monitor knows about the job when it starts.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub name: String,
    /// The job's directory in its primary hierarchy.
    pub cgroup: PathBuf,
    pub cgroup_mode: String,
    /// The job's cgroup id in the unified hierarchy (eBPF's view).
    pub v2_cgroup_id: Option<u64>,
    /// The job's main process.
    pub pid: i32,
    pub limits: Limits,
    pub timeout: Duration,
    pub control_period: Duration,
    pub started: Instant,
    /// The job's one actuator: policies return their wishes from
    /// [`Monitor::tick`]; a driver outside the tick (the duty cycle's
    /// thread) states its wish here. None writes to the cgroup itself.
    pub controls: Arc<Actuator>,
}

/// The job's steal, as the steal meter read it this tick.
#[derive(Debug, Clone, PartialEq)]
pub struct StealReading {
    /// Cumulative since the meter started.
    pub counters: StealCounters,
    /// The training's cumulative on-CPU time per CPU (index = CPU number).
    pub training_per_cpu: Vec<Duration>,
}

/// One control tick's readings, taken before any policy acts on them. A
/// field is `None` when its sensor does not run for this job (or, for the
/// GPU, had no reading due this tick).
#[derive(Debug, Clone)]
pub struct Sample {
    pub now: Instant,
    /// Since the job started.
    pub elapsed: Duration,
    /// The job cgroup's counters.
    pub stats: Stats,
    /// The job's steal, or why the meter has none.
    pub steal: Option<Result<StealReading, String>>,
    /// The training's progress file, polled while the job runs.
    pub progress: Option<ProgressReading>,
    /// The GPU telemetry attributed to the job, or why it stopped.
    pub gpu: Option<Result<GpuReading, String>>,
    /// What the job's cgroup holds, as far as the actuator wrote it.
    pub applied: Controls,
    /// The control whose write failed at the last apply, if one did.
    pub rejected: Option<Control>,
}

impl Sample {
    /// A sample with the cgroup's counters; the sensors fill the rest.
    pub fn new(now: Instant, elapsed: Duration, stats: Stats) -> Self {
        Sample {
            now,
            elapsed,
            stats,
            steal: None,
            progress: None,
            gpu: None,
            applied: Controls::default(),
            rejected: None,
        }
    }

    /// With what `actuator` wrote so far.
    pub fn actuated_by(mut self, actuator: &Actuator) -> Self {
        self.applied = actuator.applied();
        self.rejected = actuator.rejected();
        self
    }
}

/// The controls a monitor's policies want now: each replaces that policy's
/// previous wish.
pub type Wishes = Vec<(Policy, Controls)>;

/// What one tick gives a monitor besides the sample.
pub struct TickContext<'a> {
    /// The job's cgroup: to read (its processes), or to kill the job.
    pub cgroup: &'a JobCgroup,
    events: &'a mut Vec<Event>,
}

impl<'a> TickContext<'a> {
    pub fn new(cgroup: &'a JobCgroup, events: &'a mut Vec<Event>) -> Self {
        TickContext { cgroup, events }
    }

    /// Queues an event; the supervisor logs it and runs the hooks.
    pub fn emit(&mut self, event: Event) {
        self.events.push(event);
    }
}

pub trait Monitor: Send {
    fn name(&self) -> &'static str;
    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError>;
    /// A sensor fills its part of this tick's sample: every monitor senses
    /// before any ticks, so a policy sees the whole sample whatever the
    /// order of the monitors.
    fn sense(&mut self, _sample: &mut Sample) {}
    /// Acts on this tick's sample (events through `ctx`) and returns what
    /// its policies want of the job's controls.
    fn tick(&mut self, sample: &Sample, ctx: &mut TickContext<'_>) -> Result<Wishes, MonitorError>;
    /// Writes this monitor's fields into the report (and, for a null one,
    /// its reason in `report.unavailable`).
    fn finish(&mut self, report: &mut Report);
}
