//! Processes a test starts, ended when the test ends, passed or failed.
//! Each is signalled through its own `Child` handle or PID, never by name.

use std::{
    io::{BufRead, BufReader, Read},
    ops::{Deref, DerefMut},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// A child process killed (SIGKILL) and reaped on drop if it still runs.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Starts `cmd` with its stdout piped and waits for its first line
    /// (a helper saying it is ready); returns the child and that line.
    pub fn spawn_until_first_line(cmd: &mut Command) -> (ChildGuard, String) {
        let mut child = ChildGuard(
            cmd.stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}")),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading the first line of {cmd:?}: {e}"));
        (child, line)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether the child exits within `limit`.
    pub fn exits_within(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The child's output once it exits (its piped stdout and stderr), or
    /// `None` if it still runs after `limit` (it is killed on drop then).
    pub fn output_within(mut self, limit: Duration) -> Option<Output> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut stdout = Vec::new();
                let mut stderr = Vec::new();
                if let Some(mut o) = self.0.stdout.take() {
                    o.read_to_end(&mut stdout).unwrap();
                }
                if let Some(mut e) = self.0.stderr.take() {
                    e.read_to_end(&mut stderr).unwrap();
                }
                eprintln!("child -> {status:?}\n{}", String::from_utf8_lossy(&stderr));
                return Some(Output {
                    status,
                    stdout,
                    stderr,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An `enforcer run` the test started. If it still runs when the test ends
/// (a failed assertion), two SIGTERMs make it kill and remove its job (a
/// SIGKILL would leave the job's cgroup behind); SIGKILL only if that takes
/// more than 10 s.
pub struct EnforcerGuard(pub Child);

impl Deref for EnforcerGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for EnforcerGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for EnforcerGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let pid = self.0.id() as i32;
            for _ in 0..2 {
                // SAFETY: kill(2) on a child this test started and has not
                // reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                std::thread::sleep(Duration::from_millis(50));
            }
            let t0 = Instant::now();
            while matches!(self.0.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child the test made without `std::process` (raw `clone3`): killed and
/// reaped by PID on drop.
pub struct PidGuard(pub i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on a child this test created and has not
        // reaped.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}
