//! The CLI's side of the agent socket: whether `run` / `attach` go through
//! an agent, the request (the very flags, the caller's descriptors,
//! environment and directory), and waiting for the outcome, across agent
//! restarts.

use std::{
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    agent::proto::{self, API_VERSION, LineReader, Request, Response},
    job::session::{EXIT_FAILURE, EXIT_USAGE, Outcome},
};

/// The socket the CLI talks to when `ENFORCER_SOCKET` does not name one.
pub const DEFAULT_SOCKET: &str = "/run/enforcer/enforcer.sock";

/// Slack past a job's deadline and kill grace before a client stops
/// waiting for an agent to come back.
const WAIT_SLACK: Duration = Duration::from_secs(60);

/// A connection that said hello.
pub struct Conn {
    stream: UnixStream,
    reader: LineReader,
}

/// How a CLI command runs its job.
pub enum Route {
    /// In this process, as root (no agent, or `--no-agent`).
    InProcess,
    Agent(Conn),
}

fn socket_path() -> (PathBuf, bool) {
    match std::env::var_os("ENFORCER_SOCKET") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_SOCKET), false),
    }
}

/// Decides the route: `--no-agent` runs in-process; otherwise an agent
/// that answers on the socket (`ENFORCER_SOCKET`, default
/// [`DEFAULT_SOCKET`]) is used. Without one, root runs in-process, and a
/// socket named by `ENFORCER_SOCKET` or a non-root caller is an error.
pub fn route(no_agent: bool) -> Result<Route, String> {
    if no_agent {
        return Ok(Route::InProcess);
    }
    let (path, explicit) = socket_path();
    match Conn::open(&path) {
        Ok(c) => Ok(Route::Agent(c)),
        // An agent that answers and refuses (e.g. too many connections) is
        // not a missing agent: running in-process would go around it.
        Err(OpenError::Refused(e)) => Err(format!(
            "the enforcer agent on {} refused the connection: {e}",
            path.display()
        )),
        Err(e) if explicit => Err(format!(
            "ENFORCER_SOCKET={}: no agent answers there: {e}",
            path.display()
        )),
        Err(_) if crate::trust::running_as_root() => Ok(Route::InProcess),
        Err(e) => Err(format!(
            "{}; a user other than root runs jobs through the agent",
            no_agent_message(&path, &e.to_string())
        )),
    }
}

/// What a command that needs the agent says when none answers on `path`.
pub fn no_agent_message(path: &Path, error: &str) -> String {
    format!(
        "no enforcer agent answers on {} ({error}): start it (`systemctl start enforcer` or, as root, `enforcer agent`)",
        path.display()
    )
}

/// Why [`Conn::open`] got no connection.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing answered on the socket.
    #[error("{0}")]
    Unreachable(String),
    /// An agent answered `hello` with an error (or with nonsense).
    #[error("{0}")]
    Refused(String),
}

impl Conn {
    /// Connects and says hello.
    pub fn open(path: &Path) -> Result<Conn, OpenError> {
        Self::open_within(path, None)
    }

    /// Connects and says hello, waiting at most `limit` for each answer
    /// (this one and every later one): a stalled agent then gives an error
    /// instead of holding the client.
    pub fn open_within(path: &Path, limit: Option<Duration>) -> Result<Conn, OpenError> {
        let stream =
            UnixStream::connect(path).map_err(|e| OpenError::Unreachable(e.to_string()))?;
        stream
            .set_read_timeout(limit)
            .map_err(|e| OpenError::Unreachable(e.to_string()))?;
        let mut conn = Conn {
            stream,
            reader: LineReader::default(),
        };
        // An agent that refuses the connection says why and closes it
        // without reading: the hello may then fail to send while the
        // reason waits to be read.
        let sent = conn.send(&Request::Hello { api: API_VERSION }, &[]);
        match conn.recv() {
            Ok(Some(Response::Error { message, .. })) => Err(OpenError::Refused(message)),
            _ if sent.is_err() => Err(OpenError::Unreachable(sent.err().unwrap_or_default())),
            Ok(Some(Response::Hello { .. })) => Ok(conn),
            Ok(None) => Err(OpenError::Unreachable(
                "the agent closed the connection before answering hello".to_owned(),
            )),
            Err(e) => Err(OpenError::Unreachable(e)),
            Ok(Some(other)) => Err(OpenError::Refused(format!(
                "unexpected answer to hello: {other:?}"
            ))),
        }
    }

    pub fn send(&mut self, req: &Request, fds: &[i32]) -> Result<(), String> {
        proto::send_with_fds(self.stream.as_raw_fd(), &proto::encode(req), fds)
            .map_err(|e| format!("sending to the agent: {e}"))
    }

    /// The next response; `None` when the agent closed the connection.
    pub fn recv(&mut self) -> Result<Option<Response>, String> {
        match self.reader.read_line_blocking(&self.stream) {
            Ok(Some(line)) => serde_json::from_slice(&line)
                .map(Some)
                .map_err(|e| format!("the agent sent a message this client cannot read: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Sends a `run` or `attach` (the job's flags as given; a relative
/// `--config` made absolute) and waits for its outcome, printed like the
/// in-process CLI prints it. Returns the exit status.
pub fn submit(mut conn: Conn, request: Request, report: Option<&Path>) -> u8 {
    let fds: &[i32] = if matches!(request, Request::Run { .. } | Request::Game { .. }) {
        &[0, 1, 2]
    } else {
        &[]
    };
    if let Err(e) = conn.send(&request, fds) {
        tracing::error!("{e}");
        return EXIT_FAILURE;
    }
    let mut accepted: Option<(String, Instant)> = None;
    let mut conn = Some(conn);
    let mut backoff = Duration::from_millis(100);
    loop {
        let got = match conn.as_mut() {
            Some(c) => c.recv(),
            None => Ok(None),
        };
        match got {
            Ok(Some(Response::Accepted {
                id,
                deadline_unix_ms,
                kill_grace_ms,
            })) => {
                let left = crate::agent::store::until(deadline_unix_ms)
                    + Duration::from_millis(kill_grace_ms)
                    + WAIT_SLACK;
                tracing::debug!(job = %id, "accepted by the agent");
                accepted = Some((id, Instant::now() + left));
            }
            Ok(Some(Response::Finished {
                status, report: r, ..
            })) => {
                let outcome = Outcome { report: *r, status };
                return crate::cli::run::finish(Ok(outcome), report);
            }
            Ok(Some(Response::Failed {
                status, message, ..
            }))
            | Ok(Some(Response::Error { status, message })) => {
                tracing::error!("{message}");
                return status;
            }
            Ok(Some(other)) => {
                tracing::error!("unexpected answer from the agent: {other:?}");
                return EXIT_FAILURE;
            }
            Ok(None) | Err(_) => {
                let Some((id, give_up)) = &accepted else {
                    tracing::error!("the agent closed the connection before accepting the job");
                    return EXIT_FAILURE;
                };
                if conn.is_some() {
                    tracing::warn!(job = %id, "lost the agent; waiting for it to come back");
                }
                conn = None;
                if Instant::now() > *give_up {
                    tracing::error!(job = %id, "the agent did not come back before the job's deadline; its outcome is unknown");
                    return EXIT_FAILURE;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                let (path, _) = socket_path();
                if let Ok(mut c) = Conn::open(&path)
                    && c.send(&Request::Wait { id: id.clone() }, &[]).is_ok()
                {
                    tracing::info!(job = %id, "reconnected to the agent");
                    backoff = Duration::from_millis(100);
                    conn = Some(c);
                }
            }
        }
    }
}

/// A `--config` path as the agent must see it: absolute.
pub fn absolute(path: Option<PathBuf>) -> Option<PathBuf> {
    path.map(|p| {
        if p.is_absolute() {
            p
        } else {
            std::env::current_dir().map_or(p.clone(), |d| d.join(&p))
        }
    })
}

/// The caller's environment, for the job.
pub fn environment() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// `EXIT_USAGE`, for the CLI's refusal to route.
pub const ROUTE_ERROR: u8 = EXIT_USAGE;
