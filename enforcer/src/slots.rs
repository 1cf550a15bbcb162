//! The enforcer's state directory (`state_dir`) and what coordinates
//! separate `enforcer` processes through it on one node.
//!
//! The directory is root's own: absolute, owned by the effective user, mode
//! 0700, every file 0600 and opened relative to the directory's descriptor
//! without following links ([`PrivateDir`]), so no other user can open, lock
//! or replace anything in it.
//!
//! `max_concurrent_jobs` is a FIFO queue and a set of slots under `slots/`,
//! held with `flock(2)`. A lock dies with its process, so a crashed holder
//! or waiter never leaks a slot or blocks the queue. No lock is ever waited
//! for inside a system call: every `flock` is non-blocking and the waiting
//! is an async loop, which a signal or `--no-wait` can end.
//!
//! - `lock`: a short mutex around queue changes;
//! - `counter`: the next ticket number;
//! - `queue/<ticket>`: one file per waiter, flocked by it while it waits;
//!   a file whose lock can be taken belongs to a dead waiter and is removed;
//! - `slot-<i>`: flocked by the job that holds slot `i`.
//!
//! `jobs/<name>.lock` is flocked by the enforcer that owns job `<name>` for
//! as long as the job lives, and records where the job's cgroups are
//! ([`JobRecord`]). A lock that is free belongs to an enforcer that was
//! killed (SIGKILL, OOM) before it could clean up: the next enforcer whose
//! subtree holds the recorded cgroups kills and removes them, and only then
//! the lock.

use std::{
    fs::File,
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::JobLocation,
    safe_fs::{self, PrivateDir, SafeFsError},
};

/// How long `--no-wait` waits for the queue mutex: another enforcer holds
/// it for microseconds, so a mutex held this long is stuck, and failing
/// fast is what `--no-wait` promises.
pub const NO_WAIT_MUTEX_BOUND: Duration = Duration::from_secs(1);
/// How often a held mutex is tried again.
const MUTEX_POLL: Duration = Duration::from_millis(10);
/// How often a queued job looks for a free slot.
const QUEUE_POLL: Duration = Duration::from_millis(50);
/// A temporary lock file unlocked for this long was left by a dead enforcer.
const STALE_TEMP: Duration = Duration::from_secs(60);
/// A job record larger than this is not one this enforcer wrote.
const RECORD_CAP: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The configured state directory cannot be trusted or used.
    #[error("config key state_dir: {0}")]
    StateDir(#[source] SafeFsError),
    /// The configured `state_dir` is not an absolute path.
    #[error("{0}")]
    StateDirPath(String),
    #[error(transparent)]
    Fs(#[from] SafeFsError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all {max} job slots are taken and --no-wait was given")]
    Busy { max: u32 },
    #[error(
        "the job queue's mutex {path} has been held by another process for {waited:?} and --no-wait was given"
    )]
    MutexHeld { path: PathBuf, waited: Duration },
    #[error("job name {name:?} is already in use by {by}")]
    NameInUse { name: String, by: &'static str },
}

impl SlotError {
    /// A bad `state_dir` or a job name in use: the caller's to fix (exit 2),
    /// not a failure of the enforcer.
    pub fn is_usage(&self) -> bool {
        match self {
            SlotError::StateDir(e) => !matches!(e, SafeFsError::Io { .. }),
            SlotError::StateDirPath(_) | SlotError::NameInUse { .. } => true,
            _ => false,
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SlotError + 'a {
    move |source| SlotError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The shape a `state_dir` value must have: a non-empty absolute path.
/// Checked before anything is created; the directory itself (owner, mode,
/// no link) is checked when it is opened.
pub fn check_state_dir_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() || !path.is_absolute() {
        return Err(format!(
            "config key state_dir: {path:?} is not allowed: it must be an absolute path (e.g. \"/run/enforcer/state\")"
        ));
    }
    Ok(())
}

/// The opened state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PrivateDir,
}

impl StateDir {
    /// Opens (creating it 0700 if missing) the state directory at `path`;
    /// one owned by another user or writable by group or others is refused
    /// (a [usage error](SlotError::is_usage)), one an older enforcer left
    /// 0755 is closed to 0700.
    pub fn open(path: &Path) -> Result<Self, SlotError> {
        check_state_dir_path(path).map_err(SlotError::StateDirPath)?;
        let dir = PrivateDir::open(path).map_err(SlotError::StateDir)?;
        Ok(StateDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn sub(&self, name: &str) -> Result<PrivateDir, SlotError> {
        self.dir.subdir(name).map_err(SlotError::StateDir)
    }

    /// What the lock of job `name` records (where its cgroups are), for an
    /// observer that does not own the job; `None` when no lock of that
    /// name is there. The lock is not taken.
    pub fn job_record(&self, name: &str) -> Result<Option<JobRecord>, SlotError> {
        let jobs = self.sub("jobs")?;
        let file_name = lock_file_name(name);
        let Ok(file) = jobs.open_file(&file_name, false) else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        (&file)
            .take(RECORD_CAP)
            .read_to_end(&mut bytes)
            .map_err(io("reading", &jobs.path().join(&file_name)))?;
        Ok(serde_json::from_slice::<JobRecord>(&bytes)
            .ok()
            .filter(|r| r.job == name))
    }
}

/// A held slot; dropping it (or the process dying) frees it.
#[derive(Debug)]
pub struct Slot {
    _file: File,
    pub index: u32,
}

/// The queue mutex, held; dropping it releases it. Never held across an
/// `.await`.
struct QueueMutex<'f>(&'f File);

impl Drop for QueueMutex<'_> {
    fn drop(&mut self) {
        safe_fs::unlock(self.0);
    }
}

/// Takes the queue mutex without ever blocking the thread: dropping the
/// future abandons the wait. With `bound`, gives up after that long.
async fn lock_mutex<'f>(
    lock: &'f File,
    path: &Path,
    bound: Option<Duration>,
) -> Result<QueueMutex<'f>, SlotError> {
    let start = Instant::now();
    let mut warned = false;
    loop {
        if safe_fs::try_lock(lock).map_err(io("locking", path))? {
            return Ok(QueueMutex(lock));
        }
        let waited = start.elapsed();
        if let Some(bound) = bound
            && waited >= bound
        {
            return Err(SlotError::MutexHeld {
                path: path.to_owned(),
                waited: bound,
            });
        }
        if !warned && waited >= NO_WAIT_MUTEX_BOUND {
            tracing::warn!(path = %path.display(), "the job queue's mutex is held for long by another process; still waiting");
            warned = true;
        }
        tokio::time::sleep(MUTEX_POLL).await;
    }
}

/// This waiter's queue file, removed when the wait ends (or is abandoned).
struct Ticket<'d> {
    queue: &'d PrivateDir,
    name: String,
    _file: File,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let _ = self.queue.remove_file(&self.name);
    }
}

/// Waits in FIFO order for one of `max` slots (`no_wait`: fails at once if
/// none is free or others are queued, and after [`NO_WAIT_MUTEX_BOUND`] if
/// the queue's mutex stays held). `on_wait` is called with (position,
/// queue length) whenever the position changes. Dropping the future leaves
/// the queue.
pub async fn acquire(
    state: &StateDir,
    max: u32,
    no_wait: bool,
    mut on_wait: impl FnMut(usize, usize),
) -> Result<Slot, SlotError> {
    let slots = state.sub("slots")?;
    let queue = slots.subdir("queue")?;
    let lock_path = slots.path().join("lock");
    let lock = slots.open_file("lock", true)?;
    let bound = no_wait.then_some(NO_WAIT_MUTEX_BOUND);

    // Take a ticket and queue up, under the mutex so that pruning never
    // sees a ticket file before its owner has locked it.
    let ticket = {
        let _mutex = lock_mutex(&lock, &lock_path, bound).await?;
        let number = next_ticket(&slots, &queue)?;
        let name = format!("{number:020}");
        let file = queue.open_file(&name, true)?;
        let path = queue.path().join(&name);
        if !safe_fs::try_lock(&file).map_err(io("locking", &path))? {
            return Err(io("locking", &path)(std::io::Error::from_raw_os_error(
                libc::EWOULDBLOCK,
            )));
        }
        Ticket {
            queue: &queue,
            name,
            _file: file,
        }
    };
    wait_turn(
        &slots,
        &lock,
        &lock_path,
        &ticket,
        max,
        no_wait,
        &mut on_wait,
    )
    .await
}

/// Reads and advances `counter`; never below a ticket still queued, so a
/// lost or garbled counter cannot put a newcomer ahead of those waiting.
fn next_ticket(slots: &PrivateDir, queue: &PrivateDir) -> Result<u64, SlotError> {
    let path = slots.path().join("counter");
    let mut counter = slots.open_file("counter", true)?;
    let mut text = String::new();
    (&counter)
        .take(64)
        .read_to_string(&mut text)
        .map_err(io("reading", &path))?;
    let queued = queue
        .names()?
        .iter()
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .map_or(0, |n| n + 1);
    let ticket = text.trim().parse::<u64>().unwrap_or(0).max(queued);
    counter.set_len(0).map_err(io("writing", &path))?;
    counter.rewind().map_err(io("writing", &path))?;
    write!(counter, "{}", ticket + 1).map_err(io("writing", &path))?;
    Ok(ticket)
}

async fn wait_turn(
    slots: &PrivateDir,
    lock: &File,
    lock_path: &Path,
    ticket: &Ticket<'_>,
    max: u32,
    no_wait: bool,
    on_wait: &mut impl FnMut(usize, usize),
) -> Result<Slot, SlotError> {
    let bound = no_wait.then_some(NO_WAIT_MUTEX_BOUND);
    let mut last_pos = usize::MAX;
    loop {
        let (got, pos, len) = {
            let _mutex = lock_mutex(lock, lock_path, bound).await?;
            let live = live_tickets(ticket.queue)?;
            let pos = live.iter().position(|n| *n == ticket.name).unwrap_or(0);
            let mut got = None;
            if pos == 0 {
                for i in 0..max {
                    let name = format!("slot-{i}");
                    let f = slots.open_file(&name, true)?;
                    if safe_fs::try_lock(&f).map_err(io("locking", &slots.path().join(&name)))? {
                        got = Some(Slot { _file: f, index: i });
                        break;
                    }
                }
            }
            (got, pos, live.len())
        };
        if let Some(s) = got {
            return Ok(s);
        }
        if no_wait {
            return Err(SlotError::Busy { max });
        }
        if pos != last_pos {
            on_wait(pos, len);
            last_pos = pos;
        }
        tokio::time::sleep(QUEUE_POLL).await;
    }
}

/// Names of the queue files in ticket order, removing those of dead waiters
/// (their lock is free) and anything that is not a ticket. Called with the
/// mutex held.
fn live_tickets(queue: &PrivateDir) -> Result<Vec<String>, SlotError> {
    let mut live = Vec::new();
    for name in queue.names()? {
        let alive = match queue.open_file(&name, false) {
            // Our own ticket is locked through another open file, so a lock
            // taken here is never ours: its owner is gone.
            Ok(f) => !safe_fs::try_lock(&f).map_err(io("locking", &queue.path().join(&name)))?,
            Err(_) => false,
        };
        if alive {
            live.push(name);
        } else {
            queue.remove_file(&name)?;
        }
    }
    Ok(live)
}

/// What a job lock says: whose job, and where its cgroups are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job: String,
    /// The enforcer that ran the job (for people reading the file).
    pub enforcer_pid: u32,
    pub cgroups: JobLocation,
}

/// The lock that says "an enforcer owns job `name`"; dropping it removes
/// the lock file.
#[derive(Debug)]
pub struct JobLock {
    jobs: PrivateDir,
    file_name: String,
    file: File,
    /// Release the lock but leave the file (an orphan not cleaned up).
    keep_file: bool,
}

impl Drop for JobLock {
    fn drop(&mut self) {
        // Unlinked while still locked: whoever opened the file meanwhile
        // and locks it after us sees that the name is gone (`is_entry`).
        if !self.keep_file && self.jobs.is_entry(&self.file_name, &self.file) {
            let _ = self.jobs.remove_file(&self.file_name);
        }
    }
}

fn lock_file_name(name: &str) -> String {
    format!("{name}.lock")
}

/// Distinguishes the temporary lock files of one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Takes the lock for `record.job`, recording where its cgroups are. The
/// lock file appears under its name whole and already locked (written
/// under a temporary name, then renamed without replacing), so nobody ever
/// sees it free or half written. A name whose lock file exists is refused
/// ([`SlotError::NameInUse`]): held by a live enforcer, or an orphan that
/// has not been cleaned up.
pub fn lock_job(state: &StateDir, record: &JobRecord) -> Result<JobLock, SlotError> {
    let jobs = state.sub("jobs")?;
    let file_name = lock_file_name(&record.job);
    let tmp = format!(
        ".{file_name}.{}.{}.new",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp_path = jobs.path().join(&tmp);
    let mut file = jobs.create_new(&tmp)?;
    let written = safe_fs::try_lock(&file)
        .and_then(|locked| {
            if locked {
                Ok(())
            } else {
                Err(std::io::Error::from_raw_os_error(libc::EWOULDBLOCK))
            }
        })
        .and_then(|()| {
            let mut text = serde_json::to_vec(record).map_err(std::io::Error::other)?;
            text.push(b'\n');
            file.write_all(&text)
        });
    let placed = written
        .map_err(io("writing", &tmp_path))
        .and_then(|()| Ok(jobs.rename_noreplace(&tmp, &file_name)?));
    match placed {
        Ok(true) => Ok(JobLock {
            jobs,
            file_name,
            file,
            keep_file: false,
        }),
        Ok(false) => {
            let _ = jobs.remove_file(&tmp);
            let live = jobs
                .open_file(&file_name, false)
                .ok()
                .and_then(|f| safe_fs::try_lock(&f).ok())
                .is_some_and(|free| !free);
            Err(SlotError::NameInUse {
                name: record.job.clone(),
                by: if live {
                    "a running enforcer"
                } else {
                    "the job of an enforcer that died, not cleaned up (see the warnings above)"
                },
            })
        }
        Err(e) => {
            let _ = jobs.remove_file(&tmp);
            Err(e)
        }
    }
}

/// A job whose enforcer died: its lock, held now by this process. Dropping
/// it releases the lock and keeps the file (the orphan is still there);
/// [`Orphan::clear`] removes it once the job's cgroups are gone.
#[derive(Debug)]
pub struct Orphan {
    /// The job's name, from the lock file's name.
    pub name: String,
    /// Where its cgroups are; `None` when the lock records nothing usable
    /// (an older enforcer wrote an empty lock file).
    pub record: Option<JobRecord>,
    lock: JobLock,
}

impl Orphan {
    /// The lock file, for messages.
    pub fn path(&self) -> PathBuf {
        self.lock.jobs.path().join(&self.lock.file_name)
    }

    /// Removes the lock file: the job's cgroups are gone.
    pub fn clear(self) {
        let mut lock = self.lock;
        lock.keep_file = false;
    }
}

/// Jobs whose lock file exists but is held by nobody: their enforcer died
/// without cleaning up. Each is returned locked, so that two enforcers
/// never clean up the same orphan. Temporary lock files of enforcers that
/// died while creating them are removed.
pub fn orphaned_jobs(state: &StateDir) -> Result<Vec<Orphan>, SlotError> {
    let jobs = state.sub("jobs")?;
    let mut out = Vec::new();
    for file_name in jobs.names()? {
        let Ok(file) = jobs.open_file(&file_name, false) else {
            continue;
        };
        let path = jobs.path().join(&file_name);
        if !safe_fs::try_lock(&file).map_err(io("locking", &path))? {
            continue;
        }
        if !jobs.is_entry(&file_name, &file) {
            // Removed by its owner between our open and our lock.
            continue;
        }
        if file_name.starts_with('.') {
            // A temporary lock file is locked a moment after it is made:
            // only one that has stood unlocked for long is a dead one's.
            let old = file
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP);
            if old {
                jobs.remove_file(&file_name)?;
            }
            continue;
        }
        let Some(name) = file_name.strip_suffix(".lock") else {
            continue;
        };
        let mut bytes = Vec::new();
        (&file)
            .take(RECORD_CAP)
            .read_to_end(&mut bytes)
            .map_err(io("reading", &path))?;
        let record = serde_json::from_slice::<JobRecord>(&bytes)
            .ok()
            .filter(|r| r.job == name);
        out.push(Orphan {
            name: name.to_owned(),
            record,
            lock: JobLock {
                jobs: jobs.try_clone()?,
                file_name,
                file,
                keep_file: true,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, fs, os::unix::fs::MetadataExt};

    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    fn state(d: &tempfile::TempDir) -> StateDir {
        StateDir::open(&d.path().join("state")).unwrap()
    }

    fn record(job: &str) -> JobRecord {
        JobRecord {
            job: job.to_owned(),
            enforcer_pid: 1,
            cgroups: JobLocation {
                unified: Some(PathBuf::from(format!("/sys/fs/cgroup/svc/eval/{job}"))),
                controllers: BTreeMap::new(),
            },
        }
    }

    #[test]
    fn a_second_job_waits_or_fails_fast_and_a_freed_slot_is_reused() {
        let d = tempfile::tempdir().unwrap();
        let st = state(&d);
        rt().block_on(async {
            let first = acquire(&st, 1, false, |_, _| {}).await.unwrap();
            let e = acquire(&st, 1, true, |_, _| {}).await.unwrap_err();
            assert!(e.to_string().contains("--no-wait"), "{e}");
            drop(first);
            let again = acquire(&st, 1, true, |_, _| {}).await.unwrap();
            assert_eq!(again.index, 0);
            let second = acquire(&st, 2, true, |_, _| {}).await.unwrap();
            assert_eq!(second.index, 1);
        });
        // Nothing in the state directory is open to others.
        for (p, want) in [
            ("state", 0o700),
            ("state/slots", 0o700),
            ("state/slots/queue", 0o700),
            ("state/slots/lock", 0o600),
            ("state/slots/counter", 0o600),
            ("state/slots/slot-0", 0o600),
        ] {
            let mode = fs::metadata(d.path().join(p)).unwrap().mode() & 0o777;
            assert_eq!(mode, want, "{p}: {mode:o}");
        }
    }

    #[test]
    fn a_held_mutex_fails_no_wait_within_its_bound_and_a_wait_for_it_can_be_dropped() {
        let d = tempfile::tempdir().unwrap();
        let st = state(&d);
        rt().block_on(async {
            // Another holder: flock is per open file, so a second open of
            // the mutex conflicts even within this process.
            let slots = st.sub("slots").unwrap();
            let holder = slots.open_file("lock", true).unwrap();
            assert!(safe_fs::try_lock(&holder).unwrap());

            let t0 = Instant::now();
            let e = tokio::time::timeout(NO_WAIT_MUTEX_BOUND * 5, acquire(&st, 1, true, |_, _| {}))
                .await
                .expect("--no-wait waited for the mutex without bound")
                .unwrap_err();
            assert!(matches!(e, SlotError::MutexHeld { .. }), "{e}");
            assert!(t0.elapsed() >= NO_WAIT_MUTEX_BOUND);

            // Without --no-wait it waits, and the wait is abandoned by
            // dropping the future (what a signal does in `enforcer run`).
            let waiting = tokio::time::timeout(
                Duration::from_millis(200),
                acquire(&st, 1, false, |_, _| {}),
            )
            .await;
            assert!(waiting.is_err(), "acquired a slot past a held mutex");

            safe_fs::unlock(&holder);
            let s = acquire(&st, 1, true, |_, _| {}).await.unwrap();
            assert_eq!(s.index, 0);
        });
        assert_eq!(
            fs::read_dir(d.path().join("state/slots/queue"))
                .unwrap()
                .count(),
            0,
            "an abandoned wait leaves no ticket"
        );
    }

    #[test]
    fn a_job_lock_is_exclusive_records_its_cgroups_and_a_dead_owners_lock_is_an_orphan() {
        let d = tempfile::tempdir().unwrap();
        let st = state(&d);
        let held = lock_job(&st, &record("a")).unwrap();
        let e = lock_job(&st, &record("a")).unwrap_err();
        assert!(
            e.is_usage() && e.to_string().contains("running enforcer"),
            "{e}"
        );
        assert!(
            orphaned_jobs(&st).unwrap().is_empty(),
            "a live job is no orphan"
        );
        let lock_path = d.path().join("state/jobs/a.lock");
        assert_eq!(fs::metadata(&lock_path).unwrap().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&lock_path).unwrap();
        assert_eq!(
            serde_json::from_str::<JobRecord>(&text).unwrap(),
            record("a")
        );
        drop(held);
        assert!(!lock_path.exists());

        // Lock files left by enforcers that died: one with a record, one
        // empty (an older enforcer), one whose record names another job.
        let jobs = d.path().join("state/jobs");
        fs::write(
            jobs.join("b.lock"),
            serde_json::to_vec(&record("b")).unwrap(),
        )
        .unwrap();
        fs::write(jobs.join("c.lock"), "").unwrap();
        fs::write(
            jobs.join("d.lock"),
            serde_json::to_vec(&record("x")).unwrap(),
        )
        .unwrap();
        let stale = jobs.join(".e.lock.1.0.new");
        fs::write(&stale, "").unwrap();
        let long_ago = std::time::SystemTime::now() - STALE_TEMP * 2;
        fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        fs::write(jobs.join(".f.lock.1.1.new"), "").unwrap();
        let orphans = orphaned_jobs(&st).unwrap();
        let seen: Vec<_> = orphans
            .iter()
            .map(|o| (o.name.as_str(), o.record.is_some()))
            .collect();
        assert_eq!(seen, [("b", true), ("c", false), ("d", false)]);
        assert!(!stale.exists(), "a dead enforcer's temp file is pruned");
        assert!(jobs.join(".f.lock.1.1.new").exists(), "a fresh one is not");

        // While one enforcer holds an orphan, no other sees it.
        assert!(orphaned_jobs(&st).unwrap().is_empty());
        // Kept unless cleared; the name stays taken meanwhile.
        let mut orphans = orphans.into_iter();
        let b = orphans.next().unwrap();
        drop(orphans);
        assert!(jobs.join("c.lock").exists());
        let e = lock_job(&st, &record("c")).unwrap_err();
        assert!(e.to_string().contains("died"), "{e}");
        b.clear();
        assert!(!jobs.join("b.lock").exists());
        lock_job(&st, &record("b")).unwrap();
    }

    #[test]
    fn a_dead_waiters_ticket_is_pruned() {
        let d = tempfile::tempdir().unwrap();
        let st = state(&d);
        let q = d.path().join("state/slots/queue");
        fs::create_dir_all(&q).unwrap();
        // A ticket file nobody holds a lock on: its owner crashed.
        fs::write(q.join(format!("{:020}", 0)), "").unwrap();
        rt().block_on(async {
            let s = tokio::time::timeout(Duration::from_secs(2), acquire(&st, 1, false, |_, _| {}))
                .await
                .expect("a stale ticket blocked the queue")
                .unwrap();
            assert_eq!(s.index, 0);
        });
        assert_eq!(fs::read_dir(&q).unwrap().count(), 0);
    }

    #[test]
    fn a_state_dir_must_be_absolute_and_the_enforcers_own() {
        for bad in ["", "relative/state"] {
            let e = StateDir::open(Path::new(bad)).unwrap_err();
            assert!(e.is_usage() && e.to_string().contains("state_dir"), "{e}");
            assert!(check_state_dir_path(Path::new(bad)).is_err());
        }
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let e = StateDir::open(&open).unwrap_err();
        assert!(e.is_usage(), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("state_dir") && msg.contains("0777"), "{msg}");
    }
}
