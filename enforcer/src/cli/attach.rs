//! `enforcer attach`: moves a live process (all its threads; with `--tree`
//! its existing descendants too) into a new job and supervises it in the
//! foreground like `run`. Every refusal happens before the cgroup exists, or
//! removes it, so a refusal leaves nothing behind.

use std::{
    process::ExitCode,
    time::{Instant, SystemTime},
};

use clap::Args;

use super::run::{
    EXIT_FAILURE, EXIT_USAGE, JobArgs, JobGuard, Plan, block_on, finish_report, job_monitors,
    start_or_interrupt,
};
use crate::{
    cgroup::CgroupError,
    host::ProcFs,
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
/// training process, and a process that exited or whose number names
/// another process (start time or owner changed) by the time it is moved:
/// the process is held by a pidfd from the first check, and signals go
/// through it.
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
    if args.job.user.is_some() || args.job.group.is_some() {
        tracing::error!(
            "--user / --group: an attached process keeps its own identity; they apply to `enforcer run`"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let command = vec![format!("attached pid {}", args.pid)];
    let plan = match Plan::new(&args.job, &command) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let proc_root = &ProcFs::new();
    let self_pid = std::process::id() as i32;
    // Held from the first check on, so that the process moved and signalled
    // later is this one even if its number is reused meanwhile.
    let held = checks::Held::take(proc_root, args.pid).and_then(|held| {
        checks::check(proc_root, args.pid, self_pid, plan.config.training.pid)?;
        held.verify(proc_root)?;
        Ok(held)
    });
    let held = match held {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("refusing to attach: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    ExitCode::from(block_on(attach_async(plan, &args, held)))
}

/// Moves one held process into the job: verified just before the move (the
/// slot wait may have been long) and again after it.
enum Moved {
    Yes,
    /// Gone or replaced before the move: nothing was moved.
    Refused(AttachRefused),
    /// The process in the job is not the one checked: a newcomer that got
    /// the number between the check and the move.
    Impostor(AttachRefused),
    Failed(CgroupError),
}

fn move_held(guard: &JobGuard, held: &checks::Held, proc_root: &ProcFs) -> Moved {
    if let Err(e) = held.verify(proc_root) {
        return Moved::Refused(e);
    }
    let pid = held.pidfd.pid();
    if let Err(e) = guard.0.add_process(pid) {
        let gone = matches!(&e, CgroupError::Write { source, .. } if source.raw_os_error() == Some(libc::ESRCH))
            || !held.pidfd.is_alive();
        return if gone {
            Moved::Refused(AttachRefused::ExitedMidway(pid))
        } else {
            Moved::Failed(e)
        };
    }
    match held.verify(proc_root) {
        Ok(()) => Moved::Yes,
        // It exited after the move and its number names no other process:
        // what the job holds is its own (children, a zombie), safe to kill.
        Err(e @ AttachRefused::ExitedMidway(_))
            if checks::identity(proc_root, pid)
                .is_none_or(|now| now.start_time == held.identity.start_time) =>
        {
            Moved::Refused(e)
        }
        Err(e) => Moved::Impostor(e),
    }
}

async fn attach_async(plan: Plan, args: &AttachArgs, held: checks::Held) -> u8 {
    let mut signals = job::Signals::install();
    let started_job = match start_or_interrupt(&plan, args.job.no_wait, &mut signals).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let guard = &started_job.guard;
    let proc_root = &ProcFs::new();
    match move_held(guard, &held, proc_root) {
        Moved::Yes => {}
        Moved::Refused(e) => {
            tracing::error!("refusing to attach: {e}");
            return EXIT_USAGE;
        }
        Moved::Impostor(e) => {
            tracing::error!(
                cgroup = %guard.0.path().display(),
                "refusing to attach: {e}; the process now in the job cgroup is not killed, and the cgroup is left for it"
            );
            started_job.leave_unkilled();
            return EXIT_USAGE;
        }
        Moved::Failed(e) => {
            tracing::error!("attaching PID {}: {e}", args.pid);
            return EXIT_FAILURE;
        }
    }
    let mut moved = 1;
    if args.tree {
        for (p, seen_start) in checks::descendants(proc_root, args.pid) {
            // A descendant that exited meanwhile needs no limits; one whose
            // number now names another process is not ours to move.
            let child = match checks::Held::take(proc_root, p) {
                Ok(h) if h.identity.start_time == seen_start => h,
                Ok(_) => {
                    tracing::info!(
                        pid = p,
                        "not attaching a descendant: {}",
                        AttachRefused::Replaced(p)
                    );
                    continue;
                }
                Err(_) => continue,
            };
            match move_held(guard, &child, proc_root) {
                Moved::Yes => moved += 1,
                Moved::Refused(e) => tracing::info!(pid = p, "not attaching a descendant: {e}"),
                Moved::Impostor(e) => {
                    tracing::error!(
                        cgroup = %guard.0.path().display(),
                        "refusing to attach: {e}; the process now in the job cgroup is not killed, and the cgroup is left for it"
                    );
                    started_job.leave_unkilled();
                    return EXIT_USAGE;
                }
                Moved::Failed(e) => {
                    tracing::error!("attaching PID {p}: {e}");
                    return EXIT_FAILURE;
                }
            }
        }
    }
    let started = Instant::now();
    let threads = checks::threads(proc_root, args.pid).len();
    tracing::info!(job = %plan.name, pid = args.pid, processes = moved, threads, cgroup = %guard.0.path().display(), "attached");
    if held.identity.uid == 0 {
        tracing::warn!(
            job = %plan.name,
            pid = args.pid,
            "the attached process runs as root: it can leave its cgroup and raise its own limits"
        );
    }
    let identity = held.identity;
    let (mut report, code) = job::supervise(
        &guard.0,
        &started_job.supervision(&plan),
        job::Target::Attached(held.pidfd),
        job_monitors(&plan, &args.job, None),
        signals,
        started,
        SystemTime::now(),
    )
    .await;
    report.uid = Some(identity.uid);
    report.gid = Some(identity.gid);
    drop(started_job);
    if !finish_report(&report, args.job.report.as_deref()) {
        return EXIT_FAILURE;
    }
    u8::try_from(code).unwrap_or(EXIT_FAILURE)
}
