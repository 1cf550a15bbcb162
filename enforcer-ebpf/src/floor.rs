//! The cost floor of `cargo xtask bench probe`.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

/// Empty programs on the two hot tracepoints: what attaching anything there
/// costs (the floor `cargo xtask bench probe` compares the meter with). Never
/// loaded by the agent.
#[btf_tracepoint(function = "sched_switch")]
pub fn floor_sched_switch(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// See `floor_sched_switch`.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn floor_sched_wakeup(_ctx: BtfTracePointContext) -> i32 {
    0
}
