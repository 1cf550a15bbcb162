//! CPU placement of an evaluation job: the job runs on the CPUs the training
//! leaves free.
//!
//! Why: in the idle class a job is preempted by a waking training thread,
//! but not always at once, and a CPU the job keeps busy is one where every
//! training wake-up may wait behind it. Confined to the CPUs the training
//! does not use, an idle-class job loses little of its work (in the idle
//! class it only gets the CPU time the training leaves anyway) while the
//! training stops waiting behind it (docs/measurements.md has the numbers).
//! Placement removes the contention the quota can only trade against the
//! job's work.
//!
//! The training's on-CPU time per CPU comes from the steal meter. Over the
//! last window, the *training CPUs* are the busiest CPUs that together hold
//! [`PlacementConfig::cover`] of its time, plus any CPU it used for at least
//! [`PlacementConfig::min_cpu_share`], but never more than its use needs
//! (its cores ÷ [`PlacementConfig::cpu_fill`], rounded up): a training whose
//! threads hop over every CPU (a new thread per step, placed wherever the
//! scheduler finds an idle-class CPU) still needs only as many as it uses,
//! and an idle-class job spread over every CPU would keep it hopping. A CPU
//! the training kept busy for [`PlacementConfig::busy_cpu`] is always its
//! own, whatever that bound says: a thread lives there. The
//! job gets the rest; when nothing is
//! left (the training runs everywhere) it gets every CPU and the quota does
//! the work. A first placement within [`PlacementConfig::settle`] of the
//! first measurement (the watch before the job starts) is taken at once;
//! any later change needs the same proposal for `settle`, and
//! [`PlacementConfig::min_interval`] since the last change, so that a
//! training thread hopping CPUs, or a training whose use dips under a CPU's
//! worth for a moment, does not make the job's CPUs flap.
//!
//! A placement is a remedy for measured steal, like a quota cut: the
//! budget monitor (`super::monitor`) holds what this proposes until the
//! job's steal first asks for a cut, so that a job the idle class alone
//! keeps within budget keeps every CPU; and like a cut it is judged: one
//! that did not lower the steal is undone ([`Placement::undo`]).
//!
//! Pure like the controller: observations in, decisions out.

use std::{fmt, time::Duration, time::Instant};

use enforcer_model::{PerCpuTime, Window, counters::cores_on};

use crate::cgroup::cpuset::CpuList;

/// Tuning of the placement.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementConfig {
    /// The training's per-CPU use is measured over this window...
    pub window: Duration,
    /// ...and not judged over less than this.
    pub min_span: Duration,
    /// Training CPUs: the busiest CPUs holding this share of its time...
    pub cover: f64,
    /// ...plus any CPU it used for at least this many cores...
    pub min_cpu_share: f64,
    /// ...but no more CPUs than its use needs at this many cores each: the
    /// busiest `ceil(cores / cpu_fill)` of them. Above 1 on purpose: a
    /// training of one core's worth spread over two CPUs (a new thread per
    /// step measured 0.96-1.03 cores) keeps one; what it runs beyond it
    /// lands on the job's CPUs, where the idle-class job yields to it, and
    /// a placement that does not lower the steal is undone. At 0.9 such a
    /// training kept both CPUs, the job was not placed and the quota was
    /// cut instead (docs/measurements.md).
    pub cpu_fill: f64,
    /// ...except that every CPU the training used for at least this many
    /// cores stays a training CPU: a thread lives there (pinned, or kept
    /// there by the scheduler), and four threads at 0.75 cores each on four
    /// CPUs need four, not `ceil(3.0 / cpu_fill)` = 3. A training that
    /// hops over two CPUs at one core's worth uses neither this much.
    pub busy_cpu: f64,
    /// Below this many cores of training in the window, nothing is decided
    /// (the training is idle or between steps).
    pub min_training_cores: f64,
    /// A new placement must be proposed this long before it is applied...
    pub settle: Duration,
    /// ...and come at least this long after the previous one.
    pub min_interval: Duration,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(1),
            min_span: Duration::from_millis(300),
            cover: 0.9,
            min_cpu_share: 0.2,
            cpu_fill: 1.1,
            busy_cpu: 0.6,
            min_training_cores: 0.05,
            settle: Duration::from_secs(2),
            min_interval: Duration::from_secs(3),
        }
    }
}

/// A change of the job's CPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementDecision {
    /// The job's CPUs from now on; `None` = every CPU.
    pub cpus: Option<CpuList>,
    pub previous: Option<CpuList>,
    /// Where the training ran over the window.
    pub training_cpus: CpuList,
    /// How much CPU the training used over the window, in cores.
    pub training_cores: f64,
}

impl PlacementDecision {
    /// How many CPUs the job may use now.
    pub fn job_cores(&self, all: &CpuList) -> f64 {
        self.cpus.as_ref().unwrap_or(all).len() as f64
    }
}

impl fmt::Display for PlacementDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |c: &Option<CpuList>| c.as_ref().map_or("all".to_owned(), |c| c.to_string());
        write!(
            f,
            "training ran {:.2} cores on CPUs {}: job CPUs {} -> {}",
            self.training_cores,
            self.training_cpus,
            show(&self.previous),
            show(&self.cpus)
        )
    }
}

/// The placement of one job.
#[derive(Debug)]
pub struct Placement {
    config: PlacementConfig,
    /// Every CPU the job may be given.
    all: CpuList,
    current: Option<CpuList>,
    samples: Window<Instant, PerCpuTime>,
    proposed: Option<(Option<CpuList>, Instant)>,
    last_change: Option<Instant>,
    /// The first sample: a first placement is taken at once only within
    /// `settle` of it.
    first_seen: Option<Instant>,
}

impl Placement {
    /// `all`: the CPUs the job may run on at most (the node's online CPUs).
    pub fn new(config: PlacementConfig, all: CpuList) -> Self {
        Self {
            samples: Window::new(config.window),
            config,
            all,
            current: None,
            proposed: None,
            last_change: None,
            first_seen: None,
        }
    }

    pub fn all(&self) -> &CpuList {
        &self.all
    }

    /// The job's CPUs now; `None` = every CPU.
    pub fn current(&self) -> Option<&CpuList> {
        self.current.as_ref()
    }

    /// One control period: the training's cumulative on-CPU time per CPU
    /// (index = CPU number) at `now`. Returns the change to apply, if any.
    pub fn observe(&mut self, per_cpu: &[Duration], now: Instant) -> Option<PlacementDecision> {
        self.samples.push(now, per_cpu.to_vec());
        let first_seen = *self.first_seen.get_or_insert(now);
        let span = self.samples.trailing(self.config.window)?;
        let elapsed = span.elapsed();
        if elapsed < self.config.min_span {
            return None;
        }
        let usage: Vec<(u32, f64)> = self
            .all
            .iter()
            .map(|cpu| (cpu, cores_on(span.first, span.last, cpu as usize, elapsed)))
            .collect();
        let total: f64 = usage.iter().map(|(_, u)| u).sum();
        if total < self.config.min_training_cores {
            self.proposed = None;
            return None;
        }
        let training = training_cpus(&usage, total, &self.config);
        let free = CpuList::new(self.all.iter().filter(|c| !training.contains(*c)));
        let target = (!free.is_empty()).then_some(free);
        if target == self.current {
            self.proposed = None;
            return None;
        }
        let at_once = self.last_change.is_none()
            && now.saturating_duration_since(first_seen) < self.config.settle;
        if !at_once {
            let since = match &self.proposed {
                Some((p, since)) if *p == target => *since,
                _ => {
                    self.proposed = Some((target, now));
                    return None;
                }
            };
            if now.saturating_duration_since(since) < self.config.settle
                || self.last_change.is_some_and(|last| {
                    now.saturating_duration_since(last) < self.config.min_interval
                })
            {
                return None;
            }
        }
        self.proposed = None;
        self.last_change = Some(now);
        let previous = std::mem::replace(&mut self.current, target.clone());
        Some(PlacementDecision {
            cpus: target,
            previous,
            training_cpus: training,
            training_cores: total,
        })
    }

    /// Takes the job back to every CPU at `now`: the placement `of` did not
    /// lower the steal (see `super::monitor`). A later placement again needs
    /// a proposal that stands for `settle`, `min_interval` after this.
    pub fn undo(&mut self, now: Instant, of: &PlacementDecision) -> PlacementDecision {
        self.proposed = None;
        self.last_change = Some(now);
        PlacementDecision {
            cpus: None,
            previous: self.current.take(),
            training_cpus: of.training_cpus.clone(),
            training_cores: of.training_cores,
        }
    }
}

/// The busiest CPUs holding `cover` of the training's time, plus those it
/// used for at least `min_cpu_share` cores, at most as many as `total` cores
/// need at `cpu_fill` each or as it kept `busy_cpu` busy, whichever is more.
fn training_cpus(usage: &[(u32, f64)], total: f64, config: &PlacementConfig) -> CpuList {
    let mut by_use = usage.to_vec();
    by_use.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // At least one: the caller has already found the training busy.
    let busy = usage.iter().filter(|(_, u)| *u >= config.busy_cpu).count();
    let needed = ((total / config.cpu_fill).ceil() as usize).max(busy).max(1);
    let mut covered = 0.0;
    let mut cpus = Vec::new();
    for (cpu, u) in by_use.into_iter().take(needed) {
        if covered < config.cover * total || u >= config.min_cpu_share {
            cpus.push(cpu);
            covered += u;
        }
    }
    CpuList::new(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `ticks` periods of 100 ms in which the training ran
    /// `cores[i]` on CPU i; returns the decisions.
    fn feed(
        p: &mut Placement,
        t0: Instant,
        start_tick: u32,
        ticks: u32,
        cores: &[f64],
        acc: &mut [Duration],
    ) -> Vec<(u32, PlacementDecision)> {
        let mut out = Vec::new();
        for k in start_tick..start_tick + ticks {
            for (i, c) in cores.iter().enumerate() {
                acc[i] += (100 * MS).mul_f64(*c);
            }
            if let Some(d) = p.observe(acc, t0 + 100 * MS * k) {
                out.push((k, d));
            }
        }
        out
    }

    #[test]
    fn the_job_gets_the_cpus_the_training_leaves_free_as_soon_as_it_is_measured() {
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let mut acc = vec![Duration::ZERO; 2];
        let d = feed(&mut p, Instant::now(), 0, 10, &[0.05, 0.95], &mut acc);
        assert_eq!(d.len(), 1, "{d:?}");
        let (tick, d) = &d[0];
        assert_eq!(*tick, 3, "first decision after min_span (300 ms)");
        assert_eq!(d.cpus, Some(CpuList::new([0])));
        assert_eq!(d.training_cpus, CpuList::new([1]));
        assert!((d.training_cores - 1.0).abs() < 1e-6);
        assert_eq!(
            d.to_string(),
            "training ran 1.00 cores on CPUs 1: job CPUs all -> 0"
        );
    }

    #[test]
    fn a_training_that_needs_every_cpu_leaves_the_job_on_every_cpu() {
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1, 2, 3]));
        let mut acc = vec![Duration::ZERO; 4];
        // 0.85 on each: 3.4 cores need all four CPUs at 0.9 each.
        let d = feed(&mut p, Instant::now(), 0, 20, &[0.85; 4], &mut acc);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(p.current(), None);
    }

    #[test]
    fn a_training_hopping_over_every_cpu_keeps_only_as_many_as_it_uses() {
        // A new thread per step, 0.8 cores in all, spread 0.45 / 0.35 over
        // two CPUs: it needs one. The job gets the one it used less.
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let mut acc = vec![Duration::ZERO; 2];
        let d = feed(&mut p, Instant::now(), 0, 10, &[0.35, 0.45], &mut acc);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1.cpus, Some(CpuList::new([0])));
        assert_eq!(d[0].1.training_cpus, CpuList::new([1]));
        // 1.2 cores over four CPUs need two: the job gets the two it used
        // least (a tie goes to the lower number for the training).
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1, 2, 3]));
        let mut acc = vec![Duration::ZERO; 4];
        let d = feed(
            &mut p,
            Instant::now(),
            0,
            10,
            &[0.3, 0.35, 0.25, 0.3],
            &mut acc,
        );
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1.cpus, Some(CpuList::new([2, 3])));
        // A full CPU's worth spread evenly over two (a new thread per step
        // at one core, measured 0.96-1.03) needs one (1.0 ÷ 1.1): the job
        // gets the other...
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let mut acc = vec![Duration::ZERO; 2];
        let d = feed(&mut p, Instant::now(), 0, 20, &[0.5, 0.5], &mut acc);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1.cpus, Some(CpuList::new([1])));
        // ...but 1.2 cores over two need both (1.2 ÷ 1.1).
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let mut acc = vec![Duration::ZERO; 2];
        assert!(feed(&mut p, Instant::now(), 0, 20, &[0.6, 0.6], &mut acc).is_empty());
    }

    #[test]
    fn every_cpu_a_training_thread_keeps_busy_stays_the_trainings() {
        // Four threads at 0.75 cores, one on each of CPUs 0-3 of eight: 3.0
        // cores would fit three CPUs at 1.1 each, but each of the four has
        // a thread on it. The job gets 4-7, none of the training's.
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new(0..8));
        let mut acc = vec![Duration::ZERO; 8];
        let cores = [0.75, 0.75, 0.75, 0.75, 0.0, 0.0, 0.0, 0.0];
        let d = feed(&mut p, Instant::now(), 0, 10, &cores, &mut acc);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1.training_cpus, CpuList::new(0..4));
        assert_eq!(d[0].1.cpus, Some(CpuList::new(4..8)));
    }

    #[test]
    fn an_idle_training_changes_nothing() {
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let mut acc = vec![Duration::ZERO; 2];
        let d = feed(&mut p, Instant::now(), 0, 30, &[0.0, 0.01], &mut acc);
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn a_moved_training_moves_the_job_only_after_settling_and_the_interval() {
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let t0 = Instant::now();
        let mut acc = vec![Duration::ZERO; 2];
        let first = feed(&mut p, t0, 0, 10, &[0.0, 1.0], &mut acc);
        assert_eq!(first.len(), 1);
        // The training hops to CPU 0 at 1.0 s. One core needs one CPU: the
        // 1 s window sees it mostly on CPU 0 from ~1.5 s; the proposal must
        // then hold 2 s (and the previous change, at 0.3 s, be 3 s old).
        let moved = feed(&mut p, t0, 10, 40, &[1.0, 0.0], &mut acc);
        assert_eq!(moved.len(), 1, "{moved:?}");
        let (tick, d) = &moved[0];
        assert_eq!(d.cpus, Some(CpuList::new([1])));
        assert_eq!(d.previous, Some(CpuList::new([0])));
        assert!((33..=38).contains(tick), "moved at tick {tick}");
    }

    #[test]
    fn a_first_placement_after_the_start_waits_for_the_proposal_to_settle() {
        // The training needs both CPUs (1.2 cores) for 3 s, then dips to
        // 0.8 cores for a second (slowed for a moment), then uses them
        // again: no placement. From 6 s it runs 0.8 cores for good: the 1 s
        // window is under 1.1 cores from ~6.3 s, and the job is placed once
        // that proposal has held 2 s.
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let t0 = Instant::now();
        let mut acc = vec![Duration::ZERO; 2];
        assert!(feed(&mut p, t0, 0, 30, &[0.6, 0.6], &mut acc).is_empty());
        assert!(feed(&mut p, t0, 30, 10, &[0.35, 0.45], &mut acc).is_empty());
        assert!(feed(&mut p, t0, 40, 20, &[0.6, 0.6], &mut acc).is_empty());
        let d = feed(&mut p, t0, 60, 50, &[0.35, 0.45], &mut acc);
        assert_eq!(d.len(), 1, "{d:?}");
        let (tick, d) = &d[0];
        assert_eq!(d.cpus, Some(CpuList::new([0])));
        assert!((80..=88).contains(tick), "placed at tick {tick}");
    }

    #[test]
    fn a_short_hop_of_the_training_does_not_move_the_job() {
        let mut p = Placement::new(PlacementConfig::default(), CpuList::new([0, 1]));
        let t0 = Instant::now();
        let mut acc = vec![Duration::ZERO; 2];
        assert_eq!(feed(&mut p, t0, 0, 30, &[0.0, 1.0], &mut acc).len(), 1);
        // 0.5 s on the job's CPU, then back: the window shows the training
        // on both CPUs for 1.5 s, less than the settle time.
        assert!(feed(&mut p, t0, 30, 5, &[1.0, 0.0], &mut acc).is_empty());
        assert!(feed(&mut p, t0, 35, 40, &[0.0, 1.0], &mut acc).is_empty());
        assert_eq!(p.current(), Some(&CpuList::new([0])));
    }

    #[test]
    fn training_cpus_cover_most_of_its_time_and_every_busy_cpu() {
        let cfg = PlacementConfig::default();
        let usage = [(0, 0.05), (1, 0.9), (2, 0.25), (3, 0.0)];
        // 0.9 of 1.2 is not 90 %: CPU 2 joins; CPU 0 is under both bars.
        assert_eq!(training_cpus(&usage, 1.2, &cfg), CpuList::new([1, 2]));
    }
}
