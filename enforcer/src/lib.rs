//! enforcer: places evaluation jobs in cgroups with hard limits and deadlines,
//! measures with eBPF how much CPU time they steal from the training workload,
//! and holds that steal under a budget.
//!
//! The modules follow the architecture:
//! - [`cgroup`]: the cgroup v2 and v1/hybrid backends behind one interface;
//! - [`probe`]: loading the embedded eBPF programs and reading their maps;
//! - [`budget`]: the steal-budget controller and the training progress reader;
//! - [`gpu`]: NVML telemetry, null-safe on nodes without a GPU;
//! - [`host`]: the one reader of `/proc` and the mount table;
//! - [`doctor`]: what this node can and cannot do, and how to fix it;
//! - [`config`], [`units`], [`validate`]: the config file, typed units and
//!   the one validator of flags and keys;
//! - [`job`], [`report`], [`events`], [`slots`]: running evaluation jobs;
//! - [`safe_fs`]: files read or written on behalf of processes not trusted;
//! - [`trust`]: which files root may take instructions from;
//! - [`top`]: the live terminal view of the node (`enforcer top`);
//! - [`cli`]: the command line, one file per subcommand.

pub mod agent;
pub mod budget;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod events;
pub mod gpu;
pub use enforcer_host as host;
pub mod job;
pub mod privilege;
pub mod probe;
pub mod report;
pub mod safe_fs;
pub mod sched;
pub mod slots;
pub mod top;
pub mod trust;
pub mod units;
pub mod validate;
