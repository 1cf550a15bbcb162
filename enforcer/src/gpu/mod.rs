//! GPU guard: NVML telemetry per job, a utilisation cap enforced by
//! duty-cycling the job's freezer, and a GPU memory limit.
//!
//! A node without a GPU, without the NVML library, with a driver too old for
//! a call, or without permission is a normal case: every reading is then
//! `None` with the reason ([`Unavailable`]), never a panic.
//!
//! - [`source`]: the [`GpuSource`] trait (devices, per-process memory and SM
//!   samples) and its one production implementation over NVML;
//! - [`synthetic`]: a scripted source for tests and for replaying recordings;
//! - [`attribution`]: which NVML PIDs belong to a job (by cgroup membership)
//!   and the per-device aggregate that goes into the job's report;
//! - [`cap`]: the utilisation-cap controller and the GPU memory guard, pure
//!   state machines;
//! - [`duty`]: the generic freezer duty-cycle driver (not GPU specific: it
//!   runs any cgroup for a fraction of each period);
//! - [`guard`]: one job's GPU guard per control tick, tying the above together;
//! - [`monitor`]: the guard as a job supervisor monitor (`enforcer run`);
//! - [`node`]: every running job's GPU use, read by the agent for its
//!   metrics;
//! - [`metrics`]: Prometheus text exposition of the numbers.

pub mod attribution;
pub mod cap;
pub mod duty;
pub mod guard;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod source;
pub mod synthetic;

use serde::Serialize;

pub use source::{DeviceSample, GpuError, GpuSource, NvmlSource, ProcessSample};

/// Why GPU telemetry cannot be used, by case: doctor and reports name the
/// case so an operator knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "case", rename_all = "snake_case")]
pub enum Unavailable {
    /// `libnvidia-ml.so.1` cannot be loaded: no NVIDIA driver installed.
    #[error("NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver on this node ({detail})")]
    NoLibrary { detail: String },
    /// The library is there but the kernel module is not loaded.
    #[error("the NVIDIA kernel driver is not loaded")]
    DriverNotLoaded,
    /// NVML works and sees no device.
    #[error("NVML loaded (driver {driver}) but reports no GPU")]
    NoDevice { driver: String },
    /// The installed driver's NVML lacks a function the guard calls.
    #[error("the NVIDIA driver is too old: NVML lacks {symbol}")]
    OldDriver { symbol: String },
    /// The driver refused the call to this user.
    #[error("no permission for NVML {call} (run as root or fix /dev/nvidia* permissions)")]
    NoPermission { call: String },
    /// The device does not support the call (e.g. per-process utilisation
    /// on some consumer or MIG-partitioned GPUs).
    #[error("the GPU does not support NVML {call}")]
    NotSupported { call: String },
    /// NVML reports host PIDs; from inside another PID namespace they name
    /// different processes (or none), so they cannot be attributed to jobs.
    #[error(
        "the agent runs in a non-initial PID namespace ({namespace}): NVML reports host PIDs, \
         which cannot be mapped to job processes from here"
    )]
    ForeignPidNamespace { namespace: String },
    /// Anything else NVML said.
    #[error("NVML {call} failed: {detail}")]
    Other { call: String, detail: String },
}

impl Unavailable {
    /// The short case name (`no_library`, `old_driver`, ...).
    pub fn case(&self) -> &'static str {
        match self {
            Unavailable::NoLibrary { .. } => "no_library",
            Unavailable::DriverNotLoaded => "driver_not_loaded",
            Unavailable::NoDevice { .. } => "no_device",
            Unavailable::OldDriver { .. } => "old_driver",
            Unavailable::NoPermission { .. } => "no_permission",
            Unavailable::NotSupported { .. } => "not_supported",
            Unavailable::ForeignPidNamespace { .. } => "foreign_pid_namespace",
            Unavailable::Other { .. } => "error",
        }
    }

    /// Classifies an NVML error returned by `call`.
    pub fn from_nvml(call: &str, e: &nvml_wrapper::error::NvmlError) -> Self {
        use nvml_wrapper::error::NvmlError;
        match e {
            NvmlError::LibloadingError(inner) => Unavailable::NoLibrary {
                detail: inner.to_string(),
            },
            NvmlError::DriverNotLoaded => Unavailable::DriverNotLoaded,
            NvmlError::NoPermission => Unavailable::NoPermission {
                call: call.to_owned(),
            },
            NvmlError::FailedToLoadSymbol(sym) => Unavailable::OldDriver {
                symbol: format!("{call} ({sym})"),
            },
            NvmlError::FunctionNotFound => Unavailable::OldDriver {
                symbol: call.to_owned(),
            },
            NvmlError::NotSupported => Unavailable::NotSupported {
                call: call.to_owned(),
            },
            other => Unavailable::Other {
                call: call.to_owned(),
                detail: other.to_string(),
            },
        }
    }
}

/// What NVML says about this node.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum GpuAvailability {
    Available {
        driver: String,
        devices: Vec<GpuDevice>,
    },
    Unavailable {
        #[serde(flatten)]
        reason: Unavailable,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
}

/// Probes NVML once, including every call the guard makes per tick on each
/// device, so that a driver too old for one of them or a permission problem
/// is found here rather than mid-job. Never panics: any failure becomes
/// `Unavailable` with its case.
pub fn probe() -> GpuAvailability {
    availability(NvmlSource::init().and_then(|mut src| src.self_check()))
}

/// The verdict on what loading NVML and its self-check gave.
fn availability(checked: Result<(String, Vec<GpuDevice>), GpuError>) -> GpuAvailability {
    match checked {
        Ok((driver, devices)) => GpuAvailability::Available { driver, devices },
        Err(e) => GpuAvailability::Unavailable { reason: e.reason },
    }
}

/// Whether this process sees host PIDs, which is what NVML reports: true in
/// the initial PID namespace, whose `/proc/self/ns/pid` inode is the kernel's
/// fixed `PROC_PID_INIT_INO`.
pub fn pid_namespace_check() -> Result<(), Unavailable> {
    /// `PROC_PID_INIT_INO` in include/linux/proc_ns.h.
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    match crate::host::ProcFs::new().pid_namespace() {
        Ok(text) => {
            if text == format!("pid:[{PROC_PID_INIT_INO}]") {
                Ok(())
            } else {
                Err(Unavailable::ForeignPidNamespace { namespace: text })
            }
        }
        // Without /proc/self/ns (very old kernels) there is no telling; the
        // cgroup check in attribution still refuses PIDs of other jobs.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_that_cannot_load_becomes_the_no_library_reason_not_a_panic() {
        use nvml_wrapper::error::NvmlError;
        // What `Nvml::init` returns when dlopen finds no libnvidia-ml.so.1.
        let no_library = NvmlError::LibloadingError(libloading::Error::DlOpenUnknown);
        let verdict = availability(Err(GpuError {
            call: "nvmlInit",
            device: None,
            reason: Unavailable::from_nvml("nvmlInit", &no_library),
        }));
        let GpuAvailability::Unavailable { reason } = verdict else {
            panic!("available without a library: {verdict:?}");
        };
        assert_eq!(reason.case(), "no_library", "{reason}");
        assert!(reason.to_string().contains("libnvidia-ml.so.1"));
        let json = serde_json::to_value(GpuAvailability::Unavailable { reason }).unwrap();
        assert_eq!(json["status"], "unavailable");
        assert_eq!(json["case"], "no_library");
    }

    #[test]
    fn nvml_errors_are_classified_by_case() {
        use nvml_wrapper::error::NvmlError;
        let c = |e: NvmlError| Unavailable::from_nvml("nvmlDeviceGetProcessUtilization", &e);
        assert_eq!(
            c(NvmlError::FailedToLoadSymbol("undefined symbol".into())).case(),
            "old_driver"
        );
        assert_eq!(c(NvmlError::NoPermission).case(), "no_permission");
        assert_eq!(c(NvmlError::DriverNotLoaded).case(), "driver_not_loaded");
        assert_eq!(c(NvmlError::NotSupported).case(), "not_supported");
        assert_eq!(c(NvmlError::GpuLost).case(), "error");
        let old = c(NvmlError::FailedToLoadSymbol("x".into()));
        assert!(old.to_string().contains("nvmlDeviceGetProcessUtilization"));
    }
}
