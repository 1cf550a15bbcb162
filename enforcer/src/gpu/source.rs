//! Where GPU readings come from: the [`GpuSource`] trait, and [`NvmlSource`],
//! its only production implementation (tests use
//! [`super::synthetic::SyntheticSource`]).

use nvml_wrapper::{Nvml, enums::device::UsedGpuMemory};
use serde::Serialize;

use super::{GpuDevice, Unavailable};

/// A failed reading: which call, on which device, and why (by case).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}{}: {reason}", device.map(|d| format!(" on GPU {d}")).unwrap_or_default())]
pub struct GpuError {
    pub call: &'static str,
    pub device: Option<u32>,
    pub reason: Unavailable,
}

/// One device's totals at one instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSample {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// Percent of the last sample period during which a kernel ran.
    pub gpu_util_pct: u32,
}

/// One process on one device: its GPU memory (from the running compute
/// processes) and the SM utilisation samples NVML took since the caller's
/// last timestamp. PIDs are as NVML reports them: in the initial (host) PID
/// namespace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessSample {
    pub device: u32,
    pub pid: u32,
    /// `None` when the driver does not account it (e.g. WDDM) or the process
    /// has utilisation samples but no longer holds a context.
    pub memory_used_bytes: Option<u64>,
    /// `(timestamp_us, sm_util_pct)`, NVML's CPU timestamps in µs.
    pub sm_samples: Vec<(u64, u32)>,
}

/// GPU telemetry. Implementations never panic; every failure is a
/// [`GpuError`] naming the call and its [`Unavailable`] case.
pub trait GpuSource: Send {
    fn devices(&mut self) -> Result<Vec<DeviceSample>, GpuError>;
    /// Every process on every device, with the SM samples newer than
    /// `since_us` (pass the largest timestamp seen so far, or 0).
    fn processes(&mut self, since_us: u64) -> Result<Vec<ProcessSample>, GpuError>;
}

/// NVML through `nvml-wrapper`: `libnvidia-ml.so.1` is `dlopen`ed at
/// [`NvmlSource::init`], so it is not a link-time dependency of the binary.
pub struct NvmlSource {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource").finish_non_exhaustive()
    }
}

const INIT: &str = "nvmlInit";
const COUNT: &str = "nvmlDeviceGetCount";
const BY_INDEX: &str = "nvmlDeviceGetHandleByIndex";
const NAME: &str = "nvmlDeviceGetName";
const MEMORY: &str = "nvmlDeviceGetMemoryInfo_v2";
const UTIL: &str = "nvmlDeviceGetUtilizationRates";
const PROCS: &str = "nvmlDeviceGetComputeRunningProcesses_v3";
const PROC_UTIL: &str = "nvmlDeviceGetProcessUtilization";

fn err(call: &'static str, device: Option<u32>, e: &nvml_wrapper::error::NvmlError) -> GpuError {
    GpuError {
        call,
        device,
        reason: Unavailable::from_nvml(call, e),
    }
}

impl NvmlSource {
    /// Loads NVML. On a node without the driver this is the
    /// [`Unavailable::NoLibrary`] case.
    pub fn init() -> Result<Self, GpuError> {
        Nvml::init()
            .map(|nvml| NvmlSource { nvml })
            .map_err(|e| err(INIT, None, &e))
    }

    /// Runs, once, every call the guard makes per tick, on every device:
    /// returns the driver version and the devices, or the first call that
    /// cannot work here (no device, old driver, no permission, unsupported).
    pub fn self_check(&mut self) -> Result<(String, Vec<GpuDevice>), GpuError> {
        let driver = self
            .nvml
            .sys_driver_version()
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let count = self.nvml.device_count().map_err(|e| err(COUNT, None, &e))?;
        if count == 0 {
            return Err(GpuError {
                call: COUNT,
                device: None,
                reason: Unavailable::NoDevice { driver },
            });
        }
        let devices = self.devices()?;
        self.processes(0)?;
        Ok((
            driver,
            devices
                .into_iter()
                .map(|d| GpuDevice {
                    index: d.index,
                    name: d.name,
                    memory_total_bytes: d.memory_total_bytes,
                })
                .collect(),
        ))
    }
}

impl GpuSource for NvmlSource {
    fn devices(&mut self) -> Result<Vec<DeviceSample>, GpuError> {
        let count = self.nvml.device_count().map_err(|e| err(COUNT, None, &e))?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let d = self
                .nvml
                .device_by_index(index)
                .map_err(|e| err(BY_INDEX, Some(index), &e))?;
            let name = d.name().map_err(|e| err(NAME, Some(index), &e))?;
            let mem = d.memory_info().map_err(|e| err(MEMORY, Some(index), &e))?;
            let util = d
                .utilization_rates()
                .map_err(|e| err(UTIL, Some(index), &e))?;
            out.push(DeviceSample {
                index,
                name,
                memory_total_bytes: mem.total,
                memory_used_bytes: mem.used,
                gpu_util_pct: util.gpu,
            });
        }
        Ok(out)
    }

    fn processes(&mut self, since_us: u64) -> Result<Vec<ProcessSample>, GpuError> {
        use nvml_wrapper::error::NvmlError;
        let count = self.nvml.device_count().map_err(|e| err(COUNT, None, &e))?;
        let mut out = Vec::new();
        for index in 0..count {
            let d = self
                .nvml
                .device_by_index(index)
                .map_err(|e| err(BY_INDEX, Some(index), &e))?;
            let procs = d
                .running_compute_processes()
                .map_err(|e| err(PROCS, Some(index), &e))?;
            // NVML answers NotFound when it has no sample newer than
            // `since_us`: an idle device, not an error.
            let samples = match d.process_utilization_stats(since_us) {
                Ok(s) => s,
                Err(NvmlError::NotFound) => Vec::new(),
                Err(e) => return Err(err(PROC_UTIL, Some(index), &e)),
            };
            let mut by_pid: Vec<ProcessSample> = procs
                .into_iter()
                .map(|p| ProcessSample {
                    device: index,
                    pid: p.pid,
                    memory_used_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    },
                    sm_samples: Vec::new(),
                })
                .collect();
            for s in samples {
                match by_pid.iter_mut().find(|p| p.pid == s.pid) {
                    Some(p) => p.sm_samples.push((s.timestamp, s.sm_util)),
                    None => by_pid.push(ProcessSample {
                        device: index,
                        pid: s.pid,
                        memory_used_bytes: None,
                        sm_samples: vec![(s.timestamp, s.sm_util)],
                    }),
                }
            }
            out.extend(by_pid);
        }
        Ok(out)
    }
}
