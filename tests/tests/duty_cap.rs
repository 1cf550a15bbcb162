//! The utilisation cap closed over the real freezer, without a GPU: a
//! [`GpuSource`] that reports a CPU burner's CPU share as its "SM
//! utilisation" (a process that is frozen launches no kernels and burns no
//! CPU alike). The cap is set to half the burner's measured free-running
//! share (so that it binds on an idle VM and on a loaded host alike); the
//! guard must throttle it, hold it no more than 10 points above the cap, and
//! not starve it (more than 10 points under the cap only while relaxing).

mod duty_support;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use duty_support::burner;
use enforcer::cgroup::membership::{CgroupMembership, Hierarchy, ProcCgroups};
use enforcer::gpu::{
    DeviceSample, GpuError, GpuSource, ProcessSample,
    guard::{GpuGuard, GpuLimits},
};
use enforcer_tests::{
    TestCgroup, cpu_usage, freezer::FsFreezer, mount_of, own_cgroup, unique_name,
};

/// CPU share of the cgroup since the previous call, as SM utilisation of `pid`.
struct CpuAsGpu {
    stat: PathBuf,
    pid: u32,
    last: (Instant, Duration),
    ts: u64,
}

impl GpuSource for CpuAsGpu {
    fn devices(&mut self) -> Result<Vec<DeviceSample>, GpuError> {
        Ok(vec![DeviceSample {
            index: 0,
            name: "simulated: CPU share of the burner".into(),
            memory_total_bytes: 1 << 30,
            memory_used_bytes: 1 << 20,
            gpu_util_pct: 0,
        }])
    }

    fn processes(&mut self, since_us: u64) -> Result<Vec<ProcessSample>, GpuError> {
        let now = (Instant::now(), cpu_usage(&self.stat));
        let share = (now.1 - self.last.1).as_secs_f64() / (now.0 - self.last.0).as_secs_f64();
        self.last = now;
        self.ts = self.ts.max(since_us) + 1;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a percentage clamped to 0..=100"
        )]
        let pct = (share * 100.0).round().clamp(0.0, 100.0) as u32;
        Ok(vec![ProcessSample {
            device: 0,
            pid: self.pid,
            memory_used_bytes: Some(1 << 20),
            sm_samples: vec![(self.ts, pct)],
        }])
    }
}

fn util_cap_holds_a_simulated_gpu_job_within_ten_points_of_the_cap_through_the_freezer() {
    let (Some(v2_mount), Some(own_v2)) = (mount_of("cgroup2", None), own_cgroup(None)) else {
        enforcer_tests::skip!("no cgroup2 hierarchy");
    };
    let name = unique_name("duty-cap");
    let cg = TestCgroup::create(&v2_mount, &own_v2, &name);
    let burner = burner();
    let pid = burner.0.id();
    cg.add(pid);
    let Ok(freezer @ FsFreezer::V2 { .. }) = FsFreezer::for_dir(&cg.0) else {
        enforcer_tests::skip!("{} has no cgroup.freeze (kernel < 5.2)", cg.0.display());
    };
    let stat = cg.0.clone();

    // The control: the burner's free-running share.
    let (t0, u0) = (Instant::now(), cpu_usage(&stat));
    std::thread::sleep(Duration::from_secs(2));
    let free_pct = 100.0 * (cpu_usage(&stat) - u0).as_secs_f64() / t0.elapsed().as_secs_f64();

    let membership = CgroupMembership {
        hierarchy: Hierarchy::Unified,
        path: format!("{}/{name}", own_v2.trim_end_matches('/')),
    };
    let source = CpuAsGpu {
        last: (Instant::now(), cpu_usage(&stat)),
        stat,
        pid,
        ts: 0,
    };
    assert!(
        free_pct >= 20.0,
        "the free-running burner got only {free_pct:.1}% of a CPU: host too loaded to measure"
    );
    let limit = (free_pct / 2.0).min(50.0);
    let limits = GpuLimits {
        util_limit_pct: Some(limit),
        ..GpuLimits::default()
    };
    let mut guard = GpuGuard::new(
        Ok(Box::new(source)),
        membership,
        ProcCgroups::default(),
        limits,
    )
    .with_freezer(freezer);
    let mut measured = Vec::new();
    for _ in 0..14 {
        std::thread::sleep(Duration::from_secs(1));
        guard.tick(Instant::now());
        let u = guard.snapshot().tick.get(&0).and_then(|t| t.sm_util_pct);
        measured.push((u, guard.run_fraction()));
    }
    let report = guard.finish();
    drop(burner);

    eprintln!(
        "free-running {free_pct:.1}%, cap {limit:.1}%; per tick (util %, run fraction): {:?}",
        measured
            .iter()
            .map(|(u, f)| (u.map(|u| u.round()), (f * 100.0).round() / 100.0))
            .collect::<Vec<_>>()
    );
    let gpu = report.gpu.expect("the simulated source is available");
    assert_eq!(
        gpu.len(),
        1,
        "the burner was not attributed to its cgroup: {gpu:?}"
    );
    let tail: Vec<f64> = measured[6..].iter().filter_map(|m| m.0).collect();
    assert_eq!(tail.len(), 8, "ticks without a sample: {measured:?}");
    #[expect(clippy::cast_precision_loss, reason = "8 values")]
    let mean = tail.iter().sum::<f64>() / tail.len() as f64;
    eprintln!("capped at {limit:.1}%: mean over the last 8 ticks {mean:.1}%");
    assert!(
        measured.iter().any(|m| m.1 < 1.0),
        "the cap never throttled a job running at {free_pct:.1}% against a {limit:.1}% cap: {measured:?}"
    );
    assert!(
        mean <= limit + 10.0,
        "capped at {limit:.1}%, the job used {mean:.1}% ({measured:?})"
    );
    // Under the cap by more than 10 points is fine only while the guard is
    // relaxing (the host's load rose and took the CPU, not the freezer).
    let relaxing = measured[13].1 > measured[6].1 || measured[13].1 >= 1.0;
    assert!(
        mean >= limit - 10.0 || relaxing,
        "capped at {limit:.1}%, the guard starved the job to {mean:.1}% and kept it there: {measured:?}"
    );
}

enforcer_tests::root_tests!(
    util_cap_holds_a_simulated_gpu_job_within_ten_points_of_the_cap_through_the_freezer,
);
