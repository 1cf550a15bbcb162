//! Stolen fraction over sliding windows and time over budget, computed from
//! successive cumulative readings of one job's steal and the training
//! workload's on-CPU time. Pure: no kernel, no clock; fed by the caller.
//!
//! stolen fraction = steal / (training on-CPU time + steal), over a window
//! (brief §2). A window in which training neither ran nor waited has a
//! fraction of 0: nothing was stolen.

use std::{collections::VecDeque, time::Duration};

/// The short window, the one held against the budget.
pub const SHORT_WINDOW: Duration = Duration::from_secs(1);
/// The long window, for reports and a steadier view.
pub const LONG_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    at: Duration,
    steal_ns: u64,
    training_on_cpu_ns: u64,
}

/// A change of the budget state, reported once per transition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetEvent {
    /// The short-window stolen fraction went above the budget.
    Exceeded { fraction: f64 },
    /// It came back to or under the budget.
    Recovered { fraction: f64, over_for: Duration },
}

/// Accountant of one job's steal against a budget.
#[derive(Debug, Clone)]
pub struct StealWindow {
    budget: f64,
    first: Option<Sample>,
    samples: VecDeque<Sample>,
    over_since: Option<Duration>,
    over_budget: Duration,
}

fn fraction(from: &Sample, to: &Sample) -> f64 {
    let steal = to.steal_ns.saturating_sub(from.steal_ns) as f64;
    let ran = to
        .training_on_cpu_ns
        .saturating_sub(from.training_on_cpu_ns) as f64;
    if steal + ran == 0.0 {
        0.0
    } else {
        steal / (steal + ran)
    }
}

impl StealWindow {
    /// `budget` is a fraction (0.05 for 5 %).
    pub fn new(budget: f64) -> Self {
        Self {
            budget,
            first: None,
            samples: VecDeque::new(),
            over_since: None,
            over_budget: Duration::ZERO,
        }
    }

    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// Adds a cumulative reading taken at `at` (a monotonic time). Returns
    /// the budget transition it caused, if any.
    pub fn push(
        &mut self,
        at: Duration,
        steal_ns: u64,
        training_on_cpu_ns: u64,
    ) -> Option<BudgetEvent> {
        let sample = Sample {
            at,
            steal_ns,
            training_on_cpu_ns,
        };
        let previous = self.samples.back().copied();
        if previous.is_some_and(|p| at <= p.at) {
            return None;
        }
        self.first.get_or_insert(sample);
        self.samples.push_back(sample);
        // Keep one sample at or before the long window's start.
        while self.samples.len() > 2 && at.saturating_sub(self.samples[1].at) >= LONG_WINDOW {
            self.samples.pop_front();
        }
        let short = self.fraction_over(SHORT_WINDOW)?;
        let over = short > self.budget;
        // The state held since the previous reading decides that interval.
        if let (Some(_), Some(prev)) = (self.over_since, previous) {
            self.over_budget += at - prev.at;
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
                    over_for: at - since,
                })
            }
            _ => None,
        }
    }

    /// Stolen fraction over the last `window` (or over what is known, when
    /// the readings do not reach back that far); `None` before two readings.
    pub fn fraction_over(&self, window: Duration) -> Option<f64> {
        let last = self.samples.back()?;
        let start = last.at.saturating_sub(window);
        // The latest sample at or before the window's start, else the oldest.
        let from = self
            .samples
            .iter()
            .rev()
            .find(|s| s.at <= start)
            .or_else(|| self.samples.front())?;
        (from.at < last.at).then(|| fraction(from, last))
    }

    /// Stolen fraction since the first reading.
    pub fn fraction_total(&self) -> Option<f64> {
        let (first, last) = (self.first?, self.samples.back()?);
        (first.at < last.at).then(|| fraction(&first, last))
    }

    /// Steal since the first reading, ns.
    pub fn steal_ns(&self) -> u64 {
        match (self.first, self.samples.back()) {
            (Some(f), Some(l)) => l.steal_ns.saturating_sub(f.steal_ns),
            _ => 0,
        }
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
    fn out_of_order_readings_are_ignored() {
        let mut w = StealWindow::new(0.05);
        w.push(secs(1.0), 0, 0);
        w.push(secs(0.5), 10 * MS, 0);
        w.push(secs(2.0), 10 * MS, 90 * MS);
        assert_eq!(w.fraction_total(), Some(0.1));
    }
}
