//! Benchmarks (`cargo xtask bench <what>`): each prints side-by-side numbers
//! measured in one run and writes them as JSON under `target/bench/`. They are
//! not tests: they assert nothing, they measure.

pub mod probe;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchTask {
    /// Cost of the steal probes: ns per event per program (bpf_stats) and a
    /// context-switch storm's throughput with the probes attached vs detached.
    Probe(probe::ProbeArgs),
}

pub fn run(task: BenchTask, workspace: &std::path::Path) -> anyhow::Result<()> {
    match task {
        BenchTask::Probe(args) => probe::run(&args, workspace),
    }
}
