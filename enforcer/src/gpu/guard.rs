//! One job's GPU guard, advanced once per control tick: reads the source,
//! attributes processes to the job, accumulates the report's `gpu` field,
//! runs the utilisation cap (driving the job's freezer duty cycle) and the
//! GPU memory limit. Independent of how the supervisor schedules ticks: the
//! job supervisor's monitor calls [`GpuGuard::tick`] and turns its
//! [`GpuEvent`]s into job events.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::cgroup::membership::{CgroupMembership, ProcCgroups};

use super::{
    Unavailable,
    attribution::{JobDeviceUsage, JobUsage, TickDevice, job_tick},
    cap::{CapAction, CapParams, MemoryGuard, MemoryVerdict, UtilCap},
    duty::{DutyCycle, Freezer, RunFraction},
    source::{DeviceSample, GpuSource, NvmlSource},
};

/// The guard's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuLimits {
    /// Cap on the job's SM utilisation, percent; `None`: measure only.
    pub util_limit_pct: Option<f64>,
    /// GPU memory limit over all devices, bytes; `None`: no limit.
    pub memory_limit_bytes: Option<u64>,
    /// How long the job may stay over the memory limit before it is killed.
    pub memory_grace: Duration,
    /// The duty-cycle period used by the cap.
    pub duty_period: Duration,
}

impl Default for GpuLimits {
    fn default() -> Self {
        GpuLimits {
            util_limit_pct: Some(80.0),
            memory_limit_bytes: None,
            memory_grace: Duration::from_secs(2),
            duty_period: Duration::from_millis(100),
        }
    }
}

/// Something the job supervisor should publish as a job event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GpuEvent {
    /// The cap changed the job's run fraction.
    GpuUtilCap {
        action: CapAction,
        sm_util_pct: f64,
        limit_pct: f64,
        run_fraction: f64,
    },
    /// The job went over its GPU memory limit (it will be killed if it stays
    /// over for the grace period).
    GpuMemoryHigh {
        used_bytes: u64,
        limit_bytes: u64,
        grace_ms: u64,
    },
    /// The job stayed over its GPU memory limit: kill it, `reason: gpu_memory`.
    GpuMemoryKill { used_bytes: u64, limit_bytes: u64 },
    /// GPU telemetry stopped working mid-job.
    GpuUnavailable { reason: String },
}

/// What one tick decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickOutcome {
    pub events: Vec<GpuEvent>,
    /// Kill the job with `reason: gpu_memory`.
    pub kill: bool,
}

/// One read of the GPU telemetry: every device, and the job's share of
/// each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    pub devices: Vec<DeviceSample>,
    pub tick: BTreeMap<u32, TickDevice>,
}

/// The latest numbers, for status and Prometheus.
#[derive(Debug, Clone, Default)]
pub struct GpuSnapshot {
    pub unavailable: Option<Unavailable>,
    pub devices: Vec<DeviceSample>,
    pub tick: BTreeMap<u32, TickDevice>,
    /// The cap's run fraction, when a cap is set.
    pub run_fraction: Option<f64>,
}

/// The report's GPU fields: `gpu` is `None` (JSON `null`) exactly when
/// `unavailable` says why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReport {
    pub gpu: Option<Vec<JobDeviceUsage>>,
    pub unavailable: Option<String>,
}

pub struct GpuGuard {
    source: Option<Box<dyn GpuSource>>,
    unavailable: Option<Unavailable>,
    job: CgroupMembership,
    procs: ProcCgroups,
    limits: GpuLimits,
    last_ts: u64,
    usage: JobUsage,
    cap: Option<UtilCap>,
    memory: Option<MemoryGuard>,
    freezer: Option<Box<dyn FnOnce() -> Option<DutyCycle> + Send>>,
    duty: Option<DutyCycle>,
    snapshot: GpuSnapshot,
}

impl std::fmt::Debug for GpuGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuGuard")
            .field("unavailable", &self.unavailable)
            .field("job", &self.job)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl GpuGuard {
    /// The production guard: NVML, the real `/proc`. When NVML cannot be
    /// used, or the agent cannot map NVML's host PIDs (another PID
    /// namespace), the guard is inert and says why, with one warning.
    pub fn open(job: CgroupMembership, limits: GpuLimits) -> Self {
        let source = super::pid_namespace_check().and_then(|()| {
            NvmlSource::init()
                .map(|s| Box::new(s) as Box<dyn GpuSource>)
                .map_err(|e| e.reason)
        });
        Self::opened(source, job, limits)
    }

    /// [`GpuGuard::open`] once the source is known: warns once per process
    /// when there is none.
    fn opened(
        source: Result<Box<dyn GpuSource>, Unavailable>,
        job: CgroupMembership,
        limits: GpuLimits,
    ) -> Self {
        if let Err(reason) = &source {
            // One warning per process (an agent runs many jobs): the node
            // does not change between jobs.
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!(case = reason.case(), %reason, "GPU telemetry unavailable");
            } else {
                tracing::warn!(case = reason.case(), %reason, "GPU telemetry unavailable: job GPU fields will be null");
            }
        }
        GpuGuard::new(source, job, ProcCgroups::default(), limits)
    }

    /// A guard over any source (tests use a synthetic one).
    pub fn new(
        source: Result<Box<dyn GpuSource>, Unavailable>,
        job: CgroupMembership,
        procs: ProcCgroups,
        limits: GpuLimits,
    ) -> Self {
        let (source, unavailable) = match source {
            Ok(s) => (Some(s), None),
            Err(u) => (None, Some(u)),
        };
        GpuGuard {
            snapshot: GpuSnapshot {
                unavailable: unavailable.clone(),
                ..GpuSnapshot::default()
            },
            source,
            unavailable,
            job,
            procs,
            cap: limits
                .util_limit_pct
                .map(|l| UtilCap::new(CapParams::with_limit(l))),
            memory: limits
                .memory_limit_bytes
                .map(|b| MemoryGuard::new(b, limits.memory_grace)),
            limits,
            last_ts: 0,
            usage: JobUsage::default(),
            freezer: None,
            duty: None,
        }
    }

    /// Gives the cap the job's freezer. The duty-cycle thread starts only
    /// when the cap first throttles, so an uncapped or GPU-less job never
    /// pays for it.
    pub fn with_freezer(mut self, freezer: impl Freezer) -> Self {
        let period = self.limits.duty_period;
        self.freezer = Some(Box::new(move || {
            DutyCycle::start(freezer, period, RunFraction::FULL)
                .map_err(|e| tracing::error!(error = %e, "starting the duty-cycle thread failed"))
                .ok()
        }));
        self
    }

    pub fn is_available(&self) -> bool {
        self.source.is_some()
    }

    pub fn snapshot(&self) -> &GpuSnapshot {
        &self.snapshot
    }

    /// The cap's current run fraction (1 when uncapped).
    pub fn run_fraction(&self) -> f64 {
        self.cap.as_ref().map_or(1.0, UtilCap::run_fraction)
    }

    /// One control tick: [`GpuGuard::read`], then [`GpuGuard::act`].
    pub fn tick(&mut self, now: Instant) -> TickOutcome {
        match self.read() {
            Some(reading) => self.act(&reading, now),
            None => TickOutcome::default(),
        }
    }

    /// Reads the telemetry and attributes it to the job; `None` when there
    /// is none. A failure stops the guard for good and says why.
    pub fn read(&mut self) -> Option<Result<GpuReading, String>> {
        let source = self.source.as_mut()?;
        let read = source
            .devices()
            .and_then(|d| source.processes(self.last_ts).map(|p| (d, p)));
        let (devices, processes) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "GPU telemetry failed mid-job: stopping the GPU guard");
                let reason = e.to_string();
                self.stop(e.reason);
                return Some(Err(reason));
            }
        };
        for p in &processes {
            if let Some(&(ts, _)) = p.sm_samples.iter().max_by_key(|s| s.0) {
                self.last_ts = self.last_ts.max(ts);
            }
        }
        let procs = &self.procs;
        let job = &self.job;
        let tick = job_tick(&processes, |pid| {
            procs.belongs(pid, job).unwrap_or_else(|e| {
                tracing::debug!(pid, error = %e, "cannot read the cgroup of a GPU process");
                false
            })
        });
        Some(Ok(GpuReading { devices, tick }))
    }

    /// Moves the utilisation cap and the memory guard on `reading`.
    pub fn act(&mut self, reading: &Result<GpuReading, String>, now: Instant) -> TickOutcome {
        let mut out = TickOutcome::default();
        let GpuReading { devices, tick } = match reading {
            Ok(r) => r,
            Err(reason) => {
                out.events.push(GpuEvent::GpuUnavailable {
                    reason: reason.clone(),
                });
                return out;
            }
        };
        self.usage.add(tick, devices);

        if let Some(cap) = self.cap.as_mut() {
            // The freezer stops the whole job, so the hottest device decides.
            let hottest = tick
                .values()
                .filter_map(|t| t.sm_util_pct)
                .fold(None, |m: Option<f64>, u| Some(m.map_or(u, |m| m.max(u))));
            let action = cap.tick(hottest);
            if action != CapAction::Held {
                let f = cap.run_fraction();
                out.events.push(GpuEvent::GpuUtilCap {
                    action,
                    sm_util_pct: hottest.unwrap_or(0.0),
                    limit_pct: cap.params().limit_pct,
                    run_fraction: f,
                });
                if self.duty.is_none()
                    && f < 1.0
                    && let Some(start) = self.freezer.take()
                {
                    self.duty = start();
                }
                if let Some(d) = &self.duty {
                    d.set_run_fraction(RunFraction::new(f));
                }
            }
        }

        if let Some(mem) = self.memory.as_mut() {
            let used: u64 = tick.values().map(|t| t.memory_used_bytes).sum();
            let limit_bytes = mem.limit_bytes();
            match mem.tick(used, now) {
                MemoryVerdict::WentOver => out.events.push(GpuEvent::GpuMemoryHigh {
                    used_bytes: used,
                    limit_bytes,
                    grace_ms: u64::try_from(self.limits.memory_grace.as_millis())
                        .unwrap_or(u64::MAX),
                }),
                MemoryVerdict::Kill => {
                    out.events.push(GpuEvent::GpuMemoryKill {
                        used_bytes: used,
                        limit_bytes,
                    });
                    out.kill = true;
                }
                MemoryVerdict::Under | MemoryVerdict::Over => {}
            }
        }

        self.snapshot = GpuSnapshot {
            unavailable: None,
            devices: devices.clone(),
            tick: tick.clone(),
            run_fraction: self.cap.as_ref().map(UtilCap::run_fraction),
        };
        out
    }

    fn stop(&mut self, reason: Unavailable) {
        self.source = None;
        self.duty = None;
        self.snapshot = GpuSnapshot {
            unavailable: Some(reason.clone()),
            ..GpuSnapshot::default()
        };
        self.unavailable = Some(reason);
    }

    /// The report's GPU fields.
    pub fn report(&self) -> GpuReport {
        match &self.unavailable {
            Some(u) => GpuReport {
                gpu: None,
                unavailable: Some(u.to_string()),
            },
            None => GpuReport {
                gpu: Some(self.usage.summary()),
                unavailable: None,
            },
        }
    }

    /// Ends the guard: stops the duty cycle (thawing the job).
    pub fn finish(&mut self) -> GpuReport {
        self.duty = None;
        self.report()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::cgroup::membership::{Hierarchy, fake_proc};
    use crate::gpu::{
        GpuError,
        duty::FreezeError,
        source::ProcessSample,
        synthetic::{Frame, SyntheticSource},
    };

    fn device() -> DeviceSample {
        DeviceSample {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            memory_used_bytes: 10 << 30,
            gpu_util_pct: 97,
        }
    }

    /// Tick `i`: the job's PID 4242 at `util` % with `mem` bytes, and a
    /// foreign PID 7 at 50 %.
    fn frame(i: u64, util: u32, mem: u64) -> Frame {
        Frame {
            devices: Ok(vec![device()]),
            processes: Ok(vec![
                ProcessSample {
                    device: 0,
                    pid: 4242,
                    memory_used_bytes: Some(mem),
                    sm_samples: vec![(i * 1_000_000 + 1, util), (i * 1_000_000 + 500_000, util)],
                },
                ProcessSample {
                    device: 0,
                    pid: 7,
                    memory_used_bytes: Some(1 << 30),
                    sm_samples: vec![(i * 1_000_000 + 2, 50)],
                },
            ]),
        }
    }

    fn guard_over(frames: Vec<Frame>, limits: GpuLimits) -> (GpuGuard, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(
            dir.path(),
            &[(4242, "0::/eval/job-a\n"), (7, "0::/training\n")],
        );
        let job = CgroupMembership {
            hierarchy: Hierarchy::Unified,
            path: "/eval/job-a".into(),
        };
        let g = GpuGuard::new(
            Ok(Box::new(SyntheticSource::new(frames))),
            job,
            ProcCgroups::new(dir.path()),
            limits,
        );
        (g, dir)
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<bool>>>);
    impl Freezer for Recorder {
        fn freeze(&self, frozen: bool) -> Result<(), FreezeError> {
            self.0.lock().unwrap().push(frozen);
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    #[test]
    fn report_covers_only_the_jobs_processes_and_caps_a_hot_job() {
        let frames = (0..10).map(|i| frame(i, 100, 3 << 30)).collect();
        let limits = GpuLimits {
            util_limit_pct: Some(50.0),
            duty_period: Duration::from_millis(10),
            ..GpuLimits::default()
        };
        let (g, _dir) = guard_over(frames, limits);
        let rec = Recorder::default();
        let mut g = g.with_freezer(rec.clone());
        let t0 = Instant::now();
        let first = g.tick(t0);
        assert!(
            matches!(
                first.events[..],
                [GpuEvent::GpuUtilCap { action: CapAction::Tightened, run_fraction, .. }] if (run_fraction - 0.5).abs() < 1e-9
            ),
            "{first:?}"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            rec.0.lock().unwrap().contains(&true),
            "the duty cycle never froze the job"
        );
        for i in 1..10 {
            g.tick(t0 + Duration::from_secs(i));
        }
        let report = g.finish();
        assert_eq!(
            rec.0.lock().unwrap().last(),
            Some(&false),
            "job left frozen"
        );
        let gpu = report.gpu.unwrap();
        assert_eq!(gpu.len(), 1);
        assert_eq!(gpu[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpu[0].memory_used_bytes, 3 << 30, "foreign PID counted");
        assert_eq!(gpu[0].sm_util_pct_max, Some(100.0));
        assert!(report.unavailable.is_none());
        let prom = crate::gpu::metrics::exposition("job-a", g.snapshot());
        assert!(prom.contains("enforcer_gpu_available 1\n"), "{prom}");
        assert!(
            prom.contains(
                "enforcer_gpu_job_memory_used_bytes{job_id=\"job-a\",gpu=\"0\"} 3221225472\n"
            ),
            "{prom}"
        );
        assert!(prom.contains("enforcer_gpu_device_utilization_percent{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 97\n"), "{prom}");
        assert!(
            prom.contains("enforcer_gpu_job_run_fraction{job_id=\"job-a\"} "),
            "{prom}"
        );
    }

    #[test]
    fn guard_asks_nvml_only_for_samples_newer_than_the_last_seen() {
        let frames = (0..3).map(|i| frame(i, 10, 1)).collect();
        let (mut g, _dir) = guard_over(frames, GpuLimits::default());
        g.tick(Instant::now());
        assert_eq!(g.last_ts, 500_000);
        g.tick(Instant::now());
        g.tick(Instant::now());
        assert_eq!(g.last_ts, 2_500_000);
    }

    #[test]
    fn memory_over_limit_emits_then_kills_after_grace() {
        let frames = vec![
            frame(0, 10, 1 << 30),
            frame(1, 10, 5 << 30),
            frame(2, 10, 5 << 30),
            frame(3, 10, 5 << 30),
        ];
        let limits = GpuLimits {
            util_limit_pct: None,
            memory_limit_bytes: Some(2 << 30),
            memory_grace: Duration::from_secs(2),
            ..GpuLimits::default()
        };
        let (mut g, _dir) = guard_over(frames, limits);
        let t0 = Instant::now();
        assert_eq!(g.tick(t0), TickOutcome::default());
        let over = g.tick(t0 + Duration::from_secs(1));
        assert!(!over.kill);
        assert!(
            matches!(over.events[..], [GpuEvent::GpuMemoryHigh { used_bytes, .. }] if used_bytes == 5 << 30)
        );
        assert!(!g.tick(t0 + Duration::from_secs(2)).kill);
        let kill = g.tick(t0 + Duration::from_secs(3));
        assert!(kill.kill);
        assert!(matches!(kill.events[..], [GpuEvent::GpuMemoryKill { .. }]));
    }

    #[test]
    fn unavailable_nvml_gives_null_gpu_with_reason_and_no_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = GpuGuard::new(
            Err(Unavailable::NoLibrary {
                detail: "libnvidia-ml.so.1: cannot open shared object file".into(),
            }),
            CgroupMembership {
                hierarchy: Hierarchy::Unified,
                path: "/eval/x".into(),
            },
            ProcCgroups::new(dir.path()),
            GpuLimits::default(),
        );
        assert_eq!(g.tick(Instant::now()), TickOutcome::default());
        let r = g.finish();
        assert_eq!(r.gpu, None);
        assert!(r.unavailable.unwrap().contains("libnvidia-ml.so.1"));
        let json = serde_json::to_value(g.report()).unwrap();
        assert!(json["gpu"].is_null());
        let prom = crate::gpu::metrics::exposition("x", g.snapshot());
        assert_eq!(
            prom.lines().last(),
            Some("enforcer_gpu_available{case=\"no_library\"} 0")
        );
    }

    #[test]
    fn opened_on_a_node_without_nvml_is_inert_not_a_panic() {
        let g = GpuGuard::opened(
            Err(Unavailable::NoLibrary {
                detail: "libnvidia-ml.so.1: cannot open shared object file".into(),
            }),
            CgroupMembership {
                hierarchy: Hierarchy::Unified,
                path: "/x".into(),
            },
            GpuLimits::default(),
        );
        assert!(!g.is_available());
        assert!(g.report().unavailable.is_some());
    }

    #[test]
    fn a_failure_mid_job_stops_the_guard_with_the_reason() {
        let failing = Frame {
            devices: Err(GpuError {
                call: "nvmlDeviceGetUtilizationRates",
                device: Some(0),
                reason: Unavailable::Other {
                    call: "nvmlDeviceGetUtilizationRates".into(),
                    detail: "GPU is lost".into(),
                },
            }),
            processes: Ok(vec![]),
        };
        let (mut g, _dir) = guard_over(vec![frame(0, 90, 1), failing], GpuLimits::default());
        g.tick(Instant::now());
        let out = g.tick(Instant::now());
        assert!(matches!(out.events[..], [GpuEvent::GpuUnavailable { .. }]));
        let r = g.report();
        assert_eq!(r.gpu, None);
        assert!(r.unavailable.unwrap().contains("GPU is lost"));
    }
}
