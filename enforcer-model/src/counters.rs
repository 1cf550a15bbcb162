//! The counters the enforcer samples, and the rates derived from two
//! samples of them.
//!
//! stolen fraction = steal ÷ (training on-CPU time + steal) over a span: the
//! share of the time the training wanted a CPU that it spent waiting behind
//! the job. Counters are cumulative; one that went back between two samples
//! (a meter that restarted, a map entry recreated) is read as no change
//! rather than as a huge one.

use std::time::Duration;

/// Cumulative counters for one job, as read from the steal meter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StealCounters {
    /// Training run-queue wait attributed to this job.
    pub steal: Duration,
    /// Training on-CPU time over the same span.
    pub training_on_cpu: Duration,
}

impl StealCounters {
    pub fn from_ns(steal_ns: u64, training_on_cpu_ns: u64) -> Self {
        Self {
            steal: Duration::from_nanos(steal_ns),
            training_on_cpu: Duration::from_nanos(training_on_cpu_ns),
        }
    }

    /// What happened from `earlier` to `self`.
    pub fn since(self, earlier: Self) -> StealDelta {
        StealDelta {
            steal: self.steal.saturating_sub(earlier.steal),
            training_on_cpu: self.training_on_cpu.saturating_sub(earlier.training_on_cpu),
        }
    }
}

/// Steal and training on-CPU time over one span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StealDelta {
    pub steal: Duration,
    pub training_on_cpu: Duration,
}

impl StealDelta {
    /// The time the training wanted a CPU: ran or waited behind the job.
    pub fn training_time(self) -> Duration {
        self.steal + self.training_on_cpu
    }

    /// The stolen fraction; `None` when the training neither ran nor waited.
    pub fn fraction(self) -> Option<f64> {
        let total = self.training_time().as_nanos();
        (total > 0).then(|| self.steal.as_nanos() as f64 / total as f64)
    }

    /// The stolen fraction, 0 when the training neither ran nor waited:
    /// nothing was stolen.
    pub fn fraction_or_zero(self) -> f64 {
        self.fraction().unwrap_or(0.0)
    }
}

/// Cumulative on-CPU time per CPU, indexed by CPU number.
pub type PerCpuTime = Vec<Duration>;

/// Cores used on average: CPU time `used` over `elapsed` wall time; `None`
/// over an empty span.
pub fn cores(used: Duration, elapsed: Duration) -> Option<f64> {
    (!elapsed.is_zero()).then(|| used.as_secs_f64() / elapsed.as_secs_f64())
}

/// Cores used on `cpu` from `earlier` to `later`, `elapsed` apart. A CPU
/// missing from a reading (it came online later) counts as unused.
pub fn cores_on(earlier: &[Duration], later: &[Duration], cpu: usize, elapsed: Duration) -> f64 {
    let a = earlier.get(cpu).copied().unwrap_or_default();
    let b = later.get(cpu).copied().unwrap_or_default();
    cores(b.saturating_sub(a), elapsed).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn fraction_is_steal_over_steal_plus_training_cpu() {
        let d = StealCounters::from_ns(250_000_000, 750_000_000).since(StealCounters::default());
        assert_eq!(d.fraction(), Some(0.25));
        assert_eq!(d.training_time(), 1000 * MS);
    }

    #[test]
    fn an_idle_training_has_no_fraction_and_nothing_stolen() {
        let c = StealCounters::from_ns(5, 7);
        assert_eq!(c.since(c).fraction(), None);
        assert_eq!(c.since(c).fraction_or_zero(), 0.0);
    }

    #[test]
    fn a_counter_that_went_back_counts_as_no_change() {
        let before = StealCounters::from_ns(900, 900);
        let after = StealCounters::from_ns(100, 1000);
        let d = after.since(before);
        assert_eq!(d.steal, Duration::ZERO);
        assert_eq!(d.training_on_cpu, Duration::from_nanos(100));
        assert_eq!(d.fraction(), Some(0.0));
    }

    #[test]
    fn fraction_of_whole_nanoseconds_is_exact() {
        let d = StealCounters::from_ns(10_000_000, 90_000_000).since(StealCounters::default());
        assert_eq!(d.fraction(), Some(0.1));
    }

    #[test]
    fn per_cpu_cores_over_a_span_with_missing_and_reset_cpus() {
        let a = vec![100 * MS, 500 * MS];
        let b = vec![600 * MS, 400 * MS, 200 * MS];
        let span = 1000 * MS;
        assert_eq!(cores_on(&a, &b, 0, span), 0.5);
        assert_eq!(cores_on(&a, &b, 1, span), 0.0, "went back");
        assert_eq!(cores_on(&a, &b, 2, span), 0.2, "came online");
        assert_eq!(cores_on(&a, &b, 0, Duration::ZERO), 0.0, "empty span");
        assert_eq!(cores(500 * MS, Duration::ZERO), None);
    }
}
