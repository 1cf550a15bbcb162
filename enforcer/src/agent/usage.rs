//! What `status` tells about cost: each running job's cgroup counters,
//! read through the cgroup layer, and the agent's own CPU time and memory
//! (its process and its jobs' shims), read from `/proc`.

use std::{collections::BTreeMap, path::PathBuf};

use crate::{
    agent::proto::{AgentCost, JobUsage},
    cgroup::{Stats, subtree::Subtree},
    host::{Pid, ProcFs},
};

/// The subtrees jobs live in, opened once per `cgroup_root` (a job started
/// with root's `--config` may name another one).
#[derive(Debug, Default)]
pub struct Subtrees(BTreeMap<Option<PathBuf>, Subtree>);

impl Subtrees {
    /// The counters of job `id` of the subtree at `cgroup_root`; `None`
    /// when the subtree cannot be opened or the job's cgroup is not there.
    pub fn job_usage(&mut self, cgroup_root: Option<&PathBuf>, id: &str) -> Option<JobUsage> {
        let key = cgroup_root.cloned();
        if !self.0.contains_key(&key) {
            match Subtree::open(key.as_deref()) {
                Ok(s) => {
                    self.0.insert(key.clone(), s);
                }
                Err(error) => {
                    tracing::debug!(%error, "status: the jobs' cgroup subtree cannot be opened");
                    return None;
                }
            }
        }
        let subtree = self.0.get(&key)?;
        if !subtree.job_location(id).ok()?.exists() {
            return None;
        }
        Some(usage_of(&subtree.open_job(id).ok()?.stats()))
    }
}

/// The counters `status` shows, from a job cgroup's stats.
pub fn usage_of(s: &Stats) -> JobUsage {
    JobUsage {
        memory_bytes: s.memory_current,
        memory_limit_bytes: s.memory_limit,
        cpu_s: s.cpu_usage.map(|d| d.as_secs_f64()),
        throttled_s: s.cpu_throttled.map(|d| d.as_secs_f64()),
        pids: s.pids_current,
    }
}

/// The agent's own cost: this process and the live shims `shims` (their
/// pids, checked against their start times so that a reused pid is not
/// counted).
pub fn agent_cost(proc: &ProcFs, shims: &[(i32, u64)]) -> AgentCost {
    let me = Pid::this_process();
    let tick = clock_tick();
    let mut cost = AgentCost {
        pid: me.as_u32(),
        cpu_s: proc
            .stat(me)
            .map_or(0.0, |s| s.cpu_ticks as f64 * tick),
        rss_bytes: rss_bytes(proc, me),
        ..AgentCost::default()
    };
    for &(pid, start_time) in shims {
        let Some(pid) = Pid::new(pid) else { continue };
        let Ok(stat) = proc.stat(pid) else { continue };
        if stat.start_time != start_time || stat.is_zombie() {
            continue;
        }
        cost.shims += 1;
        cost.shims_cpu_s += stat.cpu_ticks as f64 * tick;
        cost.shims_rss_bytes += rss_bytes(proc, pid).unwrap_or(0);
    }
    cost
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
    use std::time::Duration;

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
    fn the_agent_counts_only_shims_whose_start_time_still_matches() {
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
        let cost = agent_cost(&proc, &[(4242, 777), (4242, 778), (4343, 1)]);
        assert_eq!(cost.shims, 1, "a reused pid and a gone one are not shims");
        assert!((cost.shims_cpu_s - 300.0 * clock_tick()).abs() < 1e-9);
        assert_eq!(cost.shims_rss_bytes, 10 * page_size());
    }
}
