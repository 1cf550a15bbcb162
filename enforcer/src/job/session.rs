//! A job's life, from the validated [`Plan`] to one [`Outcome`]: the state
//! directory and a slot, the job's lock (recording its cgroups), the
//! cleanup of dead enforcers' jobs, the job cgroup with its limits and the
//! hooks cgroup, the meter loaded before the command starts, supervision,
//! the report, and the cleanup of everything it made.
//!
//! A [`Session`] holds no process-global state: its command, environment
//! and identity come from the plan, and the async runtime is the caller's,
//! so that one process can run many sessions. The CLI (`run`, `attach`,
//! `game`) only parses flags, calls a session and prints its outcome.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    cgroup::{
        CgroupError, JobCgroup, Layout, Limits, Subtree,
        subtree::{SliceClass, current_job},
    },
    config::Config,
    gpu::{duty::RunFraction, guard::GpuLimits, monitor::GpuMonitor},
    host::{Pid, ProcFs},
    job::{
        self, JobError, Monitor, RunAs, Supervision,
        attach::{self as checks, AttachRefused},
        watch::LimitEvents,
    },
    probe::{
        monitor::{StealMonitor, training_cgroup_dir},
        steal::TrainingSpec,
    },
    report::Report,
    slots,
    units::ByteSize,
};

/// Exit status for usage and config errors.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the enforcer itself failed.
pub const EXIT_FAILURE: u8 = 125;
/// Exit status when the command exists but cannot be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit status when the command is not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// Why a session ended without supervising a job to its end; each maps to
/// one documented exit status ([`SessionError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A refusal of what was asked (a name in use, a process that may not be
    /// attached, a bad state directory): exit 2, nothing left behind.
    #[error("{0}")]
    Usage(String),
    /// The enforcer itself failed: exit 125.
    #[error("{0}")]
    Failed(String),
    /// The command could not be started: 126 / 127 as a shell gives them,
    /// 125 for any other failure to start it.
    #[error(transparent)]
    Spawn(JobError),
    /// Signal N arrived before the job started: exit 128+N.
    #[error("interrupted by signal {0} before the job started")]
    Interrupted(i32),
}

impl SessionError {
    pub fn exit_code(&self) -> u8 {
        match self {
            SessionError::Usage(_) => EXIT_USAGE,
            SessionError::Failed(_) => EXIT_FAILURE,
            SessionError::Spawn(JobError::Spawn { source, .. }) => match source.kind() {
                std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                std::io::ErrorKind::PermissionDenied => EXIT_CANNOT_EXECUTE,
                _ => EXIT_FAILURE,
            },
            SessionError::Spawn(_) => EXIT_FAILURE,
            SessionError::Interrupted(sig) => u8::try_from(128 + sig).unwrap_or(EXIT_FAILURE),
        }
    }

    fn cgroup(context: &str, e: CgroupError) -> Self {
        let msg = if context.is_empty() {
            e.to_string()
        } else {
            format!("{context}: {e}")
        };
        match e {
            CgroupError::NameInUse { .. } | CgroupError::BadName { .. } => SessionError::Usage(msg),
            _ => SessionError::Failed(msg),
        }
    }

    fn slot(e: slots::SlotError) -> Self {
        if e.is_usage() {
            SessionError::Usage(e.to_string())
        } else {
            SessionError::Failed(e.to_string())
        }
    }
}

/// A job supervised to its end: its report and the exit status that stands
/// for it (the command's own, 124 deadline, 137 OOM, 128+N signal).
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    pub status: u8,
}

/// The configuration and flags of a job, merged and checked.
pub struct Plan {
    pub config: Config,
    /// Who the command runs as; `None`: root.
    pub run_as: Option<RunAs>,
    pub name: String,
    pub limits: Limits,
    pub supervision: Supervision,
    pub gpu: GpuLimits,
    pub duty_cycle: Option<RunFraction>,
    /// Fail at once instead of waiting for a free slot.
    pub no_wait: bool,
    /// Measure the steal against the budget without holding the job to it.
    pub measure_only: bool,
    /// A one-line live status on stderr once a second.
    pub live_status: bool,
    /// The command's whole environment (a job the agent runs for a
    /// caller: the caller's); `None`: this process's.
    pub env: Option<Vec<(String, String)>>,
    /// `attach` only a process of this uid (the agent's non-root caller),
    /// checked on the process the pidfd holds.
    pub attach_owner: Option<u32>,
    /// A job of the agent whose training's budget the agent holds: the
    /// file its wishes come through ([`crate::agent::budget::ExternalBudget`]),
    /// in place of the job's own budget loop.
    pub external_budget: Option<PathBuf>,
}

/// What a game asks for, checked: run inside the job the caller is in.
pub struct GamePlan {
    pub config: Config,
    /// Who the game's command runs as (`None`: as the caller of `game`).
    pub run_as: Option<RunAs>,
    /// The command's whole environment (`None`: this process's).
    pub env: Option<Vec<(String, String)>>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub memory: Option<ByteSize>,
    pub cpu: Option<f64>,
    pub pids: Option<u64>,
}

/// Kills and removes the job cgroup however the session ends (also on an
/// early return or a panic), so that no job outlives the enforcer and no
/// empty cgroup is left behind.
pub struct JobGuard(pub Arc<JobCgroup>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            tracing::error!(error = %e, "killing the job's remaining tasks failed");
        }
        if let Err(e) = self.0.remove() {
            tracing::warn!(error = %e, "removing the job cgroup failed");
        }
    }
}

/// The monitors every job and game gets.
pub fn default_monitors() -> Vec<Box<dyn Monitor>> {
    vec![
        Box::new(LimitEvents::default()),
        Box::new(super::idle::IdleThreads::default()),
    ]
}

/// How long the training is watched before a protected job starts, to place
/// the job on the CPUs it leaves free (see `budget::placement`).
const PLACEMENT_WATCH: Duration = Duration::from_millis(400);

/// The monitors of a `run` or `attach` job: the defaults plus the steal
/// meter (null-safe: without a training workload or probes it only fills
/// the report's `unavailable` reasons), with a training workload the budget
/// loop acting on its readings (`progress` is the training's progress tracker learned
/// before the job, [`crate::budget::learn_before_job`]), and the GPU guard
/// (null-safe too).
fn job_monitors(
    plan: &Plan,
    progress: Option<crate::budget::ProgressTracker>,
) -> Vec<Box<dyn Monitor>> {
    let t = &plan.config.training;
    // A job the node agent budgets is metered there, by the node's one
    // meter for every training and job: no meter of its own.
    let own_meter = plan.external_budget.is_none();
    let training = match (t.pid, &t.cgroup) {
        _ if !own_meter => None,
        (Some(pid), _) => Pid::new(pid).map(|pid| TrainingSpec::Pid {
            pid,
            follow_children: t.follow_children,
        }),
        (None, Some(dir)) => Some(TrainingSpec::Cgroup(training_cgroup_dir(dir))),
        (None, None) => None,
    };
    let mut monitors = default_monitors();
    let protect = training.is_some();
    let mut steal = StealMonitor::new(training, plan.config.budget.fraction(), plan.live_status);
    if !own_meter {
        steal = steal.metered_by_agent();
    }
    let hold = protect && !plan.measure_only;
    // The probes load before the job starts, so that its first instruction
    // is metered; where the training runs is watched meanwhile, so that the
    // loop places the job at its first tick.
    let history = if protect {
        let watch = if hold && plan.config.place_jobs {
            PLACEMENT_WATCH
        } else {
            Duration::ZERO
        };
        steal.watch_before_job(watch)
    } else {
        Vec::new()
    };
    monitors.push(Box::new(steal));
    if let Some(file) = &plan.external_budget {
        monitors.push(Box::new(crate::agent::budget::ExternalBudget::new(
            file.clone(),
        )));
    } else if hold {
        monitors.push(Box::new(
            crate::budget::BudgetMonitor::for_job(&plan.config, progress)
                .with_training_history(history),
        ));
    }
    // The GPU guard and duty cycle (games run inside a job that already has
    // them).
    monitors.push(Box::new(GpuMonitor::new(plan.gpu, plan.duty_cycle)));
    monitors
}

/// A job cgroup made and limited, with the slot and the ownership lock it
/// holds; dropping it (after the job) kills, removes and releases all.
struct Started {
    // Field order is drop order: the cgroups go before the lock and slot.
    guard: JobGuard,
    /// The cgroup the job's `on_event` hooks run in, when it has a hook.
    hooks: Option<JobGuard>,
    /// The evaluation slice, for a job in the idle class (its budget loop
    /// may lift it out, the slice with it).
    slice: Option<SliceClass>,
    _lock: slots::JobLock,
    _slot: slots::Slot,
}

impl Started {
    /// `plan`'s supervision, with the hooks put in the hooks cgroup.
    fn supervision(&self, plan: &Plan) -> Supervision {
        let mut s = plan.supervision.clone();
        s.hooks_cgroup = hooks_files(self.hooks.as_ref());
        s.slice.clone_from(&self.slice);
        s
    }

    /// Releases the slot and the lock but neither kills nor removes the job
    /// cgroup: for a process that must not be killed (one that is not the
    /// job's after all). The cgroup stays, with its limits, until it is
    /// empty and removed by hand.
    fn leave_unkilled(self) {
        let Started {
            guard,
            hooks,
            slice: _,
            _lock,
            _slot,
        } = self;
        drop(hooks);
        std::mem::forget(guard);
    }
}

fn hooks_files(hooks: Option<&JobGuard>) -> Vec<PathBuf> {
    hooks.map(|h| h.0.join_files()).unwrap_or_default()
}

/// One job's life. Build it from a checked plan, then [`Session::run`] a
/// command or [`Session::attach`] a live process; [`game`] runs a game
/// inside the job the caller is in.
pub struct Session {
    plan: Plan,
    proc_root: ProcFs,
    self_pid: Pid,
}

impl Session {
    pub fn new(plan: Plan) -> Self {
        Session {
            plan,
            proc_root: ProcFs::new(),
            self_pid: Pid::this_process(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Runs `command` in a new job and supervises it to its end.
    pub async fn run(&self, command: &[String]) -> Result<Outcome, SessionError> {
        let plan = &self.plan;
        let mut signals = job::Signals::install();
        let started_job = self.start_or_interrupt(&mut signals).await?;
        // With a training progress file, its job-free step rate is learned
        // now, before the command starts (a few seconds, blocking: nothing
        // else runs yet).
        let progress = crate::budget::learn_before_job(&plan.config);
        let monitors = job_monitors(plan, progress);
        let started = Instant::now();
        let started_wall = SystemTime::now();
        let mut envs = vec![("ENFORCER_JOB".to_owned(), plan.name.clone())];
        envs.extend(plan.run_as.iter().flat_map(RunAs::env));
        if plan.run_as.is_none() {
            tracing::warn!(
                job = %plan.name,
                "the job runs as root: it can leave its cgroup and raise its own limits (run it with --user)"
            );
        }
        let child = job::spawn_into(
            &started_job.guard.0,
            command,
            &envs,
            plan.env.as_deref(),
            plan.run_as.as_ref(),
            plan.limits.cpu_idle,
        )
        .map_err(SessionError::Spawn)?;
        let (report, code) = job::supervise(job::Supervised {
            cgroup: started_job.guard.0.clone(),
            spec: started_job.supervision(plan),
            target: job::Target::Spawned(child),
            monitors,
            signals,
            started,
            started_wall,
            uid: plan.run_as.as_ref().map_or(0, |r| r.uid),
            gid: plan.run_as.as_ref().map_or(0, |r| r.gid),
        })
        .await;
        drop(started_job);
        Ok(Outcome {
            report,
            status: u8::try_from(code).unwrap_or(EXIT_FAILURE),
        })
    }

    /// Moves live process `pid` (with `tree`, its existing descendants too)
    /// into a new job and supervises it to its end. The process is held by
    /// a pidfd from the first check on, so that the process moved and
    /// signalled is the one checked even if its number is reused; every
    /// refusal happens before the cgroup exists, or removes it.
    pub async fn attach(&self, pid: Pid, tree: bool) -> Result<Outcome, SessionError> {
        let plan = &self.plan;
        let proc_root = &self.proc_root;
        let refused = |e: AttachRefused| SessionError::Usage(format!("refusing to attach: {e}"));
        let held = checks::Held::take(proc_root, pid).map_err(refused)?;
        if let Some(caller) = plan.attach_owner
            && held.identity.uid != caller
        {
            return Err(refused(AttachRefused::NotOwner {
                pid,
                owner: held.identity.uid,
                caller,
            }));
        }
        let training = plan.config.training.pid.and_then(Pid::new);
        checks::check(proc_root, pid, self.self_pid, training).map_err(refused)?;
        held.verify(proc_root).map_err(refused)?;
        let mut signals = job::Signals::install();
        let started_job = self.start_or_interrupt(&mut signals).await?;
        let guard = &started_job.guard;
        let impostor = |e: AttachRefused| {
            SessionError::Usage(format!(
                "refusing to attach: {e}; the process now in the job cgroup ({}) is not killed, and the cgroup is left for it",
                guard.0.path().display()
            ))
        };
        match move_held(guard, &held, proc_root) {
            Moved::Yes => {}
            Moved::Refused(e) => return Err(refused(e)),
            Moved::Impostor(e) => {
                let err = impostor(e);
                started_job.leave_unkilled();
                return Err(err);
            }
            Moved::Failed(e) => {
                return Err(SessionError::cgroup(&format!("attaching PID {pid}"), e).into_failure());
            }
        }
        let mut moved = 1;
        if tree {
            for (p, seen_start) in checks::descendants(proc_root, pid) {
                // A descendant that exited meanwhile needs no limits; one
                // whose number now names another process is not ours to
                // move.
                let child = match checks::Held::take(proc_root, p) {
                    Ok(h) if h.identity.start_time == seen_start => h,
                    Ok(_) => {
                        tracing::info!(
                            pid = %p,
                            "not attaching a descendant: {}",
                            AttachRefused::Replaced(p)
                        );
                        continue;
                    }
                    Err(_) => continue,
                };
                match move_held(guard, &child, proc_root) {
                    Moved::Yes => moved += 1,
                    Moved::Refused(e) => {
                        tracing::info!(pid = %p, "not attaching a descendant: {e}");
                    }
                    Moved::Impostor(e) => {
                        let err = impostor(e);
                        started_job.leave_unkilled();
                        return Err(err);
                    }
                    Moved::Failed(e) => {
                        return Err(
                            SessionError::cgroup(&format!("attaching PID {p}"), e).into_failure()
                        );
                    }
                }
            }
        }
        let started = Instant::now();
        let threads = checks::threads(proc_root, pid).len();
        tracing::info!(job = %plan.name, %pid, processes = moved, threads, cgroup = %guard.0.path().display(), "attached");
        if held.identity.uid == 0 {
            tracing::warn!(
                job = %plan.name,
                %pid,
                "the attached process runs as root: it can leave its cgroup and raise its own limits"
            );
        }
        let identity = held.identity;
        let (report, code) = job::supervise(job::Supervised {
            cgroup: guard.0.clone(),
            spec: started_job.supervision(plan),
            target: job::Target::Attached(held.pidfd),
            monitors: job_monitors(plan, None),
            signals,
            started,
            started_wall: SystemTime::now(),
            uid: identity.uid,
            gid: identity.gid,
        })
        .await;
        drop(started_job);
        Ok(Outcome {
            report,
            status: u8::try_from(code).unwrap_or(EXIT_FAILURE),
        })
    }

    /// [`Session::start_job`], abandoned (exit 128+N) if signal N arrives
    /// meanwhile, e.g. while waiting for a slot.
    async fn start_or_interrupt(
        &self,
        signals: &mut job::Signals,
    ) -> Result<Started, SessionError> {
        tokio::select! {
            r = self.start_job() => r,
            sig = signals.any() => Err(SessionError::Interrupted(sig)),
        }
    }

    /// Opens the state directory, waits for a slot, cleans up orphans of
    /// dead enforcers, takes the job's lock (recording where its cgroups
    /// go), creates the job cgroup and applies the limits. A bad
    /// `state_dir` is a usage error before any cgroup is touched.
    async fn start_job(&self) -> Result<Started, SessionError> {
        let plan = &self.plan;
        let cfg = &plan.config;
        let state = slots::StateDir::open(&cfg.state_dir).map_err(SessionError::slot)?;
        let max = cfg.max_concurrent_jobs.get();
        let slot = slots::acquire(&state, max, plan.no_wait, |pos, len| {
            tracing::info!(job = %plan.name, position = pos + 1, queued = len, max, "waiting for slot");
        })
        .await
        .map_err(SessionError::slot)?;
        let subtree =
            Subtree::open(cfg.cgroup_root.as_deref()).map_err(|e| SessionError::cgroup("", e))?;
        clean_orphans(&state, &subtree);
        let record = slots::JobRecord {
            job: plan.name.clone(),
            enforcer_pid: std::process::id(),
            cgroups: subtree
                .job_location(&plan.name)
                .map_err(|e| SessionError::cgroup("", e))?,
        };
        let lock = slots::lock_job(&state, &record).map_err(SessionError::slot)?;
        let guard = JobGuard(Arc::new(
            subtree
                .create_job(&plan.name)
                .map_err(|e| SessionError::cgroup("", e))?,
        ));
        guard
            .0
            .apply(&plan.limits)
            .map_err(|e| SessionError::Failed(format!("applying the job's limits: {e}")))?;
        subtree
            .set_slice_cpu(plan.limits.cpu_idle, plan.limits.cpu_weight)
            .map_err(|e| {
                SessionError::Failed(format!("setting the evaluation slice's CPU class: {e}"))
            })?;
        // Hooks run as root: never unconfined, so no hooks cgroup, no job.
        let hooks = match &plan.supervision.on_event {
            None => None,
            Some(_) => {
                let hooks = JobGuard(Arc::new(subtree.create_hooks(&plan.name).map_err(|e| {
                    SessionError::cgroup("creating the cgroup for the job's hooks", e)
                })?));
                hooks.0.apply(&crate::events::hook_limits()).map_err(|e| {
                    SessionError::Failed(format!("limiting the cgroup for the job's hooks: {e}"))
                })?;
                Some(hooks)
            }
        };
        let slice = plan
            .limits
            .cpu_idle
            .then(|| subtree.slice_class())
            .flatten();
        Ok(Started {
            guard,
            hooks,
            slice,
            _lock: lock,
            _slot: slot,
        })
    }
}

impl SessionError {
    /// A cgroup failure while the job already exists is the enforcer's.
    fn into_failure(self) -> Self {
        match self {
            SessionError::Usage(m) => SessionError::Failed(m),
            e => e,
        }
    }
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
    if let Err(e) = guard.0.add_process(pid.as_raw()) {
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

/// [`clean_orphans`] for the agent: after a restart, the cgroups of jobs
/// whose shim died with them. Errors are logged, never fatal.
pub fn clean_up_dead_jobs(config: &Config) {
    let state = match slots::StateDir::open(&config.state_dir) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "opening the state directory to clean up dead jobs failed");
            return;
        }
    };
    match Subtree::open(config.cgroup_root.as_deref()) {
        Ok(subtree) => clean_orphans(&state, &subtree),
        Err(error) => {
            tracing::warn!(%error, "opening the cgroup subtree to clean up dead jobs failed")
        }
    }
}

/// Kills and removes the jobs of enforcers that died, exactly where their
/// locks record them and only inside this enforcer's subtree; a lock goes
/// once its job's cgroups are gone. The job of another subtree is left to an
/// enforcer of that subtree, its lock kept (so the name stays taken).
fn clean_orphans(state: &slots::StateDir, subtree: &Subtree) {
    let orphans = match slots::orphaned_jobs(state) {
        Ok(o) => o,
        Err(error) => {
            tracing::warn!(%error, "looking for the jobs of enforcers that died failed");
            return;
        }
    };
    for orphan in orphans {
        let name = orphan.name.clone();
        let location = match &orphan.record {
            Some(r) => r.cgroups.clone(),
            // An older enforcer recorded nothing: its job can only be where
            // this subtree would have put it.
            None => match subtree.job_location(&name) {
                Ok(l) if l.exists() => l,
                _ => {
                    tracing::warn!(job = %name, lock = %orphan.path().display(), "the lock of a dead enforcer's job does not record its cgroups, and this subtree has no job of that name: lock kept (remove it once the job is gone)");
                    continue;
                }
            },
        };
        let named = location
            .dirs()
            .all(|d| d.file_name().and_then(|n| n.to_str()) == Some(name.as_str()));
        // Its hooks' cgroup, beside each of its directories.
        let hooks = location.hooks(&name);
        if named
            && hooks.exists()
            && let Ok(h) = subtree.reopen_job(&hooks)
        {
            drop(JobGuard(Arc::new(h)));
        }
        if !location.exists() {
            orphan.clear();
            continue;
        }
        let dirs: Vec<&Path> = location.dirs().collect();
        match subtree.reopen_job(&location) {
            Ok(job) if named => {
                tracing::warn!(job = %name, "cleaning up the job of an enforcer that died");
                drop(JobGuard(Arc::new(job)));
                if location.exists() {
                    tracing::error!(job = %name, cgroups = ?dirs, "the cgroups of a dead enforcer's job could not all be removed: its lock is kept for a later run");
                } else {
                    orphan.clear();
                }
            }
            _ => {
                tracing::warn!(job = %name, cgroups = ?dirs, owned = ?subtree.owned(), lock = %orphan.path().display(), "the job of an enforcer that died is outside this enforcer's cgroup subtree: left alone, its lock kept for an enforcer of that subtree");
            }
        }
    }
}

/// Runs `command` as one game of the job the caller is in, in a child
/// cgroup of it (`<job>/game-<n>`) with its own deadline and the limits
/// asked for, clamped to the job's. The game runs as whoever runs it.
pub async fn game(plan: &GamePlan, command: &[String]) -> Result<Outcome, SessionError> {
    let job = Layout::detect()
        .map_err(CgroupError::from)
        .and_then(|l| current_job(&l))
        .map_err(|e| SessionError::Usage(e.to_string()))?;
    let job_name = std::env::var("ENFORCER_JOB").ok();
    game_in_job(plan, job, job_name, command).await
}

/// [`game`] in a given job (the agent's: the job its caller runs in), with
/// the game's command run as `plan.run_as`.
pub async fn game_in_job(
    plan: &GamePlan,
    job: JobCgroup,
    job_name: Option<String>,
    command: &[String],
) -> Result<Outcome, SessionError> {
    let config = &plan.config;
    let job_name = job_name.unwrap_or_else(|| {
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
        memory: clamp(plan.memory.map(|b| b.0), caps.memory_limit).map(ByteSize),
        memory_high: None,
        cpu: plan.cpu,
        cpu_weight: None,
        cpu_idle: false,
        pids: clamp(plan.pids, caps.pids_limit),
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
                return Err(SessionError::Usage(format!(
                    "enforcer game cannot make a game cgroup here: the job runs as uid {} without privileges (enforcer run --user), and only root may create cgroups in it: {e}",
                    nix::unistd::geteuid()
                )));
            }
            Err(e) => {
                return Err(SessionError::Failed(format!(
                    "creating the game cgroup: {e}"
                )));
            }
        }
    }
    let Some((n, game)) = game else {
        return Err(SessionError::Failed(
            "no free game-<n> name in the job".to_owned(),
        ));
    };
    let guard = JobGuard(Arc::new(game));
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
    applied.map_err(|e| SessionError::Failed(format!("applying the game's limits: {e}")))?;
    // The game's hooks run in a sibling of the game inside the job, limited
    // like a job's hooks (the game supervisor is itself a job process).
    let hooks = match &config.on_event {
        None => None,
        Some(_) => {
            let made = job.create_child(&format!("game-{n}-hooks")).and_then(|h| {
                let h = JobGuard(Arc::new(h));
                h.0.apply(&crate::events::hook_limits()).map(|()| h)
            });
            Some(made.map_err(|e| {
                SessionError::Failed(format!("creating the cgroup for the game's hooks: {e}"))
            })?)
        }
    };
    let spec = Supervision {
        name: format!("{job_name}/game-{n}"),
        command: command.to_vec(),
        limits,
        timeout: plan.timeout,
        kill_grace: plan.kill_grace,
        control_period: config.control_period.0,
        on_event: config.on_event.clone(),
        on_event_timeout: config.on_event_timeout.0,
        hooks_cgroup: hooks_files(hooks.as_ref()),
        slice: None,
    };
    let signals = job::Signals::install();
    let started = Instant::now();
    let wall = SystemTime::now();
    let child = job::spawn_into(
        &guard.0,
        command,
        &[],
        plan.env.as_deref(),
        plan.run_as.as_ref(),
        // A game runs in its job's class: the game supervisor, a job
        // process, already passes it on.
        false,
    )
    .map_err(SessionError::Spawn)?;
    let (report, code) = job::supervise(job::Supervised {
        cgroup: guard.0.clone(),
        spec,
        target: job::Target::Spawned(child),
        monitors: default_monitors(),
        signals,
        started,
        started_wall: wall,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    })
    .await;
    drop(guard);
    drop(hooks);
    Ok(Outcome {
        report,
        status: u8::try_from(code).unwrap_or(EXIT_FAILURE),
    })
}

fn is_permission_denied(e: &CgroupError) -> bool {
    let source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    source
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| matches!(io.raw_os_error(), Some(libc::EACCES | libc::EPERM)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_error(kind: std::io::ErrorKind) -> SessionError {
        SessionError::Spawn(JobError::Spawn {
            command: "x".into(),
            user: "root".into(),
            files: String::new(),
            source: std::io::Error::from(kind),
        })
    }

    #[test]
    fn spawn_errors_map_to_the_shell_exit_codes_for_run_and_game_alike() {
        assert_eq!(spawn_error(std::io::ErrorKind::NotFound).exit_code(), 127);
        assert_eq!(
            spawn_error(std::io::ErrorKind::PermissionDenied).exit_code(),
            126
        );
        assert_eq!(spawn_error(std::io::ErrorKind::Other).exit_code(), 125);
        assert_eq!(SessionError::Spawn(JobError::EmptyCommand).exit_code(), 125);
    }

    #[test]
    fn usage_failure_and_signal_errors_map_to_the_documented_codes() {
        assert_eq!(SessionError::Usage("x".into()).exit_code(), 2);
        assert_eq!(SessionError::Failed("x".into()).exit_code(), 125);
        assert_eq!(
            SessionError::Interrupted(libc::SIGTERM).exit_code(),
            128 + 15
        );
    }

    #[test]
    fn a_name_in_use_is_a_usage_error_and_other_cgroup_errors_the_enforcers() {
        let in_use = CgroupError::NameInUse {
            name: "x".into(),
            path: PathBuf::from("/sys/fs/cgroup/x"),
        };
        assert_eq!(SessionError::cgroup("", in_use).exit_code(), EXIT_USAGE);
        let other = CgroupError::Write {
            path: PathBuf::from("/sys/fs/cgroup/x/cpu.max"),
            value: "1".into(),
            source: std::io::Error::from(std::io::ErrorKind::Other),
        };
        let e = SessionError::cgroup("applying", other);
        assert_eq!(e.exit_code(), EXIT_FAILURE);
        assert!(e.to_string().contains("cpu.max"), "{e}");
    }
}
