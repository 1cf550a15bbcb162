//! Cgroups: detecting the mode once (unified, hybrid, legacy) and, per mode,
//! a backend that creates, limits, kills and removes job cgroups inside the
//! subtree the agent owns.

mod mode;

pub use mode::{CgroupMode, ControllerInfo, Layout, LayoutError};
