//! `max_concurrent_jobs` across separate `enforcer` processes on one node:
//! a FIFO queue and a set of slots, all files under `<state_dir>/slots`,
//! held with `flock(2)`. A lock dies with its process, so a crashed holder
//! or waiter never leaks a slot or blocks the queue.
//!
//! - `lock`: a short mutex around queue changes;
//! - `counter`: the next ticket number;
//! - `queue/<ticket>`: one file per waiter, flocked by it while it waits;
//!   a file whose lock can be taken belongs to a dead waiter and is removed;
//! - `slot-<i>`: flocked by the job that holds slot `i`.
//!
//! `<state_dir>/jobs/<name>.lock` is flocked by the enforcer that owns job
//! `<name>` for as long as the job lives: a job cgroup whose lock is free
//! belongs to an enforcer that was killed (SIGKILL, OOM) before it could
//! clean up, and the next enforcer kills and removes it.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all {max} job slots are taken and --no-wait was given")]
    Busy { max: u32 },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SlotError + 'a {
    move |source| SlotError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A held slot; dropping it (or the process dying) frees it.
#[derive(Debug)]
pub struct Slot {
    _file: File,
    pub index: u32,
}

fn open_rw(path: &Path) -> Result<File, SlotError> {
    // O_CLOEXEC (std's default) keeps the lock out of the job's processes.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("opening", path))
}

fn flock(f: &File, op: libc::c_int) -> bool {
    // SAFETY: flock on a valid fd has no memory-safety preconditions.
    unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
}

/// Waits in FIFO order for one of `max` slots (`no_wait`: fails at once if
/// none is free or others are queued). `on_wait` is called with (position,
/// queue length) whenever the position changes.
pub async fn acquire(
    state_dir: &Path,
    max: u32,
    no_wait: bool,
    mut on_wait: impl FnMut(usize, usize),
) -> Result<Slot, SlotError> {
    let dir = state_dir.join("slots");
    let queue = dir.join("queue");
    fs::create_dir_all(&queue).map_err(io("creating", &queue))?;
    let lock_path = dir.join("lock");
    let lock = open_rw(&lock_path)?;

    // Take a ticket and queue up, under the mutex so that pruning never
    // sees a ticket file before its owner has locked it.
    flock(&lock, libc::LOCK_EX);
    let counter_path = dir.join("counter");
    let mut counter = open_rw(&counter_path)?;
    let mut text = String::new();
    counter
        .read_to_string(&mut text)
        .map_err(io("reading", &counter_path))?;
    let ticket: u64 = text.trim().parse().unwrap_or(0);
    counter.set_len(0).map_err(io("writing", &counter_path))?;
    counter.rewind().map_err(io("writing", &counter_path))?;
    write!(counter, "{}", ticket + 1).map_err(io("writing", &counter_path))?;
    let mine = queue.join(format!("{ticket:020}"));
    let me = open_rw(&mine)?;
    flock(&me, libc::LOCK_EX);
    flock(&lock, libc::LOCK_UN);

    let result = wait_turn(&dir, &queue, &lock, &mine, max, no_wait, &mut on_wait).await;
    let _ = fs::remove_file(&mine);
    drop(me);
    result
}

async fn wait_turn(
    dir: &Path,
    queue: &Path,
    lock: &File,
    mine: &Path,
    max: u32,
    no_wait: bool,
    on_wait: &mut impl FnMut(usize, usize),
) -> Result<Slot, SlotError> {
    let mut last_pos = usize::MAX;
    loop {
        flock(lock, libc::LOCK_EX);
        let live = live_tickets(queue);
        let pos = live.iter().position(|p| p == mine).unwrap_or(0);
        let mut got = None;
        if pos == 0 {
            for i in 0..max {
                let path = dir.join(format!("slot-{i}"));
                let f = open_rw(&path)?;
                if flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
                    got = Some(Slot { _file: f, index: i });
                    break;
                }
            }
        }
        flock(lock, libc::LOCK_UN);
        if let Some(s) = got {
            return Ok(s);
        }
        if no_wait {
            return Err(SlotError::Busy { max });
        }
        if pos != last_pos {
            on_wait(pos, live.len());
            last_pos = pos;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Queue files in ticket order, removing those of dead waiters (their lock
/// is free). Called with the mutex held.
fn live_tickets(queue: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(queue)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v.retain(|p| {
        let Ok(f) = File::open(p) else {
            return false;
        };
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            // Our own ticket is locked through another fd, so this cannot
            // be ours: its owner is gone.
            let _ = fs::remove_file(p);
            false
        } else {
            true
        }
    });
    v
}

/// The lock that says "an enforcer owns job `name`"; dropping it removes
/// the lock file.
#[derive(Debug)]
pub struct JobLock {
    file: File,
    path: PathBuf,
}

impl Drop for JobLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        flock(&self.file, libc::LOCK_UN);
    }
}

/// Takes the lock for job `name`; `Ok(None)` when a live enforcer holds it.
pub fn lock_job(state_dir: &Path, name: &str) -> Result<Option<JobLock>, SlotError> {
    let dir = state_dir.join("jobs");
    fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let path = dir.join(format!("{name}.lock"));
    let file = open_rw(&path)?;
    if flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(Some(JobLock { file, path }))
    } else {
        Ok(None)
    }
}

/// Names of jobs whose lock file exists but is held by nobody: their
/// enforcer died without cleaning up.
pub fn orphaned_jobs(state_dir: &Path) -> Vec<(String, JobLock)> {
    let dir = state_dir.join("jobs");
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(job) = name.strip_suffix(".lock") else {
            continue;
        };
        if let Ok(Some(lock)) = lock_job(state_dir, job) {
            out.push((job.to_owned(), lock));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn a_second_job_waits_or_fails_fast_and_a_freed_slot_is_reused() {
        let d = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let first = acquire(d.path(), 1, false, |_, _| {}).await.unwrap();
            let e = acquire(d.path(), 1, true, |_, _| {}).await.unwrap_err();
            assert!(e.to_string().contains("--no-wait"), "{e}");
            drop(first);
            let again = acquire(d.path(), 1, true, |_, _| {}).await.unwrap();
            assert_eq!(again.index, 0);
            let second = acquire(d.path(), 2, true, |_, _| {}).await.unwrap();
            assert_eq!(second.index, 1);
        });
    }

    #[test]
    fn a_job_lock_is_exclusive_and_a_dead_owners_lock_is_an_orphan() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_job(d.path(), "a").unwrap().expect("free");
        assert!(lock_job(d.path(), "a").unwrap().is_none(), "held twice");
        assert!(
            orphaned_jobs(d.path()).is_empty(),
            "a live job is no orphan"
        );
        drop(held);
        assert!(!d.path().join("jobs/a.lock").exists());
        // A lock file left by a process that died.
        fs::write(d.path().join("jobs/b.lock"), "").unwrap();
        let orphans = orphaned_jobs(d.path());
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].0, "b");
    }

    #[test]
    fn a_dead_waiters_ticket_is_pruned() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("slots/queue");
        fs::create_dir_all(&q).unwrap();
        // A ticket file nobody holds a lock on: its owner crashed.
        fs::write(q.join(format!("{:020}", 0)), "").unwrap();
        rt().block_on(async {
            let s = tokio::time::timeout(
                Duration::from_secs(2),
                acquire(d.path(), 1, false, |_, _| {}),
            )
            .await
            .expect("a stale ticket blocked the queue")
            .unwrap();
            assert_eq!(s.index, 0);
        });
        assert_eq!(fs::read_dir(&q).unwrap().count(), 0);
    }
}
