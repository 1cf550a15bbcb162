//! The seam between the agent and its node-wide steal budget: one meter
//! for every job and one budget loop per protected training, shared by the
//! jobs that protect it ([`NodeBudget`]).
//!
//! How a job's CPU quota is applied: the budget never writes a cgroup
//! file. Each job has one actuator (`job::controls`), owned by the session
//! its shim runs. [`NodeBudget::tick`] returns per-job [`QuotaWish`]es; the
//! agent writes each changed wish atomically to the job's record
//! ([`WISH_FILE`]), and the session's [`ExternalBudget`] policy states it as
//! the job's `Budget` controls, merged there with the job's other policies
//! (its static `--cpu` ceiling, placement, duty cycle) and written through
//! that one actuator. So there stays one writer per cgroup file, and when
//! the agent dies the file stays: the job keeps the last wish (or its start
//! quota, before any). A job gets this policy instead of its own budget
//! loop only for a training the node budget [`holds`](NodeBudget::holds).

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

/// The id of the training with this pid or cgroup (the pid wins): one
/// spelling for the agent's jobs and every [`NodeBudget`].
pub fn training_id(pid: Option<i32>, cgroup: Option<&std::path::Path>) -> Option<String> {
    match (pid, cgroup) {
        (Some(pid), _) => Some(format!("pid-{pid}")),
        (None, Some(cg)) => Some(format!("cgroup-{}", cg.display())),
        (None, None) => None,
    }
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
    /// Registers (or updates) a training; returns its id, [`training_id`].
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
    /// Whether this budget holds the jobs of `training` (they then get no
    /// budget loop of their own, only its wishes); `false` leaves each job
    /// its own loop, as without the agent.
    fn holds(&self, _training: &str) -> bool {
        false
    }
    /// Budget events since the last call, per job: `budget_exceeded`,
    /// `budget_recovered`; the agent streams them to subscribers.
    fn take_events(&mut self) -> Vec<(String, &'static str)> {
        Vec::new()
    }
}

/// The budget of an agent whose trainings are not metered yet: it records
/// trainings and jobs and wishes nothing.
#[derive(Debug, Default)]
pub struct Unmetered {
    trainings: Vec<(String, TrainingSpec, Vec<String>)>,
}

impl NodeBudget for Unmetered {
    fn register_training(&mut self, spec: TrainingSpec) -> Result<String, String> {
        let id = training_id(spec.pid, spec.cgroup.as_deref())
            .ok_or_else(|| "protect needs a training pid or cgroup".to_owned())?;
        match self.trainings.iter_mut().find(|t| t.0 == id) {
            Some(t) => t.1 = spec,
            None => self.trainings.push((id.clone(), spec, Vec::new())),
        }
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

/// The file in a job's record directory through which the agent hands the
/// job's shim its budget wish (written atomically by the agent, read by the
/// shim's session each control period).
pub const WISH_FILE: &str = "budget-wish.json";

/// The shim's side of the node budget: a policy of the job's session that
/// states the agent's latest [`QuotaWish`] as the job's `Budget` controls,
/// merged by the job's one actuator with its other policies. When the agent
/// dies the file stays, so the job keeps the last wish.
pub struct ExternalBudget {
    file: PathBuf,
    seen: Option<std::time::SystemTime>,
    controls: Option<std::sync::Arc<crate::job::controls::Actuator>>,
    applied: Option<QuotaWish>,
}

impl ExternalBudget {
    pub fn new(file: PathBuf) -> Self {
        ExternalBudget {
            file,
            seen: None,
            controls: None,
            applied: None,
        }
    }

    /// The wish in the file when it changed since the last call.
    pub fn poll(&mut self) -> Option<QuotaWish> {
        let meta = std::fs::symlink_metadata(&self.file).ok()?;
        let modified = meta.modified().ok()?;
        if !meta.is_file() || self.seen == Some(modified) {
            return None;
        }
        self.seen = Some(modified);
        let text = std::fs::read(&self.file).ok()?;
        match serde_json::from_slice(&text) {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::warn!(file = %self.file.display(), %error, "ignoring an unreadable budget wish");
                None
            }
        }
    }
}

impl crate::job::Monitor for ExternalBudget {
    fn name(&self) -> &'static str {
        "node-budget"
    }

    fn start(
        &mut self,
        job: &crate::job::monitor::JobInfo,
    ) -> Result<(), crate::job::monitor::MonitorError> {
        self.controls = Some(job.controls.clone());
        Ok(())
    }

    fn tick(
        &mut self,
        _ctx: &mut crate::job::monitor::TickContext<'_>,
    ) -> Result<(), crate::job::monitor::MonitorError> {
        let Some(wish) = self.poll() else {
            return Ok(());
        };
        if self.applied == Some(wish) {
            return Ok(());
        }
        if let Some(controls) = &self.controls {
            controls
                .update(crate::job::controls::Policy::Budget, |c| {
                    c.quota = wish.cpu;
                    c.frozen = wish.freeze;
                })
                .map_err(|e| crate::job::monitor::MonitorError::new(e.to_string()))?;
            self.applied = Some(wish);
        }
        Ok(())
    }

    fn finish(&mut self, _report: &mut crate::report::Report) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wish_is_read_once_per_change_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(WISH_FILE);
        let mut ext = ExternalBudget::new(file.clone());
        assert_eq!(ext.poll(), None, "no file: no wish");
        let wish = QuotaWish {
            cpu: Some(0.25),
            freeze: false,
        };
        std::fs::write(&file, serde_json::to_vec(&wish).unwrap()).unwrap();
        assert_eq!(ext.poll(), Some(wish));
        assert_eq!(ext.poll(), None, "unchanged: nothing new");
    }
}
