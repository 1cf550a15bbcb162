//! The one actuator of a job: each policy (the job's static limits, the
//! budget loop, the CPU placement, the duty cycle) states the controls it
//! wants; the [`Actuator`] merges the wishes (quota: the smallest, idle and
//! frozen: any, CPUs: the intersection) and writes what changed in the
//! merged result through the job's cgroup handle, so that no policy undoes
//! another's freeze or quota. The supervisor records the wishes its
//! monitors return each tick and applies them once ([`Actuator::want`],
//! [`Actuator::apply`]); the duty cycle's driver thread, which freezes
//! between ticks, changes its wish and writes at once
//! ([`Actuator::update`]). Writes are serialised.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use crate::cgroup::{CgroupError, JobCgroup, cpuset::CpuList, subtree::SliceClass};

/// Who wants a control. The order breaks ties where wishes cannot be
/// merged (disjoint CPU sets: the earlier policy's set is kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Policy {
    /// The limits the user asked for (`--cpu`): a ceiling for the others.
    Limits,
    Budget,
    Placement,
    DutyCycle,
}

/// The controls one policy wants; `None` / `false`: no wish.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Controls {
    /// CPU quota in cores.
    pub quota: Option<f64>,
    /// In (or out of) the idle scheduling class.
    pub idle: Option<bool>,
    pub frozen: bool,
    /// The CPUs the job may run on.
    pub cpus: Option<CpuList>,
}

/// Merges policies' wishes: the smallest quota, idle or frozen if any
/// wants it, the CPUs every one allows (the first set where they allow
/// none in common).
pub fn merge<'a>(wishes: impl IntoIterator<Item = &'a Controls>) -> Controls {
    let mut out = Controls::default();
    for w in wishes {
        out.quota = match (out.quota, w.quota) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        out.idle = match (out.idle, w.idle) {
            (Some(a), Some(b)) => Some(a || b),
            (a, b) => a.or(b),
        };
        out.frozen |= w.frozen;
        out.cpus = match (out.cpus.take(), &w.cpus) {
            (Some(a), Some(b)) => {
                let both = CpuList::new(a.iter().filter(|c| b.contains(*c)));
                if both.is_empty() {
                    tracing::warn!(kept = %a, refused = %b, "CPU wishes have no CPU in common: the first is kept");
                    Some(a)
                } else {
                    Some(both)
                }
            }
            (a, b) => a.or_else(|| b.clone()),
        };
    }
    out
}

/// One of the controls the actuator writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Freeze,
    Idle,
    Quota,
    Cpus,
}

impl std::fmt::Display for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Freeze => "freezer state",
            Control::Idle => "CPU idle class",
            Control::Quota => "CPU quota",
            Control::Cpus => "CPU set",
        })
    }
}

/// A write of the merged controls that failed: which control, and the
/// cgroup error (with its path and value).
#[derive(Debug, thiserror::Error)]
#[error("writing the job's {control}: {source}")]
pub struct ControlError {
    pub control: Control,
    #[source]
    pub source: CgroupError,
}

/// What the actuator writes to: a job's cgroup (or a fake in tests).
pub trait ControlTarget: Send + Sync {
    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError>;
    fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError>;
    fn set_cpus(&self, cpus: Option<&CpuList>) -> Result<(), CgroupError>;
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError>;
    /// For messages: what this writes to.
    fn describe(&self) -> String;
}

impl ControlTarget for JobCgroup {
    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError> {
        JobCgroup::set_cpu_quota(self, cores)
    }
    fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError> {
        JobCgroup::set_cpu_idle(self, idle)
    }
    fn set_cpus(&self, cpus: Option<&CpuList>) -> Result<(), CgroupError> {
        JobCgroup::set_cpus(self, cpus)
    }
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        JobCgroup::freeze(self, frozen)
    }
    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

/// A job's cgroup in the evaluation slice: the job's CPU class is written to
/// both, since the slice is what competes with the training (a job out of
/// the idle class in an idle slice would still be idle to it). Into the
/// idle class the slice goes first, out of it last, so that a failed write
/// leaves the slice idle; the slice stays out while another job in it is
/// out ([`SliceClass`]). A job that ends out of the idle class goes back to
/// it, and the slice with it, when this is dropped (the end of its
/// supervision).
#[derive(Debug)]
pub struct JobInSlice {
    job: Arc<JobCgroup>,
    slice: SliceClass,
    /// The slice was lifted out of the idle class by this job.
    lifted: Mutex<bool>,
}

impl JobInSlice {
    pub fn new(job: Arc<JobCgroup>, slice: SliceClass) -> Self {
        JobInSlice {
            job,
            slice,
            lifted: Mutex::new(false),
        }
    }

    fn lifted(&self) -> MutexGuard<'_, bool> {
        self.lifted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's directory name, the same in the slice of every hierarchy.
    fn name(&self) -> Option<&std::ffi::OsStr> {
        self.job.path().file_name()
    }
}

impl ControlTarget for JobInSlice {
    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError> {
        self.job.set_cpu_quota(cores)
    }
    fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError> {
        let mut lifted = self.lifted();
        if idle {
            self.slice.lower(self.name())?;
            *lifted = false;
            self.job.set_cpu_idle(true)
        } else {
            self.job.set_cpu_idle(false)?;
            *lifted = true;
            self.slice.lift()
        }
    }
    fn set_cpus(&self, cpus: Option<&CpuList>) -> Result<(), CgroupError> {
        self.job.set_cpus(cpus)
    }
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.job.freeze(frozen)
    }
    fn describe(&self) -> String {
        self.job.path().display().to_string()
    }
}

impl Drop for JobInSlice {
    fn drop(&mut self) {
        if !*self.lifted() {
            return;
        }
        // The job's own cgroup first, so that no other job's loop, looking
        // at the slice's jobs, takes this one for lifted while it goes away.
        if let Err(error) = self.job.set_cpu_idle(true) {
            tracing::debug!(job = %self.job.path().display(), %error, "the ended job's cgroup could not be put back in the idle class");
        }
        if let Err(error) = self.slice.lower(self.name()) {
            tracing::warn!(
                slice = %self.slice.dir().display(),
                %error,
                "the evaluation slice could not be put back in the idle class after the job"
            );
        }
    }
}

/// What the cgroup holds, as far as the actuator wrote it.
#[derive(Debug)]
struct Applied {
    quota: Option<f64>,
    /// `None`: not written by the actuator yet (the first wish is written).
    idle: Option<bool>,
    frozen: bool,
    cpus: Option<CpuList>,
}

struct State {
    wishes: BTreeMap<Policy, Controls>,
    applied: Applied,
    /// Set at the deadline: the job must be able to act on its SIGTERM, so
    /// no policy freezes it any more.
    released: bool,
    /// The control whose write failed at the last write, if one did.
    rejected: Option<Control>,
}

/// Merges the policies' wishes and applies the result; see the module doc.
pub struct Actuator {
    target: Arc<dyn ControlTarget>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Actuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actuator")
            .field("target", &self.target.describe())
            .finish_non_exhaustive()
    }
}

impl Actuator {
    /// An actuator for a job whose cgroup was set up with static quota
    /// `cpu_cap` (cores): the ceiling of every other policy's quota.
    pub fn new(target: Arc<dyn ControlTarget>, cpu_cap: Option<f64>) -> Self {
        let mut wishes = BTreeMap::new();
        wishes.insert(
            Policy::Limits,
            Controls {
                quota: cpu_cap,
                ..Controls::default()
            },
        );
        Actuator {
            target,
            state: Mutex::new(State {
                wishes,
                applied: Applied {
                    quota: cpu_cap,
                    idle: None,
                    frozen: false,
                    cpus: None,
                },
                released: false,
                rejected: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes `policy`'s wish and writes what changed in the merged
    /// controls at once (see [`Actuator::apply`]).
    pub fn update(
        &self,
        policy: Policy,
        change: impl FnOnce(&mut Controls),
    ) -> Result<(), ControlError> {
        let mut state = self.lock();
        change(state.wishes.entry(policy).or_default());
        Self::write(&self.target, &mut state)
    }

    /// Replaces `policy`'s wish; written by the next [`Actuator::apply`].
    pub fn want(&self, policy: Policy, controls: Controls) {
        self.lock().wishes.insert(policy, controls);
    }

    /// Writes what changed in the merged controls: a thaw first, so that a
    /// job is never left frozen by a failed write, a freeze last. On an
    /// error the rest is not written; the wishes stay, and are written by
    /// the next apply.
    pub fn apply(&self) -> Result<(), ControlError> {
        Self::write(&self.target, &mut self.lock())
    }

    /// Thaws the job for good: from now on no policy's freeze is written
    /// (the job's kill grace, when it must act on its SIGTERM).
    pub fn release_freeze(&self) -> Result<(), ControlError> {
        let mut state = self.lock();
        state.released = true;
        // Whatever was written before, the job must end up thawed.
        state.applied.frozen = true;
        Self::write(&self.target, &mut state)
    }

    fn write(t: &Arc<dyn ControlTarget>, state: &mut State) -> Result<(), ControlError> {
        let result = Self::write_merged(t, state);
        state.rejected = result.as_ref().err().map(|e| e.control);
        result
    }

    fn write_merged(t: &Arc<dyn ControlTarget>, state: &mut State) -> Result<(), ControlError> {
        let failed = |control| move |source| ControlError { control, source };
        let mut want = merge(state.wishes.values());
        want.frozen &= !state.released;
        let applied = &mut state.applied;
        if applied.frozen && !want.frozen {
            t.freeze(false).map_err(failed(Control::Freeze))?;
            applied.frozen = false;
        }
        if let Some(idle) = want.idle
            && applied.idle != Some(idle)
        {
            t.set_cpu_idle(idle).map_err(failed(Control::Idle))?;
            applied.idle = Some(idle);
        }
        if applied.quota != want.quota {
            t.set_cpu_quota(want.quota)
                .map_err(failed(Control::Quota))?;
            applied.quota = want.quota;
        }
        if applied.cpus != want.cpus {
            t.set_cpus(want.cpus.as_ref())
                .map_err(failed(Control::Cpus))?;
            applied.cpus = want.cpus;
        }
        if want.frozen && !applied.frozen {
            t.freeze(true).map_err(failed(Control::Freeze))?;
            applied.frozen = true;
        }
        Ok(())
    }

    /// What the job's cgroup holds, as far as the actuator wrote it.
    pub fn applied(&self) -> Controls {
        let state = self.lock();
        let a = &state.applied;
        Controls {
            quota: a.quota,
            idle: a.idle,
            frozen: a.frozen,
            cpus: a.cpus.clone(),
        }
    }

    /// The control whose write failed at the last write, if one did.
    pub fn rejected(&self) -> Option<Control> {
        self.lock().rejected
    }

    /// What the merged controls are now.
    pub fn merged(&self) -> Controls {
        merge(self.lock().wishes.values())
    }

    pub fn describe(&self) -> String {
        self.target.describe()
    }
}

/// The duty cycle's freezer: its freeze is a wish of [`Policy::DutyCycle`],
/// applied by the job's actuator like any other.
#[derive(Debug, Clone)]
pub struct DutyFreezer(pub Arc<Actuator>);

impl crate::gpu::duty::Freezer for DutyFreezer {
    fn freeze(&self, frozen: bool) -> Result<(), crate::gpu::duty::FreezeError> {
        self.0
            .update(Policy::DutyCycle, |w| w.frozen = frozen)
            .map_err(|e| crate::gpu::duty::FreezeError::Backend(e.to_string()))
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every write.
    #[derive(Default)]
    struct Fake {
        writes: Mutex<Vec<String>>,
        /// Like a host without a cpuset for jobs.
        refuse_cpus: bool,
    }

    impl Fake {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.writes.lock().unwrap())
        }
        fn push(&self, s: String) -> Result<(), CgroupError> {
            self.writes.lock().unwrap().push(s);
            Ok(())
        }
    }

    impl ControlTarget for Fake {
        fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError> {
            self.push(format!("quota {cores:?}"))
        }
        fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError> {
            self.push(format!("idle {idle}"))
        }
        fn set_cpus(&self, cpus: Option<&CpuList>) -> Result<(), CgroupError> {
            if self.refuse_cpus {
                return Err(CgroupError::Controller {
                    controller: "cpuset".into(),
                    reason: "no cpuset for jobs".into(),
                });
            }
            self.push(format!(
                "cpus {}",
                cpus.map_or("all".into(), |c| c.to_string())
            ))
        }
        fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
            self.push(format!("freeze {frozen}"))
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn actuator(cap: Option<f64>) -> (Arc<Fake>, Actuator) {
        let fake = Arc::new(Fake::default());
        let a = Actuator::new(fake.clone(), cap);
        (fake, a)
    }

    #[test]
    fn merge_takes_the_smallest_quota_any_freeze_and_the_common_cpus() {
        let a = Controls {
            quota: Some(1.5),
            cpus: Some(CpuList::new([0, 1, 2])),
            ..Controls::default()
        };
        let b = Controls {
            quota: Some(0.5),
            frozen: true,
            cpus: Some(CpuList::new([1, 2, 3])),
            ..Controls::default()
        };
        let c = Controls::default();
        let m = merge([&a, &b, &c]);
        assert_eq!(m.quota, Some(0.5));
        assert!(m.frozen);
        assert_eq!(m.cpus, Some(CpuList::new([1, 2])));
        assert_eq!(merge([&c]), Controls::default());
    }

    #[test]
    fn merge_keeps_the_first_cpu_set_when_the_sets_share_no_cpu() {
        let a = Controls {
            cpus: Some(CpuList::new([0])),
            ..Controls::default()
        };
        let b = Controls {
            cpus: Some(CpuList::new([1])),
            ..Controls::default()
        };
        assert_eq!(merge([&a, &b]).cpus, Some(CpuList::new([0])));
    }

    #[test]
    fn a_duty_cycle_thaw_does_not_undo_the_budget_loops_freeze() {
        let (fake, a) = actuator(None);
        a.update(Policy::Budget, |w| w.frozen = true).unwrap();
        assert_eq!(fake.take(), ["freeze true"]);
        // The duty cycle's frozen part and its thaw: the job stays frozen.
        a.update(Policy::DutyCycle, |w| w.frozen = true).unwrap();
        a.update(Policy::DutyCycle, |w| w.frozen = false).unwrap();
        assert!(fake.take().is_empty());
        a.update(Policy::Budget, |w| w.frozen = false).unwrap();
        assert_eq!(fake.take(), ["freeze false"]);
    }

    #[test]
    fn the_static_cpu_limit_caps_the_budget_quota_and_is_restored_when_the_loop_lets_go() {
        let (fake, a) = actuator(Some(1.0));
        a.update(Policy::Budget, |w| w.quota = Some(2.0)).unwrap();
        // Above the cap: nothing changes in the cgroup.
        assert!(fake.take().is_empty());
        a.update(Policy::Budget, |w| w.quota = Some(0.25)).unwrap();
        assert_eq!(fake.take(), ["quota Some(0.25)"]);
        a.update(Policy::Budget, |w| w.quota = None).unwrap();
        assert_eq!(fake.take(), ["quota Some(1.0)"]);
    }

    #[test]
    fn a_thaw_is_written_before_and_a_freeze_after_the_other_controls() {
        let (fake, a) = actuator(None);
        a.update(Policy::Budget, |w| {
            w.quota = Some(0.1);
            w.idle = Some(true);
            w.frozen = true;
        })
        .unwrap();
        assert_eq!(fake.take(), ["idle true", "quota Some(0.1)", "freeze true"]);
        a.update(Policy::Budget, |w| {
            w.quota = Some(0.5);
            w.frozen = false;
        })
        .unwrap();
        assert_eq!(fake.take(), ["freeze false", "quota Some(0.5)"]);
    }

    #[test]
    fn after_the_release_no_policy_freezes_the_job_again() {
        let (fake, a) = actuator(None);
        a.update(Policy::DutyCycle, |w| w.frozen = true).unwrap();
        a.release_freeze().unwrap();
        assert_eq!(fake.take(), ["freeze true", "freeze false"]);
        a.update(Policy::DutyCycle, |w| w.frozen = false).unwrap();
        a.update(Policy::DutyCycle, |w| w.frozen = true).unwrap();
        a.update(Policy::Budget, |w| w.frozen = true).unwrap();
        assert!(fake.take().is_empty());
    }

    #[test]
    fn the_duty_cycle_driver_freezes_through_the_actuator_and_never_thaws_a_budget_freeze() {
        use crate::gpu::duty::{DutyCycle, RunFraction};
        let fake = Arc::new(Fake::default());
        let a = Arc::new(Actuator::new(fake.clone(), None));
        let d = DutyCycle::start(
            DutyFreezer(a.clone()),
            std::time::Duration::from_millis(20),
            RunFraction::new(0.5),
        )
        .expect("duty thread");
        std::thread::sleep(std::time::Duration::from_millis(100));
        a.update(Policy::Budget, |w| w.frozen = true).unwrap();
        let before = fake.take();
        assert!(before.iter().any(|w| w == "freeze true"), "{before:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        d.stop().expect("duty stopped cleanly");
        // Frozen by the budget loop: the duty cycle's thaws wrote nothing.
        assert!(fake.take().is_empty());
        assert!(a.merged().frozen);
    }

    #[test]
    fn wishes_are_written_once_by_apply_and_what_was_written_is_known() {
        let (fake, a) = actuator(None);
        a.want(
            Policy::Budget,
            Controls {
                quota: Some(0.5),
                frozen: true,
                ..Controls::default()
            },
        );
        a.want(
            Policy::Placement,
            Controls {
                cpus: Some(CpuList::new([1])),
                ..Controls::default()
            },
        );
        assert!(fake.take().is_empty(), "want writes nothing");
        a.apply().unwrap();
        assert_eq!(fake.take(), ["quota Some(0.5)", "cpus 1", "freeze true"]);
        a.apply().unwrap();
        assert!(fake.take().is_empty(), "nothing changed: nothing written");
        let applied = a.applied();
        assert_eq!(applied.quota, Some(0.5));
        assert_eq!(applied.cpus, Some(CpuList::new([1])));
        assert!(applied.frozen);
        assert_eq!(a.rejected(), None);
    }

    #[test]
    fn a_refused_control_is_named_and_the_controls_after_it_wait_for_the_next_apply() {
        let fake = Arc::new(Fake {
            refuse_cpus: true,
            ..Fake::default()
        });
        let a = Actuator::new(fake.clone(), None);
        a.want(
            Policy::Placement,
            Controls {
                cpus: Some(CpuList::new([1])),
                ..Controls::default()
            },
        );
        a.want(
            Policy::Budget,
            Controls {
                frozen: true,
                ..Controls::default()
            },
        );
        let e = a.apply().unwrap_err();
        assert_eq!(e.control, Control::Cpus);
        assert!(e.to_string().contains("cpuset"), "{e}");
        assert_eq!(a.rejected(), Some(Control::Cpus));
        assert!(!a.applied().frozen);
        // The placement withdraws its wish: the freeze goes through.
        a.want(Policy::Placement, Controls::default());
        a.apply().unwrap();
        assert_eq!(fake.take(), ["freeze true"]);
        assert_eq!(a.rejected(), None);
    }

    #[test]
    fn placement_and_budget_write_their_own_controls_without_rewriting_the_others() {
        let (fake, a) = actuator(None);
        a.update(Policy::Placement, |w| w.cpus = Some(CpuList::new([2, 3])))
            .unwrap();
        assert_eq!(fake.take(), ["cpus 2-3"]);
        a.update(Policy::Budget, |w| w.quota = Some(1.0)).unwrap();
        assert_eq!(fake.take(), ["quota Some(1.0)"]);
        a.update(Policy::Placement, |w| w.cpus = None).unwrap();
        assert_eq!(fake.take(), ["cpus all"]);
    }
}
