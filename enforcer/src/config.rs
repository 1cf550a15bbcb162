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

use serde::{Deserialize, Serialize};

use crate::{
    units::{ByteSize, Cores, Dur, Percent},
    validate::{self, Invalid, Node},
};

/// A config file larger than this is refused unread.
const MAX_SIZE: u64 = 1 << 20;

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
    /// Values of the right type outside their bounds, one per line.
    #[error("invalid config {path}: {}", .errors.join("\n  "))]
    OutOfRange { path: PathBuf, errors: Vec<String> },
    #[error("config {path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("config {path} is larger than {MAX_SIZE} bytes")]
    TooLarge { path: PathBuf },
    #[error("refusing config {path}: {why}")]
    Untrusted {
        path: PathBuf,
        why: crate::trust::Untrusted,
    },
}

/// The effective configuration. Every default is the seed's SLA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Hard memory limit per job (`memory.max` / `memory.limit_in_bytes`).
    pub memory: ByteSize,
    /// Soft memory limit per job (`memory.high` / `memory.soft_limit_in_bytes`).
    pub memory_high: Option<ByteSize>,
    /// CPU quota per job in CPUs; unset = no quota.
    pub cpu: Option<Cores>,
    /// CPU weight (1–10000, v2 scale; v1 shares are derived) when the idle
    /// class is off.
    pub cpu_weight: Option<u64>,
    /// Put jobs in the idle CPU class (`cpu.idle`, else the lowest weight).
    pub cpu_idle: bool,
    /// Maximum number of tasks per job.
    pub pids: u64,
    /// Job deadline.
    pub timeout: Dur,
    /// At a deadline (job or game), SIGTERM to every process of the job,
    /// then SIGKILL of the whole job this long after (or once it is empty);
    /// 0s (the default) kills at the deadline itself. At most 1h.
    pub kill_grace: Dur,
    /// The user jobs' commands run as (name or number); unset: root, which
    /// lets a job leave its cgroup and raise its limits. `--user` overrides.
    pub user: Option<String>,
    /// The group jobs' commands run as (name or number; needs `user`);
    /// default: the user's primary group.
    pub group: Option<String>,
    /// Default per-game deadline (`enforcer game`).
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
    pub on_event_timeout: Dur,
    /// Directory for cross-process state (concurrency slots).
    pub state_dir: PathBuf,
    /// The steal budget: the share of the training workload's CPU time that
    /// evaluation may steal.
    pub budget: Percent,
    /// How often the job supervisor ticks (monitors, budget controller).
    pub control_period: Dur,
    /// Let the budget loop confine a protected job to the CPUs the training
    /// leaves free (cpuset); `false` keeps every job on every CPU.
    pub place_jobs: bool,
    /// GPU utilisation an evaluation may use.
    pub gpu_util_limit: Percent,
    /// GPU memory an evaluation may use; unset = no limit.
    pub gpu_memory_limit: Option<ByteSize>,
    /// The training workload to protect.
    pub training: Training,
    /// The node agent (`enforcer agent`).
    pub agent: AgentConfig,
}

/// What an agent does with its jobs when it gets SIGTERM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAgentStop {
    /// Jobs keep running under their limits and deadlines (their shims
    /// supervise them); the next agent re-adopts them.
    #[default]
    Keep,
    /// Jobs are ended (as a signal to `enforcer run` would) before the agent
    /// exits.
    End,
}

/// The `[agent]` table: the node agent's socket, records and rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The agent's Unix socket (its directory is made root's, 0755).
    pub socket: PathBuf,
    /// Persistent job records (`<lib_dir>/jobs/<id>/`), root's, 0700.
    pub lib_dir: PathBuf,
    /// `keep` (default) or `end` the jobs when the agent gets SIGTERM.
    pub on_agent_stop: OnAgentStop,
    /// When non-empty, a non-root caller must be in one of these groups
    /// (names or numbers).
    pub allowed_groups: Vec<String>,
    /// How long the records of finished jobs are kept for `report`.
    pub keep_finished: Dur,
    /// Serve Prometheus metrics (`GET /metrics`) on this address; unset
    /// (the default): no endpoint. A loopback address only: the endpoint
    /// has no authentication and names every job of the node.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Allow `metrics_listen` on an address other than loopback: for a
    /// fleet whose Prometheus scrapes every node over a network it trusts
    /// (the DaemonSet), since the endpoint has no authentication.
    pub metrics_non_loopback: bool,
    /// A connection must send `hello` within this, and finish each message
    /// it begins within this; otherwise it gets an `error` and is closed.
    pub hello_timeout: Dur,
    /// Connections served at once; one more gets an `error` and is closed.
    pub max_connections: u32,
    /// Connections one uid (root too) may hold open at once.
    pub max_connections_per_uid: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: PathBuf::from("/run/enforcer/enforcer.sock"),
            lib_dir: PathBuf::from("/var/lib/enforcer"),
            on_agent_stop: OnAgentStop::Keep,
            allowed_groups: Vec::new(),
            keep_finished: Dur::secs(3600),
            metrics_listen: None,
            metrics_non_loopback: false,
            hello_timeout: Dur::secs(10),
            max_connections: 512,
            max_connections_per_uid: 128,
        }
    }
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
            state_dir: PathBuf::from("/run/enforcer/state"),
            budget: Percent::from_fraction(0.05),
            control_period: Dur::millis(100),
            place_jobs: true,
            gpu_util_limit: Percent::from_fraction(0.80),
            gpu_memory_limit: None,
            training: Training::default(),
            agent: AgentConfig::default(),
        }
    }
}

impl Config {
    /// Parses a config text and holds every key against its bound
    /// ([`validate`]); `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_on(text, path, Node::detect())
    }

    /// [`Config::parse`] with the facts of a given node.
    pub fn parse_on(text: &str, path: &Path, node: Node) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let errors = validate::config_errors(&config, node);
        if errors.is_empty() {
            return Ok(config);
        }
        Err(ConfigError::OutOfRange {
            path: path.to_owned(),
            errors: errors.iter().map(|e| locate(text, e)).collect(),
        })
    }

    /// Reads `path`: a regular file (a symlink to one is fine: ConfigMaps
    /// are made of them), at most [`MAX_SIZE`] bytes, opened non-blocking so
    /// that a FIFO cannot stall the enforcer. As root, the file must be
    /// trusted ([`crate::trust`]), judged on the opened file itself.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::{io::Read, os::unix::fs::OpenOptionsExt};
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(ConfigError::NotRegular {
                path: path.to_owned(),
            });
        }
        if crate::trust::running_as_root() {
            crate::trust::check_root_owned(&file).map_err(|why| ConfigError::Untrusted {
                path: path.to_owned(),
                why,
            })?;
        }
        let mut text = String::new();
        file.take(MAX_SIZE + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_SIZE {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
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

/// `key = value (line N): must be ...` for a refused key, with the value as
/// written in the file; a key the file does not set shows its default.
fn locate(text: &str, e: &Invalid) -> String {
    match value_span(text, e.name) {
        Some(span) => {
            let line = text[..span.start].matches('\n').count() + 1;
            format!(
                "{} = {} (line {line}): must be {}",
                e.name,
                text[span].trim(),
                e.allowed
            )
        }
        None => format!(
            "{} = {} (the default): must be {}",
            e.name, e.value, e.allowed
        ),
    }
}

/// Where the value of the dotted `key` is in `text`.
fn value_span(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (_, value) = table.iter().find(|(k, _)| k.get_ref() == part)?;
        if parts.peek().is_none() {
            return Some(value.span());
        }
        match value.get_ref() {
            toml::de::DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            cpus: Cores::new(4.0).unwrap(),
        }
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse_on(text, Path::new("test.toml"), node()).map_err(|e| e.to_string())
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
        assert_eq!(c.agent.metrics_listen, None, "metrics are off by default");
        assert_eq!(c.agent.hello_timeout, Dur::secs(10));
        assert_eq!(
            (c.agent.max_connections, c.agent.max_connections_per_uid),
            (512, 128)
        );
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
        assert!(e.contains("line 2") && e.contains("from 0s to 1h"), "{e}");
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

    /// Each value of the right type but outside its bound: the message
    /// names the file, the key, the value as written, its line and the
    /// allowed range.
    #[test]
    fn out_of_range_keys_name_key_value_line_and_range() {
        for (text, want) in [
            (
                "budget = \"0%\"",
                "budget = \"0%\" (line 2): must be greater than zero: above 0% and at most 100%",
            ),
            ("budget = \"101%\"", "must be above 0% and at most 100%"),
            (
                "gpu_util_limit = 0",
                "gpu_util_limit = 0 (line 2): must be greater than zero",
            ),
            (
                "cpu = 1e300",
                "cpu = 1e300 (line 2): must be from 0.01 to 4",
            ),
            ("cpu = 5", "cpu = 5 (line 2): must be from 0.01 to 4"),
            (
                "memory = 1",
                "memory = 1 (line 2): must be from 1MiB to 1024TiB",
            ),
            (
                "memory_high = \"2G\"\nmemory = \"1G\"",
                "memory_high = \"2G\" (line 2): must be at most the hard limit memory = 1GiB",
            ),
            (
                "memory_high = \"2G\"",
                "memory_high = \"2G\" (line 2): must be at most the hard limit memory = 1000MiB",
            ),
            (
                "control_period = \"1us\"",
                "control_period = \"1us\" (line 2): must be from 10ms to 10s",
            ),
            ("control_period = \"11s\"", "must be from 10ms to 10s"),
            ("timeout = \"366d\"", "must be at most 365d"),
            (
                "game_timeout = 0",
                "game_timeout = 0 (line 2): must be greater than zero",
            ),
            ("on_event_timeout = \"0s\"", "on_event_timeout"),
            (
                "pids = 0",
                "pids = 0 (line 2): must be greater than zero: from 1 to 4194304",
            ),
            ("pids = 4194305", "must be from 1 to 4194304"),
            ("cpu_weight = 0", "cpu_weight = 0 (line 2)"),
            ("cpu_weight = 10001", "must be from 1 to 10000"),
            (
                "max_concurrent_jobs = 5000",
                "max_concurrent_jobs = 5000 (line 2): must be from 1 to 1024",
            ),
            ("gpu_memory_limit = 5", "gpu_memory_limit = 5 (line 2)"),
            (
                "state_dir = \"\"",
                "state_dir = \"\" (line 2): must be non-empty",
            ),
            ("state_dir = \"run/enforcer\"", "must be an absolute path"),
            ("state_dir = \"/run/../tmp\"", "without `..` components"),
            (
                "cgroup_root = \"/../../x\"",
                "cgroup_root = \"/../../x\" (line 2): must be a path without `..` components",
            ),
            ("cgroup_root = \"\"", "must be non-empty"),
            (
                "on_event = \" \"",
                "on_event = \" \" (line 2): must be non-empty",
            ),
            (
                "[training]\npid = -5",
                "training.pid = -5 (line 3): must be from 2 to 4194304",
            ),
            ("[training]\npid = 1", "training.pid = 1 (line 3)"),
            ("[training]\ncgroup = \"../x\"", "training.cgroup"),
            (
                "[agent]\nmetrics_listen = \"0.0.0.0:9464\"",
                "agent.metrics_listen = \"0.0.0.0:9464\" (line 3): must be a loopback address",
            ),
            (
                "[agent]\nmetrics_listen = \"localhost:9464\"",
                "metrics_listen",
            ),
            (
                "[agent]\nhello_timeout = \"10ms\"",
                "agent.hello_timeout = \"10ms\" (line 3): must be from 100ms to 1h",
            ),
            (
                "[agent]\nhello_timeout = \"2h\"",
                "must be from 100ms to 1h",
            ),
            (
                "[agent]\nmax_connections = 0",
                "agent.max_connections = 0 (line 3): must be greater than zero: from 1 to 65536",
            ),
            (
                "[agent]\nmax_connections_per_uid = 70000",
                "agent.max_connections_per_uid = 70000 (line 3): must be from 1 to 65536",
            ),
            (
                "[agent]\nmax_connections = 8\nmax_connections_per_uid = 9",
                "agent.max_connections_per_uid = 9 (line 4): must be at most agent.max_connections = 8",
            ),
        ] {
            let text = format!("# a comment\n{text}\n");
            let e = parse(&text).unwrap_err();
            assert!(e.starts_with("invalid config test.toml: "), "{text}: {e}");
            assert!(e.contains(want), "{text}: expected {want:?} in: {e}");
        }
    }

    #[test]
    fn every_refused_key_is_reported_at_once() {
        let e = parse("budget = \"0%\"\npids = 0\n").unwrap_err();
        assert!(e.contains("budget") && e.contains("pids"), "{e}");
    }
}
