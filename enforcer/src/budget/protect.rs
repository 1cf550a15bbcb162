//! [`Protections`]: the agent's budget loop over every protected training.
//! It owns the node's meters ([`crate::probe::node::NodeMeter`]) and the
//! budgets ([`super::node::NodeBudget`]) and holds each protecting job's
//! actuator: every control period it polls the meters and the jobs' CPU
//! time, steps each training's budget and hands each job its wish (the
//! job's `Budget` policy, capped by its own limits in the actuator).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    controller::ControllerConfig,
    node::{NodeBudget, NodeBudgetError, TrainingDecision, TrainingReading, TrainingStatus},
    progress::{ProgressConfig, ProgressTracker},
};
use crate::{
    job::controls::{Actuator, Policy},
    probe::{
        node::{NodeMeter, NodeMeterError},
        steal::{JobCgroup as MeteredCgroup, TrainingSpec},
    },
};

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
}

/// Reads a job's cumulative CPU time (its cgroup's usage).
pub type CpuReader = Box<dyn Fn() -> Option<Duration> + Send>;

struct ProtectingJob {
    actuator: Arc<Actuator>,
    cpu: CpuReader,
}

/// The agent's protected trainings and their jobs; see the module doc.
pub struct Protections {
    meter: NodeMeter,
    budget: NodeBudget,
    jobs: BTreeMap<String, ProtectingJob>,
    /// Cores of the node: a training's quota at or above it is no limit.
    cpus: f64,
    period: Duration,
}

impl std::fmt::Debug for Protections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protections")
            .field("meter", &self.meter)
            .field("budget", &self.budget)
            .field("jobs", &self.jobs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
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

    /// Loads the meter for the training and starts its budget. Nothing is
    /// left registered when either fails.
    pub fn protect(&mut self, p: Protect) -> Result<(), ProtectError> {
        let progress = p.progress_file.as_ref().map(|path| {
            ProgressTracker::for_file(path.clone(), ProgressConfig::default(), self.period)
        });
        self.budget.register_training(
            &p.id,
            ControllerConfig::new(p.budget, self.cpus),
            progress,
        )?;
        if let Err(e) = self.meter.register_training(&p.id, p.training) {
            let _ = self.budget.unregister_training(&p.id);
            return Err(e.into());
        }
        tracing::info!(training = %p.id, budget = p.budget, "training protected");
        Ok(())
    }

    /// Stops protecting a training: its meter is unloaded and its jobs'
    /// budget wishes are withdrawn (their own limits stay).
    pub fn unprotect(&mut self, id: &str) -> Result<(), ProtectError> {
        let jobs = self.budget.unregister_training(id)?;
        self.meter.unregister_training(id)?;
        for job in jobs {
            if let Some(j) = self.jobs.remove(&job) {
                withdraw(&job, &j.actuator);
            }
        }
        Ok(())
    }

    /// Puts a job under `training`'s budget: it is metered from now on and
    /// gets its share at the next tick.
    pub fn add_job(
        &mut self,
        training: &str,
        job: &str,
        cgroup: MeteredCgroup,
        actuator: Arc<Actuator>,
        cpu: CpuReader,
    ) -> Result<(), ProtectError> {
        self.budget.add_job(training, job)?;
        if let Err(e) = self.meter.add_job(training, job, cgroup) {
            self.budget.remove_job(job);
            return Err(e.into());
        }
        self.jobs
            .insert(job.to_owned(), ProtectingJob { actuator, cpu });
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

    /// One control period; returns the trainings' decisions (for the event
    /// stream).
    pub fn tick(&mut self, now: Instant) -> Vec<TrainingDecision> {
        let mut readings = BTreeMap::new();
        for (id, snapshot) in self.meter.read() {
            match snapshot {
                Ok(s) => {
                    let jobs = &self.jobs;
                    let reading = TrainingReading::from_snapshot(&s, |key| {
                        jobs.get(key).and_then(|j| (j.cpu)())
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
        for wish in tick.wishes {
            let Some(job) = self.jobs.get(&wish.job) else {
                continue;
            };
            let written = job.actuator.update(Policy::Budget, |w| {
                w.quota = wish.quota;
                w.idle = Some(wish.idle);
                w.frozen = wish.frozen;
            });
            if let Err(e) = written {
                tracing::warn!(job = %wish.job, error = %e, "applying the budget's share");
            }
        }
        tick.decisions
    }

    /// Every protected training with its jobs and their shares.
    pub fn status(&self) -> Vec<TrainingStatus> {
        self.budget.status()
    }

    /// The training `job` protects.
    pub fn training_of(&self, job: &str) -> Option<&str> {
        self.budget.training_of(job)
    }
}

/// Withdraws the budget's wishes from a job's actuator (its own limits
/// stay).
fn withdraw(job: &str, actuator: &Actuator) {
    if let Err(e) = actuator.update(Policy::Budget, |w| *w = Default::default()) {
        tracing::warn!(job, error = %e, "withdrawing the budget's controls");
    }
}
