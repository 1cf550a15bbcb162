//! The limit-event watcher: a [`Monitor`] that turns the kernel's counters
//! into `memory_high`, `oom_kill` and `pids_max` events as they move.
//!
//! v2 counts `memory.events` `high`; v1 has no soft-limit event, so there a
//! `memory_high` event is emitted when usage crosses the soft limit upwards.

use serde_json::json;

use super::monitor::{JobInfo, Monitor, MonitorError, TickContext};
use crate::{events, events::Event, report::Report};

#[derive(Debug, Default)]
pub struct LimitEvents {
    oom_kills: u64,
    high_events: u64,
    pids_max: u64,
    above_high: bool,
}

impl Monitor for LimitEvents {
    fn name(&self) -> &'static str {
        "limit-events"
    }

    fn start(&mut self, _job: &JobInfo) -> Result<(), MonitorError> {
        Ok(())
    }

    fn tick(&mut self, ctx: &mut TickContext<'_>) -> Result<(), MonitorError> {
        let s = ctx.stats.clone();
        if let Some(n) = s.oom_kills
            && n > self.oom_kills
        {
            ctx.emit(Event::new(
                events::OOM_KILL,
                json!({ "oom_kills": n, "new": n - self.oom_kills, "memory_limit_bytes": s.memory_limit }),
            ));
            self.oom_kills = n;
        }
        if let Some(n) = s.pids_max_events
            && n > self.pids_max
        {
            ctx.emit(Event::new(
                events::PIDS_MAX,
                json!({ "refused_forks": n, "new": n - self.pids_max, "pids_limit": s.pids_limit, "pids_current": s.pids_current }),
            ));
            self.pids_max = n;
        }
        match s.memory_high_events {
            Some(n) => {
                if n > self.high_events {
                    ctx.emit(Event::new(
                        events::MEMORY_HIGH,
                        json!({ "throttle_events": n, "memory_high_bytes": s.memory_high_limit, "memory_current_bytes": s.memory_current }),
                    ));
                    self.high_events = n;
                }
            }
            None => {
                if let (Some(cur), Some(high)) = (s.memory_current, s.memory_high_limit) {
                    let above = cur > high;
                    if above && !self.above_high {
                        ctx.emit(Event::new(
                            events::MEMORY_HIGH,
                            json!({ "memory_high_bytes": high, "memory_current_bytes": cur }),
                        ));
                    }
                    self.above_high = above;
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self, _report: &mut Report) {}
}
