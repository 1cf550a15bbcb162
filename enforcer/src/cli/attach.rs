//! `enforcer attach`: moves a live process (all its threads; with `--tree`
//! its existing descendants too) into a new job and supervises it in the
//! foreground like `run`. Every refusal happens before the cgroup exists, or
//! removes it, so a refusal leaves nothing behind.

use std::{
    path::Path,
    process::ExitCode,
    time::{Instant, SystemTime},
};

use clap::Args;

use super::run::{
    EXIT_FAILURE, EXIT_USAGE, JobArgs, Plan, block_on, finish_report, job_monitors,
    start_or_interrupt,
};
use crate::{
    cgroup::CgroupError,
    job::{
        self,
        attach::{self as checks, AttachRefused},
    },
};

/// Move a running process into a job and enforce its limits and deadline.
///
/// The deadline starts now. Exit status as for `run`, except that the exit
/// code of a process that is not our child cannot be read: 0 when it ends
/// by itself. Refused (exit 2, nothing left behind): unknown PID, PID 1,
/// kernel threads, the enforcer itself or its ancestors, the protected
/// training process.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The process to attach (all its threads).
    #[arg(long)]
    pub pid: i32,
    /// Also attach the process's existing descendants.
    #[arg(long)]
    pub tree: bool,
    #[command(flatten)]
    pub job: JobArgs,
}

pub fn run(args: AttachArgs) -> ExitCode {
    let command = vec![format!("attached pid {}", args.pid)];
    let plan = match Plan::new(&args.job, &command) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let proc_root = Path::new("/proc");
    let self_pid = std::process::id() as i32;
    if let Err(e) = checks::check(proc_root, args.pid, self_pid, plan.config.training.pid) {
        tracing::error!("refusing to attach: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    ExitCode::from(block_on(attach_async(plan, &args)))
}

async fn attach_async(plan: Plan, args: &AttachArgs) -> u8 {
    let mut signals = job::Signals::install();
    let started_job = match start_or_interrupt(&plan, args.job.no_wait, &mut signals).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let guard = &started_job.guard;
    let proc_root = Path::new("/proc");
    let mut pids = vec![args.pid];
    if args.tree {
        pids.extend(checks::descendants(proc_root, args.pid));
    }
    for (i, &p) in pids.iter().enumerate() {
        if let Err(e) = guard.0.add_process(p) {
            let gone = matches!(&e, CgroupError::Write { source, .. } if source.raw_os_error() == Some(libc::ESRCH))
                || checks::stat_fields(proc_root, p).is_none_or(|(s, _, _)| s == 'Z');
            if i > 0 && gone {
                // A descendant that exited meanwhile needs no limits.
                continue;
            }
            if gone {
                tracing::error!("refusing to attach: {}", AttachRefused::ExitedMidway(p));
                return EXIT_USAGE;
            }
            tracing::error!("attaching PID {p}: {e}");
            return EXIT_FAILURE;
        }
    }
    let started = Instant::now();
    let threads = checks::threads(proc_root, args.pid).len();
    tracing::info!(job = %plan.name, pid = args.pid, processes = pids.len(), threads, cgroup = %guard.0.path().display(), "attached");
    let (report, code) = job::supervise(
        &guard.0,
        &started_job.supervision(&plan),
        job::Target::Attached(args.pid),
        job_monitors(&plan, &args.job, None),
        signals,
        started,
        SystemTime::now(),
    )
    .await;
    drop(started_job);
    if !finish_report(&report, args.job.report.as_deref()) {
        return EXIT_FAILURE;
    }
    u8::try_from(code).unwrap_or(EXIT_FAILURE)
}
