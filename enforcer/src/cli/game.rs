//! `enforcer game`: run from inside a job, runs one game in a child cgroup
//! of the job (`<job>/game-<n>`) with its own deadline and optional tighter
//! limits (never looser than the job's: the hierarchy caps them anyway, and
//! the requested values are clamped so the report is honest).

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use serde::{Deserialize, Serialize};

use super::run::{EXIT_FAILURE, EXIT_USAGE, block_on, finish};
use crate::{
    agent::{
        client::{self, Route},
        proto::Request,
    },
    config::Config,
    job::session::{self, GamePlan},
    units::{ByteSize, Cores, Dur},
    validate::{self, Checker, Node, Source},
};

/// Run one game of the current job under its own deadline.
///
/// Run it from inside `enforcer run`. Exit status: CMD's own; 124 when the
/// game deadline killed it; 137 on OOM; 2 usage (e.g. not inside a job, or
/// inside a job run with `--user`, which may not make cgroups); 125
/// enforcer failure; 126/127 when CMD cannot be executed / found.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    #[serde(skip)]
    pub command: Vec<String>,
}

/// The game's plan: `config` merged with the flags, checked before
/// anything is created (the CLI's and the agent's one way to build it).
pub fn game_plan(config: Config, args: &GameArgs) -> Result<GamePlan, String> {
    let mut v = Checker::new(Source::Flags, Node::detect());
    v.check(&validate::GAME_TIMEOUT, args.timeout);
    v.check(&validate::GAME_MEMORY, args.memory);
    v.check(&validate::GAME_CPU, args.cpu);
    v.check(&validate::GAME_PIDS, args.pids);
    v.check(&validate::KILL_GRACE, args.kill_grace);
    v.finish().map_err(|e| e.to_string())?;
    if let Some(hook) = &config.on_event
        && crate::trust::running_as_root()
    {
        crate::trust::check_hook_program(hook)
            .map_err(|e| format!("refusing the on_event hook {hook:?}: {e}"))?;
    }
    Ok(GamePlan {
        timeout: args.timeout.unwrap_or(config.game_timeout).0,
        kill_grace: args.kill_grace.unwrap_or(config.kill_grace).0,
        memory: args.memory,
        cpu: args.cpu.map(Cores::get),
        pids: args.pids,
        run_as: None,
        env: None,
        config,
    })
}

pub fn run(args: GameArgs, no_agent: bool) -> ExitCode {
    // A job run as another user may not make cgroups: its games go through
    // the agent, which makes them for it. Root makes its own.
    if !crate::trust::running_as_root() {
        match client::route(no_agent) {
            Ok(Route::Agent(conn)) => {
                let mut game = args.clone();
                game.config = None;
                let request = Request::Game {
                    game: Box::new(game),
                    command: args.command.clone(),
                    env: client::environment(),
                    cwd: std::env::current_dir().ok(),
                };
                return ExitCode::from(client::submit(conn, request, args.report.as_deref()));
            }
            Ok(Route::InProcess) => {}
            Err(e) => tracing::debug!("no agent for the game: {e}"),
        }
    }
    let config = match Config::load_or_default(args.config.as_deref()) {
        Ok((c, _)) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let plan = match game_plan(config, &args) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    ExitCode::from(match block_on(session::game(&plan, &args.command)) {
        Some(o) => finish(o, args.report.as_deref()),
        None => EXIT_FAILURE,
    })
}
