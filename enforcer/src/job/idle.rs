//! Every thread of a job in the idle class runs `SCHED_IDLE`.
//!
//! The job's cgroup is idle (`cpu.idle`, else the lowest weight) only among
//! its siblings inside the enforcer's slice; where the slice meets the
//! training, it competes with its full weight, and a waking training thread
//! does not preempt it at once. A `SCHED_IDLE` thread is preempted at once
//! by any normal thread on its CPU, whatever the hierarchy. A spawned
//! command starts `SCHED_IDLE` (see [`super::spawn_into`]) and threads
//! inherit the policy, so each tick mostly only checks: it picks up
//! processes attached to the job, and puts back any thread that left the
//! class (an unprivileged thread may go back to `SCHED_OTHER` within its
//! `RLIMIT_NICE`). This holds for every job in the idle class, with or
//! without a training to protect, measured only or held by the budget loop.
//!
//! The budget loop may lift the job out of the idle class on trial (see
//! `enforcer_model::controller`): the tick follows what the job's actuator
//! wrote. Out of the class, the job's `SCHED_IDLE` threads go back to
//! `SCHED_OTHER` (their nice kept), so that the job competes at its
//! cgroup's lowest weight; back in it, they are put in `SCHED_IDLE` again.
//! Only threads in the class being left are changed: a thread the job put
//! in another policy (`SCHED_BATCH`, say) stays there, and while the job is
//! out of the class a thread it puts in `SCHED_IDLE` itself is taken out
//! again like any other.
//!
//! Thread numbers come from the job (its `cgroup.procs`, `/proc/<pid>/task`)
//! and may be reused by the time they are acted on, so a thread is held by
//! its `/proc/<tid>` directory, checked to be in the job's cgroup through
//! it, and found still there after the change (`Task`): a thread outside
//! the job is never changed.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use crate::cgroup::membership::{CgroupMembership, ProcCgroups};
use crate::host::{Pid, ProcCgroup, ProcFs};
use crate::report::Report;

use super::monitor::{JobInfo, Monitor, MonitorError, Sample, TickContext, Wishes};

/// Threads remembered as put in the class; past this the set starts over
/// (a job that churns threads), which only means more policy reads.
const REMEMBERED: usize = 65_536;

/// `/proc/<tid>/cgroup` is a few lines; the bound only keeps the read finite.
const CGROUP_FILE_LIMIT: u64 = 64 * 1024;

/// One thread, held by its `/proc/<tid>` directory rather than by its
/// number. The directory stands for that thread only: once the thread is
/// reaped, every lookup in it fails, even after its number went to a new
/// thread. So the cgroup read through it is that thread's, and finding it
/// still there after `sched_setscheduler(tid)` proves the call reached it
/// and no thread that took its number meanwhile.
struct Task {
    tid: i32,
    dir: OwnedFd,
}

impl Task {
    fn open(proc: &ProcFs, tid: i32) -> io::Result<Task> {
        let path = proc.root().join(tid.to_string());
        let dir = nix::fcntl::open(
            &path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Task { tid, dir })
    }

    fn cgroup(&self) -> io::Result<ProcCgroup> {
        let fd = nix::fcntl::openat(
            &self.dir,
            "cgroup",
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut text = String::new();
        File::from(fd)
            .take(CGROUP_FILE_LIMIT)
            .read_to_string(&mut text)?;
        Ok(ProcCgroup::parse(&text))
    }

    /// The thread has not been reaped (a zombie keeps its number too).
    fn alive(&self) -> bool {
        nix::sys::stat::fstatat(&self.dir, "stat", AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct IdleThreads {
    /// The job starts in the idle class (its limits).
    on: bool,
    /// The class the threads are kept in now: the idle class unless the
    /// job's actuator wrote it out of it.
    idle: bool,
    /// Resolved at the first tick from the job's cgroup directory; `None`
    /// until then, or when it could not be (then nothing is changed).
    job: Option<CgroupMembership>,
    /// Threads this monitor put in the class.
    made_idle: HashSet<i32>,
    /// Threads found out of the class after this monitor put them in.
    escapes: u64,
    /// Threads whose policy was not changed because they were not in the
    /// job's cgroup when checked (they left it, or their number was reused
    /// by a thread outside the job between the listing and the check).
    outsiders: u64,
}

/// What became of one thread listed as the job's.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Already `SCHED_IDLE`, or gone before anything was changed.
    Unchanged,
    /// Put in the class.
    Changed,
    /// Not in the job's cgroup: left alone.
    Outsider,
}

impl IdleThreads {
    /// Puts the job's threads listed by `pids` (the processes of its cgroup)
    /// in the class (`self.idle`: `SCHED_IDLE`, else out of it); returns
    /// how many changed.
    fn enforce(&mut self, proc: &ProcFs, job: &CgroupMembership, pids: Vec<i32>) -> usize {
        let mut changed = 0;
        for pid in pids.into_iter().filter_map(Pid::new) {
            for tid in proc.threads(pid).into_iter().map(Pid::as_raw) {
                match self.enforce_one(proc, job, tid) {
                    Outcome::Changed => changed += 1,
                    Outcome::Outsider => {
                        self.outsiders += 1;
                        tracing::debug!(
                            tid,
                            "a listed thread is not in the job's cgroup: left alone"
                        );
                    }
                    Outcome::Unchanged => {}
                }
            }
        }
        changed
    }

    fn enforce_one(&mut self, proc: &ProcFs, job: &CgroupMembership, tid: i32) -> Outcome {
        // Reading a policy changes nothing: a cheap filter by number.
        let Ok(policy) = crate::sched::thread_policy(tid) else {
            return Outcome::Unchanged;
        };
        let in_class = policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_IDLE;
        // In the class when it should be; out of it, only threads in it
        // are taken out.
        if in_class == self.idle {
            return Outcome::Unchanged;
        }
        let to = if self.idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        // A thread gone meanwhile fails here: skipped.
        let Ok(task) = Task::open(proc, tid) else {
            return Outcome::Unchanged;
        };
        match task.cgroup() {
            Ok(cgroup) if cgroup.is_within(&job.hierarchy, &job.path) => {}
            Ok(_) => return Outcome::Outsider,
            Err(_) => return Outcome::Unchanged,
        }
        if self.idle && self.made_idle.contains(&tid) {
            self.escapes += 1;
            if self.escapes == 1 {
                tracing::warn!(tid, policy, "a job thread left the idle class: put back");
            }
        }
        if let Err(error) = crate::sched::set_thread_policy(task.tid, to, 0) {
            tracing::debug!(tid, to, %error, "changing a job thread's policy failed");
            return Outcome::Unchanged;
        }
        if !task.alive() {
            // The thread was reaped between the cgroup check and the call:
            // its number may, in theory (the PID space would have to wrap
            // within microseconds), have reached another thread first.
            tracing::warn!(
                tid,
                to,
                "a job thread exited while its policy was changed: if its number was reused at once, thread {tid} may have policy {to}"
            );
            return Outcome::Unchanged;
        }
        if !self.idle {
            return Outcome::Changed;
        }
        if self.made_idle.len() >= REMEMBERED {
            self.made_idle.clear();
        }
        self.made_idle.insert(tid);
        Outcome::Changed
    }

    /// The job's membership, resolved once from its cgroup directory.
    fn job(&mut self, dir: &std::path::Path) -> Option<CgroupMembership> {
        if self.job.is_none() {
            match ProcCgroups::default().membership_of_dir(dir) {
                Ok(job) => self.job = Some(job),
                Err(error) => {
                    // Without it no thread can be checked, so none is
                    // changed (the command still started SCHED_IDLE).
                    tracing::warn!(
                        %error,
                        "the job's cgroup could not be placed: its threads are not kept SCHED_IDLE"
                    );
                    self.on = false;
                }
            }
        }
        self.job.clone()
    }
}

impl Monitor for IdleThreads {
    fn name(&self) -> &'static str {
        "idle-threads"
    }

    fn start(&mut self, job: &JobInfo) -> Result<(), MonitorError> {
        self.on = job.limits.cpu_idle;
        self.idle = self.on;
        Ok(())
    }

    fn tick(&mut self, sample: &Sample, ctx: &mut TickContext<'_>) -> Result<Wishes, MonitorError> {
        if self.on {
            // What the actuator wrote last; nothing written yet: the limits.
            let idle = sample.applied.idle.unwrap_or(true);
            if idle != self.idle {
                self.idle = idle;
                // Threads taken out on purpose are not escapes once back.
                self.made_idle.clear();
            }
            let proc = ProcFs::new();
            if let Some(job) = self.job(ctx.cgroup.path()) {
                let changed = self.enforce(&proc, &job, ctx.cgroup.pids());
                if changed > 0 {
                    tracing::debug!(changed, idle, "job threads' policy changed");
                }
            }
        }
        Ok(Wishes::new())
    }

    fn finish(&mut self, _report: &mut Report) {
        if self.outsiders > 0 {
            tracing::info!(
                times = self.outsiders,
                "threads listed as the job's were found outside its cgroup and left alone"
            );
        }
        if self.escapes > 0 {
            tracing::warn!(
                times = self.escapes,
                "job threads left the idle class during the job and were put back"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl IdleThreads {
        /// As started for a job in the idle class.
        fn in_class() -> Self {
            IdleThreads {
                on: true,
                idle: true,
                ..IdleThreads::default()
            }
        }
    }
    use crate::host::Hierarchy;
    use std::sync::mpsc;

    /// A thread of this test process that parks until dropped.
    struct Parked {
        tid: i32,
        stop: mpsc::Sender<()>,
        handle: std::thread::JoinHandle<()>,
    }

    impl Parked {
        fn start() -> Parked {
            let (tid_tx, tid_rx) = mpsc::channel();
            let (stop, stop_rx) = mpsc::channel::<()>();
            let handle = std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop_rx.recv();
            });
            let tid = tid_rx.recv().unwrap();
            Parked { tid, stop, handle }
        }

        fn end(self) {
            drop(self.stop);
            self.handle.join().unwrap();
        }
    }

    fn own_membership() -> CgroupMembership {
        let cgroup = ProcFs::new().self_cgroup().unwrap();
        CgroupMembership {
            hierarchy: Hierarchy::Unified,
            path: cgroup.unified().expect("a cgroup2 line").to_owned(),
        }
    }

    #[test]
    fn a_listed_thread_outside_the_jobs_cgroup_is_left_in_its_class() {
        let thread = Parked::start();
        let mut idle = IdleThreads::in_class();
        let elsewhere = CgroupMembership {
            hierarchy: Hierarchy::Unified,
            path: "/no-such-job-cgroup".to_owned(),
        };
        let outcome = idle.enforce_one(&ProcFs::new(), &elsewhere, thread.tid);
        assert_eq!(outcome, Outcome::Outsider);
        assert_eq!(
            crate::sched::thread_policy(thread.tid).unwrap(),
            libc::SCHED_OTHER
        );
        assert!(idle.made_idle.is_empty());
        thread.end();
    }

    #[test]
    fn a_listed_thread_inside_the_jobs_cgroup_is_put_in_the_idle_class_once() {
        let thread = Parked::start();
        let mut idle = IdleThreads::in_class();
        let job = own_membership();
        let proc = ProcFs::new();
        assert_eq!(idle.enforce_one(&proc, &job, thread.tid), Outcome::Changed);
        assert_eq!(
            crate::sched::thread_policy(thread.tid).unwrap(),
            libc::SCHED_IDLE
        );
        // Already in the class: nothing to do, no escape counted.
        assert_eq!(
            idle.enforce_one(&proc, &job, thread.tid),
            Outcome::Unchanged
        );
        assert_eq!(idle.escapes, 0);
        thread.end();
    }

    #[test]
    fn out_of_the_idle_class_the_jobs_idle_threads_go_back_to_sched_other_and_in_again() {
        let thread = Parked::start();
        let batch = Parked::start();
        crate::sched::set_thread_policy(batch.tid, libc::SCHED_BATCH, 0).unwrap();
        let mut idle = IdleThreads::in_class();
        let job = own_membership();
        let proc = ProcFs::new();
        assert_eq!(idle.enforce_one(&proc, &job, thread.tid), Outcome::Changed);
        assert_eq!(idle.enforce_one(&proc, &job, batch.tid), Outcome::Changed);
        // Lifted out of the class: both were SCHED_IDLE, both go back to
        // SCHED_OTHER.
        idle.idle = false;
        idle.made_idle.clear();
        for tid in [thread.tid, batch.tid] {
            assert_eq!(idle.enforce_one(&proc, &job, tid), Outcome::Changed);
            assert_eq!(crate::sched::thread_policy(tid).unwrap(), libc::SCHED_OTHER);
        }
        // A thread the job put in SCHED_BATCH out of the class stays there.
        crate::sched::set_thread_policy(batch.tid, libc::SCHED_BATCH, 0).unwrap();
        assert_eq!(idle.enforce_one(&proc, &job, batch.tid), Outcome::Unchanged);
        assert_eq!(
            crate::sched::thread_policy(batch.tid).unwrap(),
            libc::SCHED_BATCH
        );
        // Back in the class: SCHED_IDLE again, and not counted as escapes.
        idle.idle = true;
        assert_eq!(idle.enforce_one(&proc, &job, thread.tid), Outcome::Changed);
        assert_eq!(
            crate::sched::thread_policy(thread.tid).unwrap(),
            libc::SCHED_IDLE
        );
        assert_eq!(idle.escapes, 0);
        thread.end();
        batch.end();
    }

    #[test]
    fn a_thread_held_by_its_proc_directory_is_seen_gone_once_reaped() {
        let thread = Parked::start();
        let task = Task::open(&ProcFs::new(), thread.tid).unwrap();
        assert!(task.alive());
        thread.end();
        // The join returns as the thread exits; it is reaped just after.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while task.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            !task.alive(),
            "thread {} still seen after it exited",
            task.tid
        );
        assert!(task.cgroup().is_err(), "its cgroup read after it exited");
    }
}
