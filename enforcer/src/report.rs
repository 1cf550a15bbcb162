//! The job report: JSON with `--report FILE`, a human summary on stderr.
//! A metric this node cannot provide is `null` with the reason in
//! `unavailable`; no metric is ever a crash.
//!
//! Fields filled by other parts of the agent (the steal meter, the budget
//! controller, the GPU guard) are declared here as `null` with a default
//! reason; their monitors overwrite them in `Monitor::finish`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

/// Why the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The command ended by itself (with any status or signal).
    Exited,
    /// A deadline killed the job.
    Deadline,
    /// The memory limit OOM-killed the command.
    Oom,
    /// The job's command died of the signal forwarded to it (the first
    /// signal to the enforcer).
    Killed,
    /// A second signal to the enforcer killed the whole job (exit status
    /// 128+N of that signal, never 137).
    Interrupted,
    /// The job stayed over its GPU memory limit past the grace period.
    #[serde(rename = "gpu_memory")]
    GpuMemory,
}

pub const NO_TRAINING: &str = "no training workload to protect (use --protect PID)";
/// The reason of the steal fields of a job whose training the node agent
/// meters for all its jobs together.
pub const METERED_BY_AGENT: &str =
    "the node agent meters the training for all its jobs together: see `enforcer ctl status`";
pub const NO_GPU: &str = "GPU telemetry not collected";

/// The report fields the steal meter fills (`probe::monitor`); null with
/// [`NO_TRAINING`] until it does.
pub const STEAL_FIELDS: [&str; 6] = [
    "stolen_from_training_s",
    "stolen_fraction",
    "preemptions_of_training",
    "training_runq_wait_s",
    "budget_fraction",
    "over_budget_s",
];

/// The budget loop's lifts out of the idle class: null with [`NO_LOOP`]
/// until a loop fills them.
pub const LIFT_FIELDS: [&str; 2] = ["out_of_idle_class_s", "idle_class_lifts"];
/// The reason of [`LIFT_FIELDS`] for a job no budget loop held.
pub const NO_LOOP: &str =
    "no budget loop held this job (it needs --protect PID, without --measure-only)";

/// Fields whose `null` means "none" (no signal, no deadline fired, no quota
/// set), not a metric this node could not provide.
const NULL_MEANS_NONE: [&str; 9] = [
    "slowdown_blame",
    "signal",
    "deadline_kill_latency_ms",
    "deadline_term_at",
    "deadline_kill_at",
    "cpu_quota_cores",
    "memory_high_bytes",
    "v2_cgroup_id",
    "exit_code",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub job: String,
    pub command: Vec<String>,
    pub cgroup: PathBuf,
    pub cgroup_mode: String,
    pub v2_cgroup_id: Option<u64>,
    pub started_at: String,
    pub ended_at: String,
    /// `started_at` as Unix seconds, for arithmetic.
    pub started_at_unix: f64,
    pub wall_s: f64,
    /// The status `enforcer` exits with: the command's own, 124 after a
    /// deadline, 137 after an OOM kill, 128+N after signal N.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    pub reason: Reason,
    /// The uid and gid the job's command ran as (an attached process: its
    /// own when it was attached).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub timeout_s: f64,
    /// From the moment the SIGKILL was due (the deadline, or the end of the
    /// kill grace, or the job emptying itself within it) to an empty cgroup.
    pub deadline_kill_latency_ms: Option<f64>,
    /// Between the SIGTERM at a deadline and the SIGKILL (0: none sent).
    pub kill_grace_s: f64,
    /// When the deadline's SIGTERM went out (only with a kill grace).
    pub deadline_term_at: Option<String>,
    /// When the deadline's kill left the cgroup empty.
    pub deadline_kill_at: Option<String>,
    pub cpu_s: Option<f64>,
    pub cpu_throttled_s: Option<f64>,
    pub cpu_quota_cores: Option<f64>,
    pub memory_peak_bytes: Option<u64>,
    /// The peak was sampled each control tick, not the kernel's own.
    pub memory_peak_sampled: bool,
    pub memory_limit_bytes: Option<u64>,
    pub memory_high_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
    pub pids_peak: Option<u64>,
    pub pids_peak_sampled: bool,
    pub pids_limit: Option<u64>,
    /// Counts of each event kind emitted.
    pub events: BTreeMap<String, u64>,

    // Filled by the steal meter / budget controller.
    pub stolen_from_training_s: Option<f64>,
    pub stolen_fraction: Option<f64>,
    pub preemptions_of_training: Option<u64>,
    pub training_runq_wait_s: Option<f64>,
    pub budget_fraction: Option<f64>,
    pub over_budget_s: Option<f64>,
    /// The budget the job used: its largest stolen fraction over any 10 s
    /// window (the budget loop's horizon) or over the whole job, to read
    /// against `budget_fraction`.
    pub budget_used: Option<f64>,
    pub training_slowdown: Option<f64>,
    /// Who a slowdown the steal did not explain came from, as the last blame
    /// experiment found: `"job"` or `"elsewhere"`; null when none ran.
    pub slowdown_blame: Option<String>,
    /// How long the budget loop had the job out of the idle class (lifted
    /// into the normal class at the lowest weight), all lifts together...
    pub out_of_idle_class_s: Option<f64>,
    /// ...and how many lifts it made.
    pub idle_class_lifts: Option<u32>,
    // Filled by the GPU guard.
    pub gpu: Option<serde_json::Value>,

    /// Metric name → why it is `null`.
    pub unavailable: BTreeMap<String, String>,
}

impl Report {
    pub fn new(job: &str, command: &[String], started: SystemTime) -> Self {
        let mut unavailable = BTreeMap::new();
        for k in STEAL_FIELDS
            .into_iter()
            .chain(["training_slowdown", "budget_used"])
        {
            unavailable.insert(k.to_owned(), NO_TRAINING.to_owned());
        }
        for k in LIFT_FIELDS {
            unavailable.insert(k.to_owned(), NO_LOOP.to_owned());
        }
        unavailable.insert("gpu".to_owned(), NO_GPU.to_owned());
        Report {
            job: job.to_owned(),
            command: command.to_vec(),
            cgroup: PathBuf::new(),
            cgroup_mode: String::new(),
            v2_cgroup_id: None,
            started_at: rfc3339(started),
            ended_at: String::new(),
            started_at_unix: unix_s(started),
            wall_s: 0.0,
            exit_code: None,
            signal: None,
            reason: Reason::Exited,
            uid: None,
            gid: None,
            timeout_s: 0.0,
            deadline_kill_latency_ms: None,
            kill_grace_s: 0.0,
            deadline_term_at: None,
            deadline_kill_at: None,
            cpu_s: None,
            cpu_throttled_s: None,
            cpu_quota_cores: None,
            memory_peak_bytes: None,
            memory_peak_sampled: false,
            memory_limit_bytes: None,
            memory_high_bytes: None,
            oom_kills: None,
            pids_peak: None,
            pids_peak_sampled: false,
            pids_limit: None,
            events: BTreeMap::new(),
            stolen_from_training_s: None,
            stolen_fraction: None,
            preemptions_of_training: None,
            training_runq_wait_s: None,
            budget_fraction: None,
            over_budget_s: None,
            budget_used: None,
            training_slowdown: None,
            slowdown_blame: None,
            out_of_idle_class_s: None,
            idle_class_lifts: None,
            gpu: None,
            unavailable,
        }
    }

    /// Marks `metric` unavailable for `reason` (kept only while it is null).
    pub fn unavailable(&mut self, metric: &str, reason: impl Into<String>) {
        self.unavailable.insert(metric.to_owned(), reason.into());
    }

    /// Drops reasons for metrics that a monitor filled after all, and makes
    /// sure every null metric has a reason.
    pub fn reconcile(&mut self) {
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(&*self) else {
            return;
        };
        self.unavailable
            .retain(|k, _| map.get(k).is_some_and(serde_json::Value::is_null));
        for (k, v) in &map {
            if v.is_null()
                && !self.unavailable.contains_key(k)
                && !NULL_MEANS_NONE.contains(&k.as_str())
            {
                self.unavailable
                    .insert(k.clone(), "not measured on this node".to_owned());
            }
        }
    }

    /// Writes the JSON report to `path` (mode 0644) for the user who asked
    /// for it: as the directory's owner, atomically, replacing whatever is
    /// at the name rather than following it (see
    /// [`crate::safe_fs::write_atomic_as_dir_owner`]).
    pub fn write_json(&self, path: &Path) -> Result<(), crate::safe_fs::SafeFsError> {
        let text = serde_json::to_string_pretty(self)
            .expect("plain fields and string-keyed maps always serialise");
        crate::safe_fs::write_atomic_as_dir_owner(path, (text + "\n").as_bytes(), 0o644)
    }

    /// The few lines a person reads at the end of a run.
    pub fn summary(&self) -> String {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.2}{unit}"));
        let mib = |v: Option<u64>| {
            v.map_or("n/a".to_owned(), |b| {
                format!("{:.1}MiB", b as f64 / 1048576.0)
            })
        };
        let mut s = format!(
            "enforcer: job {} {} after {:.2}s (exit {}{})\n",
            self.job,
            serde_json::to_value(self.reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.wall_s,
            self.exit_code.map_or("?".to_owned(), |c| c.to_string()),
            self.signal
                .map_or(String::new(), |n| format!(", signal {n}")),
        );
        s += &format!(
            "  cpu {} (throttled {}), memory peak {}{} of {}, oom kills {}, pids peak {} of {}\n",
            opt(self.cpu_s, "s"),
            opt(self.cpu_throttled_s, "s"),
            mib(self.memory_peak_bytes),
            if self.memory_peak_sampled {
                " (sampled)"
            } else {
                ""
            },
            mib(self.memory_limit_bytes),
            self.oom_kills.map_or("n/a".to_owned(), |n| n.to_string()),
            self.pids_peak.map_or("n/a".to_owned(), |n| n.to_string()),
            self.pids_limit.map_or("max".to_owned(), |n| n.to_string()),
        );
        if let Some(l) = self.deadline_kill_latency_ms {
            if let Some(t) = &self.deadline_term_at {
                s += &format!(
                    "  deadline {:.0}s: SIGTERM at {t}, grace {:.1}s, cgroup empty at {} ({l:.1}ms after the kill was due)\n",
                    self.timeout_s,
                    self.kill_grace_s,
                    self.deadline_kill_at.as_deref().unwrap_or("?"),
                );
            } else {
                s += &format!(
                    "  deadline {:.0}s: cgroup empty {l:.1}ms after it\n",
                    self.timeout_s
                );
            }
        }
        if self.reason == Reason::Interrupted {
            s += "  a second signal to the enforcer killed the whole job\n";
        }
        if let Some(f) = self.stolen_fraction {
            s += &format!("  stolen from training {:.2}%\n", f * 100.0);
        }
        if let (Some(used), Some(budget)) = (self.budget_used, self.budget_fraction) {
            s += &format!(
                "  budget used {:.1}% of {:.1}% (worst 10 s window or whole job)\n",
                used * 100.0,
                budget * 100.0
            );
        }
        if let (Some(out), Some(lifts)) = (self.out_of_idle_class_s, self.idle_class_lifts)
            && lifts > 0
        {
            s += &format!(
                "  out of the idle class {out:.1}s in {lifts} lift{}\n",
                if lifts == 1 { "" } else { "s" }
            );
        }
        if let Some(b) = &self.slowdown_blame {
            s += &format!("  training slowdown not explained by steal: blamed on {b}\n");
        }
        s
    }
}

pub fn unix_s(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `2026-11-26T19:58:28.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_formats_utc_with_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_723_108_123);
        assert_eq!(rfc3339(t), "2026-11-26T19:58:28.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn null_metrics_have_reasons_and_filled_ones_lose_them() {
        let mut r = Report::new("j", &["true".into()], SystemTime::now());
        r.cpu_s = Some(1.0);
        r.stolen_fraction = Some(0.01);
        r.reconcile();
        assert!(!r.unavailable.contains_key("stolen_fraction"));
        assert_eq!(r.unavailable["stolen_from_training_s"], NO_TRAINING);
        assert_eq!(r.unavailable["gpu"], NO_GPU);
        assert!(r.unavailable.contains_key("memory_peak_bytes"));
        assert!(!r.unavailable.contains_key("cpu_s"));
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["stolen_from_training_s"].is_null());
        assert_eq!(v["reason"], "exited");
    }
}
