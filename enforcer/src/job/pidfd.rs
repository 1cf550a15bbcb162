//! Process handles that cannot be fooled by PID reuse: a pidfd refers to one
//! process for as long as it is held, so a signal sent through it never
//! reaches a newcomer that got the same number. Raw system calls: musl has no
//! wrappers for them and glibc only since 2.36.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::host::Pid;

/// An open pidfd (`pidfd_open(2)`, Linux 5.3; signals since 5.1).
#[derive(Debug)]
pub struct PidFd {
    pid: Pid,
    fd: OwnedFd,
}

impl PidFd {
    /// Opens a handle on `pid` as it is now.
    pub fn open(pid: Pid) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(PidFd { pid, fd })
    }

    /// The number the process had when the handle was opened.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sends `sig` to exactly the process the handle was opened on; ESRCH
    /// once it has exited (even if its number is in use again).
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: the fd is a valid pidfd we own; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether the process has not exited yet (signal 0 through the handle).
    pub fn is_alive(&self) -> bool {
        self.send_signal(0).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_of_an_exited_child_says_dead_and_signals_nobody() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let fd = PidFd::open(Pid::try_from(child.id()).unwrap()).unwrap();
        child.wait().unwrap();
        assert!(!fd.is_alive());
        let e = fd.send_signal(libc::SIGTERM).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn a_pidfd_of_a_live_process_says_alive() {
        let fd = PidFd::open(Pid::this_process()).unwrap();
        assert!(fd.is_alive());
    }
}
