//! The configuration file (TOML, default `/etc/enforcer/enforcer.toml`): its
//! schema, the seed's SLAs as defaults, and validation that names the key,
//! the value and the line of anything it refuses.
//!
//! Keys read by other parts of the agent (the steal budget, the training
//! workload, the GPU guard) are declared here too, with their defaults, so
//! that there is one schema and one place that rejects unknown keys.

use std::{
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, Serialize, de};

use crate::units::{ByteSize, Cores, Dur, Percent};

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/enforcer/enforcer.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `toml`'s message already shows the line, the column and the value.
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The effective configuration. Every default is the seed's SLA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Hard memory limit per job (`memory.max` / `memory.limit_in_bytes`).
    #[serde(deserialize_with = "nonzero_size")]
    pub memory: ByteSize,
    /// Soft memory limit per job (`memory.high` / `memory.soft_limit_in_bytes`).
    #[serde(deserialize_with = "opt_nonzero_size")]
    pub memory_high: Option<ByteSize>,
    /// CPU quota per job in CPUs; unset = no quota.
    pub cpu: Option<Cores>,
    /// CPU weight (1–10000, v2 scale; v1 shares are derived) when the idle
    /// class is off.
    #[serde(deserialize_with = "opt_weight")]
    pub cpu_weight: Option<u64>,
    /// Put jobs in the idle CPU class (`cpu.idle`, else the lowest weight).
    pub cpu_idle: bool,
    /// Maximum number of tasks per job.
    #[serde(deserialize_with = "nonzero_u64")]
    pub pids: u64,
    /// Job deadline.
    #[serde(deserialize_with = "nonzero_dur")]
    pub timeout: Dur,
    /// At a deadline (job or game), SIGTERM to every process of the job,
    /// then SIGKILL of the whole job this long after (or once it is empty);
    /// 0s (the default) kills at the deadline itself. At most 1h.
    #[serde(deserialize_with = "kill_grace")]
    pub kill_grace: Dur,
    /// The user jobs' commands run as (name or number); unset: root, which
    /// lets a job leave its cgroup and raise its limits. `--user` overrides.
    pub user: Option<String>,
    /// The group jobs' commands run as (name or number; needs `user`);
    /// default: the user's primary group.
    pub group: Option<String>,
    /// Default per-game deadline (`enforcer game`).
    #[serde(deserialize_with = "nonzero_dur")]
    pub game_timeout: Dur,
    /// Jobs that may run at once on this node, across `enforcer` processes.
    pub max_concurrent_jobs: NonZeroU32,
    /// The cgroup (path as in `/proc/self/cgroup`, relative to each
    /// hierarchy's root) under which jobs are made; default: the cgroup the
    /// agent started in.
    pub cgroup_root: Option<PathBuf>,
    /// Shell command run for each event with the event JSON on stdin.
    pub on_event: Option<String>,
    /// How long an `on_event` hook may run before it is killed.
    #[serde(deserialize_with = "nonzero_dur")]
    pub on_event_timeout: Dur,
    /// Directory for cross-process state (concurrency slots).
    pub state_dir: PathBuf,
    /// The steal budget: the share of the training workload's CPU time that
    /// evaluation may steal.
    #[serde(deserialize_with = "budget_percent")]
    pub budget: Percent,
    /// How often the job supervisor ticks (monitors, budget controller).
    #[serde(deserialize_with = "nonzero_dur")]
    pub control_period: Dur,
    /// Let the budget loop confine a protected job to the CPUs the training
    /// leaves free (cpuset); `false` keeps every job on every CPU.
    pub place_jobs: bool,
    /// GPU utilisation an evaluation may use.
    #[serde(deserialize_with = "budget_percent")]
    pub gpu_util_limit: Percent,
    /// GPU memory an evaluation may use; unset = no limit.
    #[serde(deserialize_with = "opt_nonzero_size")]
    pub gpu_memory_limit: Option<ByteSize>,
    /// The training workload to protect.
    pub training: Training,
}

/// The `[training]` table: the workload whose scheduling evaluation must not
/// steal from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Training {
    /// The training process (all its threads).
    pub pid: Option<i32>,
    /// Or the cgroup that holds it (path relative to the hierarchy root).
    pub cgroup: Option<PathBuf>,
    /// Also follow processes the training process forks later.
    pub follow_children: bool,
    /// A file the training writes its progress (steps) to, for slowdown.
    pub progress_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            memory: ByteSize::mib(1000),
            memory_high: None,
            cpu: None,
            cpu_weight: None,
            cpu_idle: true,
            pids: 1024,
            timeout: Dur::secs(30 * 60),
            kill_grace: Dur::secs(0),
            user: None,
            group: None,
            game_timeout: Dur::secs(300),
            max_concurrent_jobs: NonZeroU32::MIN,
            cgroup_root: None,
            on_event: None,
            on_event_timeout: Dur::secs(10),
            state_dir: PathBuf::from("/run/enforcer"),
            budget: Percent::from_fraction(0.05),
            control_period: Dur::millis(100),
            place_jobs: true,
            gpu_util_limit: Percent::from_fraction(0.80),
            gpu_memory_limit: None,
            training: Training::default(),
        }
    }
}

impl Config {
    /// Parses a config text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
    }

    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Reads `--config FILE` when given; otherwise the default path if it
    /// exists, else the built-in defaults.
    pub fn load_or_default(
        explicit: Option<&Path>,
    ) -> Result<(Self, Option<PathBuf>), ConfigError> {
        match explicit {
            Some(p) => Ok((Self::load(p)?, Some(p.to_owned()))),
            None => {
                let p = Path::new(DEFAULT_PATH);
                if p.exists() {
                    Ok((Self::load(p)?, Some(p.to_owned())))
                } else {
                    Ok((Self::default(), None))
                }
            }
        }
    }
}

fn nonzero_size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    let v = ByteSize::deserialize(d)?;
    if v.0 == 0 {
        return Err(de::Error::custom("must be greater than zero (got 0)"));
    }
    Ok(v)
}

fn opt_nonzero_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    nonzero_size(d).map(Some)
}

fn nonzero_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = i64::deserialize(d)?;
    if v <= 0 {
        return Err(de::Error::custom(format!(
            "must be greater than zero (got {v})"
        )));
    }
    Ok(v as u64)
}

fn opt_weight<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = i64::deserialize(d)?;
    if !(1..=10_000).contains(&v) {
        return Err(de::Error::custom(format!(
            "must be between 1 and 10000 (got {v})"
        )));
    }
    Ok(Some(v as u64))
}

fn nonzero_dur<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
    let v = Dur::deserialize(d)?;
    if v.0.is_zero() {
        return Err(de::Error::custom("must be greater than zero (got 0)"));
    }
    Ok(v)
}

fn kill_grace<'de, D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
    let v = Dur::deserialize(d)?;
    crate::job::check_kill_grace(v.0)
        .map_err(|why| de::Error::custom(format!("{why} (got {v})")))?;
    Ok(v)
}

fn budget_percent<'de, D: Deserializer<'de>>(d: D) -> Result<Percent, D::Error> {
    let v = Percent::deserialize(d)?;
    if v.fraction() > 1.0 {
        return Err(de::Error::custom(format!("must be at most 100% (got {v})")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_config_is_the_seed_slas() {
        let c = parse("").unwrap();
        assert_eq!(c.memory, ByteSize::mib(1000));
        assert_eq!(c.timeout, Dur::secs(1800));
        assert_eq!(c.game_timeout, Dur::secs(300));
        assert_eq!(c.pids, 1024);
        assert_eq!(c.max_concurrent_jobs.get(), 1);
        assert!((c.budget.fraction() - 0.05).abs() < 1e-12);
        assert_eq!(c.control_period, Dur::millis(100));
        assert!(c.cpu_idle);
        assert!(!c.training.follow_children);
    }

    #[test]
    fn full_config_parses_units() {
        let c = parse(
            r#"
memory = "1GiB"
memory_high = "800M"
cpu = 1.5
pids = 64
timeout = "2h"
game_timeout = "30s"
max_concurrent_jobs = 2
cgroup_root = "/eval.slice"
on_event = "logger -t enforcer"
budget = "3%"
gpu_util_limit = 0.5
[training]
pid = 1234
follow_children = true
"#,
        )
        .unwrap();
        assert_eq!(c.memory.0, 1 << 30);
        assert_eq!(c.cpu.unwrap().get(), 1.5);
        assert_eq!(c.training.pid, Some(1234));
        assert_eq!(c.max_concurrent_jobs.get(), 2);
    }

    #[test]
    fn kill_grace_user_and_group_keys() {
        let c = parse("kill_grace = \"10s\"\nuser = \"eval\"\ngroup = \"44\"\n").unwrap();
        assert_eq!(c.kill_grace, Dur::secs(10));
        assert_eq!(c.user.as_deref(), Some("eval"));
        assert_eq!(c.group.as_deref(), Some("44"));
        assert_eq!(parse("").unwrap().kill_grace, Dur::secs(0));
        let e = parse("\nkill_grace = \"2h\"").unwrap_err();
        assert!(e.contains("line 2") && e.contains("3600s"), "{e}");
    }

    #[test]
    fn unknown_key_is_refused_naming_key_and_line() {
        let e = parse("memory = \"1G\"\nmemroy_high = \"1G\"\n").unwrap_err();
        assert!(e.contains("memroy_high"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_naming_value_and_line() {
        for (text, key_or_value) in [
            ("\n\nmemory = \"0\"", "\"0\""),
            ("\n\nmemory = \"-5M\"", "-5M"),
            ("\n\nbudget = \"150%\"", "150%"),
            ("\n\ntimeout = \"0s\"", "0s"),
            ("\n\npids = 0", "pids = 0"),
            ("\n\nmax_concurrent_jobs = 0", "max_concurrent_jobs"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains("line 3"), "{text}: {e}");
            assert!(e.contains(key_or_value), "{text}: {e}");
        }
    }
}
