//! What a non-root caller of the agent sees: in every part of its `status`
//! answer only its own jobs and the trainings it registered or protects.
//! Root's jobs that protect root's training or the caller's own training
//! are not named to it, nor is root's training; the caller's training
//! counts the jobs it does not name.
//!
//! `enforcer top` of that caller, driven in a private tmux server where
//! tmux is installed, shows the same and no more.
//!
//! The test starts its own agent on a private socket and record directory
//! and ends it (with its jobs), also on failure.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{
    ChildGuard, EnforcerGuard, Scratch, assert_no_cgroup_left, enforcer, job_cgroups, root_tests,
    unique_name,
};
use serde_json::Value;

/// The uid and gid of the non-root caller (numeric: the VMs have no
/// passwd entry for it).
const NOBODY: u32 = 65534;

/// Makes `cmd` run as uid/gid 65534 with no supplementary groups.
fn as_nobody(cmd: &mut Command) -> &mut Command {
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
    cmd
}

/// An agent the test started; SIGTERM on drop ends it and (with
/// `on_agent_stop = "end"`) its jobs.
struct Agent {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(s: &Scratch) -> Agent {
        let socket = s.path("run/enforcer.sock");
        let config = s.config(&format!(
            "max_concurrent_jobs = 4\n[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\non_agent_stop = \"end\"\n",
            socket.display(),
            s.path("lib").display()
        ));
        let log = s.path("agent.log");
        let child = enforcer()
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .env("ENFORCER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("starting enforcer agent");
        let mut agent = Agent { child, socket, log };
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&agent.socket).is_err() {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("the agent exited at start ({st}):\n{}", agent.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent did not listen within 20 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `enforcer` talking to this agent (as root).
    fn cli(&self) -> Command {
        let mut c = enforcer();
        c.env("ENFORCER_SOCKET", &self.socket)
            .env_remove("ENFORCER_NO_AGENT")
            .stdin(Stdio::null());
        c
    }

    /// `enforcer ctl status` as root, or as 65534; the answer as JSON.
    fn status(&self, nobody: bool) -> Value {
        let mut c = self.cli();
        if nobody {
            as_nobody(&mut c);
        }
        let out = c.args(["ctl", "status"]).output().expect("ctl status");
        assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", self.log_text());
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {out:?}"))
    }

    /// Starts job `name` protecting training `pid` (`enforcer run` through
    /// the agent, as root or as 65534): `sleep 120`.
    fn run_protecting(&self, name: &str, pid: u32, nobody: bool) -> EnforcerGuard {
        let mut c = self.cli();
        if nobody {
            as_nobody(&mut c);
        }
        let pid = pid.to_string();
        c.args(["run", "--job", name, "--protect", &pid, "--budget", "5%"])
            .args(["--timeout", "120s", "--", "sleep", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        EnforcerGuard(c.spawn().expect("enforcer run"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the agent this test started and has not
            // reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while matches!(self.child.try_wait(), Ok(None))
                && t0.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ids of the jobs a training entry of `status` names.
fn training_jobs(t: &Value) -> Vec<String> {
    ["jobs", "pending_jobs"]
        .iter()
        .filter_map(|k| t[k].as_array())
        .flatten()
        .filter_map(|j| j.as_str().or_else(|| j["job"].as_str()).map(str::to_owned))
        .collect()
}

fn trainings(status: &Value) -> Vec<Value> {
    status["budget"]["trainings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn training_id(t: &Value) -> String {
    t["id"]
        .as_str()
        .or_else(|| t["training"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn a_non_root_callers_status_names_none_of_roots_jobs_nor_roots_training() {
    let s = Scratch::new("enforcer-agent-privacy");
    let agent = Agent::start(&s);
    let roots_training = ChildGuard(
        Command::new("sleep")
            .arg("300")
            .spawn()
            .expect("root's training"),
    );
    let own_training = ChildGuard(
        as_nobody(Command::new("sleep").arg("300"))
            .spawn()
            .expect("65534's training"),
    );

    let mine = unique_name("privacy-mine");
    let root_own = unique_name("privacy-root-own");
    let root_in_mine = unique_name("privacy-root-in-mine");
    let _jobs = [
        agent.run_protecting(&mine, own_training.pid(), true),
        agent.run_protecting(&root_own, roots_training.pid(), false),
    ];
    // Root joins 65534's training once 65534 has registered it (root may
    // protect any training).
    let t0 = Instant::now();
    while job_cgroups(&mine).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "65534's job never started\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _root_in_mine = agent.run_protecting(&root_in_mine, own_training.pid(), false);

    // Until root sees all three jobs in the budget part.
    let names = [&mine, &root_own, &root_in_mine];
    let t0 = Instant::now();
    let root_view = loop {
        let status = agent.status(false);
        let listed: Vec<String> = trainings(&status).iter().flat_map(training_jobs).collect();
        if names
            .iter()
            .all(|n| listed.iter().any(|id| id.contains(n.as_str())))
        {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the budget never held all three jobs: {status}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let roots_training_id = trainings(&root_view)
        .iter()
        .map(training_id)
        .find(|id| id.contains(&roots_training.pid().to_string()))
        .unwrap_or_else(|| panic!("root's training is not in root's status: {root_view}"));

    let view = agent.status(true);
    let text = view.to_string();
    eprintln!("65534's status: {text}");
    assert!(
        text.contains(mine.as_str()),
        "65534 does not see its own job: {text}"
    );
    for hidden in [&root_own, &root_in_mine] {
        assert!(
            !text.contains(hidden.as_str()),
            "65534's status names root's job {hidden}: {text}"
        );
    }
    assert!(
        !text.contains(&format!("\"{roots_training_id}\"")),
        "65534's status names root's training {roots_training_id}: {text}"
    );
    let t = trainings(&view);
    assert_eq!(t.len(), 1, "only 65534's own training: {text}");
    assert_eq!(training_jobs(&t[0]).len(), 1, "{text}");
    assert_eq!(
        t[0]["other_jobs"].as_u64(),
        Some(1),
        "root's job in 65534's training is counted: {text}"
    );
    top_as_nobody_shows_no_root_job(&agent, &mine, &roots_training_id);
    // Root still sees everything.
    let root_text = agent.status(false).to_string();
    for n in names {
        assert!(root_text.contains(n.as_str()), "{n}: {root_text}");
    }

    drop(agent);
    for n in names {
        assert_no_cgroup_left(n);
    }
}

/// A private tmux server (`tmux -L`) with one detached session; the
/// server, with everything in it, is killed on drop.
struct Tmux {
    server: String,
}

impl Tmux {
    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-u", "-L", &self.server]).env("LANG", "C.UTF-8");
        c
    }

    fn screen(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        assert!(out.status.success(), "tmux capture-pane: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
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

/// `enforcer top` as 65534 in a terminal shows its job and none of root's
/// (skipped, saying so, without tmux or setpriv).
fn top_as_nobody_shows_no_root_job(agent: &Agent, mine: &str, roots_training: &str) {
    let have = |p: &str, arg: &str| {
        Command::new(p)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("tmux", "-V") || !have("setpriv", "--version") {
        eprintln!(
            "SKIPPED part: tmux or setpriv is not installed: `enforcer top` as 65534 is not driven here"
        );
        return;
    }
    let tmux = Tmux {
        server: unique_name("enforcer-privacy-top"),
    };
    let command = format!(
        "setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups env ENFORCER_LOG=warn {} top --socket {} --interval 300ms; echo top-exit=$?; sleep 600",
        enforcer_tests::enforcer_bin().display(),
        agent.socket.display()
    );
    let out = tmux
        .tmux()
        .args(["new-session", "-d", "-s", "top", "-x", "200", "-y", "30"])
        .arg(&command)
        .output()
        .expect("starting tmux");
    assert!(out.status.success(), "tmux new-session: {out:?}");
    let t0 = Instant::now();
    let screen = loop {
        let screen = tmux.screen();
        if screen.contains(mine) {
            break screen;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "top as 65534 never showed its job {mine}:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("top as 65534:\n{screen}");
    assert!(
        !screen.contains("privacy-root") && !screen.contains(roots_training),
        "top as 65534 shows root's jobs or training:\n{screen}"
    );
}

root_tests!(a_non_root_callers_status_names_none_of_roots_jobs_nor_roots_training);
