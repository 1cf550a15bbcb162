//! Types shared by the kernel programs in `enforcer-ebpf` and the agent in
//! `enforcer`. Everything here is `#[repr(C)]`, plain old data, and laid out
//! identically on both sides: the eBPF object writes these into maps and the
//! agent reads them back byte for byte.
#![no_std]

/// Per-CPU counters of the `sched_switch` self-test program: how many context
/// switches the probe saw. `enforcer doctor` loads the program, waits for a
/// few switches and reads this back to prove the probe really runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchCount {
    pub switches: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` integers, no padding, every bit pattern valid.
unsafe impl aya::Pod for SwitchCount {}
