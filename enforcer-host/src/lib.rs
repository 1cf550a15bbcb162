//! Reading the host: one reader of `/proc` ([`ProcFs`], whose root tests
//! point at a fake tree), one parser of the mount table ([`mountinfo`]) and
//! of `/proc/<pid>/cgroup` ([`ProcCgroup`]), and the one PID type ([`Pid`]).
//! Every other module asks these instead of reading `/proc` itself.

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod mountinfo;
mod pid;
mod proc_cgroup;
pub mod procfs;

pub use mountinfo::{Mount, MountTable};
pub use pid::{InvalidPid, Pid};
pub use proc_cgroup::{Hierarchy, ProcCgroup};
pub use procfs::{CpuTicks, CpuTimes, ProcError, ProcFs, Stat, Status};
