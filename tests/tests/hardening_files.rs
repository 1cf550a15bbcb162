//! Files the root enforcer reads and writes on behalf of users it does not
//! trust: the training's progress file (a FIFO must not stall the deadline,
//! a link must not leak what root can read) and the `--report` file (a link
//! planted by the directory's owner must not redirect root's write).

use std::{
    ffi::CString,
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{ChildGuard, Scratch, enforcer, read_report, unique_name};

/// The unprivileged user the tests hand directories to (`nobody`; numeric,
/// so it needs no /etc/passwd in the VMs).
const NOBODY: u32 = 65534;

/// A stand-in for the training: any live process will do for `--protect`.
fn training() -> ChildGuard {
    ChildGuard(
        Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("starting the training"),
    )
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Opens `fifo` for writing and closes it again, which ends a read blocked
/// on it (the reader sees end of file); gives up after `within`.
fn release_fifo_readers(fifo: &Path, within: Duration) {
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < within {
        // SAFETY: valid NUL-terminated path; the fd is closed right away.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK) };
        if fd >= 0 {
            // SAFETY: `fd` was just opened by this thread.
            unsafe { libc::close(fd) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replaces `path` by `target`'s inode (a hard link renamed over it), as a
/// training user would swap in a FIFO.
fn swap_in(target: &Path, path: &Path) {
    let tmp = path.with_extension("swap");
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(target, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn wait_for(path: &Path, within: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits for `child` up to `within`; `None` when it is still running.
fn wait_bounded(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The enforcer's stderr goes to a file: a pipe nobody drains while the
/// test waits could fill up and stall the run by itself.
fn log_file(s: &Scratch) -> std::fs::File {
    std::fs::File::create(s.path("stderr.log")).unwrap()
}

/// How long the run may take beyond the job's own 3 s deadline: learning
/// the training's step rate before the job (3.5 s), loading the steal meter
/// (seconds in a TCG VM), cleaning up.
const RUN_SLACK: Duration = Duration::from_secs(25);

/// Runs a protected `--timeout 3s` job whose progress file is replaced by a
/// FIFO without a writer: before the run when `from_start`, else once the
/// job runs. The deadline must fire on time and the run must end.
fn fifo_progress_file_run(from_start: bool) {
    let s = Scratch::new("enforcer-files");
    let progress = s.path("progress");
    let fifo = s.path("fifo");
    mkfifo(&fifo);
    if from_start {
        swap_in(&fifo, &progress);
    } else {
        std::fs::write(&progress, "1\n").unwrap();
    }
    let cfg = s.config(&format!(
        "[training]\nprogress_file = \"{}\"",
        progress.display()
    ));
    let train = training();
    let started = s.path("started");
    let report_path = s.path("report.json");
    let name = unique_name("fifo");
    let mut run = ChildGuard(
        enforcer()
            .args(["run", "--config", cfg.to_str().unwrap(), "--job", &name])
            .args(["--protect", &train.0.id().to_string(), "--timeout", "3s"])
            // Out of the idle class: on a loaded host an idle-class job may
            // not run its first instruction before a 3 s deadline.
            .arg("--no-idle")
            .arg("--report")
            .arg(&report_path)
            .args(["--", "/bin/sh", "-c"])
            .arg(format!("touch {}; exec sleep 30", started.display()))
            .stdout(Stdio::null())
            .stderr(log_file(&s))
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let job_started = wait_for(&started, RUN_SLACK);
    if job_started && !from_start {
        swap_in(&fifo, &progress);
    }
    let status = wait_bounded(&mut run.0, Duration::from_secs(3) + RUN_SLACK);
    let stalled = status.is_none();
    if stalled {
        // Unblock the enforcer so that it cleans up its job: a regular file
        // again, and a writer for the read that hangs on the FIFO.
        std::fs::write(s.path("plain"), "1\n").unwrap();
        swap_in(&s.path("plain"), &progress);
        release_fifo_readers(&fifo, Duration::from_secs(1));
    }
    let code = run.0.wait().unwrap().code();
    let stderr = std::fs::read_to_string(s.path("stderr.log")).unwrap();
    assert!(
        job_started,
        "the job never started within {RUN_SLACK:?}: the FIFO stalled the run before it\n{stderr}"
    );
    assert!(
        !stalled,
        "enforcer run was still running {:?} after it started: the FIFO stalled it\n{stderr}",
        t0.elapsed()
    );
    assert_eq!(code, Some(124), "{stderr}");
    let r = read_report(&report_path);
    assert_eq!(r["reason"], "deadline", "{r}");
    let wall = r["wall_s"].as_f64().unwrap();
    assert!(
        wall < 4.0,
        "the job lived {wall:.2}s under a 3 s deadline\n{stderr}"
    );
    let _ = std::fs::remove_file(&fifo);
}

fn a_progress_file_swapped_for_a_fifo_during_the_job_does_not_delay_its_deadline() {
    fifo_progress_file_run(false);
}

fn a_progress_file_that_is_a_fifo_before_the_job_does_not_stall_the_run() {
    fifo_progress_file_run(true);
}

fn a_progress_file_linked_to_a_root_only_file_does_not_leak_it() {
    let s = Scratch::new("enforcer-files");
    let secret_text = "root-only-secret-4b1d";
    let secret = s.path("secret");
    std::fs::write(&secret, format!("{secret_text}\n")).unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    let progress = s.path("progress");
    std::os::unix::fs::symlink(&secret, &progress).unwrap();
    let cfg = s.config(&format!(
        "[training]\nprogress_file = \"{}\"",
        progress.display()
    ));
    let train = training();
    let report_path = s.path("report.json");
    let name = unique_name("leak");
    let mut run = ChildGuard(
        enforcer()
            .args(["run", "--config", cfg.to_str().unwrap(), "--job", &name])
            .args(["--protect", &train.0.id().to_string(), "--timeout", "20s"])
            .arg("--report")
            .arg(&report_path)
            .args(["--", "sleep", "1"])
            .stdout(Stdio::null())
            .stderr(log_file(&s))
            .spawn()
            .unwrap(),
    );
    let status = wait_bounded(&mut run.0, RUN_SLACK + Duration::from_secs(20));
    let code = run.0.wait().unwrap().code();
    let stderr = std::fs::read_to_string(s.path("stderr.log")).unwrap();
    assert!(status.is_some(), "the run did not end\n{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains(secret_text),
        "the log quotes the root-only file:\n{stderr}"
    );
    let text = std::fs::read_to_string(&report_path).unwrap();
    assert!(
        !text.contains(secret_text),
        "the report quotes the root-only file:\n{text}"
    );
    // The reason is still given, without the content.
    let r = read_report(&report_path);
    let reason = r["unavailable"]["training_slowdown"].as_str().unwrap_or("");
    assert!(reason.contains("progress"), "{r}");
}

/// Where the job's cgroup directories would be: every cgroup mount joined
/// with every path the job saw in /proc/self/cgroup.
fn job_cgroup_dirs(proc_cgroup: &str) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let roots: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect();
    let mut dirs = Vec::new();
    for line in proc_cgroup.lines() {
        let Some(rel) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            continue;
        }
        dirs.extend(roots.iter().map(|r| r.join(rel)));
    }
    dirs
}

/// A directory owned by `nobody` with `mode`, inside the scratch dir.
fn nobody_dir(s: &Scratch, name: &str, mode: u32) -> PathBuf {
    let d = s.path(name);
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&d, PermissionsExt::from_mode(mode)).unwrap();
    d
}

fn run_with_report(s: &Scratch, report_path: &Path, job: &str) -> Output {
    let cfg = s.config("");
    enforcer()
        .args(["run", "--config", cfg.to_str().unwrap(), "--job"])
        .arg(unique_name(job))
        .arg("--report")
        .arg(report_path)
        .args(["--", "/bin/sh", "-c"])
        .arg(format!(
            "cat /proc/self/cgroup > {}",
            s.path("ran").display()
        ))
        .output()
        .unwrap()
}

fn a_report_link_planted_by_the_directory_owner_is_replaced_not_followed() {
    let s = Scratch::new("enforcer-files");
    let victim = s.path("victim");
    std::fs::write(&victim, "root's own data\n").unwrap();
    std::fs::set_permissions(&victim, PermissionsExt::from_mode(0o600)).unwrap();
    let theirs = nobody_dir(&s, "theirs", 0o755);
    let report_path = theirs.join("report.json");
    std::os::unix::fs::symlink(&victim, &report_path).unwrap();
    let out = run_with_report(&s, &report_path, "report-link");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "root's own data\n",
        "root's file was overwritten through the planted link"
    );
    let meta = std::fs::symlink_metadata(&report_path).unwrap();
    assert!(meta.file_type().is_file(), "the report is not a plain file");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (NOBODY, NOBODY),
        "the report is owned by the directory's owner"
    );
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert_eq!(read_report(&report_path)["reason"], "exited");
}

fn a_report_into_a_root_owned_directory_is_written_as_root() {
    let s = Scratch::new("enforcer-files");
    let report_path = s.path("report.json");
    let out = run_with_report(&s, &report_path, "report-root");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = std::fs::symlink_metadata(&report_path).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o644));
    assert_eq!(read_report(&report_path)["reason"], "exited");
}

fn a_report_the_directory_owner_cannot_write_fails_with_125_after_the_job() {
    let s = Scratch::new("enforcer-files");
    let closed = nobody_dir(&s, "closed", 0o555);
    let report_path = closed.join("report.json");
    let out = run_with_report(&s, &report_path, "report-closed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains(&*closed.to_string_lossy()),
        "the error names the path:\n{stderr}"
    );
    assert!(!report_path.exists(), "root wrote into nobody's 0555 dir");
    let seen = std::fs::read_to_string(s.path("ran")).expect("the job ran");
    for dir in job_cgroup_dirs(&seen) {
        assert!(!dir.exists(), "the job's cgroup {} is left", dir.display());
    }
}

enforcer_tests::root_tests!(
    a_progress_file_swapped_for_a_fifo_during_the_job_does_not_delay_its_deadline,
    a_progress_file_that_is_a_fifo_before_the_job_does_not_stall_the_run,
    a_progress_file_linked_to_a_root_only_file_does_not_leak_it,
    a_report_link_planted_by_the_directory_owner_is_replaced_not_followed,
    a_report_into_a_root_owned_directory_is_written_as_root,
    a_report_the_directory_owner_cannot_write_fails_with_125_after_the_job,
);
