//! The supervisor's extension point: a [`Monitor`] is started with the job,
//! each control period senses (takes its sample) and then ticks (acts on the
//! samples through the job's actuator, [`JobInfo::controls`]), and fills its
//! part of the report at the end. The steal
//! meter, the budget controller and the GPU guard plug in here.
//!
//! A monitor that returns an error is logged and disabled; enforcement
//! (limits, deadlines, kill) never depends on a monitor.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use super::controls::Actuator;
use crate::{
    cgroup::{JobCgroup, Limits, Stats},
    events::Event,
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
    /// The job's one actuator: a monitor that acts on the job states the
    /// controls it wants here, never writes them to the cgroup itself.
    pub controls: Arc<Actuator>,
}

/// What one tick gives a monitor.
pub struct TickContext<'a> {
    /// The job's cgroup: read it, set its quota / weight / idle class, freeze
    /// it.
    pub cgroup: &'a JobCgroup,
    /// Counters read at this tick (shared by all monitors).
    pub stats: &'a Stats,
    /// Since the job started.
    pub elapsed: Duration,
    pub now: Instant,
    events: &'a mut Vec<Event>,
}

impl<'a> TickContext<'a> {
    pub fn new(
        cgroup: &'a JobCgroup,
        stats: &'a Stats,
        elapsed: Duration,
        now: Instant,
        events: &'a mut Vec<Event>,
    ) -> Self {
        TickContext {
            cgroup,
            stats,
            elapsed,
            now,
            events,
        }
    }

    /// Queues an event; the supervisor logs it and runs the hooks.
    pub fn emit(&mut self, event: Event) {
        self.events.push(event);
    }
}

pub trait Monitor: Send {
    fn name(&self) -> &'static str;
    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError>;
    /// A sensor takes this tick's sample here: every monitor senses before
    /// any ticks, so that a policy's tick sees this tick's samples whatever
    /// the order of the monitors.
    fn sense(&mut self) {}
    fn tick(&mut self, ctx: &mut TickContext<'_>) -> Result<(), MonitorError>;
    /// Writes this monitor's fields into the report (and, for a null one,
    /// its reason in `report.unavailable`).
    fn finish(&mut self, report: &mut Report);
}
