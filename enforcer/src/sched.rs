//! Scheduling-class changes of single threads, through the raw system call.
//!
//! musl's `sched_setscheduler()` is a stub that returns ENOSYS (the kernel's
//! call is per thread, unlike POSIX's per-process one), and the VM tests run
//! a static musl build, so the libc wrapper cannot be used.

use std::io;

/// Sets thread `tid`'s policy (`libc::SCHED_*`) and static priority; `tid` 0
/// is the calling thread.
pub fn set_thread_policy(tid: i32, policy: i32, priority: i32) -> io::Result<()> {
    // musl's sched_param has more fields than glibc's: start from zeroes.
    // SAFETY: sched_param is plain integers, for which all-zero is valid.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = priority;
    // SAFETY: the arguments are a tid, a policy and a valid sched_param that
    // outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setscheduler, tid, policy, &raw const param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Thread `tid`'s policy (`libc::SCHED_*`, with `SCHED_RESET_ON_FORK` or'd
/// in when set).
pub fn thread_policy(tid: i32) -> io::Result<i32> {
    // SAFETY: the call takes a thread id and touches no memory.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getscheduler, tid) };
    if rc >= 0 {
        Ok(rc as i32)
    } else {
        Err(io::Error::last_os_error())
    }
}
