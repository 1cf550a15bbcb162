//! The GPU guard as a job [`Monitor`]: per tick, NVML telemetry of the job,
//! the utilisation cap (through the job's freezer duty cycle) and the GPU
//! memory limit; at the end, the report's `gpu` field or `null` with the
//! reason. It also runs a fixed duty cycle (`enforcer run --duty-cycle`),
//! which shares the freezer with the cap: the job runs for the smaller of
//! the two fractions. The duty cycle's freeze goes through the job's
//! actuator ([`crate::job::controls`]), so a thaw of the duty cycle never
//! undoes a freeze of the budget loop.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::cgroup::membership::{FreezerCgroup, Hierarchy, ProcCgroups};

use super::{
    duty::{DutyCycle, RunFraction},
    guard::{GpuEvent, GpuGuard, GpuLimits},
};
use crate::{
    events::Event,
    job::{JobInfo, Monitor, MonitorError, Sample, TickContext, Wishes, controls::DutyFreezer},
    report::{Reason, Report},
};

/// How often the guard reads NVML and moves the cap. NVML's per-process
/// samples come every ~1/6 s to 1 s depending on the GPU, so ticking it at
/// the supervisor's 100 ms would mostly see no new sample.
const GPU_PERIOD: Duration = Duration::from_secs(1);

/// The `gpu` monitor.
pub struct GpuMonitor {
    limits: GpuLimits,
    fixed: Option<RunFraction>,
    guard: Option<GpuGuard>,
    duty: Option<DutyCycle>,
    freezer: Option<DutyFreezer>,
    last_gpu_tick: Option<Instant>,
    killed_for_memory: bool,
}

impl std::fmt::Debug for GpuMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMonitor")
            .field("limits", &self.limits)
            .field("fixed", &self.fixed)
            .finish_non_exhaustive()
    }
}

impl GpuMonitor {
    /// `limits.util_limit_pct = None` measures only; `duty_cycle` runs the
    /// job for that fraction of each `limits.duty_period`, GPU or not.
    pub fn new(limits: GpuLimits, duty_cycle: Option<RunFraction>) -> Self {
        GpuMonitor {
            limits,
            fixed: duty_cycle,
            guard: None,
            duty: None,
            freezer: None,
            last_gpu_tick: None,
            killed_for_memory: false,
        }
    }

    fn wanted_fraction(&self) -> f64 {
        let cap = self.guard.as_ref().map_or(1.0, GpuGuard::run_fraction);
        self.fixed.map_or(1.0, RunFraction::get).min(cap)
    }

    /// Starts, retunes or (at 1) parks the duty cycle.
    fn apply_fraction(&mut self) -> Result<(), MonitorError> {
        let f = RunFraction::new(self.wanted_fraction());
        match &self.duty {
            Some(d) => {
                if let Some(e) = d.error() {
                    return Err(MonitorError::new(format!("duty cycle stopped: {e}")));
                }
                d.set_run_fraction(f);
            }
            None if f < RunFraction::FULL => {
                let Some(freezer) = self.freezer.clone() else {
                    return Err(MonitorError::new(
                        "the job has no freezer cgroup: cannot duty-cycle it",
                    ));
                };
                let d = DutyCycle::start(freezer, self.limits.duty_period, f).map_err(|e| {
                    MonitorError::new(format!("starting the duty-cycle thread: {e}"))
                })?;
                self.duty = Some(d);
            }
            None => {}
        }
        Ok(())
    }
}

/// The ancestor of a process's freezer cgroup that is the job's own
/// directory (named after the job), so that the freeze and the attribution
/// cover the job's main leaf and its games alike.
fn job_level(mut located: FreezerCgroup, name: &str) -> FreezerCgroup {
    let comps: Vec<&str> = located.membership.path.split('/').collect();
    if let Some(i) = comps.iter().rposition(|c| *c == name) {
        let below = comps.len() - 1 - i;
        located.membership.path = comps[..=i].join("/");
        for _ in 0..below {
            located.dir.pop();
        }
    }
    located
}

fn event(e: &GpuEvent) -> Event {
    let detail = serde_json::to_value(e).unwrap_or_else(|_| json!({}));
    let name = detail["event"].as_str().unwrap_or("gpu").to_owned();
    Event::new(name, detail)
}

impl Monitor for GpuMonitor {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError> {
        let pid = u32::try_from(job.pid)
            .map_err(|_| MonitorError::new(format!("bad job pid {}", job.pid)))?;
        // On v2 the job's directory is the one to freeze and attribute by:
        // its processes live in leaves below it (`main`, games). On v1 and
        // hybrid hosts, the job's main process joined every hierarchy before
        // it ran, so its freezer cgroup's ancestor named after the job is the
        // job's (main leaf and games below). A command that already exited
        // (`true`) leaves only the job's directory to go by.
        let procs = ProcCgroups::default();
        // The duty cycle's freeze is a wish applied by the job's actuator,
        // which merges it with the budget loop's.
        self.freezer = Some(DutyFreezer(job.controls.clone()));
        let v2_job = procs
            .membership_of_dir(&job.cgroup)
            .ok()
            .filter(|m| m.hierarchy == Hierarchy::Unified);
        let membership = match (v2_job, procs.freezer_of(pid)) {
            (Some(membership), _) => membership,
            (None, Ok(located)) => job_level(located, &job.name).membership,
            (None, Err(e)) => {
                tracing::debug!(error = %e, "the job's process is gone; attributing by its directory");
                procs
                    .membership_of_dir(&job.cgroup)
                    .map_err(|e| MonitorError::new(format!("locating the job's cgroup: {e}")))?
            }
        };
        tracing::debug!(?membership, "GPU guard attributing by this cgroup");
        self.guard = Some(GpuGuard::open(membership, self.limits));
        self.apply_fraction()
    }

    /// Reads the telemetry into the sample once per [`GPU_PERIOD`].
    fn sense(&mut self, sample: &mut Sample) {
        let due = self
            .last_gpu_tick
            .is_none_or(|t| sample.now.duration_since(t) >= GPU_PERIOD);
        let Some(guard) = self.guard.as_mut() else {
            return;
        };
        if !due || !guard.is_available() {
            return;
        }
        self.last_gpu_tick = Some(sample.now);
        sample.gpu = guard.read();
    }

    /// The cap and memory guard on this tick's reading; the cap's freezes
    /// go through the duty cycle's thread, which wishes them to the job's
    /// actuator between ticks, so no controls are returned here.
    fn tick(&mut self, sample: &Sample, ctx: &mut TickContext<'_>) -> Result<Wishes, MonitorError> {
        let (Some(reading), Some(guard)) = (&sample.gpu, self.guard.as_mut()) else {
            return Ok(Wishes::new());
        };
        let out = guard.act(reading, sample.now);
        for e in &out.events {
            ctx.emit(event(e));
        }
        if out.kill && !self.killed_for_memory {
            self.killed_for_memory = true;
            // Thaw first: a frozen task cannot act on SIGKILL.
            self.duty = None;
            ctx.cgroup
                .kill()
                .map_err(|e| MonitorError::new(format!("GPU memory kill failed: {e}")))?;
            return Ok(Wishes::new());
        }
        self.apply_fraction()?;
        Ok(Wishes::new())
    }

    fn finish(&mut self, report: &mut Report) {
        // Leaves the job thawed.
        self.duty = None;
        let Some(guard) = self.guard.as_mut() else {
            return;
        };
        let r = guard.finish();
        match (r.gpu, r.unavailable) {
            (Some(gpu), _) => {
                report.gpu = serde_json::to_value(gpu).ok();
                report.unavailable.remove("gpu");
            }
            (None, reason) => {
                report.gpu = None;
                report.unavailable(
                    "gpu",
                    reason.unwrap_or_else(|| "GPU telemetry unavailable".into()),
                );
            }
        }
        if self.killed_for_memory {
            report.reason = Reason::GpuMemory;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cgroup::membership::CgroupMembership;

    #[test]
    fn the_job_level_cgroup_is_the_ancestor_named_after_the_job() {
        let located = FreezerCgroup {
            membership: CgroupMembership {
                hierarchy: Hierarchy::V1("freezer".into()),
                path: "/enforcer/job-1/main".into(),
            },
            dir: PathBuf::from("/sys/fs/cgroup/freezer/enforcer/job-1/main"),
        };
        let j = job_level(located.clone(), "job-1");
        assert_eq!(j.membership.path, "/enforcer/job-1");
        assert_eq!(
            j.dir,
            PathBuf::from("/sys/fs/cgroup/freezer/enforcer/job-1")
        );
        // Not found: unchanged.
        assert_eq!(job_level(located.clone(), "other"), located);
    }
}
