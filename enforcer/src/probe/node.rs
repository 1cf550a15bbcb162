//! [`NodeMeter`]: the agent's steal metering, shared by every job and every
//! protected training on the node.
//!
//! One copy of the kernel programs meters up to `MAX_TRAININGS` trainings
//! at once (see the kernel module's doc): each training registered here
//! takes a training index in the one [`StealMeter`], and each job is a slot
//! charged against its own training's wait only. So however many trainings
//! and jobs the agent protects, each `sched_switch` on the node runs one
//! program. The programs are loaded once, by the agent at its start, off
//! its request path (the kernel's verification can take seconds), and
//! handed in with [`NodeMeter::install`]; they are attached when the first
//! training is registered and detached when the last one goes: a node that
//! protects nothing pays nothing on its context switches.

use std::collections::BTreeMap;

use super::{
    ProbeError, ProgramStats,
    steal::{JobCgroup, Overflow, StealMeter, StealSnapshot, TrainingSpec},
};

/// A protected training, by the name the agent gave it.
pub type TrainingId = String;

/// Refusals of [`NodeMeter`], naming the training or job at fault.
#[derive(Debug, thiserror::Error)]
pub enum NodeMeterError {
    #[error("training {0:?} is already metered")]
    TrainingExists(TrainingId),
    #[error("no metered training {0:?}")]
    NoTraining(TrainingId),
    #[error("training {0:?}: the node's steal programs are not loaded")]
    NotLoaded(TrainingId),
    #[error("training {training:?}: {source}")]
    Probe {
        training: TrainingId,
        #[source]
        source: Box<ProbeError>,
    },
}

/// The node's one meter; see the module doc.
#[derive(Debug, Default)]
pub struct NodeMeter {
    /// Once installed, loaded for good; attached while at least one
    /// training is registered.
    meter: Option<StealMeter>,
    /// Which training each job is charged against.
    jobs: BTreeMap<String, TrainingId>,
    /// Each meter's overflow counters at its last read.
    overflow: BTreeMap<TrainingId, Overflow>,
}

/// One meter's own health: what did not fit in its maps and, while
/// `kernel.bpf_stats_enabled` is 1, what its programs cost.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterHealth {
    pub training: TrainingId,
    /// As of the last read (all zero before it).
    pub overflow: Overflow,
    /// Empty unless asked for.
    pub programs: Vec<ProgramStats>,
}

impl NodeMeter {
    /// A meter without programs yet: registrations are refused until
    /// [`NodeMeter::install`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands in the loaded programs (see [`StealMeter::load`]); they stay
    /// detached until a training is registered.
    pub fn install(&mut self, mut meter: StealMeter) {
        meter.detach();
        self.meter = Some(meter);
    }

    /// Whether the programs are installed.
    pub fn is_installed(&self) -> bool {
        self.meter.is_some()
    }

    /// Meters `spec` as `id` (its threads are entered at once), attaching
    /// the programs if this is the first training.
    pub fn register_training(
        &mut self,
        id: &str,
        spec: TrainingSpec,
    ) -> Result<(), NodeMeterError> {
        let probe = |source| NodeMeterError::Probe {
            training: id.to_owned(),
            source: Box::new(source),
        };
        let meter = self
            .meter
            .as_mut()
            .ok_or_else(|| NodeMeterError::NotLoaded(id.to_owned()))?;
        meter.attach().map_err(probe)?;
        let added = meter.add_training(id, spec);
        if let Err(ProbeError::TooManyTrainings(_)) = &added {
            tracing::warn!(
                training = id,
                refused = meter.trainings_refused(),
                "the node's meter is full: the training is not metered"
            );
        }
        self.detach_if_idle();
        match added {
            Ok(()) => Ok(()),
            Err(ProbeError::TrainingExists(_)) => {
                Err(NodeMeterError::TrainingExists(id.to_owned()))
            }
            Err(e) => Err(probe(e)),
        }
    }

    /// Stops metering the training; its jobs are no longer metered.
    pub fn unregister_training(&mut self, id: &str) -> Result<(), NodeMeterError> {
        let meter = self
            .meter
            .as_mut()
            .filter(|m| m.trainings().any(|(t, _)| t == id))
            .ok_or_else(|| NodeMeterError::NoTraining(id.to_owned()))?;
        let removed = meter.remove_training(id);
        self.jobs.retain(|_, t| t != id);
        self.overflow.remove(id);
        self.detach_if_idle();
        removed.map(drop).map_err(|source| NodeMeterError::Probe {
            training: id.to_owned(),
            source: Box::new(source),
        })
    }

    /// Detaches the programs when no training is left.
    fn detach_if_idle(&mut self) {
        if let Some(m) = &mut self.meter
            && m.trainings().next().is_none()
        {
            m.detach();
        }
    }

    /// Starts attributing steal from `training` to the tasks of `cgroup`.
    pub fn add_job(
        &mut self,
        training: &str,
        job: &str,
        cgroup: JobCgroup,
    ) -> Result<(), NodeMeterError> {
        let meter = self
            .meter
            .as_mut()
            .ok_or_else(|| NodeMeterError::NoTraining(training.to_owned()))?;
        meter
            .add_job(training, job, cgroup)
            .map_err(|source| match source {
                ProbeError::NoSuchTraining(_) => NodeMeterError::NoTraining(training.to_owned()),
                source => NodeMeterError::Probe {
                    training: training.to_owned(),
                    source: Box::new(source),
                },
            })?;
        self.jobs.insert(job.to_owned(), training.to_owned());
        Ok(())
    }

    /// Stops metering `job`; its slot is free for the next one.
    pub fn remove_job(&mut self, job: &str) -> Result<(), NodeMeterError> {
        let Some(training) = self.jobs.remove(job) else {
            return Ok(());
        };
        if let Some(meter) = &mut self.meter {
            meter
                .remove_job(job)
                .map_err(|source| NodeMeterError::Probe {
                    training,
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Polls every training's counters (cumulative); a training whose read
    /// failed is reported with its error, the others are still read.
    pub fn read(&mut self) -> BTreeMap<TrainingId, Result<StealSnapshot, ProbeError>> {
        let read = self
            .meter
            .as_mut()
            .map(StealMeter::read_all)
            .unwrap_or_default();
        for (id, snapshot) in &read {
            if let Ok(s) = snapshot {
                self.overflow.insert(id.clone(), s.overflow);
            }
        }
        read
    }

    /// The meter's health, one entry per metered training (its overflow
    /// counters as of the last read); the programs are the node's one set,
    /// so their cost is in the first entry only, and only with
    /// `program_stats` (meaningful while `kernel.bpf_stats_enabled` is 1).
    pub fn health(&self, program_stats: bool) -> Vec<MeterHealth> {
        let Some(meter) = self.meter.as_ref().filter(|m| m.is_attached()) else {
            return Vec::new();
        };
        let mut programs = if program_stats {
            meter.program_stats()
        } else {
            Vec::new()
        };
        meter
            .trainings()
            .map(|(id, _)| MeterHealth {
                training: id.to_owned(),
                overflow: self.overflow.get(id).copied().unwrap_or_default(),
                programs: std::mem::take(&mut programs),
            })
            .collect()
    }

    /// How many copies of the programs are attached: 1 while any training
    /// is metered, else 0.
    pub fn attached(&self) -> usize {
        usize::from(self.meter.as_ref().is_some_and(StealMeter::is_attached))
    }
}
