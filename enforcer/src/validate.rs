//! The one validator for values from the command line and the config file:
//! a table of bounds, one line each, and a [`Checker`] that holds values
//! against them and names the flag (`--budget`) or the key (`budget`), the
//! value and the allowed range of each one it refuses.
//!
//! The parsers in [`crate::units`] and `toml` decide what a value *is* (and
//! keep toml's line and column for type errors; a duration over a year is
//! not one, so that nothing downstream can overflow); what it *may be* is
//! decided here, before anything (slot, cgroup, state file) is created.
//! Callers: [`crate::config::Config::parse`] for every key, `Plan::new`
//! (`run`, `attach`) and `enforcer game` for their flags.
//!
//! To add a bound: a `const` [`Bound`] below, and one `check` line where the
//! key is read ([`config_errors`]) or the flag is merged.

use std::{
    fmt,
    path::{Component, Path},
    time::Duration,
};

use crate::units::{ByteSize, Cores, Dur, Percent};

/// The kernel's `PID_MAX_LIMIT` on 64-bit: no pid, and no `pids.max` that
/// means anything, is above it.
pub const PID_MAX_LIMIT: u64 = 4_194_304;

/// The longest deadline or timeout: a year (also the longest duration the
/// parser reads).
pub const MAX_TIMEOUT: Dur = Dur::MAX;

/// The largest memory limit: 1024 TiB, more than any node has and far
/// below the `i64::MAX` bytes the kernel's page counter holds.
pub const MAX_MEMORY: ByteSize = ByteSize(1 << 50);

/// An interval, printed in messages as the allowed range.
#[derive(Debug, Clone, Copy)]
pub struct Range<T> {
    pub lo: T,
    /// `(lo, hi]` rather than `[lo, hi]`.
    pub lo_open: bool,
    pub hi: T,
}

impl<T> Range<T> {
    /// `(lo, hi]`.
    pub const fn above(lo: T, hi: T) -> Self {
        Range {
            lo,
            lo_open: true,
            hi,
        }
    }
    /// `[lo, hi]`.
    pub const fn from_to(lo: T, hi: T) -> Self {
        Range {
            lo,
            lo_open: false,
            hi,
        }
    }
}

/// A value a bound can hold.
pub trait Value: PartialOrd + fmt::Display {
    fn is_zero(&self) -> bool;
}

macro_rules! value {
    ($($ty:ty => |$v:ident| $zero:expr;)*) => {$(
        impl Value for $ty {
            fn is_zero(&self) -> bool {
                let $v = self;
                $zero
            }
        }
    )*};
}

value! {
    u64 => |v| *v == 0;
    i64 => |v| *v == 0;
    ByteSize => |v| v.0 == 0;
    Dur => |v| v.0.is_zero();
    Percent => |v| v.fraction() == 0.0;
    Cores => |v| v.get() == 0.0;
}

impl<T: Value> Range<T> {
    pub fn contains(&self, v: &T) -> bool {
        let lo_ok = if self.lo_open {
            *v > self.lo
        } else {
            *v >= self.lo
        };
        lo_ok && *v <= self.hi
    }
}

impl<T: fmt::Display> fmt::Display for Range<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo_open {
            write!(f, "above {} and at most {}", self.lo, self.hi)
        } else {
            write!(f, "from {} to {}", self.lo, self.hi)
        }
    }
}

/// What a setting is called: its config key (dotted, `training.pid`) and
/// its command-line flag; either may be absent.
#[derive(Debug, Clone, Copy)]
pub struct Name {
    pub key: Option<&'static str>,
    pub flag: Option<&'static str>,
}

/// The bound of one setting.
pub struct Bound<T> {
    pub name: Name,
    /// A function of the node for the bounds that depend on it (CPUs).
    pub range: fn(&Node) -> Range<T>,
}

const fn bound<T>(name: Name, range: fn(&Node) -> Range<T>) -> Bound<T> {
    Bound { name, range }
}
const fn both(key: &'static str, flag: &'static str) -> Name {
    Name {
        key: Some(key),
        flag: Some(flag),
    }
}
const fn key(key: &'static str) -> Name {
    Name {
        key: Some(key),
        flag: None,
    }
}
const fn flag(flag: &'static str) -> Name {
    Name {
        key: None,
        flag: Some(flag),
    }
}

const PERCENT: Range<Percent> = Range::above(Percent::from_fraction(0.0), Percent::ONE);
const TIMEOUT: Range<Dur> = Range::above(Dur::secs(0), MAX_TIMEOUT);
const MEMORY_RANGE: Range<ByteSize> = Range::from_to(ByteSize::mib(1), MAX_MEMORY);
const CONTROL_PERIOD_RANGE: Range<Dur> = Range::from_to(Dur::millis(10), Dur::secs(10));
const GRACE_RANGE: Range<Dur> = Range::from_to(Dur::secs(0), Dur(crate::job::MAX_KILL_GRACE));
const PID_RANGE: Range<i64> = Range::from_to(2, PID_MAX_LIMIT as i64);
const PIDS_RANGE: Range<u64> = Range::from_to(1, PID_MAX_LIMIT);
const WEIGHT_RANGE: Range<u64> = Range::from_to(1, 10_000);
const JOBS_RANGE: Range<u64> = Range::from_to(1, 1024);
const HELLO_RANGE: Range<Dur> = Range::from_to(Dur::millis(100), Dur::secs(3600));
const CONNECTIONS_RANGE: Range<u64> = Range::from_to(1, 65_536);

/// `agent.metrics_listen` / `--metrics-listen`, for [`Checker::loopback`].
pub const METRICS_LISTEN: Name = both("agent.metrics_listen", "--metrics-listen");

/// `on_event` / `--on-event`, for [`Checker::non_empty`].
pub const ON_EVENT: Name = both("on_event", "--on-event");

pub const MEMORY: Bound<ByteSize> = bound(both("memory", "--memory"), |_| MEMORY_RANGE);
pub const MEMORY_HIGH: Bound<ByteSize> =
    bound(both("memory_high", "--memory-high"), |_| MEMORY_RANGE);
pub const GAME_MEMORY: Bound<ByteSize> = bound(flag("--memory"), |_| MEMORY_RANGE);
pub const GPU_MEMORY: Bound<ByteSize> =
    bound(both("gpu_memory_limit", "--gpu-memory-limit"), |_| {
        MEMORY_RANGE
    });
pub const CPU: Bound<Cores> = bound(both("cpu", "--cpu"), |n| Range::from_to(Cores::MIN, n.cpus));
pub const GAME_CPU: Bound<Cores> = bound(flag("--cpu"), |n| Range::from_to(Cores::MIN, n.cpus));
pub const CPU_WEIGHT: Bound<u64> = bound(both("cpu_weight", "--cpu-weight"), |_| WEIGHT_RANGE);
pub const PIDS: Bound<u64> = bound(both("pids", "--pids"), |_| PIDS_RANGE);
pub const GAME_PIDS: Bound<u64> = bound(flag("--pids"), |_| PIDS_RANGE);
pub const JOB_TIMEOUT: Bound<Dur> = bound(both("timeout", "--timeout"), |_| TIMEOUT);
pub const GAME_TIMEOUT: Bound<Dur> = bound(both("game_timeout", "--timeout"), |_| TIMEOUT);
pub const KILL_GRACE: Bound<Dur> = bound(both("kill_grace", "--kill-grace"), |_| GRACE_RANGE);
pub const ON_EVENT_TIMEOUT: Bound<Dur> = bound(key("on_event_timeout"), |_| TIMEOUT);
pub const CONTROL_PERIOD: Bound<Dur> = bound(key("control_period"), |_| CONTROL_PERIOD_RANGE);
pub const MAX_CONCURRENT_JOBS: Bound<u64> = bound(key("max_concurrent_jobs"), |_| JOBS_RANGE);
pub const BUDGET: Bound<Percent> = bound(both("budget", "--budget"), |_| PERCENT);
pub const GPU_UTIL_LIMIT: Bound<Percent> =
    bound(both("gpu_util_limit", "--gpu-util-limit"), |_| PERCENT);
pub const DUTY_CYCLE: Bound<Percent> = bound(flag("--duty-cycle"), |_| PERCENT);
/// How often `enforcer top` asks the agent: faster only measures the
/// asking, slower is no longer a live view.
pub const TOP_INTERVAL: Bound<Dur> = bound(flag("--interval"), |_| {
    Range::from_to(Dur::millis(100), Dur::secs(60))
});
pub const HELLO_TIMEOUT: Bound<Dur> = bound(key("agent.hello_timeout"), |_| HELLO_RANGE);
pub const MAX_CONNECTIONS: Bound<u64> = bound(key("agent.max_connections"), |_| CONNECTIONS_RANGE);
pub const MAX_CONNECTIONS_PER_UID: Bound<u64> =
    bound(key("agent.max_connections_per_uid"), |_| CONNECTIONS_RANGE);
/// Pid 1 is refused: init is never the training, and following its
/// children would meter the whole node.
pub const TRAINING_PID: Bound<i64> = bound(both("training.pid", "--protect"), |_| PID_RANGE);

/// Facts about this node that some bounds depend on.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    /// The CPUs online (`/sys/devices/system/cpu/online`, else
    /// `available_parallelism`): the affinity mask and cgroup quota the
    /// enforcer itself runs under do not bound what a job may be given.
    pub cpus: Cores,
}

impl Node {
    pub fn detect() -> Self {
        let n = crate::cgroup::cpuset::CpuList::online()
            .map(|c| c.len())
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        Node {
            cpus: Cores::new(n as f64).unwrap_or(Cores::MIN),
        }
    }
}

/// Where the values being checked come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flags,
    Config,
}

/// One refused value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} {value}: must be {allowed}")]
pub struct Invalid {
    /// `--budget`, or the dotted key `training.pid`.
    pub name: &'static str,
    pub from: Source,
    pub value: String,
    pub allowed: String,
}

/// Several refused values, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct Refused(pub Vec<Invalid>);

/// Holds values from one source against their bounds, collecting every
/// refusal.
pub struct Checker {
    node: Node,
    source: Source,
    errors: Vec<Invalid>,
}

impl Checker {
    pub fn new(source: Source, node: Node) -> Self {
        Checker {
            node,
            source,
            errors: Vec::new(),
        }
    }

    fn name(&self, n: Name) -> &'static str {
        match self.source {
            Source::Flags => n.flag.or(n.key),
            Source::Config => n.key.or(n.flag),
        }
        .unwrap_or("?")
    }

    /// Refuses `value` (if given) outside its bound's range.
    pub fn check<T: Value>(&mut self, bound: &Bound<T>, value: Option<T>) {
        let Some(v) = value else { return };
        let range = (bound.range)(&self.node);
        if range.contains(&v) {
            return;
        }
        // Zero often means "unlimited" elsewhere: say plainly it is not.
        let allowed = if v.is_zero() {
            format!("greater than zero: {range}")
        } else {
            range.to_string()
        };
        self.refuse(bound.name, v.to_string(), allowed);
    }

    /// Refuses an empty path, a path with a `..` component, and (with
    /// `absolute`) a relative one.
    pub fn path(&mut self, name: Name, path: Option<&Path>, absolute: bool) {
        let Some(p) = path else { return };
        let why = if p.as_os_str().is_empty() {
            Some("non-empty")
        } else if p.components().any(|c| c == Component::ParentDir) {
            Some("a path without `..` components")
        } else if absolute && !p.is_absolute() {
            Some("an absolute path")
        } else {
            None
        };
        if let Some(why) = why {
            self.refuse(name, format!("{p:?}"), why.to_owned());
        }
    }

    /// Refuses an empty string (e.g. a hook that would run nothing).
    pub fn non_empty(&mut self, name: Name, value: Option<&str>, hint: &str) {
        if value.is_some_and(|v| v.trim().is_empty()) {
            self.refuse(name, "\"\"".to_owned(), format!("non-empty ({hint})"));
        }
    }

    /// Refuses an address that is not a loopback one (an endpoint without
    /// authentication must not be reachable from other hosts).
    pub fn loopback(&mut self, name: Name, addr: Option<std::net::SocketAddr>, any_allowed: bool) {
        if let Some(a) = addr
            && !a.ip().is_loopback()
            && !any_allowed
        {
            self.refuse(
                name,
                a.to_string(),
                "a loopback address (127.0.0.0/8 or [::1]) unless agent.metrics_non_loopback = true: the metrics endpoint has no authentication".to_owned(),
            );
        }
    }

    /// Refuses a soft memory limit above the hard one; blames the soft one
    /// when it is from this source, else the hard one.
    pub fn high_at_most_max(
        &mut self,
        high: Option<ByteSize>,
        high_here: bool,
        max: Option<ByteSize>,
    ) {
        let (Some(high), Some(max)) = (high, max) else {
            return;
        };
        if high <= max {
            return;
        }
        if high_here {
            self.refuse(
                MEMORY_HIGH.name,
                high.to_string(),
                format!("at most the hard limit memory = {max}"),
            );
        } else {
            self.refuse(
                MEMORY.name,
                max.to_string(),
                format!("at least the soft limit memory_high = {high}"),
            );
        }
    }

    pub fn refuse(&mut self, name: Name, value: String, allowed: String) {
        let name = self.name(name);
        self.errors.push(Invalid {
            name,
            from: self.source,
            value,
            allowed,
        });
    }

    pub fn finish(self) -> Result<(), Refused> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Refused(self.errors))
        }
    }

    pub fn into_errors(self) -> Vec<Invalid> {
        self.errors
    }
}

/// Holds every key of a parsed config against its bound.
pub fn config_errors(c: &crate::config::Config, node: Node) -> Vec<Invalid> {
    let mut v = Checker::new(Source::Config, node);
    v.check(&MEMORY, Some(c.memory));
    v.check(&MEMORY_HIGH, c.memory_high);
    v.high_at_most_max(c.memory_high, true, Some(c.memory));
    v.check(&CPU, c.cpu);
    v.check(&CPU_WEIGHT, c.cpu_weight);
    v.check(&PIDS, Some(c.pids));
    v.check(&JOB_TIMEOUT, Some(c.timeout));
    v.check(&GAME_TIMEOUT, Some(c.game_timeout));
    v.check(&KILL_GRACE, Some(c.kill_grace));
    v.check(&ON_EVENT_TIMEOUT, Some(c.on_event_timeout));
    v.check(&CONTROL_PERIOD, Some(c.control_period));
    v.check(
        &MAX_CONCURRENT_JOBS,
        Some(u64::from(c.max_concurrent_jobs.get())),
    );
    v.check(&BUDGET, Some(c.budget));
    v.check(&GPU_UTIL_LIMIT, Some(c.gpu_util_limit));
    v.check(&GPU_MEMORY, c.gpu_memory_limit);
    v.check(&TRAINING_PID, c.training.pid.map(i64::from));
    v.check(&HELLO_TIMEOUT, Some(c.agent.hello_timeout));
    v.check(&MAX_CONNECTIONS, Some(u64::from(c.agent.max_connections)));
    v.check(
        &MAX_CONNECTIONS_PER_UID,
        Some(u64::from(c.agent.max_connections_per_uid)),
    );
    if c.agent.max_connections_per_uid > c.agent.max_connections {
        v.refuse(
            MAX_CONNECTIONS_PER_UID.name,
            c.agent.max_connections_per_uid.to_string(),
            format!(
                "at most agent.max_connections = {}",
                c.agent.max_connections
            ),
        );
    }
    // Relative to each hierarchy's root, as in /proc/self/cgroup; a leading
    // `/` is optional (see cgroup::subtree).
    v.path(key("cgroup_root"), c.cgroup_root.as_deref(), false);
    v.path(key("training.cgroup"), c.training.cgroup.as_deref(), false);
    v.path(key("state_dir"), Some(&c.state_dir), true);
    v.loopback(
        METRICS_LISTEN,
        c.agent.metrics_listen,
        c.agent.metrics_non_loopback,
    );
    v.non_empty(
        ON_EVENT,
        c.on_event.as_deref(),
        "remove the key to run no hook",
    );
    v.into_errors()
}

/// The deadline `after` from `start`, never overflowing (the validator
/// keeps timeouts within [`MAX_TIMEOUT`]; this holds even without it).
pub fn deadline(start: std::time::Instant, after: Duration) -> std::time::Instant {
    start.checked_add(after.min(MAX_TIMEOUT.0)).unwrap_or(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            cpus: Cores::new(2.0).unwrap(),
        }
    }

    fn refused(f: impl FnOnce(&mut Checker)) -> String {
        let mut v = Checker::new(Source::Flags, node());
        f(&mut v);
        v.finish().expect_err("should be refused").to_string()
    }

    fn p(s: &str) -> Percent {
        s.parse().unwrap()
    }

    /// Each bad flag value: the message is `--flag value: must be range`.
    #[test]
    fn bad_flag_values_name_the_flag_the_value_and_the_range() {
        let cases: Vec<(String, &str)> = vec![
            (
                refused(|v| v.check(&BUDGET, Some(p("0%")))),
                "--budget 0%: must be greater than zero: above 0% and at most 100%",
            ),
            (
                refused(|v| v.check(&BUDGET, Some(p("101%")))),
                "--budget 101%: must be above 0% and at most 100%",
            ),
            (
                refused(|v| v.check(&BUDGET, Some(p("1000%")))),
                "--budget 1000%: must be above 0% and at most 100%",
            ),
            (
                refused(|v| v.check(&DUTY_CYCLE, Some(p("0%")))),
                "--duty-cycle 0%: must be greater than zero",
            ),
            (
                refused(|v| v.check(&GPU_UTIL_LIMIT, Some(p("150%")))),
                "--gpu-util-limit 150%: must be above 0% and at most 100%",
            ),
            (
                refused(|v| v.check(&CPU, Some("1e300".parse().unwrap()))),
                "--cpu 1e300: must be from 0.01 to 2",
            ),
            (
                refused(|v| v.check(&CPU, Some("3".parse().unwrap()))),
                "--cpu 3: must be from 0.01 to 2",
            ),
            (
                refused(|v| v.check(&PIDS, Some(u64::MAX))),
                "--pids 18446744073709551615: must be from 1 to 4194304",
            ),
            (
                refused(|v| v.check(&PIDS, Some(0))),
                "--pids 0: must be greater than zero",
            ),
            (
                refused(|v| v.check(&CPU_WEIGHT, Some(0))),
                "--cpu-weight 0: must be greater than zero: from 1 to 10000",
            ),
            (
                refused(|v| v.check(&MEMORY, Some(ByteSize(1)))),
                "--memory 1: must be from 1MiB to 1024TiB",
            ),
            (
                refused(|v| v.check(&MEMORY, Some(ByteSize(0)))),
                "--memory 0: must be greater than zero",
            ),
            (
                refused(|v| v.check(&JOB_TIMEOUT, Some(Dur::secs(366 * 86_400)))),
                "--timeout 366d: must be above 0s and at most 365d",
            ),
            (
                refused(|v| v.check(&JOB_TIMEOUT, Some(Dur::secs(0)))),
                "--timeout 0s: must be greater than zero",
            ),
            (
                refused(|v| v.check(&GAME_TIMEOUT, Some(Dur::secs(0)))),
                "--timeout 0s",
            ),
            (
                refused(|v| v.check(&TRAINING_PID, Some(-5))),
                "--protect -5: must be from 2 to 4194304",
            ),
            (
                refused(|v| v.check(&TRAINING_PID, Some(1))),
                "--protect 1: must be from 2 to 4194304",
            ),
            (
                refused(|v| {
                    v.loopback(METRICS_LISTEN, Some("0.0.0.0:9464".parse().unwrap()), false)
                }),
                "--metrics-listen 0.0.0.0:9464: must be a loopback address",
            ),
            (
                refused(|v| v.non_empty(ON_EVENT, Some(""), "x")),
                "--on-event \"\": must be non-empty",
            ),
            (
                refused(|v| {
                    v.high_at_most_max(Some(ByteSize::mib(2)), true, Some(ByteSize::mib(1)))
                }),
                "--memory-high 2MiB: must be at most the hard limit memory = 1MiB",
            ),
            (
                refused(|v| {
                    v.high_at_most_max(Some(ByteSize::mib(2)), false, Some(ByteSize::mib(1)))
                }),
                "--memory 1MiB: must be at least the soft limit memory_high = 2MiB",
            ),
        ];
        for (got, want) in cases {
            assert!(got.starts_with(want), "expected {want:?}, got {got:?}");
        }
    }

    #[test]
    fn values_at_the_edges_of_their_ranges_are_accepted() {
        let mut v = Checker::new(Source::Flags, node());
        v.check(&BUDGET, Some(p("100%")));
        v.check(&BUDGET, Some(p("0.01%")));
        v.check(&CPU, Some("2".parse().unwrap()));
        v.check(&CPU, Some("0.01".parse().unwrap()));
        v.check(&PIDS, Some(PID_MAX_LIMIT));
        v.check(&MEMORY, Some(ByteSize::mib(1)));
        v.check(&MEMORY, Some(MAX_MEMORY));
        v.check(&JOB_TIMEOUT, Some(MAX_TIMEOUT));
        v.check(&CONTROL_PERIOD, Some(Dur::millis(10)));
        v.check(&TRAINING_PID, Some(2));
        v.high_at_most_max(Some(ByteSize::mib(1)), true, Some(ByteSize::mib(1)));
        v.path(key("state_dir"), Some(Path::new("/run/enforcer")), true);
        v.path(key("cgroup_root"), Some(Path::new("eval.slice/x")), false);
        v.path(key("cgroup_root"), Some(Path::new("/")), false);
        v.loopback(
            METRICS_LISTEN,
            Some("127.0.0.1:9464".parse().unwrap()),
            false,
        );
        v.loopback(METRICS_LISTEN, Some("[::1]:9464".parse().unwrap()), false);
        // An operator's explicit choice for a trusted fleet network.
        v.loopback(METRICS_LISTEN, Some("0.0.0.0:9464".parse().unwrap()), true);
        assert_eq!(v.finish(), Ok(()));
    }

    #[test]
    fn config_values_are_named_by_their_key() {
        let mut v = Checker::new(Source::Config, node());
        v.check(&BUDGET, Some(p("0%")));
        v.check(&TRAINING_PID, Some(-5));
        let e = v.into_errors();
        assert_eq!(e[0].name, "budget");
        assert_eq!(e[1].name, "training.pid");
        assert_eq!(e[1].value, "-5");
    }

    #[test]
    fn deadlines_never_overflow() {
        let now = std::time::Instant::now();
        assert_eq!(deadline(now, Duration::MAX), now + MAX_TIMEOUT.0);
        assert_eq!(
            deadline(now, Duration::from_secs(3)),
            now + Duration::from_secs(3)
        );
    }
}
