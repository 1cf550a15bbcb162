//! Helpers shared by the root-only integration tests in `tests/tests/`.
//!
//! The tests run the real `enforcer` binary against the real kernel. On the
//! host they run through `cargo test -p enforcer-tests` (as root; otherwise
//! every test says it was skipped and why); in the VMs the harness runs the
//! same test binaries with `ENFORCER_BIN` pointing at the binary in the
//! initramfs.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

/// Skips the calling test, visibly, unless it runs as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIPPED {}: needs root (run scripts/test, or cargo test -p enforcer-tests as root)",
                module_path!()
            );
            return;
        }
    };
}

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
    enforcer()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", enforcer_bin().display()))
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

/// Cgroup mount points (v1 and v2) of this system.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount))
        })
        .collect()
}

/// Every cgroup directory named `name`, anywhere in any hierarchy (to
/// depth 12).
pub fn cgroups_named(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<(PathBuf, u32)> = cgroup_mounts().into_iter().map(|m| (m, 0)).collect();
    while let Some((dir, depth)) = stack.pop() {
        if depth > 12 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name() == name {
                    found.push(e.path());
                }
                stack.push((e.path(), depth + 1));
            }
        }
    }
    found
}

/// Whether `pid` is gone or a zombie (dead, waiting to be reaped).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s.get(i + 2..)?.chars().next())
            .is_none_or(|c| c == 'Z' || c == 'X'),
    }
}
