//! Helpers shared by the root-only integration tests in `tests/tests/`.
//!
//! The tests run the real `enforcer` binary against the real kernel. On the
//! host they run through `cargo test -p enforcer-tests` (as root; as any
//! other user every test is reported ignored, see [`harness`]); in the VMs
//! the VM harness runs the same test binaries with `ENFORCER_BIN` pointing
//! at the binary in the initramfs.
//!
//! Each test file declares its tests with [`root_tests!`] and takes what it
//! needs from here: a [`Scratch`] directory for configs and reports, guards
//! that end the processes a test starts ([`ChildGuard`], [`EnforcerGuard`],
//! [`PidGuard`]), the test's own cgroups ([`TestCgroup`]) and where the
//! hierarchies are, [`EnforcerRun`] for `enforcer run` command lines, and
//! what a run leaves to read ([`read_report`], [`wait_pidfile`]).

pub mod cgroup;
pub mod freezer;
pub mod guard;
pub mod harness;
pub mod scratch;

pub use cgroup::{
    TestCgroup, assert_no_cgroup_left, cgroup_mounts, cgroups_named, cpu_usage, is_dead,
    job_cgroups, mount_of, own_cgroup, own_cgroups,
};
pub use guard::{ChildGuard, EnforcerGuard, PidGuard};
pub use scratch::Scratch;

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Whether this process runs as root (every test here needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The `enforcer` binary under test: `$ENFORCER_BIN`, else the debug build
/// of this workspace.
pub fn enforcer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENFORCER_BIN") {
        return PathBuf::from(p);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_owned();
    let bin = workspace.join("target/debug/enforcer");
    assert!(
        bin.is_file(),
        "{} does not exist: build it first (cargo build -p enforcer --features test-audit) or set ENFORCER_BIN",
        bin.display()
    );
    bin
}

/// A `Command` for the binary under test.
pub fn enforcer() -> Command {
    Command::new(enforcer_bin())
}

/// Runs the binary with `args` and returns its output; panics if it cannot
/// be started at all.
pub fn run_enforcer(args: &[&str]) -> Output {
    output_logged(enforcer().args(args))
}

/// Runs `cmd` to its end; its output, also shown in the test's log (the
/// failure message of a test then shows what the enforcer said).
fn output_logged(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", enforcer_bin().display()));
    eprintln!(
        "{cmd:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A name unique to this test process and call, for jobs and cgroups.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The kernel release this test sees (reported by the VM harness).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// CPU time since boot that `/proc/stat` counts on its `line` ("cpu" for
/// every CPU, "cpu0" for one) in the columns `columns` (0 = user, 1 = nice,
/// 2 = system, 3 = idle, 4 = iowait, 5 = irq, 6 = softirq, 7 = steal),
/// summed; the file counts clock ticks.
pub fn proc_stat_time(line: &str, columns: std::ops::Range<usize>) -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let ticks: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {line} line in /proc/stat"))
        .split_whitespace()
        .skip(columns.start)
        .take(columns.len())
        .map(|v| v.parse::<u64>().expect("a tick count"))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    std::time::Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// The `eval-workload` helper program: `$EVAL_WORKLOAD_BIN`, else the one
/// cargo built with the tests, else one next to the enforcer binary (the VM
/// image puts both in /bin), else `eval-workload` on PATH.
///
/// A macro because `CARGO_BIN_EXE_*` is only set when compiling the
/// integration tests themselves, not this library.
#[macro_export]
macro_rules! eval_workload {
    () => {
        $crate::locate_workload(env!("CARGO_BIN_EXE_eval-workload"))
    };
}

/// See [`eval_workload!`]; `built` is cargo's path of the helper.
pub fn locate_workload(built: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("EVAL_WORKLOAD_BIN") {
        return PathBuf::from(p);
    }
    let built = PathBuf::from(built);
    if built.is_file() {
        return built;
    }
    let sibling = enforcer_bin().with_file_name("eval-workload");
    if sibling.is_file() {
        return sibling;
    }
    PathBuf::from("eval-workload")
}

/// Reads a job's JSON report; panics naming the file when there is none.
pub fn read_report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("report {} is not JSON: {e}", path.display()))
}

/// Waits (10 s at most) for the pid file `eval-workload daemon` writes, and
/// returns the daemon's pid.
pub fn wait_pidfile(path: &Path) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no pid file {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An `enforcer run` command line: `enforcer run --config <config> --job
/// <job> [flags] -- <job command>`.
pub struct EnforcerRun(Command);

impl EnforcerRun {
    pub fn new(config: impl AsRef<OsStr>, job: &str) -> Self {
        let mut cmd = enforcer();
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .args(["--job", job]);
        EnforcerRun(cmd)
    }

    /// Adds flags of `enforcer run`.
    pub fn flags<S: AsRef<OsStr>>(mut self, flags: impl IntoIterator<Item = S>) -> Self {
        self.0.args(flags);
        self
    }

    /// `--report <path>`.
    pub fn report(mut self, path: &Path) -> Self {
        self.0.arg("--report").arg(path);
        self
    }

    /// The command that runs `job` (program and arguments) under the flags
    /// so far; set its stdio, then spawn or run it.
    pub fn job<S: AsRef<OsStr>>(mut self, job: impl IntoIterator<Item = S>) -> Command {
        self.0.arg("--").args(job);
        self.0
    }

    /// Starts `job` under the flags so far with its stdout and stderr piped
    /// (see [`ChildGuard::output_within`]); killed if the test ends first.
    pub fn spawn<S: AsRef<OsStr>>(self, job: impl IntoIterator<Item = S>) -> ChildGuard {
        let mut cmd = self.job(job);
        ChildGuard(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}")),
        )
    }

    /// Runs `job` under the flags so far to its end; its output, also
    /// shown in the test's log.
    pub fn output<S: AsRef<OsStr>>(self, job: impl IntoIterator<Item = S>) -> Output {
        output_logged(&mut self.job(job))
    }
}
