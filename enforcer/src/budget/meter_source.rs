//! [`MeterSource`]: the budget loop's steal signal read straight from an
//! eBPF [`StealMeter`] it owns, for a supervisor that runs no separate steal
//! monitor (one meter per `enforcer run`).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{controller::StealCounters, monitor::StealSource};
use crate::{
    job::JobInfo,
    probe::steal::{JobCgroup, StealMeter, TrainingSpec, v2_level},
};

pub struct MeterSource {
    meter: Result<StealMeter, String>,
    key: String,
}

impl MeterSource {
    /// Loads and attaches the meter now, before the job exists: loading
    /// takes a while (BTF, the verifier) and the job must not run unmetered
    /// meanwhile. A failure is kept and reported as the loop's missing
    /// signal.
    pub fn start(training: TrainingSpec) -> Self {
        Self {
            meter: StealMeter::start(training).map_err(|e| format!("steal meter: {e}")),
            key: String::new(),
        }
    }
}

impl StealSource for MeterSource {
    fn start(&mut self, job: &JobInfo) -> Result<(), String> {
        let meter = self.meter.as_mut().map_err(|e| e.clone())?;
        let id = job
            .v2_cgroup_id
            .ok_or("the job has no cgroup v2 id: steal cannot be attributed to it")?;
        let level = job_v2_dir(job.pid, id).and_then(|d| v2_level(&d));
        self.key.clone_from(&job.name);
        meter
            .add_job(&self.key, JobCgroup { id, level })
            .map_err(|e| format!("steal meter: {e}"))
    }

    fn counters(&mut self) -> Result<StealCounters, String> {
        let meter = self.meter.as_mut().map_err(|e| e.clone())?;
        let snap = meter.read().map_err(|e| format!("steal meter: {e}"))?;
        let job = snap
            .jobs
            .get(&self.key)
            .ok_or("the steal meter does not know the job")?;
        Ok(StealCounters {
            steal: Duration::from_nanos(job.steal_ns),
            training_on_cpu: Duration::from_nanos(snap.training.on_cpu_ns),
        })
    }
}

/// The job's directory in the cgroup2 mount: the ancestor of the job
/// process's v2 cgroup whose inode is the job's id (its processes may live
/// in a leaf below it).
fn job_v2_dir(pid: i32, id: u64) -> Option<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2").then_some(())?;
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })?;
    let mut dir = mount.join(rel.trim_start_matches('/'));
    loop {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        if !dir.pop() || dir == Path::new("/") {
            return None;
        }
    }
}

/// The budget loop for `enforcer run` / `attach`, when a training workload
/// is given (`--protect PID`, else `training.pid` in the config): the eBPF
/// meter is loaded now, before the job exists, and a configured
/// `training.progress_file` is read for a few seconds, while no job runs, to
/// learn the training's own step rate.
pub fn budget_monitor(
    config: &crate::config::Config,
    protect: Option<u32>,
    budget: Option<crate::units::Percent>,
) -> Option<Box<dyn crate::job::Monitor>> {
    use super::{ControllerConfig, ProgressConfig, ProgressTracker, monitor::BudgetMonitor};
    let pid = protect.or(config.training.pid.and_then(|p| u32::try_from(p).ok()))?;
    let budget = budget.unwrap_or(config.budget).fraction();
    let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let source = MeterSource::start(TrainingSpec::Pid {
        pid,
        follow_children: config.training.follow_children,
    });
    let progress = config.training.progress_file.as_ref().map(|p| {
        let progress_config = ProgressConfig::default();
        let learn = progress_config.baseline_min + Duration::from_millis(500);
        let mut tracker = ProgressTracker::for_file(p, progress_config);
        tracing::info!(
            file = %p.display(),
            seconds = learn.as_secs_f64(),
            "learning the training's step rate before the job"
        );
        tracker.learn(learn, config.control_period.0);
        if tracker.baseline().is_none() {
            tracing::warn!(file = %p.display(), "no baseline step rate: training slowdown will be null");
        }
        tracker
    });
    Some(Box::new(BudgetMonitor::new(
        ControllerConfig::new(budget, cpus),
        Box::new(source),
        progress,
    )))
}
