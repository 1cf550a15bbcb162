//! `enforcer game`: run from inside a job, runs one game in a child cgroup
//! of the job (`<job>/game-<n>`) with its own deadline and optional tighter
//! limits (never looser than the job's: the hierarchy caps them anyway, and
//! the requested values are clamped so the report is honest).

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Instant, SystemTime},
};

use clap::Args;

use super::run::{EXIT_FAILURE, EXIT_USAGE, JobGuard, block_on, default_monitors, finish_report};
use crate::{
    cgroup::{CgroupError, Layout, Limits, subtree::current_job},
    config::Config,
    job::{self, Supervision},
    units::{ByteSize, Cores, Dur},
    validate::{self, Checker, Node, Source},
};

/// Run one game of the current job under its own deadline.
///
/// Run it from inside `enforcer run`. Exit status: CMD's own; 124 when the
/// game deadline killed it; 137 on OOM; 2 usage (e.g. not inside a job, or
/// inside a job run with `--user`, which may not make cgroups); 125
/// enforcer failure.
#[derive(Debug, Args)]
pub struct GameArgs {
    /// Game deadline (default: config `game_timeout`, 300s).
    #[arg(long)]
    pub timeout: Option<Dur>,
    /// At the game deadline, SIGTERM to the game's processes and SIGKILL
    /// this long after, e.g. `10s`, at most 1h (default: config
    /// `kill_grace`, 0s).
    #[arg(long)]
    pub kill_grace: Option<Dur>,
    /// Memory limit for the game (at most the job's).
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// CPU quota for the game in CPUs.
    #[arg(long)]
    pub cpu: Option<Cores>,
    /// Task limit for the game (at most the job's).
    #[arg(long)]
    pub pids: Option<u64>,
    /// Write the game's JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Config file (default /etc/enforcer/enforcer.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The game command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn run(args: GameArgs) -> ExitCode {
    let config = match Config::load_or_default(args.config.as_deref()) {
        Ok((c, _)) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut v = Checker::new(Source::Flags, Node::detect());
    v.check(&validate::GAME_TIMEOUT, args.timeout);
    v.check(&validate::GAME_MEMORY, args.memory);
    v.check(&validate::GAME_CPU, args.cpu);
    v.check(&validate::GAME_PIDS, args.pids);
    v.check(&validate::KILL_GRACE, args.kill_grace);
    if let Err(e) = v.finish() {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Some(hook) = &config.on_event
        && crate::trust::running_as_root()
        && let Err(e) = crate::trust::check_hook_program(hook)
    {
        tracing::error!("refusing the on_event hook {hook:?}: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let kill_grace = args.kill_grace.unwrap_or(config.kill_grace).0;
    let job = match Layout::detect()
        .map_err(CgroupError::from)
        .and_then(|l| current_job(&l))
    {
        Ok(j) => j,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let job_name = std::env::var("ENFORCER_JOB").unwrap_or_else(|_| {
        job.path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let caps = job.stats();
    let clamp = |want: Option<u64>, cap: Option<u64>| match (want, cap) {
        (Some(w), Some(c)) => Some(w.min(c)),
        (w, _) => w,
    };
    let limits = Limits {
        memory: clamp(args.memory.map(|b| b.0), caps.memory_limit).map(ByteSize),
        memory_high: None,
        cpu: args.cpu.map(Cores::get),
        cpu_weight: None,
        cpu_idle: false,
        pids: clamp(args.pids, caps.pids_limit),
    };
    let mut game = None;
    for n in 1..10_000 {
        match job.create_child(&format!("game-{n}")) {
            Ok(g) => {
                game = Some((n, g));
                break;
            }
            Err(CgroupError::NameInUse { .. }) => continue,
            // The job's cgroup files belong to root on purpose, so that a
            // job run as another user cannot raise its own limits: this is
            // how it was started, not a failure of the enforcer.
            Err(e) if is_permission_denied(&e) => {
                tracing::error!(
                    "enforcer game cannot make a game cgroup here: the job runs as uid {} without privileges (enforcer run --user), and only root may create cgroups in it: {e}",
                    nix::unistd::geteuid()
                );
                return ExitCode::from(EXIT_USAGE);
            }
            Err(e) => {
                tracing::error!("creating the game cgroup: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    let Some((n, game)) = game else {
        tracing::error!("no free game-<n> name in the job");
        return ExitCode::from(EXIT_FAILURE);
    };
    let guard = JobGuard(game);
    // Only the limits asked for: the rest is inherited from the job.
    let applied = (|| {
        if limits.memory.is_some() {
            guard.0.set_memory_max(limits.memory)?;
        }
        if limits.cpu.is_some() {
            guard.0.set_cpu_quota(limits.cpu)?;
        }
        if limits.pids.is_some() {
            guard.0.set_pids_max(limits.pids)?;
        }
        Ok::<(), CgroupError>(())
    })();
    if let Err(e) = applied {
        tracing::error!("applying the game's limits: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    // The game's hooks run in a sibling of the game inside the job, limited
    // like a job's hooks (the game supervisor is itself a job process).
    let hooks = match &config.on_event {
        None => None,
        Some(_) => {
            let made = job.create_child(&format!("game-{n}-hooks")).and_then(|h| {
                let h = JobGuard(h);
                h.0.apply(&crate::events::hook_limits()).map(|()| h)
            });
            match made {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::error!("creating the cgroup for the game's hooks: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            }
        }
    };
    let spec = Supervision {
        name: format!("{job_name}/game-{n}"),
        command: args.command.clone(),
        limits,
        timeout: args.timeout.unwrap_or(config.game_timeout).0,
        kill_grace,
        control_period: config.control_period.0,
        on_event: config.on_event.clone(),
        on_event_timeout: config.on_event_timeout.0,
        hooks_cgroup: hooks.as_ref().map(|h| h.0.join_files()).unwrap_or_default(),
    };
    let code = block_on(async {
        let signals = job::Signals::install();
        let started = Instant::now();
        let wall = SystemTime::now();
        let child = match job::spawn_into(&guard.0, &args.command, &[], None) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                return 127;
            }
        };
        let (mut report, code) = job::supervise(
            &guard.0,
            &spec,
            job::Target::Spawned(child),
            default_monitors(&config),
            signals,
            started,
            wall,
        )
        .await;
        // The game runs as whoever runs the game.
        report.uid = Some(nix::unistd::geteuid().as_raw());
        report.gid = Some(nix::unistd::getegid().as_raw());
        if !finish_report(&report, args.report.as_deref()) {
            return i32::from(EXIT_FAILURE);
        }
        code
    });
    drop(guard);
    drop(hooks);
    ExitCode::from(u8::try_from(code).unwrap_or(EXIT_FAILURE))
}

fn is_permission_denied(e: &CgroupError) -> bool {
    let source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    source
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| matches!(io.raw_os_error(), Some(libc::EACCES | libc::EPERM)))
}
