//! The one reader of `/proc`. Its root is `/proc` in the agent and a
//! temporary tree in tests ([`ProcFs::at`]).

use std::{
    collections::{BTreeMap, VecDeque},
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
};

use super::{MountTable, Pid, ProcCgroup};

/// Per-process files are a few KiB; the bound keeps a read from growing
/// without limit whatever a process does to its own entries.
const SMALL_FILE_LIMIT: u64 = 64 * 1024;
/// A mount table on a host with many containers runs to megabytes.
const MOUNTINFO_LIMIT: u64 = 16 * 1024 * 1024;
/// `/proc/stat`'s CPU lines come first, about 80 bytes each: the bound holds
/// them on hosts of a few thousand CPUs, and the interrupt counts after
/// them, which can run to megabytes, are not needed.
const PROC_STAT_LIMIT: u64 = 512 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
pub struct ProcError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl ProcError {
    /// The process (or thread) is gone: it exited since it was named.
    pub fn is_gone(&self) -> bool {
        matches!(self.source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
    }
}

/// A procfs mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        ProcFs::new()
    }
}

impl ProcFs {
    /// The host's `/proc`.
    pub fn new() -> Self {
        ProcFs::at("/proc")
    }

    /// A procfs (or a fake one) at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        ProcFs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pid_dir(&self, pid: Pid) -> PathBuf {
        self.root.join(pid.to_string())
    }

    fn read(&self, path: PathBuf, limit: u64) -> Result<String, ProcError> {
        let mut bytes = Vec::new();
        match File::open(&path).and_then(|f| f.take(limit).read_to_end(&mut bytes)) {
            // A command name need not be UTF-8; nothing read here depends on
            // its bytes.
            Ok(_) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Err(source) => Err(ProcError { path, source }),
        }
    }

    fn parsed<T>(
        &self,
        path: PathBuf,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, ProcError> {
        let text = self.read(path.clone(), SMALL_FILE_LIMIT)?;
        parse(&text).ok_or_else(|| ProcError {
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, "unexpected format"),
        })
    }

    /// `/proc/<pid>/stat`.
    pub fn stat(&self, pid: Pid) -> Result<Stat, ProcError> {
        self.parsed(self.pid_dir(pid).join("stat"), Stat::parse)
    }

    /// `/proc/<pid>/status`.
    pub fn status(&self, pid: Pid) -> Result<Status, ProcError> {
        self.parsed(self.pid_dir(pid).join("status"), |t| Some(Status::parse(t)))
    }

    /// `/proc/self/status`: this process.
    pub fn self_status(&self) -> Result<Status, ProcError> {
        self.parsed(self.root.join("self/status"), |t| Some(Status::parse(t)))
    }

    /// `/proc/<pid>/cgroup`.
    pub fn cgroup(&self, pid: Pid) -> Result<ProcCgroup, ProcError> {
        self.parsed(self.pid_dir(pid).join("cgroup"), |t| {
            Some(ProcCgroup::parse(t))
        })
    }

    /// `/proc/self/cgroup`: this process.
    pub fn self_cgroup(&self) -> Result<ProcCgroup, ProcError> {
        self.parsed(self.root.join("self/cgroup"), |t| {
            Some(ProcCgroup::parse(t))
        })
    }

    /// `/proc/self/mountinfo`: the mount table this process sees.
    pub fn mountinfo(&self) -> Result<MountTable, ProcError> {
        let text = self.read(self.root.join("self/mountinfo"), MOUNTINFO_LIMIT)?;
        Ok(MountTable::parse(&text))
    }

    /// `/proc/self/ns/pid`, e.g. `pid:[4026531836]`.
    pub fn pid_namespace(&self) -> Result<String, ProcError> {
        let path = self.root.join("self/ns/pid");
        std::fs::read_link(&path)
            .map(|t| t.to_string_lossy().into_owned())
            .map_err(|source| ProcError { path, source })
    }

    /// How many file descriptors `pid` has open (`/proc/<pid>/fd`).
    pub fn fd_count(&self, pid: Pid) -> Result<u64, ProcError> {
        let path = self.pid_dir(pid).join("fd");
        std::fs::read_dir(&path)
            .map(|d| d.count() as u64)
            .map_err(|source| ProcError { path, source })
    }

    fn numbered(dir: &Path) -> Vec<Pid> {
        let mut v: Vec<Pid> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        v.sort_unstable();
        v
    }

    /// Every process now, in PID order.
    pub fn pids(&self) -> Vec<Pid> {
        Self::numbered(&self.root)
    }

    /// The thread ids of `pid`, in order; empty when it has exited.
    pub fn threads(&self, pid: Pid) -> Vec<Pid> {
        Self::numbered(&self.pid_dir(pid).join("task"))
    }

    /// Every live process below `pid` in the process tree, parents before
    /// their children and siblings in PID order, each with the stat it was
    /// seen with (its start time tells it from a later process with the
    /// same number).
    pub fn descendants(&self, pid: Pid) -> Vec<Stat> {
        let mut children_of: BTreeMap<Pid, Vec<Stat>> = BTreeMap::new();
        for p in self.pids() {
            if let Ok(stat) = self.stat(p)
                && let Some(ppid) = stat.ppid
            {
                children_of.entry(ppid).or_default().push(stat);
            }
        }
        let mut out = Vec::new();
        let mut queue = VecDeque::from([pid]);
        while let Some(p) = queue.pop_front() {
            for child in children_of.remove(&p).unwrap_or_default() {
                queue.push_back(child.pid);
                out.push(child);
            }
        }
        out
    }

    /// The direct children of `pid`, from each thread's `children` file (a
    /// read per thread, not a walk over every process).
    pub fn children(&self, pid: Pid) -> Vec<Pid> {
        self.threads(pid)
            .into_iter()
            .filter_map(|tid| {
                let path = self.pid_dir(pid).join(format!("task/{tid}/children"));
                self.read(path, SMALL_FILE_LIMIT).ok()
            })
            .flat_map(|text| {
                text.split_whitespace()
                    .filter_map(|c| c.parse().ok())
                    .collect::<Vec<Pid>>()
            })
            .collect()
    }

    /// `/proc/stat`'s CPU lines: how much time passed on each CPU and how
    /// much of it the hypervisor gave to someone else (steal).
    pub fn cpu_times(&self) -> Result<CpuTimes, ProcError> {
        let path = self.root.join("stat");
        let text = self.read(path.clone(), PROC_STAT_LIMIT)?;
        CpuTimes::parse(&text).ok_or_else(|| ProcError {
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, "no cpu line"),
        })
    }

    /// Total run-queue wait of the threads of `pid` (the second field of
    /// each `/proc/<pid>/task/<tid>/schedstat`), ns.
    pub fn run_delay_ns(&self, pid: Pid) -> Option<u64> {
        let task = self.pid_dir(pid).join("task");
        std::fs::read_dir(&task).ok()?;
        Some(
            self.threads(pid)
                .into_iter()
                .filter_map(|t| {
                    let text = self
                        .read(task.join(t.to_string()).join("schedstat"), SMALL_FILE_LIMIT)
                        .ok()?;
                    text.split_whitespace().nth(1)?.parse::<u64>().ok()
                })
                .sum(),
        )
    }
}

/// `PF_KTHREAD` from `linux/sched.h`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The fields of `/proc/<pid>/stat` the agent uses (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: Pid,
    pub comm: String,
    pub state: char,
    /// `None` for init and kthreadd, whose parent field is 0.
    pub ppid: Option<Pid>,
    pub flags: u64,
    /// Field 22: clock ticks after boot when the process started.
    pub start_time: u64,
    /// Fields 14 and 15: user plus system CPU time of all its threads, in
    /// clock ticks.
    pub cpu_ticks: u64,
}

impl Stat {
    /// The command name is in parentheses and may itself hold spaces and
    /// parentheses, so the fields after it start after the last `)`.
    pub fn parse(text: &str) -> Option<Stat> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let pid = text[..open].trim().parse().ok()?;
        let comm = text.get(open + 1..close)?.to_owned();
        // Field 3 (state) onwards.
        let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
        Some(Stat {
            pid,
            comm,
            state: f.first()?.chars().next()?,
            ppid: Pid::new(f.get(1)?.parse().ok()?),
            flags: f.get(9 - 3)?.parse().ok()?,
            start_time: f.get(22 - 3)?.parse().ok()?,
            cpu_ticks: f.get(14 - 3)?.parse::<u64>().ok()? + f.get(15 - 3)?.parse::<u64>().ok()?,
        })
    }

    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// Exited and not yet reaped (or being reaped).
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Clock ticks of one CPU, or of all of them, from `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// Every state (user, nice, system, idle, iowait, irq, softirq, steal):
    /// the time that passed on the CPU. Guest time is already inside user
    /// and nice, so it is not added again.
    pub total: u64,
    /// The time this virtual CPU wanted to run while the hypervisor ran
    /// something else. Always 0 on bare metal.
    pub steal: u64,
}

impl CpuTicks {
    /// The share of the time from `earlier` to `self` that the hypervisor
    /// stole; `None` when no time passed.
    pub fn steal_fraction_since(&self, earlier: &CpuTicks) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total).filter(|t| *t > 0)?;
        let steal = self.steal.saturating_sub(earlier.steal).min(total);
        Some(steal as f64 / total as f64)
    }
}

/// The CPU lines of `/proc/stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// The `cpu` line: every CPU summed.
    pub all: CpuTicks,
    /// The `cpuN` lines, by CPU number (offline CPUs have none).
    pub per_cpu: BTreeMap<u32, CpuTicks>,
}

impl CpuTimes {
    /// Needs the `cpu` line with its eight states; a `cpuN` line cut short
    /// (the read's bound) is left out.
    pub fn parse(text: &str) -> Option<CpuTimes> {
        fn ticks(fields: &[&str]) -> Option<CpuTicks> {
            let v: Vec<u64> = fields
                .iter()
                .take(8)
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            (v.len() == 8).then(|| CpuTicks {
                total: v.iter().sum(),
                steal: v[7],
            })
        }
        let mut all = None;
        let mut per_cpu = BTreeMap::new();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let Some(name) = f.next().and_then(|n| n.strip_prefix("cpu")) else {
                continue;
            };
            let rest: Vec<&str> = f.collect();
            if name.is_empty() {
                all = ticks(&rest);
            } else if let (Ok(n), Some(t)) = (name.parse::<u32>(), ticks(&rest)) {
                per_cpu.insert(n, t);
            }
        }
        Some(CpuTimes { all: all?, per_cpu })
    }
}

/// The fields of `/proc/<pid>/status` the agent uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub tgid: Option<Pid>,
    /// The real user and group ids (the first of real, effective, saved and
    /// filesystem).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The effective capability set.
    pub cap_eff: Option<u64>,
    /// Resident memory (`VmRSS`), bytes; `None` for kernel threads.
    pub rss_bytes: Option<u64>,
}

impl Status {
    pub fn parse(text: &str) -> Status {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .map(str::trim)
        };
        let first = |key: &str| field(key)?.split_whitespace().next()?.parse().ok();
        Status {
            tgid: field("Tgid").and_then(|v| v.parse().ok()),
            uid: first("Uid"),
            gid: first("Gid"),
            cap_eff: field("CapEff").and_then(|v| u64::from_str_radix(v, 16).ok()),
            rss_bytes: field("VmRSS")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map(|kib| kib.saturating_mul(1024)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;

    use super::*;
    use crate::fixtures::fake_process;

    fn pid(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    #[test]
    fn stat_cpu_time_is_user_plus_system_ticks_and_children_come_from_every_thread() {
        let line = "42 (a (b) c) R 1 42 42 0 -1 4194560 10 0 0 0 7 5 0 0 20 0 3 0 1234 0 0\n";
        let stat = Stat::parse(line).expect("a stat line");
        assert_eq!(stat.cpu_ticks, 12);
        assert_eq!(stat.start_time, 1234);
        let d = tempfile::tempdir().unwrap();
        for (tid, children) in [(42, "43 44 "), (45, "46")] {
            let task = d.path().join(format!("42/task/{tid}"));
            fs::create_dir_all(&task).unwrap();
            fs::write(task.join("children"), children).unwrap();
        }
        let kids: Vec<i32> = ProcFs::at(d.path())
            .children(pid(42))
            .into_iter()
            .map(i32::from)
            .collect();
        assert_eq!(kids, vec![43, 44, 46]);
    }

    #[test]
    fn stat_of_names_with_parentheses_and_spaces_zombies_and_kernel_threads() {
        let d = tempfile::tempdir().unwrap();
        let proc = ProcFs::at(d.path());
        fake_process(d.path(), 42, "a) (b", 'S', 1, 0, 987_654, 1500);
        fake_process(d.path(), 43, "zombie", 'Z', 42, 0, 9, 0);
        fake_process(d.path(), 2, "kthreadd", 'S', 0, PF_KTHREAD, 1, 0);
        let s = proc.stat(pid(42)).unwrap();
        assert_eq!(
            (s.comm.as_str(), s.state, s.ppid, s.start_time),
            ("a) (b", 'S', Some(pid(1)), 987_654)
        );
        assert!(!s.is_zombie() && !s.is_kernel_thread());
        assert!(proc.stat(pid(43)).unwrap().is_zombie());
        let k = proc.stat(pid(2)).unwrap();
        assert!(k.is_kernel_thread());
        assert_eq!(k.ppid, None);
        let st = proc.status(pid(42)).unwrap();
        assert_eq!(
            (st.uid, st.gid, st.tgid),
            (Some(1500), Some(1500), Some(pid(42)))
        );
        assert_eq!(st.cap_eff, Some(0x1ff_ffff_ffff));
        let gone = proc.stat(pid(77)).unwrap_err();
        assert!(gone.is_gone(), "{gone}");
        assert!(gone.to_string().contains("77/stat"), "{gone}");
    }

    #[test]
    fn truncated_stat_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("5")).unwrap();
        fs::write(d.path().join("5/stat"), "5 (x) S 1").unwrap();
        let e = ProcFs::at(d.path()).stat(pid(5)).unwrap_err();
        assert!(!e.is_gone());
        assert!(e.to_string().contains("5/stat"), "{e}");
    }

    #[test]
    fn cpu_times_sum_the_eight_states_and_take_steal_from_the_eighth() {
        let text = "cpu  100 5 20 800 10 1 2 62 40 0\n\
                    cpu0 50 5 10 400 5 1 1 30 20 0\n\
                    cpu1 50 0 10 400 5 0 1 32 20 0\n\
                    cpu7 1 2 3\n\
                    intr 12345 0 1\n\
                    ctxt 999\n";
        let t = CpuTimes::parse(text).unwrap();
        // Guest (40) is inside user already: not counted twice.
        assert_eq!(
            t.all,
            CpuTicks {
                total: 1000,
                steal: 62
            }
        );
        assert_eq!(
            t.per_cpu[&1],
            CpuTicks {
                total: 498,
                steal: 32
            }
        );
        // A line cut short is left out, not read as zeros.
        assert_eq!(t.per_cpu.len(), 2);
        assert_eq!(CpuTimes::parse("intr 1 2\n"), None);
    }

    #[test]
    fn the_steal_fraction_is_over_the_time_between_two_reads() {
        let before = CpuTicks {
            total: 1000,
            steal: 62,
        };
        let after = CpuTicks {
            total: 1200,
            steal: 72,
        };
        assert_eq!(after.steal_fraction_since(&before), Some(0.05));
        assert_eq!(before.steal_fraction_since(&before), None);
        assert_eq!(before.steal_fraction_since(&after), None);
    }

    #[test]
    fn the_real_proc_stat_has_every_online_cpu() {
        let t = ProcFs::new().cpu_times().unwrap();
        assert!(t.all.total > 0);
        assert!(!t.per_cpu.is_empty());
        assert!(t.all.steal <= t.all.total);
    }

    #[test]
    fn the_real_proc_shows_this_process() {
        let proc = ProcFs::new();
        let me = Pid::this_process();
        let s = proc.stat(me).unwrap();
        assert!(s.start_time > 0);
        assert!(proc.threads(me).contains(&me));
        assert_eq!(proc.self_status().unwrap().tgid, Some(me));
        assert!(proc.mountinfo().unwrap().mounts().len() > 1);
    }

    #[test]
    fn descendants_are_listed_parents_first_and_threads_in_order() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fake_process(r, 100, "shell", 'S', 1, 0, 100, 0);
        fake_process(r, 300, "eval (x)", 'R', 100, 0, 300, 0);
        fake_process(r, 200, "enforcer", 'S', 100, 0, 200, 0);
        fake_process(r, 250, "grandchild", 'S', 300, 0, 250, 0);
        fake_process(r, 400, "other", 'S', 1, 0, 400, 0);
        fs::create_dir_all(r.join("300/task/301")).unwrap();
        fs::create_dir_all(r.join("not-a-pid")).unwrap();
        let proc = ProcFs::at(r);
        let found: Vec<(i32, u64)> = proc
            .descendants(pid(100))
            .iter()
            .map(|s| (s.pid.as_raw(), s.start_time))
            .collect();
        assert_eq!(found, [(200, 200), (300, 300), (250, 250)]);
        assert_eq!(proc.threads(pid(300)), [pid(300), pid(301)]);
        assert_eq!(proc.threads(pid(999)), []);
        assert_eq!(proc.pids().len(), 5);
    }

    #[test]
    fn cgroup_and_mountinfo_are_read_from_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("self")).unwrap();
        fs::create_dir_all(r.join("7")).unwrap();
        fs::write(r.join("7/cgroup"), "0::/\n").unwrap();
        fs::write(r.join("self/cgroup"), "3:cpu:/a\n0::/b\n").unwrap();
        fs::write(r.join("self/mountinfo"), crate::mountinfo::tests::HYBRID).unwrap();
        let proc = ProcFs::at(r);
        assert_eq!(proc.cgroup(pid(7)).unwrap().unified(), Some("/"));
        assert_eq!(proc.self_cgroup().unwrap().v1("cpu"), Some("/a"));
        assert!(proc.mountinfo().unwrap().cgroup2().is_some());
    }

    #[test]
    fn run_delay_sums_the_threads() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for (t, wait) in [(10, 5), (11, 7)] {
            fs::create_dir_all(r.join(format!("10/task/{t}"))).unwrap();
            fs::write(
                r.join(format!("10/task/{t}/schedstat")),
                format!("1 {wait} 3\n"),
            )
            .unwrap();
        }
        let proc = ProcFs::at(r);
        assert_eq!(proc.run_delay_ns(pid(10)), Some(12));
        assert_eq!(proc.run_delay_ns(pid(11)), None);
    }
}
