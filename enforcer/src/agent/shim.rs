//! `enforcer shim <job-dir>` (hidden): the parent of one agent job. The
//! agent starts it in a session of its own, with the caller's stdin, stdout
//! and stderr, and nothing ties it to the agent (no parent-death signal),
//! so the job keeps its supervisor, deadline and exit status when the agent
//! dies. It holds the job directory's lock for as long as it lives, runs
//! the job's [`Session`] from the persisted plan, and writes the result
//! atomically into the job directory.

use std::path::Path;

use crate::{
    agent::store::{self, JobDir, JobKind, JobPlan, JobResult, ShimInfo},
    job::{
        plan::JobRequest,
        session::{EXIT_FAILURE, Plan, Session},
    },
};

/// The session plan of an accepted job, built exactly as the agent checked
/// it, with the deadline left of its absolute deadline.
pub fn session_plan(job: &JobPlan, dir: &Path) -> Result<Plan, String> {
    let command = job.kind.command();
    let mut plan = Plan::from_request(job.config.clone(), &job.request, &command)?;
    plan.run_as = job.run_as.clone();
    plan.env = Some(job.env.clone());
    plan.attach_owner = (job.caller_uid != 0).then_some(job.caller_uid);
    plan.external_budget = job
        .external_budget
        .then(|| dir.join(crate::agent::budget::WISH_FILE));
    // Never zero: a job whose deadline passed before it started is still
    // started and killed at once, so that its report says `deadline`.
    plan.supervision.timeout =
        store::until(job.deadline_unix_ms).max(std::time::Duration::from_millis(1));
    Ok(plan)
}

/// A game's plan and the job it runs in, from the caller's cgroups as the
/// agent recorded them; the deadline is what is left of the absolute one.
fn game_plan(
    job: &JobPlan,
    game: &crate::cli::game::GameArgs,
    membership: &str,
) -> Result<(crate::job::session::GamePlan, crate::cgroup::JobCgroup), String> {
    let mut plan = crate::cli::game::game_plan(job.config.clone(), game)?;
    plan.run_as = job.run_as.clone();
    plan.env = Some(job.env.clone());
    plan.timeout = store::until(job.deadline_unix_ms).max(std::time::Duration::from_millis(1));
    let cgroup = caller_job(membership)?;
    Ok((plan, cgroup))
}

/// The job cgroup a process with this `/proc/<pid>/cgroup` runs in.
pub fn caller_job(membership: &str) -> Result<crate::cgroup::JobCgroup, String> {
    let layout = crate::cgroup::Layout::detect().map_err(|e| e.to_string())?;
    crate::cgroup::subtree::current_job_from(&layout, &crate::host::ProcCgroup::parse(membership))
        .map_err(|e| e.to_string())
}

/// Runs the shim for the job in `dir`; returns the job's exit status.
pub fn main(dir: &Path) -> u8 {
    let job_dir = match JobDir::at(dir) {
        Ok(d) => d,
        Err(error) => {
            tracing::error!(%error, "shim: opening the job directory failed");
            return EXIT_FAILURE;
        }
    };
    // The lock, then the result: a restarted agent that declared the job
    // dead before this shim got going wrote the result under the lock.
    let _lock = match job_dir.try_lock() {
        Ok(Some(l)) => l,
        Ok(None) => {
            tracing::error!(dir = %dir.display(), "shim: another process holds this job");
            return EXIT_FAILURE;
        }
        Err(error) => {
            tracing::error!(%error, "shim: locking the job failed");
            return EXIT_FAILURE;
        }
    };
    if let Ok(Some(r)) = job_dir.result() {
        tracing::warn!(dir = %dir.display(), "shim: the job already has a result; not starting it");
        return r.status;
    }
    let pid = std::process::id() as i32;
    let info = ShimInfo {
        pid,
        start_time: store::start_time(pid).unwrap_or(0),
    };
    let result = match job_dir.write_shim(&info).and_then(|()| {
        job_dir.plan()?.ok_or_else(|| store::StoreError::Io {
            path: dir.join(store::PLAN),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }) {
        Ok(job) => run(&job, dir),
        Err(error) => failed(
            EXIT_FAILURE,
            format!("shim: reading the job's plan failed: {error}"),
        ),
    };
    if let Err(error) = job_dir.write_result(&result) {
        tracing::error!(%error, "shim: writing the job's result failed");
        return EXIT_FAILURE;
    }
    result.status
}

fn failed(status: u8, message: String) -> JobResult {
    JobResult {
        status,
        report: None,
        error: Some(message),
        ended_unix_ms: store::now_ms(),
    }
}

fn run(job: &JobPlan, dir: &Path) -> JobResult {
    let outcome = if let JobKind::Game {
        job: name,
        game,
        command,
        membership,
    } = &job.kind
    {
        let (plan, cgroup) = match game_plan(job, game, membership) {
            Ok(p) => p,
            Err(e) => return failed(crate::job::session::EXIT_USAGE, e),
        };
        crate::cli::run::block_on(crate::job::session::game_in_job(
            &plan,
            cgroup,
            Some(name.clone()),
            command,
        ))
    } else {
        let plan = match session_plan(job, dir) {
            Ok(p) => p,
            Err(e) => return failed(crate::job::session::EXIT_USAGE, e),
        };
        let session = Session::new(plan);
        crate::cli::run::block_on(async {
            match &job.kind {
                JobKind::Attach { pid, tree } => session.attach(*pid, *tree).await,
                _ => session.run(&job.kind.command()).await,
            }
        })
    };
    match outcome {
        None => failed(
            EXIT_FAILURE,
            "shim: the async runtime did not start".to_owned(),
        ),
        Some(Ok(o)) => JobResult {
            status: o.status,
            report: Some(o.report),
            error: None,
            ended_unix_ms: store::now_ms(),
        },
        Some(Err(e)) => failed(e.exit_code(), e.to_string()),
    }
}

/// The flags an accepted request keeps: the report is the client's to
/// write, and the config is the agent's.
pub fn sanitize(mut request: JobRequest) -> JobRequest {
    request.report = None;
    request.config = None;
    request
}
