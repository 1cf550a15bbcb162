//! The agent's Prometheus endpoint: `GET /metrics` in the text exposition
//! format 0.0.4, on the loopback address of `agent.metrics_listen` (or
//! `--metrics-listen`); off by default.
//!
//! It measures nothing of its own: a scrape is a [`Scrape`] of what the
//! agent already holds (its job table, the node budget's status and
//! meters, each running job's cgroup stats through the cgroup layer, the
//! agent's own counters in [`AgentCounters`]), rendered by [`render`]. The
//! metric names are declared once, in [`FAMILIES`]; the Grafana dashboard in
//! `deploy/` uses only those (a unit test holds it to them).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    budget::node::{JobStealFigures, TrainingStatus},
    cgroup::Stats,
    probe::node::MeterHealth,
};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A request head larger than this is refused (a scrape's is ~200 bytes).
const MAX_HEAD: usize = 8192;
/// A client that has not sent its request head by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes answered at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 8;

/// A metric's type, as in its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: its name, type and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn family(name: &'static str, kind: Kind, help: &'static str) -> Family {
    Family { name, kind, help }
}

use Kind::{Counter, Gauge};

pub const BUILD_INFO: Family = family(
    "enforcer_build_info",
    Gauge,
    "The agent's version, as a label; always 1.",
);
pub const JOBS: Family = family(
    "enforcer_jobs",
    Gauge,
    "Jobs the agent knows, by state (finished ones until keep_finished).",
);
pub const JOB_MEMORY: Family = family(
    "enforcer_job_memory_bytes",
    Gauge,
    "Memory the job's cgroup uses now.",
);
pub const JOB_MEMORY_PEAK: Family = family(
    "enforcer_job_memory_peak_bytes",
    Gauge,
    "The kernel's high-water mark of the job's memory.",
);
pub const JOB_MEMORY_LIMIT: Family = family(
    "enforcer_job_memory_limit_bytes",
    Gauge,
    "The job's hard memory limit (absent when unlimited).",
);
pub const JOB_OOM_KILLS: Family = family(
    "enforcer_job_oom_kills_total",
    Counter,
    "Processes of the job killed by the OOM killer.",
);
pub const JOB_CPU: Family = family(
    "enforcer_job_cpu_seconds_total",
    Counter,
    "CPU time of the job's cgroup.",
);
pub const JOB_THROTTLED: Family = family(
    "enforcer_job_cpu_throttled_seconds_total",
    Counter,
    "Time the job's tasks were throttled by its CPU quota.",
);
pub const JOB_THROTTLED_PERIODS: Family = family(
    "enforcer_job_cpu_throttled_periods_total",
    Counter,
    "CFS periods in which the job was throttled.",
);
pub const JOB_STEAL: Family = family(
    "enforcer_job_steal_seconds_total",
    Counter,
    "Run-queue wait of the protected training's threads while the job ran, since the job joined the training's budget.",
);
pub const JOB_BUDGET: Family = family(
    "enforcer_job_budget_fraction",
    Gauge,
    "The steal budget of the training the job protects, a fraction of the training's CPU time.",
);
pub const JOB_STOLEN: Family = family(
    "enforcer_job_stolen_ratio",
    Gauge,
    "The job's steal over its protected training's CPU time, over the last 10s (window 10s, the budget's horizon) and since it joined the budget (window job).",
);
pub const JOB_BUDGET_USED: Family = family(
    "enforcer_job_budget_used_ratio",
    Gauge,
    "Budget the job used: the larger of its training's worst 10s stolen fraction while the job ran and the job's own since it joined (its report's budget_used).",
);
pub const JOB_GPU_UTILIZATION: Family = family(
    "enforcer_job_gpu_utilization_ratio",
    Gauge,
    "SM utilisation of the job's processes on each GPU since the previous scrape (absent without GPU telemetry or before NVML sampled them).",
);
pub const JOB_GPU_MEMORY: Family = family(
    "enforcer_job_gpu_memory_bytes",
    Gauge,
    "GPU memory the job's processes use on each GPU (absent without GPU telemetry).",
);
pub const JOB_QUOTA: Family = family(
    "enforcer_job_cpu_quota_cores",
    Gauge,
    "The CPU quota the node budget wants for the job, in cores (absent: no quota from the budget).",
);
pub const JOB_FROZEN: Family = family(
    "enforcer_job_frozen",
    Gauge,
    "1 while the node budget wants the job frozen.",
);
pub const TRAINING_BUDGET: Family = family(
    "enforcer_training_budget_fraction",
    Gauge,
    "The training's steal budget, a fraction of its CPU time.",
);
pub const TRAINING_STOLEN: Family = family(
    "enforcer_training_stolen_fraction",
    Gauge,
    "Fraction of the training's CPU time its jobs stole together, over the window (10s: the budget's horizon).",
);
pub const TRAINING_OVER_BUDGET: Family = family(
    "enforcer_training_over_budget_seconds_total",
    Counter,
    "Time the training's 1 s stolen fraction spent over its budget.",
);
pub const TRAINING_SLOWDOWN: Family = family(
    "enforcer_training_slowdown_ratio",
    Gauge,
    "The training's step time now over its step time without jobs, from its progress file (absent until known).",
);
pub const TRAINING_QUOTA: Family = family(
    "enforcer_training_cpu_quota_cores",
    Gauge,
    "Cores the training's budget allows its jobs together (absent: unlimited).",
);
pub const TRAINING_JOBS: Family = family(
    "enforcer_training_jobs",
    Gauge,
    "Jobs under the training's budget.",
);
pub const TRAINING_PHASE: Family = family(
    "enforcer_training_phase",
    Gauge,
    "1 for the phase the training's budget loop is in, 0 for the others.",
);
pub const GPU_TELEMETRY: Family = family(
    "enforcer_gpu_telemetry_available",
    Gauge,
    "1 when the agent reads per-job GPU telemetry (NVML works and sees a GPU), else 0 and the per-job GPU series are absent.",
);
pub const PROBE_METERS: Family = family(
    "enforcer_probe_meters",
    Gauge,
    "Sets of steal programs attached: 1 while any training is metered (one for the node), else 0.",
);
pub const PROBE_OVERFLOW: Family = family(
    "enforcer_probe_overflow_total",
    Counter,
    "Events a steal meter could not count, by kind (all zero on a healthy node).",
);
pub const PROBE_RUNS: Family = family(
    "enforcer_probe_runs_total",
    Counter,
    "Runs of each steal program (only while kernel.bpf_stats_enabled is 1).",
);
pub const PROBE_RUN_TIME: Family = family(
    "enforcer_probe_run_seconds_total",
    Counter,
    "Time spent in each steal program (only while kernel.bpf_stats_enabled is 1).",
);
pub const PROBE_COST: Family = family(
    "enforcer_probe_cost_seconds_per_event",
    Gauge,
    "Mean time per run of each steal program since it was loaded (only while kernel.bpf_stats_enabled is 1).",
);
pub const LOOP_LAG: Family = family(
    "enforcer_control_loop_lag_seconds",
    Kind::Histogram,
    "How late the agent's control loop ticks are against their schedule.",
);
pub const REQUESTS: Family = family(
    "enforcer_requests_total",
    Counter,
    "API requests received, by type (malformed: not a request).",
);
pub const REFUSED: Family = family(
    "enforcer_requests_refused_total",
    Counter,
    "API requests refused or failed, by type.",
);
pub const PROCESS_RSS: Family = family(
    "process_resident_memory_bytes",
    Gauge,
    "Resident memory of the agent process.",
);
pub const PROCESS_CPU: Family = family(
    "process_cpu_seconds_total",
    Counter,
    "User and system CPU time of the agent process.",
);
pub const PROCESS_FDS: Family = family(
    "process_open_fds",
    Gauge,
    "Open file descriptors of the agent process.",
);

/// Every family the agent exports, in the order of a scrape.
pub const FAMILIES: &[Family] = &[
    BUILD_INFO,
    JOBS,
    JOB_MEMORY,
    JOB_MEMORY_PEAK,
    JOB_MEMORY_LIMIT,
    JOB_OOM_KILLS,
    JOB_CPU,
    JOB_THROTTLED,
    JOB_THROTTLED_PERIODS,
    JOB_STEAL,
    JOB_BUDGET,
    JOB_STOLEN,
    JOB_BUDGET_USED,
    JOB_GPU_UTILIZATION,
    JOB_GPU_MEMORY,
    JOB_QUOTA,
    JOB_FROZEN,
    TRAINING_BUDGET,
    TRAINING_STOLEN,
    TRAINING_OVER_BUDGET,
    TRAINING_SLOWDOWN,
    TRAINING_QUOTA,
    TRAINING_JOBS,
    TRAINING_PHASE,
    GPU_TELEMETRY,
    PROBE_METERS,
    PROBE_OVERFLOW,
    PROBE_RUNS,
    PROBE_RUN_TIME,
    PROBE_COST,
    LOOP_LAG,
    REQUESTS,
    REFUSED,
    PROCESS_RSS,
    PROCESS_CPU,
    PROCESS_FDS,
];

/// The request types of the API (and `malformed`), shown from zero so that
/// a rate over them exists before the first of each.
pub const REQUEST_TYPES: &[&str] = &[
    "hello",
    "run",
    "attach",
    "game",
    "protect",
    "status",
    "report",
    "cancel",
    "subscribe",
    "wait",
    "malformed",
];

/// The phases of a training's budget loop, as `status` names them.
pub const PHASES: &[&str] = &["regulating", "overspending", "experimenting", "frozen"];

/// Upper bounds of the control-loop lag buckets, seconds.
pub const LAG_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A cumulative histogram over [`LAG_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or under each bound (not cumulative here).
    buckets: [u64; LAG_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = LAG_BUCKETS.iter().position(|&b| seconds <= b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// What the agent counts for the endpoint: requests, refusals and the
/// control loop's lateness. Cheap to update from the socket handlers.
#[derive(Debug, Default)]
pub struct AgentCounters {
    inner: Mutex<Counts>,
}

/// A copy of [`AgentCounters`] at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: BTreeMap<String, u64>,
    pub refused: BTreeMap<String, u64>,
    pub lag: Histogram,
}

impl AgentCounters {
    /// A request of type `kind` arrived (`malformed`: a line that is none).
    pub fn request(&self, kind: &str) {
        if let Ok(mut c) = self.inner.lock() {
            *c.requests.entry(kind.to_owned()).or_default() += 1;
        }
    }

    /// A request of type `kind` was refused or failed.
    pub fn refused(&self, kind: &str) {
        if let Ok(mut c) = self.inner.lock() {
            *c.refused.entry(kind.to_owned()).or_default() += 1;
        }
    }

    /// A control-loop tick ran `lag` after its scheduled time.
    pub fn tick_lag(&self, lag: Duration) {
        if let Ok(mut c) = self.inner.lock() {
            c.lag.observe(lag.as_secs_f64());
        }
    }

    pub fn snapshot(&self) -> Counts {
        self.inner.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// One job as a scrape sees it.
#[derive(Debug, Clone, Default)]
pub struct JobSample {
    pub id: String,
    /// The caller that started it.
    pub uid: u32,
    /// The training it protects, if any.
    pub training: Option<String>,
    pub running: bool,
    /// Its training's budget, when it protects one.
    pub budget_fraction: Option<f64>,
    /// The node budget's latest wish for it.
    pub quota_cores: Option<f64>,
    pub frozen: bool,
    /// Its cgroup's counters; `None` when it has ended or its cgroup is
    /// not there (yet).
    pub stats: Option<Stats>,
    /// Its steal figures, while it is under a metered budget.
    pub steal: Option<JobStealFigures>,
    /// Its use of each GPU it is on; empty without GPU telemetry.
    pub gpu: Vec<JobGpuSample>,
}

/// One job's use of one GPU, at one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobGpuSample {
    /// The device's NVML index.
    pub device: u32,
    /// SM utilisation, a fraction; `None` when NVML took no new sample.
    pub utilization: Option<f64>,
    pub memory_bytes: u64,
}

/// The agent process's own resources.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
}

impl ProcessSample {
    /// Reads this process's counters from /proc.
    pub fn read() -> Self {
        let proc = enforcer_host::ProcFs::new();
        let me = enforcer_host::Pid::this_process();
        // SAFETY: sysconf reads a constant of the C library.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let cpu_seconds = proc
            .stat(me)
            .ok()
            .filter(|_| hz > 0)
            .map(|s| s.cpu_ticks as f64 / hz as f64);
        ProcessSample {
            rss_bytes: proc.self_status().ok().and_then(|s| s.rss_bytes),
            cpu_seconds,
            open_fds: proc.fd_count(me).ok(),
        }
    }
}

/// Everything one scrape shows, read from the agent's state.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub jobs: Vec<JobSample>,
    pub trainings: Vec<TrainingStatus>,
    /// The uid that registered each training.
    pub training_owners: BTreeMap<String, u32>,
    pub meters: Vec<MeterHealth>,
    /// Whether per-job GPU telemetry is read on this node.
    pub gpu_telemetry: bool,
    /// Whether the meters' program stats were read (bpf stats enabled).
    pub program_stats: bool,
    pub counts: Counts,
    pub process: ProcessSample,
}

/// Whether the kernel accounts BPF programs' run time now
/// (`kernel.bpf_stats_enabled`); the agent never turns it on itself: it
/// costs every program run on the node.
pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// Writes families in the text format: a family's `# HELP` and `# TYPE`
/// lines come with its first sample, so a family without samples is left
/// out.
struct Writer {
    out: String,
}

type Labels<'a> = &'a [(&'static str, &'a str)];

impl Writer {
    fn header(&mut self, f: &Family) {
        let _ = writeln!(self.out, "# HELP {} {}", f.name, escape_help(f.help));
        let _ = writeln!(self.out, "# TYPE {} {}", f.name, f.kind.name());
    }

    /// Writes a gauge or counter family from its samples.
    fn family<'a>(
        &mut self,
        f: &Family,
        samples: impl IntoIterator<Item = (Vec<(&'static str, &'a str)>, f64)>,
    ) {
        let mut first = true;
        for (labels, value) in samples {
            if first {
                self.header(f);
                first = false;
            }
            self.sample(f.name, &labels, value);
        }
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&number(value));
        self.out.push('\n');
    }

    fn histogram(&mut self, f: &Family, h: &Histogram) {
        self.header(f);
        let bucket = format!("{}_bucket", f.name);
        let mut cumulative = 0;
        for (bound, n) in LAG_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            let le = number(*bound);
            self.sample(&bucket, &[("le", le.as_str())], cumulative as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{}_sum", f.name), &[], h.sum);
        self.sample(&format!("{}_count", f.name), &[], h.count as f64);
    }
}

/// A sample value as the format spells it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        String::from(if v > 0.0 { "+Inf" } else { "-Inf" })
    } else {
        v.to_string()
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Renders a scrape in the text exposition format 0.0.4.
pub fn render(s: &Scrape) -> String {
    let mut w = Writer { out: String::new() };
    let version = env!("CARGO_PKG_VERSION");
    w.family(&BUILD_INFO, [(vec![("version", version)], 1.0)]);
    let running = s.jobs.iter().filter(|j| j.running).count();
    w.family(
        &JOBS,
        [
            (vec![("state", "running")], running as f64),
            (vec![("state", "finished")], (s.jobs.len() - running) as f64),
        ],
    );

    let uids: Vec<String> = s.jobs.iter().map(|j| j.uid.to_string()).collect();
    let job_labels = |i: usize| {
        let j = &s.jobs[i];
        vec![
            ("job_id", j.id.as_str()),
            ("training", j.training.as_deref().unwrap_or("")),
            ("user", uids[i].as_str()),
        ]
    };
    let live: Vec<usize> = (0..s.jobs.len()).filter(|&i| s.jobs[i].running).collect();
    let stat = |f: fn(&Stats) -> Option<f64>| {
        live.iter()
            .filter_map(|&i| Some((job_labels(i), f(s.jobs[i].stats.as_ref()?)?)))
            .collect::<Vec<_>>()
    };
    w.family(&JOB_MEMORY, stat(|st| st.memory_current.map(|v| v as f64)));
    w.family(
        &JOB_MEMORY_PEAK,
        stat(|st| st.memory_peak.map(|v| v as f64)),
    );
    w.family(
        &JOB_MEMORY_LIMIT,
        stat(|st| st.memory_limit.map(|v| v as f64)),
    );
    w.family(&JOB_OOM_KILLS, stat(|st| st.oom_kills.map(|v| v as f64)));
    w.family(&JOB_CPU, stat(|st| st.cpu_usage.map(|d| d.as_secs_f64())));
    w.family(
        &JOB_THROTTLED,
        stat(|st| st.cpu_throttled.map(|d| d.as_secs_f64())),
    );
    w.family(
        &JOB_THROTTLED_PERIODS,
        stat(|st| st.cpu_throttled_periods.map(|v| v as f64)),
    );
    let steal: BTreeMap<&str, f64> = s
        .trainings
        .iter()
        .flat_map(|t| t.jobs.iter().map(|j| (j.job.as_str(), j.steal_s)))
        .collect();
    w.family(
        &JOB_STEAL,
        live.iter()
            .filter_map(|&i| Some((job_labels(i), *steal.get(s.jobs[i].id.as_str())?))),
    );
    w.family(
        &JOB_BUDGET,
        live.iter()
            .filter_map(|&i| Some((job_labels(i), s.jobs[i].budget_fraction?))),
    );
    w.family(
        &JOB_STOLEN,
        live.iter().flat_map(|&i| {
            let f = s.jobs[i].steal.as_ref();
            [
                ("10s", f.and_then(|f| f.stolen_fraction_window)),
                ("job", f.and_then(|f| f.stolen_fraction)),
            ]
            .into_iter()
            .filter_map(move |(window, v)| {
                let mut labels = job_labels(i);
                labels.push(("window", window));
                Some((labels, v?))
            })
        }),
    );
    w.family(
        &JOB_BUDGET_USED,
        live.iter()
            .filter_map(|&i| Some((job_labels(i), s.jobs[i].steal.as_ref()?.budget_used?))),
    );
    let devices: Vec<Vec<String>> = s
        .jobs
        .iter()
        .map(|j| j.gpu.iter().map(|g| g.device.to_string()).collect())
        .collect();
    let devices = &devices;
    let job_labels = &job_labels;
    let per_gpu = |f: fn(&JobGpuSample) -> Option<f64>| {
        live.iter()
            .filter(|_| s.gpu_telemetry)
            .flat_map(|&i| {
                s.jobs[i].gpu.iter().enumerate().filter_map(move |(d, g)| {
                    let mut labels = job_labels(i);
                    labels.push(("gpu", devices[i][d].as_str()));
                    Some((labels, f(g)?))
                })
            })
            .collect::<Vec<_>>()
    };
    w.family(&JOB_GPU_UTILIZATION, per_gpu(|g| g.utilization));
    w.family(&JOB_GPU_MEMORY, per_gpu(|g| Some(g.memory_bytes as f64)));
    w.family(
        &JOB_QUOTA,
        live.iter()
            .filter_map(|&i| Some((job_labels(i), s.jobs[i].quota_cores?))),
    );
    w.family(
        &JOB_FROZEN,
        live.iter()
            .filter(|&&i| s.jobs[i].training.is_some())
            .map(|&i| (job_labels(i), f64::from(u8::from(s.jobs[i].frozen)))),
    );

    let owners: Vec<String> = s
        .trainings
        .iter()
        .map(|t| {
            s.training_owners
                .get(&t.training)
                .map(u32::to_string)
                .unwrap_or_default()
        })
        .collect();
    let training_labels = |i: usize| {
        vec![
            ("training", s.trainings[i].training.as_str()),
            ("user", owners[i].as_str()),
        ]
    };
    let per_training = |f: fn(&TrainingStatus) -> Option<f64>| {
        (0..s.trainings.len())
            .filter_map(|i| Some((training_labels(i), f(&s.trainings[i])?)))
            .collect::<Vec<_>>()
    };
    w.family(&TRAINING_BUDGET, per_training(|t| Some(t.budget)));
    w.family(
        &TRAINING_STOLEN,
        (0..s.trainings.len()).flat_map(|i| {
            let t = &s.trainings[i];
            [("10s", t.used), ("1s", t.used_recent)]
                .into_iter()
                .filter_map(move |(window, v)| {
                    let mut labels = training_labels(i);
                    labels.push(("window", window));
                    Some((labels, v?))
                })
        }),
    );
    w.family(
        &TRAINING_OVER_BUDGET,
        per_training(|t| Some(t.over_budget_s)),
    );
    w.family(&TRAINING_SLOWDOWN, per_training(|t| t.slowdown));
    w.family(&TRAINING_QUOTA, per_training(|t| t.quota_cores));
    w.family(&TRAINING_JOBS, per_training(|t| Some(t.jobs.len() as f64)));
    w.family(
        &TRAINING_PHASE,
        (0..s.trainings.len()).flat_map(|i| {
            PHASES.iter().map(move |&phase| {
                let mut labels = training_labels(i);
                labels.push(("phase", phase));
                let on = s.trainings[i].phase == phase;
                (labels, f64::from(u8::from(on)))
            })
        }),
    );

    w.family(
        &GPU_TELEMETRY,
        [(vec![], f64::from(u8::from(s.gpu_telemetry)))],
    );
    // One set of programs for the node, loaded while any training is metered.
    w.family(
        &PROBE_METERS,
        [(vec![], f64::from(u8::from(!s.meters.is_empty())))],
    );
    w.family(
        &PROBE_OVERFLOW,
        s.meters.iter().flat_map(|m| {
            let o = m.overflow;
            [
                ("threads_dropped", o.threads_dropped),
                ("cpu_out_of_range", o.cpu_out_of_range),
                ("waiter_underflow", o.waiter_underflow),
                ("job_cgroups_dropped", o.job_cgroups_dropped),
            ]
            .into_iter()
            .map(move |(kind, n)| {
                (
                    vec![("training", m.training.as_str()), ("kind", kind)],
                    n as f64,
                )
            })
        }),
    );
    let programs = move || {
        s.meters
            .iter()
            .filter(move |_| s.program_stats)
            .flat_map(|m| {
                m.programs
                    .iter()
                    .map(move |p| (vec![("program", p.name)], p))
            })
    };
    w.family(
        &PROBE_RUNS,
        programs().map(|(l, p)| (l, p.run_count as f64)),
    );
    w.family(
        &PROBE_RUN_TIME,
        programs().map(|(l, p)| (l, p.run_time_ns as f64 / 1e9)),
    );
    w.family(
        &PROBE_COST,
        programs()
            .filter(|(_, p)| p.run_count > 0)
            .map(|(l, p)| (l, p.run_time_ns as f64 / 1e9 / p.run_count as f64)),
    );

    w.histogram(&LOOP_LAG, &s.counts.lag);
    w.family(&REQUESTS, by_type(&s.counts.requests));
    w.family(&REFUSED, by_type(&s.counts.refused));
    let p = s.process;
    w.family(&PROCESS_RSS, p.rss_bytes.map(|v| (vec![], v as f64)));
    w.family(&PROCESS_CPU, p.cpu_seconds.map(|v| (vec![], v)));
    w.family(&PROCESS_FDS, p.open_fds.map(|v| (vec![], v as f64)));
    w.out
}

/// Samples of a counter by request type, every type of
/// [`REQUEST_TYPES`] included.
fn by_type(counts: &BTreeMap<String, u64>) -> Vec<(Vec<(&'static str, &str)>, f64)> {
    let mut all: BTreeMap<&str, u64> = REQUEST_TYPES.iter().map(|t| (*t, 0)).collect();
    all.extend(counts.iter().map(|(k, n)| (k.as_str(), *n)));
    all.into_iter()
        .map(|(k, n)| (vec![("type", k)], n as f64))
        .collect()
}

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes an HTTP/1.x request head (its request line decides).
fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head_only: false },
        ("HEAD", "/metrics") => Route::Metrics { head_only: true },
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

/// Where the request head ends, if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// Binds the endpoint (before the agent says it listens, so that a busy
/// port is an error at start).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// What renders a scrape: the agent's state, read at each request.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` until the runtime ends.
pub async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let render = render.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &render).await {
                        tracing::debug!(%error, "a metrics request failed");
                    }
                    drop(slot);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads until the end of the request head; `None` when the client closed
/// first or the head is too large.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(buf) {
            return Ok(Some(end));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request head"))?;
    let route = match head? {
        Some(end) => route(&buf[..end]),
        None => Route::BadRequest,
    };
    let (status, extra, body, head_only) = match route {
        Route::Metrics { head_only } => ("200 OK", "", render(), head_only),
        Route::NotFound => (
            "404 Not Found",
            "",
            "only /metrics is served\n".to_owned(),
            false,
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            "only GET and HEAD are served\n".to_owned(),
            false,
        ),
        Route::BadRequest => ("400 Bad Request", "", "bad request\n".to_owned(), false),
    };
    let content_type = if matches!(route, Route::Metrics { .. }) {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::node::JobShareStatus;

    fn full_scrape() -> Scrape {
        let stats = Stats {
            cpu_usage: Some(Duration::from_millis(1500)),
            cpu_throttled: Some(Duration::from_millis(250)),
            cpu_throttled_periods: Some(7),
            memory_current: Some(4096),
            memory_peak: Some(8192),
            memory_limit: Some(1 << 30),
            oom_kills: Some(0),
            ..Stats::default()
        };
        let mut counts = Counts::default();
        counts.requests.insert("run".into(), 2);
        counts.refused.insert("cancel".into(), 1);
        counts.lag.observe(0.0002);
        counts.lag.observe(0.2);
        counts.lag.observe(5.0);
        let mut meter = MeterHealth {
            training: "pid-42".into(),
            overflow: Default::default(),
            programs: vec![crate::probe::ProgramStats {
                name: "sched_switch",
                run_count: 4,
                run_time_ns: 400,
            }],
        };
        meter.overflow.threads_dropped = 3;
        Scrape {
            jobs: vec![
                JobSample {
                    id: "eval \"1\"".into(),
                    uid: 1000,
                    training: Some("pid-42".into()),
                    running: true,
                    budget_fraction: Some(0.05),
                    quota_cores: Some(0.5),
                    frozen: false,
                    stats: Some(stats),
                    steal: Some(JobStealFigures {
                        steal: Duration::from_millis(250),
                        stolen_fraction: Some(0.02),
                        stolen_fraction_window: Some(0.03),
                        budget: 0.05,
                        budget_used: Some(0.04),
                        over_budget: Duration::ZERO,
                    }),
                    gpu: vec![JobGpuSample {
                        device: 1,
                        utilization: Some(0.375),
                        memory_bytes: 3 << 30,
                    }],
                },
                JobSample {
                    id: "old".into(),
                    uid: 0,
                    running: false,
                    ..JobSample::default()
                },
            ],
            trainings: vec![TrainingStatus {
                training: "pid-42".into(),
                budget: 0.05,
                used: Some(0.04),
                used_recent: Some(0.06),
                over_budget_s: 1.5,
                slowdown: Some(1.02),
                quota_cores: Some(0.5),
                frozen: false,
                phase: "regulating",
                jobs: vec![JobShareStatus {
                    job: "eval \"1\"".into(),
                    share_cores: Some(0.5),
                    used_cores: Some(0.3),
                    steal_s: 0.25,
                }],
            }],
            training_owners: BTreeMap::from([("pid-42".to_owned(), 1000)]),
            meters: vec![meter],
            gpu_telemetry: true,
            program_stats: true,
            counts,
            process: ProcessSample {
                rss_bytes: Some(10 << 20),
                cpu_seconds: Some(1.25),
                open_fds: Some(12),
            },
        }
    }

    /// The metric names of a rendered scrape, from its sample lines.
    fn sample_names(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_family_shows_up_in_a_scrape_that_has_all_data() {
        let text = render(&full_scrape());
        let names = sample_names(&text);
        for f in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {} {}\n", f.name, f.kind.name())),
                "{} has no TYPE line:\n{text}",
                f.name
            );
            assert!(
                names
                    .iter()
                    .any(|n| n == f.name || n.starts_with(&format!("{}_", f.name))),
                "{} has no sample:\n{text}",
                f.name
            );
        }
    }

    #[test]
    fn samples_carry_base_units_and_escaped_labels() {
        let text = render(&full_scrape());
        for want in [
            "enforcer_job_cpu_seconds_total{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\"} 1.5\n",
            "enforcer_job_cpu_throttled_seconds_total{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\"} 0.25\n",
            "enforcer_job_steal_seconds_total{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\"} 0.25\n",
            "enforcer_job_memory_bytes{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\"} 4096\n",
            "enforcer_job_stolen_ratio{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\",window=\"10s\"} 0.03\n",
            "enforcer_job_stolen_ratio{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\",window=\"job\"} 0.02\n",
            "enforcer_job_budget_used_ratio{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\"} 0.04\n",
            "enforcer_job_gpu_utilization_ratio{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\",gpu=\"1\"} 0.375\n",
            "enforcer_job_gpu_memory_bytes{job_id=\"eval \\\"1\\\"\",training=\"pid-42\",user=\"1000\",gpu=\"1\"} 3221225472\n",
            "enforcer_gpu_telemetry_available 1\n",
            "enforcer_jobs{state=\"running\"} 1\n",
            "enforcer_jobs{state=\"finished\"} 1\n",
            "enforcer_training_stolen_fraction{training=\"pid-42\",user=\"1000\",window=\"10s\"} 0.04\n",
            "enforcer_training_phase{training=\"pid-42\",user=\"1000\",phase=\"regulating\"} 1\n",
            "enforcer_training_phase{training=\"pid-42\",user=\"1000\",phase=\"frozen\"} 0\n",
            "enforcer_probe_overflow_total{training=\"pid-42\",kind=\"threads_dropped\"} 3\n",
            "enforcer_control_loop_lag_seconds_bucket{le=\"0.0005\"} 1\n",
            "enforcer_control_loop_lag_seconds_bucket{le=\"0.25\"} 2\n",
            "enforcer_control_loop_lag_seconds_bucket{le=\"1\"} 2\n",
            "enforcer_control_loop_lag_seconds_bucket{le=\"+Inf\"} 3\n",
            "enforcer_control_loop_lag_seconds_count 3\n",
            "process_resident_memory_bytes 10485760\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let cost: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("enforcer_probe_cost_seconds_per_event{program=\"sched_switch\"} ")
            })
            .and_then(|v| v.parse().ok())
            .expect("probe cost sample");
        assert!((cost - 1e-7).abs() < 1e-12, "{cost}");
        // Each family's samples follow its header, without a second header.
        for f in FAMILIES {
            assert!(text.matches(&format!("# TYPE {} ", f.name)).count() <= 1);
        }
    }

    #[test]
    fn a_finished_job_and_absent_readings_leave_no_series() {
        let mut s = full_scrape();
        s.jobs[0].running = false;
        s.program_stats = false;
        s.process = ProcessSample::default();
        let text = render(&s);
        assert!(!text.contains("enforcer_job_memory_bytes"), "{text}");
        assert!(!text.contains("enforcer_probe_runs_total"), "{text}");
        assert!(!text.contains("process_resident_memory_bytes"), "{text}");
        assert!(
            text.contains("enforcer_jobs{state=\"finished\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("enforcer_requests_refused_total{type=\"run\"} 0\n"),
            "request types are shown from zero: {text}"
        );
    }

    #[test]
    fn without_gpu_telemetry_no_job_has_gpu_series_and_the_agent_says_so() {
        let mut s = full_scrape();
        s.gpu_telemetry = false;
        let text = render(&s);
        assert!(!text.contains("enforcer_job_gpu_"), "{text}");
        assert!(
            text.contains("enforcer_gpu_telemetry_available 0\n"),
            "{text}"
        );
    }

    /// `job` is the target label Prometheus sets on every series it
    /// scrapes: a metric label of that name would be renamed or clobber it.
    #[test]
    fn no_series_carries_the_reserved_job_label() {
        let text = render(&full_scrape());
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(!line.contains("{job=") && !line.contains(",job="), "{line}");
        }
    }

    #[test]
    fn only_get_and_head_of_metrics_are_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    /// The dashboard in `deploy/` may only query metrics the agent exports.
    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana-dashboard.json"
        );
        let text = std::fs::read_to_string(path).expect("deploy/grafana-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
        let names = dashboard_metrics(&dashboard);
        assert!(!names.is_empty(), "the dashboard queries nothing");
        let known = |n: &str| {
            FAMILIES.iter().any(|f| {
                n == f.name
                    || (f.kind == Kind::Histogram
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| n == format!("{}{s}", f.name)))
            })
        };
        let unknown: Vec<&String> = names.iter().filter(|n| !known(n)).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard queries metrics the agent does not export: {unknown:?}"
        );
    }

    /// The README's metric table names every family.
    #[test]
    fn the_readme_lists_every_metric() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let missing: Vec<&str> = FAMILIES
            .iter()
            .map(|f| f.name)
            .filter(|n| !readme.contains(&format!("`{n}`")))
            .collect();
        assert!(missing.is_empty(), "README.md does not list {missing:?}");
    }

    /// The metric names in every `expr` (and variable `query`) of a
    /// dashboard.
    fn dashboard_metrics(v: &serde_json::Value) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Object(m) => {
                    for key in ["expr", "query"] {
                        if let Some(serde_json::Value::String(expr)) = m.get(key) {
                            out.extend(expr_metrics(expr));
                        }
                    }
                    stack.extend(m.values());
                }
                serde_json::Value::Array(a) => stack.extend(a),
                _ => {}
            }
        }
        out
    }

    /// The identifiers of a PromQL expression that name this agent's
    /// metrics (`enforcer_…`, `process_…`).
    fn expr_metrics(expr: &str) -> Vec<String> {
        expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("enforcer_") || w.starts_with("process_"))
            .map(str::to_owned)
            .collect()
    }
}
