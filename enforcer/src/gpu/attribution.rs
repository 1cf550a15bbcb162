//! Which GPU processes belong to a job, and the job's per-device usage.
//!
//! NVML names processes by PID in the initial (host) PID namespace. A PID is
//! the job's when `/proc/<pid>/cgroup` places it in the job's cgroup or a
//! cgroup below it (games), in the hierarchy the job is tracked by
//! ([`crate::cgroup::membership::ProcCgroups::belongs`]): this also rejects a
//! PID that was reused by an unrelated process. If the agent runs
//! in another PID namespace (a container), the same numbers name other
//! processes or none; [`super::pid_namespace_check`] detects that and the
//! guard then reports per-job GPU figures as unavailable instead of guessing.

use std::collections::BTreeMap;

use serde::Serialize;

use super::source::{DeviceSample, ProcessSample};

/// The job's use of one device during one control tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TickDevice {
    pub index: u32,
    pub pids: Vec<u32>,
    pub memory_used_bytes: u64,
    /// Sum over the job's processes of each one's mean SM utilisation over
    /// the tick's new samples (processes share the SMs, so their shares add
    /// up); `None` when NVML took no new sample of any of them.
    pub sm_util_pct: Option<f64>,
}

/// Groups `processes` by device, keeping those `is_job` accepts.
pub fn job_tick(
    processes: &[ProcessSample],
    mut is_job: impl FnMut(u32) -> bool,
) -> BTreeMap<u32, TickDevice> {
    let mut out: BTreeMap<u32, TickDevice> = BTreeMap::new();
    for p in processes.iter().filter(|p| is_job(p.pid)) {
        let d = out.entry(p.device).or_insert_with(|| TickDevice {
            index: p.device,
            pids: Vec::new(),
            memory_used_bytes: 0,
            sm_util_pct: None,
        });
        if !d.pids.contains(&p.pid) {
            d.pids.push(p.pid);
        }
        d.memory_used_bytes += p.memory_used_bytes.unwrap_or(0);
        if !p.sm_samples.is_empty() {
            let sum: f64 = p.sm_samples.iter().map(|&(_, u)| f64::from(u)).sum();
            #[expect(clippy::cast_precision_loss, reason = "a handful of samples per tick")]
            let mean = sum / p.sm_samples.len() as f64;
            d.sm_util_pct = Some((d.sm_util_pct.unwrap_or(0.0) + mean).min(100.0));
        }
    }
    out
}

/// The job's use of one device over its life: the report's `gpu` entries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobDeviceUsage {
    pub index: u32,
    pub name: String,
    /// The peak, over the job's life, of the GPU memory its processes held.
    pub memory_used_bytes: u64,
    /// Mean over the ticks that had samples of the job on this device.
    pub sm_util_pct_mean: Option<f64>,
    pub sm_util_pct_max: Option<f64>,
}

/// Accumulates [`TickDevice`]s into [`JobDeviceUsage`]s.
#[derive(Debug, Clone, Default)]
pub struct JobUsage {
    devices: BTreeMap<u32, Acc>,
}

#[derive(Debug, Clone, Default)]
struct Acc {
    name: String,
    memory_peak: u64,
    util_sum: f64,
    util_ticks: u32,
    util_max: Option<f64>,
}

impl JobUsage {
    pub fn add(&mut self, tick: &BTreeMap<u32, TickDevice>, devices: &[DeviceSample]) {
        for (index, t) in tick {
            let acc = self.devices.entry(*index).or_default();
            if let Some(d) = devices.iter().find(|d| d.index == *index) {
                acc.name.clone_from(&d.name);
            }
            acc.memory_peak = acc.memory_peak.max(t.memory_used_bytes);
            if let Some(u) = t.sm_util_pct {
                acc.util_sum += u;
                acc.util_ticks += 1;
                acc.util_max = Some(acc.util_max.map_or(u, |m: f64| m.max(u)));
            }
        }
    }

    /// One entry per device the job used, by index.
    pub fn summary(&self) -> Vec<JobDeviceUsage> {
        self.devices
            .iter()
            .map(|(index, a)| JobDeviceUsage {
                index: *index,
                name: a.name.clone(),
                memory_used_bytes: a.memory_peak,
                sm_util_pct_mean: (a.util_ticks > 0).then(|| a.util_sum / f64::from(a.util_ticks)),
                sm_util_pct_max: a.util_max,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(device: u32, pid: u32, mem: u64, samples: &[u32]) -> ProcessSample {
        ProcessSample {
            device,
            pid,
            memory_used_bytes: Some(mem),
            sm_samples: samples
                .iter()
                .enumerate()
                .map(|(i, &u)| (i as u64 + 1, u))
                .collect(),
        }
    }

    #[test]
    fn job_usage_sums_processes_per_device_and_keeps_peak_mean_and_max() {
        let dev = |index: u32| DeviceSample {
            index,
            name: format!("GPU {index}"),
            memory_total_bytes: 80 << 30,
            memory_used_bytes: 0,
            gpu_util_pct: 0,
        };
        let devices = [dev(0), dev(1)];
        let mut usage = JobUsage::default();
        let job_pids = [10, 11];
        let tick1 = [
            proc(0, 10, 1 << 30, &[40, 60]),
            proc(0, 11, 2 << 30, &[20]),
            proc(0, 99, 8 << 30, &[90]),
            proc(1, 10, 3 << 30, &[]),
        ];
        let t = job_tick(&tick1, |pid| job_pids.contains(&pid));
        assert_eq!(t[&0].memory_used_bytes, 3 << 30);
        assert_eq!(t[&0].sm_util_pct, Some(70.0));
        assert_eq!(t[&1].sm_util_pct, None);
        usage.add(&t, &devices);
        let tick2 = [proc(0, 10, 1 << 30, &[30])];
        usage.add(&job_tick(&tick2, |pid| job_pids.contains(&pid)), &devices);
        let s = usage.summary();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "GPU 0");
        assert_eq!(s[0].memory_used_bytes, 3 << 30);
        assert_eq!(s[0].sm_util_pct_mean, Some(50.0));
        assert_eq!(s[0].sm_util_pct_max, Some(70.0));
        assert_eq!(s[1].memory_used_bytes, 3 << 30);
        assert_eq!(s[1].sm_util_pct_mean, None);
    }
}
