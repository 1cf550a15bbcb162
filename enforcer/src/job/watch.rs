//! The limit-event watcher: a [`Monitor`] that turns the kernel's counters
//! into `memory_high`, `oom_kill` and `pids_max` events as they move.
//!
//! v2 counts `memory.events` `high`; v1 has no soft-limit event, so there a
//! `memory_high` event is emitted when usage crosses the soft limit upwards.
//! A job sitting at `memory.high` or `pids.max` bumps its counter on every
//! allocation or fork: those events are emitted on the first hit and then at
//! most once per [`REPEAT_EVERY`], carrying the running count. OOM kills are
//! rare and each matters, so every new one is reported.

use std::time::Duration;

use serde_json::json;

use super::monitor::{JobInfo, Monitor, MonitorError, Sample, TickContext, Wishes};
use crate::{events, events::Event, report::Report};

/// The shortest interval between two `memory_high` or two `pids_max`
/// events of one job.
pub const REPEAT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct LimitEvents {
    oom_kills: u64,
    high_events: u64,
    pids_max: u64,
    above_high: bool,
    /// v1: the peak usage seen at the last tick, to catch an excursion over
    /// the soft limit that began and ended between two ticks.
    last_peak: u64,
    last_high: Option<Duration>,
    last_pids: Option<Duration>,
}

/// Whether an event last emitted at `last` may be emitted again at `now`.
fn due(last: Option<Duration>, now: Duration) -> bool {
    last.is_none_or(|t| now.saturating_sub(t) >= REPEAT_EVERY)
}

impl Monitor for LimitEvents {
    fn name(&self) -> &'static str {
        "limit-events"
    }

    fn start(&mut self, _job: &JobInfo) -> Result<(), MonitorError> {
        Ok(())
    }

    fn tick(&mut self, sample: &Sample, ctx: &mut TickContext<'_>) -> Result<Wishes, MonitorError> {
        let s = &sample.stats;
        if let Some(n) = s.oom_kills
            && n > self.oom_kills
        {
            ctx.emit(Event::new(
                events::OOM_KILL,
                json!({ "oom_kills": n, "new": n - self.oom_kills, "memory_limit_bytes": s.memory_limit }),
            ));
            self.oom_kills = n;
        }
        let now = sample.elapsed;
        if let Some(n) = s.pids_max_events
            && n > self.pids_max
            && due(self.last_pids, now)
        {
            ctx.emit(Event::new(
                events::PIDS_MAX,
                json!({ "refused_forks": n, "new": n - self.pids_max, "pids_limit": s.pids_limit, "pids_current": s.pids_current }),
            ));
            self.pids_max = n;
            self.last_pids = Some(now);
        }
        match s.memory_high_events {
            Some(n) => {
                if n > self.high_events && due(self.last_high, now) {
                    ctx.emit(Event::new(
                        events::MEMORY_HIGH,
                        json!({ "throttle_events": n, "memory_high_bytes": s.memory_high_limit, "memory_current_bytes": s.memory_current }),
                    ));
                    self.high_events = n;
                    self.last_high = Some(now);
                }
            }
            None => {
                if let (Some(cur), Some(high)) = (s.memory_current, s.memory_high_limit) {
                    // A short-lived allocation can cross the soft limit and
                    // be freed between two polls: the peak, which only
                    // grows, still shows it.
                    let peak = s.memory_peak.unwrap_or(0);
                    let peak_crossed = peak > high && peak > self.last_peak;
                    self.last_peak = self.last_peak.max(peak);
                    let above = cur > high;
                    if (above || peak_crossed) && !self.above_high && due(self.last_high, now) {
                        ctx.emit(Event::new(
                            events::MEMORY_HIGH,
                            json!({ "memory_high_bytes": high, "memory_current_bytes": cur }),
                        ));
                        self.last_high = Some(now);
                    }
                    self.above_high = above;
                }
            }
        }
        Ok(Wishes::new())
    }

    fn finish(&mut self, _report: &mut Report) {}
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::cgroup::{JobCgroup, Stats, fs::CgFs, v2::V2Job};

    /// A v2 job handle on an empty temporary directory: the monitor only
    /// reads the stats it is handed.
    fn fake_job() -> (tempfile::TempDir, JobCgroup) {
        let d = tempfile::tempdir().unwrap();
        let cg = JobCgroup::V2(V2Job::open(
            CgFs::new(vec![d.path().to_owned()]),
            d.path().to_owned(),
            d.path().join("main"),
        ));
        (d, cg)
    }

    #[test]
    fn repeated_limit_hits_are_rate_limited_and_oom_kills_are_not() {
        let (_d, cg) = fake_job();
        let mut m = LimitEvents::default();
        let mut events = Vec::new();
        let mut tick = |m: &mut LimitEvents, at_ms: u64, high: u64, pids: u64, oom: u64| {
            let stats = Stats {
                memory_high_events: Some(high),
                pids_max_events: Some(pids),
                oom_kills: Some(oom),
                ..Stats::default()
            };
            let sample = Sample::new(Instant::now(), Duration::from_millis(at_ms), stats.clone());
            let mut ctx = TickContext::new(&cg, &mut events);
            m.tick(&sample, &mut ctx).unwrap();
        };
        tick(&mut m, 100, 5, 1, 0);
        tick(&mut m, 200, 9, 2, 1);
        tick(&mut m, 300, 12, 3, 2);
        tick(&mut m, 5200, 20, 3, 2);
        let kinds: Vec<&str> = events.iter().map(|e| &*e.event).collect();
        assert_eq!(
            kinds,
            [
                "pids_max",
                "memory_high",
                "oom_kill",
                "oom_kill",
                "pids_max",
                "memory_high"
            ],
            "{events:?}"
        );
        // Hits between two events are carried in the next one.
        assert_eq!(events[4].detail["refused_forks"], 3);
        assert_eq!(events[5].detail["throttle_events"], 20);
    }

    #[test]
    fn v1_soft_limit_excursion_between_two_polls_is_seen_through_the_peak() {
        let (_d, cg) = fake_job();
        let mut m = LimitEvents::default();
        let mut events = Vec::new();
        // v1: no high counter; usage is back under the soft limit at the
        // poll, but the peak shows the job went over it meanwhile.
        let stats = Stats {
            memory_current: Some(10 << 20),
            memory_peak: Some(60 << 20),
            memory_high_limit: Some(40 << 20),
            ..Stats::default()
        };
        for at_ms in [100, 200] {
            let sample = Sample::new(Instant::now(), Duration::from_millis(at_ms), stats.clone());
            let mut ctx = TickContext::new(&cg, &mut events);
            m.tick(&sample, &mut ctx).unwrap();
        }
        // One event for the one excursion: the same peak is not a new one.
        let kinds: Vec<&str> = events.iter().map(|e| &*e.event).collect();
        assert_eq!(kinds, ["memory_high"], "{events:?}");
    }
}
