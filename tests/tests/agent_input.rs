//! The agent's socket under clients that misbehave: a client that never
//! says hello, or stops in the middle of a message, is closed after
//! `agent.hello_timeout`; connections beyond `agent.max_connections` and
//! `agent.max_connections_per_uid` are refused with an error naming the
//! limit; out-of-order, garbage and malformed messages each get a clear
//! error and one log line with the caller's uid and pid. Through all of it
//! the agent stays up and serves a normal `run` and `status`.
//!
//! (tests/tests/agent.rs covers the first message not being hello, a wrong
//! API version, unknown types and fields, a `run` without descriptors,
//! lines over 1 MiB and a connection closed mid-line.)
//!
//! Each test starts its own agent on a private socket, state and record
//! directory, and ends it, also on failure.

use std::{
    io::{Read, Write},
    os::{
        fd::AsRawFd,
        unix::{net::UnixStream, process::CommandExt},
    },
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{
    ChildGuard, Scratch, assert_no_cgroup_left, enforcer, root_tests, unique_name,
};

/// The uid and gid of the non-root caller (numeric: the VMs have no passwd
/// entry for it).
const NOBODY: u32 = 65534;

/// An agent on the test's own socket and directories; killed on drop.
struct Agent {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts an agent whose `[agent]` table has `agent_keys` besides its
    /// private socket and record directory.
    fn start(s: &Scratch, agent_keys: &str) -> Agent {
        let socket = s.path("run/enforcer.sock");
        let config = s.config(&format!(
            "[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\n{agent_keys}\n",
            socket.display(),
            s.path("lib").display()
        ));
        let log = s.path("agent.log");
        let out = std::fs::File::create(&log).expect("agent log");
        let child = enforcer()
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .env("ENFORCER_LOG", "info")
            .env("ENFORCER_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("starting enforcer agent");
        let mut agent = Agent {
            child: Some(child),
            socket,
            log,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&agent.socket).is_err() {
            assert!(
                agent.is_running(),
                "the agent exited at start:\n{}",
                agent.log_text()
            );
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent did not listen within 20 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A connection with a read timeout, so that a missing answer fails the
    /// test instead of hanging it.
    fn connect(&self) -> UnixStream {
        let c = UnixStream::connect(&self.socket).expect("connecting to the agent");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c
    }

    /// A connection that said hello; while the agent refuses it for its
    /// connection limits (connections just closed are released within a
    /// second), tries again for up to 15 s.
    fn hello(&self) -> UnixStream {
        let t0 = Instant::now();
        loop {
            let mut c = self.connect();
            // A refusing agent closes without reading: the write may fail
            // while its reason waits to be read.
            let _ = c.write_all(b"{\"type\":\"hello\",\"api\":1}\n");
            let l = read_line(&mut c);
            if l.contains("\"type\":\"hello\"") {
                return c;
            }
            assert!(
                l.contains("max_connections") && t0.elapsed() < Duration::from_secs(15),
                "hello answered {l:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `enforcer` talking to this agent.
    fn cli(&self) -> Command {
        let mut c = enforcer();
        c.env("ENFORCER_SOCKET", &self.socket)
            .env_remove("ENFORCER_NO_AGENT");
        c
    }

    /// `enforcer` talking to this agent as uid/gid 65534.
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

    /// The agent is alive, answers `status` on a new connection and runs a
    /// job to its end with the command's exit status.
    fn assert_serves(&mut self) {
        assert!(self.is_running(), "the agent died:\n{}", self.log_text());
        let mut c = self.hello();
        c.write_all(b"{\"type\":\"status\"}\n").unwrap();
        let l = read_line(&mut c);
        assert!(l.contains("\"type\":\"status\""), "status answered {l:?}");
        drop(c);
        let name = unique_name("input-served");
        let t0 = Instant::now();
        let out = loop {
            let out = self
                .cli()
                .args(["run", "--job", &name, "--timeout", "30s", "--"])
                .args(["sh", "-c", "exit 3"])
                .output()
                .expect("enforcer run");
            // Refused for the connection limits (places of connections
            // just closed come back within a second): nothing was run.
            let refused = String::from_utf8_lossy(&out.stderr).contains("max_connections");
            if !refused || t0.elapsed() > Duration::from_secs(15) {
                break out;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(out.status.code(), Some(3), "{out:?}\n{}", self.log_text());
        assert_no_cgroup_left(&name);
    }

    /// Asserts that the agent logged a refusal saying `what` for a caller
    /// with this uid and pid.
    fn assert_logged(&self, what: &str, uid: u32, pid: u32) {
        let log = self.log_text();
        let uid = format!("\"uid\":{uid}");
        let pid = format!("\"pid\":{pid}");
        assert!(
            log.lines()
                .any(|l| l.contains(what) && l.contains(&uid) && l.contains(&pid)),
            "no log line with {what:?}, {uid} and {pid}:\n{log}"
        );
    }

    /// SIGTERM, and the agent exits within 10 s.
    fn stop(mut self) {
        let mut c = self.child.take().expect("agent running");
        // SAFETY: kill(2) on the agent this test started and has not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while matches!(c.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let exited = matches!(c.try_wait(), Ok(Some(_)));
        let _ = c.kill();
        let _ = c.wait();
        assert!(
            exited,
            "the agent did not exit on SIGTERM:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One line from the agent, without its newline; what there is at the end
/// of the stream (or when the read times out).
fn read_line(c: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the agent has closed the connection: the next read is the end of
/// the stream.
fn closed(c: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0))
}

fn a_client_that_never_says_hello_or_stops_mid_message_is_closed_after_the_hello_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let s = Scratch::new("enforcer-agent-input");
    let mut agent = Agent::start(&s, "hello_timeout = \"3s\"");
    let t0 = Instant::now();
    let mut silent = agent.connect();
    let mut half_hello = agent.connect();
    half_hello.write_all(b"{\"type\":\"hel").unwrap();
    let mut half_request = agent.hello();
    half_request.write_all(b"{\"type\":\"sta").unwrap();

    // Meanwhile another client is served, and a job runs to its end.
    let mut other = agent.hello();
    other.write_all(b"{\"type\":\"status\"}\n").unwrap();
    assert!(read_line(&mut other).contains("\"type\":\"status\""));
    let served_at = t0.elapsed();
    assert!(served_at < TIMEOUT, "status took {served_at:?}");
    let name = unique_name("input-meanwhile");
    let job = ChildGuard(
        agent
            .cli()
            .args(["run", "--job", &name, "--timeout", "30s", "--"])
            .args(["sh", "-c", "exit 3"])
            .spawn()
            .expect("enforcer run"),
    );

    let l = read_line(&mut silent);
    let closed_at = t0.elapsed();
    assert!(
        l.contains("\"type\":\"error\"")
            && l.contains("no hello came within 3s (agent.hello_timeout)"),
        "{l:?}"
    );
    assert!(closed(&mut silent), "the silent client was not closed");
    // Not before its time (a little slack for the clock of the connect),
    // and well before the read timeout.
    assert!(
        closed_at + Duration::from_millis(200) >= TIMEOUT,
        "closed after {closed_at:?}, before the 3 s timeout"
    );
    assert!(
        closed_at < TIMEOUT + Duration::from_secs(15),
        "{closed_at:?}"
    );
    eprintln!("other client served after {served_at:?}; silent one closed after {closed_at:?}");
    let out = job
        .output_within(Duration::from_secs(60))
        .expect("the job's client ends");
    assert_eq!(out.status.code(), Some(3), "{}", agent.log_text());
    assert_no_cgroup_left(&name);

    let l = read_line(&mut half_hello);
    assert!(l.contains("no hello came within 3s"), "{l:?}");
    assert!(closed(&mut half_hello));
    let l = read_line(&mut half_request);
    assert!(
        l.contains("a message was begun and not finished within 3s (agent.hello_timeout)"),
        "{l:?}"
    );
    assert!(closed(&mut half_request));
    let me = std::process::id();
    agent.assert_logged("no hello came within 3s", 0, me);
    agent.assert_logged("a message was begun and not finished", 0, me);

    agent.assert_serves();
    agent.stop();
}

fn connections_over_the_total_and_per_uid_limits_are_refused_with_an_error_naming_the_limit() {
    let s = Scratch::new("enforcer-agent-input");
    let mut agent = Agent::start(
        &s,
        "hello_timeout = \"5s\"\nmax_connections = 3\nmax_connections_per_uid = 2",
    );
    let me = std::process::id();
    let subscribe = |agent: &Agent| {
        let mut c = agent.hello();
        c.write_all(b"{\"type\":\"subscribe\"}\n").unwrap();
        assert!(read_line(&mut c).contains("\"type\":\"status\""));
        c
    };
    let first = subscribe(&agent);
    let second = subscribe(&agent);

    // A third connection of uid 0: over the per-uid limit.
    let mut third = agent.connect();
    let l = read_line(&mut third);
    assert!(
        l.contains("\"type\":\"error\"")
            && l.contains("\"status\":2")
            && l.contains("uid 0 already has 2 connections open")
            && l.contains("agent.max_connections_per_uid = 2"),
        "{l:?}"
    );
    assert!(closed(&mut third));
    agent.assert_logged("agent.max_connections_per_uid = 2", 0, me);

    // uid 65534 takes the last place; a second one of its connections is
    // over the total.
    let mut sub = ChildGuard(
        agent
            .cli_as_nobody()
            .args(["ctl", "subscribe"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("enforcer ctl subscribe as nobody"),
    );
    let mut out = sub.stdout.take().expect("piped");
    let mut first_answer = [0u8; 1];
    out.read_exact(&mut first_answer)
        .expect("the nobody subscriber's first answer");
    let refused = ChildGuard(
        agent
            .cli_as_nobody()
            .args(["ctl", "status"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("enforcer ctl status as nobody"),
    );
    let refused_pid = refused.pid();
    let o = refused
        .output_within(Duration::from_secs(30))
        .expect("ctl status ends");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refused the connection") && err.contains("agent.max_connections = 3"),
        "{err}"
    );
    agent.assert_logged("agent.max_connections = 3", NOBODY, refused_pid);

    // A client that goes gives its place back, also while it waits for
    // events.
    drop(first);
    drop(sub);
    drop(out);
    let again = subscribe(&agent);
    drop((second, again));
    agent.assert_serves();
    agent.stop();
}

fn out_of_order_garbage_and_malformed_messages_each_get_an_error_and_a_log_line() {
    let s = Scratch::new("enforcer-agent-input");
    let mut agent = Agent::start(&s, "");
    let me = std::process::id();

    // A request before hello: refused, and the connection closed.
    let mut c = agent.connect();
    c.write_all(b"{\"type\":\"wait\",\"id\":\"x\"}\n").unwrap();
    let l = read_line(&mut c);
    assert!(l.contains("the first message must be"), "{l:?}");
    assert!(closed(&mut c));

    let mut c = agent.hello();
    let expect_error = |c: &mut UnixStream, bytes: &[u8], want: &str| {
        c.write_all(bytes).unwrap();
        let l = read_line(c);
        assert!(
            l.contains("\"type\":\"error\"") && l.contains("\"status\":2") && l.contains(want),
            "{:?} answered {l:?}, not an error with {want:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
        agent.assert_logged(want, 0, me);
    };
    expect_error(
        &mut c,
        b"{\"type\":\"hello\",\"api\":1}\n",
        "hello was already sent on this connection",
    );
    expect_error(
        &mut c,
        b"{\"type\":\"st\xff\xfeatus\"}\n",
        "invalid unicode code point",
    );
    expect_error(&mut c, b"\x00\x01\x02\xc3\x28 \x7f\n", "malformed message");
    let mut deep = b"{\"type\":\"run\",\"job\":{},\"command\":".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend(b"}\n");
    expect_error(&mut c, &deep, "recursion limit exceeded");

    // A run with one descriptor instead of three.
    let run = b"{\"type\":\"run\",\"job\":{},\"command\":[\"true\"]}\n";
    enforcer::agent::proto::send_with_fds(c.as_raw_fd(), run, &[0]).unwrap();
    let l = read_line(&mut c);
    assert!(l.contains("exactly 3 file descriptors"), "{l:?}");
    agent.assert_logged("exactly 3 file descriptors", 0, me);
    // The same connection still serves.
    c.write_all(b"{\"type\":\"status\"}\n").unwrap();
    assert!(read_line(&mut c).contains("\"type\":\"status\""));

    // More descriptors than a message may carry: refused and closed (the
    // kernel closes those that did not fit).
    let mut c = agent.hello();
    let fds = [0; 9];
    enforcer::agent::proto::send_with_fds(c.as_raw_fd(), run, &fds).unwrap();
    let l = read_line(&mut c);
    assert!(l.contains("more than 8 file descriptors"), "{l:?}");
    assert!(closed(&mut c));
    agent.assert_logged("more than 8 file descriptors", 0, me);

    agent.assert_serves();
    agent.stop();
}

root_tests!(
    a_client_that_never_says_hello_or_stops_mid_message_is_closed_after_the_hello_timeout,
    connections_over_the_total_and_per_uid_limits_are_refused_with_an_error_naming_the_limit,
    out_of_order_garbage_and_malformed_messages_each_get_an_error_and_a_log_line,
);
