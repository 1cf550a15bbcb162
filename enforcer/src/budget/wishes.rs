//! [`AgentWishes`]: the budget of a job that the node agent meters. The
//! agent's loop for the job's training (`budget::node`) decides the job's
//! share; the agent writes it into the job's record, and this monitor, in
//! the job's shim, applies the newest one through the job's one actuator
//! (its `Budget` policy, capped by the job's own limits). The shim meters
//! nothing itself: one meter per training, in the agent.
//!
//! When the agent is gone the last share stays applied; a record that
//! cannot be read leaves the controls as they are.

use std::{path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    job::{
        JobInfo, Monitor, MonitorError, TickContext,
        controls::{Actuator, Policy},
    },
    report::Report,
};

/// The agent's wish for one job, as written into its record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Wish {
    /// CPU quota in cores; `None`: no quota from the budget.
    pub cpu: Option<f64>,
    /// Frozen: the training's steal stayed over budget at the floor.
    pub freeze: bool,
}

/// See the module doc.
pub struct AgentWishes {
    /// The file the agent writes (root's, in root's job record).
    path: PathBuf,
    controls: Option<Arc<Actuator>>,
    applied: Option<Wish>,
}

impl AgentWishes {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            controls: None,
            applied: None,
        }
    }

    fn read(&self) -> Option<Wish> {
        let bytes = std::fs::read(&self.path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

impl Monitor for AgentWishes {
    fn name(&self) -> &'static str {
        "agent budget"
    }

    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError> {
        self.controls = Some(job.controls.clone());
        Ok(())
    }

    fn tick(&mut self, _ctx: &mut TickContext<'_>) -> Result<(), MonitorError> {
        let (Some(controls), Some(wish)) = (&self.controls, self.read()) else {
            return Ok(());
        };
        if self.applied == Some(wish) {
            return Ok(());
        }
        let written = controls.update(Policy::Budget, |w| {
            w.quota = wish.cpu;
            w.frozen = wish.freeze;
        });
        match written {
            Ok(()) => {
                tracing::debug!(quota = ?wish.cpu, frozen = wish.freeze, "the agent's budget share applied");
                self.applied = Some(wish);
            }
            Err(e) => tracing::warn!(error = %e, "applying the agent's budget share"),
        }
        Ok(())
    }

    fn finish(&mut self, _report: &mut Report) {}
}
