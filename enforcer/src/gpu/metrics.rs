//! Prometheus text exposition (format 0.0.4) of the GPU numbers: per device
//! totals, per job usage in the last tick and the cap's run fraction, or the
//! reason GPU telemetry is unavailable.

use std::fmt::Write as _;

use super::guard::GpuSnapshot;

/// Escapes a label value as the exposition format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Text exposition lines for one job's snapshot. Device totals are included
/// too; an exporter serving several jobs should print them once (they are
/// the same for every job), which [`device_lines`] and [`job_lines`] allow.
pub fn exposition(job: &str, snap: &GpuSnapshot) -> String {
    let mut out = device_lines(snap);
    out.push_str(&job_lines(job, snap));
    out
}

/// Node-level lines: availability and per-device totals.
pub fn device_lines(snap: &GpuSnapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP enforcer_gpu_available 1 when NVML telemetry works on this node, else 0 with the case as a label."
    );
    let _ = writeln!(o, "# TYPE enforcer_gpu_available gauge");
    match &snap.unavailable {
        None => {
            let _ = writeln!(o, "enforcer_gpu_available 1");
        }
        Some(u) => {
            let _ = writeln!(o, "enforcer_gpu_available{{case=\"{}\"}} 0", u.case());
        }
    }
    if snap.devices.is_empty() {
        return o;
    }
    let _ = writeln!(
        o,
        "# HELP enforcer_gpu_device_memory_used_bytes GPU memory in use on the device (all processes)."
    );
    let _ = writeln!(o, "# TYPE enforcer_gpu_device_memory_used_bytes gauge");
    for d in &snap.devices {
        let _ = writeln!(
            o,
            "enforcer_gpu_device_memory_used_bytes{{gpu=\"{}\",name=\"{}\"}} {}",
            d.index,
            label(&d.name),
            d.memory_used_bytes
        );
    }
    let _ = writeln!(
        o,
        "# HELP enforcer_gpu_device_memory_total_bytes GPU memory installed on the device."
    );
    let _ = writeln!(o, "# TYPE enforcer_gpu_device_memory_total_bytes gauge");
    for d in &snap.devices {
        let _ = writeln!(
            o,
            "enforcer_gpu_device_memory_total_bytes{{gpu=\"{}\",name=\"{}\"}} {}",
            d.index,
            label(&d.name),
            d.memory_total_bytes
        );
    }
    let _ = writeln!(
        o,
        "# HELP enforcer_gpu_device_utilization_percent Percent of the last sample period a kernel ran on the device."
    );
    let _ = writeln!(o, "# TYPE enforcer_gpu_device_utilization_percent gauge");
    for d in &snap.devices {
        let _ = writeln!(
            o,
            "enforcer_gpu_device_utilization_percent{{gpu=\"{}\",name=\"{}\"}} {}",
            d.index,
            label(&d.name),
            d.gpu_util_pct
        );
    }
    o
}

/// Job-level lines: the job's memory and SM utilisation per device in the
/// last tick, and the cap's run fraction.
pub fn job_lines(job: &str, snap: &GpuSnapshot) -> String {
    let mut o = String::new();
    let job = label(job);
    if snap.unavailable.is_some() {
        return o;
    }
    let _ = writeln!(
        o,
        "# HELP enforcer_gpu_job_memory_used_bytes GPU memory held by the job's processes on the device."
    );
    let _ = writeln!(o, "# TYPE enforcer_gpu_job_memory_used_bytes gauge");
    for t in snap.tick.values() {
        let _ = writeln!(
            o,
            "enforcer_gpu_job_memory_used_bytes{{job_id=\"{job}\",gpu=\"{}\"}} {}",
            t.index, t.memory_used_bytes
        );
    }
    let _ = writeln!(
        o,
        "# HELP enforcer_gpu_job_sm_utilization_percent SM utilisation of the job's processes on the device over the last tick."
    );
    let _ = writeln!(o, "# TYPE enforcer_gpu_job_sm_utilization_percent gauge");
    for t in snap.tick.values() {
        if let Some(u) = t.sm_util_pct {
            let _ = writeln!(
                o,
                "enforcer_gpu_job_sm_utilization_percent{{job_id=\"{job}\",gpu=\"{}\"}} {u}",
                t.index
            );
        }
    }
    if let Some(f) = snap.run_fraction {
        let _ = writeln!(
            o,
            "# HELP enforcer_gpu_job_run_fraction Fraction of each duty-cycle period the job may run (1 = uncapped)."
        );
        let _ = writeln!(o, "# TYPE enforcer_gpu_job_run_fraction gauge");
        let _ = writeln!(o, "enforcer_gpu_job_run_fraction{{job_id=\"{job}\"}} {f}");
    }
    o
}
