//! The embedded eBPF object: loading its programs, attaching them, and reading
//! their maps.
//!
//! - [`btf`]: the running kernel's `task_struct` offsets, from its BTF;
//! - [`steal`]: the steal meter (training threads, job cgroups, counters);
//! - [`floor`]: empty programs on the same tracepoints, the benchmark's floor;
//! - [`window`]: stolen fraction over windows and time over budget, from
//!   successive snapshots (`enforcer_model::steal`);
//! - [`monitor`]: the meter as a job supervisor monitor (`enforcer run
//!   --protect`);
//! - [`node`]: the agent's meter: the one loaded copy of the programs for
//!   every protected training on the node and all their jobs.

pub mod btf;
pub mod floor;
pub mod monitor;
pub mod node;
pub mod steal;
pub use enforcer_model::steal as window;

use std::time::Duration;

use aya::{Btf, Ebpf, maps::PerCpuArray, programs::BtfTracePoint};
use enforcer_common::SwitchCount;
use serde::Serialize;

/// The object built from `enforcer-ebpf` by `enforcer/build.rs`, embedded so
/// that the agent is one file to copy onto a node.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "the kernel has no BTF at /sys/kernel/btf/vmlinux ({0}); tp_btf programs need CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(String),
    #[error("loading the embedded eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot count the possible CPUs: {0}")]
    Cpus(String),
    #[error("the training workload {0} has no threads (no such process or empty cgroup)")]
    NoTraining(String),
    #[error("at most {0} jobs can be metered at once")]
    TooManyJobs(u32),
    #[error(
        "at most {0} trainings can be metered at once by one node's meter; unprotect one first"
    )]
    TooManyTrainings(u32),
    #[error("training {0:?} is already metered")]
    TrainingExists(String),
    #[error("no metered training {0:?}")]
    NoSuchTraining(String),
    #[error("reading the steal meter: {0}")]
    Read(String),
    #[error("the embedded object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
}

/// Result of [`self_test`].
#[derive(Debug, Clone, Serialize)]
pub struct SelfTest {
    /// Context switches the probe counted while attached.
    pub switches_seen: u64,
    /// How long it stayed attached.
    pub attached_ms: u64,
}

/// Cost of one program, from `kernel.bpf_stats_enabled` accounting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The kernel's run count and run time of each loaded program of `names`
/// (meaningful while `kernel.bpf_stats_enabled` is 1).
pub fn program_stats(ebpf: &Ebpf, names: impl Iterator<Item = &'static str>) -> Vec<ProgramStats> {
    names
        .filter_map(|name| {
            let info = ebpf.program(name)?.info().ok()?;
            Some(ProgramStats {
                name,
                run_count: info.run_count(),
                run_time_ns: info.run_time().as_nanos() as u64,
            })
        })
        .collect()
}

/// Raises RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps against it.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// Loads the embedded object, attaches the `sched_switch` self-test program
/// for `window`, reads how many switches it saw, then detaches (by dropping).
pub fn self_test(window: Duration) -> Result<SelfTest, ProbeError> {
    raise_memlock();
    let btf = Btf::from_sys_fs().map_err(|e| ProbeError::NoBtf(e.to_string()))?;
    let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
    const PROG: &str = "sched_switch_selftest";
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROG)
        .ok_or(ProbeError::Missing {
            kind: "program",
            name: PROG,
        })?
        .try_into()
        .map_err(|source| ProbeError::Program { name: PROG, source })?;
    prog.load("sched_switch", &btf)
        .map_err(|source| ProbeError::Program { name: PROG, source })?;
    let link = prog
        .attach()
        .map_err(|source| ProbeError::Program { name: PROG, source })?;
    let started = std::time::Instant::now();
    // Sleeping is itself a context switch, so the probe must see at least one.
    std::thread::sleep(window);
    let attached_ms = started.elapsed().as_millis() as u64;
    const MAP: &str = "SWITCHES";
    let map: PerCpuArray<_, SwitchCount> =
        PerCpuArray::try_from(ebpf.map(MAP).ok_or(ProbeError::Missing {
            kind: "map",
            name: MAP,
        })?)
        .map_err(|source| ProbeError::Map { name: MAP, source })?;
    let per_cpu = map
        .get(&0, 0)
        .map_err(|source| ProbeError::Map { name: MAP, source })?;
    let switches_seen = per_cpu.iter().map(|c| c.switches).sum();
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROG)
        .ok_or(ProbeError::Missing {
            kind: "program",
            name: PROG,
        })?
        .try_into()
        .map_err(|source| ProbeError::Program { name: PROG, source })?;
    prog.detach(link)
        .map_err(|source| ProbeError::Program { name: PROG, source })?;
    Ok(SelfTest {
        switches_seen,
        attached_ms,
    })
}
