//! `enforcer run`: runs a command as an evaluation job, supervising it in the
//! foreground (no daemon needed). Also holds the limit/deadline/report flags
//! that `attach` shares, merged with the config into the job's plan; the job
//! itself is a [`Session`].

use std::{path::Path, process::ExitCode};

use clap::Args;

pub use crate::job::plan::JobRequest;
pub use crate::job::session::{EXIT_FAILURE, EXIT_USAGE};
use crate::{
    agent::{
        client::{self, Route},
        proto::Request,
    },
    config::Config,
    job::session::{Outcome, Plan, Session, SessionError},
};

/// The job flags shared by `run` and `attach` (see [`JobRequest`]).
pub type JobArgs = JobRequest;

/// Run CMD as an evaluation job under hard limits and a deadline.
///
/// Exit status: CMD's own; 124 when a deadline killed it; 137 when the
/// memory limit OOM-killed it; 128+N when signal N ended it, or when a
/// second signal N to the enforcer killed the whole job; 2 for usage or
/// config errors; 125 when the enforcer itself failed; 126/127 when CMD
/// cannot be executed / found.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The job's plan: the config file (`--config`) merged with the flags.
pub fn plan(args: &JobArgs, command: &[String]) -> Result<Plan, String> {
    let (config, _) = Config::load_or_default(args.config.as_deref()).map_err(|e| e.to_string())?;
    Plan::from_request(config, args, command)
}

/// Runs `job` to completion on a one-thread runtime (`None` when the
/// runtime cannot start).
///
/// One thread: the child's PR_SET_PDEATHSIG is tied to the thread that
/// forked it, which must live as long as the job.
pub fn block_on<T>(job: impl std::future::Future<Output = T>) -> Option<T> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt.block_on(job)),
        Err(e) => {
            tracing::error!(error = %e, "starting the async runtime failed");
            None
        }
    }
}

/// Prints a session's outcome: the summary on stderr, the report file if
/// asked; logs a session error. Returns the exit status.
pub fn finish(outcome: Result<Outcome, SessionError>, report_path: Option<&Path>) -> u8 {
    let outcome = match outcome {
        Ok(o) => o,
        Err(e @ SessionError::Interrupted(_)) => {
            tracing::warn!("{e}");
            return e.exit_code();
        }
        Err(e) => {
            tracing::error!("{e}");
            return e.exit_code();
        }
    };
    eprint!("{}", outcome.report.summary());
    if let Some(p) = report_path
        && let Err(e) = outcome.report.write_json(p)
    {
        tracing::error!(path = %p.display(), error = %e, "writing the report failed");
        return EXIT_FAILURE;
    }
    outcome.status
}

pub fn run(args: RunArgs, no_agent: bool) -> ExitCode {
    match client::route(no_agent) {
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(client::ROUTE_ERROR);
        }
        Ok(Route::Agent(conn)) => {
            let mut job = args.job.clone();
            job.config = client::absolute(job.config);
            let request = Request::Run {
                job: Box::new(job),
                command: args.command.clone(),
                env: client::environment(),
                cwd: std::env::current_dir().ok(),
            };
            return ExitCode::from(client::submit(conn, request, args.job.report.as_deref()));
        }
        Ok(Route::InProcess) => {}
    }
    let plan = match plan(&args.job, &args.command) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let session = Session::new(plan);
    let outcome = block_on(session.run(&args.command));
    ExitCode::from(match outcome {
        Some(o) => finish(o, args.job.report.as_deref()),
        None => EXIT_FAILURE,
    })
}
