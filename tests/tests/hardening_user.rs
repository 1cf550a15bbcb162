//! Hardening against the job itself, against the real kernel: a job run with `--user` can neither leave its cgroup nor
//! raise its limits; `attach` never moves a process that took the number of
//! the one it checked; a deadline with a kill grace lets the job save its
//! results; a second signal to the enforcer is `interrupted`, not OOM.

use std::{
    ffi::CString,
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{ChildStderr, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use enforcer_tests::{
    ChildGuard, EnforcerRun, PidGuard, Scratch, assert_no_cgroup_left, cgroup_mounts,
    cgroups_named, enforcer, is_dead, read_report, run_enforcer as run, unique_name,
};

/// The unprivileged user the jobs run as: `nobody` on most systems, and a
/// number needs no passwd entry (the VM initramfs has none).
const NOBODY: &str = "65534";

fn workload() -> PathBuf {
    enforcer_tests::eval_workload!()
}

/// Reads the enforcer's stderr on a thread: lines arrive on the channel,
/// and are echoed for the test log.
fn stderr_lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (at most 20 s) for a line containing `needle`; returns the lines
/// read so far.
fn wait_for(rx: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = Duration::from_secs(20).saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {needle:?} in: {seen:#?}"),
        }
    }
}

/// The lines left until the stream ends (at most 20 s), so that a test
/// which has waited for the process sees everything it wrote.
fn read_to_end(rx: &mpsc::Receiver<String>) -> Vec<String> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = Duration::from_secs(20).saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => return seen,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the stream did not end: {seen:#?}"),
        }
    }
}

/// Seconds since midnight of an RFC 3339 UTC stamp (`...THH:MM:SS.mmmZ`).
fn day_seconds(stamp: &str) -> f64 {
    let time = stamp.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut f = time.split(':');
    let h: f64 = f.next().unwrap().parse().unwrap();
    let m: f64 = f.next().unwrap().parse().unwrap();
    let s: f64 = f.next().unwrap().parse().unwrap();
    h * 3600.0 + m * 60.0 + s
}

/// From one report stamp to a later one, in seconds.
fn gap_s(from: &serde_json::Value, to: &serde_json::Value) -> f64 {
    let d = day_seconds(to.as_str().unwrap()) - day_seconds(from.as_str().unwrap());
    if d < 0.0 { d + 86_400.0 } else { d }
}

fn a_job_run_as_65534_has_that_uid_no_capabilities_and_no_new_privs() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let name = unique_name("user-ids");
    let rep = s.path("report.json");
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--user", NOBODY])
        .report(&rep)
        .output(["cat", "/proc/self/status"]);
    assert_eq!(out.status.code(), Some(0));
    let status = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534");
    assert_eq!(field("Groups:"), "65534");
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(set), "0000000000000000", "{set}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    let r = read_report(&rep);
    assert_eq!(
        (r["uid"].as_u64(), r["gid"].as_u64()),
        (Some(65534), Some(65534))
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("can leave its cgroup"),
        "a job run as another user gets no root warning"
    );
    assert_no_cgroup_left(&name);
}

fn a_job_run_as_65534_cannot_leave_its_cgroup_or_raise_its_limits() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let name = unique_name("user-escape");
    let targets = s.path("targets");
    // Waits for the list of files, tries each write, and shows where it is
    // before and after.
    let script = r#"
echo BEFORE; cat /proc/self/cgroup; echo READY
while [ ! -e "$1" ]; do sleep 0.05; done
while read -r f v; do
  if echo "$v" > "$f"; then echo "ESCAPED $f"; else echo "REFUSED $f"; fi
done < "$1"
echo AFTER; cat /proc/self/cgroup; echo END
"#;
    let mut child = ChildGuard(
        EnforcerRun::new(&cfg, &name)
            .flags([
                "--user",
                NOBODY,
                "--pids",
                "64",
                "--memory",
                "200M",
                "--timeout",
                "60s",
            ])
            .job(["sh", "-c", script, "sh", targets.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut before = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the job ended early"
        );
        if line.trim() == "READY" {
            break;
        }
        before += &line;
    }
    let job_dirs = cgroups_named(&name);
    assert!(!job_dirs.is_empty(), "no cgroup for job {name}");
    // The root of every hierarchy, the parent of the job's cgroup in each,
    // and the job's own limit files with a looser value.
    let mut lines = Vec::new();
    for m in cgroup_mounts() {
        lines.push(format!("{} 0", m.join("cgroup.procs").display()));
    }
    for d in &job_dirs {
        lines.push(format!(
            "{} 0",
            d.parent().unwrap().join("cgroup.procs").display()
        ));
        for (file, looser) in [
            ("memory.max", "max"),
            ("memory.limit_in_bytes", "-1"),
            ("pids.max", "max"),
        ] {
            if d.join(file).exists() {
                lines.push(format!("{} {looser}", d.join(file).display()));
            }
        }
    }
    let tmp = s.path("targets.tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, &targets).unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.0.wait().unwrap();
    eprintln!("job output:\n{before}{rest}");
    assert_eq!(status.code(), Some(0));
    let escaped: Vec<&str> = rest.lines().filter(|l| l.starts_with("ESCAPED")).collect();
    assert!(escaped.is_empty(), "the job got out: {escaped:?}");
    let refused = rest.lines().filter(|l| l.starts_with("REFUSED")).count();
    assert_eq!(refused, lines.len(), "every write was tried and failed");
    let after = rest
        .split("AFTER\n")
        .nth(1)
        .and_then(|a| a.split("END").next())
        .unwrap();
    let before = before.trim_start_matches("BEFORE\n");
    assert!(before.contains(&name), "{before}");
    assert_eq!(after, before, "the job is still in its cgroup at the end");
    assert_no_cgroup_left(&name);
}

fn a_root_job_is_warned_once_that_it_can_leave_its_cgroup() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let name = unique_name("root-warn");
    let out = EnforcerRun::new(&cfg, &name).output(["true"]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("can leave its cgroup and raise its own limits"))
        .count();
    assert_eq!(warnings, 1, "{stderr}");
    assert_no_cgroup_left(&name);
}

fn game_inside_a_job_run_as_another_user_is_a_usage_error() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let name = unique_name("user-game");
    let bin = enforcer_tests::enforcer_bin();
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--user", NOBODY])
        .output([
            bin.to_str().unwrap(),
            "game",
            "--config",
            cfg.to_str().unwrap(),
            "--",
            "true",
        ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot make a game cgroup"), "{stderr}");
    assert_no_cgroup_left(&name);
}

fn bad_user_group_and_kill_grace_values_are_usage_errors_before_any_cgroup() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let c = cfg.to_str().unwrap();
    let bad_cfg = s.path("bad.toml");
    std::fs::write(&bad_cfg, "kill_grace = \"2h\"\n").unwrap();
    let me = std::process::id().to_string();
    for (args, needle) in [
        (
            vec![
                "run",
                "--config",
                c,
                "--user",
                "no-such-user-x",
                "--",
                "true",
            ],
            "no-such-user-x",
        ),
        (
            vec!["run", "--config", c, "--user", "4294967295", "--", "true"],
            "4294967295",
        ),
        (
            vec!["run", "--config", c, "--group", "65534", "--", "true"],
            "needs --user",
        ),
        (
            vec!["run", "--config", c, "--kill-grace", "2h", "--", "true"],
            "--kill-grace 2h",
        ),
        (
            vec!["run", "--config", bad_cfg.to_str().unwrap(), "--", "true"],
            "kill_grace",
        ),
        (
            vec!["attach", "--config", c, "--pid", &me, "--user", NOBODY],
            "--user",
        ),
    ] {
        let name = unique_name("user-bad");
        let mut args = args.clone();
        args.splice(1..1, ["--job", name.as_str()]);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_no_cgroup_left(&name);
    }
}

fn deadline_with_kill_grace_lets_a_job_that_traps_sigterm_save_its_results() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let name = unique_name("grace-save");
    let rep = s.path("report.json");
    let saved = s.path("saved");
    let script = format!(
        "trap 'echo partial > {}; exit 0' TERM; while :; do sleep 0.1; done",
        saved.display()
    );
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--timeout", "2s", "--kill-grace", "2s"])
        .report(&rep)
        .output(["sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(124));
    assert_eq!(
        std::fs::read_to_string(&saved).unwrap_or_default().trim(),
        "partial",
        "the job did not get to save"
    );
    let r = read_report(&rep);
    assert_eq!(r["reason"], "deadline", "{r}");
    assert_eq!(r["kill_grace_s"], 2.0);
    let gap = gap_s(&r["deadline_term_at"], &r["deadline_kill_at"]);
    eprintln!("SIGTERM to empty cgroup: {gap:.3}s");
    assert!(
        gap < 2.0,
        "the job emptied itself, no wait for the grace: {gap}"
    );
    assert!(r["events"]["deadline_term"] == 1, "{r}");
    assert_no_cgroup_left(&name);
}

fn a_job_that_ignores_sigterm_is_killed_at_deadline_plus_grace() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let name = unique_name("grace-ignore");
    let rep = s.path("report.json");
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--timeout", "2s", "--kill-grace", "2s"])
        .report(&rep)
        .output(["sh", "-c", "trap '' TERM; sleep 60"]);
    assert_eq!(out.status.code(), Some(124));
    let r = read_report(&rep);
    assert_eq!(r["reason"], "deadline", "{r}");
    let gap = gap_s(&r["deadline_term_at"], &r["deadline_kill_at"]);
    let from_start = gap_s(&serde_json::json!(r["started_at"]), &r["deadline_kill_at"]);
    eprintln!("SIGTERM to SIGKILL {gap:.3}s; start to SIGKILL {from_start:.3}s");
    assert!((1.9..2.5).contains(&gap), "grace {gap}");
    assert!((3.9..4.6).contains(&from_start), "killed at {from_start}");
    assert!(
        r["deadline_kill_latency_ms"].as_f64().unwrap() < 100.0,
        "{r}"
    );
    assert_no_cgroup_left(&name);
}

fn second_sigterm_to_enforcer_is_reason_interrupted_and_exit_143_not_137() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("");
    let name = unique_name("interrupted");
    let rep = s.path("report.json");
    let mut child = ChildGuard(
        EnforcerRun::new(&cfg, &name)
            .report(&rep)
            .job(["sh", "-c", "trap '' TERM INT HUP; echo ready; sleep 60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_lines(child.0.stderr.take().unwrap());
    // Only once the job ignores the signals: the first one is forwarded.
    let mut ready = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    let pid = child.0.id() as i32;
    // SAFETY: kill(2) on the enforcer this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for(&lines, "forwarding signal to the job");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    let r = read_report(&rep);
    assert_eq!(r["reason"], "interrupted", "{r}");
    assert_eq!(r["exit_code"], 143);
    assert_no_cgroup_left(&name);
}

/// Forks a child with exactly PID `pid` (clone3 with `set_tid`, Linux 5.5,
/// root) that runs `argv`; `None` when the kernel does not allow it.
fn spawn_with_pid(pid: i32, argv: &[&str]) -> Option<PidGuard> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let c_argv: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
    let mut ptrs: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let tids = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork; the child only calls execv
    // and _exit (async-signal-safe) on memory prepared before.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if rc == 0 {
        // SAFETY: in the child; see above.
        unsafe {
            libc::execv(ptrs[0], ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    if rc < 0 {
        eprintln!(
            "clone3 with set_tid {pid}: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(PidGuard(rc as i32))
}

fn attach_refuses_a_pid_that_another_process_took_while_it_waited_for_a_slot() {
    let s = Scratch::new("enforcer-user");
    let cfg = s.config("max_concurrent_jobs = 1");
    let c = cfg.to_str().unwrap();
    let blocker_name = unique_name("slot-holder");
    let attach_name = unique_name("reused");
    let w = workload();
    let w = w.to_str().unwrap();
    // A job holds the only slot, so attach waits after its check.
    let mut blocker = ChildGuard(
        EnforcerRun::new(c, &blocker_name)
            .job([w, "threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let blocker_lines = stderr_lines(blocker.0.stderr.take().unwrap());
    wait_for(&blocker_lines, "\"command\":");
    let mut victim = ChildGuard(
        Command::new(w)
            .args(["threads", "1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = victim.0.id() as i32;
    let mut attach = ChildGuard(
        enforcer()
            .args([
                "attach",
                "--config",
                c,
                "--job",
                &attach_name,
                "--pid",
                &pid.to_string(),
                "--timeout",
                "3s",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let attach_lines = stderr_lines(attach.0.stderr.take().unwrap());
    wait_for(&attach_lines, "waiting for slot");
    // The checked process ends and another one gets its number.
    victim.0.kill().unwrap();
    victim.0.wait().unwrap();
    let Some(impostor) = spawn_with_pid(pid, &[w, "threads", "1"]) else {
        enforcer_tests::skip!("this kernel does not let us choose a PID (clone3 set_tid)");
    };
    assert!(!is_dead(impostor.0));
    // SAFETY: kill(2) on the enforcer this test started: frees the slot.
    unsafe { libc::kill(blocker.0.id() as i32, libc::SIGTERM) };
    let status = attach.0.wait().unwrap();
    // The reader thread may still hold the last lines: read to the end.
    let seen = read_to_end(&attach_lines);
    assert_eq!(status.code(), Some(2), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains(&format!("PID {pid}"))),
        "the refusal names the pid: {seen:#?}"
    );
    assert!(
        !is_dead(impostor.0),
        "the newcomer with the same PID was killed"
    );
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", impostor.0)).unwrap();
    assert!(
        !cg.contains(&attach_name),
        "the newcomer was attached: {cg}"
    );
    assert_no_cgroup_left(&attach_name);
    let _ = blocker.0.wait();
    assert_no_cgroup_left(&blocker_name);
}

enforcer_tests::root_tests!(
    a_job_run_as_65534_has_that_uid_no_capabilities_and_no_new_privs,
    a_job_run_as_65534_cannot_leave_its_cgroup_or_raise_its_limits,
    a_root_job_is_warned_once_that_it_can_leave_its_cgroup,
    game_inside_a_job_run_as_another_user_is_a_usage_error,
    bad_user_group_and_kill_grace_values_are_usage_errors_before_any_cgroup,
    deadline_with_kill_grace_lets_a_job_that_traps_sigterm_save_its_results,
    a_job_that_ignores_sigterm_is_killed_at_deadline_plus_grace,
    second_sigterm_to_enforcer_is_reason_interrupted_and_exit_143_not_137,
    attach_refuses_a_pid_that_another_process_took_while_it_waited_for_a_slot,
);
