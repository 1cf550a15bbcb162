//! The GPU utilisation cap and the GPU memory limit, as pure state machines
//! fed one measurement per control tick.
//!
//! NVML has no per-process compute cap, so the cap acts on the only lever
//! that works for any CUDA program: the job runs only a fraction of each
//! duty-cycle period and is frozen for the rest (a frozen process launches
//! no kernels). The measured SM utilisation then scales roughly with that
//! run fraction. Discipline: tighten fast (a multiplicative cut towards
//! `limit / measured`, at most halving per tick), relax slowly (an additive
//! step, only after a hold-off since the last cut, because NVML's samples lag
//! and queued kernels still drain after a freeze), never below a floor (the
//! evaluation must still progress).

use std::time::{Duration, Instant};

use serde::Serialize;

/// Tunables of [`UtilCap`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapParams {
    /// The cap on the job's SM utilisation, percent.
    pub limit_pct: f64,
    /// Utilisation this far below the cap counts as "under" (no relaxing
    /// while hovering just under it).
    pub hysteresis_pct: f64,
    /// The smallest multiplier one cut may apply (0.5: at most halve).
    pub max_cut: f64,
    /// Added to the run fraction per tick when under the cap.
    pub increase_step: f64,
    /// The run fraction never goes below this.
    pub floor: f64,
    /// Ticks after a cut before the fraction may grow again.
    pub holdoff_ticks: u32,
}

impl CapParams {
    pub fn with_limit(limit_pct: f64) -> Self {
        CapParams {
            limit_pct,
            ..CapParams::default()
        }
    }
}

impl Default for CapParams {
    fn default() -> Self {
        CapParams {
            limit_pct: 80.0,
            hysteresis_pct: 5.0,
            max_cut: 0.5,
            increase_step: 0.05,
            floor: 0.05,
            holdoff_ticks: 3,
        }
    }
}

/// What one tick of the cap decided.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CapAction {
    /// Over the cap: the run fraction was cut.
    Tightened,
    /// Under the cap after the hold-off: the run fraction grew.
    Relaxed,
    /// Within the band, in hold-off, at a bound, or no sample this tick.
    Held,
}

/// The utilisation-cap controller: measured SM utilisation in, run fraction
/// (of each duty-cycle period) out.
#[derive(Debug, Clone)]
pub struct UtilCap {
    params: CapParams,
    run_fraction: f64,
    holdoff: u32,
}

impl UtilCap {
    pub fn new(params: CapParams) -> Self {
        UtilCap {
            params,
            run_fraction: 1.0,
            holdoff: 0,
        }
    }

    pub fn params(&self) -> &CapParams {
        &self.params
    }

    /// The fraction of each period the job may run, in `[floor, 1]`.
    pub fn run_fraction(&self) -> f64 {
        self.run_fraction
    }

    /// Feeds the job's SM utilisation measured over the last tick (already
    /// under the current run fraction); `None` when NVML had no new sample.
    pub fn tick(&mut self, measured_pct: Option<f64>) -> CapAction {
        let p = self.params;
        let Some(u) = measured_pct else {
            return CapAction::Held;
        };
        if u > p.limit_pct {
            let factor = (p.limit_pct / u).max(p.max_cut);
            let next = (self.run_fraction * factor).max(p.floor);
            self.holdoff = p.holdoff_ticks;
            if next < self.run_fraction {
                self.run_fraction = next;
                return CapAction::Tightened;
            }
            return CapAction::Held;
        }
        if self.holdoff > 0 {
            self.holdoff -= 1;
            return CapAction::Held;
        }
        if u < p.limit_pct - p.hysteresis_pct && self.run_fraction < 1.0 {
            self.run_fraction = (self.run_fraction + p.increase_step).min(1.0);
            return CapAction::Relaxed;
        }
        CapAction::Held
    }
}

/// What one tick of the memory guard decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryVerdict {
    Under,
    /// Just went over: emit the event, start the grace period.
    WentOver,
    /// Still over, within the grace period.
    Over,
    /// Over for longer than the grace: kill the job (`reason: gpu_memory`).
    Kill,
}

/// The GPU memory limit: over it, an event; still over after `grace`, kill.
/// Going back under resets the grace.
#[derive(Debug, Clone)]
pub struct MemoryGuard {
    limit_bytes: u64,
    grace: Duration,
    over_since: Option<Instant>,
}

impl MemoryGuard {
    pub fn new(limit_bytes: u64, grace: Duration) -> Self {
        MemoryGuard {
            limit_bytes,
            grace,
            over_since: None,
        }
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn tick(&mut self, used_bytes: u64, now: Instant) -> MemoryVerdict {
        if used_bytes <= self.limit_bytes {
            self.over_since = None;
            return MemoryVerdict::Under;
        }
        match self.over_since {
            None => {
                self.over_since = Some(now);
                MemoryVerdict::WentOver
            }
            Some(t) if now.duration_since(t) >= self.grace => MemoryVerdict::Kill,
            Some(_) => MemoryVerdict::Over,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job whose free-running utilisation is `free_pct`: measured
    /// utilisation is the run fraction times that (the duty cycle's effect on
    /// a kernel-launch-bound loop), plus deterministic noise.
    fn simulate(cap: &mut UtilCap, free_pct: f64, ticks: usize) -> Vec<f64> {
        (0..ticks)
            .map(|i| {
                let noise = [0.0, 3.0, -2.0, 1.0, -3.0][i % 5];
                let measured = (cap.run_fraction() * free_pct + noise).clamp(0.0, 100.0);
                cap.tick(Some(measured));
                measured
            })
            .collect()
    }

    #[test]
    fn saturating_job_is_held_under_the_cap_within_a_few_ticks() {
        let mut cap = UtilCap::new(CapParams::with_limit(50.0));
        let measured = simulate(&mut cap, 100.0, 60);
        // One cut from 100 % halves to 0.5 at once (tighten fast).
        assert!(
            (cap.run_fraction() - 0.5).abs() < 0.15,
            "{}",
            cap.run_fraction()
        );
        let tail = &measured[10..];
        #[expect(clippy::cast_precision_loss, reason = "50 values")]
        let mean = tail.iter().sum::<f64>() / tail.len() as f64;
        assert!((35.0..=50.0).contains(&mean), "mean {mean} over {tail:?}");
        assert!(tail.iter().all(|&m| m <= 60.0), "{tail:?}");
    }

    #[test]
    fn over_cap_cuts_multiplicatively_at_most_halving_and_never_below_floor() {
        let mut cap = UtilCap::new(CapParams::with_limit(50.0));
        assert_eq!(cap.tick(Some(100.0)), CapAction::Tightened);
        assert!((cap.run_fraction() - 0.5).abs() < 1e-9);
        assert_eq!(cap.tick(Some(100.0)), CapAction::Tightened);
        assert!((cap.run_fraction() - 0.25).abs() < 1e-9);
        // Slightly over: a proportional, small cut.
        let before = cap.run_fraction();
        cap.tick(Some(55.0));
        assert!((cap.run_fraction() - before * 50.0 / 55.0).abs() < 1e-9);
        for _ in 0..20 {
            cap.tick(Some(100.0));
        }
        assert!((cap.run_fraction() - cap.params().floor).abs() < 1e-9);
        assert_eq!(cap.tick(Some(100.0)), CapAction::Held);
    }

    #[test]
    fn under_cap_relaxes_additively_only_after_the_holdoff() {
        let params = CapParams::with_limit(80.0);
        let mut cap = UtilCap::new(params);
        cap.tick(Some(160.0_f64.min(100.0)));
        let cut = cap.run_fraction();
        for _ in 0..params.holdoff_ticks {
            assert_eq!(cap.tick(Some(10.0)), CapAction::Held);
            assert!((cap.run_fraction() - cut).abs() < 1e-9);
        }
        assert_eq!(cap.tick(Some(10.0)), CapAction::Relaxed);
        assert!((cap.run_fraction() - (cut + params.increase_step)).abs() < 1e-9);
        // Within the hysteresis band below the cap: no change.
        assert_eq!(cap.tick(Some(78.0)), CapAction::Held);
        // A job that stays idle returns to running freely, never above 1.
        for _ in 0..100 {
            cap.tick(Some(0.0));
        }
        assert!((cap.run_fraction() - 1.0).abs() < 1e-9);
        assert_eq!(cap.tick(Some(0.0)), CapAction::Held);
    }

    #[test]
    fn missing_samples_hold_the_fraction() {
        let mut cap = UtilCap::new(CapParams::with_limit(50.0));
        cap.tick(Some(100.0));
        let f = cap.run_fraction();
        for _ in 0..10 {
            assert_eq!(cap.tick(None), CapAction::Held);
        }
        assert!((cap.run_fraction() - f).abs() < 1e-9);
    }

    #[test]
    fn job_under_the_cap_is_never_throttled() {
        let mut cap = UtilCap::new(CapParams::with_limit(80.0));
        simulate(&mut cap, 60.0, 50);
        assert!((cap.run_fraction() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn memory_over_limit_warns_then_kills_after_grace_and_resets_when_back_under() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut g = MemoryGuard::new(1000, Duration::from_secs(2));
        assert_eq!(g.tick(1000, s(0)), MemoryVerdict::Under);
        assert_eq!(g.tick(1001, s(100)), MemoryVerdict::WentOver);
        assert_eq!(g.tick(5000, s(1500)), MemoryVerdict::Over);
        assert_eq!(g.tick(900, s(1900)), MemoryVerdict::Under);
        assert_eq!(g.tick(2000, s(2000)), MemoryVerdict::WentOver);
        assert_eq!(g.tick(2000, s(3999)), MemoryVerdict::Over);
        assert_eq!(g.tick(2000, s(4000)), MemoryVerdict::Kill);
    }
}
