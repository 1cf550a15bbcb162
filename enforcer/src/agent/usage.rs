//! What `status` tells about cost: each running job's cgroup counters and
//! its shim's CPU time and memory, and the agent's own. The agent does not
//! own its jobs' cgroups (their shims do): it finds each where the shim's
//! job lock records it and reads it through a handle that can write
//! nothing ([`JobCgroup::observe`]).
//!
//! Readings are reused for [`FRESH`]: a client asking a thousand times a
//! second costs the node no more reads than one asking ten times. Each
//! carries the time it was taken, so that rates derived from two of them
//! stay exact.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    agent::{
        proto::{AgentCost, JobUsage},
        store,
    },
    cgroup::{JobCgroup, Stats},
    host::{Pid, ProcFs},
    slots::StateDir,
};

/// How long a reading is reused.
pub const FRESH: Duration = Duration::from_millis(100);

/// A shim's CPU time (seconds) and resident memory (bytes).
#[derive(Debug, Clone, Copy, Default)]
struct ProcessCost {
    cpu_s: f64,
    rss_bytes: u64,
}

struct JobReading {
    at: Instant,
    /// Found once, from the job's lock.
    cgroup: Option<JobCgroup>,
    usage: Option<JobUsage>,
    shim: Option<ProcessCost>,
}

/// The agent's latest readings, by job id.
#[derive(Default)]
pub struct Readings {
    proc: ProcFs,
    state_dirs: BTreeMap<PathBuf, StateDir>,
    jobs: BTreeMap<String, JobReading>,
    agent: Option<(Instant, ProcessCost)>,
}

impl Readings {
    /// The counters of running job `id` (its lock under `state_dir`) and
    /// the cost of its shim (`pid`, start time), fresh within [`FRESH`].
    pub fn job(
        &mut self,
        id: &str,
        state_dir: &Path,
        shim: Option<store::ShimInfo>,
    ) -> Option<JobUsage> {
        let now = Instant::now();
        if let Some(r) = self.jobs.get(id)
            && now.duration_since(r.at) < FRESH
        {
            return r.usage.clone();
        }
        let cgroup = match self.jobs.remove(id).and_then(|r| r.cgroup) {
            Some(c) => Some(c),
            None => self.locate(id, state_dir),
        };
        let usage = cgroup.as_ref().map(|c| JobUsage {
            read_unix_ms: store::now_ms(),
            ..usage_of(&c.stats())
        });
        let shim = shim.and_then(|s| process_cost(&self.proc, s.pid, Some(s.start_time)));
        self.jobs.insert(
            id.to_owned(),
            JobReading {
                at: now,
                cgroup,
                usage: usage.clone(),
                shim,
            },
        );
        usage
    }

    /// Where job `id`'s cgroups are, from its lock.
    fn locate(&mut self, id: &str, state_dir: &Path) -> Option<JobCgroup> {
        if !self.state_dirs.contains_key(state_dir) {
            let dir = StateDir::open(state_dir)
                .map_err(|error| tracing::debug!(%error, "status: no job locks to read"))
                .ok()?;
            self.state_dirs.insert(state_dir.to_owned(), dir);
        }
        let record = self.state_dirs.get(state_dir)?.job_record(id).ok()??;
        JobCgroup::observe(&record.cgroups)
    }

    /// Forgets the readings of jobs not in `running`.
    pub fn retain(&mut self, running: &[String]) {
        self.jobs.retain(|id, _| running.contains(id));
    }

    /// The agent's own cost, with the shims of `jobs` (read by
    /// [`Readings::job`]).
    pub fn agent(&mut self, jobs: &[&str]) -> AgentCost {
        let now = Instant::now();
        let me = Pid::this_process();
        let own = match self.agent {
            Some((at, c)) if now.duration_since(at) < FRESH => c,
            _ => {
                let c = process_cost(&self.proc, me.as_raw(), None).unwrap_or_default();
                self.agent = Some((now, c));
                c
            }
        };
        let shims: Vec<ProcessCost> = jobs
            .iter()
            .filter_map(|id| self.jobs.get(*id)?.shim)
            .collect();
        AgentCost {
            pid: me.as_u32(),
            cpu_s: own.cpu_s,
            rss_bytes: (own.rss_bytes > 0).then_some(own.rss_bytes),
            shims: shims.len() as u32,
            shims_cpu_s: shims.iter().map(|s| s.cpu_s).sum(),
            shims_rss_bytes: shims.iter().map(|s| s.rss_bytes).sum(),
        }
    }
}

/// The counters `status` shows, from a job cgroup's stats.
pub fn usage_of(s: &Stats) -> JobUsage {
    JobUsage {
        read_unix_ms: 0,
        memory_bytes: s.memory_current,
        memory_limit_bytes: s.memory_limit,
        cpu_s: s.cpu_usage.map(|d| d.as_secs_f64()),
        throttled_s: s.cpu_throttled.map(|d| d.as_secs_f64()),
        pids: s.pids_current,
    }
}

/// CPU time and resident memory of process `pid`; with `start_time`, only
/// if it is still the process that started then (not a reused pid).
fn process_cost(proc: &ProcFs, pid: i32, start_time: Option<u64>) -> Option<ProcessCost> {
    let pid = Pid::new(pid)?;
    let stat = proc.stat(pid).ok()?;
    if start_time.is_some_and(|t| t != stat.start_time) || stat.is_zombie() {
        return None;
    }
    Some(ProcessCost {
        cpu_s: stat.cpu_ticks as f64 * clock_tick(),
        rss_bytes: rss_bytes(proc, pid).unwrap_or(0),
    })
}

/// Resident memory of a process: the second field of `/proc/<pid>/statm`,
/// in pages.
fn rss_bytes(proc: &ProcFs, pid: Pid) -> Option<u64> {
    let text = std::fs::read_to_string(proc.pid_dir(pid).join("statm")).ok()?;
    Some(parse_statm_rss_pages(&text)? * page_size())
}

fn parse_statm_rss_pages(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Seconds per clock tick of `/proc/<pid>/stat`.
fn clock_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1.0 / if hz > 0 { hz as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_keeps_the_counters_a_kernel_has_and_leaves_the_rest_null() {
        let s = Stats {
            cpu_usage: Some(Duration::from_millis(1500)),
            memory_current: Some(4096),
            pids_current: Some(3),
            ..Stats::default()
        };
        let u = usage_of(&s);
        assert_eq!(u.cpu_s, Some(1.5));
        assert_eq!(u.memory_bytes, Some(4096));
        assert_eq!(u.memory_limit_bytes, None, "no limit");
        assert_eq!(u.throttled_s, None, "not on this kernel");
        assert_eq!(u.pids, Some(3));
    }

    #[test]
    fn statm_rss_is_its_second_field() {
        assert_eq!(parse_statm_rss_pages("1000 250 80 1 0 300 0\n"), Some(250));
        assert_eq!(parse_statm_rss_pages("1000"), None);
    }

    #[test]
    fn a_shim_is_counted_only_while_its_start_time_still_matches() {
        let d = tempfile::tempdir().unwrap();
        let proc = ProcFs::at(d.path());
        std::fs::create_dir_all(d.path().join("4242")).unwrap();
        // utime 200 and stime 100 ticks (fields 14, 15), start time 777
        // (field 22).
        std::fs::write(
            d.path().join("4242/stat"),
            "4242 (enforcer shim) S 1 4242 4242 0 -1 0 0 0 0 0 200 100 0 0 20 0 1 0 777 0 0\n",
        )
        .unwrap();
        std::fs::write(d.path().join("4242/statm"), "1000 10 0 0 0 0 0\n").unwrap();
        let cost = process_cost(&proc, 4242, Some(777)).expect("the shim");
        assert!((cost.cpu_s - 300.0 * clock_tick()).abs() < 1e-9);
        assert_eq!(cost.rss_bytes, 10 * page_size());
        assert!(
            process_cost(&proc, 4242, Some(778)).is_none(),
            "a reused pid"
        );
        assert!(process_cost(&proc, 4343, None).is_none(), "a gone one");
    }
}
