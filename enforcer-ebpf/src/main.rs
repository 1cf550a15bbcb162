//! Kernel programs of enforcer, one module per program family, each with
//! the maps it uses. Loaded by `enforcer/src/probe`.
//!
//! - [`selftest`]: counts context switches, for `enforcer doctor`;
//! - [`floor`]: empty programs, the cost of attaching anything (bench);
//! - [`steal`]: the steal meter.
//!
//! Everything is aggregated in maps and read by a poll from user space: no
//! program here sends per-event traffic on the scheduler's hot path.

#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core::intrinsics::atomic_xadd: the BPF target has no AtomicU64::fetch_add"
)]

mod floor;
mod selftest;
mod steal;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
