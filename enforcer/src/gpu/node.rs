//! The node's GPU telemetry as the agent's metrics endpoint reads it: one
//! NVML source for the whole node, whose processes are attributed to each
//! running job by cgroup, as the job's own guard does. It only reads: the
//! caps and memory limits stay with each job's guard.

use std::collections::BTreeMap;

use crate::cgroup::membership::{CgroupMembership, ProcCgroups};

use super::{
    Unavailable,
    attribution::{TickDevice, job_tick},
    source::{GpuSource, NvmlSource},
};

/// Per-job GPU use, read on demand.
pub struct NodeGpu {
    source: Result<Box<dyn GpuSource>, Unavailable>,
    procs: ProcCgroups,
    /// NVML's timestamp of the newest utilisation sample seen, so that each
    /// read averages only what NVML sampled since the previous one.
    last_ts: u64,
}

impl std::fmt::Debug for NodeGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeGpu")
            .field("unavailable", &self.source.as_ref().err())
            .field("last_ts", &self.last_ts)
            .finish_non_exhaustive()
    }
}

impl NodeGpu {
    /// NVML on the real `/proc`: available only when it loads, sees a GPU
    /// and answers every call a read makes, and when NVML's host PIDs are
    /// this process's.
    pub fn open() -> Self {
        let source = super::pid_namespace_check().and_then(|()| {
            let mut nvml = NvmlSource::init().map_err(|e| e.reason)?;
            nvml.self_check().map_err(|e| e.reason)?;
            Ok(Box::new(nvml) as Box<dyn GpuSource>)
        });
        match &source {
            Ok(_) => tracing::info!("metrics: per-job GPU telemetry from NVML"),
            Err(reason) => {
                tracing::info!(case = reason.case(), %reason, "metrics: no per-job GPU telemetry");
            }
        }
        Self::new(source, ProcCgroups::default())
    }

    /// Over any source (tests use a synthetic one and a fake `/proc`).
    pub fn new(source: Result<Box<dyn GpuSource>, Unavailable>, procs: ProcCgroups) -> Self {
        NodeGpu {
            source,
            procs,
            last_ts: 0,
        }
    }

    pub fn is_available(&self) -> bool {
        self.source.is_ok()
    }

    /// The membership a job's cgroup directory stands for, read through
    /// this telemetry's own `/proc`; `None` when it is in no mounted
    /// hierarchy (the job is not attributed).
    pub fn membership_of_dir(&self, dir: &std::path::Path) -> Option<CgroupMembership> {
        self.procs.membership_of_dir(dir).ok()
    }

    /// Each job's use of each device it is on (a job on no GPU has no
    /// entry). A read that fails leaves the telemetry off for good, with
    /// one warning: a driver that failed once is not asked every scrape.
    pub fn read(
        &mut self,
        jobs: &[(String, CgroupMembership)],
    ) -> BTreeMap<String, BTreeMap<u32, TickDevice>> {
        let Ok(source) = self.source.as_mut() else {
            return BTreeMap::new();
        };
        let processes = match source.processes(self.last_ts) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "GPU telemetry failed: the metrics show no GPU from now on");
                self.source = Err(e.reason);
                return BTreeMap::new();
            }
        };
        for p in &processes {
            if let Some(&(ts, _)) = p.sm_samples.iter().max_by_key(|s| s.0) {
                self.last_ts = self.last_ts.max(ts);
            }
        }
        let procs = &self.procs;
        jobs.iter()
            .filter_map(|(id, membership)| {
                let tick = job_tick(&processes, |pid| {
                    procs.belongs(pid, membership).unwrap_or(false)
                });
                (!tick.is_empty()).then(|| (id.clone(), tick))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::membership::{Hierarchy, fake_proc};
    use crate::gpu::{
        source::ProcessSample,
        synthetic::{Frame, SyntheticSource},
    };

    fn process(device: u32, pid: u32, mem: u64, samples: &[(u64, u32)]) -> ProcessSample {
        ProcessSample {
            device,
            pid,
            memory_used_bytes: Some(mem),
            sm_samples: samples.to_vec(),
        }
    }

    #[test]
    fn each_jobs_processes_are_its_own_and_utilisation_is_only_what_is_new() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(
            dir.path(),
            &[
                (10, "0::/agent/job-1/main\n"),
                (11, "0::/agent/job-1/game-1\n"),
                (20, "0::/agent/job-10/main\n"),
                (30, "0::/elsewhere\n"),
            ],
        );
        let frame = Frame {
            devices: Ok(Vec::new()),
            processes: Ok(vec![
                process(0, 10, 1 << 30, &[(5, 40)]),
                process(0, 11, 1 << 20, &[(6, 20)]),
                process(1, 20, 2 << 30, &[(7, 90)]),
                process(1, 30, 4 << 30, &[(8, 100)]),
            ]),
        };
        let source = SyntheticSource::new([frame.clone(), frame]);
        let mut gpu = NodeGpu::new(Ok(Box::new(source)), ProcCgroups::new(dir.path()));
        assert!(gpu.is_available());
        let member = |path: &str| CgroupMembership {
            hierarchy: Hierarchy::Unified,
            path: path.to_owned(),
        };
        let jobs = vec![
            ("job-1".to_owned(), member("/agent/job-1")),
            ("job-10".to_owned(), member("/agent/job-10")),
            ("idle".to_owned(), member("/agent/idle")),
        ];
        let read = gpu.read(&jobs);
        let one = &read["job-1"][&0];
        assert_eq!(one.memory_used_bytes, (1 << 30) + (1 << 20));
        assert_eq!(one.sm_util_pct, Some(60.0));
        assert_eq!(read["job-10"].keys().collect::<Vec<_>>(), vec![&1]);
        assert_eq!(read["job-10"][&1].memory_used_bytes, 2 << 30);
        assert!(!read.contains_key("idle"), "{read:?}");
        // The same samples again are not new: memory stays, utilisation is
        // unknown rather than repeated.
        let again = gpu.read(&jobs);
        assert_eq!(again["job-1"][&0].sm_util_pct, None);
        assert_eq!(again["job-1"][&0].memory_used_bytes, (1 << 30) + (1 << 20));
    }

    #[test]
    fn a_node_without_nvml_reads_nothing() {
        let mut gpu = NodeGpu::new(Err(Unavailable::DriverNotLoaded), ProcCgroups::default());
        assert!(!gpu.is_available());
        let jobs = vec![(
            "job-1".to_owned(),
            CgroupMembership {
                hierarchy: Hierarchy::Unified,
                path: "/".to_owned(),
            },
        )];
        assert!(gpu.read(&jobs).is_empty());
    }
}
