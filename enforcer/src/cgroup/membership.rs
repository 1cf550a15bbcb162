//! Which cgroup a process is in, read from `/proc/<pid>/cgroup` and this
//! process's mount table: whether a PID is a job's (its cgroup or one below
//! it, in the hierarchy the job is tracked by, which also rejects a PID reused
//! by an unrelated process), where a process can be frozen, and which
//! hierarchy and path a cgroup directory stands for. The GPU guard attributes
//! NVML's processes with it; the idle-class keeper checks a job's threads.

use std::path::{Path, PathBuf};

pub use crate::host::Hierarchy;
use crate::host::{MountTable, Pid, ProcCgroup, ProcError, ProcFs};

/// The job's cgroup in one hierarchy, as a path relative to that
/// hierarchy's root (what `/proc/<pid>/cgroup` prints, e.g. `/eval/job-1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMembership {
    pub hierarchy: Hierarchy,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    Read(#[from] ProcError),
    #[error(
        "process {pid} is in no freezer hierarchy (neither a v1 freezer nor cgroup2 is mounted)"
    )]
    NoFreezer { pid: u32 },
    #[error("{} is not in a mounted cgroup hierarchy", dir.display())]
    NotACgroup { dir: PathBuf },
}

/// Reads process cgroup membership from a procfs (the real `/proc`, or a
/// fake tree in tests).
#[derive(Debug, Clone, Default)]
pub struct ProcCgroups {
    proc: ProcFs,
}

impl ProcCgroups {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        ProcCgroups {
            proc: ProcFs::at(proc_root),
        }
    }

    /// `None` for a number NVML should never report (0, or beyond `i32`).
    fn membership(&self, pid: u32) -> Option<Result<ProcCgroup, ProcError>> {
        Some(self.proc.cgroup(Pid::try_from(pid).ok()?))
    }

    /// Whether `pid` is in `job`'s cgroup or below it. A PID that no longer
    /// exists is not the job's (it exited between NVML's answer and now).
    pub fn belongs(&self, pid: u32, job: &CgroupMembership) -> Result<bool, MembershipError> {
        let membership = match self.membership(pid) {
            None => return Ok(false),
            Some(Err(e)) if e.is_gone() => return Ok(false),
            Some(m) => m?,
        };
        Ok(membership.is_within(&job.hierarchy, &job.path))
    }
}

impl ProcCgroups {
    /// The process's path in `hierarchy`, `None` when it has exited or is
    /// not in that hierarchy.
    pub fn cgroup_of(&self, pid: u32, hierarchy: &Hierarchy) -> Option<String> {
        let membership = self.membership(pid)?.ok()?;
        membership.path_in(hierarchy).map(str::to_owned)
    }

    /// Whether `pid` is one of `roots` or a descendant of one (by the parent
    /// chain in `/proc/<pid>/stat`): for selecting a process tree by PID.
    pub fn descends_from(&self, pid: u32, roots: &[u32]) -> bool {
        let mut cur = pid;
        // Bounded: a parent chain is never deeper than the PID space, and a
        // racing reparent must not loop forever.
        for _ in 0..4096 {
            if roots.contains(&cur) {
                return true;
            }
            match self.parent_of(cur) {
                Some(p) if p != cur => cur = p,
                _ => return false,
            }
        }
        false
    }

    fn parent_of(&self, pid: u32) -> Option<u32> {
        let stat = self.proc.stat(Pid::try_from(pid).ok()?).ok()?;
        stat.ppid.map(u32::from)
    }
}

/// Where a process can be frozen: its cgroup in the v1 freezer hierarchy if
/// one is mounted (hybrid hosts), else its v2 cgroup. The same cgroup is
/// what its GPU processes are attributed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezerCgroup {
    pub membership: CgroupMembership,
    /// The cgroup's directory (holding `freezer.state` or `cgroup.freeze`).
    pub dir: PathBuf,
}

impl ProcCgroups {
    /// The freezer cgroup of `pid`, from `/proc/<pid>/cgroup` and this
    /// process's mount table.
    pub fn freezer_of(&self, pid: u32) -> Result<FreezerCgroup, MembershipError> {
        let cgroup = self
            .membership(pid)
            .ok_or(MembershipError::NoFreezer { pid })??;
        let mounts = self.proc.mountinfo()?;
        resolve_freezer(&cgroup, &mounts).ok_or(MembershipError::NoFreezer { pid })
    }
}

impl ProcCgroups {
    /// The membership a cgroup directory stands for (its hierarchy, and its
    /// path as `/proc/<pid>/cgroup` prints it), from this process's mount
    /// table: for when the job's process is already gone.
    pub fn membership_of_dir(&self, dir: &Path) -> Result<CgroupMembership, MembershipError> {
        let (hierarchy, path) = self
            .proc
            .mountinfo()?
            .membership_of_dir(dir)
            .ok_or_else(|| MembershipError::NotACgroup {
                dir: dir.to_owned(),
            })?;
        Ok(CgroupMembership { hierarchy, path })
    }
}

/// Picks the freezer hierarchy (v1 `freezer`, else cgroup2) and maps the
/// process's path in it to a directory through the mount's root.
fn resolve_freezer(cgroup: &ProcCgroup, mounts: &MountTable) -> Option<FreezerCgroup> {
    [Hierarchy::V1("freezer".to_owned()), Hierarchy::Unified]
        .into_iter()
        .find_map(|h| {
            let path = cgroup.path_in(&h)?;
            let dir = mounts.dir_of(&h, path)?;
            Some(FreezerCgroup {
                membership: CgroupMembership {
                    hierarchy: h,
                    path: path.to_owned(),
                },
                dir,
            })
        })
}

/// Fake `/proc/<pid>/cgroup` files, for tests here and in the GPU guard.
#[cfg(test)]
pub(crate) fn fake_proc(dir: &Path, entries: &[(u32, &str)]) {
    for (pid, text) in entries {
        let d = dir.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup"), text).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_IN_JOB: &str = "9:name=systemd:/\n6:freezer:/agent/eval/job-1\n\
        4:memory:/agent/eval/job-1\n1:cpu,cpuacct:/agent/eval/job-1/game-2\n0::/agent/eval/job-1\n";
    const HYBRID_OTHER: &str = "6:freezer:/agent/eval/job-10\n0::/agent/eval/job-10\n";
    const V2_GAME: &str = "0::/eval/job-1/game-3\n";

    fn job(h: Hierarchy, path: &str) -> CgroupMembership {
        CgroupMembership {
            hierarchy: h,
            path: path.to_owned(),
        }
    }

    #[test]
    fn pids_are_attributed_by_cgroup_subtree_not_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(
            dir.path(),
            &[(100, HYBRID_IN_JOB), (200, HYBRID_OTHER), (300, V2_GAME)],
        );
        let p = ProcCgroups::new(dir.path());
        let freezer = job(Hierarchy::V1("freezer".into()), "/agent/eval/job-1");
        assert!(p.belongs(100, &freezer).unwrap());
        // job-10 shares the prefix "job-1" but is another job.
        assert!(!p.belongs(200, &freezer).unwrap());
        let cpu = job(Hierarchy::V1("cpuacct".into()), "/agent/eval/job-1");
        assert!(
            p.belongs(100, &cpu).unwrap(),
            "a game below the job is the job's"
        );
        let v2 = job(Hierarchy::Unified, "/eval/job-1");
        assert!(p.belongs(300, &v2).unwrap());
        assert!(!p.belongs(100, &v2).unwrap());
        // Exited between NVML's answer and the lookup.
        assert!(!p.belongs(999, &v2).unwrap());
        assert_eq!(
            p.cgroup_of(300, &Hierarchy::Unified).as_deref(),
            Some("/eval/job-1/game-3")
        );
    }

    #[test]
    fn freezer_is_the_v1_freezer_on_hybrid_hosts_and_cgroup2_otherwise() {
        let hybrid_mounts = "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
            40 25 0:35 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer\n\
            41 25 0:36 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let hybrid_mounts = MountTable::parse(hybrid_mounts);
        let f = resolve_freezer(&ProcCgroup::parse(HYBRID_IN_JOB), &hybrid_mounts).unwrap();
        assert_eq!(
            f.membership,
            job(Hierarchy::V1("freezer".into()), "/agent/eval/job-1")
        );
        assert_eq!(f.dir, Path::new("/sys/fs/cgroup/freezer/agent/eval/job-1"));
        // Pure v2, inside a cgroup namespace whose root is /ns: the mount's
        // root is stripped.
        let v2_mounts = MountTable::parse("30 1 0:26 /ns /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let f = resolve_freezer(&ProcCgroup::parse("0::/ns/eval/job-1\n"), &v2_mounts).unwrap();
        assert_eq!(f.membership.hierarchy, Hierarchy::Unified);
        assert_eq!(f.dir, Path::new("/sys/fs/cgroup/eval/job-1"));
        assert_eq!(
            resolve_freezer(&ProcCgroup::parse("0::/x\n"), &MountTable::default()),
            None
        );
        let m = hybrid_mounts
            .membership_of_dir(Path::new("/sys/fs/cgroup/cpu,cpuacct/agent/eval/job-1"))
            .unwrap();
        assert_eq!(m, (Hierarchy::V1("cpu".into()), "/agent/eval/job-1".into()));
        let m = hybrid_mounts
            .membership_of_dir(Path::new("/sys/fs/cgroup/unified/eval/j"))
            .unwrap();
        assert_eq!(m, (Hierarchy::Unified, "/eval/j".into()));
    }

    /// The kernel writes a space in a mount point as `\040`; a job's
    /// cgroup under such a mount is still found, by process and by
    /// directory.
    #[test]
    fn freezer_and_membership_resolve_mount_points_written_with_escapes() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path(), &[(100, "0::/eval/job-1\n")]);
        std::fs::create_dir_all(dir.path().join("self")).unwrap();
        std::fs::write(
            dir.path().join("self/mountinfo"),
            "30 1 0:26 / /run/cg\\040v2 rw - cgroup2 cgroup2 rw\n",
        )
        .unwrap();
        let p = ProcCgroups::new(dir.path());
        let f = p.freezer_of(100).unwrap();
        assert_eq!(f.dir, Path::new("/run/cg v2/eval/job-1"));
        let m = p
            .membership_of_dir(Path::new("/run/cg v2/eval/job-1"))
            .unwrap();
        assert_eq!(m, job(Hierarchy::Unified, "/eval/job-1"));
    }

    #[test]
    fn descendants_are_found_through_the_parent_chain_despite_odd_comm() {
        let dir = tempfile::tempdir().unwrap();
        for (pid, ppid) in [(10, 1), (11, 10), (12, 11), (20, 1)] {
            crate::host::fixtures::fake_process(dir.path(), pid, "py thon) (x", 'R', ppid, 0, 1, 0);
        }
        let p = ProcCgroups::new(dir.path());
        assert!(p.descends_from(12, &[10]));
        assert!(p.descends_from(10, &[10]));
        assert!(!p.descends_from(20, &[10]));
        assert!(!p.descends_from(99, &[10]));
    }
}
