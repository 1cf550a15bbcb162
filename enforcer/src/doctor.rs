//! `enforcer doctor`: what this node offers the agent, checked for real (the
//! eBPF programs are loaded and attached, then detached), and what is missing
//! with how to fix it.

use std::{path::Path, time::Duration};

use serde::Serialize;

use crate::{
    cgroup::Layout,
    gpu::{self, GpuAvailability},
    privilege::Privileges,
    probe,
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel_release: String,
    #[serde(with = "either_error")]
    pub cgroup: Result<Layout, String>,
    #[serde(with = "either_error")]
    pub btf: Result<String, String>,
    #[serde(with = "either_error")]
    pub ebpf: Result<probe::SelfTest, String>,
    pub privileges: Privileges,
    /// `None` (JSON `null`) when no GPU can be used; `gpu_unavailable` says why.
    pub gpu: Option<GpuAvailability>,
    pub gpu_unavailable: Option<String>,
    /// Which case `gpu_unavailable` is: `no_library`, `driver_not_loaded`,
    /// `no_device`, `old_driver`, `no_permission`, `not_supported`,
    /// `foreign_pid_namespace` or `error`.
    pub gpu_unavailable_case: Option<&'static str>,
    /// Everything that stops the agent from doing its job, with the fix.
    pub problems: Vec<String>,
    pub ok: bool,
}

/// Runs every check. Never panics on a missing feature: each becomes a
/// problem in the report.
pub fn check() -> Report {
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let mut problems = Vec::new();

    let privileges = Privileges::current();
    problems.extend(privileges.missing());

    let cgroup = Layout::detect().map_err(|e| e.to_string());
    match &cgroup {
        Ok(layout) => {
            for c in layout.missing_controllers() {
                let why = layout.controllers[c].reason.clone().unwrap_or_default();
                problems.push(format!("cgroup controller {c} is not usable: {why}"));
            }
            if layout.unified_mount.is_none() {
                problems.push(
                    "no cgroup2 hierarchy is mounted: eBPF cannot recognise job tasks by cgroup id; \
                     mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)"
                        .to_owned(),
                );
            }
        }
        Err(e) => problems.push(format!("cgroups: {e}")),
    }

    let btf_path = Path::new("/sys/kernel/btf/vmlinux");
    let btf = match std::fs::metadata(btf_path) {
        // The steal meter reads these fields through the BTF offsets.
        Ok(m) => match probe::btf::TaskLayout::from_file(btf_path) {
            Ok(layout) if layout.clock.is_some() => {
                Ok(format!("{} ({} bytes)", btf_path.display(), m.len()))
            }
            Ok(_) => {
                problems.push(
                    "kernel BTF has no task_struct.se.cfs_rq -> rq -> clock (no CONFIG_FAIR_GROUP_SCHED): \
                     the steal meter cannot time events; jobs are still enforced"
                        .to_owned(),
                );
                Err("no run-queue clock path (CONFIG_FAIR_GROUP_SCHED)".to_owned())
            }
            Err(e) => {
                problems.push(format!(
                    "{}: {e}: the steal meter cannot load",
                    btf_path.display()
                ));
                Err(e.to_string())
            }
        },
        Err(e) => {
            problems.push(format!(
                "{} is missing ({e}): the kernel needs CONFIG_DEBUG_INFO_BTF=y for the probes",
                btf_path.display()
            ));
            Err(e.to_string())
        }
    };

    let ebpf = if privileges.can_load_bpf() {
        match probe::self_test(Duration::from_millis(200)) {
            Ok(t) if t.switches_seen > 0 => Ok(t),
            Ok(t) => {
                problems.push(format!(
                    "the sched_switch probe attached but counted no switch in {} ms",
                    t.attached_ms
                ));
                Ok(t)
            }
            Err(e) => {
                problems.push(format!("eBPF: {e}"));
                Err(e.to_string())
            }
        }
    } else {
        Err("not attempted: missing CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN".to_owned())
    };

    let (gpu, gpu_unavailable, gpu_unavailable_case) = match gpu::probe() {
        GpuAvailability::Unavailable { reason } => {
            (None, Some(reason.to_string()), Some(reason.case()))
        }
        available => match gpu::pid_namespace_check() {
            // NVML works, but its host PIDs cannot be attributed to jobs.
            Err(reason) => (
                Some(available),
                Some(reason.to_string()),
                Some(reason.case()),
            ),
            Ok(()) => (Some(available), None, None),
        },
    };

    let ok = problems.is_empty();
    Report {
        kernel_release,
        cgroup,
        btf,
        ebpf,
        privileges,
        gpu,
        gpu_unavailable,
        gpu_unavailable_case,
        problems,
        ok,
    }
}

/// Serialises a check's `Result` as its value, or as `{"error": "..."}`, so
/// that JSON readers see `report.ebpf.switches_seen` rather than `Ok` wrappers.
mod either_error {
    use serde::{Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Result<T, String>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Failed<'a> {
            error: &'a str,
        }
        match value {
            Ok(v) => v.serialize(s),
            Err(e) => Failed { error: e }.serialize(s),
        }
    }
}
