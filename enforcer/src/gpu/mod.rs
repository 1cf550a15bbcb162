//! GPU telemetry through NVML. A node without a GPU, without the NVML
//! library, or with a driver too old for a call is a normal case: every
//! reading is then `None` with the reason, never a panic.

use serde::Serialize;

/// What NVML says about this node.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum GpuAvailability {
    Available {
        driver: String,
        devices: Vec<GpuDevice>,
    },
    Unavailable {
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
}

/// Probes NVML once. Never panics: any failure becomes `Unavailable`.
pub fn probe() -> GpuAvailability {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            return GpuAvailability::Unavailable {
                reason: describe_init_error(&e),
            };
        }
    };
    let driver = nvml
        .sys_driver_version()
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let count = match nvml.device_count() {
        Ok(0) => {
            return GpuAvailability::Unavailable {
                reason: format!("NVML loaded (driver {driver}) but reports no GPU"),
            };
        }
        Ok(c) => c,
        Err(e) => {
            return GpuAvailability::Unavailable {
                reason: format!("NVML could not count devices: {e}"),
            };
        }
    };
    let devices = (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            Some(GpuDevice {
                index: i,
                name: d.name().unwrap_or_else(|e| format!("unknown ({e})")),
                memory_total_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
            })
        })
        .collect();
    GpuAvailability::Available { driver, devices }
}

fn describe_init_error(e: &nvml_wrapper::error::NvmlError) -> String {
    use nvml_wrapper::error::NvmlError;
    match e {
        NvmlError::LibloadingError(inner) => format!(
            "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver on this node ({inner})"
        ),
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_owned(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_owned(),
        NvmlError::FailedToLoadSymbol(sym) => {
            format!("the NVIDIA driver is too old: NVML lacks symbol {sym}")
        }
        other => format!("NVML failed to initialise: {other}"),
    }
}
