//! The seam between the agent and its node-wide steal budget: one meter
//! for every job and one budget loop per protected training, shared by the
//! jobs that protect it ([`NodeBudget`]).
//!
//! How a job's CPU quota is applied: the budget never writes a cgroup
//! file itself. Each job has one actuator (`job::controls`), owned by its
//! shim's session; [`NodeBudget::tick`] returns per-job [`QuotaWish`]es
//! that the agent forwards to the job's shim, whose session merges them
//! with its own policies and writes the result through that actuator. So
//! there stays one writer per cgroup file, and when the agent dies the shim
//! keeps the last wish it got (or the start quota).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A training a client registered with `protect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// The training process, or
    pub pid: Option<i32>,
    /// the cgroup it runs in (path relative to the hierarchy root).
    pub cgroup: Option<PathBuf>,
    pub follow_children: bool,
    /// The file the training writes its step count to, for slowdown.
    pub progress_file: Option<PathBuf>,
    /// The share of the training's CPU time its jobs may take together.
    pub budget_fraction: f64,
    /// Who registered it (only they and root may protect or change it).
    pub owner_uid: u32,
}

/// What the budget wants for one job at this tick.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuotaWish {
    /// CPU quota in CPUs; `None`: no quota from the budget.
    pub cpu: Option<f64>,
    /// Freeze the job (over budget with nothing left to give).
    pub freeze: bool,
}

/// The node's steal budgets, keyed by training id and job id. The agent
/// calls these from its one control loop; implementations must not block.
pub trait NodeBudget: Send {
    /// Registers (or updates) a training; returns its id.
    fn register_training(&mut self, spec: TrainingSpec) -> Result<String, String>;
    /// A job protecting `training` started in `job_cgroup`.
    fn add_job(&mut self, training: &str, job: &str, job_cgroup: PathBuf) -> Result<(), String>;
    /// The job ended (or was found dead after a restart).
    fn remove_job(&mut self, job: &str);
    /// One control period: reads the meter, runs each training's loop and
    /// returns the quota each job should get.
    fn tick(&mut self) -> Vec<(String, QuotaWish)>;
    /// The budget part of `status`.
    fn status(&self) -> serde_json::Value;
}

/// The budget of an agent whose trainings are not metered yet: it records
/// trainings and jobs and wishes nothing.
#[derive(Debug, Default)]
pub struct Unmetered {
    trainings: Vec<(String, TrainingSpec, Vec<String>)>,
}

impl NodeBudget for Unmetered {
    fn register_training(&mut self, spec: TrainingSpec) -> Result<String, String> {
        let id = match (spec.pid, &spec.cgroup) {
            (Some(pid), _) => format!("pid-{pid}"),
            (None, Some(cg)) => format!("cgroup-{}", cg.display()),
            (None, None) => return Err("protect needs a training pid or cgroup".to_owned()),
        };
        self.trainings.retain(|t| t.0 != id);
        self.trainings.push((id.clone(), spec, Vec::new()));
        Ok(id)
    }

    fn add_job(&mut self, training: &str, job: &str, _job_cgroup: PathBuf) -> Result<(), String> {
        let t = self
            .trainings
            .iter_mut()
            .find(|t| t.0 == training)
            .ok_or_else(|| format!("no training {training:?} is registered"))?;
        t.2.push(job.to_owned());
        Ok(())
    }

    fn remove_job(&mut self, job: &str) {
        for t in &mut self.trainings {
            t.2.retain(|j| j != job);
        }
    }

    fn tick(&mut self) -> Vec<(String, QuotaWish)> {
        Vec::new()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "trainings": self.trainings.iter().map(|(id, spec, jobs)| serde_json::json!({
                "id": id,
                "pid": spec.pid,
                "cgroup": spec.cgroup,
                "budget_fraction": spec.budget_fraction,
                "jobs": jobs,
            })).collect::<Vec<_>>()
        })
    }
}
