//! The agent's persistent job records: `<lib_dir>/jobs/<id>/`, root's and
//! 0700, each holding
//! - `plan.json`: what the job is ([`JobPlan`]), written atomically before
//!   the shim starts, with its absolute deadline;
//! - `lock`: held (`flock`) by the job's shim for as long as it lives, so
//!   that whoever takes it knows no shim runs the job (the kernel drops it
//!   when the shim dies, however it dies);
//! - `shim.json`: the shim's pid and start time, for `cancel`;
//! - `result.json`: how the job ended ([`JobResult`]), written atomically,
//!   by the shim or by an agent that found the job dead.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    job::{identity::RunAs, plan::JobRequest},
    report::Report,
    safe_fs::{self, PrivateDir, SafeFsError},
};

/// What a job runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    Run {
        command: Vec<String>,
    },
    Attach {
        pid: crate::host::Pid,
        tree: bool,
    },
    /// A game in job `job`, whose cgroups are those of the caller's
    /// `/proc/<pid>/cgroup` (`membership`) when it asked.
    Game {
        job: String,
        game: crate::cli::game::GameArgs,
        command: Vec<String>,
        membership: String,
    },
}

impl JobKind {
    /// The command, as `status` and reports show it.
    pub fn command(&self) -> Vec<String> {
        match self {
            JobKind::Run { command } | JobKind::Game { command, .. } => command.clone(),
            JobKind::Attach { pid, .. } => vec![format!("attached pid {pid}")],
        }
    }
}

/// A job as the agent accepted it: enough for a shim to build the very plan
/// the agent checked, and for a restarted agent to serve it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobPlan {
    pub id: String,
    pub kind: JobKind,
    /// The flags, as the caller sent them (`config` and `report` cleared).
    pub request: JobRequest,
    /// The effective config the plan was checked against.
    pub config: Config,
    /// Who asked.
    pub caller_uid: u32,
    pub caller_pid: i32,
    /// The caller's environment and working directory, the command's.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Who the command runs as (`None`: root).
    pub run_as: Option<RunAs>,
    /// The training the job protects (a `protect` id), if any.
    pub training: Option<String>,
    /// The agent's node budget holds the job (its wishes come through
    /// the record's wish file) instead of the job's own budget loop.
    #[serde(default)]
    pub external_budget: bool,
    pub accepted_unix_ms: u64,
    /// The job's absolute deadline: a shim started late, or a job re-adopted,
    /// is still killed at this wall-clock time.
    pub deadline_unix_ms: u64,
    pub kill_grace_ms: u64,
}

/// How a job ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    pub status: u8,
    pub report: Option<Report>,
    /// Why there is no report.
    pub error: Option<String>,
    pub ended_unix_ms: u64,
}

/// The live shim of a job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ShimInfo {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`, so that a reused pid is not taken
    /// for the shim.
    pub start_time: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Fs(#[from] SafeFsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a job record: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub const PLAN: &str = "plan.json";
pub const RESULT: &str = "result.json";
pub const SHIM: &str = "shim.json";
pub const LOCK: &str = "lock";

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// The time left until `deadline_unix_ms` (zero once past).
pub fn until(deadline_unix_ms: u64) -> Duration {
    Duration::from_millis(deadline_unix_ms.saturating_sub(now_ms()))
}

/// `<lib_dir>/jobs`.
pub struct Store {
    jobs: PrivateDir,
}

impl Store {
    pub fn open(lib_dir: &Path) -> Result<Store, StoreError> {
        let lib = PrivateDir::open(lib_dir)?;
        Ok(Store {
            jobs: lib.subdir("jobs")?,
        })
    }

    pub fn path(&self) -> &Path {
        self.jobs.path()
    }

    /// The directory of a new job; `Ok(None)` when the id is taken.
    pub fn create(&self, id: &str) -> Result<Option<JobDir>, StoreError> {
        let path = self.jobs.path().join(id);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        Ok(Some(JobDir {
            dir: self.jobs.subdir(id)?,
        }))
    }

    pub fn open_job(&self, id: &str) -> Result<JobDir, StoreError> {
        Ok(JobDir {
            dir: self.jobs.subdir(id)?,
        })
    }

    pub fn ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .jobs
            .names()?
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect())
    }

    /// Removes a finished job's directory.
    pub fn remove(&self, id: &str) {
        let path = self.jobs.path().join(id);
        if let Err(error) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), %error, "removing a finished job's record failed");
        }
    }
}

/// One job's directory.
pub struct JobDir {
    dir: PrivateDir,
}

impl JobDir {
    /// Opens a job directory by path (the shim's argument): it must be
    /// root's own and closed to others, like every state of the agent.
    pub fn at(path: &Path) -> Result<JobDir, StoreError> {
        Ok(JobDir {
            dir: PrivateDir::open(path)?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Parse {
            path: self.path().join(name),
            source,
        })?;
        bytes.push(b'\n');
        safe_fs::write_atomic_as_dir_owner(&self.path().join(name), &bytes, 0o600)?;
        Ok(())
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.path().join(name);
        let mut file = match self.dir.open_file(name, false) {
            Ok(f) => f,
            Err(SafeFsError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut text).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StoreError::Parse { path, source })
    }

    pub fn write_plan(&self, plan: &JobPlan) -> Result<(), StoreError> {
        self.write(PLAN, plan)
    }

    pub fn plan(&self) -> Result<Option<JobPlan>, StoreError> {
        self.read(PLAN)
    }

    pub fn write_result(&self, result: &JobResult) -> Result<(), StoreError> {
        self.write(RESULT, result)
    }

    pub fn result(&self) -> Result<Option<JobResult>, StoreError> {
        self.read(RESULT)
    }

    /// The node budget's wish for the job (see [`crate::agent::budget`]).
    pub fn write_wish(&self, wish: &crate::agent::budget::QuotaWish) -> Result<(), StoreError> {
        self.write(crate::agent::budget::WISH_FILE, wish)
    }

    pub fn write_shim(&self, shim: &ShimInfo) -> Result<(), StoreError> {
        self.write(SHIM, shim)
    }

    pub fn shim(&self) -> Result<Option<ShimInfo>, StoreError> {
        self.read(SHIM)
    }

    /// The job's lock file (created when missing).
    pub fn lock_file(&self) -> Result<File, StoreError> {
        Ok(self.dir.open_file(LOCK, true)?)
    }

    /// Takes the lock without waiting: `Some(file)` holding it when no shim
    /// runs the job.
    pub fn try_lock(&self) -> Result<Option<File>, StoreError> {
        let file = self.lock_file()?;
        let locked = safe_fs::try_lock(&file).map_err(|source| StoreError::Io {
            path: self.path().join(LOCK),
            source,
        })?;
        Ok(locked.then_some(file))
    }
}

/// Blocks until nobody holds `file`'s lock (the shim is gone), then holds it.
pub fn wait_lock(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a valid fd has no memory-safety preconditions.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Field 22 (start time in clock ticks) of `/proc/<pid>/stat`.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
