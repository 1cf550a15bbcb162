//! Job events (the seed's async callbacks): each is a structured `tracing`
//! event and, when `on_event` is configured, a shell command run with the
//! event JSON on stdin. Hooks run one at a time, in event order, on a task
//! of their own with a timeout each, so a slow or failing hook never delays
//! enforcement (only later hooks); failures are logged. At most
//! [`MAX_QUEUED`] events wait for their hook; beyond that they are dropped
//! with a warning.
//!
//! A hook runs as root (the enforcer's user) via `/bin/sh -c`, so it is only
//! taken from the command line or from a config root may trust
//! ([`crate::trust`]). It starts with the default scheduling (the
//! supervisor's real-time window and raised priority are not inherited) and
//! inside the hooks cgroup the caller made for it ([`Hook::cgroup`]), with
//! limits of its own, never in the agent's cgroup or the job's.

use std::{borrow::Cow, ffi::CString, os::unix::ffi::OsStrExt, path::PathBuf, time::Duration};

use serde::Serialize;
use tokio::{io::AsyncWriteExt, sync::mpsc, task::JoinHandle};

/// Events that may wait for the hook before new ones are dropped.
pub const MAX_QUEUED: usize = 256;

pub const STARTED: &str = "started";
pub const MEMORY_HIGH: &str = "memory_high";
pub const OOM_KILL: &str = "oom_kill";
pub const PIDS_MAX: &str = "pids_max";
pub const DEADLINE_TERM: &str = "deadline_term";
pub const DEADLINE_KILL: &str = "deadline_kill";
pub const EXITED: &str = "exited";

/// One event about a job.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `started`, `memory_high`, `oom_kill`, `pids_max`, `deadline_term`,
    /// `deadline_kill`,
    /// `exited`, or a monitor's own name for its events.
    pub event: Cow<'static, str>,
    /// Filled in by the sink.
    pub job: String,
    /// RFC 3339, UTC.
    pub at: String,
    /// Details, an object.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl Event {
    pub fn new(event: impl Into<Cow<'static, str>>, detail: serde_json::Value) -> Self {
        Event {
            event: event.into(),
            job: String::new(),
            at: crate::report::rfc3339(std::time::SystemTime::now()),
            detail,
        }
    }
}

/// Where a job's events go.
pub struct EventSink {
    job: String,
    hooks: Option<(mpsc::Sender<String>, JoinHandle<()>)>,
}

/// The limits of a hooks cgroup: room for a shell, `logger` or `curl`,
/// not for a workload.
pub fn hook_limits() -> crate::cgroup::Limits {
    crate::cgroup::Limits {
        memory: Some(crate::units::ByteSize::mib(256)),
        pids: Some(64),
        ..Default::default()
    }
}

/// The `on_event` hook of a job.
#[derive(Debug, Clone)]
pub struct Hook {
    /// The shell command.
    pub command: String,
    /// How long one run may take before it is killed.
    pub timeout: Duration,
    /// The `cgroup.procs` files (one per hierarchy) each hook process
    /// writes itself into before `exec`.
    pub cgroup: Vec<PathBuf>,
}

impl EventSink {
    /// Must be called inside the tokio runtime when `hook` is set.
    pub fn new(job: &str, hook: Option<Hook>) -> Self {
        let hooks = hook.map(|hook| {
            let (tx, mut rx) = mpsc::channel::<String>(MAX_QUEUED);
            let worker = tokio::spawn(async move {
                while let Some(json) = rx.recv().await {
                    run_hook(&hook, &json).await;
                }
            });
            (tx, worker)
        });
        EventSink {
            job: job.to_owned(),
            hooks,
        }
    }

    /// Logs the event and queues its hook; returns at once.
    pub fn emit(&mut self, mut event: Event) {
        event.job.clone_from(&self.job);
        tracing::info!(event = %event.event, job = %event.job, detail = %event.detail, "job event");
        if let Some((tx, _)) = &self.hooks {
            let json = serde_json::to_string(&event).unwrap_or_default();
            if tx.try_send(json).is_err() {
                tracing::warn!(event = %event.event, "on_event hook queue full; event not delivered to the hook");
            }
        }
    }

    /// Waits for the queued hooks (each bounded by its timeout): called once
    /// the job is over and enforcement is done.
    pub async fn drain(&mut self) {
        if let Some((tx, worker)) = self.hooks.take() {
            drop(tx);
            let _ = worker.await;
        }
    }
}

async fn run_hook(hook_spec: &Hook, json: &str) {
    let (hook, timeout) = (hook_spec.command.as_str(), hook_spec.timeout);
    let join: Vec<CString> = hook_spec
        .cgroup
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    let mut cmd = tokio::process::Command::new("/bin/sh");
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (sched_setscheduler, setpriority, open,
    // write, close) on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // The supervisor sets SCHED_RESET_ON_FORK with its real-time
            // class, so a fork in that window is already SCHED_OTHER; this
            // holds even if it did not. Before the cgroup move: a real-time
            // task cannot enter a v1 cgroup without a real-time budget.
            crate::sched::set_thread_policy(0, libc::SCHED_OTHER, 0)?;
            if libc::setpriority(libc::PRIO_PROCESS, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for f in &join {
                crate::job::join_cgroup(f)?;
            }
            Ok(())
        });
    }
    let child = cmd
        .arg("-c")
        .arg(hook)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Its own process group, so a timeout kills what the hook started.
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(hook, error = %e, "on_event hook could not start");
            return;
        }
    };
    let result = tokio::time::timeout(timeout, async {
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that does not read its stdin is fine.
            let _ = stdin.write_all(json.as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
        }
        child.wait().await
    })
    .await;
    match result {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => tracing::warn!(hook, %status, "on_event hook failed"),
        Ok(Err(e)) => tracing::warn!(hook, error = %e, "on_event hook could not be waited for"),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the process group of a hook we started.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.kill().await;
            tracing::warn!(
                hook,
                timeout_s = timeout.as_secs_f64(),
                "on_event hook timed out and was killed"
            );
        }
    }
}
