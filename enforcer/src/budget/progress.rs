//! The training's progress file, read as ground truth for slowdown.
//!
//! The training rewrites a file with a monotonically increasing step count
//! (`training.progress_file`). This module learns the step rate while no
//! evaluation job runs (the baseline) and, while jobs run, reports the true
//! slowdown `1 − rate ÷ baseline`. A missing, garbled or stale file, or no
//! baseline yet, gives `None` with a reason: the loop then runs on steal
//! alone. The timestamps of steps come from the file's mtime, not from when
//! it was polled, so a 100 ms poll does not blur a rate over a few seconds.
//!
//! The file belongs to the training's user, not to root: it is read as
//! [`crate::safe_fs::read_untrusted`] says (no link, no FIFO, at most
//! [`PROGRESS_CAP`] bytes, content never quoted), and only by a
//! [`ProgressSampler`] thread, so a read that hangs (a hung network mount)
//! holds that thread alone, never the supervisor's deadline.

use std::{
    collections::VecDeque,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime},
};

use super::controller::Reason;
use crate::safe_fs::{self, SafeFsError};

/// The most bytes read from the progress file: a step count is at most 20
/// digits (`u64::MAX`), and the cap leaves room for whitespace around it.
pub const PROGRESS_CAP: u64 = 64;

/// Why the progress file gave no number. Never carries the file's content:
/// root reads it, and a link could point it at a file only root may read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProgressError {
    #[error("progress file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("progress file {path}: its {len} bytes are not a decimal step count")]
    Garbled { path: PathBuf, len: usize },
}

/// Why a slowdown is not available right now.
#[derive(Debug, Clone, PartialEq)]
pub enum Unavailable {
    /// The file could not be read or parsed.
    File(ProgressError),
    /// The step count has not changed for this long, more than the staleness
    /// limit allowed by the training's own step interval.
    Stale { since: Duration, limit: Duration },
    /// Not enough job-free time yet to learn the training's step rate.
    NoBaseline { have: Duration, need: Duration },
    /// Not enough steps since the job started to measure a rate.
    Warming,
    /// The step count went backwards (training restarted): start over.
    Reset { from: u64, to: u64 },
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::File(e) => e.fmt(f),
            Unavailable::Stale { since, limit } => write!(
                f,
                "progress file stale: no new step for {:.1}s (limit {:.1}s)",
                since.as_secs_f64(),
                limit.as_secs_f64()
            ),
            Unavailable::NoBaseline { have, need } => write!(
                f,
                "no baseline step rate yet: {:.1}s without jobs of {:.1}s needed",
                have.as_secs_f64(),
                need.as_secs_f64()
            ),
            Unavailable::Warming => f.write_str("too few steps since the job started"),
            Unavailable::Reset { from, to } => {
                write!(f, "step count went back from {from} to {to}: relearning")
            }
        }
    }
}

/// One read of the file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressSample {
    pub step: u64,
    /// When the file was last written, on the monotonic clock.
    pub written: Instant,
}

/// What the tracker knows after a poll.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressReading {
    /// Steps per second over the recent window.
    pub rate: Option<f64>,
    /// Job-free steps per second.
    pub baseline: Option<f64>,
    /// `1 − rate ÷ baseline` while a job runs.
    pub slowdown: Result<f64, Unavailable>,
    /// While the job is paused for a blame experiment
    /// ([`ProgressTracker::pause_began`]): the slowdown over the paused
    /// span alone, once it holds [`ProgressConfig::paused_min`] of steps.
    pub paused_slowdown: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProgressConfig {
    /// Rate window.
    pub window: Duration,
    /// Job-free time needed before the baseline is trusted.
    pub baseline_min: Duration,
    /// After a job ends, wait this long before learning again (caches warm
    /// back up, the job's cgroup drains).
    pub settle: Duration,
    /// Stale when no new step for `stale_intervals ×` the mean step interval
    /// (and at least `stale_min`).
    pub stale_intervals: f64,
    pub stale_min: Duration,
    /// A paused job's slowdown is measured on steps written this long
    /// after the pause began (the freeze takes hold, the training's caches
    /// warm back up)...
    pub paused_settle: Duration,
    /// ...over at least this span of them.
    pub paused_min: Duration,
}

impl Default for ProgressConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(2),
            baseline_min: Duration::from_secs(3),
            settle: Duration::from_secs(1),
            stale_intervals: 5.0,
            stale_min: Duration::from_secs(1),
            paused_settle: Duration::from_millis(100),
            paused_min: Duration::from_millis(400),
        }
    }
}

/// Learns the baseline and measures slowdown from successive samples.
#[derive(Debug)]
pub struct ProgressTracker {
    source: Option<ProgressSampler>,
    config: ProgressConfig,
    /// Distinct (step, time) points of the current regime, oldest first.
    points: VecDeque<ProgressSample>,
    /// First point of the current job-free segment.
    free_start: Option<ProgressSample>,
    baseline: Option<f64>,
    free_time: Duration,
    job_running: bool,
    job_started: Option<Instant>,
    job_ended: Option<Instant>,
    /// Steps written from then on were made while the job was paused.
    paused_from: Option<Instant>,
}

impl ProgressTracker {
    pub fn new(config: ProgressConfig) -> Self {
        Self {
            source: None,
            config,
            points: VecDeque::new(),
            free_start: None,
            baseline: None,
            free_time: Duration::ZERO,
            job_running: false,
            job_started: None,
            job_ended: None,
            paused_from: None,
        }
    }

    /// A tracker of `path`, read every `period` by a [`ProgressSampler`];
    /// each [`ProgressTracker::poll`] takes its latest sample.
    pub fn for_file(path: impl Into<PathBuf>, config: ProgressConfig, period: Duration) -> Self {
        let mut t = Self::new(config);
        t.source = Some(ProgressSampler::start(path.into(), period));
        t
    }

    pub fn baseline(&self) -> Option<f64> {
        self.baseline
    }

    /// The job was paused at `now` for a blame experiment: from
    /// [`ProgressConfig::paused_settle`] later, readings carry the slowdown
    /// over the paused span alone.
    pub fn pause_began(&mut self, now: Instant) {
        self.paused_from = Some(now + self.config.paused_settle);
    }

    /// The experiment answered at `now` and the job runs again. The
    /// training's rate while the job was paused is its job-free rate now,
    /// measured moments ago: it becomes the baseline, so that a rate that
    /// drifted since the baseline was learnt (the training's own phases,
    /// load from outside the jobs) is no longer counted as the job's
    /// slowdown. The job's rate is measured from the steps written after
    /// `now`: the paused span counts neither for nor against the job.
    /// Returns the new baseline, if the pause held enough steps to measure
    /// one.
    pub fn pause_ended(&mut self, now: Instant) -> Option<f64> {
        let rate = self.paused_rate();
        self.paused_from = None;
        if self.job_running {
            self.job_started = Some(now);
        }
        if let Some(r) = rate {
            self.baseline = Some(r);
        }
        rate
    }

    /// Follows the budget loop's blame experiments (for the job or training
    /// `whose`): its pause is measured on the steps written during it, and
    /// its answer re-baselines the training ([`Self::pause_ended`]).
    pub fn follow_experiment(&mut self, reason: &Reason, now: Instant, whose: &str) {
        match reason {
            Reason::Experiment { .. } => self.pause_began(now),
            Reason::TheJob { .. } | Reason::NotTheJob { .. } => {
                let previous = self.baseline;
                if let Some(rate) = self.pause_ended(now) {
                    tracing::info!(
                        whose,
                        baseline_steps_per_s = rate,
                        previous_steps_per_s = previous,
                        "training baseline re-learnt from the blame experiment's pause"
                    );
                }
            }
            _ => {}
        }
    }

    /// Polls the file every `period` for `duration` with no job running,
    /// sleeping in between: how a one-shot `enforcer run` learns the
    /// baseline before it starts the job. Returns the last reading.
    pub fn learn(&mut self, duration: Duration, period: Duration) -> ProgressReading {
        let start = Instant::now();
        loop {
            let now = Instant::now();
            let reading = self.poll(now, false);
            if now.saturating_duration_since(start) >= duration {
                return reading;
            }
            std::thread::sleep(period);
        }
    }

    /// Records the sampler's latest read; never waits for the file.
    pub fn poll(&mut self, now: Instant, job_running: bool) -> ProgressReading {
        let sample = match &self.source {
            Some(s) => s.latest(now),
            None => Err(ProgressError::Unreadable {
                path: PathBuf::new(),
                reason: "no progress file configured".into(),
            }),
        };
        self.record(sample, now, job_running)
    }

    /// Records one read (or its failure) made at `now`.
    pub fn record(
        &mut self,
        sample: Result<ProgressSample, ProgressError>,
        now: Instant,
        job_running: bool,
    ) -> ProgressReading {
        self.set_job(now, job_running);
        let sample = match sample {
            Ok(s) => s,
            Err(e) => return self.reading(Err(Unavailable::File(e))),
        };
        if let Some(last) = self.points.back().copied() {
            if sample.step < last.step {
                let reset = Unavailable::Reset {
                    from: last.step,
                    to: sample.step,
                };
                self.points.clear();
                self.free_start = None;
                self.points.push_back(sample);
                return self.reading(Err(reset));
            }
            if sample.step > last.step {
                self.points.push_back(sample);
            }
        } else {
            self.points.push_back(sample);
        }
        let horizon = now
            .checked_sub(self.config.window.max(self.stale_limit()) * 4)
            .unwrap_or(now);
        while self.points.len() > 2 && self.points[1].written < horizon {
            self.points.pop_front();
        }

        let last = *self.points.back().expect("just pushed");
        let limit = self.stale_limit();
        let since = now.saturating_duration_since(last.written);
        if since > limit {
            // A stale segment must not count as job-free progress either.
            self.free_start = None;
            return self.reading(Err(Unavailable::Stale { since, limit }));
        }

        if !self.job_running {
            self.learn_from(last, now);
            return self.reading(Err(self.no_baseline()));
        }
        let Some(baseline) = self.baseline else {
            return self.reading(Err(self.no_baseline()));
        };
        match self.job_rate(now) {
            Some(rate) => self.reading(Ok(1.0 - rate / baseline)),
            None => self.reading(Err(Unavailable::Warming)),
        }
    }

    fn set_job(&mut self, now: Instant, running: bool) {
        if running && !self.job_running {
            self.job_started = Some(now);
            self.free_start = None;
        }
        if !running && self.job_running {
            self.job_ended = Some(now);
            // No job to pause any more: what follows is job-free time,
            // learnt as such once it settles, not a pause's rate.
            self.paused_from = None;
        }
        self.job_running = running;
    }

    fn learn_from(&mut self, last: ProgressSample, now: Instant) {
        let settled = self
            .job_ended
            .is_none_or(|e| now.saturating_duration_since(e) >= self.config.settle);
        if !settled {
            return;
        }
        let start = *self.free_start.get_or_insert(last);
        let span = last.written.saturating_duration_since(start.written);
        self.free_time = span;
        if span >= self.config.baseline_min && last.step > start.step {
            self.baseline = Some((last.step - start.step) as f64 / span.as_secs_f64());
        }
    }

    fn no_baseline(&self) -> Unavailable {
        Unavailable::NoBaseline {
            have: self.free_time,
            need: self.config.baseline_min,
        }
    }

    /// Rate over the window, only from steps written while the job ran.
    fn job_rate(&self, now: Instant) -> Option<f64> {
        let started = self.job_started?;
        let from = now
            .checked_sub(self.config.window)
            .map_or(started, |h| h.max(started));
        // Needs half a window of steps, else the rate is mostly noise.
        self.rate_since(from, self.config.window / 2)
    }

    /// Rate over the steps written since the pause settled, once they span
    /// [`ProgressConfig::paused_min`].
    fn paused_rate(&self) -> Option<f64> {
        self.rate_since(self.paused_from?, self.config.paused_min)
    }

    /// Steps per second over the steps written from `from` on, once they
    /// span `min_span` and the count moved.
    fn rate_since(&self, from: Instant, min_span: Duration) -> Option<f64> {
        let first = self.points.iter().find(|p| p.written >= from)?;
        let last = self.points.back()?;
        let span = last.written.saturating_duration_since(first.written);
        if span < min_span || last.step <= first.step {
            return None;
        }
        Some((last.step - first.step) as f64 / span.as_secs_f64())
    }

    fn recent_rate(&self) -> Option<f64> {
        let first = self.points.front()?;
        let last = self.points.back()?;
        let span = last.written.saturating_duration_since(first.written);
        (last.step > first.step && !span.is_zero())
            .then(|| (last.step - first.step) as f64 / span.as_secs_f64())
    }

    fn stale_limit(&self) -> Duration {
        let interval = self
            .baseline
            .or_else(|| self.recent_rate())
            .filter(|r| *r > 0.0)
            .map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(self.config.stale_intervals / r)
            });
        interval.max(self.config.stale_min)
    }

    fn reading(&self, slowdown: Result<f64, Unavailable>) -> ProgressReading {
        ProgressReading {
            rate: self.recent_rate(),
            baseline: self.baseline,
            slowdown,
            paused_slowdown: self
                .baseline
                .zip(self.paused_rate())
                .map(|(b, r)| 1.0 - r / b),
        }
    }
}

/// Reads the step count and the write time of `path`, as [the
/// module](self) says. `now` anchors the file's wall-clock mtime on the
/// monotonic clock: pass the time of the read.
pub fn read_progress(path: &Path, now: Instant) -> Result<ProgressSample, ProgressError> {
    let read =
        safe_fs::read_untrusted(path, PROGRESS_CAP).map_err(|e| ProgressError::Unreadable {
            path: path.to_owned(),
            reason: match e {
                SafeFsError::Io { op, source, .. } => format!("{op}: {source}"),
                SafeFsError::NotRegular { kind, .. } => {
                    format!("is a {kind}, not a regular file: refused")
                }
                SafeFsError::TooLarge { cap, .. } => {
                    format!("larger than {cap} bytes, too large for a step count: refused")
                }
                other => other.to_string(),
            },
        })?;
    let step = std::str::from_utf8(&read.bytes)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .ok_or_else(|| ProgressError::Garbled {
            path: path.to_owned(),
            len: read.bytes.len(),
        })?;
    let age = SystemTime::now()
        .duration_since(read.modified)
        .unwrap_or_default();
    Ok(ProgressSample {
        step,
        written: now.checked_sub(age).unwrap_or(now),
    })
}

/// A read in flight longer than this is reported as hanging (the file
/// gives no number meanwhile), whatever the sampling period.
const HUNG_READ: Duration = Duration::from_secs(1);

/// What the reader thread last saw.
#[derive(Debug, Default)]
struct SamplerSlot {
    latest: Option<Result<ProgressSample, ProgressError>>,
    /// When the read now in progress started.
    reading_since: Option<Instant>,
}

/// Reads the progress file every period on a thread of its own and keeps
/// the latest result for the supervisor's tick to take: the tick never
/// opens the file. The thread ends at the first period after the sampler is
/// dropped; one stuck in a read ends when the read returns.
#[derive(Debug)]
pub struct ProgressSampler {
    path: PathBuf,
    slot: Arc<Mutex<SamplerSlot>>,
    /// Dropping it wakes the thread to end.
    _stop: mpsc::Sender<()>,
}

impl ProgressSampler {
    /// Starts reading `path` every `period` (the first read at once).
    pub fn start(path: PathBuf, period: Duration) -> Self {
        Self::with_reader(path, period, read_progress)
    }

    /// As [`ProgressSampler::start`], with `read` in place of
    /// [`read_progress`] (tests stand in a read that hangs).
    fn with_reader<R>(path: PathBuf, period: Duration, read: R) -> Self
    where
        R: Fn(&Path, Instant) -> Result<ProgressSample, ProgressError> + Send + 'static,
    {
        // The first read starts now: a hang counts from here.
        let slot = Arc::new(Mutex::new(SamplerSlot {
            latest: None,
            reading_since: Some(Instant::now()),
        }));
        let (stop, stopped) = mpsc::channel::<()>();
        let thread_slot = Arc::clone(&slot);
        let thread_path = path.clone();
        let spawned = std::thread::Builder::new()
            .name("progress-reader".into())
            .spawn(move || {
                let mut started = Instant::now();
                loop {
                    if let Ok(mut s) = thread_slot.lock() {
                        s.reading_since.get_or_insert(started);
                    }
                    let sample = read(&thread_path, Instant::now());
                    if let Ok(mut s) = thread_slot.lock() {
                        s.latest = Some(sample);
                        s.reading_since = None;
                    }
                    let rest = period.saturating_sub(started.elapsed());
                    if !matches!(
                        stopped.recv_timeout(rest),
                        Err(mpsc::RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                    started = Instant::now();
                }
            });
        if let Err(e) = spawned
            && let Ok(mut s) = slot.lock()
        {
            s.latest = Some(Err(ProgressError::Unreadable {
                path: path.clone(),
                reason: format!("starting the reader thread: {e}"),
            }));
        }
        Self {
            path,
            slot,
            _stop: stop,
        }
    }

    /// The latest read, or why there is none at `now`.
    pub fn latest(&self, now: Instant) -> Result<ProgressSample, ProgressError> {
        let unreadable = |reason: String| ProgressError::Unreadable {
            path: self.path.clone(),
            reason,
        };
        let Ok(slot) = self.slot.lock() else {
            return Err(unreadable("the reader thread panicked".into()));
        };
        if let Some(since) = slot.reading_since {
            let hung = now.saturating_duration_since(since);
            if hung >= HUNG_READ {
                return Err(unreadable(format!(
                    "a read has not returned for {:.1}s",
                    hung.as_secs_f64()
                )));
            }
        }
        slot.latest
            .clone()
            .unwrap_or_else(|| Err(unreadable("not read yet".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_millis(100);

    struct Training {
        t0: Instant,
        now: Instant,
        steps: f64,
    }

    impl Training {
        fn new() -> Self {
            let t0 = Instant::now();
            Self {
                t0,
                now: t0,
                steps: 0.0,
            }
        }
        /// Advance one poll at `rate` steps/s; the file was written at the
        /// last whole step.
        fn tick(&mut self, rate: f64) -> Result<ProgressSample, ProgressError> {
            self.now += POLL;
            self.steps += rate * POLL.as_secs_f64();
            let whole = self.steps.floor();
            let behind = (self.steps - whole) / rate.max(1e-9);
            Ok(ProgressSample {
                step: whole as u64,
                written: self.now - Duration::from_secs_f64(behind.min(POLL.as_secs_f64())),
            })
        }
    }

    fn run(
        t: &mut ProgressTracker,
        tr: &mut Training,
        secs: f64,
        rate: f64,
        job: bool,
    ) -> ProgressReading {
        let mut last = None;
        let n = (secs / POLL.as_secs_f64()).round() as usize;
        for _ in 0..n {
            let s = tr.tick(rate);
            last = Some(t.record(s, tr.now, job));
        }
        last.expect("at least one poll")
    }

    #[test]
    fn learns_the_baseline_without_jobs_then_measures_slowdown() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        let r = run(&mut t, &mut tr, 1.0, 400.0, false);
        assert!(matches!(r.slowdown, Err(Unavailable::NoBaseline { .. })));
        run(&mut t, &mut tr, 4.0, 400.0, false);
        let b = t.baseline().expect("baseline");
        assert!((b - 400.0).abs() < 4.0, "baseline {b}");
        let r = run(&mut t, &mut tr, 3.0, 360.0, true);
        let s = r.slowdown.expect("slowdown");
        assert!((s - 0.10).abs() < 0.01, "slowdown {s}");
        assert!(tr.now > tr.t0);
    }

    #[test]
    fn job_rate_uses_only_steps_after_the_job_started() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        // Just long enough for half a window: the rate must be the slow one.
        let r = run(&mut t, &mut tr, 1.2, 200.0, true);
        let s = r.slowdown.expect("slowdown");
        assert!((s - 0.5).abs() < 0.02, "slowdown {s}");
    }

    #[test]
    fn warming_right_after_a_job_starts() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        let r = run(&mut t, &mut tr, 0.3, 400.0, true);
        assert_eq!(r.slowdown, Err(Unavailable::Warming));
    }

    #[test]
    fn stale_file_gives_no_slowdown_with_a_reason() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        run(&mut t, &mut tr, 3.0, 380.0, true);
        // The training stops writing: the same sample comes back.
        let frozen = tr.tick(400.0).expect("sample");
        let mut r = None;
        for i in 1..=15 {
            r = Some(t.record(Ok(frozen), tr.now + POLL * i, true));
        }
        let r = r.expect("polled");
        match r.slowdown {
            Err(ref u @ Unavailable::Stale { since, limit }) => {
                assert!(since > limit);
                assert!(u.to_string().contains("stale"), "{u}");
            }
            other => panic!("expected stale, got {other:?}"),
        }
    }

    #[test]
    fn slow_training_is_not_stale_between_its_steps() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        // One step every 2 s: a 3 s gap is normal.
        let r = run(&mut t, &mut tr, 20.0, 0.5, false);
        assert!(
            !matches!(r.slowdown, Err(Unavailable::Stale { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn garbled_or_missing_file_is_unavailable_not_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("progress");
        let e = read_progress(&path, Instant::now()).unwrap_err();
        assert!(matches!(e, ProgressError::Unreadable { .. }), "{e}");
        std::fs::write(&path, "step twelve\n").expect("write");
        let e = read_progress(&path, Instant::now()).unwrap_err();
        assert_eq!(
            e,
            ProgressError::Garbled {
                path: path.clone(),
                len: 12
            }
        );
        std::fs::write(&path, "12\n").expect("write");
        let s = read_progress(&path, Instant::now()).expect("readable");
        assert_eq!(s.step, 12);
    }

    #[test]
    fn a_garbled_file_is_never_quoted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("progress");
        std::fs::write(&path, "hunter2 is the password\n").expect("write");
        let e = read_progress(&path, Instant::now()).unwrap_err();
        let text = Unavailable::File(e).to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("not a decimal step count"), "{text}");
    }

    #[test]
    fn a_fifo_a_link_to_dev_zero_and_a_huge_file_are_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No writer: a blocking open would hang here.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
        let huge = dir.path().join("huge");
        std::fs::write(&huge, "7".repeat(1 << 20)).expect("write");
        for (path, why) in [
            (&fifo, "FIFO"),
            (&link, "symbolic link"),
            (&huge, "larger than 64 bytes"),
        ] {
            let t0 = Instant::now();
            let e = read_progress(path, t0).unwrap_err();
            assert!(t0.elapsed() < Duration::from_secs(1), "{e}");
            let text = e.to_string();
            assert!(text.contains(why), "{text}");
            assert!(!text.contains("7777777"), "content quoted: {text}");
        }
    }

    #[test]
    fn a_read_that_hangs_holds_only_the_reader_thread() {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Mutex::new(hold);
        let sampler =
            ProgressSampler::with_reader(PathBuf::from("/hung/progress"), POLL, move |_, _| {
                // A read on a hung mount: returns when the test lets it.
                let _ = hold.lock().expect("lock").recv();
                Err(ProgressError::Unreadable {
                    path: PathBuf::new(),
                    reason: "released".into(),
                })
            });
        let mut t = ProgressTracker::new(ProgressConfig::default());
        t.source = Some(sampler);
        let t0 = Instant::now();
        let r = t.poll(t0, true);
        assert!(t0.elapsed() < Duration::from_millis(500), "poll waited");
        assert!(matches!(r.slowdown, Err(Unavailable::File(_))), "{r:?}");
        // Later polls (on the tick's clock) say the read hangs.
        let later = t0 + HUNG_READ + POLL;
        let r = t.poll(later, true);
        assert!(t0.elapsed() < Duration::from_millis(500), "poll waited");
        match r.slowdown {
            Err(Unavailable::File(e)) => assert!(e.to_string().contains("not returned"), "{e}"),
            other => panic!("expected a hung read, got {other:?}"),
        }
        drop(t);
        let _ = release.send(());
    }

    #[test]
    fn the_sampler_publishes_what_the_file_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("progress");
        std::fs::write(&path, "41\n").expect("write");
        let sampler = ProgressSampler::start(path.clone(), Duration::from_millis(10));
        let t0 = Instant::now();
        loop {
            match sampler.latest(Instant::now()) {
                Ok(s) if s.step == 41 => break,
                other => assert!(t0.elapsed() < Duration::from_secs(5), "{other:?}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn learns_a_baseline_from_a_real_file_before_a_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("progress");
        std::fs::write(&path, "0\n").expect("write");
        let writer_path = path.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_w = std::sync::Arc::clone(&stop);
        // A training at ~100 steps/s.
        let writer = std::thread::spawn(move || {
            let mut step = 0_u64;
            while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                step += 1;
                let tmp = writer_path.with_extension("tmp");
                std::fs::write(&tmp, format!("{step}\n")).expect("write");
                std::fs::rename(&tmp, &writer_path).expect("rename");
            }
        });
        let config = ProgressConfig {
            baseline_min: Duration::from_millis(800),
            ..ProgressConfig::default()
        };
        let mut t = ProgressTracker::for_file(&path, config, Duration::from_millis(50));
        t.learn(Duration::from_millis(1200), Duration::from_millis(50));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer");
        let b = t.baseline().expect("a baseline");
        // Sleep granularity makes it at most 100/s; a loaded host slower.
        assert!(b > 20.0 && b <= 101.0, "baseline {b}");
    }

    #[test]
    fn a_step_count_going_back_restarts_learning() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        tr.steps = 0.0;
        let r = run(&mut t, &mut tr, 0.1, 400.0, false);
        assert!(
            matches!(r.slowdown, Err(Unavailable::Reset { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn baseline_is_not_learned_right_after_a_job() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        run(&mut t, &mut tr, 3.0, 100.0, true);
        // The job ends; the training is still slow for the settle time; the
        // old baseline must survive.
        run(&mut t, &mut tr, 0.8, 100.0, false);
        let b = t.baseline().expect("baseline");
        assert!((b - 400.0).abs() < 4.0, "baseline {b}");
    }

    #[test]
    fn a_pause_is_measured_on_its_own_steps_and_its_rate_becomes_the_baseline() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        // The training drifted to 350 steps/s on its own; the job takes it
        // to 340: a 15 % slowdown against the old baseline.
        let r = run(&mut t, &mut tr, 3.0, 340.0, true);
        assert!((r.slowdown.expect("slowdown") - 0.15).abs() < 0.01);
        assert_eq!(r.paused_slowdown, None, "no pause yet");
        // The budget loop's decisions drive it.
        let experiment = Reason::Experiment {
            value: 0.15,
            steal: 0.01,
            spread: 0.01,
            length: Duration::from_millis(600),
        };
        t.follow_experiment(&experiment, tr.now, "job");
        // Settle (100 ms) and 400 ms of steps: not yet at 0.4 s.
        let r = run(&mut t, &mut tr, 0.4, 350.0, true);
        assert_eq!(r.paused_slowdown, None);
        let r = run(&mut t, &mut tr, 0.3, 350.0, true);
        let paused = r.paused_slowdown.expect("a reading over the pause");
        // The paused span alone: 12.5 % against 400, none of the 15 % that
        // the 2 s window still holds from before the pause.
        assert!((paused - 0.125).abs() < 0.01, "paused {paused}");
        let answer = Reason::NotTheJob {
            value: 0.15,
            paused: Some(paused),
            held: Duration::from_millis(700),
            ignore_for: Duration::from_secs(30),
        };
        t.follow_experiment(&answer, tr.now, "job");
        let rate = t.baseline().expect("a baseline");
        assert!((rate - 350.0).abs() < 4.0, "rate {rate}");
        // The thawed job is measured from the thaw on, against 350.
        let r = run(&mut t, &mut tr, 0.3, 340.0, true);
        assert_eq!(r.slowdown, Err(Unavailable::Warming));
        assert_eq!(r.paused_slowdown, None);
        let r = run(&mut t, &mut tr, 2.0, 340.0, true);
        let s = r.slowdown.expect("slowdown");
        assert!((s - 10.0 / 350.0).abs() < 0.01, "slowdown {s}");
    }

    #[test]
    fn a_job_that_ends_during_its_pause_leaves_no_pause_rate() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        run(&mut t, &mut tr, 2.0, 300.0, true);
        t.pause_began(tr.now);
        run(&mut t, &mut tr, 0.3, 380.0, true);
        // The last job ends (the node agent's controller waits for the
        // next one); the next job's slower steps must not pass for the
        // training's job-free rate when its answer comes.
        run(&mut t, &mut tr, 0.5, 380.0, false);
        run(&mut t, &mut tr, 1.0, 200.0, true);
        assert_eq!(t.pause_ended(tr.now), None);
        let b = t.baseline().expect("baseline");
        assert!((b - 400.0).abs() < 4.0, "baseline {b}");
    }

    #[test]
    fn a_pause_too_short_for_a_rate_keeps_the_baseline() {
        let mut t = ProgressTracker::new(ProgressConfig::default());
        let mut tr = Training::new();
        run(&mut t, &mut tr, 5.0, 400.0, false);
        run(&mut t, &mut tr, 2.0, 300.0, true);
        t.pause_began(tr.now);
        run(&mut t, &mut tr, 0.3, 350.0, true);
        assert_eq!(t.pause_ended(tr.now), None);
        let b = t.baseline().expect("baseline");
        assert!((b - 400.0).abs() < 4.0, "baseline {b}");
    }
}
