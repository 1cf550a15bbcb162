//! `enforcer run`: runs a command as an evaluation job, supervising it in the
//! foreground (no daemon needed). Also holds the limit/deadline/report flags
//! that `attach` shares, and the steps both use.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use clap::Args;

use crate::{
    cgroup::{CgroupError, JobCgroup, Limits, Subtree},
    config::Config,
    gpu::{duty::RunFraction, guard::GpuLimits, monitor::GpuMonitor},
    job::{self, JobError, Monitor, RunAs, Supervision, watch::LimitEvents},
    probe::{
        monitor::{StealMonitor, training_cgroup_dir},
        steal::TrainingSpec,
    },
    report::Report,
    slots,
    units::{ByteSize, Cores, Dur, Percent},
    validate::{self, Checker, Node, Source},
};

/// Exit status for usage and config errors.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the enforcer itself failed.
pub const EXIT_FAILURE: u8 = 125;

/// Limits, deadline and report flags shared by `run` and `attach`; each
/// overrides the config file.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Job name (a cgroup directory name; refused if in use). Default:
    /// `run-<pid>-<ms>`.
    #[arg(long)]
    pub job: Option<String>,
    /// Hard memory limit, swap disabled (e.g. `1000M`, `1GiB`; at least
    /// `1MiB`).
    #[arg(long)]
    pub memory: Option<ByteSize>,
    /// Soft memory limit: `memory.high` (v2) / soft limit (v1).
    #[arg(long)]
    pub memory_high: Option<ByteSize>,
    /// CPU quota in CPUs (e.g. `0.5`, `1.5`; at most the node's online
    /// CPUs).
    #[arg(long)]
    pub cpu: Option<Cores>,
    /// CPU weight, 1–10000 (v2 scale, default 100); implies nothing about
    /// the idle class, see `--no-idle`.
    #[arg(long)]
    pub cpu_weight: Option<u64>,
    /// Do not put the job in the idle CPU class (the default is idle:
    /// `cpu.idle`, else the lowest weight).
    #[arg(long)]
    pub no_idle: bool,
    /// Maximum number of tasks in the job (1 to 4194304).
    #[arg(long)]
    pub pids: Option<u64>,
    /// Job deadline (e.g. `300s`, `30m`, at most `365d`); the whole job is
    /// killed then.
    #[arg(long)]
    pub timeout: Option<Dur>,
    /// At the deadline, send SIGTERM to every process of the job and
    /// SIGKILL the whole job this long after (or as soon as it is empty),
    /// e.g. `10s`, at most 1h (config `kill_grace`, default 0s: SIGKILL at
    /// the deadline itself).
    #[arg(long)]
    pub kill_grace: Option<Dur>,
    /// Run the command as this user (name or number; config `user`): with
    /// its groups, no capabilities and `no_new_privs`, so that it can
    /// neither leave its cgroup nor raise its limits. Without it the job
    /// runs as root, and can. `run` only.
    #[arg(long, value_name = "NAME|UID")]
    pub user: Option<String>,
    /// The command's group (name or number; config `group`; default: the
    /// user's primary group, or the uid's number for a uid with no passwd
    /// entry). Needs `--user`.
    #[arg(long, value_name = "NAME|GID")]
    pub group: Option<String>,
    /// Write the JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Shell command run for each job event, with the event JSON on stdin.
    #[arg(long)]
    pub on_event: Option<String>,
    /// Fail at once (exit 125) instead of waiting for a free job slot.
    #[arg(long)]
    pub no_wait: bool,
    /// Config file (default /etc/enforcer/enforcer.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cap on the job's GPU SM utilisation (e.g. `50%`; config
    /// `gpu_util_limit`, default 80%): enforced by freezing the job for part
    /// of each 100 ms period. `100%` measures without capping. Without an
    /// NVIDIA GPU the report's `gpu` is null with the reason.
    #[arg(long)]
    pub gpu_util_limit: Option<Percent>,
    /// GPU memory the job's processes may hold (e.g. `8GiB`; config
    /// `gpu_memory_limit`): over it an event, and after a 2 s grace the job
    /// is killed with `reason: gpu_memory`.
    #[arg(long)]
    pub gpu_memory_limit: Option<ByteSize>,
    /// Run the job only this fraction of each 100 ms period (e.g. `50%`),
    /// freezing it for the rest: a hard share of wall time for any job, GPU
    /// or not (the mechanism behind the GPU cap, which may lower it further).
    #[arg(long)]
    pub duty_cycle: Option<Percent>,
    /// PID of the training workload to protect: the job's steal from its
    /// scheduling is measured with eBPF and held against the budget
    /// (overrides `training.pid`).
    #[arg(long, value_name = "PID")]
    pub protect: Option<i32>,
    /// Also protect the processes the training workload forks
    /// (`training.follow_children`).
    #[arg(long)]
    pub follow_children: bool,
    /// Steal budget: the share of the training workload's CPU time the job
    /// may take, e.g. `5%` (overrides `budget`).
    #[arg(long)]
    pub budget: Option<Percent>,
    /// With `--protect`: measure the job's steal against the budget but do
    /// not hold it (no dynamic quota, no freeze; the job keeps its static
    /// limits).
    #[arg(long)]
    pub measure_only: bool,
    /// With `--protect`: keep the job on every CPU instead of confining it
    /// to the CPUs the training leaves free (config `place_jobs = false`).
    #[arg(long)]
    pub no_placement: bool,
    /// Print a one-line live status on stderr once a second: stolen
    /// fraction over 1 s, 10 s and the job, the budget, the job's CPU use.
    #[arg(long)]
    pub progress: bool,
}

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

/// The configuration and flags, merged and checked.
pub struct Plan {
    pub config: Config,
    /// Who the command runs as; `None`: root.
    pub run_as: Option<RunAs>,
    pub name: String,
    pub limits: Limits,
    pub supervision: Supervision,
    pub gpu: GpuLimits,
    pub duty_cycle: Option<RunFraction>,
}

impl Plan {
    pub fn new(args: &JobArgs, command: &[String]) -> Result<Self, String> {
        let (mut config, _) =
            Config::load_or_default(args.config.as_deref()).map_err(|e| e.to_string())?;
        check_flags(args, &config).map_err(|e| e.to_string())?;
        if let Some(pid) = args.protect {
            config.training.pid = Some(pid);
            config.training.cgroup = None;
        }
        config.training.follow_children |= args.follow_children;
        if args.no_placement {
            config.place_jobs = false;
        }
        if let Some(budget) = args.budget {
            config.budget = budget;
        }
        let name = match &args.job {
            Some(n) => n.clone(),
            None => format!(
                "run-{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            ),
        };
        crate::cgroup::validate_name(&name).map_err(|e| e.to_string())?;
        let limits = Limits {
            memory: Some(args.memory.unwrap_or(config.memory)),
            memory_high: args.memory_high.or(config.memory_high),
            cpu: args.cpu.or(config.cpu).map(Cores::get),
            cpu_weight: args.cpu_weight.or(config.cpu_weight),
            cpu_idle: config.cpu_idle && !args.no_idle,
            pids: Some(args.pids.unwrap_or(config.pids)),
        };
        let kill_grace = args.kill_grace.unwrap_or(config.kill_grace).0;
        let run_as = crate::job::identity::check_run_as(
            args.user.as_deref().or(config.user.as_deref()),
            args.group.as_deref().or(config.group.as_deref()),
        )
        .map_err(|e| e.to_string())?;
        let supervision = Supervision {
            name: name.clone(),
            command: command.to_vec(),
            limits: limits.clone(),
            timeout: args.timeout.unwrap_or(config.timeout).0,
            kill_grace,
            control_period: config.control_period.0,
            on_event: args.on_event.clone().or_else(|| config.on_event.clone()),
            on_event_timeout: config.on_event_timeout.0,
            hooks_cgroup: Vec::new(),
        };
        if let Some(hook) = &supervision.on_event
            && crate::trust::running_as_root()
        {
            crate::trust::check_hook_program(hook)
                .map_err(|e| format!("refusing the on_event hook {hook:?}: {e}"))?;
        }
        let gpu_util = args
            .gpu_util_limit
            .unwrap_or(config.gpu_util_limit)
            .fraction();
        let duty_cycle = args.duty_cycle.map(|f| RunFraction::new(f.fraction()));
        let gpu = GpuLimits {
            // At 100 % the cap can never bind: measure only.
            util_limit_pct: (gpu_util < 1.0).then_some(gpu_util * 100.0),
            memory_limit_bytes: args
                .gpu_memory_limit
                .or(config.gpu_memory_limit)
                .map(|b| b.0),
            ..GpuLimits::default()
        };
        Ok(Plan {
            config,
            run_as,
            name,
            limits,
            supervision,
            gpu,
            duty_cycle,
        })
    }
}

/// Holds the flags against their bounds ([`crate::validate`]); the config
/// was checked when it was read. Runs before anything is created.
fn check_flags(args: &JobArgs, config: &Config) -> Result<(), validate::Refused> {
    let mut v = Checker::new(Source::Flags, Node::detect());
    v.check(&validate::MEMORY, args.memory);
    v.check(&validate::MEMORY_HIGH, args.memory_high);
    v.check(&validate::CPU, args.cpu);
    v.check(&validate::CPU_WEIGHT, args.cpu_weight);
    v.check(&validate::PIDS, args.pids);
    v.check(&validate::JOB_TIMEOUT, args.timeout);
    v.check(&validate::KILL_GRACE, args.kill_grace);
    v.check(&validate::BUDGET, args.budget);
    v.check(&validate::GPU_UTIL_LIMIT, args.gpu_util_limit);
    v.check(&validate::GPU_MEMORY, args.gpu_memory_limit);
    v.check(&validate::DUTY_CYCLE, args.duty_cycle);
    v.check(&validate::TRAINING_PID, args.protect.map(i64::from));
    v.non_empty(
        validate::ON_EVENT,
        args.on_event.as_deref(),
        "leave the flag out to run no hook",
    );
    if args.memory.is_some() || args.memory_high.is_some() {
        v.high_at_most_max(
            args.memory_high.or(config.memory_high),
            args.memory_high.is_some(),
            Some(args.memory.unwrap_or(config.memory)),
        );
    }
    v.finish()
}

/// Kills and removes the job cgroup however the command ends (also on an
/// early return or a panic), so that no job outlives the enforcer and no
/// empty cgroup is left behind.
pub struct JobGuard(pub JobCgroup);

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

/// Runs `job` to completion on a one-thread runtime and returns its exit
/// status (EXIT_FAILURE when the runtime cannot start).
///
/// One thread: the child's PR_SET_PDEATHSIG is tied to the thread that
/// forked it, which must live as long as the job.
pub fn block_on<T: From<u8>>(job: impl std::future::Future<Output = T>) -> T {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(job),
        Err(e) => {
            tracing::error!(error = %e, "starting the async runtime failed");
            T::from(EXIT_FAILURE)
        }
    }
}

/// The monitors a job gets. The steal meter, the budget controller and the
/// GPU guard are added here, built from the config (`training`, `budget`,
/// `gpu_*`); each one that cannot start is logged and left out by the
/// supervisor, never failing the job.
pub fn default_monitors(_config: &Config) -> Vec<Box<dyn Monitor>> {
    vec![Box::new(LimitEvents::default())]
}

/// How long the training is watched before a protected job starts, to place
/// the job on the CPUs it leaves free (see `budget::placement`).
const PLACEMENT_WATCH: Duration = Duration::from_millis(400);

/// The monitors of a `run` or `attach` job: the defaults plus the steal
/// meter (null-safe: without a training workload or probes it only fills
/// the report's `unavailable` reasons), with a training workload the budget
/// loop fed by it (`progress` is the training's progress tracker learned
/// before the job, [`crate::budget::learn_before_job`]), and the GPU guard
/// (null-safe too).
pub fn job_monitors(
    plan: &Plan,
    args: &JobArgs,
    progress: Option<crate::budget::ProgressTracker>,
) -> Vec<Box<dyn Monitor>> {
    let t = &plan.config.training;
    let training = match (t.pid, &t.cgroup) {
        (Some(pid), _) => u32::try_from(pid).ok().map(|pid| TrainingSpec::Pid {
            pid,
            follow_children: t.follow_children,
        }),
        (None, Some(dir)) => Some(TrainingSpec::Cgroup(training_cgroup_dir(dir))),
        (None, None) => None,
    };
    let mut monitors = default_monitors(&plan.config);
    let feed = crate::budget::StealFeed::new();
    let protect = training.is_some();
    let mut steal = StealMonitor::new(training, plan.config.budget.fraction(), args.progress)
        .with_feed(feed.clone());
    let hold = protect && !args.measure_only;
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
    // The steal monitor ticks first: the loop reads this tick's counters.
    monitors.push(Box::new(steal));
    if hold {
        monitors.push(Box::new(
            crate::budget::BudgetMonitor::for_job(&plan.config, feed, progress)
                .with_training_history(history),
        ));
    }
    // The GPU guard and duty cycle (games run inside a job that already has
    // them).
    monitors.push(Box::new(GpuMonitor::new(plan.gpu, plan.duty_cycle)));
    monitors
}

pub fn exit_for_cgroup_error(e: &CgroupError) -> u8 {
    match e {
        CgroupError::NameInUse { .. } | CgroupError::BadName { .. } => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}

/// Writes the report file (if asked) and the summary.
pub fn finish_report(report: &Report, path: Option<&Path>) -> bool {
    eprint!("{}", report.summary());
    if let Some(p) = path
        && let Err(e) = report.write_json(p)
    {
        tracing::error!(path = %p.display(), error = %e, "writing the report failed");
        return false;
    }
    true
}

pub fn run(args: RunArgs) -> ExitCode {
    let plan = match Plan::new(&args.job, &args.command) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    ExitCode::from(block_on(run_async(plan, &args)))
}

/// [`start_job`], abandoned (exit 128+N) if signal N arrives meanwhile,
/// e.g. while waiting for a slot.
pub async fn start_or_interrupt(
    plan: &Plan,
    no_wait: bool,
    signals: &mut job::Signals,
) -> Result<Started, u8> {
    tokio::select! {
        r = start_job(plan, no_wait) => r,
        sig = signals.any() => {
            tracing::warn!(signal = sig, job = %plan.name, "interrupted before the job started");
            Err(u8::try_from(128 + sig).unwrap_or(EXIT_FAILURE))
        }
    }
}

/// A job cgroup made and limited, with the slot and the ownership lock it
/// holds; dropping it (after the job) kills, removes and releases all.
pub struct Started {
    // Field order is drop order: the cgroups go before the lock and slot.
    pub guard: JobGuard,
    /// The cgroup the job's `on_event` hooks run in, when it has a hook.
    pub hooks: Option<JobGuard>,
    _lock: slots::JobLock,
    _slot: slots::Slot,
}

impl Started {
    /// `plan`'s supervision, with the hooks put in the hooks cgroup.
    pub fn supervision(&self, plan: &Plan) -> Supervision {
        let mut s = plan.supervision.clone();
        s.hooks_cgroup = self
            .hooks
            .as_ref()
            .map(|h| h.0.join_files())
            .unwrap_or_default();
        s
    }

    /// Releases the slot and the lock but neither kills nor removes the job
    /// cgroup: for a process that must not be killed (one that is not the
    /// job's after all). The cgroup stays, with its limits, until it is
    /// empty and removed by hand.
    pub fn leave_unkilled(self) {
        let Started {
            guard,
            hooks,
            _lock,
            _slot,
        } = self;
        drop(hooks);
        std::mem::forget(guard);
    }
}

/// Opens the state directory, waits for a slot, cleans up orphans of dead
/// enforcers, takes the job's lock (recording where its cgroups go),
/// creates the job cgroup and applies the limits. Errors are logged and
/// returned as the exit status; a bad `state_dir` is one (exit 2) before
/// any cgroup is touched.
pub async fn start_job(plan: &Plan, no_wait: bool) -> Result<Started, u8> {
    let cfg = &plan.config;
    let slot_failed = |e: slots::SlotError| {
        tracing::error!("{e}");
        if e.is_usage() {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        }
    };
    let state = slots::StateDir::open(&cfg.state_dir).map_err(slot_failed)?;
    let max = cfg.max_concurrent_jobs.get();
    let slot = slots::acquire(&state, max, no_wait, |pos, len| {
        tracing::info!(job = %plan.name, position = pos + 1, queued = len, max, "waiting for slot");
    })
    .await
    .map_err(slot_failed)?;
    let cgroup_failed = |e: CgroupError| {
        tracing::error!("{e}");
        exit_for_cgroup_error(&e)
    };
    let subtree = Subtree::open(cfg.cgroup_root.as_deref()).map_err(cgroup_failed)?;
    clean_orphans(&state, &subtree);
    let record = slots::JobRecord {
        job: plan.name.clone(),
        enforcer_pid: std::process::id(),
        cgroups: subtree.job_location(&plan.name).map_err(cgroup_failed)?,
    };
    let lock = slots::lock_job(&state, &record).map_err(slot_failed)?;
    let guard = JobGuard(subtree.create_job(&plan.name).map_err(cgroup_failed)?);
    if let Err(e) = guard.0.apply(&plan.limits) {
        tracing::error!("applying the job's limits: {e}");
        return Err(EXIT_FAILURE);
    }
    if let Err(e) = subtree.set_slice_idle(plan.limits.cpu_idle) {
        tracing::error!("setting the evaluation slice's CPU class: {e}");
        return Err(EXIT_FAILURE);
    }
    // Hooks run as root: never unconfined, so no hooks cgroup, no job.
    let hooks = match &plan.supervision.on_event {
        None => None,
        Some(_) => {
            let hooks = JobGuard(subtree.create_hooks(&plan.name).map_err(|e| {
                tracing::error!("creating the cgroup for the job's hooks: {e}");
                exit_for_cgroup_error(&e)
            })?);
            if let Err(e) = hooks.0.apply(&crate::events::hook_limits()) {
                tracing::error!("limiting the cgroup for the job's hooks: {e}");
                return Err(EXIT_FAILURE);
            }
            Some(hooks)
        }
    };
    Ok(Started {
        guard,
        hooks,
        _lock: lock,
        _slot: slot,
    })
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
            drop(JobGuard(h));
        }
        if !location.exists() {
            orphan.clear();
            continue;
        }
        let dirs: Vec<&Path> = location.dirs().collect();
        match subtree.reopen_job(&location) {
            Ok(job) if named => {
                tracing::warn!(job = %name, "cleaning up the job of an enforcer that died");
                drop(JobGuard(job));
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

async fn run_async(plan: Plan, args: &RunArgs) -> u8 {
    let mut signals = job::Signals::install();
    let started_job = match start_or_interrupt(&plan, args.job.no_wait, &mut signals).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let guard = &started_job.guard;
    // With a training progress file, its job-free step rate is learned now,
    // before the command starts (a few seconds, blocking: nothing else runs
    // yet).
    let progress = crate::budget::learn_before_job(&plan.config);
    let monitors = job_monitors(&plan, &args.job, progress);
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
    let child = match job::spawn_into(&guard.0, &args.command, &envs, plan.run_as.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return match &e {
                JobError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    127
                }
                JobError::Spawn { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    126
                }
                _ => EXIT_FAILURE,
            };
        }
    };
    let (mut report, code) = job::supervise(
        &guard.0,
        &started_job.supervision(&plan),
        job::Target::Spawned(child),
        monitors,
        signals,
        started,
        started_wall,
    )
    .await;
    report.uid = Some(plan.run_as.as_ref().map_or(0, |r| r.uid));
    report.gid = Some(plan.run_as.as_ref().map_or(0, |r| r.gid));
    drop(started_job);
    if !finish_report(&report, args.job.report.as_deref()) {
        return EXIT_FAILURE;
    }
    u8::try_from(code).unwrap_or(EXIT_FAILURE)
}
