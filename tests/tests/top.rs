//! `enforcer top` in a real terminal: a detached tmux session of a fixed
//! size runs it against an agent the test starts on its own socket and
//! directories; the test reads the screen with `tmux capture-pane` and
//! types with `tmux send-keys`. The tmux server is private to the test
//! (`tmux -L`) and killed, with everything in it, when the test ends.
//!
//! Without tmux (the VMs) the terminal tests are skipped, saying so.

use std::{
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{
    ChildGuard, Scratch, enforcer, enforcer_bin, job_cgroups, root_tests, unique_name,
};

/// An agent on the test's own socket and directories, ended on drop with
/// the jobs it left.
struct Agent {
    child: Option<Child>,
    socket: PathBuf,
    lib: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(s: &Scratch) -> Agent {
        let socket = s.path("run/enforcer.sock");
        let lib = s.path("lib");
        let config = s.config(&format!(
            "[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\n",
            socket.display(),
            lib.display()
        ));
        let log = s.path("agent.log");
        let out = std::fs::File::create(&log).expect("agent log");
        let child = enforcer()
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .env("ENFORCER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("starting enforcer agent");
        let mut a = Agent {
            child: Some(child),
            socket,
            lib,
            log,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&a.socket).is_err() {
            if let Some(Ok(Some(st))) = a.child.as_mut().map(Child::try_wait) {
                panic!("the agent exited at start ({st}):\n{}", a.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent did not listen within 20 s:\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `enforcer` talking to this agent.
    fn cli(&self) -> Command {
        let mut c = enforcer();
        c.env("ENFORCER_SOCKET", &self.socket)
            .env_remove("ENFORCER_NO_AGENT");
        c
    }

    /// `enforcer run` of `sleep secs` as job `name` with a 100M memory
    /// limit, through this agent; returns once the job's cgroup exists.
    fn sleep_job(&self, name: &str, secs: u32) -> ChildGuard {
        let client = self
            .cli()
            .args([
                "run",
                "--job",
                name,
                "--timeout",
                "120s",
                "--memory",
                "100M",
            ])
            .args(["--", "sleep", &secs.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("enforcer run");
        let client = ChildGuard(client);
        let t0 = Instant::now();
        while job_cgroups(name).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "job {name} never started:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        client
    }

    /// `enforcer ctl report --wait` of job `name`: the agent's answer.
    fn report(&self, name: &str) -> serde_json::Value {
        let out = self
            .cli()
            .args(["ctl", "report", "--wait", name])
            .output()
            .expect("enforcer ctl report");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("a JSON answer")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Jobs a failed test left: ended through their shims, as a signal
        // to `enforcer run` would end them.
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

/// A private tmux server with one detached session running a shell
/// command in a terminal of a fixed size; killed on drop.
struct Tmux {
    server: String,
}

const SESSION: &str = "top";

impl Tmux {
    /// Skips the test (visibly) where tmux is not installed.
    fn required() {
        let found = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            enforcer_tests::skip!("tmux is not installed: `enforcer top` is not driven here");
        }
    }

    fn start(command: &str, width: u16, height: u16) -> Tmux {
        let t = Tmux {
            server: unique_name("enforcer-top-test"),
        };
        let out = t
            .tmux()
            .args(["new-session", "-d", "-s", SESSION])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .arg(command)
            .output()
            .expect("starting tmux");
        assert!(out.status.success(), "tmux new-session: {out:?}");
        t
    }

    /// `tmux` on this test's server, UTF-8 (the screen has block and arrow
    /// characters).
    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-u", "-L", &self.server]).env("LANG", "C.UTF-8");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.tmux().args(args).output().expect("tmux");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        out
    }

    /// The screen as text.
    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", SESSION]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `keys` (tmux key names, e.g. `s`, `Down`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", SESSION];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// A format of the pane, e.g. `#{alternate_on}`.
    fn pane(&self, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", SESSION, format]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The screen once `ok` holds for it (within 30 s).
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the screen never showed {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .tmux()
            .arg("kill-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The shell command the pane runs: a line before, `enforcer top`, its
/// exit status and whether the terminal is back in canonical mode after
/// it; then it stays so that the screen can be read.
fn top_in_pane(agent: &Agent, interval: &str) -> String {
    format!(
        "echo before-top; ENFORCER_LOG=warn {} top --socket {} --interval {interval}; echo top-exit=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -- '-*icanon'; sleep 600",
        enforcer_bin().display(),
        agent.socket.display()
    )
}

/// The line of the screen that holds `needle`.
fn line_with<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}:\n{screen}"))
}

fn top_shows_a_job_sorts_cancels_it_through_the_agent_and_quits_restoring_the_terminal() {
    Tmux::required();
    let s = Scratch::new("enforcer-top");
    let agent = Agent::start(&s);
    let name = unique_name("topjob");
    let mut client = agent.sleep_job(&name, 120);
    let tmux = Tmux::start(&top_in_pane(&agent, "300ms"), 160, 30);
    let screen = tmux.wait_for("the job with its memory and limit", |s| {
        s.lines().any(|l| l.contains(&name) && l.contains("/100M"))
    });
    eprintln!("{screen}");
    let row = line_with(&screen, &name);
    assert!(row.contains("running") && row.contains("root"), "{row}");
    assert!(
        row.trim_start().starts_with('>'),
        "the only job is selected: {row}"
    );
    let header = line_with(&screen, "USER").to_owned();
    assert!(header.contains("CPU▼"), "sorted by CPU first: {header}");
    assert!(
        screen.contains("agent pid"),
        "the agent's own cost: {screen}"
    );

    tmux.keys(&["s"]);
    let screen = tmux.wait_for("the sort moved to THR", |s| s.contains("THR▼"));
    assert!(!line_with(&screen, "USER").contains("CPU▼"), "{screen}");

    tmux.keys(&["Home", "c"]);
    tmux.wait_for("the question before a cancel", |s| {
        s.contains(&format!("cancel job {name}? y: yes"))
    });
    tmux.keys(&["y"]);
    tmux.wait_for("the job ended by the cancel", |s| {
        s.contains("cancel sent")
            && s.lines()
                .any(|l| l.contains(&name) && l.contains("exit 143"))
    });
    let answer = agent.report(&name);
    assert_eq!(answer["type"], "finished", "{answer}");
    assert_eq!(
        answer["status"], 143,
        "ended by the forwarded SIGTERM: {answer}"
    );
    assert_eq!(answer["report"]["reason"], "killed", "{answer}");
    assert!(client.exits_within(Duration::from_secs(20)));
    assert_eq!(client.try_wait().unwrap().and_then(|s| s.code()), Some(143));
    enforcer_tests::assert_no_cgroup_left(&name);

    tmux.keys(&["q"]);
    // The pane's shell prints top's status, then the terminal's icanon
    // flag.
    let screen = tmux.wait_for("the terminal's mode after top", |s| {
        s.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(screen.contains("top-exit=0"), "{screen}");
    assert!(
        screen.contains("before-top") && !screen.contains("USER"),
        "the shell's screen is back, top's is gone: {screen}"
    );
    assert!(
        screen.lines().any(|l| l.trim() == "icanon"),
        "the terminal is out of raw mode: {screen}"
    );
    assert_eq!(
        tmux.pane("#{alternate_on}"),
        "0",
        "left the alternate screen"
    );
    assert_eq!(
        tmux.pane("#{cursor_flag}"),
        "1",
        "the cursor is shown again"
    );
}

fn a_cancel_the_agent_refuses_shows_its_message_on_the_status_line() {
    Tmux::required();
    let s = Scratch::new("enforcer-top");
    let agent = Agent::start(&s);
    let name = unique_name("topended");
    let mut client = agent.sleep_job(&name, 5);
    // One answer a minute: the screen still shows the job running after it
    // has ended, so the cancel reaches the agent for an ended job.
    let tmux = Tmux::start(&top_in_pane(&agent, "60s"), 160, 30);
    tmux.wait_for("the job running", |s| {
        s.lines()
            .any(|l| l.contains(&name) && l.contains("running"))
    });
    assert!(
        client.exits_within(Duration::from_secs(30)),
        "the job did not end"
    );
    tmux.keys(&["c"]);
    tmux.wait_for("the question before a cancel", |s| s.contains("y: yes"));
    tmux.keys(&["y"]);
    let screen = tmux.wait_for("the agent's refusal", |s| s.contains("not cancelled"));
    let status = line_with(&screen, "not cancelled");
    assert!(
        status.contains(&format!("job {name} has already ended")),
        "the agent's own words: {status}"
    );
    tmux.keys(&["q"]);
    tmux.wait_for("top's exit status", |s| s.contains("top-exit=0"));
}

fn without_an_agent_top_exits_2_naming_the_socket_and_how_to_start_one() {
    let s = Scratch::new("enforcer-top");
    let socket = s.path("no-agent.sock");
    let out = enforcer()
        .args(["top", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .output()
        .expect("enforcer top");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains("no enforcer agent answers on")
            && err.contains(&socket.display().to_string())
            && err.contains("systemctl start enforcer"),
        "{err}"
    );
    let out = enforcer()
        .args(["top", "--interval", "10ms", "--socket"])
        .arg(&socket)
        .output()
        .expect("enforcer top");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains("--interval 10ms") && err.contains("from 100ms to 1m"),
        "the flag, its value and the range: {err}"
    );
}

root_tests!(
    top_shows_a_job_sorts_cancels_it_through_the_agent_and_quits_restoring_the_terminal,
    a_cancel_the_agent_refuses_shows_its_message_on_the_status_line,
    without_an_agent_top_exits_2_naming_the_socket_and_how_to_start_one,
);
