//! The enforcer's model: what is derived from measured counters, in one
//! place, with no kernel, no clock and no cgroup.
//!
//! - [`window`]: timestamped samples of cumulative counters over a bounded
//!   history, and the span a rate is taken over;
//! - [`counters`]: the counters themselves (steal and training on-CPU time,
//!   per-CPU training time) and the rates derived from two samples (stolen
//!   fraction, cores);
//! - [`steal`]: one job's stolen fraction over sliding windows and its time
//!   over budget, as the steal meter reports them;
//! - [`controller`]: the per-job budget controller, a state machine from
//!   observations to CPU controls.
//!
//! The agent feeds it from its sensors; `cargo xtask bench` feeds it from
//! schedstat. Both therefore compute every rate the same way.

pub mod controller;
pub mod counters;
pub mod steal;
pub mod window;

pub use counters::{PerCpuTime, StealCounters, StealDelta};
pub use steal::{BudgetEvent, LONG_WINDOW, SHORT_WINDOW, StealWindow};
pub use window::{Span, Timestamp, Window};
