//! Applying the controller's decisions to a job: the [`CpuActuator`] trait is
//! what the controller needs from a job's cgroup, implemented by the job
//! cgroup handle (and by fakes in tests). Methods take `&self`: a cgroup
//! handle is a path, the kernel holds the state.

use super::controller::{CpuControls, Decision};

/// The CPU controls of one job's cgroup, as the controller drives them.
pub trait CpuActuator {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sets (or, with `None`, removes) the CPU quota, in cores.
    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), Self::Error>;
    /// Puts the job in (or out of) the idle scheduling class.
    fn set_cpu_idle(&self, idle: bool) -> Result<(), Self::Error>;
    /// Freezes (or thaws) every process of the job.
    fn freeze(&self, frozen: bool) -> Result<(), Self::Error>;
}

/// Writes what changed between `decision.previous` and `decision.controls`;
/// a start decision writes everything. Thawing is written before a quota so
/// that a job is never left frozen by a failed quota write.
pub fn apply<A: CpuActuator + ?Sized>(actuator: &A, decision: &Decision) -> Result<(), A::Error> {
    let (from, to): (CpuControls, CpuControls) = (decision.previous, decision.controls);
    let start = matches!(decision.reason, super::controller::Reason::Start);
    if from.frozen && !to.frozen {
        actuator.freeze(false)?;
    }
    if start || from.idle != to.idle {
        actuator.set_cpu_idle(to.idle)?;
    }
    if start || from.quota != to.quota {
        actuator.set_cpu_quota(to.quota.cores())?;
    }
    if to.frozen && !from.frozen {
        actuator.freeze(true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::budget::controller::{Controller, ControllerConfig, Observation, StealCounters};

    #[derive(Default)]
    struct Fake {
        writes: std::cell::RefCell<Vec<String>>,
    }

    impl CpuActuator for Fake {
        type Error = std::io::Error;
        fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), Self::Error> {
            self.writes.borrow_mut().push(format!("quota {cores:?}"));
            Ok(())
        }
        fn set_cpu_idle(&self, idle: bool) -> Result<(), Self::Error> {
            self.writes.borrow_mut().push(format!("idle {idle}"));
            Ok(())
        }
        fn freeze(&self, frozen: bool) -> Result<(), Self::Error> {
            self.writes.borrow_mut().push(format!("freeze {frozen}"));
            Ok(())
        }
    }

    #[test]
    fn start_writes_idle_and_quota_then_a_tightening_only_the_quota() {
        let mut c = Controller::new(ControllerConfig::new(0.05, 2.0));
        let fake = Fake::default();
        let t0 = Instant::now();
        apply(&fake, &c.start(t0)).expect("apply");
        assert_eq!(*fake.writes.borrow(), ["idle true", "quota None"]);
        fake.writes.borrow_mut().clear();
        let mut d = None;
        for i in 1..=6u32 {
            let obs = Observation {
                steal: Some(StealCounters {
                    steal: Duration::from_millis(30) * i,
                    training_on_cpu: Duration::from_millis(70) * i,
                }),
                job_cpu: None,
                training_slowdown: None,
                paused_slowdown: None,
            };
            d = d.or(c.step(obs, t0 + Duration::from_millis(100) * i));
        }
        apply(&fake, &d.expect("tightened")).expect("apply");
        // 30 % against a 4.5 % target: the strongest cut, half of 2 CPUs.
        assert_eq!(*fake.writes.borrow(), ["quota Some(1.0)"]);
    }
}
