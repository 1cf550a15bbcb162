//! Benchmarks (`cargo xtask bench <what>`): each prints side-by-side numbers
//! measured in one run and writes them as JSON under `target/bench/`. They are
//! not tests: they assert nothing, they measure.
//!
//! - [`agent`]: the node agent's CPU and memory with ten jobs, beside one
//!   in-process run;
//! - [`contention`]: training beside an evaluation under every CPU policy;
//! - [`demo`]: the live demo behind `scripts/demo`;
//! - [`targets`]: the workload matrix's targets, judged from a run;
//! - [`workload`]: the synthetic training and evaluation both run.

pub mod agent;
pub mod contention;
pub mod demo;
pub mod plot;
pub mod probe;
pub mod targets;
pub mod workload;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchTask {
    /// The node agent's CPU (utime + stime) and RSS with `--jobs` jobs,
    /// `--protected` of them protecting one training, beside one protected
    /// in-process `enforcer run` measured the same way; writes
    /// target/bench/agent.json. As root.
    Agent(agent::AgentArgs),
    /// Training beside an evaluation under every CPU policy (alone,
    /// unlimited, nice 19, SCHED_IDLE, static quota, minimal weight, the
    /// budget loop, the enforcer), alternating rounds, medians; writes
    /// target/bench/contention.json and contention.svg.
    Contention(contention::ContentionArgs),
    /// The demo (`scripts/demo`, as root): a synthetic training alone, then
    /// an evaluation job beside it under the enforcer, one live line a
    /// second, then the job report.
    Demo(demo::DemoArgs),
    /// A synthetic workload (started by the benches and the demo).
    #[command(hide = true)]
    Worker {
        #[command(subcommand)]
        worker: workload::Worker,
    },
    /// Cost of the steal probes: ns per event per program (bpf_stats) and a
    /// context-switch storm's throughput with the probes attached vs detached.
    Probe(probe::ProbeArgs),
}

pub fn run(task: BenchTask, workspace: &std::path::Path) -> anyhow::Result<()> {
    match task {
        BenchTask::Agent(args) => agent::run(&args, workspace),
        BenchTask::Contention(args) => contention::run(&args, workspace),
        BenchTask::Demo(args) => demo::run(&args, workspace),
        BenchTask::Worker { worker } => workload::run(worker),
        BenchTask::Probe(args) => probe::run(&args, workspace),
    }
}
