//! The agent's wire protocol (documented in `docs/api.md`): one JSON object
//! per line over a Unix stream socket, at most [`MAX_MESSAGE`] bytes each.
//! A connection starts with `hello` (the client's API version); then each
//! request gets one or more responses. A `run` carries the caller's stdin,
//! stdout and stderr as `SCM_RIGHTS` on the message's bytes.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::{agent::budget::QuotaWish, job::plan::JobRequest, report::Report};

/// The API version this agent speaks.
pub const API_VERSION: u32 = 1;
/// The largest message, newline included.
pub const MAX_MESSAGE: usize = 1 << 20;
/// File descriptors a `run` passes: stdin, stdout, stderr.
pub const RUN_FDS: usize = 3;
/// Descriptors a connection may have pending; more are closed at once and
/// the connection is refused, so that no client can fill the agent's
/// descriptor table.
pub const MAX_PENDING_FDS: usize = 8;

/// The most descriptors the kernel passes with one message
/// (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First on every connection.
    Hello { api: u32 },
    /// Run `command` as a job with the flags of `enforcer run`; the three
    /// standard descriptors come with the message.
    Run {
        job: Box<JobRequest>,
        command: Vec<String>,
        /// The command's environment (the caller's).
        #[serde(default)]
        env: Vec<(String, String)>,
        /// The command's working directory (the caller's; default `/`).
        cwd: Option<std::path::PathBuf>,
    },
    /// Move live process `pid` (with `tree`, its descendants) into a job.
    Attach {
        job: Box<JobRequest>,
        pid: crate::host::Pid,
        #[serde(default)]
        tree: bool,
    },
    /// One game of the job the caller runs in, with the flags of
    /// `enforcer game`; the three standard descriptors come with it.
    Game {
        game: Box<crate::cli::game::GameArgs>,
        command: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        cwd: Option<std::path::PathBuf>,
    },
    /// Register a training to protect: its jobs share one budget.
    Protect {
        pid: Option<i32>,
        cgroup: Option<std::path::PathBuf>,
        #[serde(default)]
        follow_children: bool,
        progress_file: Option<std::path::PathBuf>,
        /// e.g. `"5%"`.
        budget: Option<crate::units::Percent>,
    },
    /// The caller's jobs (root: every job) and the budgets.
    Status,
    /// A job's report; with `wait`, once it has ended.
    Report {
        id: String,
        #[serde(default)]
        wait: bool,
    },
    /// End a job as a signal to `enforcer run` would.
    Cancel { id: String },
    /// Stream every event of the caller's jobs (root: all) until the
    /// connection closes.
    Subscribe,
    /// Wait for a job accepted earlier (a client whose agent restarted):
    /// answered like the end of `run`.
    Wait { id: String },
}

impl Request {
    /// The request's `type`, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Run { .. } => "run",
            Request::Attach { .. } => "attach",
            Request::Game { .. } => "game",
            Request::Protect { .. } => "protect",
            Request::Status => "status",
            Request::Report { .. } => "report",
            Request::Cancel { .. } => "cancel",
            Request::Subscribe => "subscribe",
            Request::Wait { .. } => "wait",
        }
    }
}

/// What the agent answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        api: u32,
        version: String,
    },
    /// The job's plan is persisted and its shim started.
    Accepted {
        id: String,
        /// The absolute deadline, Unix milliseconds.
        deadline_unix_ms: u64,
        /// The kill grace after it, milliseconds.
        kill_grace_ms: u64,
    },
    /// The job ended: its report and the exit status that stands for it.
    Finished {
        id: String,
        status: u8,
        report: Box<Report>,
    },
    /// The job ended without a report (it could not start): the exit
    /// status and why.
    Failed {
        id: String,
        status: u8,
        message: String,
    },
    Status {
        jobs: Vec<JobStatus>,
        budget: serde_json::Value,
        /// What the agent itself costs the node; absent in the empty
        /// `status` that opens a subscription.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<AgentCost>,
        /// Where the agent's one load of the steal programs stands; absent
        /// in the empty `status` that opens a subscription.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meter: Option<MeterState>,
    },
    Protected {
        training: String,
    },
    Cancelled {
        id: String,
    },
    Event(Event),
    /// A refused or malformed request; `status` is the exit status a CLI
    /// gives for it (2: usage or refusal, 125: the agent failed).
    Error {
        status: u8,
        message: String,
    },
}

/// The agent's steal programs: loaded once at its start, off the request
/// path. Serialized as `"loading"`, `"loaded"` or `{"failed": reason}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeterState {
    Loading,
    Loaded,
    /// The agent runs without steal metering: `protect` is refused.
    Failed(String),
}

/// One job as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub uid: u32,
    pub command: Vec<String>,
    /// `running` or `finished`.
    pub state: String,
    pub deadline_unix_ms: u64,
    pub status: Option<u8>,
    pub training: Option<String>,
    pub quota: Option<QuotaWish>,
    /// The job's cgroup counters now; `null` for a finished job, a game,
    /// or a job whose cgroup is not there (yet).
    #[serde(default)]
    pub usage: Option<JobUsage>,
}

/// A running job's cgroup counters as `status` reads them. Cumulative
/// counters, not rates: a client derives rates from two answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobUsage {
    /// When the counters were read (Unix milliseconds): rates are over the
    /// time between two readings, not between two answers.
    pub read_unix_ms: u64,
    pub memory_bytes: Option<u64>,
    /// `null`: no memory limit.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time of every task the job ever had, seconds.
    pub cpu_s: Option<f64>,
    /// Time the job's runnable tasks were held back by its CPU quota,
    /// seconds.
    pub throttled_s: Option<f64>,
    pub pids: Option<u64>,
}

/// The agent's own cost as `status` reports it: the agent process and the
/// shims of its live jobs (each job's supervisor, meter and monitors).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentCost {
    pub pid: u32,
    /// User plus system CPU time of the agent process, seconds.
    pub cpu_s: f64,
    pub rss_bytes: Option<u64>,
    /// Live shims, and their CPU time and resident memory together.
    pub shims: u32,
    pub shims_cpu_s: f64,
    pub shims_rss_bytes: u64,
}

/// An event of a job, as `subscribe` streams it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    /// `started`, `adopted`, `exited`, `deadline`, `oom`,
    /// `budget_exceeded`, `budget_recovered`.
    pub event: String,
    pub uid: u32,
    pub unix_ms: u64,
    pub status: Option<u8>,
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("connection closed in the middle of a message ({0} bytes without a newline)")]
    Truncated(usize),
    #[error("more than {MAX_PENDING_FDS} file descriptors sent with one message")]
    TooManyFds,
    #[error("reading the socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one message line.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).unwrap_or_else(|e| {
        serde_json::to_vec(&Response::Error {
            status: crate::job::session::EXIT_FAILURE,
            message: format!("encoding a message failed: {e}"),
        })
        .unwrap_or_default()
    });
    line.push(b'\n');
    line
}

/// Sends `bytes` with `fds` attached (blocking socket).
pub fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        let iov = [IoSlice::new(&bytes[sent..])];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &cmsg
        } else {
            &[]
        };
        sent += sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// A line reader over a socket that also collects the descriptors that
/// come with the bytes (`recvmsg`), for blocking and non-blocking sockets.
#[derive(Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Descriptors received and not yet claimed, in order.
    pub fds: Vec<OwnedFd>,
    eof: bool,
    /// Descriptors beyond [`MAX_PENDING_FDS`] arrived (and were closed).
    too_many_fds: bool,
}

impl LineReader {
    /// The next complete line in the buffer, if any.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        if self.too_many_fds {
            return Err(ProtoError::TooManyFds);
        }
        if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            if i + 1 > MAX_MESSAGE {
                return Err(ProtoError::TooLarge);
            }
            let rest = self.buf.split_off(i + 1);
            let mut line = std::mem::replace(&mut self.buf, rest);
            line.pop();
            return Ok(Some(line));
        }
        if self.buf.len() >= MAX_MESSAGE {
            return Err(ProtoError::TooLarge);
        }
        if self.eof {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Err(ProtoError::Truncated(self.buf.len()));
        }
        Ok(None)
    }

    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// Whether part of a message has arrived without its newline.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Appends bytes received without descriptors (what [`LineReader::fill`]
    /// does with the bytes of one `recvmsg`); lines come out of
    /// [`LineReader::next_line`].
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The peer closed its end: a partial line left is an error.
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// One `recvmsg` into the buffer; `WouldBlock` on a non-blocking socket
    /// with nothing to read.
    pub fn fill(&mut self, sock: RawFd) -> std::io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        // Room for as many descriptors as one message can carry: were the
        // control data cut short, the descriptors the kernel had already
        // installed in this process could not be read, nor ever closed.
        let mut cmsg_space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(
            sock,
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let n = msg.bytes;
        let mut got = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                got.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        for fd in got {
            if self.fds.len() < MAX_PENDING_FDS {
                self.fds.push(fd);
            } else {
                self.too_many_fds = true;
            }
        }
        if n == 0 {
            self.finish();
        }
        self.feed(&chunk[..n]);
        Ok(())
    }

    /// Blocking: the next line, `None` at a clean end of stream.
    pub fn read_line_blocking(
        &mut self,
        sock: &impl AsRawFd,
    ) -> Result<Option<Vec<u8>>, ProtoError> {
        loop {
            if let Some(l) = self.next_line()? {
                return Ok(Some(l));
            }
            if self.eof {
                return Ok(None);
            }
            match self.fill(sock.as_raw_fd()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_message_type_is_named_in_the_error() {
        let e = serde_json::from_str::<Request>(r#"{"type":"reboot"}"#).unwrap_err();
        assert!(e.to_string().contains("reboot"), "{e}");
    }

    #[test]
    fn a_run_request_round_trips_with_its_flags() {
        let line = r#"{"type":"run","job":{"timeout":"5s","memory":"100M"},"command":["true"]}"#;
        let r: Request = serde_json::from_str(line).unwrap();
        let Request::Run { job, command, .. } = r else {
            panic!("not a run")
        };
        assert_eq!(command, ["true"]);
        assert_eq!(job.timeout.map(|d| d.0.as_secs()), Some(5));
    }

    #[test]
    fn an_unknown_job_flag_is_refused() {
        let line = r#"{"type":"run","job":{"timeout":"5s","sudo":true},"command":["true"]}"#;
        let e = serde_json::from_str::<Request>(line).unwrap_err();
        assert!(e.to_string().contains("sudo"), "{e}");
    }

    #[test]
    fn lines_come_out_whole_however_the_bytes_are_cut() {
        let bytes = b"{\"type\":\"hello\",\"api\":1}\n{\"type\":\"status\"}\n{\"type\"";
        for piece in [1, 2, 7, bytes.len()] {
            let mut r = LineReader::default();
            let mut lines = Vec::new();
            for p in bytes.chunks(piece) {
                r.feed(p);
                while let Some(l) = r.next_line().unwrap() {
                    lines.push(l);
                }
            }
            assert_eq!(
                lines,
                [
                    &b"{\"type\":\"hello\",\"api\":1}"[..],
                    b"{\"type\":\"status\"}"
                ],
                "pieces of {piece}"
            );
            assert!(r.has_partial());
            r.finish();
            assert!(matches!(r.next_line(), Err(ProtoError::Truncated(7))));
        }
    }

    #[test]
    fn a_message_with_more_descriptors_than_the_bound_is_refused() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let line = b"{\"type\":\"status\"}\n";
        for n in [MAX_PENDING_FDS + 1, SCM_MAX_FD] {
            send_with_fds(a.as_raw_fd(), line, &vec![0; n]).unwrap();
            let mut r = LineReader::default();
            r.fill(b.as_raw_fd()).unwrap();
            assert!(matches!(r.next_line(), Err(ProtoError::TooManyFds)), "{n}");
            assert_eq!(r.fds.len(), MAX_PENDING_FDS, "the rest are closed");
        }
        // At the bound it is served.
        send_with_fds(a.as_raw_fd(), line, &[0; MAX_PENDING_FDS]).unwrap();
        let mut r = LineReader::default();
        r.fill(b.as_raw_fd()).unwrap();
        assert_eq!(
            r.next_line().unwrap().as_deref(),
            Some(&line[..line.len() - 1])
        );
        assert_eq!(r.fds.len(), MAX_PENDING_FDS);
    }

    #[test]
    fn non_utf8_and_deeply_nested_messages_are_refused_not_panicked_on() {
        let e = serde_json::from_slice::<Request>(b"{\"type\":\"st\xffatus\"}").unwrap_err();
        assert!(e.to_string().contains("unicode"), "{e}");
        let deep = format!(
            "{{\"type\":\"run\",\"job\":{{}},\"command\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let e = serde_json::from_str::<Request>(&deep).unwrap_err();
        assert!(e.to_string().contains("recursion limit"), "{e}");
    }

    #[test]
    fn a_line_longer_than_the_bound_is_refused_and_a_partial_one_is_truncated() {
        let mut r = LineReader {
            buf: vec![b'x'; MAX_MESSAGE],
            ..Default::default()
        };
        assert!(matches!(r.next_line(), Err(ProtoError::TooLarge)));
        let mut line = vec![b'x'; MAX_MESSAGE];
        line.push(b'\n');
        let mut r = LineReader {
            buf: line,
            ..Default::default()
        };
        assert!(matches!(r.next_line(), Err(ProtoError::TooLarge)));
        let mut r = LineReader {
            buf: b"{\"type\"".to_vec(),
            eof: true,
            ..Default::default()
        };
        assert!(matches!(r.next_line(), Err(ProtoError::Truncated(7))));
    }
}
