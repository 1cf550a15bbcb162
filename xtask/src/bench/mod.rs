//! `cargo xtask bench <task>`: benchmarks that print side-by-side ratios
//! measured in one run.

pub mod contention;
pub mod demo;
pub mod plot;
pub mod workload;

// The enforcer's controller is std-only so that the bench drives the very
// code the agent runs without building the agent (and its eBPF object).
#[path = "../../../enforcer/src/budget/controller.rs"]
#[expect(dead_code, reason = "the bench uses part of the controller's API")]
pub mod controller;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchTask {
    /// Training beside an evaluation under every CPU policy (alone,
    /// unlimited, nice 19, SCHED_IDLE, static quota, minimal weight, the
    /// budget loop), alternating rounds, medians; writes
    /// target/bench/contention.json and contention.svg.
    Contention(contention::ContentionArgs),
}
