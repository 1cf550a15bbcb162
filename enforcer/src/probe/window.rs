//! One job's stolen fraction over sliding windows and its time over budget:
//! the `enforcer-model` crate's [`StealWindow`], fed with the steal meter's
//! kernel timestamps.

pub use enforcer_model::steal::{BudgetEvent, LONG_WINDOW, SHORT_WINDOW, StealWindow};
