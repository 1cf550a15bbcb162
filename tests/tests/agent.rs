//! The node agent (`enforcer agent`): jobs of non-root callers run as them
//! and may touch only what is theirs; a `kill -9` of the agent at any point
//! of a job's life loses no job and leaks no cgroup; the CLI gives the same
//! exit codes and report fields with and without the agent; bad messages
//! get clear errors while other clients are served.
//!
//! Each test starts its own agent on a private socket, state and record
//! directory (never the system's), and ends it, also on failure.

use std::{
    io::{Read, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{
    ChildGuard, Scratch, assert_no_cgroup_left, enforcer, eval_workload, is_dead, job_cgroups,
    read_report, root_tests, unique_name,
};

/// The uid and gid a non-root caller runs as (`nobody` on most systems;
/// numeric, so the VMs need no passwd entry).
const NOBODY: u32 = 65534;

/// An agent the test started on its own socket and directories.
struct Agent {
    child: Option<Child>,
    config: PathBuf,
    socket: PathBuf,
    lib: PathBuf,
    log: PathBuf,
    envs: Vec<(String, String)>,
}

impl Agent {
    /// Writes the config (`top` holds top-level keys) and starts the agent.
    fn start(s: &Scratch, top: &str, agent_keys: &str) -> Agent {
        Self::start_with_env(s, top, agent_keys, &[])
    }

    /// [`Agent::start`] with extra environment for the agent.
    fn start_with_env(s: &Scratch, top: &str, agent_keys: &str, envs: &[(&str, &str)]) -> Agent {
        let socket = s.path("run/enforcer.sock");
        let lib = s.path("lib");
        let config = s.config(&format!(
            "{top}\n[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\n{agent_keys}\n",
            socket.display(),
            lib.display()
        ));
        let mut a = Agent {
            child: None,
            config,
            socket,
            lib,
            log: s.path("agent.log"),
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = enforcer()
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .env("ENFORCER_LOG", "info")
            .env("ENFORCER_LOG_FORMAT", "json")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting enforcer agent");
        self.child = Some(child);
        let t0 = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("the agent exited at start ({st}):\n{}", self.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent did not listen within 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: what a crash or an OOM kill of the agent looks like.
    fn kill9(&mut self) {
        let mut c = self.child.take().expect("agent running");
        c.kill().expect("kill -9 agent");
        c.wait().expect("reap agent");
    }

    /// `enforcer` talking to this agent.
    fn cli(&self) -> Command {
        let mut c = enforcer();
        c.env("ENFORCER_SOCKET", &self.socket)
            .env_remove("ENFORCER_NO_AGENT");
        c
    }

    /// `enforcer` talking to this agent as uid/gid 65534 with no
    /// supplementary groups.
    fn cli_as_nobody(&self) -> Command {
        let mut c = self.cli();
        // SAFETY: only async-signal-safe id system calls between fork and
        // exec.
        unsafe {
            c.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// The job records whose shim still holds them (a live job).
    fn live_jobs(&self) -> Vec<String> {
        let Ok(store) = enforcer::agent::store::Store::open(&self.lib) else {
            return Vec::new();
        };
        store
            .ids()
            .unwrap_or_default()
            .into_iter()
            .filter(|id| {
                store
                    .open_job(id)
                    .ok()
                    .and_then(|d| d.try_lock().ok())
                    .is_some_and(|l| l.is_none())
            })
            .collect()
    }

    /// The recorded result of job `id`.
    fn result(&self, id: &str) -> Option<enforcer::agent::store::JobResult> {
        let store = enforcer::agent::store::Store::open(&self.lib).ok()?;
        store.open_job(id).ok()?.result().ok()?
    }

    /// Stops the agent (SIGTERM) and checks that no job of `names` is left
    /// running or has a cgroup left.
    fn stop(mut self, names: &[&str]) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the agent this test started and has not
            // reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                matches!(c.try_wait(), Ok(Some(_))),
                "the agent did not exit on SIGTERM:\n{}",
                self.log_text()
            );
        }
        assert_eq!(self.live_jobs(), Vec::<String>::new(), "shims left running");
        for n in names {
            assert_no_cgroup_left(n);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test may leave jobs: end them through their shims (a
        // signal to a shim ends its job like one to `enforcer run`).
        if let Ok(store) = enforcer::agent::store::Store::open(&self.lib) {
            for id in store.ids().unwrap_or_default() {
                if let Ok(Some(shim)) = store.open_job(&id).and_then(|d| d.shim())
                    && enforcer::agent::store::start_time(shim.pid) == Some(shim.start_time)
                {
                    for _ in 0..2 {
                        // SAFETY: kill(2) of a shim of this test's agent,
                        // its start time checked just above.
                        unsafe { libc::kill(shim.pid, libc::SIGTERM) };
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }
}

fn wait_output(child: Child, limit: Duration) -> Output {
    ChildGuard(child)
        .output_within(limit)
        .unwrap_or_else(|| panic!("the client did not finish within {limit:?}"))
}

/// Waits until job `name` has a cgroup (its command runs).
fn wait_started(name: &str) {
    let t0 = Instant::now();
    while job_cgroups(name).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "job {name} never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn a_non_root_callers_job_runs_as_that_user_and_cannot_write_any_cgroup_file_of_its_own() {
    let s = Scratch::new("enforcer-agent");
    let agent = Agent::start(&s, "", "");
    let name = unique_name("nobody");
    // Writes each limit file and cgroup.procs of the job's cgroups and of
    // every ancestor back with its own value (harmless if it were allowed),
    // and says which writes succeeded.
    let script = r#"
id -u; id -g
while IFS=: read -r n ctrl path; do
  case "$ctrl" in
    "") fs=cgroup2; opt="" ;;
    name=*) continue ;;
    *) fs=cgroup; opt="${ctrl%%,*}" ;;
  esac
  mnt=$(awk -v fs="$fs" -v opt="$opt" '$3==fs && (opt=="" || index(","$4",", ","opt",")) {print $2; exit}' /proc/mounts)
  [ -n "$mnt" ] || continue
  [ "$path" = / ] && continue
  d="$mnt$path"
  while :; do
    for f in cgroup.procs memory.max memory.limit_in_bytes pids.max cpu.max cpu.cfs_quota_us cgroup.subtree_control; do
      [ -e "$d/$f" ] || continue
      echo "TRIED $d/$f"
      if [ "$f" = cgroup.procs ]; then v=$$; else v=$(head -n1 "$d/$f"); fi
      if (echo "$v" > "$d/$f") 2>/dev/null; then echo "WROTE $d/$f"; fi
    done
    [ "$d" = "$mnt" ] && break
    d=$(dirname "$d")
  done
done < /proc/self/cgroup
"#;
    let out = agent
        .cli_as_nobody()
        .args([
            "run",
            "--job",
            &name,
            "--timeout",
            "60s",
            "--",
            "/bin/sh",
            "-c",
            script,
        ])
        .output()
        .expect("enforcer run as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", agent.log_text());
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("65534"), "uid");
    assert_eq!(lines.next(), Some("65534"), "gid");
    assert!(
        stdout.contains("TRIED"),
        "the job found no cgroup file to try"
    );
    let wrote: Vec<&str> = stdout.lines().filter(|l| l.starts_with("WROTE")).collect();
    assert!(wrote.is_empty(), "the job wrote cgroup files: {wrote:?}");
    agent.stop(&[&name]);
}

fn a_non_root_callers_game_runs_through_the_agent_as_that_user_under_its_deadline() {
    let s = Scratch::new("enforcer-agent");
    let agent = Agent::start(&s, "", "");
    let name = unique_name("nobodygame");
    let bin = enforcer_tests::enforcer_bin();
    let bin = bin.display();
    let script = format!(
        "{bin} game --timeout 1s -- /bin/sh -c 'id -u; sleep 30'; echo game=$?; {bin} game -- /bin/sh -c 'exit 5'; echo game=$?"
    );
    let out = agent
        .cli_as_nobody()
        .args([
            "run",
            "--job",
            &name,
            "--timeout",
            "60s",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .output()
        .expect("enforcer run as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", agent.log_text());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, ["65534", "game=124", "game=5"], "{stdout}");
    agent.stop(&[&name]);
}

fn a_non_root_caller_cannot_attach_a_root_process_nor_see_or_cancel_roots_jobs() {
    let s = Scratch::new("enforcer-agent");
    let agent = Agent::start(&s, "max_concurrent_jobs = 4", "");
    let root_proc = ChildGuard(Command::new("sleep").arg("60").spawn().expect("sleep"));
    let out = agent
        .cli_as_nobody()
        .args([
            "attach",
            "--pid",
            &root_proc.pid().to_string(),
            "--timeout",
            "5s",
        ])
        .output()
        .expect("attach as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(err.contains("its own processes"), "{err}");
    assert!(
        !is_dead(root_proc.pid() as i32),
        "the root process was touched"
    );

    let name = unique_name("rootjob");
    let root_client = agent
        .cli()
        .args([
            "run",
            "--job",
            &name,
            "--timeout",
            "60s",
            "--",
            "sleep",
            "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("root run");
    let mut root_client = ChildGuard(root_client);
    wait_started(&name);
    let status = agent
        .cli_as_nobody()
        .args(["ctl", "status"])
        .output()
        .expect("status");
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!text.contains(&name), "nobody sees root's job: {text}");
    let root_view = agent
        .cli()
        .args(["ctl", "status"])
        .output()
        .expect("status");
    assert!(
        String::from_utf8_lossy(&root_view.stdout).contains(&name),
        "{root_view:?}"
    );

    let cancel = agent
        .cli_as_nobody()
        .args(["ctl", "cancel", &name])
        .output()
        .expect("cancel");
    assert_eq!(cancel.status.code(), Some(2), "{cancel:?}");
    assert!(
        String::from_utf8_lossy(&cancel.stderr).contains("no job"),
        "{cancel:?}"
    );
    let log = agent.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused") && l.contains("\"uid\":65534"))
        .collect();
    assert!(
        refusals.len() >= 2,
        "each refusal is logged with the caller's uid and pid:\n{log}"
    );
    assert!(
        matches!(root_client.try_wait(), Ok(None)),
        "root's job was ended"
    );
    // Root may cancel it: the client then ends with the status of a job
    // ended by SIGTERM.
    let cancel = agent
        .cli()
        .args(["ctl", "cancel", &name])
        .output()
        .expect("cancel");
    assert_eq!(cancel.status.code(), Some(0), "{cancel:?}");
    assert!(root_client.exits_within(Duration::from_secs(20)));
    assert_eq!(
        root_client.try_wait().unwrap().and_then(|s| s.code()),
        Some(143)
    );
    agent.stop(&[&name]);
}

fn kill_9_of_the_agent_during_a_job_keeps_its_original_deadline_and_the_client_gets_124() {
    let s = Scratch::new("enforcer-agent");
    let mut agent = Agent::start(&s, "", "");
    let name = unique_name("crash");
    let rep = s.path("report.json");
    let client = agent
        .cli()
        .args(["run", "--job", &name, "--timeout", "8s", "--report"])
        .arg(&rep)
        .args(["--", "sleep", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    wait_started(&name);
    std::thread::sleep(Duration::from_secs(1));
    agent.kill9();
    // Down for a while: a job restarted from zero at the restart would
    // last 3 s longer than its deadline.
    std::thread::sleep(Duration::from_secs(3));
    agent.spawn();
    let out = wait_output(client, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(124),
        "{out:?}\n{}",
        agent.log_text()
    );
    let r = read_report(&rep);
    assert_eq!(r["reason"], "deadline", "{r}");
    let wall = r["wall_s"].as_f64().unwrap();
    assert!(
        wall < 10.5,
        "killed at its original deadline, not later: {wall} s"
    );
    assert!(
        agent.log_text().contains("re-adopting a live job"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.result(&name).map(|r| r.status), Some(124));
    agent.stop(&[&name]);
}

fn kill_9_of_the_agent_during_the_deadline_kill_loses_nothing() {
    let s = Scratch::new("enforcer-agent");
    let mut agent = Agent::start(&s, "", "");
    let name = unique_name("grace");
    let client = agent
        .cli()
        .args([
            "run",
            "--job",
            &name,
            "--timeout",
            "2s",
            "--kill-grace",
            "4s",
        ])
        .args(["--", "/bin/sh", "-c", "trap '' TERM; sleep 60"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    wait_started(&name);
    // Into the kill grace: SIGTERM went out at 2 s and is ignored.
    std::thread::sleep(Duration::from_secs(3));
    agent.kill9();
    std::thread::sleep(Duration::from_millis(500));
    agent.spawn();
    let out = wait_output(client, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(124),
        "{out:?}\n{}",
        agent.log_text()
    );
    agent.stop(&[&name]);
}

fn kill_9_of_the_agent_between_plan_and_spawn_answers_the_waiting_client_with_125() {
    let s = Scratch::new("enforcer-agent");
    let mut agent = Agent::start_with_env(
        &s,
        "",
        "",
        &[("ENFORCER_TEST_AGENT_STALL_BEFORE_SPAWN", "1")],
    );
    let name = unique_name("stalled");
    let client = agent
        .cli()
        .args([
            "run",
            "--job",
            &name,
            "--timeout",
            "20s",
            "--",
            "sleep",
            "60",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let client = ChildGuard(client);
    let plan = agent.lib.join("jobs").join(&name).join("plan.json");
    let t0 = Instant::now();
    while !plan.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no plan was persisted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    if !job_cgroups(&name).is_empty() || !agent.log_text().contains("stalling before the shim") {
        enforcer_tests::skip!(
            "the enforcer under test was built without the test-audit feature (cargo build -p enforcer --features test-audit)"
        );
    }
    agent.kill9();
    agent.envs.clear();
    agent.spawn();
    let out = client
        .output_within(Duration::from_secs(60))
        .expect("the client never got an answer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}\n{}", agent.log_text());
    assert!(err.contains("before the job started"), "{err}");
    assert!(
        job_cgroups(&name).is_empty(),
        "a job that never started made a cgroup"
    );
    agent.stop(&[&name]);
}

fn kill_9_of_the_agent_before_the_spawn_answers_the_job_as_not_run_and_makes_no_cgroup() {
    use enforcer::agent::store::{JobKind, JobPlan, Store, now_ms};
    let s = Scratch::new("enforcer-agent");
    let mut agent = Agent::start(&s, "", "");
    // What an agent killed between persisting a plan and starting its shim
    // leaves: the plan and nothing else.
    agent.kill9();
    let name = unique_name("unspawned");
    let (config, _) =
        enforcer::config::Config::load_or_default(Some(&agent.config)).expect("config");
    let store = Store::open(&agent.lib).expect("store");
    let dir = store.create(&name).expect("create").expect("new id");
    dir.write_plan(&JobPlan {
        id: name.clone(),
        kind: JobKind::Run {
            command: vec!["sleep".into(), "60".into()],
        },
        request: enforcer::job::plan::JobRequest {
            job: Some(name.clone()),
            ..Default::default()
        },
        config,
        caller_uid: 0,
        caller_pid: 1,
        env: Vec::new(),
        cwd: "/".into(),
        run_as: None,
        training: None,
        external_budget: false,
        accepted_unix_ms: now_ms(),
        deadline_unix_ms: now_ms() + 60_000,
        kill_grace_ms: 0,
    })
    .expect("plan");
    drop(dir);
    agent.spawn();
    let out = agent
        .cli()
        .args(["ctl", "report", &name, "--wait"])
        .output()
        .expect("report");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text.contains("\"status\":125") && text.contains("before the job started"),
        "{text}"
    );
    assert!(
        job_cgroups(&name).is_empty(),
        "a job that never started made a cgroup"
    );
    agent.stop(&[&name]);
}

fn a_non_root_user_without_an_agent_is_told_to_start_one_and_nothing_runs() {
    let s = Scratch::new("enforcer-agent");
    let name = unique_name("noagent");
    let marker = s.path("ran");
    let mut cmd = enforcer();
    cmd.env_remove("ENFORCER_SOCKET")
        .env_remove("ENFORCER_NO_AGENT")
        .args(["run", "--job", &name, "--timeout", "10s", "--", "touch"])
        .arg(&marker);
    if UnixStream::connect(enforcer::agent::client::DEFAULT_SOCKET).is_ok() {
        enforcer_tests::skip!("an agent listens on this node's default socket");
    }
    // SAFETY: only async-signal-safe id system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("enforcer run as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("enforcer agent") && err.contains("systemctl start enforcer"),
        "{err}"
    );
    assert!(!marker.exists(), "the command ran");
    assert_no_cgroup_left(&name);
}

fn subscribers_get_the_events_of_their_own_jobs_only() {
    let s = Scratch::new("enforcer-agent");
    let agent = Agent::start(&s, "", "");
    let spawn_sub = |mut cmd: Command| {
        let mut c = ChildGuard(
            cmd.args(["ctl", "subscribe"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("subscribe"),
        );
        // The first line says the subscription is in place.
        let mut out = c.stdout.take().expect("stdout");
        let mut first = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            first.push(b[0]);
        }
        assert!(String::from_utf8_lossy(&first).contains("status"));
        (c, out)
    };
    let (root_sub, mut root_out) = spawn_sub(agent.cli());
    let (nobody_sub, mut nobody_out) = spawn_sub(agent.cli_as_nobody());
    let name = unique_name("events");
    let out = agent
        .cli()
        .args([
            "run",
            "--job",
            &name,
            "--timeout",
            "1s",
            "--",
            "sleep",
            "30",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
    drop(root_sub);
    drop(nobody_sub);
    let mut root_text = String::new();
    root_out.read_to_string(&mut root_text).unwrap();
    let mut nobody_text = String::new();
    nobody_out.read_to_string(&mut nobody_text).unwrap();
    for event in ["started", "deadline", "exited"] {
        assert!(
            root_text.contains(&format!("\"id\":\"{name}\",\"event\":\"{event}\"")),
            "{event} missing: {root_text}"
        );
    }
    assert!(
        !nobody_text.contains(&name),
        "nobody saw root's job: {nobody_text}"
    );
    agent.stop(&[&name]);
}

/// Sends SIGTERM to the agent and waits for it to exit.
fn term(agent: &mut Agent) {
    let mut c = agent.child.take().expect("agent running");
    // SAFETY: kill(2) on the agent this test started and has not reaped.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while matches!(c.try_wait(), Ok(None)) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm_to_the_agent_keeps_jobs_running_by_default_and_a_new_agent_finishes_them() {
    let s = Scratch::new("enforcer-agent");
    let mut agent = Agent::start(&s, "", "");
    let name = unique_name("keep");
    let client = agent
        .cli()
        .args(["run", "--job", &name, "--timeout", "60s"])
        .args(["--", "/bin/sh", "-c", "sleep 4; exit 7"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    wait_started(&name);
    term(&mut agent);
    assert!(
        !job_cgroups(&name).is_empty(),
        "the job was ended with the agent"
    );
    agent.spawn();
    let out = wait_output(client, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(7), "{out:?}\n{}", agent.log_text());
    agent.stop(&[&name]);
}

fn sigterm_to_the_agent_with_on_agent_stop_end_ends_its_jobs_and_answers_their_clients() {
    let s = Scratch::new("enforcer-agent");
    let mut agent = Agent::start(&s, "", "on_agent_stop = \"end\"");
    let name = unique_name("end");
    let client = agent
        .cli()
        .args([
            "run",
            "--job",
            &name,
            "--timeout",
            "60s",
            "--",
            "sleep",
            "60",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    wait_started(&name);
    term(&mut agent);
    let out = wait_output(client, Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(143),
        "{out:?}\n{}",
        agent.log_text()
    );
    assert_no_cgroup_left(&name);
    agent.stop(&[&name]);
}

/// One job run in-process and through the agent: exit code and report.
fn both_ways(
    agent: &Agent,
    s: &Scratch,
    flags: &[&str],
    command: &[&str],
) -> [(Option<i32>, serde_json::Value); 2] {
    let run = |via_agent: bool| {
        let name = unique_name("same");
        let rep = s.path(&format!("{name}.json"));
        let mut cmd = if via_agent {
            agent.cli()
        } else {
            let mut c = enforcer();
            c.env("ENFORCER_NO_AGENT", "1");
            c
        };
        cmd.args(["run", "--config"])
            .arg(&agent.config)
            .args(["--job", &name, "--report"])
            .arg(&rep)
            .args(flags)
            .arg("--")
            .args(command);
        let out = cmd.output().expect("enforcer run");
        eprintln!(
            "{} {command:?} -> {:?}",
            if via_agent { "agent" } else { "in-process" },
            out.status
        );
        assert_no_cgroup_left(&name);
        let r = if rep.exists() {
            read_report(&rep)
        } else {
            serde_json::Value::Null
        };
        (out.status.code(), r)
    };
    [run(false), run(true)]
}

fn the_cli_gives_the_same_exit_codes_and_report_fields_with_and_without_the_agent() {
    let s = Scratch::new("enforcer-agent");
    let agent = Agent::start(&s, "", "");
    let w = eval_workload!();
    let w = w.to_str().unwrap();
    let cases: [(&[&str], Vec<&str>, i32); 5] = [
        (&[], vec!["true"], 0),
        (&[], vec!["/bin/sh", "-c", "exit 3"], 3),
        (&["--timeout", "1s"], vec!["sleep", "30"], 124),
        (&["--memory", "200M"], vec![w, "memhog", "2000", "100"], 137),
        (&[], vec!["no-such-command-anywhere"], 127),
    ];
    for (flags, command, want) in cases {
        let [(code_a, rep_a), (code_b, rep_b)] = both_ways(&agent, &s, flags, &command);
        assert_eq!(code_a, Some(want), "in-process {command:?}");
        assert_eq!(
            code_b,
            code_a,
            "through the agent {command:?}\n{}",
            agent.log_text()
        );
        for field in [
            "reason",
            "exit_code",
            "signal",
            "memory_limit_bytes",
            "pids_limit",
            "uid",
            "gid",
        ] {
            assert_eq!(rep_a[field], rep_b[field], "{field} of {command:?}");
        }
    }
    agent.stop(&[]);
}

fn bad_messages_get_a_clear_error_and_the_agent_keeps_serving_others() {
    let s = Scratch::new("enforcer-agent");
    let agent = Agent::start(&s, "", "");
    let connect = || {
        let c = UnixStream::connect(&agent.socket).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c
    };
    let read_line = |c: &mut UnixStream| {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let hello = |c: &mut UnixStream| {
        c.write_all(b"{\"type\":\"hello\",\"api\":1}\n").unwrap();
        let l = read_line(c);
        assert!(l.contains("\"hello\""), "{l}");
    };
    // A client that stalls in the middle of a message holds only itself.
    let mut stalled = connect();
    hello(&mut stalled);
    stalled.write_all(b"{\"type\":\"sta").unwrap();

    let mut c = connect();
    c.write_all(b"{\"type\":\"status\"}\n").unwrap();
    assert!(read_line(&mut c).contains("the first message must be"));

    let mut c = connect();
    c.write_all(b"{\"type\":\"hello\",\"api\":99}\n").unwrap();
    assert!(read_line(&mut c).contains("speaks version 1"));

    let mut c = connect();
    hello(&mut c);
    c.write_all(b"{not json\n").unwrap();
    assert!(read_line(&mut c).contains("malformed message"));
    c.write_all(b"{\"type\":\"format_disk\"}\n").unwrap();
    let l = read_line(&mut c);
    assert!(l.contains("unknown variant `format_disk`"), "{l}");
    c.write_all(b"{\"type\":\"run\",\"job\":{\"sudo\":true},\"command\":[\"true\"]}\n")
        .unwrap();
    let l = read_line(&mut c);
    assert!(l.contains("unknown field `sudo`"), "{l}");
    c.write_all(b"{\"type\":\"run\",\"job\":{},\"command\":[\"true\"]}\n")
        .unwrap();
    assert!(read_line(&mut c).contains("3 file descriptors"));
    // Still served on the same connection after all that.
    c.write_all(b"{\"type\":\"status\"}\n").unwrap();
    assert!(read_line(&mut c).contains("\"status\""));

    let mut big = connect();
    hello(&mut big);
    let _ = big.write_all(&vec![b'x'; (1 << 20) + 10]);
    let l = read_line(&mut big);
    assert!(l.contains("longer than 1048576 bytes"), "{l}");

    let mut t = connect();
    hello(&mut t);
    t.write_all(b"{\"type\":\"stat").unwrap();
    t.shutdown(std::net::Shutdown::Write).unwrap();
    let l = read_line(&mut t);
    assert!(l.contains("closed in the middle of a message"), "{l}");

    // Another client's job runs while the stalled one still stalls.
    let name = unique_name("served");
    let out = agent
        .cli()
        .args(["run", "--job", &name, "--timeout", "30s", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", agent.log_text());
    drop(stalled);
    agent.stop(&[&name]);
}

root_tests!(
    a_non_root_callers_job_runs_as_that_user_and_cannot_write_any_cgroup_file_of_its_own,
    a_non_root_caller_cannot_attach_a_root_process_nor_see_or_cancel_roots_jobs,
    a_non_root_callers_game_runs_through_the_agent_as_that_user_under_its_deadline,
    kill_9_of_the_agent_during_a_job_keeps_its_original_deadline_and_the_client_gets_124,
    kill_9_of_the_agent_during_the_deadline_kill_loses_nothing,
    kill_9_of_the_agent_between_plan_and_spawn_answers_the_waiting_client_with_125,
    kill_9_of_the_agent_before_the_spawn_answers_the_job_as_not_run_and_makes_no_cgroup,
    the_cli_gives_the_same_exit_codes_and_report_fields_with_and_without_the_agent,
    bad_messages_get_a_clear_error_and_the_agent_keeps_serving_others,
    sigterm_to_the_agent_keeps_jobs_running_by_default_and_a_new_agent_finishes_them,
    a_non_root_user_without_an_agent_is_told_to_start_one_and_nothing_runs,
    subscribers_get_the_events_of_their_own_jobs_only,
    sigterm_to_the_agent_with_on_agent_stop_end_ends_its_jobs_and_answers_their_clients,
);
