//! Empty programs on `sched_switch` and `sched_wakeup`: what attaching
//! anything to these tracepoints costs on this kernel, so that
//! `cargo xtask bench probe` can show the steal meter's cost next to the
//! floor no tracepoint program can go below (`enforcer meter --floor`).

use aya::{Btf, Ebpf, EbpfLoader, programs::BtfTracePoint};

use super::{EBPF_OBJECT, ProbeError, ProgramStats, program_stats, raise_memlock};

const PROGRAMS: [(&str, &str); 2] = [
    ("floor_sched_switch", "sched_switch"),
    ("floor_sched_wakeup", "sched_wakeup"),
];

/// The attached empty programs; dropping it detaches them.
pub struct FloorProbes {
    ebpf: Ebpf,
}

impl FloorProbes {
    pub fn attach() -> Result<Self, ProbeError> {
        raise_memlock();
        let btf = Btf::from_sys_fs().map_err(|e| ProbeError::NoBtf(e.to_string()))?;
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        for (name, tracepoint) in PROGRAMS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            program
                .load(tracepoint, &btf)
                .map_err(|source| ProbeError::Program { name, source })?;
            program
                .attach()
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self { ebpf })
    }

    /// Per-program cost, meaningful while `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        program_stats(&self.ebpf, PROGRAMS.iter().map(|&(name, _)| name))
    }
}
