//! The cgroup v1 backend, for hybrid and legacy hosts: one directory per job
//! in each controller hierarchy we use (cpu, cpuacct, memory, pids, freezer,
//! cpuset; cpu and cpuacct may share one), plus, on hybrid hosts, one in the unified
//! hierarchy so that eBPF can recognise the job's tasks by v2 cgroup id and
//! so that `cgroup.kill` and `cgroup.freeze` can be used on kernels that
//! have them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::{
    Backend, CPU_PERIOD_US, CgroupError, MAIN_LEAF, Stats, cpuset::CpuList, fs, fs::CgFs,
    v2::quota_us,
};
use crate::units::ByteSize;

/// The v1 controllers a job gets a directory in.
pub const CONTROLLERS: [&str; 6] = ["cpu", "cpuacct", "memory", "pids", "freezer", "cpuset"];

/// Controllers a job can do without: statistics only (cpuacct), or only
/// used to place the job on CPUs (cpuset).
pub const OPTIONAL: [&str; 2] = ["cpuacct", "cpuset"];

/// Prepares the agent's own v1 cpuset directory `base` (just made under a
/// cgroup it does not own): a v1 cpuset starts with no CPUs and no memory
/// nodes, and no task can join it then. It gets its parent's, and
/// `cgroup.clone_children` so that every job, leaf and game made below it
/// starts with a copy of its parent's.
pub fn init_cpuset_base(fs: &CgFs, base: &Path) -> Result<(), CgroupError> {
    let parent = base.parent().unwrap_or(base);
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if fs::read(&base.join(file))?.trim().is_empty() {
            let value = fs::read(&parent.join(file))?;
            fs.write(&base.join(file), value.trim())?;
        }
    }
    fs.write(&base.join("cgroup.clone_children"), "1")
}

#[derive(Debug)]
pub struct V1Job {
    fs: CgFs,
    /// Controller → the job's directory in that controller's hierarchy.
    dirs: BTreeMap<String, PathBuf>,
    /// The job's directory in the unified hierarchy (hybrid hosts).
    unified: Option<PathBuf>,
    /// `Some("main")` for a job, `None` for a game (processes in the dir).
    leaf: Option<&'static str>,
    weight: AtomicU64,
}

impl V1Job {
    /// Creates `<parent>/<name>` (and its `main` leaf) in each hierarchy.
    /// The first mkdir claims the name; on any failure every directory made
    /// so far is removed.
    pub fn create(
        fs: CgFs,
        parents: &BTreeMap<String, PathBuf>,
        unified_parent: Option<&Path>,
        name: &str,
    ) -> Result<Self, CgroupError> {
        let mut job = V1Job {
            fs,
            dirs: BTreeMap::new(),
            unified: None,
            leaf: Some(MAIN_LEAF),
            weight: AtomicU64::new(100),
        };
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| {
            let mut targets: Vec<PathBuf> = parents.values().map(|p| p.join(name)).collect();
            targets.extend(unified_parent.map(|p| p.join(name)));
            targets.sort();
            targets.dedup();
            for dir in &targets {
                if !job.fs.mkdir(dir)? {
                    return Err(CgroupError::NameInUse {
                        name: name.to_owned(),
                        path: dir.clone(),
                    });
                }
                made.push(dir.clone());
                job.fs.mkdir(&dir.join(MAIN_LEAF))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for dir in made.iter().rev() {
                let _ = fs::rmdir_recursive(&job.fs, dir);
            }
            return Err(e);
        }
        job.dirs = parents
            .iter()
            .map(|(c, p)| (c.clone(), p.join(name)))
            .collect();
        job.unified = unified_parent.map(|p| p.join(name));
        Ok(job)
    }

    /// A handle on existing directories (`enforcer game` finding its job).
    pub fn open(
        fs: CgFs,
        dirs: BTreeMap<String, PathBuf>,
        unified: Option<PathBuf>,
        leaf: Option<&'static str>,
    ) -> Self {
        V1Job {
            fs,
            dirs,
            unified,
            leaf,
            weight: AtomicU64::new(100),
        }
    }

    pub fn mode_name(&self) -> &'static str {
        if self.unified.is_some() {
            "hybrid"
        } else {
            "legacy"
        }
    }

    fn dir(&self, controller: &str) -> Option<&PathBuf> {
        self.dirs.get(controller)
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.dir(controller).map(|d| d.join(name))
    }

    /// Writes a controller file; a controller this host lacks is an error
    /// only when a limit for it was asked for.
    fn write(&self, controller: &str, name: &str, value: &str) -> Result<(), CgroupError> {
        let path = self
            .file(controller, name)
            .ok_or_else(|| CgroupError::Controller {
                controller: controller.to_owned(),
                reason: format!("no {controller} hierarchy to write {name}={value} in"),
            })?;
        self.fs.write(&path, value)
    }

    fn has(&self, controller: &str, name: &str) -> bool {
        self.file(controller, name).is_some_and(|p| p.exists())
    }

    /// Every distinct directory of the job, unified last.
    fn all_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.dirs.values().cloned().collect();
        v.sort();
        v.dedup();
        v.extend(self.unified.clone());
        v
    }

    fn leaf_of(&self, dir: &Path) -> PathBuf {
        match self.leaf {
            Some(l) => dir.join(l),
            None => dir.to_owned(),
        }
    }

    /// The hierarchy whose `cgroup.procs` is authoritative for membership.
    fn census_dir(&self) -> Option<&PathBuf> {
        self.unified
            .as_ref()
            .or_else(|| self.dir("pids"))
            .or_else(|| self.dirs.values().next())
    }

    fn freezer_v1(&self, frozen: bool) -> Result<(), CgroupError> {
        let state = if frozen { "FROZEN" } else { "THAWED" };
        self.write("freezer", "freezer.state", state)?;
        if frozen && let Some(p) = self.file("freezer", "freezer.state") {
            // FREEZING until every task has stopped.
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(50) {
                if fs::read(&p).is_ok_and(|s| s.trim() == "FROZEN") {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }
}

impl Backend for V1Job {
    fn path(&self) -> &Path {
        self.dir("memory")
            .or_else(|| self.dir("cpu"))
            .or(self.unified.as_ref())
            .or_else(|| self.dirs.values().next())
            .map(PathBuf::as_path)
            .unwrap_or(Path::new("/"))
    }

    fn join_files(&self) -> Vec<PathBuf> {
        self.all_dirs()
            .iter()
            .map(|d| self.leaf_of(d).join("cgroup.procs"))
            .collect()
    }

    fn set_memory_max(&self, limit: Option<ByteSize>) -> Result<(), CgroupError> {
        let v = limit.map_or("-1".to_owned(), |b| b.0.to_string());
        // memsw (memory+swap) must stay >= the memory limit: when lowering
        // write memory first, when raising write memsw first. Equal values
        // leave the job no swap.
        let memsw = self.has("memory", "memory.memsw.limit_in_bytes");
        if limit.is_none() {
            if memsw {
                self.write("memory", "memory.memsw.limit_in_bytes", &v)?;
            }
            return self.write("memory", "memory.limit_in_bytes", &v);
        }
        self.write("memory", "memory.limit_in_bytes", &v)?;
        if memsw {
            self.write("memory", "memory.memsw.limit_in_bytes", &v)
        } else if self.has("memory", "memory.swappiness") {
            // Without swap accounting, keep the job off swap this way.
            self.write("memory", "memory.swappiness", "0")
        } else {
            Ok(())
        }
    }

    fn set_memory_high(&self, limit: Option<ByteSize>) -> Result<(), CgroupError> {
        let v = limit.map_or("-1".to_owned(), |b| b.0.to_string());
        self.write("memory", "memory.soft_limit_in_bytes", &v)
    }

    fn set_cpu_quota(&self, cores: Option<f64>) -> Result<(), CgroupError> {
        self.write("cpu", "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
        let q = cores.map_or("-1".to_owned(), |c| quota_us(c).to_string());
        self.write("cpu", "cpu.cfs_quota_us", &q)
    }

    fn set_cpu_weight(&self, weight: u64) -> Result<(), CgroupError> {
        let w = weight.clamp(1, 10_000);
        self.weight.store(w, Ordering::Relaxed);
        self.write("cpu", "cpu.shares", &shares(w).to_string())
    }

    fn set_cpu_idle(&self, idle: bool) -> Result<(), CgroupError> {
        if self.has("cpu", "cpu.idle") {
            self.write("cpu", "cpu.idle", if idle { "1" } else { "0" })
        } else if idle {
            self.write("cpu", "cpu.shares", "2")
        } else {
            let w = self.weight.load(Ordering::Relaxed);
            self.write("cpu", "cpu.shares", &shares(w).to_string())
        }
    }

    fn set_pids_max(&self, max: Option<u64>) -> Result<(), CgroupError> {
        let v = max.map_or("max".to_owned(), |n| n.to_string());
        self.write("pids", "pids.max", &v)
    }

    /// v1 cpusets must nest (a child's CPUs within its parent's), and the
    /// job's leaf and games are cpusets of their own: first every directory
    /// gets all of the agent's CPUs, top down, then the target, bottom up.
    /// Both orders keep every write legal whatever the old and new sets.
    fn set_cpus(&self, cpus: Option<&CpuList>) -> Result<(), CgroupError> {
        let Some(job) = self.dir("cpuset") else {
            return Err(CgroupError::Controller {
                controller: "cpuset".into(),
                reason: "no v1 cpuset hierarchy for jobs on this host".into(),
            });
        };
        let base = job.parent().unwrap_or(job);
        let all = fs::read(&base.join("cpuset.cpus"))?;
        let mut dirs = vec![job.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
                let mut children: Vec<PathBuf> = entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect();
                children.sort();
                dirs.extend(children);
            }
            i += 1;
        }
        for dir in &dirs {
            self.fs.write(&dir.join("cpuset.cpus"), all.trim())?;
        }
        if let Some(cpus) = cpus {
            for dir in dirs.iter().rev() {
                self.fs.write(&dir.join("cpuset.cpus"), &cpus.to_string())?;
            }
        }
        Ok(())
    }

    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        // v1 cgroup.procs moves the whole thread group, as v2 does.
        for d in self.all_dirs() {
            self.fs
                .write(&self.leaf_of(&d).join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        if self.dir("freezer").is_some() {
            return self.freezer_v1(frozen);
        }
        match &self.unified {
            Some(u) if u.join("cgroup.freeze").exists() => self
                .fs
                .write(&u.join("cgroup.freeze"), if frozen { "1" } else { "0" }),
            _ => Err(CgroupError::Controller {
                controller: "freezer".into(),
                reason: "neither a v1 freezer hierarchy nor cgroup.freeze".into(),
            }),
        }
    }

    fn kill_round(&self) -> Result<(), CgroupError> {
        // The unified twin holds the same tasks; the kernel kills them all
        // at once there, with no race against fork.
        if let Some(u) = &self.unified
            && u.join("cgroup.kill").exists()
            && super::cgroup_kill_allowed()
        {
            self.fs.write(&u.join("cgroup.kill"), "1")?;
            // Tasks frozen by the v1 freezer (e.g. by a GPU duty cycle) die
            // only once thawed.
            if self.dir("freezer").is_some() {
                self.freezer_v1(false)?;
            }
            return Ok(());
        }
        // Freeze so nothing forks while we kill; v1-frozen tasks die only
        // once thawed, so thaw right after. The caller repeats rounds until
        // the job is empty, which catches a task that slipped through.
        let can_freeze = if self.dir("freezer").is_some() {
            self.write("freezer", "freezer.state", "FROZEN").is_ok()
        } else {
            self.freeze(true).is_ok()
        };
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if can_freeze {
            self.freeze(false)?;
        }
        Ok(())
    }

    fn pids(&self) -> Vec<i32> {
        self.census_dir()
            .map(|d| fs::procs_recursive(d))
            .unwrap_or_default()
    }

    fn stats(&self) -> Stats {
        let num = |c: &str, n: &str| self.file(c, n).and_then(|p| fs::read_u64(&p).ok());
        let limit = |c: &str, n: &str| num(c, n).filter(|v| *v < (1u64 << 62));
        let keyed = |c: &str, n: &str| self.file(c, n).and_then(|p| fs::read_keyed(&p).ok());
        let cpu_stat = keyed("cpu", "cpu.stat");
        Stats {
            cpu_usage: num("cpuacct", "cpuacct.usage").map(Duration::from_nanos),
            cpu_throttled: cpu_stat
                .as_ref()
                .and_then(|m| m.get("throttled_time"))
                .map(|ns| Duration::from_nanos(*ns)),
            cpu_throttled_periods: cpu_stat
                .as_ref()
                .and_then(|m| m.get("nr_throttled").copied()),
            memory_current: num("memory", "memory.usage_in_bytes"),
            memory_peak: num("memory", "memory.max_usage_in_bytes"),
            memory_limit: limit("memory", "memory.limit_in_bytes"),
            memory_high_limit: limit("memory", "memory.soft_limit_in_bytes"),
            // v1 counts an OOM kill only in the victim's own memcg (the
            // `main` leaf or a game), not in its ancestors: sum the subtree.
            oom_kills: self
                .dir("memory")
                .and_then(|d| fs::subtree_counter(d, "memory.oom_control", "oom_kill")),
            // v1 has no event for crossing the soft limit; the event
            // watcher compares usage with it instead.
            memory_high_events: None,
            pids_current: num("pids", "pids.current"),
            pids_peak: num("pids", "pids.peak"),
            pids_limit: limit("pids", "pids.max"),
            // Counted in the forking cgroup (the leaf) by v1.
            pids_max_events: self
                .dir("pids")
                .and_then(|d| fs::subtree_counter(d, "pids.events", "max")),
        }
    }

    fn cpu_usage(&self) -> Duration {
        self.file("cpuacct", "cpuacct.usage")
            .and_then(|p| fs::read_u64(&p).ok())
            .map(Duration::from_nanos)
            .or_else(|| {
                // Without cpuacct, the unified twin's cpu.stat has usage.
                let u = self.unified.as_ref()?;
                fs::read_keyed(&u.join("cpu.stat"))
                    .ok()?
                    .get("usage_usec")
                    .map(|us| Duration::from_micros(*us))
            })
            .unwrap_or_default()
    }

    fn v2_cgroup_id(&self) -> Option<u64> {
        self.unified.as_deref().and_then(super::inode)
    }

    fn create_child(&self, name: &str) -> Result<Self, CgroupError> {
        let mut made = Vec::new();
        let result = (|| {
            for d in self.all_dirs() {
                let child = d.join(name);
                if !self.fs.mkdir(&child)? {
                    return Err(CgroupError::NameInUse {
                        name: name.to_owned(),
                        path: child,
                    });
                }
                made.push(child);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for d in made.iter().rev() {
                let _ = self.fs.rmdir(d);
            }
            return Err(e);
        }
        Ok(V1Job {
            fs: self.fs.clone(),
            dirs: self
                .dirs
                .iter()
                .map(|(c, d)| (c.clone(), d.join(name)))
                .collect(),
            unified: self.unified.as_ref().map(|u| u.join(name)),
            leaf: None,
            weight: AtomicU64::new(100),
        })
    }

    fn remove(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for d in self.all_dirs() {
            if let Err(e) = fs::rmdir_recursive(&self.fs, &d) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// v2 weight (1–10000, default 100) to v1 shares (2–262144, default 1024).
pub fn shares(weight: u64) -> u64 {
    (weight * 1024 / 100).clamp(2, 262_144)
}

#[cfg(test)]
mod tests {
    use std::fs as stdfs;

    use super::*;

    fn parents(root: &Path) -> BTreeMap<String, PathBuf> {
        CONTROLLERS
            .iter()
            .map(|c| {
                let p = root.join(c).join("own/enforcer");
                stdfs::create_dir_all(&p).unwrap();
                (c.to_string(), p)
            })
            .collect()
    }

    #[test]
    fn set_cpus_confines_the_job_its_leaf_and_games_and_none_gives_the_base_cpus_back() {
        let d = tempfile::tempdir().unwrap();
        let parents = parents(d.path());
        let cg = CgFs::new(vec![d.path().to_owned()]);
        stdfs::write(parents["cpuset"].join("cpuset.cpus"), "0-3\n").unwrap();
        let job = V1Job::create(cg.clone(), &parents, None, "j1").unwrap();
        let dir = parents["cpuset"].join("j1");
        stdfs::create_dir(dir.join("game-1")).unwrap();
        let files = ["cpuset.cpus", "main/cpuset.cpus", "game-1/cpuset.cpus"];
        for f in files {
            stdfs::write(dir.join(f), "0-3\n").unwrap();
        }
        job.set_cpus(Some(&CpuList::new([2, 3]))).unwrap();
        for f in files {
            assert_eq!(stdfs::read_to_string(dir.join(f)).unwrap(), "2-3", "{f}");
        }
        job.set_cpus(None).unwrap();
        for f in files {
            assert_eq!(stdfs::read_to_string(dir.join(f)).unwrap(), "0-3", "{f}");
        }
    }

    #[test]
    fn without_a_cpuset_hierarchy_set_cpus_names_the_controller() {
        let d = tempfile::tempdir().unwrap();
        let mut parents = parents(d.path());
        parents.remove("cpuset");
        let job =
            V1Job::create(CgFs::new(vec![d.path().to_owned()]), &parents, None, "j1").unwrap();
        let e = job.set_cpus(Some(&CpuList::new([0]))).unwrap_err();
        assert!(e.to_string().contains("cpuset"), "{e}");
    }

    #[test]
    fn create_makes_a_dir_per_hierarchy_plus_unified_with_main_leaves() {
        let d = tempfile::tempdir().unwrap();
        let parents = parents(d.path());
        let unified = d.path().join("unified/enforcer");
        stdfs::create_dir_all(&unified).unwrap();
        let cg = CgFs::new(vec![d.path().to_owned()]);
        let job = V1Job::create(cg.clone(), &parents, Some(&unified), "j1").unwrap();
        for c in CONTROLLERS {
            assert!(
                d.path().join(c).join("own/enforcer/j1/main").is_dir(),
                "{c}"
            );
        }
        assert!(unified.join("j1/main").is_dir());
        assert_eq!(job.join_files().len(), CONTROLLERS.len() + 1);
        assert_eq!(job.v2_cgroup_id(), super::super::inode(&unified.join("j1")));
        assert_eq!(job.mode_name(), "hybrid");
        // The name is now taken in every hierarchy.
        let e = V1Job::create(cg, &parents, Some(&unified), "j1").unwrap_err();
        assert!(matches!(e, CgroupError::NameInUse { .. }), "{e}");
    }

    #[test]
    fn a_failed_create_leaves_no_directory_behind() {
        let d = tempfile::tempdir().unwrap();
        let parents = parents(d.path());
        // memory's parent is outside the owned roots: the create fails after
        // some hierarchies were made, and must undo them.
        let owned = vec![
            d.path().join("cpu"),
            d.path().join("cpuacct"),
            d.path().join("freezer"),
        ];
        let e = V1Job::create(CgFs::new(owned), &parents, None, "j2").unwrap_err();
        assert!(matches!(e, CgroupError::OutsideSubtree { .. }), "{e}");
        for c in CONTROLLERS {
            assert!(
                !d.path().join(c).join("own/enforcer/j2").exists(),
                "{c} left behind"
            );
        }
    }

    #[test]
    fn memory_limit_disables_swap_and_unlimited_raises_memsw_first() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("memory/j");
        stdfs::create_dir_all(&dir).unwrap();
        for f in ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"] {
            stdfs::write(dir.join(f), "").unwrap();
        }
        let dirs = BTreeMap::from([("memory".to_string(), dir.clone())]);
        let job = V1Job::open(
            CgFs::new(vec![d.path().to_owned()]),
            dirs,
            None,
            Some("main"),
        );
        job.set_memory_max(Some(ByteSize::mib(300))).unwrap();
        let r = |f: &str| stdfs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(r("memory.limit_in_bytes"), (300u64 << 20).to_string());
        assert_eq!(r("memory.memsw.limit_in_bytes"), (300u64 << 20).to_string());
        job.set_memory_max(None).unwrap();
        assert_eq!(r("memory.memsw.limit_in_bytes"), "-1");
        // A limit on a controller this host lacks names the controller.
        let e = job.set_pids_max(Some(5)).unwrap_err();
        assert!(e.to_string().contains("pids"), "{e}");
    }

    #[test]
    fn cpu_quota_weight_and_idle_use_cfs_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cpu/j");
        stdfs::create_dir_all(&dir).unwrap();
        for f in ["cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"] {
            stdfs::write(dir.join(f), "").unwrap();
        }
        let dirs = BTreeMap::from([("cpu".to_string(), dir.clone())]);
        let job = V1Job::open(
            CgFs::new(vec![d.path().to_owned()]),
            dirs,
            None,
            Some("main"),
        );
        job.set_cpu_quota(Some(0.5)).unwrap();
        let r = |f: &str| stdfs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(r("cpu.cfs_quota_us"), "50000");
        assert_eq!(r("cpu.cfs_period_us"), "100000");
        job.set_cpu_weight(1).unwrap();
        assert_eq!(r("cpu.shares"), "10");
        // No cpu.idle file: idle means the lowest shares.
        job.set_cpu_idle(true).unwrap();
        assert_eq!(r("cpu.shares"), "2");
        job.set_cpu_idle(false).unwrap();
        assert_eq!(r("cpu.shares"), "10");
    }

    #[test]
    fn stats_come_from_each_controller_file() {
        let d = tempfile::tempdir().unwrap();
        let mut dirs = BTreeMap::new();
        for c in ["cpu", "cpuacct", "memory", "pids"] {
            let p = d.path().join(c).join("j");
            stdfs::create_dir_all(&p).unwrap();
            dirs.insert(c.to_string(), p);
        }
        let w = |c: &str, f: &str, v: &str| stdfs::write(dirs[c].join(f), v).unwrap();
        w("cpuacct", "cpuacct.usage", "2000000000\n");
        w(
            "cpu",
            "cpu.stat",
            "nr_periods 10\nnr_throttled 2\nthrottled_time 5000000\n",
        );
        w("memory", "memory.max_usage_in_bytes", "1048576\n");
        w("memory", "memory.limit_in_bytes", "9223372036854771712\n");
        w(
            "memory",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        );
        stdfs::create_dir(dirs["memory"].join("main")).unwrap();
        w("memory", "main/memory.oom_control", "oom_kill 1\n");
        w("pids", "pids.max", "64\n");
        w("pids", "pids.events", "max 7\n");
        let job = V1Job::open(
            CgFs::new(vec![d.path().to_owned()]),
            dirs,
            None,
            Some("main"),
        );
        let s = job.stats();
        assert_eq!(s.cpu_usage, Some(Duration::from_secs(2)));
        assert_eq!(s.cpu_throttled, Some(Duration::from_millis(5)));
        assert_eq!(s.memory_peak, Some(1 << 20));
        assert_eq!(s.memory_limit, None, "the v1 'unlimited' value is no limit");
        assert_eq!(s.oom_kills, Some(1), "the main leaf's kills count");
        assert_eq!(s.pids_limit, Some(64));
        assert_eq!(s.pids_max_events, Some(7));
        assert_eq!(job.cpu_usage(), Duration::from_secs(2));
        assert_eq!(job.v2_cgroup_id(), None);
    }
}
