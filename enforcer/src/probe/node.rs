//! [`NodeMeter`]: the agent's steal metering, shared by every job on the
//! node.
//!
//! The kernel programs track one training workload per loaded object: the
//! per-CPU wait integral in `CPU_WAIT` counts the waiting threads of that
//! one training, and the job counters in `JOB_STEAL` are the steal from it.
//! So the agent loads the programs once per *protected training* (not once
//! per job, as each `enforcer run --protect` does): every job that protects
//! a training is one more slot in that training's meter, and a node with one
//! protected training and any number of jobs runs one copy of the programs.
//! With several protected trainings, each `sched_switch` runs one copy per
//! training; the fast path of each is two array reads.
//!
//! Counting several trainings in one loaded object needs a wait integral per
//! (CPU, training) and its snapshot at every switch-in; that is left for
//! when one node protects more than a few trainings.

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
    #[error("training {training:?}: {source}")]
    Probe {
        training: TrainingId,
        #[source]
        source: Box<ProbeError>,
    },
}

/// One loaded meter per protected training; see the module doc.
#[derive(Debug, Default)]
pub struct NodeMeter {
    meters: BTreeMap<TrainingId, StealMeter>,
    /// Which training each job's slot is in.
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
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads the programs for `spec` (its threads are entered at once).
    pub fn register_training(
        &mut self,
        id: &str,
        spec: TrainingSpec,
    ) -> Result<(), NodeMeterError> {
        if self.meters.contains_key(id) {
            return Err(NodeMeterError::TrainingExists(id.to_owned()));
        }
        let meter = StealMeter::start(spec).map_err(|source| NodeMeterError::Probe {
            training: id.to_owned(),
            source: Box::new(source),
        })?;
        self.meters.insert(id.to_owned(), meter);
        Ok(())
    }

    /// Unloads the training's programs; its jobs are no longer metered.
    pub fn unregister_training(&mut self, id: &str) -> Result<(), NodeMeterError> {
        self.meters
            .remove(id)
            .ok_or_else(|| NodeMeterError::NoTraining(id.to_owned()))?;
        self.jobs.retain(|_, t| t != id);
        self.overflow.remove(id);
        Ok(())
    }

    /// Starts attributing steal from `training` to the tasks of `cgroup`.
    pub fn add_job(
        &mut self,
        training: &str,
        job: &str,
        cgroup: JobCgroup,
    ) -> Result<(), NodeMeterError> {
        let meter = self
            .meters
            .get_mut(training)
            .ok_or_else(|| NodeMeterError::NoTraining(training.to_owned()))?;
        meter
            .add_job(job, cgroup)
            .map_err(|source| NodeMeterError::Probe {
                training: training.to_owned(),
                source: Box::new(source),
            })?;
        self.jobs.insert(job.to_owned(), training.to_owned());
        Ok(())
    }

    /// Stops metering `job`; its slot is free for the next one.
    pub fn remove_job(&mut self, job: &str) -> Result<(), NodeMeterError> {
        let Some(training) = self.jobs.remove(job) else {
            return Ok(());
        };
        if let Some(meter) = self.meters.get_mut(&training) {
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
        let read: BTreeMap<TrainingId, Result<StealSnapshot, ProbeError>> = self
            .meters
            .iter_mut()
            .map(|(id, meter)| (id.clone(), meter.read()))
            .collect();
        for (id, snapshot) in &read {
            if let Ok(s) = snapshot {
                self.overflow.insert(id.clone(), s.overflow);
            }
        }
        read
    }

    /// Every meter's health; its programs' cost only with `program_stats`
    /// (meaningful while `kernel.bpf_stats_enabled` is 1).
    pub fn health(&self, program_stats: bool) -> Vec<MeterHealth> {
        self.meters
            .iter()
            .map(|(id, meter)| MeterHealth {
                training: id.clone(),
                overflow: self.overflow.get(id).copied().unwrap_or_default(),
                programs: if program_stats {
                    meter.program_stats()
                } else {
                    Vec::new()
                },
            })
            .collect()
    }

    /// How many copies of the programs are loaded.
    pub fn loaded(&self) -> usize {
        self.meters.len()
    }
}
