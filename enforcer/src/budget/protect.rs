//! [`Protections`]: the agent's budget loop over every protected training.
//! It owns the node's meter ([`crate::probe::node::NodeMeter`]) and the
//! budgets ([`super::node::NodeBudget`]): every control period it polls the
//! meter and the jobs' CPU time (`cpu.stat` of their v2 cgroups), steps
//! each training's budget and returns each job's wish. It writes no cgroup
//! file: the job's one actuator applies the wish (its `Budget` policy,
//! capped by the job's own limits).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    controller::ControllerConfig,
    node::{NodeBudget, NodeBudgetError, Tick, TrainingReading, TrainingStatus},
    progress::{ProgressConfig, ProgressTracker},
};
use crate::probe::{
    ProbeError,
    node::{NodeMeter, NodeMeterError},
    steal::{JobCgroup as MeteredCgroup, TrainingSpec},
};

/// The least a training's jobs get together, in cores (split among them,
/// never under `node::MIN_JOB_CORES` each). Lower than a lone job's floor:
/// several jobs share it, and jobs that run beside the training on its
/// CPUs in the normal class steal about their quota, so at a floor of 0.1
/// two of them would take 10 % of a one-CPU training between them.
pub const TRAINING_FLOOR_CORES: f64 = 0.02;

/// What `protect` registers: the training, its budget and, when it writes
/// one, its progress file.
#[derive(Debug, Clone, PartialEq)]
pub struct Protect {
    /// The agent's name for it (unique on the node).
    pub id: String,
    pub training: TrainingSpec,
    /// A fraction of the training's CPU time, in (0, 1).
    pub budget: f64,
    pub progress_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Budget(#[from] NodeBudgetError),
    #[error(transparent)]
    Meter(#[from] NodeMeterError),
    #[error("job {job:?}: {source}")]
    JobCgroup {
        job: String,
        #[source]
        source: Box<ProbeError>,
    },
}

#[derive(Debug)]
struct ProtectingJob {
    /// Its v2 cgroup directory, whose `cpu.stat` gives its CPU time (a core
    /// file of every v2 cgroup, with or without the cpu controller).
    dir: PathBuf,
}

impl ProtectingJob {
    fn cpu(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_micros)
    }
}

/// The agent's protected trainings and their jobs; see the module doc.
#[derive(Debug)]
pub struct Protections {
    meter: NodeMeter,
    budget: NodeBudget,
    jobs: BTreeMap<String, ProtectingJob>,
    /// Cores of the node: a training's quota at or above it is no limit.
    cpus: f64,
    period: Duration,
}

impl Protections {
    /// `period`: the control period (the progress file is read as often).
    pub fn new(period: Duration) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        Self {
            meter: NodeMeter::new(),
            budget: NodeBudget::new(),
            jobs: BTreeMap::new(),
            cpus,
            period,
        }
    }

    /// Hands the node's meter its loaded programs (see
    /// [`NodeMeter::install`]).
    pub fn install_meter(&mut self, meter: crate::probe::steal::StealMeter) {
        self.meter.install(meter);
    }

    /// Meters the training (in the node's one meter) and starts its
    /// budget. Nothing is left registered when either fails.
    pub fn protect(&mut self, p: Protect) -> Result<(), ProtectError> {
        let progress = p.progress_file.as_ref().map(|path| {
            ProgressTracker::for_file(path.clone(), ProgressConfig::default(), self.period)
        });
        let config = ControllerConfig {
            floor_cores: TRAINING_FLOOR_CORES,
            // Steps in proportion to that floor (from 0.02 a step of 0.05
            // more than triples the quota, and the loop saws), and a longer
            // wait after a tightening: near the floor, quota and steal are
            // far from proportional (a job's 1 ms slices also delay the
            // training's wake-ups), so each relax step risks an overshoot.
            increase_cores: TRAINING_FLOOR_CORES / 2.0,
            hold_off: std::time::Duration::from_secs(3),
            ..ControllerConfig::new(p.budget, self.cpus)
        };
        self.budget.register_training(&p.id, config, progress)?;
        if let Err(e) = self.meter.register_training(&p.id, p.training) {
            let _ = self.budget.unregister_training(&p.id);
            return Err(e.into());
        }
        tracing::info!(training = %p.id, budget = p.budget, "training protected");
        Ok(())
    }

    /// Stops protecting a training: it leaves the meter; returns its jobs,
    /// whose budget wishes the caller withdraws (their own limits stay).
    pub fn unprotect(&mut self, id: &str) -> Result<Vec<String>, ProtectError> {
        let jobs = self.budget.unregister_training(id)?;
        self.meter.unregister_training(id)?;
        for job in &jobs {
            self.jobs.remove(job);
        }
        Ok(jobs)
    }

    /// Whether `id` is protected.
    pub fn is_protected(&self, id: &str) -> bool {
        self.budget.has_training(id)
    }

    /// How many jobs protect training `id` now.
    pub fn job_count(&self, id: &str) -> usize {
        self.budget.job_count(id)
    }

    /// Puts a job under `training`'s budget: the tasks of its v2 cgroup
    /// `dir` (and of its child cgroups) are metered from now on, and it
    /// gets its share at the next tick.
    pub fn add_job(&mut self, training: &str, job: &str, dir: &Path) -> Result<(), ProtectError> {
        let cgroup = MeteredCgroup::from_path(dir).map_err(|source| ProtectError::JobCgroup {
            job: job.to_owned(),
            source: Box::new(source),
        })?;
        self.budget.add_job(training, job)?;
        if let Err(e) = self.meter.add_job(training, job, cgroup) {
            self.budget.remove_job(job);
            return Err(e.into());
        }
        self.jobs.insert(
            job.to_owned(),
            ProtectingJob {
                dir: dir.to_owned(),
            },
        );
        Ok(())
    }

    /// Takes a job out (it ended, or no longer protects): its share goes to
    /// the training's other jobs at the next tick.
    pub fn remove_job(&mut self, job: &str) {
        self.budget.remove_job(job);
        if let Err(e) = self.meter.remove_job(job) {
            tracing::warn!(job, error = %e, "removing the job from the steal meter");
        }
        self.jobs.remove(job);
    }

    /// One control period: every job's wish and the trainings' decisions
    /// (logged here; for the event stream).
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut readings = BTreeMap::new();
        for (id, snapshot) in self.meter.read() {
            match snapshot {
                Ok(s) => {
                    let jobs = &self.jobs;
                    let reading = TrainingReading::from_snapshot(&s, |key| {
                        jobs.get(key).and_then(ProtectingJob::cpu)
                    });
                    readings.insert(id, reading);
                }
                Err(e) => tracing::warn!(training = %id, error = %e, "reading the steal meter"),
            }
        }
        let tick = self.budget.tick(now, &readings);
        for d in &tick.decisions {
            tracing::info!(training = %d.training, "budget: {}", d.decision);
        }
        tick
    }

    /// Every protected training with its jobs and their shares.
    pub fn status(&self) -> Vec<TrainingStatus> {
        self.budget.status()
    }

    /// Every meter's own health (see [`NodeMeter::health`]).
    pub fn meter_health(&self, program_stats: bool) -> Vec<crate::probe::node::MeterHealth> {
        self.meter.health(program_stats)
    }

    /// The steal figures of `job` as of the last tick, for its report.
    pub fn job_figures(&self, job: &str) -> Option<super::node::JobStealFigures> {
        self.budget.job_figures(job)
    }

    /// The training `job` protects.
    pub fn training_of(&self, job: &str) -> Option<&str> {
        self.budget.training_of(job)
    }
}
