//! A bounded history of timestamped samples of cumulative counters, and the
//! span a rate is taken over. Every rate the enforcer reports comes from two
//! samples of one [`Window`]: the newest, and an anchor chosen by one of the
//! rules below.

use std::{collections::VecDeque, fmt, time::Duration, time::Instant};

/// A monotonic point in time: an [`Instant`] for the agent's own clock, a
/// [`Duration`] since some origin for kernel timestamps and recorded runs.
pub trait Timestamp: Copy + Ord + fmt::Debug {
    /// Time from `earlier` to `self`; zero when `earlier` is later.
    fn since(self, earlier: Self) -> Duration;
}

impl Timestamp for Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

impl Timestamp for Duration {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_sub(earlier)
    }
}

/// Samples newer than `keep`, plus one at or before that horizon as the
/// anchor of a span that reaches back the whole `keep`.
#[derive(Debug, Clone)]
pub struct Window<T, S> {
    keep: Duration,
    samples: VecDeque<(T, S)>,
}

/// Two samples of a window and the time between them.
#[derive(Debug, Clone, Copy)]
pub struct Span<'a, T, S> {
    pub start: T,
    pub end: T,
    pub first: &'a S,
    pub last: &'a S,
}

impl<T: Timestamp, S> Span<'_, T, S> {
    pub fn elapsed(&self) -> Duration {
        self.end.since(self.start)
    }
}

impl<T: Timestamp, S> Window<T, S> {
    /// A window that can answer for spans up to `keep` long.
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample taken at `at`. One older than the newest is dropped
    /// (returns false): a window only moves forward. One taken at the same
    /// time as the newest is kept after it and is the newest from then on.
    pub fn push(&mut self, at: T, sample: S) -> bool {
        if self.samples.back().is_some_and(|(last, _)| at < *last) {
            return false;
        }
        self.samples.push_back((at, sample));
        while self.samples.len() > 2 && at.since(self.samples[1].0) >= self.keep {
            self.samples.pop_front();
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The newest sample.
    pub fn newest(&self) -> Option<(T, &S)> {
        self.samples.back().map(|(t, s)| (*t, s))
    }

    /// The oldest sample still held.
    pub fn oldest(&self) -> Option<(T, &S)> {
        self.samples.front().map(|(t, s)| (*t, s))
    }

    /// The span that ends at the newest sample and reaches back `length`:
    /// from the latest sample at or before its start, or from the oldest one
    /// when the history is shorter. `None` when the window is empty; a
    /// single sample gives an empty span.
    pub fn trailing(&self, length: Duration) -> Option<Span<'_, T, S>> {
        let (end, last) = self.samples.back()?;
        let (start, first) = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| end.since(*t) >= length)
            .or_else(|| self.samples.front())?;
        Some(Span {
            start: *start,
            end: *end,
            first,
            last,
        })
    }

    /// The span that ends at the newest sample and starts at `from`: at the
    /// first sample taken at or after it, or, when none was, at the latest
    /// one before it.
    pub fn since(&self, from: T) -> Option<Span<'_, T, S>> {
        let (end, last) = self.samples.back()?;
        let (start, first) = self
            .samples
            .iter()
            .find(|(t, _)| *t >= from)
            .or_else(|| self.samples.iter().rev().find(|(t, _)| *t < from))?;
        Some(Span {
            start: *start,
            end: *end,
            first,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn window(times: &[u64]) -> Window<Duration, u64> {
        let mut w = Window::new(ms(1000));
        for &t in times {
            w.push(ms(t), t);
        }
        w
    }

    #[test]
    fn an_empty_window_has_no_span_and_one_sample_an_empty_one() {
        let w = window(&[]);
        assert!(w.trailing(ms(1000)).is_none());
        assert!(w.since(ms(0)).is_none());
        let w = window(&[500]);
        let s = w.trailing(ms(1000)).expect("a span");
        assert_eq!(s.elapsed(), Duration::ZERO);
    }

    #[test]
    fn trailing_span_starts_at_the_latest_sample_at_or_before_its_start() {
        let w = window(&[0, 100, 250, 400, 1300]);
        let s = w.trailing(ms(1000)).expect("a span");
        // 1300 − 1000 = 300: the latest sample at or before it is 250.
        assert_eq!((s.start, *s.first, *s.last), (ms(250), 250, 1300));
        // A history shorter than asked: from the oldest sample held.
        let s = w.trailing(ms(5000)).expect("a span");
        assert_eq!(s.start, ms(250));
    }

    #[test]
    fn history_keeps_one_anchor_at_or_before_the_horizon() {
        let w = window(&(0..=30).map(|i| i * 100).collect::<Vec<_>>());
        // 3000 − 1000 = 2000 is the anchor; nothing older is kept.
        assert_eq!(w.oldest().map(|(t, _)| t), Some(ms(2000)));
        assert_eq!(w.trailing(ms(1000)).expect("a span").elapsed(), ms(1000));
    }

    #[test]
    fn since_starts_at_the_first_sample_from_then_or_the_last_before() {
        let w = window(&[0, 100, 200, 300]);
        assert_eq!(w.since(ms(150)).expect("a span").start, ms(200));
        assert_eq!(w.since(ms(400)).expect("a span").start, ms(300));
    }

    #[test]
    fn an_older_sample_is_dropped_and_a_simultaneous_one_becomes_the_newest() {
        let mut w = window(&[0, 100]);
        assert!(!w.push(ms(50), 7));
        assert!(w.push(ms(100), 8));
        assert_eq!(w.newest(), Some((ms(100), &8)));
    }

    #[test]
    fn instants_are_timestamps_too() {
        let t0 = Instant::now();
        let mut w = Window::new(ms(1000));
        w.push(t0, 0u64);
        w.push(t0 + ms(600), 1);
        assert_eq!(w.trailing(ms(1000)).expect("a span").elapsed(), ms(600));
        assert_eq!(t0.since(t0 + ms(1)), Duration::ZERO);
    }
}
