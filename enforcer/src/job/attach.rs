//! Checks before a live process is moved into a job (`enforcer attach`),
//! each refusal with a message that says why, made before any cgroup exists
//! so that a refusal leaves nothing behind; and the identity checks that make
//! sure the process moved is the one checked, not a later one that got its
//! number while `attach` waited for a slot.

use super::pidfd::PidFd;
use crate::host::{Pid, ProcFs, Stat};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttachRefused {
    #[error("no process with PID {0}")]
    NoSuchPid(Pid),
    #[error("PID 1 (init) is never attached")]
    Init,
    #[error("PID {0} is a kernel thread")]
    KernelThread(Pid),
    #[error("PID {0} is this enforcer itself")]
    Itself(Pid),
    #[error(
        "PID {0} is an ancestor of this enforcer; attaching it would put the enforcer's supervisor chain under the job's limits"
    )]
    Ancestor(Pid),
    #[error("PID {0} is the protected training process (training.pid / --protect)")]
    Training(Pid),
    #[error("PID {0} exited while it was being attached")]
    ExitedMidway(Pid),
    #[error(
        "PID {0} is no longer the process that was checked (it exited and another process got its number, or changed owner)"
    )]
    Replaced(Pid),
    #[error("PID {pid}: cannot hold a pidfd on it: {error}")]
    NoPidFd { pid: Pid, error: String },
    #[error("PID {pid} belongs to uid {owner}; uid {caller} may attach only its own processes")]
    NotOwner { pid: Pid, owner: u32, caller: u32 },
}

/// What tells one process from a later one with the same number: its start
/// time (field 22 of `/proc/<pid>/stat`, clock ticks since boot) and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub start_time: u64,
    pub uid: u32,
    pub gid: u32,
}

/// The identity of `pid` as `/proc` shows it now.
pub fn identity(proc: &ProcFs, pid: Pid) -> Option<Identity> {
    let start_time = proc.stat(pid).ok()?.start_time;
    let status = proc.status(pid).ok()?;
    Some(Identity {
        start_time,
        uid: status.uid?,
        gid: status.gid?,
    })
}

/// A process held from the first check on: a pidfd, and the identity read
/// while the pidfd already held it.
#[derive(Debug)]
pub struct Held {
    pub pidfd: PidFd,
    pub identity: Identity,
}

impl Held {
    /// Takes a pidfd on `pid` and records who it is. The identity is read
    /// after the pidfd is open and confirmed by a signal 0 through it after,
    /// so it is that of the process the pidfd holds.
    pub fn take(proc: &ProcFs, pid: Pid) -> Result<Self, AttachRefused> {
        let pidfd = PidFd::open(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => AttachRefused::NoSuchPid(pid),
            _ => AttachRefused::NoPidFd {
                pid,
                error: e.to_string(),
            },
        })?;
        let identity = identity(proc, pid).ok_or(AttachRefused::NoSuchPid(pid))?;
        if !pidfd.is_alive() {
            return Err(AttachRefused::NoSuchPid(pid));
        }
        Ok(Held { pidfd, identity })
    }

    /// Whether the number still names the held process: alive through the
    /// pidfd (so the number cannot have been reused), not a zombie, and with
    /// the start time and owner recorded at the check.
    pub fn verify(&self, proc: &ProcFs) -> Result<(), AttachRefused> {
        let pid = self.pidfd.pid();
        if !self.pidfd.is_alive() {
            return Err(AttachRefused::ExitedMidway(pid));
        }
        if stat(proc, pid).is_some_and(|s| s.is_zombie()) {
            return Err(AttachRefused::ExitedMidway(pid));
        }
        match identity(proc, pid) {
            Some(now) if now == self.identity => Ok(()),
            _ => Err(AttachRefused::Replaced(pid)),
        }
    }
}

fn stat(proc: &ProcFs, pid: Pid) -> Option<Stat> {
    proc.stat(pid).ok()
}

/// Refuses PIDs that must never be attached.
pub fn check(
    proc: &ProcFs,
    pid: Pid,
    self_pid: Pid,
    training: Option<Pid>,
) -> Result<(), AttachRefused> {
    if pid.as_raw() == 1 {
        return Err(AttachRefused::Init);
    }
    if pid == self_pid {
        return Err(AttachRefused::Itself(pid));
    }
    if training == Some(pid) {
        return Err(AttachRefused::Training(pid));
    }
    let Some(target) = stat(proc, pid) else {
        return Err(AttachRefused::NoSuchPid(pid));
    };
    if target.is_kernel_thread() || pid.as_raw() == 2 {
        return Err(AttachRefused::KernelThread(pid));
    }
    if target.is_zombie() {
        return Err(AttachRefused::NoSuchPid(pid));
    }
    let mut p = self_pid;
    for _ in 0..64 {
        match stat(proc, p).and_then(|s| s.ppid) {
            Some(ppid) if ppid.as_raw() > 1 => {
                if ppid == pid {
                    return Err(AttachRefused::Ancestor(pid));
                }
                p = ppid;
            }
            _ => break,
        }
    }
    Ok(())
}

/// Every live descendant of `pid` (for `--tree`), parents first, each with
/// its start time when it was seen.
pub fn descendants(proc: &ProcFs, pid: Pid) -> Vec<(Pid, u64)> {
    proc.descendants(pid)
        .into_iter()
        .map(|s| (s.pid, s.start_time))
        .collect()
}

/// The thread ids of `pid`.
pub fn threads(proc: &ProcFs, pid: Pid) -> Vec<Pid> {
    proc.threads(pid)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    use std::path::Path;

    use crate::host::fixtures::fake_process as proc_entry_started;

    fn pid(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    /// `PF_KTHREAD` from `linux/sched.h`.
    const PF_KTHREAD: u64 = 0x0020_0000;

    fn proc_entry(root: &Path, pid: i32, comm: &str, state: char, ppid: i32, flags: u64) {
        proc_entry_started(root, pid, comm, state, ppid, flags, 1000 + pid as u64, 0);
    }

    #[test]
    fn identity_reads_start_time_and_owner() {
        let d = tempfile::tempdir().unwrap();
        proc_entry_started(d.path(), 42, "a) (b", 'S', 1, 0, 987_654, 1500);
        assert_eq!(
            identity(&ProcFs::at(d.path()), pid(42)),
            Some(Identity {
                start_time: 987_654,
                uid: 1500,
                gid: 1500
            })
        );
        let real = identity(&ProcFs::new(), Pid::this_process()).unwrap();
        assert!(real.start_time > 0);
    }

    /// The seam for the PID-reuse race, which cannot be staged by timing: a
    /// held process whose number now shows another start time or owner (a
    /// newcomer) is refused, and so is one whose pidfd says it exited.
    #[test]
    fn a_held_process_that_changed_identity_or_exited_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let proc = ProcFs::at(r);
        let me = Pid::this_process();
        let held = Held {
            pidfd: PidFd::open(me).unwrap(),
            identity: Identity {
                start_time: 5000,
                uid: 0,
                gid: 0,
            },
        };
        proc_entry_started(r, me.as_raw(), "eval", 'S', 1, 0, 5000, 0);
        assert_eq!(held.verify(&proc), Ok(()));
        proc_entry_started(r, me.as_raw(), "eval", 'S', 1, 0, 5001, 0);
        assert_eq!(held.verify(&proc), Err(AttachRefused::Replaced(me)));
        proc_entry_started(r, me.as_raw(), "eval", 'S', 1, 0, 5000, 1500);
        assert_eq!(held.verify(&proc), Err(AttachRefused::Replaced(me)));
        fs::remove_dir_all(r.join(me.to_string())).unwrap();
        assert_eq!(held.verify(&proc), Err(AttachRefused::Replaced(me)));

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let child_pid = Pid::try_from(child.id()).unwrap();
        let dead = Held {
            pidfd: PidFd::open(child_pid).unwrap(),
            identity: Identity {
                start_time: 7000,
                uid: 0,
                gid: 0,
            },
        };
        child.wait().unwrap();
        // Even with /proc showing the recorded identity under its number.
        proc_entry_started(r, child_pid.as_raw(), "true", 'S', 1, 0, 7000, 0);
        assert_eq!(
            dead.verify(&proc),
            Err(AttachRefused::ExitedMidway(child_pid))
        );
    }

    #[test]
    fn refusals_name_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let proc = ProcFs::at(r);
        proc_entry(r, 2, "kthreadd", 'S', 0, PF_KTHREAD);
        proc_entry(r, 50, "kworker/0:1 x", 'I', 2, PF_KTHREAD | 0x40);
        proc_entry(r, 100, "shell", 'S', 1, 0);
        proc_entry(r, 200, "enforcer", 'S', 100, 0);
        proc_entry(r, 300, "eval (x)", 'R', 100, 0);
        proc_entry(r, 301, "zombie", 'Z', 100, 0);
        assert_eq!(
            check(&proc, pid(1), pid(200), None),
            Err(AttachRefused::Init)
        );
        assert_eq!(
            check(&proc, pid(50), pid(200), None),
            Err(AttachRefused::KernelThread(pid(50)))
        );
        assert_eq!(
            check(&proc, pid(200), pid(200), None),
            Err(AttachRefused::Itself(pid(200)))
        );
        assert_eq!(
            check(&proc, pid(100), pid(200), None),
            Err(AttachRefused::Ancestor(pid(100)))
        );
        assert_eq!(
            check(&proc, pid(300), pid(200), Some(pid(300))),
            Err(AttachRefused::Training(pid(300)))
        );
        assert_eq!(
            check(&proc, pid(999), pid(200), None),
            Err(AttachRefused::NoSuchPid(pid(999)))
        );
        assert_eq!(
            check(&proc, pid(301), pid(200), None),
            Err(AttachRefused::NoSuchPid(pid(301)))
        );
        assert_eq!(check(&proc, pid(300), pid(200), None), Ok(()));
        assert_eq!(
            descendants(&proc, pid(100)),
            vec![(pid(200), 1200), (pid(300), 1300), (pid(301), 1301)]
        );
        assert_eq!(threads(&proc, pid(300)), vec![pid(300)]);
    }
}
