//! Evaluation jobs against the real kernel: limits, deadlines, games,
//! concurrency, attach, refusals and the subtree guarantee. Each test runs
//! the real `enforcer` binary with the `eval-workload` helper binary (set
//! `EVAL_WORKLOAD_BIN` to its path in the VMs) and its own `state_dir`, so
//! tests running in parallel do not queue on each other's slots.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use enforcer_tests::{
    ChildGuard, EnforcerGuard, EnforcerRun, Scratch, assert_no_cgroup_left, cgroups_named,
    enforcer, enforcer_bin, is_dead, own_cgroups, read_report, run_enforcer as run, unique_name,
    wait_pidfile,
};

fn workload() -> PathBuf {
    enforcer_tests::eval_workload!()
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn memory_hog_is_oom_killed_with_reason_oom_and_exit_137() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("oom");
    let rep = s.path("report.json");
    let w = workload();
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--memory", "300MiB"])
        .report(&rep)
        .output([w.to_str().unwrap(), "memhog", "2000", "100"]);
    // The supervisor itself exits normally with 137: it was not the victim.
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let r = read_report(&rep);
    assert_eq!(r["reason"], "oom", "{r}");
    assert!(r["oom_kills"].as_u64().unwrap_or(0) >= 1, "{r}");
    assert_eq!(r["memory_limit_bytes"], 300u64 << 20);
    assert!(r["memory_peak_bytes"].as_u64().unwrap() <= 300 << 20, "{r}");
    assert_no_cgroup_left(&name);
}

fn fork_bomb_is_contained_by_pids_64_with_a_pids_max_event() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("forkbomb");
    let rep = s.path("report.json");
    let w = workload();
    let t0 = Instant::now();
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--pids", "64"])
        .report(&rep)
        .output([w.to_str().unwrap(), "forkbomb", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = read_report(&rep);
    assert!(r["pids_peak"].as_u64().unwrap() <= 64, "{r}");
    assert!(
        r["events"]["pids_max"].as_u64().unwrap_or(0) >= 1,
        "no pids_max event: {r}"
    );
    let failed: u64 = stdout
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .expect("forkbomb prints its counts");
    assert!(failed > 0, "no fork was refused: {stdout}");
    // The machine stayed responsive: a fresh process starts promptly.
    let probe = Instant::now();
    assert!(Command::new("true").status().unwrap().success());
    assert!(probe.elapsed() < Duration::from_secs(2));
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert_no_cgroup_left(&name);
}

fn cpu_quota_of_half_a_core_is_not_exceeded() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("cpu");
    let rep = s.path("report.json");
    let w = workload();
    // --no-idle: the quota, not the idle class, is what is measured.
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--cpu", "0.5", "--no-idle"])
        .report(&rep)
        .output([w.to_str().unwrap(), "spin", "2", "3"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = read_report(&rep);
    let cores = r["cpu_s"].as_f64().unwrap() / r["wall_s"].as_f64().unwrap();
    eprintln!(
        "measured {cores:.3} CPUs under a 0.5 CPU quota over {:.2}s (throttled {:.2}s)",
        r["wall_s"], r["cpu_throttled_s"]
    );
    // The quota is an upper bound; other load on the node can only lower
    // the usage, so the lower bound is loose.
    assert!(cores <= 0.55, "quota exceeded: {cores:.3} CPUs");
    assert!(cores >= 0.2, "the job barely ran: {cores:.3} CPUs");
    assert_no_cgroup_left(&name);
}

fn setsid_daemon_dies_within_100ms_of_a_2s_deadline() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("deadline");
    let rep = s.path("report.json");
    let pidfile = s.path("daemon.pid");
    let w = workload();
    let child = EnforcerRun::new(&cfg, &name)
        .flags(["--timeout", "2s"])
        .report(&rep)
        .job([w.to_str().unwrap(), "daemon", pidfile.to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut child = EnforcerGuard(child);
    let start = Instant::now();
    let daemon: i32 = loop {
        if let Ok(t) = std::fs::read_to_string(&pidfile) {
            break t.trim().parse().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemon never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Poll tightly for the daemon's death.
    let died_at = loop {
        if is_dead(daemon) {
            break now_unix();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon {daemon} survived"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(124));
    let r = read_report(&rep);
    assert_eq!(r["reason"], "deadline");
    let deadline = r["started_at_unix"].as_f64().unwrap() + 2.0;
    let late = died_at - deadline;
    eprintln!(
        "daemon dead {:.1} ms after the deadline; enforcer says cgroup empty after {} ms",
        late * 1e3,
        r["deadline_kill_latency_ms"]
    );
    assert!(late > -0.05, "killed before the deadline: {late}");
    assert!(late < 0.1, "killed {:.1} ms after the deadline", late * 1e3);
    assert_no_cgroup_left(&name);
}

fn game_timeout_kills_the_game_and_the_job_goes_on() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("games");
    let rep = s.path("report.json");
    let w = workload();
    let script = format!(
        "{e} game --config {c} --timeout 1s -- {w} spin 1 30; echo game=$?; {e} game --config {c} -- true; echo second=$?",
        e = enforcer_bin().display(),
        c = cfg.display(),
        w = w.display()
    );
    let t0 = Instant::now();
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--timeout", "60s"])
        .report(&rep)
        .output(["/bin/sh", "-c", &script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("game=124"), "{stdout}");
    assert!(stdout.contains("second=0"), "{stdout}");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the game outlived its 1s deadline"
    );
    assert_eq!(read_report(&rep)["reason"], "exited");
    assert_no_cgroup_left(&name);
}

fn two_jobs_with_one_slot_run_one_after_the_other() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("max_concurrent_jobs = 1");
    let (a, b) = (unique_name("slot-a"), unique_name("slot-b"));
    let (ra, rb) = (s.path("a.json"), s.path("b.json"));
    let spawn = |name: &str, rep: &Path| {
        EnforcerRun::new(&cfg, name)
            .report(rep)
            .job(["sleep", "1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = EnforcerGuard(spawn(&a, &ra));
    std::thread::sleep(Duration::from_millis(300));
    let mut second = EnforcerGuard(spawn(&b, &rb));
    // --no-wait fails fast while the slot is held.
    let busy = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--no-wait",
        "--",
        "true",
    ]);
    assert_eq!(busy.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("--no-wait"));
    assert!(first.0.wait().unwrap().success());
    let mut err = String::new();
    std::io::Read::read_to_string(second.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(second.0.wait().unwrap().success());
    assert!(err.contains("waiting for slot"), "{err}");
    let (ra, rb) = (read_report(&ra), read_report(&rb));
    let first_end = ra["started_at_unix"].as_f64().unwrap() + ra["wall_s"].as_f64().unwrap();
    let second_start = rb["started_at_unix"].as_f64().unwrap();
    assert!(
        second_start >= first_end - 0.01,
        "second started at {second_start}, first ended at {first_end}"
    );
}

fn attach_moves_every_thread_of_a_multithreaded_process() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("attach");
    let rep = s.path("report.json");
    let (mut target, line) =
        ChildGuard::spawn_until_first_line(Command::new(workload()).args(["threads", "8"]));
    assert_eq!(line.trim(), "ready");
    let pid = target.0.id() as i32;
    let mut attach = EnforcerGuard(
        enforcer()
            .args([
                "attach",
                "--config",
                cfg.to_str().unwrap(),
                "--pid",
                &pid.to_string(),
                "--job",
                &name,
                "--timeout",
                "3s",
                "--report",
                rep.to_str().unwrap(),
            ])
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let in_job = |tid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup"))
            .map(|c| c.lines().filter(|l| l.contains(&name)).count())
            .unwrap_or(0)
    };
    // Attach moves the process one hierarchy after another, and the threads'
    // files are read one after another: while it is at work, threads read
    // earlier show fewer hierarchies than threads read later. Once it is
    // done every thread shows the same; a thread left behind in one
    // hierarchy keeps showing fewer, and the wait runs out.
    let (tids, per_thread) = loop {
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let per_thread: BTreeSet<usize> = tids.iter().map(|t| in_job(t)).collect();
        let settled = per_thread.len() == 1 && !per_thread.contains(&0);
        if settled || t0.elapsed() >= Duration::from_secs(5) {
            break (tids, per_thread);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(tids.len(), 9, "main thread + 8");
    assert!(
        !per_thread.contains(&0),
        "threads not all moved: {per_thread:?}"
    );
    // Every thread is in the job in every hierarchy the job uses.
    assert_eq!(
        per_thread.len(),
        1,
        "threads differ in membership: {per_thread:?}"
    );
    // Reap the target once the deadline killed it, as any parent would: the
    // kernel frees a zombie's cgroup only then.
    let _ = target.0.wait();
    let status = attach.0.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(124),
        "the 3s deadline ends the attached job"
    );
    assert_eq!(read_report(&rep)["reason"], "deadline");
    let _ = target.0.wait();
    assert_no_cgroup_left(&name);
}

fn each_bad_input_gives_its_message_and_leaves_no_cgroup() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("max_concurrent_jobs = 4");
    let c = cfg.to_str().unwrap();
    let bad_cfg = |n: &str, text: &str| {
        let p = s.path(n);
        std::fs::write(&p, text).unwrap();
        p
    };
    let unknown = bad_cfg("unknown.toml", "memory = \"1G\"\nmemroy_high = \"1G\"\n");
    let budget = bad_cfg("budget.toml", "\nbudget = \"150%\"\n");
    let zero_mem = bad_cfg("zero.toml", "\n\nmemory = \"0\"\n");
    let mut training = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
    let tpid = training.0.id().to_string();
    let training_cfg = bad_cfg(
        "training.toml",
        &format!(
            "state_dir = \"{}\"\n[training]\npid = {tpid}\n",
            s.path("state").display()
        ),
    );
    let me = std::process::id().to_string();
    let cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (
            vec!["run", "--config", c, "--memory", "0", "--", "true"],
            "greater than zero",
            2,
        ),
        (
            vec!["run", "--config", c, "--pids", "0", "--", "true"],
            "--pids",
            2,
        ),
        (
            vec!["run", "--config", c, "--timeout", "0s", "--", "true"],
            "greater than zero",
            2,
        ),
        (
            vec!["run", "--config", c, "--cpu=-1", "--", "true"],
            "cores",
            2,
        ),
        (
            vec!["run", "--config", c, "--memory", "12X", "--", "true"],
            "unknown unit",
            2,
        ),
        (
            vec!["run", "--config", unknown.to_str().unwrap(), "--", "true"],
            "memroy_high",
            2,
        ),
        (
            vec!["run", "--config", budget.to_str().unwrap(), "--", "true"],
            "150%",
            2,
        ),
        (
            vec!["run", "--config", zero_mem.to_str().unwrap(), "--", "true"],
            "line 3",
            2,
        ),
        (
            vec!["run", "--config", c, "--job", "a/b", "--", "true"],
            "invalid job name",
            2,
        ),
        (
            vec!["attach", "--config", c, "--pid", "999999999"],
            "no process",
            2,
        ),
        (vec!["attach", "--config", c, "--pid", "1"], "init", 2),
        (
            vec!["attach", "--config", c, "--pid", "2"],
            "kernel thread",
            2,
        ),
        (vec!["attach", "--config", c, "--pid", &me], "ancestor", 2),
        (
            vec![
                "attach",
                "--config",
                training_cfg.to_str().unwrap(),
                "--pid",
                &tpid,
            ],
            "training",
            2,
        ),
        (
            vec!["config", "check", unknown.to_str().unwrap()],
            "line 2",
            2,
        ),
        (vec!["game", "--config", c, "--", "true"], "enforcer run", 2),
    ];
    for (i, (args, msg, code)) in cases.iter().enumerate() {
        let name = unique_name(&format!("bad{i}"));
        let mut args = args.clone();
        if matches!(args[0], "run" | "attach") && !args.contains(&"--job") {
            args.splice(1..1, ["--job", name.as_str()]);
        }
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: expected {msg:?} in: {err}");
        assert_no_cgroup_left(&name);
    }
    // The enforcer itself (the shell execs into it, keeping its PID).
    let name = unique_name("self");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "exec {} attach --config {c} --job {name} --pid $$",
            enforcer_bin().display()
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("enforcer itself"));
    assert_no_cgroup_left(&name);
    // A job name in use is refused, and the running job is untouched.
    let name = unique_name("taken");
    let mut holder = EnforcerGuard(
        EnforcerRun::new(c, &name)
            .job(["sleep", "3"])
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while cgroups_named(&name).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = EnforcerRun::new(c, &name).output(["true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in use"));
    assert!(
        holder.0.wait().unwrap().success(),
        "the first job was disturbed"
    );
    assert_no_cgroup_left(&name);
    let _ = training.0.kill();
}

fn no_cgroup_write_lands_outside_the_subtree_and_the_agent_never_moves_up() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("subtree");
    let audit = s.path("audit.log");
    let before = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let script = format!(
        "{e} game --config {c} --timeout 5s --memory 100M -- true",
        e = enforcer_bin().display(),
        c = cfg.display()
    );
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--cpu", "0.5", "--memory-high", "200M"])
        .job(["/bin/sh", "-c", &script])
        .env("ENFORCER_AUDIT_CGROUP_WRITES", &audit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owned = own_cgroups();
    let log = std::fs::read_to_string(&audit).unwrap_or_else(|e| {
        panic!(
            "no audit log {} ({e}): {} was built without the test-audit feature \
             (cargo build -p enforcer --features test-audit)",
            audit.display(),
            enforcer_bin().display()
        )
    });
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() > 10, "too few audited writes: {log}");
    assert!(
        lines.iter().any(|l| l.contains("game-")),
        "the game wrote nothing: {log}"
    );
    for l in &lines {
        let path = Path::new(l.split_once(' ').unwrap().1);
        assert!(
            owned
                .iter()
                .any(|o| path.starts_with(o) && path != o.as_path()
                    || path == o.join("cgroup.subtree_control")),
            "write outside the subtree {owned:?}: {l}"
        );
    }
    // The test process (the enforcer's parent) was not moved anywhere.
    assert_eq!(
        std::fs::read_to_string("/proc/self/cgroup").unwrap(),
        before
    );
    assert_no_cgroup_left(&name);
}

fn kill_fallback_freeze_kill_thaw_empties_the_job_without_cgroup_kill() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("fallback");
    let rep = s.path("report.json");
    let pidfile = s.path("daemon.pid");
    let w = workload();
    let child = EnforcerRun::new(&cfg, &name)
        .flags(["--timeout", "1s"])
        .report(&rep)
        .job([w.to_str().unwrap(), "daemon", pidfile.to_str().unwrap()])
        .env("ENFORCER_NO_CGROUP_KILL", "1")
        .spawn()
        .unwrap();
    let mut child = EnforcerGuard(child);
    let daemon = wait_pidfile(&pidfile);
    assert_eq!(child.0.wait().unwrap().code(), Some(124));
    assert!(is_dead(daemon), "the daemon survived the fallback kill");
    let r = read_report(&rep);
    eprintln!(
        "fallback kill: cgroup empty {} ms after the deadline",
        r["deadline_kill_latency_ms"]
    );
    assert!(
        r["deadline_kill_latency_ms"].as_f64().unwrap() < 100.0,
        "{r}"
    );
    assert_no_cgroup_left(&name);
}

fn sigterm_to_enforcer_is_forwarded_and_the_job_does_not_outlive_it() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("sigterm");
    let rep = s.path("report.json");
    let pidfile = s.path("daemon.pid");
    let w = workload();
    let child = EnforcerRun::new(&cfg, &name)
        .report(&rep)
        .job([w.to_str().unwrap(), "daemon", pidfile.to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut child = EnforcerGuard(child);
    let daemon = wait_pidfile(&pidfile);
    // SAFETY: kill(2) on the enforcer this test started.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    let r = read_report(&rep);
    assert_eq!(r["reason"], "killed", "{r}");
    assert_eq!(r["signal"], libc::SIGTERM);
    assert!(is_dead(daemon), "the job's daemon outlived the enforcer");
    assert_no_cgroup_left(&name);
}

fn job_of_a_killed_enforcer_is_cleaned_up_by_the_next_one() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("max_concurrent_jobs = 2");
    let name = unique_name("orphan");
    let pidfile = s.path("daemon.pid");
    let w = workload();
    let mut child = EnforcerGuard(
        EnforcerRun::new(&cfg, &name)
            .job([w.to_str().unwrap(), "daemon", pidfile.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    let daemon = wait_pidfile(&pidfile);
    child.0.kill().unwrap();
    let _ = child.0.wait();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !is_dead(daemon),
        "the setsid daemon should survive a SIGKILLed enforcer"
    );
    assert!(!cgroups_named(&name).is_empty());
    let out = run(&["run", "--config", cfg.to_str().unwrap(), "--", "true"]);
    assert!(out.status.success());
    assert!(
        is_dead(daemon),
        "the next enforcer did not kill the orphaned job"
    );
    assert_no_cgroup_left(&name);
}

fn on_event_hook_gets_json_and_a_slow_hook_delays_nothing() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("on_event_timeout = \"1s\"");
    let name = unique_name("hooks");
    let log = s.path("events.jsonl");
    let hook = format!("cat >> {}", log.display());
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--on-event", &hook])
        .output(["sh", "-c", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's own status passes through"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["started", "exited"], "{lines:?}");
    assert!(lines.iter().all(|e| e["job"] == name.as_str()));
    assert_eq!(lines[1]["detail"]["exit_code"], 7);
    // A hook that hangs is killed at its timeout and holds up no deadline.
    let t0 = Instant::now();
    let out = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--on-event",
        "sleep 30",
        "--timeout",
        "1s",
        "--",
        "sleep",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(124));
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "slow hooks delayed the job: {took:?}"
    );
    let out = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--",
        "/nonexistent/cmd",
    ]);
    assert_eq!(out.status.code(), Some(127));
}

fn memory_high_crossing_emits_a_memory_high_event() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let rep = s.path("report.json");
    let w = workload();
    // Without swap, v2 throttles the job hard above memory.high: the hog
    // may crawl, so a short deadline ends it; only the event matters here.
    let out = run(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--memory",
        "300M",
        "--memory-high",
        "40M",
        "--timeout",
        "5s",
        "--report",
        rep.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &format!("{} memhog 60 10; sleep 0.5", w.display()),
    ]);
    let code = out.status.code();
    assert!(code == Some(0) || code == Some(124), "{out:?}");
    let r = read_report(&rep);
    assert!(r["events"]["memory_high"].as_u64().unwrap_or(0) >= 1, "{r}");
    assert_eq!(r["memory_high_bytes"], 40u64 << 20);
}

fn attach_tree_moves_existing_descendants_too() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("tree");
    let (mut target, _) = ChildGuard::spawn_until_first_line(
        Command::new("/bin/sh").args(["-c", "sleep 30 & sleep 30 & echo ready; wait"]),
    );
    let pid = target.0.id() as i32;
    let kids: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    let attach = enforcer()
        .args([
            "attach",
            "--config",
            cfg.to_str().unwrap(),
            "--pid",
            &pid.to_string(),
            "--tree",
            "--job",
            &name,
            "--timeout",
            "1s",
        ])
        .spawn()
        .unwrap();
    let mut attach = EnforcerGuard(attach);
    let _ = target.0.wait();
    let out = attach.0.wait().unwrap();
    assert_eq!(out.code(), Some(124));
    // The deadline killed the whole tree: the shell and both children.
    for p in std::iter::once(pid).chain(kids) {
        assert!(
            is_dead(p) || std::fs::read_to_string(format!("/proc/{p}/stat")).is_err(),
            "{p} survived"
        );
    }
    let _ = target.0.wait();
    assert_no_cgroup_left(&name);
}

fn a_frozen_job_still_dies_at_its_deadline() {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("frozen");
    let rep = s.path("report.json");
    // The job freezes itself (as a GPU duty cycle would) with a spinner in
    // it: v1 frozen tasks die only once thawed, v2 ones at once.
    let script = format!(
        "{w} spin 1 30 & sleep 0.3
if grep -q ':freezer:' /proc/self/cgroup; then
  j=$(grep ':freezer:' /proc/self/cgroup | cut -d: -f3)
  echo FROZEN > /sys/fs/cgroup/freezer${{j%/main}}/freezer.state
else
  j=$(grep '^0::' /proc/self/cgroup | cut -d: -f3)
  echo 1 > /sys/fs/cgroup${{j%/main}}/cgroup.freeze
fi
wait",
        w = workload().display()
    );
    let t0 = Instant::now();
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--timeout", "2s"])
        .report(&rep)
        .output(["/bin/sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(124));
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "the frozen job outlived its deadline"
    );
    let r = read_report(&rep);
    eprintln!(
        "frozen job: cgroup empty {} ms after the deadline",
        r["deadline_kill_latency_ms"]
    );
    assert_eq!(r["reason"], "deadline");
    assert_no_cgroup_left(&name);
}

/// The policy (`libc::SCHED_*`) of a job's command at its first
/// instruction, then those of its two threads after a tick, and again after
/// both left for `SCHED_OTHER` and another tick (`eval-workload policy`).
fn job_thread_policies(flags: &[&str]) -> Vec<Vec<i32>> {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("idle");
    let w = workload();
    let out = EnforcerRun::new(&cfg, &name)
        .flags(flags.iter().copied())
        .output([w.to_str().unwrap(), "policy"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_no_cgroup_left(&name);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(' ').map(|p| p.parse().expect(l)).collect())
        .collect()
}

fn every_thread_of_an_idle_class_job_runs_sched_idle_from_exec_and_is_put_back_if_it_leaves() {
    // Without a training to protect and without the budget loop: the idle
    // class is the job's, not the loop's.
    let idle = vec![libc::SCHED_IDLE; 2];
    let lines = job_thread_policies(&[]);
    assert_eq!(lines.len(), 3, "{lines:?}");
    // From exec on, not from the first tick: a job's start-up burst is
    // not stolen from the training in the normal class.
    assert_eq!(
        lines[0],
        vec![libc::SCHED_IDLE],
        "at the command's first instruction: {lines:?}"
    );
    assert_eq!(lines[1], idle, "after a tick: {lines:?}");
    assert_eq!(
        lines[2], idle,
        "the threads that left the idle class were not put back: {lines:?}"
    );
    // `--no-idle` leaves the policy alone.
    let lines = job_thread_policies(&["--no-idle"]);
    assert_eq!(
        lines,
        vec![
            vec![libc::SCHED_OTHER],
            vec![libc::SCHED_OTHER; 2],
            vec![libc::SCHED_OTHER; 2]
        ]
    );
}

/// The share of CPU 0 a `--no-idle` job pinned there gets beside a
/// normal-class spinner pinned there too (the training, in the test's own
/// cgroup), with `flags` added.
fn share_beside_a_spinner(flags: &[&str]) -> f64 {
    let s = Scratch::new("enforcer-jobs");
    let cfg = s.config("");
    let name = unique_name("weight");
    let rep = s.path("report.json");
    let w = workload();
    let _training = ChildGuard(
        Command::new(&w)
            .args(["--cpu", "0", "spin", "1", "60"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the spinner"),
    );
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--no-idle"].iter().chain(flags).copied())
        .report(&rep)
        .output([w.to_str().unwrap(), "--cpu", "0", "spin", "1", "3"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_no_cgroup_left(&name);
    let r = read_report(&rep);
    r["cpu_s"].as_f64().unwrap() / r["wall_s"].as_f64().unwrap()
}

/// `--cpu-weight` ranks the job against the training, not only against the
/// other jobs: the evaluation slice takes the job's weight (a job at weight 1
/// under a default-weight slice took as much as an unweighted one).
fn a_low_cpu_weight_lowers_the_job_below_the_training() {
    let default = share_beside_a_spinner(&[]);
    let light = share_beside_a_spinner(&["--cpu-weight", "1"]);
    eprintln!("share of CPU 0 beside a spinner: default weight {default:.3}, weight 1 {light:.3}");
    // Two equal spinners split the CPU; other load on the node only
    // lowers the job's share, so the bound on the contrast is loose.
    assert!(
        default >= 0.25,
        "at the default weight the job should get about half of CPU 0: {default:.3}"
    );
    // Weight 1 against 100 (v1: shares 10 against a task's 1024) is about
    // 1 %; 10 % leaves room for scheduler granularity.
    assert!(
        light <= 0.10,
        "at weight 1 the job took {light:.3} of the training's CPU"
    );
}

/// The evaluation slice (the parent of the job cgroups, in the hierarchy
/// with the CPU controller) of the running job `name`, once it exists.
fn slice_of(name: &str) -> Option<PathBuf> {
    enforcer_tests::cgroup::job_cpu_dir(name).and_then(|d| d.parent().map(Path::to_path_buf))
}

/// Jobs side by side share the slice: one started in the idle class must
/// not put the slice back in it under a job that is out of it (here one
/// started with `--no-idle`; a job the budget loop lifted is the same case),
/// which would leave that job idle to the training after all. Once no job
/// is out, the next idle-class job takes the slice back.
fn an_idle_class_job_leaves_the_slice_out_of_the_idle_class_while_another_job_is_out() {
    let s = Scratch::new("enforcer-jobs");
    // Two slots: the idle-class job runs beside the other, not after it.
    let cfg = s.config("max_concurrent_jobs = 2");
    let out_name = unique_name("slice-out");
    let mut out_job = EnforcerGuard(
        EnforcerRun::new(&cfg, &out_name)
            .flags(["--no-idle"])
            .job(["sleep", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the --no-idle job"),
    );
    let t0 = Instant::now();
    let slice = loop {
        if let Some(slice) = slice_of(&out_name) {
            break slice;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the --no-idle job's cgroup did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let idle = || std::fs::read_to_string(slice.join("cpu.idle")).map(|v| v.trim() == "1");
    if idle().is_err() {
        enforcer_tests::skip!(
            "no cpu.idle in {} (a kernel before 5.15): the slice's class is its weight alone",
            slice.display()
        );
    }
    // The --no-idle job has taken the slice out by the time it runs.
    let t0 = Instant::now();
    while idle().unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the --no-idle job never took the slice out of the idle class"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let run_idle_job = || {
        let out = EnforcerRun::new(&cfg, &unique_name("slice-idle")).output(["true"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    };
    run_idle_job();
    assert!(
        !idle().unwrap(),
        "an idle-class job put the slice {} back in the idle class under a running --no-idle job",
        slice.display()
    );
    // SIGTERM ends the --no-idle job and removes its cgroup; the next
    // idle-class job then finds no job out of the class.
    // SAFETY: kill(2) on a child this test started and has not reaped.
    unsafe { libc::kill(out_job.id() as i32, libc::SIGTERM) };
    out_job.wait().expect("waiting for the --no-idle job");
    assert_no_cgroup_left(&out_name);
    run_idle_job();
    assert!(
        idle().unwrap(),
        "with no job out of the idle class the slice {} stayed out",
        slice.display()
    );
}

enforcer_tests::root_tests!(
    an_idle_class_job_leaves_the_slice_out_of_the_idle_class_while_another_job_is_out,
    a_low_cpu_weight_lowers_the_job_below_the_training,
    every_thread_of_an_idle_class_job_runs_sched_idle_from_exec_and_is_put_back_if_it_leaves,
    memory_hog_is_oom_killed_with_reason_oom_and_exit_137,
    fork_bomb_is_contained_by_pids_64_with_a_pids_max_event,
    cpu_quota_of_half_a_core_is_not_exceeded,
    setsid_daemon_dies_within_100ms_of_a_2s_deadline,
    game_timeout_kills_the_game_and_the_job_goes_on,
    two_jobs_with_one_slot_run_one_after_the_other,
    attach_moves_every_thread_of_a_multithreaded_process,
    each_bad_input_gives_its_message_and_leaves_no_cgroup,
    no_cgroup_write_lands_outside_the_subtree_and_the_agent_never_moves_up,
    kill_fallback_freeze_kill_thaw_empties_the_job_without_cgroup_kill,
    sigterm_to_enforcer_is_forwarded_and_the_job_does_not_outlive_it,
    job_of_a_killed_enforcer_is_cleaned_up_by_the_next_one,
    on_event_hook_gets_json_and_a_slow_hook_delays_nothing,
    memory_high_crossing_emits_a_memory_high_event,
    attach_tree_moves_existing_descendants_too,
    a_frozen_job_still_dies_at_its_deadline,
);
