//! The agent daemon: the socket, one task per connection, the table of
//! jobs (started here or re-adopted after a restart), their shims and the
//! event stream.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{UnixListener, UnixStream},
    sync::{broadcast, watch},
};

use crate::{
    agent::{
        auth::{self, Caller},
        budget::{Metered, NodeBudget, QuotaWish, TrainingSpec},
        metrics,
        proto::{
            self, API_VERSION, Event, JobStatus, LineReader, MeterState, ProtoError, Request,
            Response,
        },
        shim,
        store::{self, JobDir, JobKind, JobPlan, JobResult, Store},
        usage::Readings,
    },
    config::{Config, OnAgentStop},
    job::{
        plan::JobRequest,
        session::{EXIT_FAILURE, EXIT_USAGE, Plan},
    },
};

/// One job the agent knows.
struct Job {
    plan: JobPlan,
    done: watch::Sender<Option<JobResult>>,
    shim: Option<store::ShimInfo>,
    /// The budget's latest wish for the job.
    quota: Option<QuotaWish>,
}

struct Shared {
    config: Config,
    store: Store,
    exe: PathBuf,
    jobs: Mutex<BTreeMap<String, Job>>,
    budget: Mutex<Box<dyn NodeBudget>>,
    /// The steal programs' one load (see [`load_meter`]).
    meter: watch::Receiver<MeterState>,
    /// Training id → the uid that registered it.
    trainings: Mutex<BTreeMap<String, u32>>,
    /// What `status` read last of the jobs' and the agent's cost.
    readings: Mutex<Readings>,
    events: broadcast::Sender<Event>,
    seq: AtomicU64,
    /// Clients waiting for a job's end: with `on_agent_stop = "end"` the
    /// agent answers them before it exits.
    waiting: AtomicU64,
    /// Requests, refusals and control-loop lag, for the metrics endpoint.
    counters: metrics::AgentCounters,
    /// The agent's cgroup subtree, opened at the first scrape that needs
    /// it, where the metrics endpoint reads the jobs' cgroup stats.
    subtree: Mutex<Option<crate::cgroup::subtree::Subtree>>,
    /// The node's GPU telemetry, opened at the first scrape.
    gpu: Mutex<Option<crate::gpu::node::NodeGpu>>,
    /// Open connections, held against `agent.max_connections*`.
    connections: Mutex<Connections>,
}

/// Open connections in total and per uid.
#[derive(Debug, Default)]
struct Connections {
    total: u32,
    per_uid: HashMap<u32, u32>,
}

impl Connections {
    /// Takes a place for a connection of `uid`, or says which limit of
    /// `agent` is reached.
    fn take(&mut self, uid: u32, agent: &crate::config::AgentConfig) -> Result<(), String> {
        if self.total >= agent.max_connections {
            return Err(format!(
                "the agent already serves {} connections, the most it serves at once (agent.max_connections = {}); try again later",
                self.total, agent.max_connections
            ));
        }
        let mine = self.per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= agent.max_connections_per_uid {
            return Err(format!(
                "uid {uid} already has {mine} connections open, the most one uid may have (agent.max_connections_per_uid = {})",
                agent.max_connections_per_uid
            ));
        }
        self.total += 1;
        *self.per_uid.entry(uid).or_default() += 1;
        Ok(())
    }

    fn give_back(&mut self, uid: u32) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
    }
}

/// One admitted connection; its place is given back on drop, however the
/// connection's task ends.
struct Admitted {
    shared: Arc<Shared>,
    uid: u32,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.connections.lock() {
            c.give_back(self.uid);
        }
    }
}

/// Admits a connection of `caller` unless the agent, or the caller's uid,
/// already holds as many as the config allows.
fn admit(shared: &Arc<Shared>, caller: &Caller) -> Result<Admitted, Answer> {
    shared
        .connections
        .lock()
        .map_err(|_| Answer::failed("agent state poisoned"))?
        .take(caller.uid, &shared.config.agent)
        .map_err(Answer::usage)?;
    Ok(Admitted {
        shared: shared.clone(),
        uid: caller.uid,
    })
}

/// A refusal or failure answered to one request.
struct Answer {
    status: u8,
    message: String,
}

impl Answer {
    fn usage(message: impl Into<String>) -> Self {
        Answer {
            status: EXIT_USAGE,
            message: message.into(),
        }
    }
    fn failed(message: impl Into<String>) -> Self {
        Answer {
            status: EXIT_FAILURE,
            message: message.into(),
        }
    }
    fn response(self) -> Response {
        Response::Error {
            status: self.status,
            message: self.message,
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT; returns the exit status.
/// `socket` and `metrics_listen` override the config's.
pub fn main(
    config_path: Option<&Path>,
    socket: Option<PathBuf>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> u8 {
    if !crate::trust::running_as_root() {
        tracing::error!(
            "enforcer agent must run as root (it makes cgroups and runs jobs as their callers)"
        );
        return EXIT_USAGE;
    }
    let (config, _) = match Config::load_or_default(config_path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return EXIT_USAGE;
        }
    };
    let mut flags = crate::validate::Checker::new(
        crate::validate::Source::Flags,
        crate::validate::Node::detect(),
    );
    flags.loopback(
        crate::validate::METRICS_LISTEN,
        metrics_listen,
        config.agent.metrics_non_loopback,
    );
    if let Err(e) = flags.finish() {
        tracing::error!("{e}");
        return EXIT_USAGE;
    }
    let metrics_listen = metrics_listen.or(config.agent.metrics_listen);
    let socket = socket.unwrap_or_else(|| config.agent.socket.clone());
    let store = match Store::open(&config.agent.lib_dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("config key agent.lib_dir: {e}");
            return EXIT_USAGE;
        }
    };
    // One agent per record directory: the second would adopt the first's
    // jobs.
    let agent_lock = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(config.agent.lib_dir.join("agent.lock"))
    {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(
                "opening {}: {e}",
                config.agent.lib_dir.join("agent.lock").display()
            );
            return EXIT_FAILURE;
        }
    };
    if !crate::safe_fs::try_lock(&agent_lock).unwrap_or(false) {
        tracing::error!(lib_dir = %config.agent.lib_dir.display(), "another agent runs with this lib_dir");
        return EXIT_USAGE;
    }
    // On cgroup v2 the agent leaves its own cgroup for the `agent` leaf now,
    // before any shim is born beside it: a delegated service cgroup
    // (systemd's Delegate=yes) can enable controllers for the jobs only once
    // no process is left in it.
    if let Err(e) = crate::cgroup::Subtree::open(config.cgroup_root.as_deref()) {
        tracing::warn!(error = %e, "preparing the cgroup subtree for jobs failed");
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("finding the enforcer binary: {e}");
            return EXIT_FAILURE;
        }
    };
    let (events, _) = broadcast::channel(1024);
    let budget = Metered::new(
        config.control_period.0,
        Metered::subtree_locator(config.cgroup_root.clone()),
    );
    let (meter_state, meter) = watch::channel(MeterState::Loading);
    let shared = Arc::new(Shared {
        config,
        store,
        exe,
        jobs: Mutex::new(BTreeMap::new()),
        budget: Mutex::new(Box::new(budget)),
        meter,
        trainings: Mutex::new(BTreeMap::new()),
        readings: Mutex::new(Readings::default()),
        events,
        seq: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        counters: metrics::AgentCounters::default(),
        subtree: Mutex::new(None),
        gpu: Mutex::new(None),
        connections: Mutex::new(Connections::default()),
    });
    {
        let shared = shared.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("meter-load".into())
            .spawn(move || load_meter(&shared, &meter_state))
        {
            tracing::error!("starting the thread that loads the steal programs failed: {e}");
            return EXIT_FAILURE;
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the async runtime failed: {e}");
            return EXIT_FAILURE;
        }
    };
    let status = rt.block_on(async move {
        let listener = match bind(&socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return EXIT_USAGE;
            }
        };
        if let Some(addr) = metrics_listen {
            let listener = match metrics::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("agent.metrics_listen {addr}: binding failed: {e}");
                    let _ = std::fs::remove_file(&socket);
                    return EXIT_FAILURE;
                }
            };
            let state = shared.clone();
            let render: metrics::Render = Arc::new(move || metrics::render(&scrape(&state)));
            tokio::spawn(metrics::serve(listener, render));
            tracing::info!(%addr, "serving metrics at /metrics");
        }
        recover(&shared);
        tracing::info!(socket = %socket.display(), records = %shared.store.path().display(), "agent listening");
        let status = serve(&shared, listener).await;
        let _ = std::fs::remove_file(&socket);
        if shared.config.agent.on_agent_stop == OnAgentStop::End {
            end_all(&shared).await;
            // The ended jobs' clients get their answers before the exit.
            let t0 = std::time::Instant::now();
            while shared.waiting.load(Ordering::Relaxed) > 0 && t0.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        status
    });
    drop(agent_lock);
    status
}

/// Loads the node's steal programs, once per agent, on a thread of its own
/// and holding none of the agent's locks: the kernel's verification can
/// take seconds, and the agent answers meanwhile. The budget gets them (or
/// the reason they failed) before the state says so, so a request that saw
/// [`MeterState::Loaded`] finds them installed.
fn load_meter(shared: &Shared, state: &watch::Sender<MeterState>) {
    let loaded = crate::probe::steal::StealMeter::load().map_err(|e| e.to_string());
    let now = match &loaded {
        Ok(_) => {
            tracing::info!("steal programs loaded: attached while a training is protected");
            MeterState::Loaded
        }
        Err(reason) => {
            tracing::warn!(%reason, "loading the steal programs failed: this agent runs without steal metering and refuses protect");
            MeterState::Failed(reason.clone())
        }
    };
    match shared.budget.lock() {
        Ok(mut budget) => budget.install_meter(loaded),
        Err(_) => tracing::error!("agent state poisoned: the steal programs are not installed"),
    }
    state.send_replace(now);
}

/// Waits, holding no lock, until the steal programs' load has ended.
async fn meter_settled(shared: &Shared) -> MeterState {
    let mut state = shared.meter.clone();
    let settled = state
        .wait_for(|s| *s != MeterState::Loading)
        .await
        .map(|s| s.clone());
    settled.unwrap_or_else(|_| {
        MeterState::Failed("the thread loading the steal programs ended without a result".into())
    })
}

/// Whether a job request may protect a training (its own flag, or the
/// config it runs with): such a job waits for the steal programs.
fn may_protect(shared: &Shared, job: &JobRequest) -> bool {
    let t = &shared.config.training;
    job.protect.is_some() || job.config.is_some() || t.pid.is_some() || t.cgroup.is_some()
}

/// Makes the socket's directory (root's, 0755: a socket in it must be
/// reachable by every caller) and binds the socket, 0666: who may do what
/// is decided from the peer's credentials, not the file mode.
fn bind(socket: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| format!("agent socket {}: has no directory", socket.display()))?;
    if !socket.is_absolute() {
        return Err(format!(
            "agent socket {}: must be an absolute path",
            socket.display()
        ));
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() || !crate::trust::trusted(meta.uid(), meta.mode() & 0o7777) {
        return Err(format!(
            "agent socket directory {}: must be a directory owned by root and not writable by group or others",
            dir.display()
        ));
    }
    // A state directory made below it first (0700 like every missing
    // parent of a state directory) would hide the socket from callers.
    if meta.mode() & 0o755 != 0o755 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod 0755 {}: {e}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(format!("an agent already listens on {}", socket.display()));
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_symlink() || m.is_dir() => {
            return Err(format!(
                "agent socket {}: exists and is not a socket",
                socket.display()
            ));
        }
        Ok(_) => {
            let _ = std::fs::remove_file(socket);
        }
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("chmod {}: {e}", socket.display()))?;
    Ok(listener)
}

async fn serve(shared: &Arc<Shared>, listener: UnixListener) -> u8 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("installing the signal handlers failed");
        return EXIT_FAILURE;
    };
    let period = shared
        .config
        .control_period
        .0
        .max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move { connection(shared, stream).await });
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            at = tick.tick() => {
                shared.counters.tick_lag(tokio::time::Instant::now().saturating_duration_since(at));
                budget_tick(shared);
            }
            _ = prune.tick() => prune_finished(shared),
            _ = term.recv() => {
                tracing::info!(on_agent_stop = ?shared.config.agent.on_agent_stop, "SIGTERM: agent stopping");
                return 0;
            }
            _ = int.recv() => {
                tracing::info!(on_agent_stop = ?shared.config.agent.on_agent_stop, "SIGINT: agent stopping");
                return 0;
            }
        }
    }
}

/// One control period of the node's budgets: each changed wish is written
/// to the job's record, where its shim's session picks it up and applies
/// it through the job's one actuator (see [`crate::agent::budget`]).
fn budget_tick(shared: &Shared) {
    let (wishes, events) = shared
        .budget
        .lock()
        .map(|mut b| (b.tick(), b.take_events()))
        .unwrap_or_default();
    for (id, event) in events {
        let uid = shared
            .jobs
            .lock()
            .ok()
            .and_then(|j| j.get(&id).map(|j| j.plan.caller_uid))
            .unwrap_or(0);
        emit(shared, &id, uid, event, None);
    }
    if wishes.is_empty() {
        return;
    }
    let Ok(mut jobs) = shared.jobs.lock() else {
        return;
    };
    for (id, wish) in wishes {
        let Some(job) = jobs.get_mut(&id) else {
            continue;
        };
        if job.quota == Some(wish) || job.done.borrow().is_some() {
            continue;
        }
        match shared.store.open_job(&id).and_then(|d| d.write_wish(&wish)) {
            Ok(()) => job.quota = Some(wish),
            Err(error) => {
                tracing::warn!(job = %id, %error, "handing the job its budget wish failed")
            }
        }
    }
}

/// Forgets the jobs that ended more than `keep_finished` ago, with their
/// records.
fn prune_finished(shared: &Shared) {
    let keep = u64::try_from(shared.config.agent.keep_finished.0.as_millis()).unwrap_or(u64::MAX);
    let now = store::now_ms();
    let old: Vec<String> = match shared.jobs.lock() {
        Ok(mut jobs) => {
            let old: Vec<String> = jobs
                .iter()
                .filter(|(_, j)| {
                    j.done
                        .borrow()
                        .as_ref()
                        .is_some_and(|r| now.saturating_sub(r.ended_unix_ms) > keep)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &old {
                jobs.remove(id);
            }
            old
        }
        Err(_) => return,
    };
    for id in old {
        shared.store.remove(&id);
    }
}

/// What waiting for the next message gave.
enum Next {
    Line(Vec<u8>),
    /// The client closed the connection between messages.
    End,
    /// The deadline passed (no hello yet, or a message begun and not
    /// finished).
    Stalled,
}

/// Reads the next line, waiting for the socket until `by` when given, and
/// otherwise for as long as nothing of a message has arrived: a message
/// begun must be finished within `finish_within`.
async fn next_line(
    stream: &UnixStream,
    reader: &mut LineReader,
    by: Option<tokio::time::Instant>,
    finish_within: Duration,
) -> Result<Next, ProtoError> {
    let fd = stream.as_raw_fd();
    let mut begun = None;
    loop {
        if let Some(line) = reader.next_line()? {
            return Ok(Next::Line(line));
        }
        if reader.at_eof() {
            return Ok(Next::End);
        }
        if begun.is_none() && reader.has_partial() {
            begun = Some(tokio::time::Instant::now() + finish_within);
        }
        match by.or(begun) {
            Some(deadline) => match tokio::time::timeout_at(deadline, stream.readable()).await {
                Ok(ready) => ready?,
                Err(_) => return Ok(Next::Stalled),
            },
            None => stream.readable().await?,
        }
        match stream.try_io(Interest::READABLE, || reader.fill(fd)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// How often a connection that waits (for a job's end, for events) is
/// checked for a client that has gone.
const HANGUP_POLL: Duration = Duration::from_secs(1);

/// Resolves once the client has closed its end of the connection entirely,
/// so that a client gone while it waited gives its connection's place back
/// (`agent.max_connections*`) at once, not when its job ends. A client that
/// only shut down its writing half still reads its answer: that is no
/// hangup (the kernel reports `POLLHUP` only when both halves are shut).
async fn hung_up(stream: &UnixStream) {
    let mut tick = tokio::time::interval(HANGUP_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut p = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd on a descriptor this task owns; a zero
        // timeout never blocks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
    }
}

async fn send(stream: &mut UnixStream, msg: &Response) -> std::io::Result<()> {
    stream.write_all(&proto::encode(msg)).await
}

fn refuse(shared: &Shared, caller: &Caller, what: &str, answer: &Answer) {
    shared.counters.refused(what);
    tracing::warn!(
        uid = caller.uid,
        pid = caller.pid.as_raw(),
        request = what,
        status = answer.status,
        "refused: {}",
        answer.message
    );
}

async fn connection(shared: Arc<Shared>, mut stream: UnixStream) {
    let caller = match Caller::of(&stream) {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(%error, "reading a client's credentials failed");
            return;
        }
    };
    let _admitted = match admit(&shared, &caller) {
        Ok(a) => a,
        Err(answer) => {
            refuse(&shared, &caller, "connect", &answer);
            let _ = send(&mut stream, &answer.response()).await;
            return;
        }
    };
    let timeout = shared.config.agent.hello_timeout.0;
    let hello_by = tokio::time::Instant::now() + timeout;
    let mut reader = LineReader::default();
    let mut hello = false;
    loop {
        let by = (!hello).then_some(hello_by);
        let line = match next_line(&stream, &mut reader, by, timeout).await {
            Ok(Next::Line(l)) => l,
            Ok(Next::End) => return,
            Ok(Next::Stalled) => {
                let what = if hello {
                    "a message was begun and not finished"
                } else {
                    "no hello came"
                };
                let answer = Answer::usage(format!(
                    "{what} within {} (agent.hello_timeout): closing the connection",
                    shared.config.agent.hello_timeout
                ));
                refuse(&shared, &caller, if hello { "?" } else { "hello" }, &answer);
                let _ = send(&mut stream, &answer.response()).await;
                return;
            }
            Err(e) => {
                let answer = Answer::usage(format!("bad message: {e}"));
                shared.counters.request("malformed");
                refuse(&shared, &caller, "malformed", &answer);
                let _ = send(&mut stream, &answer.response()).await;
                return;
            }
        };
        let fds = std::mem::take(&mut reader.fds);
        let request: Request = match serde_json::from_slice::<Request>(&line) {
            Ok(r) => {
                shared.counters.request(r.kind());
                r
            }
            Err(e) => {
                let answer = Answer::usage(format!("malformed message: {e}"));
                shared.counters.request("malformed");
                refuse(&shared, &caller, "malformed", &answer);
                if send(&mut stream, &answer.response()).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if !hello {
            let answer = match request {
                Request::Hello { api } if api == API_VERSION => {
                    hello = true;
                    let hello = Response::Hello {
                        api: API_VERSION,
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                    };
                    if send(&mut stream, &hello).await.is_err() {
                        return;
                    }
                    continue;
                }
                Request::Hello { api } => Answer::usage(format!(
                    "API version {api} is not spoken here: this agent speaks version {API_VERSION}"
                )),
                _ => Answer::usage("the first message must be {\"type\":\"hello\",\"api\":1}"),
            };
            refuse(&shared, &caller, "hello", &answer);
            let _ = send(&mut stream, &answer.response()).await;
            return;
        }
        if let Err(answer) = caller.check_allowed(&shared.config.agent.allowed_groups) {
            let answer = Answer::usage(answer.0);
            refuse(&shared, &caller, request.kind(), &answer);
            let _ = send(&mut stream, &answer.response()).await;
            return;
        }
        let keep_going = match request {
            Request::Hello { .. } => {
                let answer = Answer::usage("hello was already sent on this connection");
                refuse(&shared, &caller, "hello", &answer);
                send(&mut stream, &answer.response()).await.is_ok()
            }
            Request::Run {
                job,
                command,
                env,
                cwd,
            } => {
                let kind = JobKind::Run { command };
                if may_protect(&shared, &job) {
                    meter_settled(&shared).await;
                }
                let prepared = start_job(&shared, &caller, *job, kind, Some(fds), env, cwd);
                accept(&shared, &caller, &mut stream, "run", prepared).await
            }
            Request::Attach { job, pid, tree } => {
                let kind = JobKind::Attach { pid, tree };
                if may_protect(&shared, &job) {
                    meter_settled(&shared).await;
                }
                let prepared = start_job(&shared, &caller, *job, kind, None, Vec::new(), None);
                accept(&shared, &caller, &mut stream, "attach", prepared).await
            }
            Request::Wait { id } => {
                let found = lookup(&shared, &caller, &id).map(|(plan, rx)| {
                    (
                        plan.id,
                        plan.deadline_unix_ms,
                        plan.kill_grace_ms,
                        rx,
                        false,
                    )
                });
                follow(&shared, &caller, &mut stream, "wait", found).await
            }
            Request::Game {
                game,
                command,
                env,
                cwd,
            } => {
                let prepared = start_game(&shared, &caller, *game, command, fds, env, cwd);
                accept(&shared, &caller, &mut stream, "game", prepared).await
            }
            Request::Protect {
                pid,
                cgroup,
                follow_children,
                progress_file,
                budget,
            } => {
                meter_settled(&shared).await;
                let r = protect(
                    &shared,
                    &caller,
                    pid,
                    cgroup,
                    follow_children,
                    progress_file,
                    budget,
                );
                let msg = match r {
                    Ok(training) => Response::Protected { training },
                    Err(a) => {
                        refuse(&shared, &caller, "protect", &a);
                        a.response()
                    }
                };
                send(&mut stream, &msg).await.is_ok()
            }
            Request::Status => {
                let msg = status(&shared, &caller);
                send(&mut stream, &msg).await.is_ok()
            }
            Request::Report { id, wait } => {
                let msg = match lookup(&shared, &caller, &id) {
                    Err(a) => {
                        refuse(&shared, &caller, "report", &a);
                        a.response()
                    }
                    Ok((plan, mut rx)) => {
                        if wait {
                            tokio::select! {
                                _ = rx.wait_for(Option::is_some) => {}
                                () = hung_up(&stream) => return,
                            }
                        }
                        let result = rx.borrow().clone();
                        match result {
                            Some(r) => finished(&plan.id, r),
                            None => Answer::usage(format!(
                                "job {id} is still running (ask with \"wait\": true to wait for it)"
                            ))
                            .response(),
                        }
                    }
                };
                send(&mut stream, &msg).await.is_ok()
            }
            Request::Cancel { id } => {
                let msg = match cancel(&shared, &caller, &id) {
                    Ok(()) => Response::Cancelled { id },
                    Err(a) => {
                        refuse(&shared, &caller, "cancel", &a);
                        a.response()
                    }
                };
                send(&mut stream, &msg).await.is_ok()
            }
            Request::Subscribe => {
                subscribe(&shared, &caller, &mut stream).await;
                false
            }
        };
        if !keep_going {
            return;
        }
    }
}

/// Tells the client the id of a job whose plan is persisted, then starts
/// it and answers its end: a client that loses the agent after `accepted`
/// can always wait for the job by id.
async fn accept(
    shared: &Arc<Shared>,
    caller: &Caller,
    stream: &mut UnixStream,
    what: &str,
    prepared: Result<Prepared, Answer>,
) -> bool {
    let p = match prepared {
        Ok(p) => p,
        Err(answer) => {
            refuse(shared, caller, what, &answer);
            return send(stream, &answer.response()).await.is_ok();
        }
    };
    let (id, deadline, grace) = (
        p.plan.id.clone(),
        p.plan.deadline_unix_ms,
        p.plan.kill_grace_ms,
    );
    let msg = Response::Accepted {
        id: id.clone(),
        deadline_unix_ms: deadline,
        kill_grace_ms: grace,
    };
    // Started whether or not the client is still there: the plan is
    // persisted and the job is the caller's.
    let told = send(stream, &msg).await.is_ok();
    let rx = launch(shared, caller, p);
    told && follow(
        shared,
        caller,
        stream,
        what,
        Ok((id, deadline, grace, rx, false)),
    )
    .await
}

type Accepted = Result<(String, u64, u64, watch::Receiver<Option<JobResult>>, bool), Answer>;

/// Answers `accepted` then the job's end; `false` when the client is gone.
async fn follow(
    shared: &Shared,
    caller: &Caller,
    stream: &mut UnixStream,
    what: &str,
    accepted: Accepted,
) -> bool {
    let (id, deadline, grace, mut rx, announce) = match accepted {
        Ok(a) => a,
        Err(answer) => {
            refuse(shared, caller, what, &answer);
            return send(stream, &answer.response()).await.is_ok();
        }
    };
    if announce {
        let msg = Response::Accepted {
            id: id.clone(),
            deadline_unix_ms: deadline,
            kill_grace_ms: grace,
        };
        if send(stream, &msg).await.is_err() {
            return false;
        }
    }
    shared.waiting.fetch_add(1, Ordering::Relaxed);
    let ended = tokio::select! {
        r = rx.wait_for(Option::is_some) => r.map(|r| r.clone()).ok().flatten(),
        () = hung_up(stream) => {
            tracing::debug!(job = %id, uid = caller.uid, pid = caller.pid.as_raw(), "the client waiting for the job has gone; the job runs on");
            None
        }
    };
    let sent = match ended {
        Some(r) => send(stream, &finished(&id, r)).await.is_ok(),
        None => false,
    };
    shared.waiting.fetch_sub(1, Ordering::Relaxed);
    sent
}

fn finished(id: &str, r: JobResult) -> Response {
    match r.report {
        Some(report) => Response::Finished {
            id: id.to_owned(),
            status: r.status,
            report: Box::new(report),
        },
        None => Response::Failed {
            id: id.to_owned(),
            status: r.status,
            message: r.error.unwrap_or_default(),
        },
    }
}

/// The job `id` if the caller may see it.
fn lookup(
    shared: &Shared,
    caller: &Caller,
    id: &str,
) -> Result<(JobPlan, watch::Receiver<Option<JobResult>>), Answer> {
    let jobs = shared
        .jobs
        .lock()
        .map_err(|_| Answer::failed("agent state poisoned"))?;
    match jobs.get(id) {
        Some(job) if caller.owns(job.plan.caller_uid) => {
            Ok((job.plan.clone(), job.done.subscribe()))
        }
        // Someone else's job is answered like a missing one: its name is
        // not the caller's to learn.
        _ => Err(Answer::usage(format!(
            "no job {id:?} of uid {}",
            caller.uid
        ))),
    }
}

/// Checks a request against the caller's rights, persists its plan and
/// starts its shim.
fn start_job(
    shared: &Arc<Shared>,
    caller: &Caller,
    request: JobRequest,
    kind: JobKind,
    fds: Option<Vec<OwnedFd>>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
) -> Result<Prepared, Answer> {
    let mut config = shared.config.clone();
    if let Some(path) = &request.config {
        if !caller.is_root() {
            return Err(Answer::usage(
                "--config: only root may choose the agent's config for a job; the agent's own config applies",
            ));
        }
        config = Config::load(path).map_err(|e| Answer::usage(e.to_string()))?;
        // The agent's records and socket stay the agent's.
        config.agent = shared.config.agent.clone();
    }
    if !caller.is_root() {
        if request.user.is_some() || request.group.is_some() {
            return Err(Answer::usage(format!(
                "--user / --group: the jobs of uid {} run as uid {}; only root may name another user",
                caller.uid, caller.uid
            )));
        }
        if request.on_event.is_some() {
            return Err(Answer::usage(
                "--on-event: a hook runs as root; only root may set one",
            ));
        }
        if let Some(pid) = request.protect
            && auth::process_uid(pid) != Some(caller.uid)
        {
            return Err(Answer::usage(format!(
                "--protect {pid}: uid {} may protect only its own processes",
                caller.uid
            )));
        }
        if let JobKind::Attach { pid, .. } = kind
            && auth::process_uid(pid.as_raw()) != Some(caller.uid)
        {
            return Err(Answer::usage(format!(
                "refusing to attach: PID {pid} is not a process of uid {}; a caller may attach only its own processes",
                caller.uid
            )));
        }
    }
    if let JobKind::Attach { .. } = kind
        && (request.user.is_some() || request.group.is_some())
    {
        return Err(Answer::usage(
            "--user / --group: an attached process keeps its own identity; they apply to `enforcer run`",
        ));
    }
    let fds = match (&kind, fds) {
        (JobKind::Run { .. }, Some(fds)) if fds.len() == proto::RUN_FDS => Some(fds),
        (JobKind::Run { .. }, _) => {
            return Err(Answer::usage(
                "run: the message must carry exactly 3 file descriptors (stdin, stdout, stderr) as SCM_RIGHTS",
            ));
        }
        (JobKind::Attach { .. }, _) => None,
        (JobKind::Game { .. }, _) => return Err(Answer::failed("a game is started by start_game")),
    };
    let id = match &request.job {
        Some(name) => name.clone(),
        None => format!(
            "job-{}-{}",
            store::now_ms(),
            shared.seq.fetch_add(1, Ordering::Relaxed)
        ),
    };
    let mut request = shim::sanitize(request);
    request.job = Some(id.clone());
    let command = kind.command();
    let plan: Plan =
        Plan::from_request(config.clone(), &request, &command).map_err(Answer::usage)?;
    let run_as = if caller.is_root() {
        plan.run_as.clone()
    } else {
        Some(caller.run_as())
    };
    // A protected job joins its training's one budget: the training is
    // registered as `protect` would (same owner checks), or found there.
    // Without `--budget` a job joins a training already protected under the
    // budget it was registered with (its registrant's, or root, only).
    let t = &plan.config.training;
    let training_id = crate::agent::budget::training_id(t.pid, t.cgroup.as_deref());
    let held = training_id
        .as_deref()
        .is_some_and(|i| shared.budget.lock().is_ok_and(|b| b.holds(i)));
    let training = if held && request.budget.is_none() && !plan.measure_only {
        let owner = training_id
            .as_ref()
            .and_then(|i| shared.trainings.lock().ok()?.get(i).copied());
        if let (Some(i), Some(owner)) = (&training_id, owner)
            && !caller.owns(owner)
        {
            return Err(Answer::usage(format!(
                "--protect: training {i} was registered by uid {owner}"
            )));
        }
        training_id
    } else if (t.pid.is_some() || t.cgroup.is_some()) && !plan.measure_only {
        Some(protect(
            shared,
            caller,
            t.pid,
            t.cgroup.clone(),
            t.follow_children,
            t.progress_file.clone(),
            Some(plan.config.budget),
        )?)
    } else {
        crate::agent::budget::training_id(t.pid, t.cgroup.as_deref())
    };
    let external_budget = training
        .as_deref()
        .is_some_and(|t| !plan.measure_only && shared.budget.lock().is_ok_and(|b| b.holds(t)));
    let accepted_unix_ms = store::now_ms();
    let deadline = accepted_unix_ms
        .saturating_add(u64::try_from(plan.supervision.timeout.as_millis()).unwrap_or(u64::MAX));
    let job_plan = JobPlan {
        id: id.clone(),
        kind,
        request,
        config,
        caller_uid: caller.uid,
        caller_pid: caller.pid.as_raw(),
        env,
        cwd: cwd.unwrap_or_else(|| PathBuf::from("/")),
        run_as,
        training,
        external_budget,
        accepted_unix_ms,
        deadline_unix_ms: deadline,
        kill_grace_ms: u64::try_from(plan.supervision.kill_grace.as_millis()).unwrap_or(u64::MAX),
    };
    let dir = match shared.store.create(&id) {
        Ok(Some(d)) => d,
        Ok(None) => return Err(Answer::usage(format!("job name {id:?} is in use"))),
        Err(e) => return Err(Answer::failed(e.to_string())),
    };
    if let Err(e) = dir.write_plan(&job_plan) {
        shared.store.remove(&id);
        return Err(Answer::failed(format!(
            "persisting the job's plan failed: {e}"
        )));
    }
    Ok(Prepared {
        plan: job_plan,
        dir,
        fds,
    })
}

/// A game in the job the caller runs in: the caller must own that job (an
/// agent job of its uid; root: any job). The game's command runs as the
/// caller, in a cgroup the agent makes inside the job.
fn start_game(
    shared: &Arc<Shared>,
    caller: &Caller,
    game: crate::cli::game::GameArgs,
    command: Vec<String>,
    fds: Vec<OwnedFd>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
) -> Result<Prepared, Answer> {
    if fds.len() != proto::RUN_FDS {
        return Err(Answer::usage(
            "game: the message must carry exactly 3 file descriptors (stdin, stdout, stderr) as SCM_RIGHTS",
        ));
    }
    if game.config.is_some() && !caller.is_root() {
        return Err(Answer::usage(
            "--config: only root may choose the agent's config for a game",
        ));
    }
    let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", caller.pid))
        .map_err(|e| Answer::usage(format!("game: reading the caller's cgroups: {e}")))?;
    let job = shim::caller_job(&membership).map_err(|e| Answer::usage(format!("game: {e}")))?;
    let job_name = job
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let owner = shared.jobs.lock().ok().and_then(|jobs| {
        jobs.get(&job_name)
            .filter(|j| j.done.borrow().is_none())
            .map(|j| j.plan.caller_uid)
    });
    match owner {
        Some(uid) if caller.owns(uid) => {}
        None if caller.is_root() => {}
        _ => {
            return Err(Answer::usage(format!(
                "game: the caller (uid {}) is not inside a running job of its own",
                caller.uid
            )));
        }
    }
    let config = shared.config.clone();
    let plan = crate::cli::game::game_plan(config.clone(), &game).map_err(Answer::usage)?;
    let id = format!(
        "{job_name}.game-{}",
        shared.seq.fetch_add(1, Ordering::Relaxed)
    );
    let accepted_unix_ms = store::now_ms();
    let job_plan = JobPlan {
        id: id.clone(),
        kind: JobKind::Game {
            job: job_name,
            game: crate::cli::game::GameArgs {
                report: None,
                config: None,
                ..game
            },
            command,
            membership,
        },
        request: JobRequest::default(),
        config,
        caller_uid: caller.uid,
        caller_pid: caller.pid.as_raw(),
        env,
        cwd: cwd.unwrap_or_else(|| PathBuf::from("/")),
        run_as: (!caller.is_root()).then(|| caller.run_as()),
        training: None,
        external_budget: false,
        accepted_unix_ms,
        deadline_unix_ms: accepted_unix_ms
            .saturating_add(u64::try_from(plan.timeout.as_millis()).unwrap_or(u64::MAX)),
        kill_grace_ms: u64::try_from(plan.kill_grace.as_millis()).unwrap_or(u64::MAX),
    };
    let dir = match shared.store.create(&id) {
        Ok(Some(d)) => d,
        Ok(None) => return Err(Answer::usage(format!("game id {id:?} is in use"))),
        Err(e) => return Err(Answer::failed(e.to_string())),
    };
    if let Err(e) = dir.write_plan(&job_plan) {
        shared.store.remove(&id);
        return Err(Answer::failed(format!(
            "persisting the game's plan failed: {e}"
        )));
    }
    Ok(Prepared {
        plan: job_plan,
        dir,
        fds: Some(fds),
    })
}

/// A job whose plan is persisted (the client may be told its id) and whose
/// shim is not started yet.
struct Prepared {
    plan: JobPlan,
    dir: JobDir,
    fds: Option<Vec<OwnedFd>>,
}

/// Starts the prepared job's shim; its end (or its failure to start) comes
/// through the returned channel.
fn launch(
    shared: &Arc<Shared>,
    caller: &Caller,
    p: Prepared,
) -> watch::Receiver<Option<JobResult>> {
    #[cfg(feature = "test-audit")]
    stall_before_spawn();
    let Prepared { plan, dir, fds } = p;
    let id = plan.id.clone();
    let child = match spawn_shim(&shared.exe, &dir, &plan, fds) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(job = %id, uid = caller.uid, pid = caller.pid.as_raw(), "{e}");
            let result = JobResult {
                status: EXIT_FAILURE,
                report: None,
                error: Some(e),
                ended_unix_ms: store::now_ms(),
            };
            let _ = dir.write_result(&result);
            let rx = register(shared, plan, None);
            publish(shared, &id, result);
            return rx;
        }
    };
    tracing::info!(job = %id, uid = caller.uid, pid = caller.pid.as_raw(), shim = child.id(), "job accepted");
    let rx = register(shared, plan, Some(child.id() as i32));
    let shared2 = shared.clone();
    // A thread, not the runtime's blocking pool: it may wait for as long
    // as the job runs, and must not hold up the agent's exit.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
        collect(&shared2, &id, &dir);
    });
    rx
}

/// Test builds only: `ENFORCER_TEST_AGENT_STALL_BEFORE_SPAWN=1` holds the
/// agent between persisting a plan and starting its shim, so that a test
/// can kill it there.
#[cfg(feature = "test-audit")]
fn stall_before_spawn() {
    if std::env::var_os("ENFORCER_TEST_AGENT_STALL_BEFORE_SPAWN").is_some() {
        tracing::warn!("test build: stalling before the shim's spawn");
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn register(
    shared: &Shared,
    plan: JobPlan,
    shim_pid: Option<i32>,
) -> watch::Receiver<Option<JobResult>> {
    let (tx, rx) = watch::channel(None);
    let id = plan.id.clone();
    let uid = plan.caller_uid;
    let shim = shim_pid.map(|pid| store::ShimInfo {
        pid,
        start_time: store::start_time(pid).unwrap_or(0),
    });
    if let Some(t) = &plan.training {
        register_training_of(shared, &plan);
        if let Ok(mut b) = shared.budget.lock()
            && let Err(e) = b.add_job(t, &id, PathBuf::new())
        {
            tracing::debug!(job = %id, training = %t, "budget: {e}");
        }
    }
    if let Ok(mut jobs) = shared.jobs.lock() {
        jobs.insert(
            id.clone(),
            Job {
                plan,
                done: tx,
                shim,
                quota: None,
            },
        );
    }
    emit(shared, &id, uid, "started", None);
    rx
}

/// A job that protects a training nobody registered with `protect` (its
/// `--protect` flag or the config's `[training]`; or any job re-adopted
/// after a restart, since registrations live in memory) registers it from
/// its plan, owned by the job's caller. A registered training is left as
/// its owner registered it.
fn register_training_of(shared: &Shared, plan: &JobPlan) {
    let Some(id) = &plan.training else {
        return;
    };
    let (Ok(mut trainings), Ok(mut budget)) = (shared.trainings.lock(), shared.budget.lock())
    else {
        return;
    };
    if trainings.contains_key(id) {
        return;
    }
    let t = &plan.config.training;
    let spec = TrainingSpec {
        pid: t.pid,
        cgroup: t.cgroup.clone(),
        follow_children: t.follow_children,
        progress_file: t.progress_file.clone(),
        budget_fraction: plan.config.budget.fraction(),
        owner_uid: plan.caller_uid,
    };
    match budget.register_training(spec) {
        Ok(got) => {
            trainings.insert(got, plan.caller_uid);
        }
        Err(e) => {
            tracing::warn!(job = %plan.id, training = %id, "registering the job's training failed: {e}")
        }
    }
}

fn emit(shared: &Shared, id: &str, uid: u32, event: &str, status: Option<u8>) {
    let _ = shared.events.send(Event {
        id: id.to_owned(),
        event: event.to_owned(),
        uid,
        unix_ms: store::now_ms(),
        status,
    });
}

/// The shim has exited (or its lock is free): reads its result, or records
/// that it died without one, and publishes it.
fn collect(shared: &Shared, id: &str, dir: &JobDir) {
    let result = match dir.result() {
        Ok(Some(r)) => r,
        other => {
            let why = match other {
                Err(e) => format!("the job's result could not be read: {e}"),
                _ => "the job's shim died without a result (its cgroup is cleaned up by the next job or agent start)".to_owned(),
            };
            tracing::error!(job = %id, "{why}");
            let r = JobResult {
                status: EXIT_FAILURE,
                report: None,
                error: Some(why),
                ended_unix_ms: store::now_ms(),
            };
            let _ = dir.write_result(&r);
            r
        }
    };
    publish(shared, id, result);
}

fn publish(shared: &Shared, id: &str, mut result: JobResult) {
    if let Some(report) = result.report.as_mut()
        && let Ok(b) = shared.budget.lock()
        && let Some(figures) = b.job_figures(id)
    {
        report_node_budget(report, &figures);
    }
    let reason = result.report.as_ref().map(|r| r.reason);
    let status = result.status;
    let mut uid = 0;
    if let Ok(mut jobs) = shared.jobs.lock()
        && let Some(job) = jobs.get_mut(id)
    {
        uid = job.plan.caller_uid;
        job.done.send_replace(Some(result));
        job.shim = None;
    }
    if let Ok(mut b) = shared.budget.lock() {
        b.remove_job(id);
    }
    match reason {
        Some(crate::report::Reason::Deadline) => emit(shared, id, uid, "deadline", Some(status)),
        Some(crate::report::Reason::Oom) => emit(shared, id, uid, "oom", Some(status)),
        _ => {}
    }
    emit(shared, id, uid, "exited", Some(status));
    tracing::info!(job = %id, status, "job ended");
}

/// Fills the steal fields of a job's report that the node budget it
/// shared knows (as of the budget's last tick, at most one control period
/// before the job ended). The run-queue wait and the preemptions stay null
/// with their reason: the agent keeps them per training, not per job.
fn report_node_budget(
    report: &mut crate::report::Report,
    f: &crate::budget::node::JobStealFigures,
) {
    report.stolen_from_training_s = Some(f.steal.as_secs_f64());
    report.stolen_fraction = Some(f.stolen_fraction.unwrap_or(0.0));
    report.budget_fraction = Some(f.budget);
    report.over_budget_s = Some(f.over_budget.as_secs_f64());
    report.budget_used = f.budget_used;
    for field in [
        "stolen_from_training_s",
        "stolen_fraction",
        "budget_fraction",
        "over_budget_s",
    ]
    .into_iter()
    .chain(f.budget_used.map(|_| "budget_used"))
    {
        report.unavailable.remove(field);
    }
    for field in crate::report::LIFT_FIELDS {
        report.unavailable(
            field,
            "the node agent's budget loop does not lift jobs out of the idle class",
        );
    }
}

/// Starts `enforcer shim <dir>` in a session of its own with the caller's
/// standard descriptors.
fn spawn_shim(
    exe: &Path,
    dir: &JobDir,
    plan: &JobPlan,
    fds: Option<Vec<OwnedFd>>,
) -> Result<std::process::Child, String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("shim").arg(dir.path());
    match fds {
        Some(fds) => {
            let mut fds = fds.into_iter();
            let (Some(i), Some(o), Some(e)) = (fds.next(), fds.next(), fds.next()) else {
                return Err("run: three descriptors are needed".to_owned());
            };
            cmd.stdin(i).stdout(o).stderr(e);
        }
        None => {
            cmd.stdin(std::process::Stdio::null());
            cmd.stdout(std::process::Stdio::null());
            cmd.stderr(std::process::Stdio::null());
        }
    }
    // The caller's directory when root can enter it (the job's relative
    // paths are the caller's), else `/`.
    cmd.current_dir(if plan.cwd.is_dir() {
        &plan.cwd
    } else {
        Path::new("/")
    });
    // SAFETY: setsid, sigemptyset, sigaddset and pthread_sigmask are
    // async-signal-safe and touch only this stack's set.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A cancel may come as soon as the job is `started`: held
            // pending until the shim's handlers are in place
            // (`Signals::install` unblocks them), not fatal to the shim
            // before that.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in crate::job::FORWARDED_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("starting the job's shim {} failed: {e}", exe.display()))
}

/// After a restart: every job with a record is re-adopted (its shim
/// lives), collected (it ended meanwhile) or declared dead (its shim died,
/// or the agent died before starting it), and the cgroups of dead jobs are
/// removed. Finished records older than `keep_finished` are pruned.
fn recover(shared: &Arc<Shared>) {
    let ids = match shared.store.ids() {
        Ok(ids) => ids,
        Err(error) => {
            tracing::error!(%error, "listing the job records failed");
            return;
        }
    };
    let keep = u64::try_from(shared.config.agent.keep_finished.0.as_millis()).unwrap_or(u64::MAX);
    let mut dead = false;
    for id in ids {
        let dir = match shared.store.open_job(&id) {
            Ok(d) => d,
            Err(error) => {
                tracing::warn!(job = %id, %error, "skipping a job record");
                continue;
            }
        };
        let plan = match dir.plan() {
            Ok(Some(p)) => p,
            other => {
                tracing::warn!(job = %id, "a job record without a readable plan: removed ({other:?})");
                shared.store.remove(&id);
                continue;
            }
        };
        if let Ok(Some(r)) = dir.result() {
            if store::now_ms().saturating_sub(r.ended_unix_ms) > keep {
                shared.store.remove(&id);
                continue;
            }
            let _ = register(shared, plan, None);
            publish(shared, &id, r);
            continue;
        }
        match dir.try_lock() {
            Ok(Some(lock)) => {
                // No shim holds the job: it never started, or its shim died.
                let r = match dir.result() {
                    Ok(Some(r)) => r,
                    _ => {
                        let why = match dir.shim() {
                            Ok(Some(_)) => "the job's shim died without a result".to_owned(),
                            _ => "the agent stopped before the job started; it was not run"
                                .to_owned(),
                        };
                        tracing::warn!(job = %id, "{why}");
                        dead = true;
                        let r = JobResult {
                            status: EXIT_FAILURE,
                            report: None,
                            error: Some(why),
                            ended_unix_ms: store::now_ms(),
                        };
                        let _ = dir.write_result(&r);
                        r
                    }
                };
                drop(lock);
                let _ = register(shared, plan, None);
                publish(shared, &id, r);
            }
            Ok(None) => {
                let shim = dir.shim().ok().flatten();
                tracing::info!(job = %id, shim = ?shim.map(|s| s.pid), deadline_unix_ms = plan.deadline_unix_ms, "re-adopting a live job");
                let _ = register(shared, plan.clone(), shim.map(|s| s.pid));
                if let Ok(mut jobs) = shared.jobs.lock()
                    && let Some(j) = jobs.get_mut(&id)
                {
                    j.shim = shim;
                }
                emit(shared, &id, plan.caller_uid, "adopted", None);
                let shared2 = shared.clone();
                // A thread, not the runtime's blocking pool: it may wait for as long
                // as the job runs, and must not hold up the agent's exit.
                std::thread::spawn(move || {
                    match dir.lock_file() {
                        Ok(f) => {
                            if let Err(error) = store::wait_lock(&f) {
                                tracing::error!(job = %id, %error, "waiting for the job's shim failed");
                            }
                        }
                        Err(error) => {
                            tracing::error!(job = %id, %error, "opening the job's lock failed")
                        }
                    }
                    collect(&shared2, &id, &dir);
                });
            }
            Err(error) => tracing::warn!(job = %id, %error, "locking a job record failed"),
        }
    }
    if dead {
        crate::job::session::clean_up_dead_jobs(&shared.config);
    }
}

fn protect(
    shared: &Shared,
    caller: &Caller,
    pid: Option<i32>,
    cgroup: Option<PathBuf>,
    follow_children: bool,
    progress_file: Option<PathBuf>,
    budget: Option<crate::units::Percent>,
) -> Result<String, Answer> {
    if pid.is_none() == cgroup.is_none() {
        return Err(Answer::usage("protect: give exactly one of pid and cgroup"));
    }
    if !caller.is_root() {
        if let Some(pid) = pid
            && auth::process_uid(pid) != Some(caller.uid)
        {
            return Err(Answer::usage(format!(
                "protect: PID {pid} is not a process of uid {}",
                caller.uid
            )));
        }
        if cgroup.is_some() {
            return Err(Answer::usage(
                "protect: only root may protect a training by cgroup; give its pid",
            ));
        }
    }
    if let MeterState::Failed(reason) = &*shared.meter.borrow() {
        return Err(Answer::failed(format!(
            "protect: this agent runs without steal metering: loading its steal programs failed ({reason})"
        )));
    }
    let spec = TrainingSpec {
        pid,
        cgroup,
        follow_children,
        progress_file,
        budget_fraction: budget.unwrap_or(shared.config.budget).fraction(),
        owner_uid: caller.uid,
    };
    let mut trainings = shared
        .trainings
        .lock()
        .map_err(|_| Answer::failed("agent state poisoned"))?;
    let mut budget = shared
        .budget
        .lock()
        .map_err(|_| Answer::failed("agent state poisoned"))?;
    let id = budget.register_training(spec).map_err(Answer::usage)?;
    if let Some(&owner) = trainings.get(&id)
        && !caller.owns(owner)
    {
        return Err(Answer::usage(format!(
            "protect: training {id} was registered by uid {owner}"
        )));
    }
    trainings.insert(id.clone(), caller.uid);
    Ok(id)
}

fn status(shared: &Shared, caller: &Caller) -> Response {
    // The running jobs' counters are read after the jobs' table is let go:
    // reading cgroup files must not hold it up.
    let mut running: Vec<(usize, PathBuf, Option<store::ShimInfo>)> = Vec::new();
    let mut live: Vec<String> = Vec::new();
    let mut jobs: Vec<JobStatus> = match shared.jobs.lock() {
        Ok(j) => {
            live.extend(
                j.values()
                    .filter(|j| j.done.borrow().is_none())
                    .map(|j| j.plan.id.clone()),
            );
            j.values()
                .filter(|j| caller.owns(j.plan.caller_uid))
                .enumerate()
                .map(|(i, j)| {
                    let result = j.done.borrow();
                    if result.is_none() && !matches!(j.plan.kind, JobKind::Game { .. }) {
                        running.push((i, j.plan.config.state_dir.clone(), j.shim));
                    }
                    JobStatus {
                        id: j.plan.id.clone(),
                        uid: j.plan.caller_uid,
                        command: j.plan.kind.command(),
                        state: if result.is_some() {
                            "finished"
                        } else {
                            "running"
                        }
                        .to_owned(),
                        deadline_unix_ms: j.plan.deadline_unix_ms,
                        status: result.as_ref().map(|r| r.status),
                        training: j.plan.training.clone(),
                        quota: j.quota,
                        usage: None,
                    }
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    let agent = shared.readings.lock().ok().map(|mut readings| {
        for (i, state_dir, shim) in &running {
            let job = &mut jobs[*i];
            job.usage = readings.job(&job.id, state_dir, *shim);
        }
        readings.retain(&live);
        // The shims counted are those of the jobs the caller may see.
        let ids: Vec<&str> = running.iter().map(|(i, ..)| jobs[*i].id.as_str()).collect();
        readings.agent(&ids)
    });
    let budget = shared.budget.lock().map(|b| b.status()).unwrap_or_default();
    let budget = if caller.is_root() {
        budget
    } else {
        let owners = shared
            .trainings
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let own: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        visible_budget(budget, caller.uid, &own, &owners)
    };
    Response::Status {
        jobs,
        budget,
        agent,
        meter: Some(shared.meter.borrow().clone()),
    }
}

/// The budget part of `status` as a non-root caller `uid` may see it: the
/// trainings it registered or that one of its jobs (`own`) protects, each
/// listing only its jobs; the other users' jobs are only counted
/// (`other_jobs`), and the trainings of other users that none of its jobs
/// protects are left out.
fn visible_budget(
    mut budget: serde_json::Value,
    uid: u32,
    own: &[&str],
    owners: &BTreeMap<String, u32>,
) -> serde_json::Value {
    let job_id = |v: &serde_json::Value| -> Option<String> {
        v.as_str()
            .or_else(|| v.get("job")?.as_str())
            .map(str::to_owned)
    };
    let Some(trainings) = budget
        .get_mut("trainings")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return budget;
    };
    trainings.retain_mut(|t| {
        let mut mine = false;
        let mut others = 0usize;
        for key in ["jobs", "pending_jobs"] {
            if let Some(list) = t.get_mut(key).and_then(serde_json::Value::as_array_mut) {
                list.retain(|j| {
                    let keep = job_id(j).is_some_and(|id| own.contains(&id.as_str()));
                    mine |= keep;
                    others += usize::from(!keep);
                    keep
                });
            }
        }
        let id = t
            .get("id")
            .or_else(|| t.get("training"))
            .and_then(serde_json::Value::as_str);
        let registered = id.and_then(|id| owners.get(id)) == Some(&uid);
        if let Some(obj) = t.as_object_mut() {
            obj.insert("other_jobs".into(), others.into());
        }
        registered || mine
    });
    budget
}

/// What the metrics endpoint shows: the job table, the budget's trainings
/// and meters, each running job's cgroup stats (read with no lock held)
/// and the agent's own counters.
fn scrape(shared: &Shared) -> metrics::Scrape {
    let program_stats = metrics::bpf_stats_enabled();
    let (trainings, meters, figures) = shared
        .budget
        .lock()
        .map(|b| {
            let trainings = b.trainings();
            let figures: BTreeMap<String, _> = trainings
                .iter()
                .flat_map(|t| &t.jobs)
                .filter_map(|j| Some((j.job.clone(), b.job_figures(&j.job)?)))
                .collect();
            (trainings, b.meter_health(program_stats), figures)
        })
        .unwrap_or_default();
    let training_owners = shared
        .trainings
        .lock()
        .map(|t| t.clone())
        .unwrap_or_default();
    let budget_of = |training: &str| {
        trainings
            .iter()
            .find(|t| t.training == training)
            .map(|t| t.budget)
    };
    let mut jobs: Vec<(metrics::JobSample, bool)> = match shared.jobs.lock() {
        Ok(jobs) => jobs
            .values()
            .map(|j| {
                let sample = metrics::JobSample {
                    id: j.plan.id.clone(),
                    uid: j.plan.caller_uid,
                    training: j.plan.training.clone(),
                    running: j.done.borrow().is_none(),
                    budget_fraction: j.plan.training.as_deref().and_then(budget_of),
                    quota_cores: j.quota.and_then(|q| q.cpu),
                    frozen: j.quota.is_some_and(|q| q.freeze),
                    stats: None,
                    steal: figures.get(&j.plan.id).cloned(),
                    gpu: Vec::new(),
                };
                (sample, matches!(j.plan.kind, JobKind::Game { .. }))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    // The running jobs' cgroup directories, where their GPU processes are.
    let mut cgroups: Vec<(String, PathBuf)> = Vec::new();
    // A game's cgroup is inside its job's, whose stats include it.
    if jobs.iter().any(|(j, game)| j.running && !game)
        && let Ok(mut subtree) = shared.subtree.lock()
    {
        if subtree.is_none() {
            match crate::cgroup::subtree::Subtree::open(shared.config.cgroup_root.as_deref()) {
                Ok(s) => *subtree = Some(s),
                Err(error) => tracing::warn!(%error, "metrics: the jobs' cgroups cannot be read"),
            }
        }
        if let Some(subtree) = subtree.as_ref() {
            for (job, _) in jobs.iter_mut().filter(|(j, game)| j.running && !game) {
                let cgroup = subtree.open_job(&job.id).ok();
                job.stats = cgroup.as_ref().map(|cg| cg.stats());
                if let Some(cg) = cgroup {
                    cgroups.push((job.id.clone(), cg.path().to_owned()));
                }
            }
        }
    }
    let gpu_telemetry = match shared.gpu.lock() {
        Ok(mut gpu) => {
            let gpu = gpu.get_or_insert_with(crate::gpu::node::NodeGpu::open);
            if gpu.is_available() {
                let members: Vec<_> = cgroups
                    .iter()
                    .filter_map(|(id, dir)| Some((id.clone(), gpu.membership_of_dir(dir)?)))
                    .collect();
                let mut read = gpu.read(&members);
                for (job, _) in &mut jobs {
                    job.gpu = read
                        .remove(&job.id)
                        .into_iter()
                        .flat_map(BTreeMap::into_values)
                        .map(|d| metrics::JobGpuSample {
                            device: d.index,
                            utilization: d.sm_util_pct.map(|p| p / 100.0),
                            memory_bytes: d.memory_used_bytes,
                        })
                        .collect();
                }
            }
            gpu.is_available()
        }
        Err(_) => false,
    };
    metrics::Scrape {
        gpu_telemetry,
        jobs: jobs.into_iter().map(|(j, _)| j).collect(),
        trainings,
        training_owners,
        meters,
        program_stats,
        counts: shared.counters.snapshot(),
        process: metrics::ProcessSample::read(),
    }
}

/// Ends a job as a signal to `enforcer run` would: SIGTERM to its shim,
/// which forwards it to the command; a second cancel kills the whole job.
fn cancel(shared: &Shared, caller: &Caller, id: &str) -> Result<(), Answer> {
    let jobs = shared
        .jobs
        .lock()
        .map_err(|_| Answer::failed("agent state poisoned"))?;
    let job = match jobs.get(id) {
        Some(j) if caller.owns(j.plan.caller_uid) => j,
        _ => {
            return Err(Answer::usage(format!(
                "no job {id:?} of uid {}",
                caller.uid
            )));
        }
    };
    if job.done.borrow().is_some() {
        return Err(Answer::usage(format!("job {id} has already ended")));
    }
    let shim = job
        .shim
        .ok_or_else(|| Answer::failed(format!("job {id}: its shim is not known")))?;
    signal_shim(shim, libc::SIGTERM).map_err(|e| {
        Answer::failed(format!(
            "job {id}: signalling its shim (pid {}) failed: {e}",
            shim.pid
        ))
    })?;
    tracing::info!(job = %id, uid = caller.uid, pid = caller.pid.as_raw(), "job cancelled");
    Ok(())
}

/// Signals the shim through a pidfd, after checking that the pid still
/// names it (its start time).
fn signal_shim(shim: store::ShimInfo, sig: i32) -> std::io::Result<()> {
    let pid = crate::host::Pid::try_from(shim.pid).map_err(std::io::Error::other)?;
    let pidfd = crate::job::pidfd::PidFd::open(pid)?;
    if store::start_time(shim.pid) != Some(shim.start_time) {
        return Err(std::io::Error::other(
            "the shim is gone (its pid names another process)",
        ));
    }
    pidfd.send_signal(sig)
}

async fn subscribe(shared: &Shared, caller: &Caller, stream: &mut UnixStream) {
    let mut rx = shared.events.subscribe();
    if send(
        stream,
        &Response::Status {
            jobs: Vec::new(),
            budget: serde_json::Value::Null,
            agent: None,
            meter: None,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    loop {
        let got = tokio::select! {
            got = rx.recv() => got,
            () = hung_up(stream) => return,
        };
        match got {
            Ok(ev) if caller.owns(ev.uid) => {
                if send(stream, &Response::Event(ev)).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(uid = caller.uid, missed = n, "a subscriber fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// `on_agent_stop = "end"`: SIGTERM to every live job's shim, then waits
/// (bounded by each job's kill grace plus a margin) for their results.
async fn end_all(shared: &Shared) {
    let live: Vec<(
        String,
        store::ShimInfo,
        watch::Receiver<Option<JobResult>>,
        u64,
    )> = match shared.jobs.lock() {
        Ok(jobs) => jobs
            .values()
            .filter(|j| j.done.borrow().is_none())
            .filter_map(|j| {
                Some((
                    j.plan.id.clone(),
                    j.shim?,
                    j.done.subscribe(),
                    j.plan.kill_grace_ms,
                ))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    for (id, shim, mut rx, grace) in live {
        tracing::info!(job = %id, "on_agent_stop = end: ending the job");
        let _ = signal_shim(shim, libc::SIGTERM);
        let wait = Duration::from_millis(grace) + Duration::from_secs(5);
        if tokio::time::timeout(wait, rx.wait_for(Option::is_some))
            .await
            .is_err()
        {
            // A second signal kills the whole job cgroup.
            let _ = signal_shim(shim, libc::SIGTERM);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_root_caller_sees_only_its_jobs_and_trainings_in_the_budget() {
        let budget = serde_json::json!({"trainings": [
            {"id": "pid-1", "training": "pid-1", "owner_uid": 0,
             "jobs": [{"job": "root-a", "steal_s": 0.1}], "pending_jobs": ["root-b"]},
            {"id": "pid-2", "training": "pid-2", "owner_uid": 1000,
             "jobs": [{"job": "mine", "steal_s": 0.2}, {"job": "root-c", "steal_s": 0.3}],
             "pending_jobs": []},
            {"id": "pid-3", "jobs": ["root-d"]},
        ]});
        let owners = BTreeMap::from([
            ("pid-1".to_owned(), 0),
            ("pid-2".to_owned(), 1000),
            ("pid-3".to_owned(), 1000),
        ]);
        let seen = visible_budget(budget, 1000, &["mine"], &owners);
        let text = seen.to_string();
        for hidden in ["root-a", "root-b", "root-c", "root-d", "pid-1"] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
        let t = seen["trainings"].as_array().unwrap();
        assert_eq!(t.len(), 2, "{text}");
        assert_eq!(t[0]["jobs"][0]["job"], "mine");
        assert_eq!(t[0]["other_jobs"], 1);
        assert_eq!(t[1]["jobs"].as_array().unwrap().len(), 0);
        assert_eq!(t[1]["other_jobs"], 1);
    }

    #[test]
    fn connections_are_held_to_the_total_and_per_uid_limits_and_given_back() {
        let agent = crate::config::AgentConfig {
            max_connections: 3,
            max_connections_per_uid: 2,
            ..Default::default()
        };
        let mut c = Connections::default();
        c.take(0, &agent).unwrap();
        c.take(0, &agent).unwrap();
        let e = c.take(0, &agent).unwrap_err();
        assert!(
            e.contains("uid 0 already has 2") && e.contains("agent.max_connections_per_uid = 2"),
            "{e}"
        );
        c.take(1000, &agent).unwrap();
        let e = c.take(1001, &agent).unwrap_err();
        assert!(
            e.contains("already serves 3") && e.contains("agent.max_connections = 3"),
            "{e}"
        );
        c.give_back(0);
        c.take(1001, &agent).unwrap();
        for uid in [0, 1000, 1001] {
            c.give_back(uid);
        }
        assert_eq!(c.total, 0);
        assert!(c.per_uid.is_empty(), "{c:?}");
        // A place given back twice never goes below zero.
        c.give_back(7);
        assert_eq!(c.total, 0);
    }
}
