//! Which privileges this process holds, read from the effective capability
//! set in `/proc/self/status`, so that a missing one can be named.

use serde::Serialize;

/// Capability numbers from `linux/capability.h`.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_KILL: u32 = 5;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Clone, Serialize)]
pub struct Privileges {
    pub uid: u32,
    pub euid: u32,
    pub cap_sys_admin: bool,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_kill: bool,
}

impl Privileges {
    pub fn current() -> Self {
        let cap_eff = crate::host::ProcFs::new()
            .self_status()
            .ok()
            .and_then(|s| s.cap_eff)
            .unwrap_or(0);
        let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
        Privileges {
            uid: nix::unistd::getuid().as_raw(),
            euid: nix::unistd::geteuid().as_raw(),
            cap_sys_admin: has(CAP_SYS_ADMIN),
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_kill: has(CAP_KILL),
        }
    }

    /// Loading tracing programs needs CAP_BPF with CAP_PERFMON (5.8+), or
    /// CAP_SYS_ADMIN.
    pub fn can_load_bpf(&self) -> bool {
        self.cap_sys_admin || (self.cap_bpf && self.cap_perfmon)
    }

    /// What is missing for the agent's job, each with how to get it.
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.can_load_bpf() {
            out.push(
                "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load the eBPF probes: run as root \
                 or grant them (e.g. systemd AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_SYS_ADMIN)"
                    .to_owned(),
            );
        }
        if !self.cap_sys_admin && self.euid != 0 {
            out.push(
                "root or CAP_SYS_ADMIN to create and limit cgroups and move processes into them"
                    .to_owned(),
            );
        }
        if !self.cap_kill && self.euid != 0 {
            out.push("CAP_KILL to kill job processes of other users on deadline".to_owned());
        }
        out
    }
}
