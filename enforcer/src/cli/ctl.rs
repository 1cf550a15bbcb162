//! `enforcer ctl`: the agent's other requests from the command line
//! (`status`, `report`, `cancel`, `protect`, `subscribe`), each answer
//! printed as one JSON line on stdout.

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    agent::{
        client::{self, Route},
        proto::{Request, Response},
    },
    job::session::EXIT_FAILURE,
    units::Percent,
};

/// Ask the node agent (on `ENFORCER_SOCKET`, default
/// /run/enforcer/enforcer.sock) about jobs and trainings.
///
/// Exit status: 0, or the status the agent's error carries (2 refused or
/// malformed, 125 the agent failed).
#[derive(Debug, Args)]
pub struct CtlArgs {
    #[command(subcommand)]
    pub request: CtlRequest,
}

#[derive(Debug, Subcommand)]
pub enum CtlRequest {
    /// Your jobs (root: every job) and the budgets.
    Status,
    /// A job's report.
    Report {
        id: String,
        /// Wait until the job has ended.
        #[arg(long)]
        wait: bool,
    },
    /// End a job as a signal to `enforcer run` would (again: kill it).
    Cancel { id: String },
    /// Register a training to protect.
    Protect {
        /// The training process (one of yours, unless you are root).
        #[arg(long)]
        pid: Option<i32>,
        /// Or its cgroup (root only).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Also protect the processes it forks.
        #[arg(long)]
        follow_children: bool,
        /// The file the training writes its step count to.
        #[arg(long)]
        progress_file: Option<PathBuf>,
        /// The budget its jobs share, e.g. `5%`.
        #[arg(long)]
        budget: Option<Percent>,
    },
    /// Stream events until interrupted.
    Subscribe,
}

pub fn run(args: CtlArgs) -> ExitCode {
    let mut conn = match client::route(false) {
        Ok(Route::Agent(c)) => c,
        Ok(Route::InProcess) => {
            tracing::error!(
                "no enforcer agent answers (start it: `systemctl start enforcer` or `enforcer agent`)"
            );
            return ExitCode::from(client::ROUTE_ERROR);
        }
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(client::ROUTE_ERROR);
        }
    };
    let stream = matches!(args.request, CtlRequest::Subscribe);
    let request = match args.request {
        CtlRequest::Status => Request::Status,
        CtlRequest::Report { id, wait } => Request::Report { id, wait },
        CtlRequest::Cancel { id } => Request::Cancel { id },
        CtlRequest::Protect {
            pid,
            cgroup,
            follow_children,
            progress_file,
            budget,
        } => Request::Protect {
            pid,
            cgroup,
            follow_children,
            progress_file,
            budget,
        },
        CtlRequest::Subscribe => Request::Subscribe,
    };
    if let Err(e) = conn.send(&request, &[]) {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    loop {
        match conn.recv() {
            Ok(Some(r)) => {
                let line = serde_json::to_string(&r).unwrap_or_default();
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return ExitCode::from(EXIT_FAILURE);
                }
                if let Response::Error { status, message } = &r {
                    tracing::error!("{message}");
                    return ExitCode::from(*status);
                }
                if !stream {
                    return ExitCode::SUCCESS;
                }
            }
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    }
}
