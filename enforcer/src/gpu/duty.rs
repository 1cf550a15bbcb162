//! The freezer duty cycle: run a cgroup for a fraction of each period and
//! keep it frozen for the rest. Generic (any [`Freezer`]): it is the
//! mechanism behind the GPU utilisation cap, and usable on its own to give a
//! job a hard share of wall time.
//!
//! A dedicated thread drives it on absolute deadlines (`start + k * period`),
//! so timing errors do not accumulate and the async runtime's scheduling does
//! not stretch the frozen phase. The cgroup is always left thawed when the
//! driver stops or is dropped.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A cgroup that can be frozen and thawed.
pub trait Freezer: Send + 'static {
    fn freeze(&self, frozen: bool) -> Result<(), FreezeError>;
    /// For messages: the cgroup this freezes.
    fn describe(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("writing {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: &'static str,
        source: io::Error,
    },
    #[error("{} has neither cgroup.freeze (v2) nor freezer.state (v1 freezer)", dir.display())]
    NoFreezer { dir: PathBuf },
    /// A freezer from another layer (e.g. the job cgroup handle).
    #[error("{0}")]
    Backend(String),
}

/// A fraction of each period, in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct RunFraction(f64);

impl RunFraction {
    pub const FULL: RunFraction = RunFraction(1.0);

    /// Clamps into `[0, 1]`; NaN becomes 1 (never freeze on a bad input).
    pub fn new(f: f64) -> Self {
        if f.is_nan() {
            RunFraction(1.0)
        } else {
            RunFraction(f.clamp(0.0, 1.0))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

/// What the driver did, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DutyStats {
    /// Periods completed.
    pub periods: u64,
    /// Periods in which the cgroup was frozen for some time.
    pub frozen_periods: u64,
    /// Total time the cgroup was (asked to be) frozen.
    pub frozen: Duration,
}

#[derive(Debug)]
struct Shared {
    run_fraction: RunFraction,
    stop: bool,
    stats: DutyStats,
    error: Option<String>,
}

/// A running duty cycle. Dropping it (or [`DutyCycle::stop`]) thaws the
/// cgroup and ends the thread.
#[derive(Debug)]
pub struct DutyCycle {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    what: String,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // The driver thread never panics while holding the lock; if it did, the
    // state is still plain data worth reading.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DutyCycle {
    /// Starts driving `freezer`: each `period`, thawed for `run_fraction` of
    /// it, then frozen for the rest.
    pub fn start(
        freezer: impl Freezer,
        period: Duration,
        run_fraction: RunFraction,
    ) -> io::Result<Self> {
        let what = freezer.describe();
        let shared = Arc::new((
            Mutex::new(Shared {
                run_fraction,
                stop: false,
                stats: DutyStats::default(),
                error: None,
            }),
            Condvar::new(),
        ));
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("duty-cycle".into())
            .spawn(move || drive(&freezer, period, &s))?;
        tracing::debug!(cgroup = %what, period_ms = period.as_millis(), run_fraction = run_fraction.get(), "duty cycle started");
        Ok(DutyCycle {
            shared,
            thread: Some(thread),
            what,
        })
    }

    /// Changes the fraction from the next period on.
    pub fn set_run_fraction(&self, f: RunFraction) {
        lock(&self.shared.0).run_fraction = f;
        self.shared.1.notify_all();
    }

    pub fn run_fraction(&self) -> RunFraction {
        lock(&self.shared.0).run_fraction
    }

    pub fn stats(&self) -> DutyStats {
        lock(&self.shared.0).stats
    }

    /// The freezer error that stopped the driver, if any (e.g. the cgroup
    /// was removed when the job ended).
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.0).error.clone()
    }

    /// Stops the driver, leaving the cgroup thawed; returns what it did, or
    /// the error that stopped it earlier.
    pub fn stop(mut self) -> Result<DutyStats, String> {
        self.shutdown();
        let s = lock(&self.shared.0);
        match &s.error {
            Some(e) => Err(e.clone()),
            None => Ok(s.stats),
        }
    }

    fn shutdown(&mut self) {
        lock(&self.shared.0).stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(cgroup = %self.what, "duty-cycle thread panicked");
            }
            let s = lock(&self.shared.0).stats;
            tracing::info!(
                cgroup = %self.what,
                periods = s.periods,
                frozen_periods = s.frozen_periods,
                frozen_s = s.frozen.as_secs_f64(),
                "duty cycle ended"
            );
        }
    }
}

impl Drop for DutyCycle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits until `deadline` or a stop request; true when asked to stop.
fn wait_until(shared: &(Mutex<Shared>, Condvar), deadline: Instant) -> bool {
    let (m, cv) = shared;
    let mut g = lock(m);
    loop {
        if g.stop {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        g = cv
            .wait_timeout(g, deadline - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// Puts the calling thread in `SCHED_FIFO` at the lowest priority, when
/// allowed. The driver must wake on time even when the job it freezes has a
/// high CPU weight or the host is loaded: a late freeze lets the job run past
/// its share. It runs a few microseconds per half-period, so the real-time
/// class costs other tasks nothing measurable.
fn realtime_if_allowed() -> bool {
    match crate::sched::set_thread_policy(0, libc::SCHED_FIFO, 1) {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(
                %error,
                "duty-cycle thread stays in the normal class (no SCHED_FIFO): timing may slip under load"
            );
            false
        }
    }
}

fn drive(freezer: &impl Freezer, period: Duration, shared: &(Mutex<Shared>, Condvar)) {
    realtime_if_allowed();
    let mut frozen = false;
    let set = |want: bool, frozen: &mut bool| -> Result<(), FreezeError> {
        if *frozen != want {
            freezer.freeze(want)?;
            *frozen = want;
        }
        Ok(())
    };
    let mut start = Instant::now();
    // Each period begins with its frozen part: a job whose duty cycle starts
    // as it starts then does not run free for its first run phase on top of
    // the moments before the driver existed.
    let outcome = loop {
        let fraction = lock(&shared.0).run_fraction.get();
        let period_end = start + period;
        let thaw_at = start + period.mul_f64(1.0 - fraction);
        let freeze_now = thaw_at > start;
        let froze_at = Instant::now();
        if freeze_now {
            if let Err(e) = set(true, &mut frozen) {
                break Err(e);
            }
            if wait_until(shared, thaw_at) {
                break Ok(());
            }
        }
        let frozen_for = Instant::now().saturating_duration_since(froze_at);
        if let Err(e) = set(false, &mut frozen) {
            break Err(e);
        }
        if wait_until(shared, period_end) {
            break Ok(());
        }
        {
            let mut g = lock(&shared.0);
            g.stats.periods += 1;
            if freeze_now {
                g.stats.frozen_periods += 1;
                g.stats.frozen += frozen_for;
            }
        }
        start = period_end;
        // A stall longer than a period (a stopped host, a debugger): start
        // afresh rather than racing through missed periods.
        if Instant::now() > start + period {
            start = Instant::now();
        }
    };
    // Always leave the cgroup thawed.
    let thawed = if frozen {
        freezer.freeze(false)
    } else {
        Ok(())
    };
    let error = outcome.err().or(thawed.err());
    if let Some(e) = error {
        tracing::warn!(cgroup = %freezer.describe(), error = %e, "duty cycle stopped");
        lock(&shared.0).error = Some(e.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each freeze/thaw with its time.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(Instant, bool)>>>);

    impl Freezer for Recorder {
        fn freeze(&self, frozen: bool) -> Result<(), FreezeError> {
            self.0.lock().unwrap().push((Instant::now(), frozen));
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    /// Fraction of `[from, to]` the recorded freezer spent thawed.
    fn thawed_share(events: &[(Instant, bool)], from: Instant, to: Instant) -> f64 {
        let mut thawed = Duration::ZERO;
        let mut state_frozen = false;
        let mut t = from;
        for &(at, frozen) in events {
            if at <= from {
                state_frozen = frozen;
                continue;
            }
            let at = at.min(to);
            if !state_frozen {
                thawed += at - t;
            }
            t = at;
            state_frozen = frozen;
        }
        if !state_frozen && to > t {
            thawed += to - t;
        }
        thawed.as_secs_f64() / (to - from).as_secs_f64()
    }

    #[test]
    fn driver_thaws_for_the_run_fraction_of_each_period_and_ends_thawed() {
        let rec = Recorder::default();
        let d = DutyCycle::start(
            rec.clone(),
            Duration::from_millis(20),
            RunFraction::new(0.3),
        )
        .unwrap();
        let from = Instant::now();
        std::thread::sleep(Duration::from_millis(400));
        let to = Instant::now();
        d.set_run_fraction(RunFraction::FULL);
        std::thread::sleep(Duration::from_millis(100));
        let stats = d.stop().unwrap();
        let events = rec.0.lock().unwrap().clone();
        let share = thawed_share(&events, from, to);
        // Timer jitter on a loaded 2-CPU host: generous, but 0.3 vs 1.0 or
        // 0.5 would fail.
        assert!((0.2..=0.42).contains(&share), "thawed share {share}");
        assert!(stats.periods >= 10, "{stats:?}");
        assert!(stats.frozen_periods >= 10, "{stats:?}");
        assert_eq!(
            events.last().map(|e| e.1),
            Some(false),
            "left frozen: {events:?}"
        );
    }

    #[test]
    fn full_run_fraction_never_freezes() {
        let rec = Recorder::default();
        let d =
            DutyCycle::start(rec.clone(), Duration::from_millis(10), RunFraction::FULL).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let stats = d.stop().unwrap();
        assert!(rec.0.lock().unwrap().iter().all(|e| !e.1));
        assert_eq!(stats.frozen_periods, 0);
    }

    #[test]
    fn dropping_the_driver_thaws_a_frozen_cgroup() {
        let rec = Recorder::default();
        let d =
            DutyCycle::start(rec.clone(), Duration::from_secs(10), RunFraction::new(0.0)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(rec.0.lock().unwrap().last().map(|e| e.1), Some(true));
        let t = Instant::now();
        drop(d);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "stop waited for the period"
        );
        assert_eq!(rec.0.lock().unwrap().last().map(|e| e.1), Some(false));
    }

    #[test]
    fn a_failing_freezer_stops_the_driver_with_the_error() {
        /// A freezer whose cgroup was removed under it.
        struct Gone;
        impl Freezer for Gone {
            fn freeze(&self, _: bool) -> Result<(), FreezeError> {
                Err(FreezeError::Write {
                    path: PathBuf::from("/sys/fs/cgroup/removed/cgroup.freeze"),
                    value: "1",
                    source: io::Error::from_raw_os_error(libc::ENOENT),
                })
            }
            fn describe(&self) -> String {
                "removed".to_owned()
            }
        }
        let d = DutyCycle::start(Gone, Duration::from_millis(10), RunFraction::new(0.5)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let e = d.stop().unwrap_err();
        assert!(e.contains("removed/cgroup.freeze"), "{e}");
    }
}
