//! The cgroup v2 backend: one directory per job in the unified hierarchy.
//!
//! Kernel differences handled here: `cgroup.kill` (5.14+; else freeze, kill
//! each task, thaw), `memory.peak` (5.19+; else the supervisor samples),
//! `cpu.idle` (5.15+; else weight 1), `memory.swap.max` (only with swap
//! accounting), `pids.peak` (6.13+).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::{Backend, CPU_PERIOD_US, CgroupError, MAIN_LEAF, Stats, cpuset::CpuList, fs, fs::CgFs};
use crate::units::ByteSize;

#[derive(Debug)]
pub struct V2Job {
    fs: CgFs,
    dir: PathBuf,
    /// Where the job's processes live: `<dir>/main` for a job, `<dir>` for a
    /// game.
    leaf: PathBuf,
    /// The weight to restore when the idle class is turned off on kernels
    /// without `cpu.idle`.
    weight: AtomicU64,
}

impl V2Job {
    /// Creates `<parent>/<name>` with controllers delegated to its children
    /// and the `main` leaf for its processes. Fails if the name is taken.
    pub fn create(fs: CgFs, parent: &Path, name: &str) -> Result<Self, CgroupError> {
        let dir = parent.join(name);
        if !fs.mkdir(&dir)? {
            return Err(CgroupError::NameInUse {
                name: name.to_owned(),
                path: dir,
            });
        }
        let job = V2Job {
            fs,
            leaf: dir.join(MAIN_LEAF),
            dir,
            weight: AtomicU64::new(100),
        };
        let made = enable_controllers(&job.fs, &job.dir).and_then(|()| job.fs.mkdir(&job.leaf));
        if let Err(e) = made {
            let _ = job.remove();
            return Err(e);
        }
        Ok(job)
    }

    /// A handle on an existing job directory whose processes live in `leaf`.
    pub fn open(fs: CgFs, dir: PathBuf, leaf: PathBuf) -> Self {
        V2Job {
            fs,
            dir,
            leaf,
            weight: AtomicU64::new(100),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, value: &str) -> Result<(), CgroupError> {
        self.fs.write(&self.file(name), value)
    }

    fn has(&self, name: &str) -> bool {
        self.file(name).exists()
    }

    fn wait_frozen(&self, frozen: bool) {
        // cgroup.events says `frozen 1` once every task has stopped.
        let want = u64::from(frozen);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            let events = fs::read_keyed(&self.file("cgroup.events")).unwrap_or_default();
            if events.get("frozen").copied().unwrap_or(want) == want {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Enables, in `dir`'s `cgroup.subtree_control`, every controller of ours
/// that `dir` has, so its children can be limited. `cpuset` (only used to
/// place a job on the CPUs the training leaves free) is enabled on its own
/// afterwards and may fail without failing the rest.
pub fn enable_controllers(fs: &CgFs, dir: &Path) -> Result<(), CgroupError> {
    let available = fs::read(&dir.join("cgroup.controllers"))?;
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    let wanted: Vec<String> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter(|c| has(c))
        .map(|c| format!("+{c}"))
        .collect();
    if !wanted.is_empty() {
        fs.write(&dir.join("cgroup.subtree_control"), &wanted.join(" "))?;
    }
    if has("cpuset")
        && let Err(error) = fs.write(&dir.join("cgroup.subtree_control"), "+cpuset")
    {
        tracing::debug!(%error, "cpuset not enabled: jobs will not be placed on CPUs");
    }
    Ok(())
}

impl Backend for V2Job {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn join_files(&self) -> Vec<PathBuf> {
        vec![self.leaf.join("cgroup.procs")]
    }

    fn set_memory_max(&self, limit: Option<ByteSize>) -> Result<(), CgroupError> {
        let v = limit.map_or("max".to_owned(), |b| b.0.to_string());
        self.write("memory.max", &v)?;
        // No swap for a job: its memory limit is a memory limit. The file
        // exists only with swap accounting.
        if limit.is_some() && self.has("memory.swap.max") {
            self.write("memory.swap.max", "0")?;
        }
        Ok(())
    }

    fn set_memory_high(&self, limit: Option<ByteSize>) -> Result<(), CgroupError> {
        let v = limit.map_or("max".to_owned(), |b| b.0.to_string());
        self.write("memory.high", &v)
    }

    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError> {
        let v = match cores {
            Some(c) => format!("{} {CPU_PERIOD_US}", quota_us(c)),
            None => format!("max {CPU_PERIOD_US}"),
        };
        self.write("cpu.max", &v)
    }

    fn set_cpu_weight(&self, weight: u64) -> Result<(), CgroupError> {
        let w = weight.clamp(1, 10_000);
        self.weight.store(w, Ordering::Relaxed);
        self.write("cpu.weight", &w.to_string())
    }

    fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError> {
        if self.has("cpu.idle") {
            self.write("cpu.idle", if idle { "1" } else { "0" })
        } else if idle {
            self.write("cpu.weight", "1")
        } else {
            self.write(
                "cpu.weight",
                &self.weight.load(Ordering::Relaxed).to_string(),
            )
        }
    }

    fn set_pids_max(&self, max: Option<u64>) -> Result<(), CgroupError> {
        let v = max.map_or("max".to_owned(), |n| n.to_string());
        self.write("pids.max", &v)
    }

    fn set_cpus(&self, cpus: Option<&CpuList>) -> Result<(), CgroupError> {
        if !self.has("cpuset.cpus") {
            return Err(CgroupError::Controller {
                controller: "cpuset".into(),
                reason: format!(
                    "cpuset is not enabled for {} (not in its parent's cgroup.subtree_control)",
                    self.dir.display()
                ),
            });
        }
        // An empty list means "the parent's CPUs"; the children (the main
        // leaf, games) inherit whatever the job has.
        self.write(
            "cpuset.cpus",
            &cpus.map_or("\n".to_owned(), |c| c.to_string()),
        )
    }

    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        self.fs
            .write(&self.leaf.join("cgroup.procs"), &pid.to_string())
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        self.wait_frozen(frozen);
        Ok(())
    }

    fn kill_round(&self) -> Result<(), CgroupError> {
        if self.has("cgroup.kill") && super::cgroup_kill_allowed() {
            return self.write("cgroup.kill", "1");
        }
        // Before 5.14: freeze so nothing forks while we kill. No wait for
        // `frozen 1`: a task forked after the write is born frozen and
        // killed in the next round, and the v2 freezer lets SIGKILL through.
        self.write("cgroup.freeze", "1")?;
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.write("cgroup.freeze", "0")
    }

    fn pids(&self) -> Vec<i32> {
        fs::procs_recursive(&self.dir)
    }

    fn stats(&self) -> Stats {
        let cpu = fs::read_keyed(&self.file("cpu.stat")).ok();
        let mem_events = fs::read_keyed(&self.file("memory.events")).ok();
        let num = |n: &str| fs::read_u64(&self.file(n)).ok();
        let limit = |n: &str| num(n).filter(|v| *v != u64::MAX);
        Stats {
            cpu_usage: cpu
                .as_ref()
                .and_then(|m| m.get("usage_usec"))
                .map(|u| Duration::from_micros(*u)),
            cpu_throttled: cpu
                .as_ref()
                .and_then(|m| m.get("throttled_usec"))
                .map(|u| Duration::from_micros(*u)),
            cpu_throttled_periods: cpu.as_ref().and_then(|m| m.get("nr_throttled").copied()),
            memory_current: num("memory.current"),
            memory_peak: num("memory.peak"),
            memory_limit: limit("memory.max"),
            memory_high_limit: limit("memory.high"),
            oom_kills: mem_events.as_ref().and_then(|m| m.get("oom_kill").copied()),
            memory_high_events: mem_events.as_ref().and_then(|m| m.get("high").copied()),
            pids_current: num("pids.current"),
            pids_peak: num("pids.peak"),
            pids_limit: limit("pids.max"),
            // Before 6.13 the event is counted in the forking cgroup (the
            // leaf), from 6.13 in the cgroup whose limit was hit.
            pids_max_events: fs::subtree_counter(&self.dir, "pids.events", "max"),
        }
    }

    fn cpu_usage(&self) -> Duration {
        fs::read_keyed(&self.file("cpu.stat"))
            .ok()
            .and_then(|m| m.get("usage_usec").copied())
            .map(Duration::from_micros)
            .unwrap_or_default()
    }

    fn v2_cgroup_id(&self) -> Option<u64> {
        super::inode(&self.dir)
    }

    fn create_child(&self, name: &str) -> Result<Self, CgroupError> {
        let dir = self.dir.join(name);
        if !self.fs.mkdir(&dir)? {
            return Err(CgroupError::NameInUse {
                name: name.to_owned(),
                path: dir,
            });
        }
        Ok(V2Job {
            fs: self.fs.clone(),
            leaf: dir.clone(),
            dir,
            weight: AtomicU64::new(100),
        })
    }

    fn remove(&self) -> Result<(), CgroupError> {
        fs::rmdir_recursive(&self.fs, &self.dir)
    }
}

/// Quota in µs per [`CPU_PERIOD_US`]; the kernel's minimum is 1 ms.
pub fn quota_us(cores: f64) -> u64 {
    ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

#[cfg(test)]
mod tests {
    use std::fs as stdfs;

    use super::*;

    #[test]
    fn create_makes_job_and_main_leaf_and_refuses_a_taken_name() {
        let d = tempfile::tempdir().unwrap();
        // cgroup.controllers of the job dir is read after mkdir: provide it
        // by making the parent's files visible under the new job via a
        // pre-made directory is not possible, so only the parent has it.
        stdfs::write(d.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let fs = CgFs::new(vec![d.path().to_owned()]);
        // The job dir's own cgroup.controllers is missing on a fake fs: the
        // create fails and leaves nothing behind.
        let err = V2Job::create(fs.clone(), d.path(), "j").unwrap_err();
        assert!(err.to_string().contains("cgroup.controllers"), "{err}");
        assert!(!d.path().join("j").exists(), "a failed create left its dir");
        stdfs::create_dir(d.path().join("taken")).unwrap();
        let err = V2Job::create(fs, d.path(), "taken").unwrap_err();
        assert!(matches!(err, CgroupError::NameInUse { .. }), "{err}");
    }

    #[test]
    fn limits_are_written_in_kernel_syntax() {
        let d = tempfile::tempdir().unwrap();
        let fs = CgFs::new(vec![d.path().to_owned()]);
        let dir = d.path().join("j");
        stdfs::create_dir(&dir).unwrap();
        let job = V2Job::open(fs, dir.clone(), dir.join("main"));
        for f in [
            "memory.swap.max",
            "cpu.idle",
            "memory.max",
            "cpu.max",
            "pids.max",
        ] {
            stdfs::write(dir.join(f), "").unwrap();
        }
        job.set_memory_max(Some(ByteSize::mib(300))).unwrap();
        job.set_cpu_quota(Some(1.5)).unwrap();
        job.set_pids_max(Some(64)).unwrap();
        job.set_cpu_idle(true).unwrap();
        let r = |f: &str| stdfs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(r("memory.max"), (300u64 << 20).to_string());
        assert_eq!(r("memory.swap.max"), "0");
        assert_eq!(r("cpu.max"), "150000 100000");
        assert_eq!(r("pids.max"), "64");
        assert_eq!(r("cpu.idle"), "1");
        job.set_cpu_quota(None).unwrap();
        assert_eq!(r("cpu.max"), "max 100000");
    }

    #[test]
    fn without_cpu_idle_the_idle_class_is_weight_one_and_restores() {
        let d = tempfile::tempdir().unwrap();
        let fs = CgFs::new(vec![d.path().to_owned()]);
        let dir = d.path().join("j");
        stdfs::create_dir(&dir).unwrap();
        let job = V2Job::open(fs, dir.clone(), dir.join("main"));
        stdfs::write(dir.join("cpu.weight"), "100").unwrap();
        job.set_cpu_weight(300).unwrap();
        job.set_cpu_idle(true).unwrap();
        assert_eq!(stdfs::read_to_string(dir.join("cpu.weight")).unwrap(), "1");
        job.set_cpu_idle(false).unwrap();
        assert_eq!(
            stdfs::read_to_string(dir.join("cpu.weight")).unwrap(),
            "300"
        );
    }

    #[test]
    fn stats_read_what_exists_and_leave_the_rest_none() {
        let d = tempfile::tempdir().unwrap();
        let job = fake_with_controllers(d.path());
        let dir = job.dir.clone();
        stdfs::write(
            dir.join("cpu.stat"),
            "usage_usec 1500000\nnr_throttled 7\nthrottled_usec 250000\n",
        )
        .unwrap();
        stdfs::write(dir.join("memory.current"), "4096\n").unwrap();
        stdfs::write(dir.join("memory.max"), "max\n").unwrap();
        stdfs::write(
            dir.join("memory.events"),
            "low 0\nhigh 3\nmax 9\noom 1\noom_kill 1\n",
        )
        .unwrap();
        stdfs::write(dir.join("pids.events"), "max 5\n").unwrap();
        let s = job.stats();
        assert_eq!(s.cpu_usage, Some(Duration::from_millis(1500)));
        assert_eq!(s.cpu_throttled, Some(Duration::from_millis(250)));
        assert_eq!(s.cpu_throttled_periods, Some(7));
        assert_eq!(s.memory_peak, None, "no memory.peak on this fake kernel");
        assert_eq!(s.memory_limit, None, "max is no limit");
        assert_eq!(s.oom_kills, Some(1));
        assert_eq!(s.memory_high_events, Some(3));
        assert_eq!(s.pids_max_events, Some(5));
        assert_eq!(job.cpu_usage(), Duration::from_millis(1500));
        assert_eq!(job.v2_cgroup_id(), super::super::inode(&dir));
    }

    fn fake_with_controllers(root: &Path) -> V2Job {
        let fs = CgFs::new(vec![root.to_owned()]);
        let dir = root.join("j");
        stdfs::create_dir_all(dir.join("main")).unwrap();
        V2Job::open(fs, dir.clone(), dir.join("main"))
    }

    #[test]
    fn children_and_pids_are_found_recursively_and_removed_deepest_first() {
        let d = tempfile::tempdir().unwrap();
        let job = fake_with_controllers(d.path());
        stdfs::write(job.dir.join("main/cgroup.procs"), "10\n11\n").unwrap();
        let game = job.create_child("game-1").unwrap();
        stdfs::write(game.dir.join("cgroup.procs"), "12\n").unwrap();
        assert_eq!(job.pids(), vec![10, 11, 12]);
        assert_eq!(game.join_files(), vec![game.dir.join("cgroup.procs")]);
        // Fake dirs hold regular files, which rmdir refuses: clear them as
        // the kernel would when the tasks are gone.
        stdfs::remove_file(job.dir.join("main/cgroup.procs")).unwrap();
        stdfs::remove_file(game.dir.join("cgroup.procs")).unwrap();
        job.remove().unwrap();
        assert!(!job.dir.exists());
    }
}
