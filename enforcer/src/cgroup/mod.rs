//! Cgroups: detecting the mode once (unified, hybrid, legacy) and, per mode,
//! a backend that creates, limits, freezes, kills and removes job cgroups
//! inside the subtree the agent owns.
//!
//! - [`mode`]: where each controller is mounted and where this process sits;
//! - [`subtree`]: which cgroups this agent owns and where jobs go;
//! - [`v2`] and [`v1`]: one backend per mode behind [`Backend`];
//! - [`JobCgroup`]: the enum that dispatches, the handle other code uses;
//! - [`fs`]: the guarded reads and writes every backend goes through;
//! - [`cpuset`]: CPU lists, for the CPUs a job may run on;
//! - [`membership`]: which cgroup a process is in (is a PID a job's, where
//!   can it be frozen), from `/proc/<pid>/cgroup` and the mount table.

pub mod cpuset;
pub mod fs;
pub mod membership;
mod mode;
pub mod subtree;
pub mod v1;
pub mod v2;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use mode::{CgroupMode, ControllerInfo, Layout, LayoutError};
use serde::{Deserialize, Serialize};
pub use subtree::Subtree;

use crate::units::ByteSize;

/// The leaf inside a job cgroup that holds the job's own processes, so that
/// games can be its siblings (`<job>/game-<n>`) with limits of their own.
pub const MAIN_LEAF: &str = "main";

/// Setting this variable makes the kill ignore `cgroup.kill` and use the
/// freeze / SIGKILL each task / thaw loop that kernels before 5.14 need, so
/// that the fallback is tested on every kernel.
pub const NO_CGROUP_KILL_ENV: &str = "ENFORCER_NO_CGROUP_KILL";

fn cgroup_kill_allowed() -> bool {
    std::env::var_os(NO_CGROUP_KILL_ENV).is_none()
}

/// The CFS period used for quotas: 100 ms, the kernel default.
pub const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error(
        "refusing to write {value:?} to {path}: outside the subtree this agent owns ({owned:?})"
    )]
    OutsideSubtree {
        path: PathBuf,
        value: String,
        owned: Vec<PathBuf>,
    },
    #[error("job name {name:?} is already in use ({path} exists)")]
    NameInUse { name: String, path: PathBuf },
    #[error("invalid job name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error(
        "cgroup {own} still holds other processes ({pids:?}) after this agent moved itself to {agent}: \
         its controllers cannot be delegated to jobs. Run enforcer in a cgroup of its own \
         (e.g. systemd-run --scope -p Delegate=yes) or set cgroup_root to a delegated cgroup"
    )]
    Busy {
        own: PathBuf,
        agent: PathBuf,
        pids: Vec<i32>,
    },
    #[error("controller {controller} cannot be used: {reason}")]
    Controller { controller: String, reason: String },
    #[error("not inside an enforcer job: {0}")]
    NotInJob(String),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("job cgroup {path} still has tasks {pids:?} after {rounds} kill rounds")]
    NotEmpty {
        path: PathBuf,
        pids: Vec<i32>,
        rounds: u32,
    },
}

/// The limits of one job or game. `None` leaves the kernel default.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Limits {
    pub memory: Option<ByteSize>,
    pub memory_high: Option<ByteSize>,
    /// CPU quota in CPUs.
    pub cpu: Option<f64>,
    /// Weight on the v2 scale (1–10000, default 100), ignored while idle.
    pub cpu_weight: Option<u64>,
    /// The idle scheduling class for the job.
    pub cpu_idle: bool,
    pub pids: Option<u64>,
}

/// Where one job's cgroups are, per hierarchy: what the job's lock records,
/// so that the enforcer that finds the job orphaned knows exactly what to
/// kill and remove, and whether that is inside its own subtree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLocation {
    /// The job's directory in the unified hierarchy (v2, or hybrid hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<PathBuf>,
    /// v1 controller → the job's directory in that controller's hierarchy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub controllers: BTreeMap<String, PathBuf>,
}

impl JobLocation {
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.controllers
            .values()
            .chain(self.unified.iter())
            .map(PathBuf::as_path)
    }

    /// Whether any of the job's directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs().any(Path::exists)
    }

    /// Where the hooks cgroup of job `name` at this location is: the
    /// sibling [`subtree::hooks_name`] of each directory.
    pub fn hooks(&self, name: &str) -> JobLocation {
        let sibling = |d: &PathBuf| d.with_file_name(subtree::hooks_name(name));
        JobLocation {
            unified: self.unified.as_ref().map(sibling),
            controllers: self
                .controllers
                .iter()
                .map(|(c, d)| (c.clone(), sibling(d)))
                .collect(),
        }
    }
}

/// Counters read from a job cgroup; each is `None` where this kernel has no
/// file for it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub cpu_usage: Option<Duration>,
    pub cpu_throttled: Option<Duration>,
    /// CFS periods in which the job was throttled (`nr_throttled`).
    pub cpu_throttled_periods: Option<u64>,
    pub memory_current: Option<u64>,
    /// The kernel's own high-water mark (`memory.peak`, v1
    /// `memory.max_usage_in_bytes`).
    pub memory_peak: Option<u64>,
    pub memory_limit: Option<u64>,
    pub memory_high_limit: Option<u64>,
    pub oom_kills: Option<u64>,
    /// Times the job was throttled at `memory.high` (v2 only).
    pub memory_high_events: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_peak: Option<u64>,
    pub pids_limit: Option<u64>,
    /// Forks refused at `pids.max`.
    pub pids_max_events: Option<u64>,
}

/// What a job cgroup can do: one implementation per cgroup mode.
pub trait Backend: Sized {
    /// The job's directory in its primary hierarchy (v2: the unified one).
    fn path(&self) -> &Path;
    /// The `cgroup.procs` files a process writes itself into to join the job
    /// (one per hierarchy).
    fn join_files(&self) -> Vec<PathBuf>;
    fn set_memory_max(&self, limit: Option<ByteSize>) -> Result<(), CgroupError>;
    fn set_memory_high(&self, limit: Option<ByteSize>) -> Result<(), CgroupError>;
    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError>;
    fn set_cpu_weight(&self, weight: u64) -> Result<(), CgroupError>;
    fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError>;
    fn set_pids_max(&self, max: Option<u64>) -> Result<(), CgroupError>;
    /// Confines the job (and its games) to `cpus` through the cpuset
    /// controller; `None` gives back every CPU of the agent's subtree. An
    /// error names the controller when the host has no cpuset for jobs.
    fn set_cpus(&self, cpus: Option<&cpuset::CpuList>) -> Result<(), CgroupError>;
    /// Moves a process (all its threads) into the job.
    fn add_process(&self, pid: i32) -> Result<(), CgroupError>;
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError>;
    /// One kill round: `cgroup.kill`, or freeze / SIGKILL each task / thaw.
    fn kill_round(&self) -> Result<(), CgroupError>;
    /// Every process in the job and its descendant cgroups.
    fn pids(&self) -> Vec<i32>;
    fn stats(&self) -> Stats;
    fn cpu_usage(&self) -> Duration;
    fn v2_cgroup_id(&self) -> Option<u64>;
    /// A child cgroup (a game) whose processes live in it directly.
    fn create_child(&self, name: &str) -> Result<Self, CgroupError>;
    /// Removes the job's directories (they must be empty of tasks).
    fn remove(&self) -> Result<(), CgroupError>;
}

/// A job (or game) cgroup: the handle the supervisor, the monitors and the
/// budget controller use.
#[derive(Debug)]
pub enum JobCgroup {
    V2(v2::V2Job),
    V1(v1::V1Job),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            JobCgroup::V2($b) => $e,
            JobCgroup::V1($b) => $e,
        }
    };
}

impl JobCgroup {
    /// A handle on the job at `location` that reads its counters and can
    /// write nothing (no directory is its own): for an observer, such as
    /// the agent answering `status`, of a job another process owns.
    pub fn observe(location: &JobLocation) -> Option<JobCgroup> {
        let fs = fs::CgFs::new(Vec::new());
        if location.controllers.is_empty() {
            let dir = location.unified.clone()?;
            let leaf = dir.join(MAIN_LEAF);
            Some(JobCgroup::V2(v2::V2Job::open(fs, dir, leaf)))
        } else {
            Some(JobCgroup::V1(v1::V1Job::open(
                fs,
                location.controllers.clone(),
                location.unified.clone(),
                Some(MAIN_LEAF),
            )))
        }
    }

    pub fn path(&self) -> &Path {
        dispatch!(self, b => b.path())
    }
    pub fn mode_name(&self) -> &'static str {
        match self {
            JobCgroup::V2(_) => "unified",
            JobCgroup::V1(b) => b.mode_name(),
        }
    }
    pub fn join_files(&self) -> Vec<PathBuf> {
        dispatch!(self, b => b.join_files())
    }
    /// Writes every limit; the job must not have started yet.
    pub fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        dispatch!(self, b => {
            b.set_memory_max(l.memory)?;
            b.set_memory_high(l.memory_high)?;
            b.set_cpu_quota(l.cpu)?;
            if let Some(w) = l.cpu_weight {
                b.set_cpu_weight(w)?;
            }
            if l.cpu_idle {
                b.set_cpu_idle(true)?;
            }
            b.set_pids_max(l.pids)
        })
    }
    /// `None` = unlimited.
    pub fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError> {
        dispatch!(self, b => b.set_cpu_quota(cores))
    }
    /// `cpu.idle` where the kernel has it; else the lowest weight / shares.
    pub fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError> {
        dispatch!(self, b => b.set_cpu_idle(idle))
    }
    /// Weight on the v2 scale (1–10000); v1 shares are derived.
    pub fn set_cpu_weight(&self, weight: u64) -> Result<(), CgroupError> {
        dispatch!(self, b => b.set_cpu_weight(weight))
    }
    /// Hard memory limit, swap off for the job; `None` = unlimited.
    pub fn set_memory_max(&self, limit: Option<ByteSize>) -> Result<(), CgroupError> {
        dispatch!(self, b => b.set_memory_max(limit))
    }
    pub fn set_pids_max(&self, max: Option<u64>) -> Result<(), CgroupError> {
        dispatch!(self, b => b.set_pids_max(max))
    }
    /// The CPUs the job may run on (cpuset); `None` = all of the subtree's.
    pub fn set_cpus(&self, cpus: Option<&cpuset::CpuList>) -> Result<(), CgroupError> {
        dispatch!(self, b => b.set_cpus(cpus))
    }
    pub fn set_memory_high(&self, limit: Option<ByteSize>) -> Result<(), CgroupError> {
        dispatch!(self, b => b.set_memory_high(limit))
    }
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        dispatch!(self, b => b.freeze(frozen))
    }
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        dispatch!(self, b => b.add_process(pid))
    }
    /// Cumulative CPU time of every task the job ever had.
    pub fn cpu_usage(&self) -> Duration {
        dispatch!(self, b => b.cpu_usage())
    }
    /// The inode number of the job's directory in the unified hierarchy:
    /// what `bpf_get_current_cgroup_id` returns for its tasks.
    pub fn v2_cgroup_id(&self) -> Option<u64> {
        dispatch!(self, b => b.v2_cgroup_id())
    }
    pub fn pids(&self) -> Vec<i32> {
        dispatch!(self, b => b.pids())
    }
    pub fn stats(&self) -> Stats {
        dispatch!(self, b => b.stats())
    }
    pub fn create_child(&self, name: &str) -> Result<JobCgroup, CgroupError> {
        validate_name(name)?;
        Ok(match self {
            JobCgroup::V2(b) => JobCgroup::V2(b.create_child(name)?),
            JobCgroup::V1(b) => JobCgroup::V1(b.create_child(name)?),
        })
    }

    /// Kills every task in the job and its descendants, including those
    /// that left the process tree (setsid, double fork), and returns once
    /// the cgroup is empty.
    pub fn kill(&self) -> Result<(), CgroupError> {
        // A new round only for a task not yet signalled (forked meanwhile)
        // or when the signalled ones are slow to go: re-freezing dying
        // tasks every few hundred µs only slows their exit.
        const RESIGNAL_AFTER: Duration = Duration::from_millis(20);
        let start = Instant::now();
        let mut rounds = 0;
        let mut signalled = std::collections::BTreeSet::new();
        let mut last_round: Option<Instant> = None;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            let fresh = pids.iter().any(|p| !signalled.contains(p));
            let stale = last_round.is_some_and(|t| t.elapsed() >= RESIGNAL_AFTER);
            if (fresh || stale) && rounds < 1000 {
                dispatch!(self, b => b.kill_round())?;
                signalled.extend(pids);
                last_round = Some(Instant::now());
                rounds += 1;
            }
            // Tasks leave the cgroup as they finish exiting: poll briefly.
            std::thread::sleep(Duration::from_micros(250));
            if start.elapsed() > Duration::from_secs(5) {
                return Err(CgroupError::NotEmpty {
                    path: self.path().to_owned(),
                    pids: self.pids(),
                    rounds,
                });
            }
        }
    }

    /// Removes the cgroup directories (after [`JobCgroup::kill`]).
    pub fn remove(&self) -> Result<(), CgroupError> {
        dispatch!(self, b => b.remove())
    }
}

/// Job names are one path component of a cgroup directory.
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    let bad = |why| {
        Err(CgroupError::BadName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 200 {
        return bad("must be 1 to 200 characters");
    }
    if name == "." || name == ".." || name == MAIN_LEAF {
        return bad("reserved");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'))
    {
        return bad("use letters, digits and - _ . @ :");
    }
    if name.starts_with("cgroup.") || name.starts_with('.') {
        return bad("must not start with a dot or 'cgroup.'");
    }
    if name.ends_with(subtree::HOOKS_SUFFIX) {
        return bad("must not end with '.hooks' (the cgroup of a job's hooks)");
    }
    Ok(())
}

/// The inode number of a directory (a cgroup v2 id).
fn inode(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_single_safe_components() {
        assert!(validate_name("eval-42_a.b").is_ok());
        for bad in ["", "..", "a/b", "main", "cgroup.procs", ".hidden", "sp ace"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
