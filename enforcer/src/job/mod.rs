//! Running one evaluation job (or game) under its cgroup: spawning the
//! command so that it is inside the cgroup before its first instruction,
//! the per-job supervisor loop (control tick, precise deadline, signal
//! forwarding, monitors), the kill that empties the whole subtree, and the
//! report.
//!
//! - [`monitor`]: the extension point other parts plug into (sensors fill
//!   one [`Sample`] per tick, policies return the controls they want);
//! - [`controls`]: the one actuator that merges and writes those controls;
//! - [`watch`]: the limit-event monitor (`memory_high`, `oom_kill`, `pids_max`);
//! - [`attach`]: the checks before moving a live process into a job.

pub mod attach;
pub mod controls;
pub mod identity;
pub mod idle;
pub mod monitor;
pub mod pidfd;
pub mod plan;
pub mod session;
pub mod watch;

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::ExitStatusExt},
    process::ExitStatus,
    time::{Duration, Instant, SystemTime},
};

use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

pub use identity::RunAs;
pub use monitor::{JobInfo, Monitor, MonitorError, Sample, StealReading, TickContext, Wishes};

use crate::{
    cgroup::{CgroupError, JobCgroup, Limits, Stats},
    events::{self, Event, EventSink},
    report::{Reason, Report, rfc3339},
};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("starting {command:?} as {user} inside job cgroup ({files}): {source}")]
    Spawn {
        command: String,
        user: String,
        files: String,
        #[source]
        source: std::io::Error,
    },
    #[error("empty command")]
    EmptyCommand,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// How a job is supervised.
#[derive(Debug, Clone)]
pub struct Supervision {
    pub name: String,
    pub command: Vec<String>,
    pub limits: Limits,
    pub timeout: Duration,
    /// Between the SIGTERM at the deadline and the SIGKILL of the whole
    /// cgroup; zero kills at the deadline itself.
    pub kill_grace: Duration,
    pub control_period: Duration,
    pub on_event: Option<String>,
    pub on_event_timeout: Duration,
    /// The `cgroup.procs` files of the cgroup the hooks run in (see
    /// [`events::Hook::cgroup`]).
    pub hooks_cgroup: Vec<std::path::PathBuf>,
    /// The evaluation slice, for a job whose budget loop may lift it out of
    /// the idle class (the slice goes with it; see [`controls::JobInSlice`]).
    pub slice: Option<crate::cgroup::subtree::SliceClass>,
}

/// Starts `argv` as a member of the job cgroup: the forked child writes
/// itself into each `cgroup.procs` before `exec`, so the limits hold from
/// the command's first instruction (never spawn-then-move). The child also
/// asks for SIGKILL if the enforcer dies, so it cannot outlive it. With
/// `run_as`, the child then becomes that user with no capabilities and
/// `no_new_privs` (joining needs root, so it comes first). With `base_env`
/// the command gets that environment (plus `envs`) instead of ours. With
/// `idle`, it runs `SCHED_IDLE` from its first instruction, and so does
/// every thread and process it starts (they inherit the policy): a job's
/// start-up burst does not compete with the training in the normal class
/// until the first tick of [`idle::IdleThreads`] (which still catches
/// threads that leave the class, and processes attached later).
pub fn spawn_into(
    cgroup: &JobCgroup,
    argv: &[String],
    envs: &[(String, String)],
    base_env: Option<&[(String, String)]>,
    run_as: Option<&RunAs>,
    idle: bool,
) -> Result<tokio::process::Child, JobError> {
    let run_as = run_as.cloned();
    let user = run_as.as_ref().map_or_else(
        || "root".to_owned(),
        |r| format!("uid {} gid {}", r.uid, r.gid),
    );
    let (prog, args) = argv.split_first().ok_or(JobError::EmptyCommand)?;
    let files = cgroup.join_files();
    let c_files: Vec<CString> = files
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args);
    if let Some(base) = base_env {
        // A job started for someone else (the agent's): their environment,
        // never the supervisor's.
        cmd.env_clear();
        cmd.envs(base.iter().map(|(k, v)| (k, v)));
    }
    cmd.envs(envs.iter().map(|(k, v)| (k, v)));
    // SAFETY: the closure runs between fork and exec; it only calls
    // async-signal-safe functions (open, write, close, prctl, raw id,
    // capability and scheduler system calls) on memory allocated before the
    // fork.
    unsafe {
        cmd.pre_exec(move || {
            for f in &c_files {
                join_cgroup(f)?;
            }
            if idle {
                crate::sched::set_thread_policy(0, libc::SCHED_IDLE, 0)?;
            }
            if let Some(who) = &run_as {
                identity::become_user(who)?;
            }
            // After the switch: a change of credentials clears it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| JobError::Spawn {
        command: argv.join(" "),
        user,
        files: files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        source,
    })
}

/// Writes the calling process into the cgroup whose `cgroup.procs` is
/// `procs`. Async-signal-safe: for use between fork and exec.
pub fn join_cgroup(procs: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: open, write and close on a NUL-terminated path and a static
    // buffer; no allocation.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // "0" means the writing process itself, in v1 and v2.
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// The longest kill grace (`--kill-grace`, `kill_grace`; held by
/// [`crate::validate::KILL_GRACE`]).
pub const MAX_KILL_GRACE: Duration = Duration::from_secs(3600);

/// The nice value of the supervisor while it supervises.
pub const SUPERVISOR_NICE: i32 = -10;

/// Makes the supervisor win the CPU when its deadline timer fires on a busy
/// node: it sleeps almost all the time, so this costs nobody anything, but
/// at the default priority a loaded machine delayed deadline kills by tens
/// of milliseconds. Called after the job's command was forked (so the job
/// does not inherit it); hooks reset it in their child (see `events`).
/// Failing (no CAP_SYS_NICE) only logs.
fn raise_priority() {
    // SAFETY: setpriority on the calling process has no memory-safety
    // preconditions.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SUPERVISOR_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise the supervisor's priority");
    }
}

/// How long before the deadline the supervisor switches to real-time
/// scheduling.
pub const DEADLINE_ARM: Duration = Duration::from_millis(50);

/// Around the deadline only (from [`DEADLINE_ARM`] before it until the kill
/// is done), the supervisor runs `SCHED_FIFO` priority 1: on a loaded node
/// nice -10 alone still lets the timer's wake-up wait behind busy CPUs (see
/// docs/measurements.md), and the deadline is a promise to the millisecond. The window is short and the
/// thread sleeps in it, so it takes nothing from anyone. With
/// `SCHED_RESET_ON_FORK`, so that nothing forked in the window (an
/// `on_event` hook) starts real-time. The window is left with the flag
/// kept: the kernel writes the flag before the policy, so clearing it on
/// the way out would let another process read `SCHED_FIFO` without it for
/// an instant (and what is forked later starts at nice 0, not at the
/// supervisor's raised priority, as it should anyway). Failing (no
/// CAP_SYS_NICE, no RT budget in our cgroup) only logs.
fn realtime(on: bool) {
    let policy = if on {
        libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK
    } else {
        libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK
    };
    if let Err(error) = crate::sched::set_thread_policy(0, policy, i32::from(on)) {
        tracing::debug!(on, %error, "could not change the supervisor's scheduling class");
    } else if !on {
        raise_priority();
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from before the job exists (so that
/// one arriving while the job starts is not fatal to the enforcer, which
/// would orphan the job) and forwarded to it by [`supervise`].
pub struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

/// The signals a supervisor catches and forwards to its job.
pub const FORWARDED_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

impl Signals {
    /// Installs the handlers; call inside the runtime, first thing. Then
    /// unblocks the three signals on this thread: the agent starts a shim
    /// with them blocked, so one sent before the handlers existed is
    /// delivered now, to them.
    pub fn install() -> Self {
        let signals = Signals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        };
        // SAFETY: a set on this stack; pthread_sigmask only changes this
        // thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in FORWARDED_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        signals
    }

    /// The next of the three signals to arrive (before a job runs: to stop
    /// waiting for a slot).
    pub async fn any(&mut self) -> i32 {
        tokio::select! {
            Some(()) = recv(&mut self.int) => libc::SIGINT,
            Some(()) = recv(&mut self.term) => libc::SIGTERM,
            Some(()) = recv(&mut self.hup) => libc::SIGHUP,
        }
    }
}

/// What the supervisor watches.
pub enum Target {
    /// The command it spawned: the job ends when it exits.
    Spawned(tokio::process::Child),
    /// A process attached by PID, held by a pidfd so that forwarded signals
    /// never reach a process that reused its number: the job ends when its
    /// cgroup is empty.
    Attached(pidfd::PidFd),
}

/// How the job's end was observed.
enum End {
    Exited(ExitStatus),
    /// An attached job: its cgroup became empty (no exit status to read).
    Empty,
    Deadline {
        latency: Duration,
        /// When SIGTERM went out (only with a kill grace).
        term_at: Option<SystemTime>,
        killed_at: SystemTime,
    },
    /// The first user signal was forwarded and ended the command.
    Killed,
    /// A second user signal (this one) killed the whole job.
    Interrupted(i32),
}

/// Where the job stands against its deadline.
#[derive(Clone, Copy)]
enum Phase {
    Running,
    /// SIGTERM went out at the deadline; the SIGKILL of the whole cgroup is
    /// due at `kill_due`, or as soon as the cgroup is empty.
    Terminating {
        term_at: SystemTime,
        kill_due: Instant,
    },
}

/// What the supervisor does when its deadline timer fires.
#[derive(Debug, PartialEq, Eq)]
enum DeadlineStep {
    /// SIGTERM to every process now, the SIGKILL of the whole job due then.
    Term { kill_due: Instant },
    /// SIGKILL the whole job now; it was due at `due_at`.
    Kill { due_at: Instant },
}

/// At the deadline a job with a kill grace gets SIGTERM and the grace, one
/// without is killed; at the end of the grace it is killed.
fn deadline_step(phase: Phase, deadline_at: Instant, kill_grace: Duration) -> DeadlineStep {
    match phase {
        Phase::Running if !kill_grace.is_zero() => DeadlineStep::Term {
            kill_due: deadline_at + kill_grace,
        },
        Phase::Running => DeadlineStep::Kill {
            due_at: deadline_at,
        },
        Phase::Terminating { kill_due, .. } => DeadlineStep::Kill { due_at: kill_due },
    }
}

/// How often an emptying job is looked at during its kill grace.
const GRACE_POLL: Duration = Duration::from_millis(10);

/// A job handed to its supervisor, built by the session once the job's
/// first process is in its cgroup: what to supervise, how, with which
/// monitors, and since when.
pub struct Supervised {
    pub cgroup: std::sync::Arc<JobCgroup>,
    pub spec: Supervision,
    pub target: Target,
    pub monitors: Vec<Box<dyn Monitor>>,
    /// Caught since before the job existed; forwarded to it from now on.
    pub signals: Signals,
    /// When the job's first process started (or was attached).
    pub started: Instant,
    pub started_wall: SystemTime,
    /// The uid and gid the job's processes run as, for the report.
    pub uid: u32,
    pub gid: u32,
}

/// Runs the supervisor loop until the job ends, then empties the cgroup and
/// builds the report.
pub async fn supervise(job: Supervised) -> (Report, i32) {
    let Supervised {
        cgroup,
        spec,
        target,
        mut monitors,
        signals,
        started,
        started_wall,
        uid,
        gid,
    } = job;
    let (cgroup, spec) = (&cgroup, &spec);
    raise_priority();
    let (mut child, attached, pid) = match target {
        Target::Spawned(c) => {
            let pid = c.id().map_or(0, |p| p as i32);
            (Some(c), None, pid)
        }
        Target::Attached(fd) => {
            let pid = fd.pid().as_raw();
            (None, Some(fd), pid)
        }
    };
    let hook = spec.on_event.clone().map(|command| events::Hook {
        command,
        timeout: spec.on_event_timeout,
        cgroup: spec.hooks_cgroup.clone(),
    });
    let mut sink = EventSink::new(&spec.name, hook);
    let mut event_counts = std::collections::BTreeMap::<String, u64>::new();
    let mut emit = |sink: &mut EventSink, e: Event| {
        *event_counts.entry(e.event.to_string()).or_default() += 1;
        sink.emit(e);
    };
    emit(
        &mut sink,
        Event::new(
            events::STARTED,
            json!({ "pid": pid, "cgroup": cgroup.path(), "command": spec.command, "limits": spec.limits, "timeout_s": spec.timeout.as_secs_f64(), "kill_grace_s": spec.kill_grace.as_secs_f64() }),
        ),
    );

    let info = JobInfo {
        name: spec.name.clone(),
        cgroup: cgroup.path().to_owned(),
        cgroup_mode: cgroup.mode_name().to_owned(),
        v2_cgroup_id: cgroup.v2_cgroup_id(),
        pid,
        limits: spec.limits.clone(),
        timeout: spec.timeout,
        control_period: spec.control_period,
        started,
        controls: std::sync::Arc::new(controls::Actuator::new(
            match &spec.slice {
                Some(slice) => {
                    std::sync::Arc::new(controls::JobInSlice::new(cgroup.clone(), slice.clone()))
                }
                None => cgroup.clone(),
            },
            spec.limits.cpu,
        )),
    };
    monitors.retain_mut(|m| match m.start(&info) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(monitor = m.name(), error = %e, "monitor failed to start; disabled");
            false
        }
    });

    let deadline_at = crate::validate::deadline(started, spec.timeout);
    // The next moment the supervisor must act to the millisecond: the
    // deadline, then (with a kill grace) the SIGKILL.
    let mut due = tokio::time::Instant::from_std(deadline_at);
    // A zero period would make `interval` panic; the validator refuses it.
    let mut tick = tokio::time::interval(spec.control_period.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut grace_poll = tokio::time::interval(GRACE_POLL);
    grace_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Signals {
        int: mut sigint,
        term: mut sigterm,
        hup: mut sighup,
    } = signals;
    let mut signals_seen = 0u32;
    let mut mem_peak_sampled = 0u64;
    let mut pids_peak_sampled = 0u64;
    let mut queued: Vec<Event> = Vec::new();
    let mut armed = false;
    let mut phase = Phase::Running;
    // The command's status when it ended during the kill grace.
    let mut exited_in_grace: Option<ExitStatus> = None;

    let end = loop {
        let arm_at = due.checked_sub(DEADLINE_ARM).unwrap_or(due);
        let terminating = matches!(phase, Phase::Terminating { .. });
        // Set by a branch when the whole cgroup must be killed now: the
        // instant the kill was due.
        let mut kill_now: Option<Instant> = None;
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(arm_at), if !armed => {
                armed = true;
                realtime(true);
            }
            () = tokio::time::sleep_until(due) => {
                match deadline_step(phase, deadline_at, spec.kill_grace) {
                    DeadlineStep::Term { kill_due } => {
                        let fired = Instant::now();
                        // A job frozen by a policy could not act on it.
                        if let Err(e) = info.controls.release_freeze() {
                            tracing::debug!(error = %e, "thawing the job for its kill grace");
                        }
                        let signalled = signal_all(cgroup, libc::SIGTERM);
                        let term_at = SystemTime::now();
                        emit(&mut sink, Event::new(events::DEADLINE_TERM, json!({
                            "timeout_s": spec.timeout.as_secs_f64(),
                            "kill_grace_s": spec.kill_grace.as_secs_f64(),
                            "processes": signalled,
                            "timer_late_ms": fired.duration_since(deadline_at).as_secs_f64() * 1e3,
                        })));
                        tracing::info!(processes = signalled, grace_s = spec.kill_grace.as_secs_f64(), "deadline: SIGTERM sent, SIGKILL after the grace");
                        realtime(false);
                        armed = false;
                        phase = Phase::Terminating { term_at, kill_due };
                        due = tokio::time::Instant::from_std(kill_due);
                    }
                    DeadlineStep::Kill { due_at } => kill_now = Some(due_at),
                }
            }
            _ = grace_poll.tick(), if terminating => {
                if cgroup.pids().is_empty() {
                    kill_now = Some(Instant::now());
                }
            }
            status = async { child.as_mut().expect("guarded by the if").wait().await }, if child.is_some() && exited_in_grace.is_none() => {
                match status {
                    // The grace is for the whole job: what the command left
                    // behind gets the rest of it.
                    Ok(s) if terminating => exited_in_grace = Some(s),
                    Ok(s) if signals_seen > 0 && s.signal().is_some() => break End::Killed,
                    Ok(s) => break End::Exited(s),
                    Err(e) => {
                        tracing::error!(error = %e, "waiting for the job's command failed");
                        break End::Killed;
                    }
                }
            }
            Some(()) = recv(&mut sigint) => {
                signals_seen += 1;
                if forward(pid, attached.as_ref(), libc::SIGINT, signals_seen, cgroup) { break End::Interrupted(libc::SIGINT); }
            }
            Some(()) = recv(&mut sigterm) => {
                signals_seen += 1;
                if forward(pid, attached.as_ref(), libc::SIGTERM, signals_seen, cgroup) { break End::Interrupted(libc::SIGTERM); }
            }
            Some(()) = recv(&mut sighup) => {
                signals_seen += 1;
                if forward(pid, attached.as_ref(), libc::SIGHUP, signals_seen, cgroup) { break End::Interrupted(libc::SIGHUP); }
            }
            _ = tick.tick(), if !terminating => {
                let now = Instant::now();
                let stats = cgroup.stats();
                mem_peak_sampled = mem_peak_sampled.max(stats.memory_current.unwrap_or(0));
                pids_peak_sampled = pids_peak_sampled.max(stats.pids_current.unwrap_or(0));
                let sample = Sample::new(now, now.duration_since(started), stats).actuated_by(&info.controls);
                run_monitors(&mut monitors, cgroup, &info.controls, sample, &mut queued);
                for e in queued.drain(..) {
                    emit(&mut sink, e);
                }
                if child.is_none() && cgroup.pids().is_empty() {
                    break End::Empty;
                }
            }
        }
        if let Some(due_at) = kill_now {
            let fired = Instant::now();
            let result = cgroup.kill();
            let late = fired.saturating_duration_since(due_at);
            let latency = late + fired.elapsed();
            let killed_at = SystemTime::now();
            if let Err(e) = result {
                tracing::error!(error = %e, "deadline kill did not empty the job");
            }
            let term_at = match phase {
                Phase::Terminating { term_at, .. } => Some(term_at),
                Phase::Running => None,
            };
            let mut detail = json!({
                "timeout_s": spec.timeout.as_secs_f64(),
                "latency_ms": latency.as_secs_f64() * 1e3,
                // How late the timer woke us, and how long the kill took.
                "timer_late_ms": late.as_secs_f64() * 1e3,
                "kill_ms": (latency - late).as_secs_f64() * 1e3,
            });
            if let Some(t) = term_at {
                detail["kill_grace_s"] = json!(spec.kill_grace.as_secs_f64());
                detail["after_term_s"] = json!(
                    killed_at
                        .duration_since(t)
                        .unwrap_or_default()
                        .as_secs_f64()
                );
            }
            emit(&mut sink, Event::new(events::DEADLINE_KILL, detail));
            realtime(false);
            armed = false;
            break End::Deadline {
                latency,
                term_at,
                killed_at,
            };
        }
    };

    if armed {
        // The command ended inside the armed window: back to normal.
        realtime(false);
    }
    // The job never outlives its command: kill what is left (daemons).
    if !matches!(end, End::Deadline { .. })
        && let Err(e) = cgroup.kill()
    {
        tracing::error!(error = %e, "emptying the job after its command ended failed");
    }
    let status = match (&end, child.as_mut()) {
        (End::Exited(s), _) => Some(*s),
        _ if exited_in_grace.is_some() => exited_in_grace,
        // Bounded: if the kill failed (tasks stuck), do not hang with them.
        (_, Some(c)) => match tokio::time::timeout(Duration::from_secs(5), c.wait()).await {
            Ok(r) => r.ok(),
            Err(_) => {
                tracing::error!(pid, "the job's command did not die after the kill");
                None
            }
        },
        _ => None,
    };

    let stats = cgroup.stats();
    // Late counters (an OOM kill seen only now) still become events.
    let now = Instant::now();
    let sample =
        Sample::new(now, now.duration_since(started), stats.clone()).actuated_by(&info.controls);
    run_monitors(&mut monitors, cgroup, &info.controls, sample, &mut queued);
    for e in queued.drain(..) {
        emit(&mut sink, e);
    }

    let signal = status.and_then(|s| s.signal());
    let oom = stats.oom_kills.unwrap_or(0) > 0 && signal == Some(libc::SIGKILL);
    let (reason, code) = match &end {
        End::Deadline { .. } => (Reason::Deadline, 124),
        // Never 137: that status says OOM.
        End::Interrupted(sig) => (Reason::Interrupted, 128 + sig),
        _ if oom => (Reason::Oom, 137),
        End::Killed => (Reason::Killed, status.map_or(130, exit_code_of)),
        End::Exited(s) => (Reason::Exited, exit_code_of(*s)),
        End::Empty => (
            if stats.oom_kills.unwrap_or(0) > 0 {
                Reason::Oom
            } else {
                Reason::Exited
            },
            if stats.oom_kills.unwrap_or(0) > 0 {
                137
            } else {
                0
            },
        ),
    };

    let mut report = Report::new(&spec.name, &spec.command, started_wall);
    report.ended_at = rfc3339(SystemTime::now());
    report.wall_s = started.elapsed().as_secs_f64();
    report.cgroup = cgroup.path().to_owned();
    report.cgroup_mode = cgroup.mode_name().to_owned();
    report.v2_cgroup_id = cgroup.v2_cgroup_id();
    report.uid = Some(uid);
    report.gid = Some(gid);
    report.exit_code = Some(code);
    report.signal = signal;
    report.reason = reason;
    report.timeout_s = spec.timeout.as_secs_f64();
    report.kill_grace_s = spec.kill_grace.as_secs_f64();
    if let End::Deadline {
        latency,
        term_at,
        killed_at,
    } = end
    {
        report.deadline_kill_latency_ms = Some(latency.as_secs_f64() * 1e3);
        report.deadline_term_at = term_at.map(rfc3339);
        report.deadline_kill_at = Some(rfc3339(killed_at));
    }
    fill_stats(
        &mut report,
        &stats,
        spec,
        mem_peak_sampled,
        pids_peak_sampled,
    );
    for m in &mut monitors {
        m.finish(&mut report);
    }
    emit(
        &mut sink,
        Event::new(
            events::EXITED,
            json!({ "reason": reason, "exit_code": code, "signal": signal, "wall_s": report.wall_s }),
        ),
    );
    report.events = event_counts;
    report.reconcile();
    sink.drain().await;
    (report, code)
}

async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Forwards a signal to the job's main process (through its pidfd when it
/// was attached: our own child cannot be reused before we reap it); a second
/// signal kills the whole job. Returns whether the job was killed.
fn forward(
    pid: i32,
    attached: Option<&pidfd::PidFd>,
    sig: i32,
    seen: u32,
    cgroup: &JobCgroup,
) -> bool {
    if seen >= 2 {
        tracing::warn!(signal = sig, "second signal: killing the job");
        if let Err(e) = cgroup.kill() {
            tracing::error!(error = %e, "killing the job failed");
        }
        return true;
    }
    tracing::info!(signal = sig, pid, "forwarding signal to the job");
    match attached {
        Some(fd) => {
            if let Err(e) = fd.send_signal(sig) {
                tracing::info!(pid, error = %e, "the attached process is gone; signal not forwarded");
            }
        }
        // SAFETY: kill(2) has no memory-safety preconditions.
        None => unsafe {
            libc::kill(pid, sig);
        },
    }
    false
}

/// Sends `sig` to every process in the job; returns how many it reached.
fn signal_all(cgroup: &JobCgroup, sig: i32) -> usize {
    cgroup
        .pids()
        .into_iter()
        // SAFETY: kill(2) has no memory-safety preconditions.
        .filter(|&p| unsafe { libc::kill(p, sig) } == 0)
        .count()
}

/// One control tick: the sensors fill the sample, the policies act on it,
/// and their merged wishes are written once.
fn run_monitors(
    monitors: &mut Vec<Box<dyn Monitor>>,
    cgroup: &JobCgroup,
    actuator: &controls::Actuator,
    mut sample: Sample,
    queued: &mut Vec<Event>,
) {
    for m in monitors.iter_mut() {
        m.sense(&mut sample);
    }
    monitors.retain_mut(|m| {
        let mut ctx = TickContext::new(cgroup, queued);
        match m.tick(&sample, &mut ctx) {
            Ok(wishes) => {
                for (policy, controls) in wishes {
                    actuator.want(policy, controls);
                }
                true
            }
            Err(e) => {
                tracing::warn!(monitor = m.name(), error = %e, "monitor failed; disabled");
                false
            }
        }
    });
    let rejected_before = sample.rejected;
    // A failed write (e.g. a job that just exited) is retried with the next
    // tick; the policies see which control failed in their next sample.
    if let Err(e) = actuator.apply()
        && rejected_before != Some(e.control)
    {
        tracing::warn!(cgroup = %actuator.describe(), error = %e, "applying the job's controls failed");
    }
}

fn exit_code_of(s: ExitStatus) -> i32 {
    s.code()
        .or_else(|| s.signal().map(|n| 128 + n))
        .unwrap_or(125)
}

fn fill_stats(r: &mut Report, s: &Stats, spec: &Supervision, mem_sampled: u64, pids_sampled: u64) {
    r.cpu_s = s.cpu_usage.map(|d| d.as_secs_f64());
    if r.cpu_s.is_none() {
        r.unavailable(
            "cpu_s",
            "no cpu usage counter (cpu.stat usage_usec / cpuacct.usage) for the job",
        );
    }
    r.cpu_throttled_s = s.cpu_throttled.map(|d| d.as_secs_f64());
    if r.cpu_throttled_s.is_none() {
        r.unavailable(
            "cpu_throttled_s",
            "no throttling counter in cpu.stat (cpu controller missing)",
        );
    }
    r.cpu_quota_cores = spec.limits.cpu;
    match s.memory_peak {
        Some(p) => r.memory_peak_bytes = Some(p),
        None if mem_sampled > 0 => {
            r.memory_peak_bytes = Some(mem_sampled);
            r.memory_peak_sampled = true;
        }
        None => r.unavailable(
            "memory_peak_bytes",
            "no memory.peak on this kernel and no sample was taken",
        ),
    }
    r.memory_limit_bytes = s.memory_limit.or(spec.limits.memory.map(|b| b.0));
    r.memory_high_bytes = s.memory_high_limit;
    r.oom_kills = s.oom_kills;
    if r.oom_kills.is_none() {
        r.unavailable(
            "oom_kills",
            "no oom_kill counter (memory.events / memory.oom_control)",
        );
    }
    match s.pids_peak {
        Some(p) => r.pids_peak = Some(p),
        None if pids_sampled > 0 => {
            r.pids_peak = Some(pids_sampled);
            r.pids_peak_sampled = true;
        }
        None => r.unavailable(
            "pids_peak",
            "no pids.peak on this kernel and no sample was taken",
        ),
    }
    r.pids_limit = s.pids_limit.or(spec.limits.pids);
    if r.pids_limit.is_none() {
        r.unavailable("pids_limit", "no pids limit set");
    }
    if r.memory_limit_bytes.is_none() {
        r.unavailable("memory_limit_bytes", "no memory limit set");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::cgroup::{fs::CgFs, v2::V2Job};

    /// A sensor that puts a steal reading in the sample.
    struct Sensor;

    impl Monitor for Sensor {
        fn name(&self) -> &'static str {
            "sensor"
        }
        fn start(&mut self, _job: &JobInfo) -> Result<(), MonitorError> {
            Ok(())
        }
        fn sense(&mut self, sample: &mut Sample) {
            sample.steal = Some(Err("read this tick".into()));
        }
        fn tick(&mut self, _: &Sample, _: &mut TickContext<'_>) -> Result<Wishes, MonitorError> {
            Ok(Wishes::new())
        }
        fn finish(&mut self, _report: &mut Report) {}
    }

    /// The steal part of each sample a policy was given.
    type Seen = Arc<Mutex<Vec<Option<Result<StealReading, String>>>>>;

    /// A policy that records the steal it was given and wants a quota.
    struct Quota(Seen);

    impl Monitor for Quota {
        fn name(&self) -> &'static str {
            "quota"
        }
        fn start(&mut self, _job: &JobInfo) -> Result<(), MonitorError> {
            Ok(())
        }
        fn tick(&mut self, s: &Sample, _: &mut TickContext<'_>) -> Result<Wishes, MonitorError> {
            self.0.lock().unwrap().push(s.steal.clone());
            Ok(vec![(
                controls::Policy::Budget,
                controls::Controls {
                    quota: Some(0.5),
                    ..controls::Controls::default()
                },
            )])
        }
        fn finish(&mut self, _report: &mut Report) {}
    }

    #[test]
    fn a_policy_sees_this_ticks_readings_whatever_the_monitors_order_and_its_wish_is_written_once()
    {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("job");
        std::fs::create_dir_all(dir.join("main")).unwrap();
        std::fs::write(dir.join("cpu.max"), "").unwrap();
        let cg = Arc::new(JobCgroup::V2(V2Job::open(
            CgFs::new(vec![d.path().to_owned()]),
            dir.clone(),
            dir.join("main"),
        )));
        let actuator = controls::Actuator::new(cg.clone(), None);
        let seen = Arc::new(Mutex::new(Vec::new()));
        // The policy before the sensor.
        let mut monitors: Vec<Box<dyn Monitor>> =
            vec![Box::new(Quota(seen.clone())), Box::new(Sensor)];
        let mut events = Vec::new();
        let mut tick = |n: u32| {
            let sample = Sample::new(
                Instant::now(),
                Duration::from_millis(100) * n,
                Stats::default(),
            )
            .actuated_by(&actuator);
            run_monitors(&mut monitors, &cg, &actuator, sample, &mut events);
        };
        tick(1);
        let cpu_max = dir.join("cpu.max");
        assert_eq!(std::fs::read_to_string(&cpu_max).unwrap(), "50000 100000");
        std::fs::write(&cpu_max, "untouched").unwrap();
        // The same wish again: nothing to write.
        tick(2);
        assert_eq!(std::fs::read_to_string(&cpu_max).unwrap(), "untouched");
        assert_eq!(actuator.applied().quota, Some(0.5));
        let seen = seen.lock().unwrap();
        assert_eq!(*seen, vec![Some(Err("read this tick".to_owned())); 2]);
    }

    #[test]
    fn without_a_kill_grace_the_deadline_kills_at_once() {
        let deadline = Instant::now();
        assert_eq!(
            deadline_step(Phase::Running, deadline, Duration::ZERO),
            DeadlineStep::Kill { due_at: deadline }
        );
    }

    #[test]
    fn with_a_kill_grace_the_deadline_terms_and_the_kill_follows_after_the_grace() {
        let deadline = Instant::now();
        let grace = Duration::from_secs(10);
        let step = deadline_step(Phase::Running, deadline, grace);
        let kill_due = deadline + grace;
        assert_eq!(step, DeadlineStep::Term { kill_due });
        let terminating = Phase::Terminating {
            term_at: SystemTime::now(),
            kill_due,
        };
        assert_eq!(
            deadline_step(terminating, deadline, grace),
            DeadlineStep::Kill { due_at: kill_due }
        );
    }
}
