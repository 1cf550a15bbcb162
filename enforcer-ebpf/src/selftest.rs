//! The self-test: proves that the embedded object loads, attaches and runs
//! on this kernel.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};
use enforcer_common::SwitchCount;

/// One slot per CPU: context switches seen by `sched_switch_selftest`.
/// Bound: a single entry; per-CPU, so the hot path never contends.
#[map]
static SWITCHES: PerCpuArray<SwitchCount> = PerCpuArray::with_max_entries(1, 0);

/// Self-test probe: counts context switches so `enforcer doctor` can prove the
/// embedded object loads, attaches and runs on this kernel. It reads no
/// tracepoint argument, so it is independent of the `sched_switch` signature
/// change in 5.18.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_selftest(_ctx: BtfTracePointContext) -> i32 {
    if let Some(slot) = SWITCHES.get_ptr_mut(0) {
        // SAFETY: the pointer is to this CPU's slot; programs on one CPU do
        // not run concurrently with themselves for a tracepoint.
        unsafe { (*slot).switches += 1 };
    }
    0
}
