//! The state directory, the job queue and orphan cleanup against local
//! attackers and crashes: the state directory
//! is root's own (absolute, root-owned, 0700, files 0600, no links
//! followed); nobody holding the queue's mutex can make `enforcer run`
//! ignore `--no-wait` or SIGTERM; the job of a dead enforcer is cleaned up
//! only by an enforcer whose subtree holds it, and its lock lives until then.

use std::{
    fs::File,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use enforcer_tests::{
    EnforcerRun, Scratch, assert_no_cgroup_left, cgroups_named, enforcer, enforcer_bin, is_dead,
    run_enforcer as run, unique_name, wait_pidfile,
};

fn workload() -> PathBuf {
    enforcer_tests::eval_workload!()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

/// Holds `flock` on the queue mutex of the state directory `state`, as a
/// local user could on the 0644 file an older enforcer made.
fn hold_queue_mutex(state: &Path) -> File {
    let slots = state.join("slots");
    std::fs::create_dir_all(&slots).unwrap();
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(slots.join("lock"))
        .unwrap();
    // SAFETY: flock on a file this test opened.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    f
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
        })
        .unwrap_or(false)
}

fn no_wait_fails_fast_with_125_while_another_process_holds_the_queue_mutex() {
    let s = Scratch::new("enforcer-state");
    let cfg = s.config("");
    let _held = hold_queue_mutex(&s.path("state"));
    let name = unique_name("nowait");
    let t0 = Instant::now();
    let out = EnforcerRun::new(&cfg, &name)
        .flags(["--no-wait"])
        .spawn(["true"])
        .output_within(Duration::from_secs(10))
        .expect("--no-wait still blocked on the queue mutex after 10 s");
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mutex") && err.contains("--no-wait"), "{err}");
    // The bound is 1 s; a debug build starting on a loaded node adds some.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_no_cgroup_left(&name);
}

fn sigterm_ends_a_run_waiting_for_the_queue_mutex_with_143_and_leaves_nothing() {
    let s = Scratch::new("enforcer-state");
    let cfg = s.config("");
    let state = s.path("state");
    let _held = hold_queue_mutex(&state);
    let name = unique_name("mutexwait");
    let child = EnforcerRun::new(&cfg, &name).spawn(["true"]);
    // Once it has the mutex open it is about to wait for it.
    let lock = state.join("slots/lock");
    let t0 = Instant::now();
    while !has_open(child.0.id(), &lock) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the enforcer never opened {}",
            lock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: kill(2) on the enforcer this test started.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let out = child
        .output_within(Duration::from_secs(5))
        .expect("SIGTERM did not end an enforcer waiting for the queue mutex");
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{out:?}");
    assert_no_cgroup_left(&name);
    let queue = state.join("slots/queue");
    let tickets = std::fs::read_dir(&queue).map_or(0, |d| d.count());
    assert_eq!(tickets, 0, "a ticket was left in {}", queue.display());
    assert!(!state.join(format!("jobs/{name}.lock")).exists());
}

fn a_state_dir_owned_by_another_user_is_refused_with_exit_2_before_any_cgroup() {
    let s = Scratch::new("enforcer-state");
    let cfg = s.config("");
    let state = s.path("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&state, PermissionsExt::from_mode(0o700)).unwrap();
    let name = unique_name("foreignstate");
    let out = EnforcerRun::new(&cfg, &name).output(["true"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "state_dir",
        state.to_str().unwrap(),
        "uid 65534",
        "mode 0700",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    assert_no_cgroup_left(&name);
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "nothing was created in the refused state dir"
    );
}

fn a_relative_or_empty_state_dir_is_refused_with_exit_2_before_any_cgroup() {
    let s = Scratch::new("enforcer-state");
    for value in ["", "state"] {
        let cfg = s.path("enforcer.toml");
        std::fs::write(&cfg, format!("state_dir = \"{value}\"\n")).unwrap();
        let name = unique_name("relstate");
        // From the scratch dir, so that a relative path taken as it is
        // lands there.
        let out = enforcer()
            .current_dir(s.dir())
            .args([
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--job",
                &name,
                "--",
                "true",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("state_dir = {value:?} -> {:?}\n{err}", out.status);
        assert_eq!(out.status.code(), Some(2), "state_dir = {value:?}");
        assert!(err.contains("state_dir"), "{err}");
        assert_no_cgroup_left(&name);
        assert!(!s.path("slots").exists() && !s.path("state").exists());
    }
}

fn a_symlinked_counter_in_the_state_dir_is_refused_and_its_target_left_unchanged() {
    let s = Scratch::new("enforcer-state");
    let cfg = s.config("");
    let state = s.path("state");
    let slots = state.join("slots");
    std::fs::create_dir_all(&slots).unwrap();
    std::fs::set_permissions(&state, PermissionsExt::from_mode(0o700)).unwrap();
    let victim = s.path("root-only");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&victim, slots.join("counter")).unwrap();
    let name = unique_name("linkedcounter");
    let out = EnforcerRun::new(&cfg, &name).output(["true"]);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the enforcer wrote through the link"
    );
    // Refused (the enforcer's own directory was tampered with), naming the
    // link, before any cgroup.
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("slots/counter") && err.contains("symbolic link"),
        "{err}"
    );
    assert_no_cgroup_left(&name);
}

fn a_0755_state_dir_of_an_older_enforcer_is_closed_to_0700_and_works() {
    let s = Scratch::new("enforcer-state");
    let cfg = s.config("");
    let state = s.path("state");
    for dir in ["slots/queue", "jobs"] {
        std::fs::create_dir_all(state.join(dir)).unwrap();
    }
    for dir in ["", "slots", "slots/queue", "jobs"] {
        std::fs::set_permissions(state.join(dir), PermissionsExt::from_mode(0o755)).unwrap();
    }
    for file in ["slots/lock", "slots/counter", "slots/slot-0"] {
        std::fs::write(
            state.join(file),
            if file.ends_with("counter") { "7" } else { "" },
        )
        .unwrap();
        std::fs::set_permissions(state.join(file), PermissionsExt::from_mode(0o644)).unwrap();
    }
    let out = run(&["run", "--config", cfg.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for dir in ["", "slots", "slots/queue", "jobs"] {
        assert_eq!(
            mode(&state.join(dir)),
            0o700,
            "{}",
            state.join(dir).display()
        );
    }
    for file in ["slots/lock", "slots/counter", "slots/slot-0"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    assert_eq!(
        std::fs::read_to_string(state.join("slots/counter")).unwrap(),
        "8",
        "the queue carried on from the old counter"
    );
}

/// On drop: kills the orphan's daemon (a process this test started, by
/// PID) and lets an enforcer of the test's own subtree remove the orphan's
/// cgroups; whatever that leaves (when the orphan's lock was lost, as with
/// the bug this file reproduces) is removed here, emptied by then.
struct OrphanCleanup {
    daemon: i32,
    config: PathBuf,
    job: String,
}

impl Drop for OrphanCleanup {
    fn drop(&mut self) {
        if !is_dead(self.daemon) {
            // SAFETY: kill(2) on the daemon this test started.
            unsafe { libc::kill(self.daemon, libc::SIGKILL) };
        }
        let _ = enforcer()
            .args([
                "run",
                "--config",
                self.config.to_str().unwrap(),
                "--",
                "true",
            ])
            .output();
        for dir in cgroups_named(&self.job) {
            let _ = std::fs::remove_dir(dir.join("main"));
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn an_orphan_outside_the_next_enforcers_subtree_keeps_its_lock_until_its_own_subtree_cleans_it() {
    let s = Scratch::new("enforcer-state");
    let cfg = s.config("max_concurrent_jobs = 4");
    // The outer enforcer only provides another subtree: a state dir of its
    // own, so that it does not clean up the orphan itself.
    let outer_cfg = s.config_named(
        "outer.toml",
        &format!(
            "state_dir = \"{}\"\nmax_concurrent_jobs = 4",
            s.path("outer-state").display()
        ),
    );
    let name = unique_name("orphan");
    let lock = s.path(&format!("state/jobs/{name}.lock"));
    let pidfile = s.path("daemon.pid");
    let w = workload();
    let mut first = EnforcerRun::new(&cfg, &name).spawn([
        w.to_str().unwrap(),
        "daemon",
        pidfile.to_str().unwrap(),
    ]);
    let daemon = wait_pidfile(&pidfile);
    let _cleanup = OrphanCleanup {
        daemon,
        config: cfg.clone(),
        job: name.clone(),
    };
    first.0.kill().unwrap();
    let _ = first.0.wait();
    assert!(
        !is_dead(daemon),
        "the setsid daemon should survive a SIGKILLed enforcer"
    );
    let orphan_cgroups = cgroups_named(&name);
    assert!(!orphan_cgroups.is_empty());
    assert!(lock.exists(), "the dead enforcer's lock is there");

    // The next run starts inside a job of another enforcer: its subtree is
    // that job's cgroup, which does not hold the orphan.
    let inner = unique_name("inner");
    let bin = enforcer_bin();
    let out = run(&[
        "run",
        "--config",
        outer_cfg.to_str().unwrap(),
        "--",
        bin.to_str().unwrap(),
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--job",
        &inner,
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        lock.exists(),
        "an enforcer of another subtree deleted the orphan's lock"
    );
    assert!(
        !is_dead(daemon),
        "the orphan was touched from another subtree"
    );
    assert_eq!(cgroups_named(&name), orphan_cgroups);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outside this enforcer's cgroup subtree"),
        "{err}"
    );

    // An enforcer of the orphan's own subtree cleans it up, lock last.
    let out = run(&["run", "--config", cfg.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(is_dead(daemon), "the orphan's daemon survived its cleanup");
    assert_no_cgroup_left(&name);
    assert!(!lock.exists(), "the cleaned-up orphan's lock was kept");
}

enforcer_tests::root_tests!(
    no_wait_fails_fast_with_125_while_another_process_holds_the_queue_mutex,
    sigterm_ends_a_run_waiting_for_the_queue_mutex_with_143_and_leaves_nothing,
    a_state_dir_owned_by_another_user_is_refused_with_exit_2_before_any_cgroup,
    a_relative_or_empty_state_dir_is_refused_with_exit_2_before_any_cgroup,
    a_symlinked_counter_in_the_state_dir_is_refused_and_its_target_left_unchanged,
    a_0755_state_dir_of_an_older_enforcer_is_closed_to_0700_and_works,
    an_orphan_outside_the_next_enforcers_subtree_keeps_its_lock_until_its_own_subtree_cleans_it,
);
