//! Input hardening against the real binary: every out-of-range flag or
//! config key is refused (exit 2, naming it, its value and the range)
//! before any cgroup or state file exists; as root, a config that others
//! could have written is refused; `on_event` hooks start outside the
//! supervisor's real-time window and run in a limited cgroup of their own.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer::sched::{set_thread_policy, thread_policy};
use enforcer_tests::{
    ChildGuard, EnforcerGuard, EnforcerRun, Scratch, assert_no_cgroup_left, enforcer, enforcer_bin,
    run_enforcer as run, unique_name,
};

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat` text.
fn stat_field(stat: &str, n: usize) -> i64 {
    let after = &stat[stat.rfind(')').expect("a stat line") + 2..];
    after
        .split_whitespace()
        .nth(n - 3)
        .unwrap()
        .parse()
        .unwrap()
}

const STAT_NICE: usize = 19;
const STAT_POLICY: usize = 41;

fn every_out_of_range_flag_and_key_exits_2_naming_it_before_anything_is_created() {
    let s = Scratch::new("enforcer-input");
    let good = s.config_named("good.toml", "");
    let c = good.to_str().unwrap();
    let mut target = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
    let target_pid = target.0.id().to_string();
    // (arguments after the subcommand, what the message must name, the
    // value it must echo)
    let flags: Vec<(&str, Vec<&str>, &str, &str)> = vec![
        (
            "run",
            vec!["--timeout", "200000000000000d"],
            "--timeout",
            "200000000000000d",
        ),
        ("run", vec!["--timeout", "366d"], "--timeout", "366d"),
        ("run", vec!["--budget", "0%"], "--budget", "0%"),
        ("run", vec!["--budget", "101%"], "--budget", "101%"),
        ("run", vec!["--budget", "1000%"], "--budget", "1000%"),
        ("run", vec!["--cpu", "1e300"], "--cpu", "1e300"),
        (
            "run",
            vec!["--pids", "18446744073709551615"],
            "--pids",
            "18446744073709551615",
        ),
        ("run", vec!["--pids", "4194305"], "--pids", "4194305"),
        ("run", vec!["--memory", "1"], "--memory", "1"),
        (
            "run",
            vec!["--memory", "1G", "--memory-high", "2G"],
            "--memory-high",
            "2GiB",
        ),
        ("run", vec!["--cpu-weight", "0"], "--cpu-weight", "0"),
        (
            "run",
            vec!["--gpu-util-limit", "0%"],
            "--gpu-util-limit",
            "0%",
        ),
        ("run", vec!["--duty-cycle", "150%"], "--duty-cycle", "150%"),
        ("run", vec!["--protect=-5"], "--protect", "-5"),
        ("run", vec!["--on-event", ""], "--on-event", "\"\""),
        (
            "attach",
            vec!["--pid", &target_pid, "--budget", "0%"],
            "--budget",
            "0%",
        ),
        ("game", vec!["--timeout", "0s"], "--timeout", "0"),
        ("game", vec!["--pids", "0"], "--pids", "0"),
    ];
    for (i, (sub, extra, flag, value)) in flags.iter().enumerate() {
        let name = unique_name(&format!("badflag{i}"));
        let mut args = vec![*sub, "--config", c];
        if *sub != "game" {
            args.extend(["--job", name.as_str()]);
        }
        args.extend(extra.iter().copied());
        if *sub != "attach" {
            args.extend(["--", "true"]);
        }
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(flag) && err.contains(value) && err.contains("must be"),
            "{args:?}: expected {flag} {value} and the range in: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_no_cgroup_left(&name);
        assert!(!s.state().exists(), "{args:?} created the state dir");
    }
    // (config line, key, value as written)
    let keys: Vec<(&str, &str, &str)> = vec![
        ("gpu_util_limit = 0", "gpu_util_limit", "0"),
        ("cpu = 1e300", "cpu", "1e300"),
        ("memory = 1", "memory", "1"),
        ("control_period = \"1us\"", "control_period", "\"1us\""),
        ("budget = \"0%\"", "budget", "\"0%\""),
        ("timeout = \"400d\"", "timeout", "\"400d\""),
        ("pids = 5000000", "pids", "5000000"),
        ("state_dir = \"\"", "state_dir", "\"\""),
        (
            "state_dir = \"relative/state\"",
            "state_dir",
            "\"relative/state\"",
        ),
        ("cgroup_root = \"/../../x\"", "cgroup_root", "\"/../../x\""),
        ("[training]\npid = -5", "training.pid", "-5"),
    ];
    for (i, (line, key, value)) in keys.iter().enumerate() {
        let cfg = s.config_named(&format!("bad{i}.toml"), line);
        let cfg_s = cfg.to_str().unwrap();
        let name = unique_name(&format!("badkey{i}"));
        for args in [
            vec!["run", "--config", cfg_s, "--job", &name, "--", "true"],
            vec!["config", "check", cfg_s],
            vec!["config", "show", "--config", cfg_s],
        ] {
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            // The validator's `key = value (line N)`, or toml's own
            // excerpt of the line for a value the parser refuses.
            let named = format!("{key} = {value}");
            assert!(
                err.contains(cfg_s)
                    && err.contains(&named)
                    && err.contains("line ")
                    && err.contains("must be"),
                "{args:?}: expected {cfg_s}, {named:?}, its line and the range in: {err}"
            );
            assert_no_cgroup_left(&name);
            assert!(!s.state().exists(), "{args:?} created the state dir");
            assert!(!Path::new("relative").exists());
        }
    }
    let _ = target.0.kill();
}

/// Runs `enforcer config check FILE`; returns (exit code, stderr).
fn check(file: &Path) -> (Option<i32>, String) {
    let out = run(&["config", "check", file.to_str().unwrap()]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), None).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn as_root_a_config_or_hook_program_others_could_write_is_refused_naming_owner_and_mode() {
    let s = Scratch::new("enforcer-input");
    let ran = s.path("hook-ran");
    let hook = format!("on_event = \"touch {}\"", ran.display());
    let hook = hook.as_str();
    // Another user's file.
    let theirs = s.config_named("theirs.toml", hook);
    chown(&theirs, 65534);
    let (code, err) = check(&theirs);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(theirs.to_str().unwrap()) && err.contains("uid 65534") && err.contains("0644"),
        "{err}"
    );
    // `run` refuses it before anything exists.
    let name = unique_name("untrusted");
    let out = EnforcerRun::new(&theirs, &name).output(["true"]);
    assert_eq!(out.status.code(), Some(2));
    assert_no_cgroup_left(&name);
    assert!(!s.state().exists());
    // Root's file, but world- or group-writable.
    for mode in [0o666, 0o664] {
        let open = s.config_named(&format!("open{mode:o}.toml"), "");
        chmod(&open, mode);
        let (code, err) = check(&open);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("uid 0") && err.contains(&format!("0{mode:o}")),
            "{err}"
        );
    }
    // Root's 0644 file in a directory others can write to.
    let dir = s.path("shared");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o777);
    let in_shared = dir.join("enforcer.toml");
    std::fs::write(&in_shared, "").unwrap();
    chmod(&in_shared, 0o644);
    let (code, err) = check(&in_shared);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("directory") && err.contains(dir.to_str().unwrap()) && err.contains("0777"),
        "{err}"
    );
    // A symlink (as in a Kubernetes ConfigMap) is judged by what it points
    // to: fine when that is root's, refused, naming the real file, when not.
    let real_dir = s.path("..data");
    std::fs::create_dir(&real_dir).unwrap();
    chmod(&real_dir, 0o755);
    let real = real_dir.join("enforcer.toml");
    std::fs::write(&real, "").unwrap();
    chmod(&real, 0o644);
    let link = s.path("linked.toml");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (code, err) = check(&link);
    assert_eq!(code, Some(0), "{err}");
    chown(&real, 65534);
    let (code, err) = check(&link);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(real.to_str().unwrap()), "{err}");
    // A FIFO is refused at once instead of blocking the enforcer.
    let fifo = s.path("fifo.toml");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    let mut child = ChildGuard(
        enforcer()
            .args(["config", "check", fifo.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "config check blocked on a FIFO"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(2));
    assert!(!ran.exists(), "the untrusted config's hook ran");
    // A hook program others could have written is refused too.
    let script = s.path("notify.sh");
    std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", ran.display())).unwrap();
    chmod(&script, 0o777);
    let good = s.config_named("good.toml", "");
    let name = unique_name("hookprog");
    let hook = format!("{} --quiet", script.display());
    let out = EnforcerRun::new(&good, &name)
        .flags(["--on-event", &hook])
        .output(["true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(script.to_str().unwrap()) && err.contains("0777"),
        "{err}"
    );
    assert_no_cgroup_left(&name);
    assert!(!ran.exists(), "the untrusted hook program ran");
}

fn a_user_checking_their_own_config_is_not_held_to_roots_rule() {
    let s = Scratch::new("enforcer-input");
    let theirs = s.config_named("theirs.toml", "");
    chown(&theirs, 65534);
    chmod(&theirs, 0o666);
    let out = enforcer()
        .args(["config", "check", theirs.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            enforcer_tests::skip!("uid 65534 cannot run {}: {e}", enforcer_bin().display());
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") {
        enforcer_tests::skip!("uid 65534 cannot read the scratch config: {err}");
    }
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// Puts the test thread back to SCHED_OTHER when dropped.
struct RealtimeSampler;

impl Drop for RealtimeSampler {
    fn drop(&mut self) {
        let _ = set_thread_policy(0, libc::SCHED_OTHER, 0);
    }
}

/// Runs a job into its deadline with a hook on every event that records
/// its own `stat` line in `dir`, and samples the supervisor's (main
/// thread's) policy every millisecond meanwhile, from a real-time thread
/// so that the 50 ms window is not missed on a busy machine. Returns the
/// real-time policies seen and the enforcer's stderr.
fn sample_realtime_window(s: &Scratch, dir: &Path) -> (Vec<i32>, String) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = s.config_named("hooks.toml", "on_event_timeout = \"5s\"");
    let d = dir.display();
    let hook = format!(
        "read -r own < /proc/$$/stat; printf '%s\\n' \"$own\" > {d}/$$.tmp; mv {d}/$$.tmp {d}/$$"
    );
    let name = unique_name("rtwindow");
    let child = enforcer()
        .args([
            "--log",
            "debug",
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--job",
            &name,
            "--timeout",
            "1s",
            "--on-event",
            &hook,
            "--",
            "sleep",
            "10",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = EnforcerGuard(child);
    let pid = child.0.id() as i32;
    let sampler = set_thread_policy(0, libc::SCHED_FIFO, 1)
        .ok()
        .map(|()| RealtimeSampler);
    let mut seen = Vec::new();
    while child.0.try_wait().unwrap().is_none() {
        if let Ok(p) = thread_policy(pid)
            && p & !libc::SCHED_RESET_ON_FORK != libc::SCHED_OTHER
        {
            seen.push(p);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(sampler);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    eprintln!("{err}");
    assert_eq!(child.0.wait().unwrap().code(), Some(124));
    assert_no_cgroup_left(&name);
    (seen, err)
}

fn hooks_never_inherit_the_supervisors_realtime_window_or_priority() {
    let s = Scratch::new("enforcer-input");
    for attempt in 0..3 {
        let dir = s.path(&format!("hooks{attempt}"));
        let (seen, err) = sample_realtime_window(&s, &dir);
        if err.contains("could not change the supervisor's scheduling class") {
            enforcer_tests::skip!("the supervisor cannot use SCHED_FIFO here: {err}");
        }
        let mut hooks = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                continue;
            }
            let own = std::fs::read_to_string(e.path()).unwrap();
            assert_eq!(
                stat_field(&own, STAT_POLICY),
                i64::from(libc::SCHED_OTHER),
                "a hook ran real-time: {own}"
            );
            assert_eq!(
                stat_field(&own, STAT_NICE),
                0,
                "a hook ran at the supervisor's nice: {own}"
            );
            hooks += 1;
        }
        assert!(hooks >= 2, "the hooks did not run: {err}");
        if seen.is_empty() {
            eprintln!("attempt {attempt}: the real-time window was not sampled; again");
            continue;
        }
        // Whatever is forked in the window (a hook) starts SCHED_OTHER.
        for p in seen {
            assert_eq!(
                p,
                libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
                "the supervisor's real-time policy is inherited by what it forks"
            );
        }
        return;
    }
    panic!("in 3 runs the supervisor was never seen SCHED_FIFO");
}

/// `path` of the line for hierarchy `key` (`""` for v2, else a controller
/// list) in `/proc/<pid>/cgroup` text.
fn cgroup_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            Some((ctrls.to_owned(), path.to_owned()))
        })
        .collect()
}

/// The mount of the hierarchy `ctrls` (`""` = cgroup2).
fn mount_of(ctrls: &str) -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let opts = r.nth(1)?;
            let ok = if ctrls.is_empty() {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && ctrls.split(',').all(|c| opts.split(',').any(|o| o == c))
            };
            ok.then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
}

fn hooks_run_in_a_limited_cgroup_of_their_own_not_the_agents() {
    let s = Scratch::new("enforcer-input");
    let cfg = s.config_named("hooks.toml", "on_event_timeout = \"5s\"");
    let seen = s.path("hook-cgroup");
    // The first hook records where it runs and stays alive a moment so
    // that the test can read its cgroup's limits.
    let hook = format!(
        "cat /proc/self/cgroup > {0}.tmp; mv {0}.tmp {0}; exec sleep 3",
        seen.display()
    );
    let name = unique_name("hookcg");
    let mut enf = EnforcerGuard(
        EnforcerRun::new(&cfg, &name)
            .flags(["--on-event", &hook])
            .job(["sleep", "1"])
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !seen.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the hook never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let hook_cg = std::fs::read_to_string(&seen).unwrap();
    let agent_cg = std::fs::read_to_string(format!("/proc/{}/cgroup", enf.0.id())).unwrap();
    let hooks_dir = format!("{name}.hooks");
    let mut checked_pids = false;
    let mut checked_memory = false;
    for ((ctrls, path), (_, agent_path)) in cgroup_lines(&hook_cg)
        .into_iter()
        .zip(cgroup_lines(&agent_cg))
    {
        let Some(mount) = mount_of(&ctrls) else {
            continue;
        };
        let dir = mount.join(path.trim_start_matches('/'));
        let enforced = ctrls.is_empty()
            || ["pids", "memory", "cpu"]
                .iter()
                .any(|c| ctrls.split(',').any(|x| x == *c));
        if !enforced {
            continue;
        }
        assert_ne!(
            path, agent_path,
            "the hook runs in the agent's cgroup ({ctrls})"
        );
        let job_dir = dir.parent().unwrap();
        assert_eq!(
            job_dir.file_name().unwrap().to_string_lossy(),
            hooks_dir,
            "hook in {} ({ctrls}), not in the hooks cgroup",
            dir.display()
        );
        for (file, want) in [
            ("pids.max", "64"),
            ("memory.max", "268435456"),
            ("memory.limit_in_bytes", "268435456"),
        ] {
            if let Ok(v) = std::fs::read_to_string(job_dir.join(file)) {
                assert_eq!(v.trim(), want, "{}", job_dir.join(file).display());
                checked_pids |= file == "pids.max";
                checked_memory |= file != "pids.max";
            }
        }
    }
    assert!(
        checked_pids && checked_memory,
        "no pids or memory limit found on the hooks cgroup: {hook_cg}"
    );
    assert!(enf.0.wait().unwrap().success());
    assert_no_cgroup_left(&name);
}

enforcer_tests::root_tests!(
    every_out_of_range_flag_and_key_exits_2_naming_it_before_anything_is_created,
    as_root_a_config_or_hook_program_others_could_write_is_refused_naming_owner_and_mode,
    a_user_checking_their_own_config_is_not_held_to_roots_rule,
    hooks_never_inherit_the_supervisors_realtime_window_or_priority,
    hooks_run_in_a_limited_cgroup_of_their_own_not_the_agents,
);
