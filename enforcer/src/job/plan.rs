//! The serialisable form of a job's flags ([`JobRequest`]: exactly what
//! `enforcer run` / `attach` accept, and what a client sends the agent) and
//! the one place they are merged with a config into a checked [`Plan`].

use std::{path::PathBuf, time::SystemTime};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::Limits,
    config::Config,
    gpu::{duty::RunFraction, guard::GpuLimits},
    job::{Supervision, session::Plan},
    units::{ByteSize, Cores, Dur, Percent},
    validate::{self, Checker, Node, Source},
};

/// Limits, deadline and report flags shared by `run` and `attach`; each
/// overrides the config file.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobRequest {
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
    /// CPU weight against the training, 1–10000 (v2 scale; the training's
    /// default is 100): the evaluation slice takes it with `--no-idle` (in
    /// the idle class the weight only ranks jobs among themselves).
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

impl Plan {
    /// The job's plan: `config` merged with the flags of `args`, checked,
    /// before anything is created. The CLI (in-process) and the agent build
    /// plans only here, so that the same flags give the same plan either way.
    pub fn from_request(
        mut config: Config,
        args: &JobRequest,
        command: &[String],
    ) -> Result<Plan, String> {
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
            slice: None,
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
            no_wait: args.no_wait,
            measure_only: args.measure_only,
            live_status: args.progress,
            env: None,
            attach_owner: None,
            external_budget: None,
        })
    }
}

/// Holds the flags against their bounds ([`crate::validate`]); the config
/// was checked when it was read. Runs before anything is created.
fn check_flags(args: &JobRequest, config: &Config) -> Result<(), validate::Refused> {
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
