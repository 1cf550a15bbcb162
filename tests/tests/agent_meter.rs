//! The node agent's steal programs against the real kernel: the agent loads
//! them once, at its start, off its request path, and attaches them only
//! while a training is registered. Its `status` answers while they load
//! and says where the load stands (`meter`); a `protect` sent right after
//! the start waits for the load and succeeds. The programs the agent holds
//! are seen in its fds' `/proc/<pid>/fdinfo`: a loaded program has a
//! `prog_type` line (and its kernel `prog_id`), an attached one a link fd
//! with a `link_type` line.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{ChildGuard, EnforcerGuard, Scratch, enforcer};
use serde_json::{Value, json};

fn workload() -> PathBuf {
    enforcer_tests::eval_workload!()
}

/// A connection to the agent that has said hello.
struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(socket: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut conn = Conn { stream, reader };
        conn.stream.set_read_timeout(Some(STATUS_WITHIN))?;
        conn.send(&json!({"type": "hello", "api": 1}))?;
        conn.answer()?;
        Ok(conn)
    }

    fn send(&mut self, message: &Value) -> std::io::Result<()> {
        writeln!(self.stream, "{message}")
    }

    fn answer(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        serde_json::from_str(&line).map_err(|e| std::io::Error::other(format!("{e}: {line:?}")))
    }

    fn ask(&mut self, message: &Value) -> std::io::Result<Value> {
        self.send(message)?;
        self.answer()
    }
}

/// How soon a `status` must be answered, load or no load (the programs'
/// load took over 10 s on 5.10 under emulation).
const STATUS_WITHIN: Duration = Duration::from_secs(5);

/// How long the programs' load may take (the verifier under emulation).
const LOAD_WITHIN: Duration = Duration::from_secs(120);

/// An agent of its own (socket, records) for one test, ended on drop.
struct Agent {
    guard: EnforcerGuard,
    socket: PathBuf,
    log: PathBuf,
    _scratch: Scratch,
}

impl Agent {
    fn start() -> Self {
        let scratch = Scratch::new("enforcer-agent-meter");
        let socket = scratch.path("enforcer.sock");
        let config = scratch.config(&format!(
            "[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\non_agent_stop = \"end\"\n",
            socket.display(),
            scratch.path("lib").display()
        ));
        let log = scratch.path("agent.log");
        let guard = EnforcerGuard(
            enforcer()
                .args(["agent", "--config"])
                .arg(&config)
                .env("ENFORCER_SOCKET", &socket)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("agent log"))
                .spawn()
                .expect("starting enforcer agent"),
        );
        Agent {
            guard,
            socket,
            log,
            _scratch: scratch,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// The first connection the agent accepts (it binds its socket early
    /// in its start).
    fn connect(&mut self) -> Conn {
        let up = Instant::now();
        loop {
            match Conn::open(&self.socket) {
                Ok(c) => return c,
                Err(e) => {
                    if let Ok(Some(exit)) = self.guard.0.try_wait() {
                        panic!("enforcer agent exited ({exit}): {e}\n{}", self.log());
                    }
                    assert!(
                        up.elapsed() < Duration::from_secs(30),
                        "the agent did not answer on {} within 30 s: {e}\n{}",
                        self.socket.display(),
                        self.log()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn status(&self) -> Value {
        let asked = Instant::now();
        let status = Conn::open(&self.socket)
            .and_then(|mut c| c.ask(&json!({"type": "status"})))
            .unwrap_or_else(|e| panic!("status: {e}\n{}", self.log()));
        assert!(
            asked.elapsed() < STATUS_WITHIN,
            "status took {:?}\n{}",
            asked.elapsed(),
            self.log()
        );
        status
    }

    /// Waits until the programs' load has ended; fails on a failed load.
    fn wait_loaded(&self) {
        let start = Instant::now();
        loop {
            let status = self.status();
            match &status["meter"] {
                Value::String(s) if s == "loaded" => return,
                Value::String(s) if s == "loading" => {}
                other => panic!(
                    "status says meter {other}, not \"loading\" or \"loaded\": {status}\n{}",
                    self.log()
                ),
            }
            assert!(
                start.elapsed() < LOAD_WITHIN,
                "the steal programs were not loaded within {LOAD_WITHIN:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn protect(&self, pid: u32) -> Value {
        let mut conn = Conn::open(&self.socket).expect("connecting to the agent");
        conn.stream
            .set_read_timeout(Some(LOAD_WITHIN))
            .expect("read timeout");
        conn.ask(&json!({"type": "protect", "pid": pid, "budget": "5%"}))
            .unwrap_or_else(|e| panic!("protect: {e}\n{}", self.log()))
    }
}

/// The eBPF objects process `pid` holds: its programs' kernel ids, and how
/// many links (attachments) it holds.
fn bpf_held(pid: u32) -> (BTreeSet<u64>, usize) {
    let mut programs = BTreeSet::new();
    let mut links = 0;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("the agent's fdinfo");
    for info in fds
        .flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
    {
        if info.lines().any(|l| l.starts_with("link_type:")) {
            links += 1;
        } else if info.lines().any(|l| l.starts_with("prog_type:")) {
            programs.extend(
                info.lines()
                    .filter_map(|l| l.strip_prefix("prog_id:"))
                    .filter_map(|v| v.trim().parse::<u64>().ok()),
            );
        }
    }
    (programs, links)
}

/// A process with a sleeping thread to protect, killed on drop.
fn training() -> ChildGuard {
    ChildGuard::spawn_until_first_line(Command::new(workload()).args(["threads", "1"])).0
}

fn needs_btf() {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        enforcer_tests::skip!("the kernel has no BTF: the steal meter cannot load");
    }
}

fn status_answers_while_the_programs_load_and_a_protect_right_after_the_start_succeeds() {
    needs_btf();
    let training = training();
    let mut agent = Agent::start();
    // The first connection asks its status at once: the load has just begun.
    let mut first = agent.connect();
    let asked = Instant::now();
    let status = first
        .ask(&json!({"type": "status"}))
        .unwrap_or_else(|e| panic!("the first status: {e}\n{}", agent.log()));
    let answered_in = asked.elapsed();
    let meter = status["meter"].as_str().map(str::to_owned);
    assert!(
        matches!(meter.as_deref(), Some("loading" | "loaded")),
        "the first status says meter {}: {status}\n{}",
        status["meter"],
        agent.log()
    );
    assert!(
        answered_in < STATUS_WITHIN,
        "the first status took {answered_in:?}\n{}",
        agent.log()
    );
    // A protect right after the start, left waiting on its connection: a
    // status on another connection is answered meanwhile.
    let mut protecting = Conn::open(&agent.socket).expect("connecting to the agent");
    protecting
        .stream
        .set_read_timeout(Some(LOAD_WITHIN))
        .expect("read timeout");
    protecting
        .send(&json!({"type": "protect", "pid": training.0.id(), "budget": "5%"}))
        .expect("sending protect");
    let during = agent.status();
    eprintln!(
        "first status in {answered_in:?} with meter {meter:?}; while the protect waited: meter {}",
        during["meter"]
    );
    let protected = protecting
        .answer()
        .unwrap_or_else(|e| panic!("protect: {e}\n{}", agent.log()));
    assert_eq!(
        protected["type"],
        "protected",
        "a protect right after the start: {protected}\n{}",
        agent.log()
    );
    let status = agent.status();
    assert_eq!(status["meter"], "loaded", "{status}\n{}", agent.log());
    let id = format!("pid-{}", training.0.id());
    assert!(
        status["budget"]["trainings"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["id"] == id.as_str())),
        "status does not show training {id} protected: {status}\n{}",
        agent.log()
    );
}

fn the_programs_are_loaded_once_and_attached_only_while_a_training_is_registered() {
    needs_btf();
    let mut agent = Agent::start();
    let _ = agent.connect();
    agent.wait_loaded();
    let (loaded, links) = bpf_held(agent.pid());
    assert!(
        !loaded.is_empty(),
        "the agent holds no loaded program once status says loaded\n{}",
        agent.log()
    );
    assert_eq!(
        links,
        0,
        "programs attached with no training protected\n{}",
        agent.log()
    );

    let mut first = training();
    let answer = agent.protect(first.0.id());
    assert_eq!(answer["type"], "protected", "{answer}\n{}", agent.log());
    let (programs, links) = bpf_held(agent.pid());
    assert!(
        links > 0,
        "no program attached while a training is protected\n{}",
        agent.log()
    );
    assert_eq!(programs, loaded, "the programs were loaded again");

    // An ended training with no job is dropped at the agent's next tick.
    first.0.kill().expect("killing the training");
    first.0.wait().expect("reaping the training");
    let start = Instant::now();
    while bpf_held(agent.pid()).1 != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "programs still attached 30 s after the last training ended\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        bpf_held(agent.pid()).0,
        loaded,
        "the programs were not kept loaded once detached"
    );

    let second = training();
    let answer = agent.protect(second.0.id());
    assert_eq!(answer["type"], "protected", "{answer}\n{}", agent.log());
    let (programs, links) = bpf_held(agent.pid());
    assert!(
        links > 0,
        "no program attached again for the next training\n{}",
        agent.log()
    );
    assert_eq!(programs, loaded, "the programs were loaded again");
}

enforcer_tests::root_tests!(
    status_answers_while_the_programs_load_and_a_protect_right_after_the_start_succeeds,
    the_programs_are_loaded_once_and_attached_only_while_a_training_is_registered
);
