//! The per-job budget controller lives in the `enforcer-model` crate (std
//! only, so that `cargo xtask bench contention` drives the very same code);
//! this module keeps its path in the agent.

pub use enforcer_model::controller::*;
