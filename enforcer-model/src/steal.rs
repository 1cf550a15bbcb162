//! One job's stolen fraction over sliding windows, over the whole job, and
//! its time over budget: the numbers the steal meter logs and reports, and
//! the budget loop's report when the meter has none.
//!
//! Time over budget: the interval between two readings counts as over when
//! the short-window fraction was over the budget at the first of them (the
//! state held since the previous reading decides that interval).

use std::time::Duration;

use crate::{
    counters::{StealCounters, StealDelta},
    window::{Span, Timestamp, Window},
};

/// The short window, the one held against the budget.
pub const SHORT_WINDOW: Duration = Duration::from_secs(1);
/// The long window, for reports and a steadier view.
pub const LONG_WINDOW: Duration = Duration::from_secs(10);

/// A change of the budget state, reported once per transition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetEvent {
    /// The short-window stolen fraction went above the budget.
    Exceeded { fraction: f64 },
    /// It came back to or under the budget.
    Recovered { fraction: f64, over_for: Duration },
}

/// Accountant of one job's steal against a budget. `T` is the clock of the
/// readings (a kernel timestamp by default).
#[derive(Debug, Clone)]
pub struct StealWindow<T = Duration> {
    budget: f64,
    first: Option<(T, StealCounters)>,
    window: Window<T, StealCounters>,
    over_since: Option<T>,
    over_budget: Duration,
}

impl<T: Timestamp> StealWindow<T> {
    /// `budget` is a fraction (0.05 for 5 %).
    pub fn new(budget: f64) -> Self {
        Self {
            budget,
            first: None,
            window: Window::new(LONG_WINDOW),
            over_since: None,
            over_budget: Duration::ZERO,
        }
    }

    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// Adds a cumulative reading in nanoseconds; see [`StealWindow::record`].
    pub fn push(&mut self, at: T, steal_ns: u64, training_on_cpu_ns: u64) -> Option<BudgetEvent> {
        self.record(at, StealCounters::from_ns(steal_ns, training_on_cpu_ns))
    }

    /// Adds a cumulative reading taken at `at`. Returns the budget
    /// transition it caused, if any. A reading not after the previous one is
    /// ignored.
    pub fn record(&mut self, at: T, counters: StealCounters) -> Option<BudgetEvent> {
        let previous = self.window.newest().map(|(t, _)| t);
        if previous.is_some_and(|p| at <= p) {
            return None;
        }
        self.first.get_or_insert((at, counters));
        self.window.push(at, counters);
        let short = self.fraction_over(SHORT_WINDOW)?;
        let over = short > self.budget;
        if let (Some(_), Some(prev)) = (self.over_since, previous) {
            self.over_budget += at.since(prev);
        }
        match (over, self.over_since) {
            (true, None) => {
                self.over_since = Some(at);
                Some(BudgetEvent::Exceeded { fraction: short })
            }
            (false, Some(since)) => {
                self.over_since = None;
                Some(BudgetEvent::Recovered {
                    fraction: short,
                    over_for: at.since(since),
                })
            }
            _ => None,
        }
    }

    /// The span of readings over the last `length` (or over what is known,
    /// when the readings do not reach back that far).
    pub fn span(&self, length: Duration) -> Option<Span<'_, T, StealCounters>> {
        self.window.trailing(length)
    }

    /// Stolen fraction over the last `window` (or over what is known, when
    /// the readings do not reach back that far); `None` before two readings.
    /// A span in which the training neither ran nor waited has a fraction
    /// of 0: nothing was stolen.
    pub fn fraction_over(&self, window: Duration) -> Option<f64> {
        let span = self.span(window)?;
        (span.elapsed() > Duration::ZERO).then(|| span.last.since(*span.first).fraction_or_zero())
    }

    /// Whether no reading was taken yet.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Steal and training time since the first reading.
    pub fn total(&self) -> Option<StealDelta> {
        let (_, first) = self.first?;
        let (_, last) = self.window.newest()?;
        Some(last.since(first))
    }

    /// Stolen fraction since the first reading; `None` before two readings.
    pub fn fraction_total(&self) -> Option<f64> {
        let (start, _) = self.first?;
        let (end, _) = self.window.newest()?;
        (start < end).then(|| self.total().unwrap_or_default().fraction_or_zero())
    }

    /// Steal since the first reading, ns.
    pub fn steal_ns(&self) -> u64 {
        self.total()
            .map_or(0, |d| u64::try_from(d.steal.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Time the short-window fraction spent above the budget.
    pub fn over_budget(&self) -> Duration {
        self.over_budget
    }

    /// Whether the short window is above the budget now.
    pub fn is_over(&self) -> bool {
        self.over_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn fraction_is_steal_over_steal_plus_training_cpu() {
        let mut w = StealWindow::new(0.05);
        w.push(secs(0.0), 0, 0);
        w.push(secs(1.0), 250 * MS, 750 * MS);
        assert_eq!(w.fraction_over(SHORT_WINDOW), Some(0.25));
        assert_eq!(w.fraction_total(), Some(0.25));
        assert_eq!(w.steal_ns(), 250 * MS);
    }

    #[test]
    fn no_reading_pair_means_no_fraction_and_idle_training_means_zero() {
        let mut w = StealWindow::new(0.05);
        assert_eq!(w.fraction_over(SHORT_WINDOW), None);
        assert_eq!(w.fraction_total(), None);
        assert_eq!(w.steal_ns(), 0);
        w.push(secs(0.0), 0, 0);
        assert_eq!(w.fraction_over(SHORT_WINDOW), None);
        w.push(secs(1.0), 0, 0);
        assert_eq!(w.fraction_over(SHORT_WINDOW), Some(0.0));
    }

    #[test]
    fn short_window_forgets_old_steal_long_window_and_total_keep_it() {
        let mut w = StealWindow::new(0.05);
        // 1 s of heavy steal, then 9 s without any, 100 ms readings.
        let mut steal = 0;
        let mut cpu = 0;
        for i in 0..=100u64 {
            if i > 0 && i <= 10 {
                steal += 50 * MS;
                cpu += 50 * MS;
            } else if i > 10 {
                cpu += 100 * MS;
            }
            w.push(Duration::from_millis(i * 100), steal, cpu);
        }
        assert_eq!(w.fraction_over(SHORT_WINDOW), Some(0.0));
        let long = w.fraction_over(LONG_WINDOW).unwrap();
        assert!((long - 0.5 / 10.0).abs() < 1e-9, "{long}");
        let total = w.fraction_total().unwrap();
        assert!((total - 0.05).abs() < 1e-9, "{total}");
    }

    #[test]
    fn exceeding_and_recovering_are_reported_once_each_with_time_over_budget() {
        let mut w = StealWindow::new(0.10);
        let mut events = Vec::new();
        let (mut steal, mut cpu) = (0, 0);
        for i in 1..=40u64 {
            // 20 % steal from 1 s to 2 s, none otherwise.
            if (10..20).contains(&i) {
                steal += 20 * MS;
                cpu += 80 * MS;
            } else {
                cpu += 100 * MS;
            }
            if let Some(e) = w.push(Duration::from_millis(i * 100), steal, cpu) {
                events.push(e);
            }
        }
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[0], BudgetEvent::Exceeded { .. }));
        let BudgetEvent::Recovered { over_for, .. } = events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(over_for, w.over_budget());
        assert!(
            over_for >= secs(0.9) && over_for <= secs(1.6),
            "{over_for:?}"
        );
        assert!(!w.is_over());
    }

    #[test]
    fn time_over_budget_counts_the_intervals_that_started_over() {
        let mut w = StealWindow::new(0.10);
        w.push(secs(0.0), 0, 0);
        // Over from the first judged reading on: 0.1 → 0.3 counts, not 0 → 0.1.
        w.push(secs(0.1), 50 * MS, 50 * MS);
        assert_eq!(w.over_budget(), Duration::ZERO);
        w.push(secs(0.3), 100 * MS, 100 * MS);
        assert_eq!(w.over_budget(), secs(0.2));
        assert!(w.is_over());
    }

    #[test]
    fn a_meter_reset_reads_as_no_steal_not_as_a_jump() {
        let mut w = StealWindow::new(0.05);
        w.push(secs(0.0), 500 * MS, 500 * MS);
        w.push(secs(0.5), 0, 0);
        w.push(secs(1.0), 0, 100 * MS);
        assert_eq!(w.fraction_over(SHORT_WINDOW), Some(0.0));
        assert_eq!(w.steal_ns(), 0);
        assert_eq!(w.over_budget(), Duration::ZERO);
    }

    #[test]
    fn out_of_order_readings_are_ignored() {
        let mut w = StealWindow::new(0.05);
        w.push(secs(1.0), 0, 0);
        w.push(secs(0.5), 10 * MS, 0);
        w.push(secs(1.0), 10 * MS, 0);
        w.push(secs(2.0), 10 * MS, 90 * MS);
        assert_eq!(w.fraction_total(), Some(0.1));
    }
}
