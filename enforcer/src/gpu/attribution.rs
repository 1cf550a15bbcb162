//! Which GPU processes belong to a job, and the job's per-device usage.
//!
//! NVML names processes by PID in the initial (host) PID namespace. A PID is
//! the job's when `/proc/<pid>/cgroup` places it in the job's cgroup or a
//! cgroup below it (games), in the hierarchy the job is tracked by: this also
//! rejects a PID that was reused by an unrelated process. If the agent runs
//! in another PID namespace (a container), the same numbers name other
//! processes or none; [`super::pid_namespace_check`] detects that and the
//! guard then reports per-job GPU figures as unavailable instead of guessing.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::source::{DeviceSample, ProcessSample};
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
pub enum AttributionError {
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
    pub fn belongs(&self, pid: u32, job: &CgroupMembership) -> Result<bool, AttributionError> {
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
    pub fn freezer_of(&self, pid: u32) -> Result<FreezerCgroup, AttributionError> {
        let cgroup = self
            .membership(pid)
            .ok_or(AttributionError::NoFreezer { pid })??;
        let mounts = self.proc.mountinfo()?;
        resolve_freezer(&cgroup, &mounts).ok_or(AttributionError::NoFreezer { pid })
    }
}

impl ProcCgroups {
    /// The membership a cgroup directory stands for (its hierarchy, and its
    /// path as `/proc/<pid>/cgroup` prints it), from this process's mount
    /// table: for when the job's process is already gone.
    pub fn membership_of_dir(&self, dir: &Path) -> Result<CgroupMembership, AttributionError> {
        let (hierarchy, path) = self
            .proc
            .mountinfo()?
            .membership_of_dir(dir)
            .ok_or_else(|| AttributionError::NotACgroup {
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

/// The job's use of one device during one control tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TickDevice {
    pub index: u32,
    pub pids: Vec<u32>,
    pub memory_used_bytes: u64,
    /// Sum over the job's processes of each one's mean SM utilisation over
    /// the tick's new samples (processes share the SMs, so their shares add
    /// up); `None` when NVML took no new sample of any of them.
    pub sm_util_pct: Option<f64>,
}

/// Groups `processes` by device, keeping those `is_job` accepts.
pub fn job_tick(
    processes: &[ProcessSample],
    mut is_job: impl FnMut(u32) -> bool,
) -> BTreeMap<u32, TickDevice> {
    let mut out: BTreeMap<u32, TickDevice> = BTreeMap::new();
    for p in processes.iter().filter(|p| is_job(p.pid)) {
        let d = out.entry(p.device).or_insert_with(|| TickDevice {
            index: p.device,
            pids: Vec::new(),
            memory_used_bytes: 0,
            sm_util_pct: None,
        });
        if !d.pids.contains(&p.pid) {
            d.pids.push(p.pid);
        }
        d.memory_used_bytes += p.memory_used_bytes.unwrap_or(0);
        if !p.sm_samples.is_empty() {
            let sum: f64 = p.sm_samples.iter().map(|&(_, u)| f64::from(u)).sum();
            #[expect(clippy::cast_precision_loss, reason = "a handful of samples per tick")]
            let mean = sum / p.sm_samples.len() as f64;
            d.sm_util_pct = Some((d.sm_util_pct.unwrap_or(0.0) + mean).min(100.0));
        }
    }
    out
}

/// The job's use of one device over its life: the report's `gpu` entries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobDeviceUsage {
    pub index: u32,
    pub name: String,
    /// The peak, over the job's life, of the GPU memory its processes held.
    pub memory_used_bytes: u64,
    /// Mean over the ticks that had samples of the job on this device.
    pub sm_util_pct_mean: Option<f64>,
    pub sm_util_pct_max: Option<f64>,
}

/// Accumulates [`TickDevice`]s into [`JobDeviceUsage`]s.
#[derive(Debug, Clone, Default)]
pub struct JobUsage {
    devices: BTreeMap<u32, Acc>,
}

#[derive(Debug, Clone, Default)]
struct Acc {
    name: String,
    memory_peak: u64,
    util_sum: f64,
    util_ticks: u32,
    util_max: Option<f64>,
}

impl JobUsage {
    pub fn add(&mut self, tick: &BTreeMap<u32, TickDevice>, devices: &[DeviceSample]) {
        for (index, t) in tick {
            let acc = self.devices.entry(*index).or_default();
            if let Some(d) = devices.iter().find(|d| d.index == *index) {
                acc.name.clone_from(&d.name);
            }
            acc.memory_peak = acc.memory_peak.max(t.memory_used_bytes);
            if let Some(u) = t.sm_util_pct {
                acc.util_sum += u;
                acc.util_ticks += 1;
                acc.util_max = Some(acc.util_max.map_or(u, |m: f64| m.max(u)));
            }
        }
    }

    /// One entry per device the job used, by index.
    pub fn summary(&self) -> Vec<JobDeviceUsage> {
        self.devices
            .iter()
            .map(|(index, a)| JobDeviceUsage {
                index: *index,
                name: a.name.clone(),
                memory_used_bytes: a.memory_peak,
                sm_util_pct_mean: (a.util_ticks > 0).then(|| a.util_sum / f64::from(a.util_ticks)),
                sm_util_pct_max: a.util_max,
            })
            .collect()
    }
}

/// Fake `/proc/<pid>/cgroup` files, for tests here and in the guard.
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

    fn proc(device: u32, pid: u32, mem: u64, samples: &[u32]) -> ProcessSample {
        ProcessSample {
            device,
            pid,
            memory_used_bytes: Some(mem),
            sm_samples: samples
                .iter()
                .enumerate()
                .map(|(i, &u)| (i as u64 + 1, u))
                .collect(),
        }
    }

    #[test]
    fn job_usage_sums_processes_per_device_and_keeps_peak_mean_and_max() {
        let dev = |index: u32| DeviceSample {
            index,
            name: format!("GPU {index}"),
            memory_total_bytes: 80 << 30,
            memory_used_bytes: 0,
            gpu_util_pct: 0,
        };
        let devices = [dev(0), dev(1)];
        let mut usage = JobUsage::default();
        let job_pids = [10, 11];
        let tick1 = [
            proc(0, 10, 1 << 30, &[40, 60]),
            proc(0, 11, 2 << 30, &[20]),
            proc(0, 99, 8 << 30, &[90]),
            proc(1, 10, 3 << 30, &[]),
        ];
        let t = job_tick(&tick1, |pid| job_pids.contains(&pid));
        assert_eq!(t[&0].memory_used_bytes, 3 << 30);
        assert_eq!(t[&0].sm_util_pct, Some(70.0));
        assert_eq!(t[&1].sm_util_pct, None);
        usage.add(&t, &devices);
        let tick2 = [proc(0, 10, 1 << 30, &[30])];
        usage.add(&job_tick(&tick2, |pid| job_pids.contains(&pid)), &devices);
        let s = usage.summary();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "GPU 0");
        assert_eq!(s[0].memory_used_bytes, 3 << 30);
        assert_eq!(s[0].sm_util_pct_mean, Some(50.0));
        assert_eq!(s[0].sm_util_pct_max, Some(70.0));
        assert_eq!(s[1].memory_used_bytes, 3 << 30);
        assert_eq!(s[1].sm_util_pct_mean, None);
    }
}
