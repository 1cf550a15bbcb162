//! The freezer duty cycle against the real kernel: a CPU-burning process
//! duty-cycled to 50 % gets 50 % ± 10 % of the CPU it gets free-running,
//! measured from its cgroup's `cpu.stat` usage. The free-running control is
//! measured in the same test, in alternating windows (A B B A ...), because
//! the host is shared and its load drifts.
//!
//! Two freezers: the v1 `freezer` hierarchy (`freezer.state`) where it is
//! mounted (the hybrid host), and the v2 `cgroup.freeze` (the VMs, and the
//! host's controller-less unified hierarchy, which has it too).
//!
//! This drives the library's `DutyCycle` directly, on cgroups the test
//! creates under its own, so that each freezer is tested whichever the
//! enforcer would pick on this host; `duty_cycle_run.rs` tests
//! `enforcer run --duty-cycle` through the binary.

mod duty_support;

use std::time::{Duration, Instant};

use duty_support::burner;
use enforcer::gpu::duty::{DutyCycle, RunFraction};
use enforcer_tests::freezer::FsFreezer;
use enforcer_tests::{TestCgroup, cpu_usage, mount_of, own_cgroup, unique_name};

/// Alternates free-running and 50 % windows (A B B A, four times: short
/// windows, many alternations, so load drift on a shared host cancels) and
/// returns (free CPU, duty-cycled CPU), each summed over its windows.
fn measure(duty: &DutyCycle, stat: &TestCgroup, window: Duration) -> (Duration, Duration) {
    let settle = Duration::from_millis(200);
    let mut free = Duration::ZERO;
    let mut cycled = Duration::ZERO;
    let abba = [false, true, true, false];
    for half in abba.into_iter().cycle().take(16) {
        duty.set_run_fraction(if half {
            RunFraction::new(0.5)
        } else {
            RunFraction::FULL
        });
        // The fraction applies from the next period: skip the transition.
        std::thread::sleep(settle);
        let (u0, t0) = (cpu_usage(&stat.0), Instant::now());
        std::thread::sleep(window);
        let used = cpu_usage(&stat.0).saturating_sub(u0);
        // Normalise to the window in case a sleep overslept.
        let used = used.mul_f64(window.as_secs_f64() / t0.elapsed().as_secs_f64());
        if half {
            cycled += used;
        } else {
            free += used;
        }
    }
    (free, cycled)
}

/// Up to two measurements: one that falls outside the bounds is repeated
/// once, because a loaded shared host, or a TCG VM that host deschedules,
/// can skew a whole measurement. A freezer that does not work fails both.
const ATTEMPTS: u32 = 2;

fn check(freezer: FsFreezer, stat: &TestCgroup, label: &str) {
    for attempt in 1..=ATTEMPTS {
        let duty = DutyCycle::start(
            freezer.clone(),
            Duration::from_millis(100),
            RunFraction::FULL,
        )
        .expect("starting the duty-cycle thread");
        // A whole number of periods per window, so the window's phase
        // against the duty cycle does not matter.
        let (free, cycled) = measure(&duty, stat, Duration::from_millis(500));
        let stats = duty.stop().expect("the freezer failed");
        let ratio = cycled.as_secs_f64() / free.as_secs_f64();
        eprintln!(
            "{label} on {} (attempt {attempt}): free-running {:.3} CPU-s, duty-cycled 50% {:.3} CPU-s over 8 x 0.5 s each: ratio {ratio:.3} ({} periods, {} frozen for {:.3} s in all)",
            enforcer_tests::kernel_release(),
            free.as_secs_f64(),
            cycled.as_secs_f64(),
            stats.periods,
            stats.frozen_periods,
            stats.frozen.as_secs_f64()
        );
        // Meaningful only if the burner actually ran free: at least 0.1 CPU
        // on average in its windows, even on a loaded host or under TCG.
        let meaningful = free > Duration::from_millis(400);
        let within = (0.4..=0.6).contains(&ratio);
        if meaningful && within {
            return;
        }
        if attempt == ATTEMPTS {
            assert!(
                meaningful,
                "the free-running burner got only {free:?} CPU in 4 s: host too loaded to measure"
            );
            panic!(
                "duty-cycled to 50 %, the burner got {ratio:.3} of its free-running CPU ({cycled:?} vs {free:?})"
            );
        }
        eprintln!("  out of bounds: measuring once more");
    }
}

fn cpu_burner_duty_cycled_to_half_by_v1_freezer_gets_half_its_free_cpu() {
    let (Some(freezer_mount), Some(own_freezer)) = (
        mount_of("cgroup", Some("freezer")),
        own_cgroup(Some("freezer")),
    ) else {
        enforcer_tests::skip!(
            "no v1 freezer hierarchy (pure cgroup v2: see the cgroup.freeze test)"
        );
    };
    let (Some(v2_mount), Some(own_v2)) = (mount_of("cgroup2", None), own_cgroup(None)) else {
        enforcer_tests::skip!("no cgroup2 hierarchy to measure CPU usage in");
    };
    let name = unique_name("duty-v1");
    let frz = TestCgroup::create(&freezer_mount, &own_freezer, &name);
    let stat = TestCgroup::create(&v2_mount, &own_v2, &name);
    let burner = burner();
    frz.add(burner.0.id());
    stat.add(burner.0.id());
    let freezer = FsFreezer::for_dir(&frz.0).expect("v1 freezer cgroup");
    assert!(matches!(freezer, FsFreezer::V1 { .. }));
    check(freezer, &stat, "v1 freezer.state");
    drop(burner);
}

fn cpu_burner_duty_cycled_to_half_by_cgroup_freeze_gets_half_its_free_cpu() {
    let (Some(v2_mount), Some(own_v2)) = (mount_of("cgroup2", None), own_cgroup(None)) else {
        enforcer_tests::skip!("no cgroup2 hierarchy");
    };
    let name = unique_name("duty-v2");
    let cg = TestCgroup::create(&v2_mount, &own_v2, &name);
    let burner = burner();
    cg.add(burner.0.id());
    let Ok(freezer @ FsFreezer::V2 { .. }) = FsFreezer::for_dir(&cg.0) else {
        enforcer_tests::skip!("{} has no cgroup.freeze (kernel < 5.2)", cg.0.display());
    };
    check(freezer, &cg, "v2 cgroup.freeze");
    drop(burner);
}

enforcer_tests::root_tests!(
    cpu_burner_duty_cycled_to_half_by_v1_freezer_gets_half_its_free_cpu,
    cpu_burner_duty_cycled_to_half_by_cgroup_freeze_gets_half_its_free_cpu,
);
