//! Every thread of a job in the idle class runs `SCHED_IDLE`.
//!
//! The job's cgroup is idle (`cpu.idle`, else the lowest weight) only among
//! its siblings inside the enforcer's slice; where the slice meets the
//! training, it competes with its full weight, and a waking training thread
//! does not preempt it at once. A `SCHED_IDLE` thread is preempted at once
//! by any normal thread on its CPU, whatever the hierarchy. Threads inherit
//! the policy, so this is mostly one pass at the job's first tick; each tick
//! picks up the rest, and puts back any thread that left the class (an
//! unprivileged thread may go back to `SCHED_OTHER` within its
//! `RLIMIT_NICE`). This holds for every job in the idle class, with or
//! without a training to protect, measured only or held by the budget loop.

use std::collections::HashSet;

use crate::host::{Pid, ProcFs};
use crate::report::Report;

use super::monitor::{JobInfo, Monitor, MonitorError, Sample, TickContext, Wishes};

/// Threads remembered as put in the class; past this the set starts over
/// (a job that churns threads), which only means more policy reads.
const REMEMBERED: usize = 65_536;

/// See the module docs.
#[derive(Debug, Default)]
pub struct IdleThreads {
    on: bool,
    /// Threads this monitor put in the class.
    made_idle: HashSet<i32>,
    /// Threads found out of the class after this monitor put them in.
    escapes: u64,
}

impl IdleThreads {
    /// Puts the job's threads listed by `pids` (the processes of its cgroup)
    /// in the class; returns how many changed.
    fn enforce(&mut self, pids: Vec<i32>) -> usize {
        let proc = ProcFs::new();
        let mut changed = 0;
        for pid in pids.into_iter().filter_map(Pid::new) {
            for tid in proc.threads(pid).into_iter().map(Pid::as_raw) {
                // A thread gone meanwhile fails here or below: skipped.
                let Ok(policy) = crate::sched::thread_policy(tid) else {
                    continue;
                };
                if policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_IDLE {
                    continue;
                }
                if self.made_idle.contains(&tid) {
                    self.escapes += 1;
                    if self.escapes == 1 {
                        tracing::warn!(tid, policy, "a job thread left the idle class: put back");
                    }
                }
                match crate::sched::set_thread_policy(tid, libc::SCHED_IDLE, 0) {
                    Ok(()) => {
                        changed += 1;
                        if self.made_idle.len() >= REMEMBERED {
                            self.made_idle.clear();
                        }
                        self.made_idle.insert(tid);
                    }
                    Err(error) => {
                        tracing::debug!(tid, %error, "SCHED_IDLE for a job thread failed")
                    }
                }
            }
        }
        changed
    }
}

impl Monitor for IdleThreads {
    fn name(&self) -> &'static str {
        "idle-threads"
    }

    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError> {
        self.on = job.limits.cpu_idle;
        Ok(())
    }

    fn tick(
        &mut self,
        _sample: &Sample,
        ctx: &mut TickContext<'_>,
    ) -> Result<Wishes, MonitorError> {
        if self.on {
            let changed = self.enforce(ctx.cgroup.pids());
            if changed > 0 {
                tracing::debug!(changed, "job threads put in SCHED_IDLE");
            }
        }
        Ok(Wishes::new())
    }

    fn finish(&mut self, _report: &mut Report) {
        if self.escapes > 0 {
            tracing::warn!(
                times = self.escapes,
                "job threads left the idle class during the job and were put back"
            );
        }
    }
}
