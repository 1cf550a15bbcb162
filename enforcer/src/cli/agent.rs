//! `enforcer agent`: the node agent daemon, and the hidden `enforcer shim`
//! it starts for each job ([`crate::agent`]).

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

/// Run the node agent: one root daemon that runs every job of this node
/// for its callers (`enforcer run` / `attach` of any user go through it
/// when it listens), authorised by their peer credentials.
///
/// Config `[agent]`: `socket` (default /run/enforcer/enforcer.sock),
/// `lib_dir` (job records, default /var/lib/enforcer), `on_agent_stop`
/// (`keep` jobs running on SIGTERM, or `end` them), `allowed_groups`,
/// `keep_finished`, `metrics_listen` (Prometheus metrics on a loopback
/// address; off by default). Jobs run in per-job shims that outlive the
/// agent; a restarted agent re-adopts them. Under systemd, use
/// `KillMode=process`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (default /etc/enforcer/enforcer.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The socket to listen on (overrides `agent.socket`).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://ADDR/metrics`, e.g.
    /// `127.0.0.1:9464` (overrides `agent.metrics_listen`). A loopback
    /// address only: the endpoint has no authentication.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The per-job shim (started by the agent; not for people).
#[derive(Debug, Args)]
pub struct ShimArgs {
    /// The job's record directory.
    pub job_dir: PathBuf,
}

pub fn run(args: AgentArgs) -> ExitCode {
    ExitCode::from(crate::agent::server::main(
        args.config.as_deref(),
        args.socket,
        args.metrics_listen,
    ))
}

pub fn shim(args: ShimArgs) -> ExitCode {
    ExitCode::from(crate::agent::shim::main(&args.job_dir))
}
