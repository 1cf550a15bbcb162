//! The steal-budget controller: per evaluation job, a closed loop that holds
//! the training's stolen fraction (and, when the training reports progress,
//! its true slowdown) under the budget while leaving the job as much CPU as
//! it can have.
//!
//! - [`controller`]: the pure state machine (observations in, decisions out),
//!   in `enforcer-model` so that the bench runs the very same code;
//! - [`progress`]: the training's progress file, baseline rate and slowdown;
//! - [`placement`]: which CPUs the job runs on (those the training leaves
//!   free);
//! - [`actuator`]: what the controller needs from a job's cgroup;
//! - [`monitor`]: the loop plugged into the job supervisor (`enforcer run`);
//! - [`node`]: the agent's budgets, one per protected training, shared by
//!   its jobs (the pure part);
//! - [`protect`]: the agent's loop over them: meters, budgets and the jobs'
//!   actuators.

pub mod actuator;
pub use enforcer_model::controller;
pub mod monitor;
pub mod node;
pub mod placement;
pub mod progress;
pub mod protect;

pub use actuator::{CpuActuator, apply};
pub use controller::{
    Controller, ControllerConfig, CpuControls, Decision, Observation, Phase, Quota, Reason, Signal,
    StealCounters,
};
pub use monitor::{BudgetMonitor, learn_before_job};
pub use progress::{ProgressConfig, ProgressReading, ProgressTracker, Unavailable};
