//! `enforcer attach`: moves a live process (all its threads; with `--tree`
//! its existing descendants too) into a new job and supervises it in the
//! foreground like `run` ([`Session::attach`]).

use std::process::ExitCode;

use clap::Args;

use super::run::{EXIT_FAILURE, EXIT_USAGE, JobArgs, block_on, finish, plan};
use crate::{
    agent::{
        client::{self, Route},
        proto::Request,
    },
    host::Pid,
    job::session::Session,
};

/// Move a running process into a job and enforce its limits and deadline.
///
/// The deadline starts now. Exit status as for `run`, except that the exit
/// code of a process that is not our child cannot be read: 0 when it ends
/// by itself. Refused (exit 2, nothing left behind): unknown PID, PID 1,
/// kernel threads, the enforcer itself or its ancestors, the protected
/// training process, and a process that exited or whose number names
/// another process (start time or owner changed) by the time it is moved:
/// the process is held by a pidfd from the first check, and signals go
/// through it.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The process to attach (all its threads): a positive process id.
    #[arg(long)]
    pub pid: Pid,
    /// Also attach the process's existing descendants.
    #[arg(long)]
    pub tree: bool,
    #[command(flatten)]
    pub job: JobArgs,
}

pub fn run(args: AttachArgs, no_agent: bool) -> ExitCode {
    if args.job.user.is_some() || args.job.group.is_some() {
        tracing::error!(
            "--user / --group: an attached process keeps its own identity; they apply to `enforcer run`"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    match client::route(no_agent) {
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(client::ROUTE_ERROR);
        }
        Ok(Route::Agent(conn)) => {
            let mut job = args.job.clone();
            job.config = client::absolute(job.config);
            let request = Request::Attach {
                job: Box::new(job),
                pid: args.pid,
                tree: args.tree,
            };
            return ExitCode::from(client::submit(conn, request, args.job.report.as_deref()));
        }
        Ok(Route::InProcess) => {}
    }
    let command = vec![format!("attached pid {}", args.pid)];
    let plan = match plan(&args.job, &command) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let session = Session::new(plan);
    ExitCode::from(match block_on(session.attach(args.pid, args.tree)) {
        Some(o) => finish(o, args.job.report.as_deref()),
        None => EXIT_FAILURE,
    })
}
