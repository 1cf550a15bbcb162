//! `enforcer run --protect`: the supervisor loads the steal probes itself,
//! reports the job's steal, emits budget events, and stays null-safe when
//! the probes cannot measure anything.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use enforcer_tests::{ChildGuard, EnforcerRun, Scratch, enforcer, read_report, unique_name};

fn workload_bin() -> PathBuf {
    enforcer_tests::eval_workload!()
}

/// A PID the validator accepts (2..=4194304) that names no process now.
fn unused_pid() -> u32 {
    (2..=4_194_304u32)
        .rev()
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("a free PID")
}

/// The training spinner, pinned to CPU 0; killed on drop.
fn training_pinned_to_cpu0() -> ChildGuard {
    ChildGuard(
        Command::new(workload_bin())
            .args(["--cpu", "0", "spin", "1", "120"])
            .spawn()
            .expect("starting the training spinner"),
    )
}

/// A job spinning on the training's CPU, not in the idle class: the report
/// carries its steal, a stolen fraction far over a 5 % budget, preemptions,
/// time over budget, and a `budget_exceeded` event.
fn run_protect_reports_the_jobs_steal_and_budget_events() {
    let s = Scratch::new("enforcer-steal-run");
    let training = training_pinned_to_cpu0();
    std::thread::sleep(Duration::from_millis(200));
    let report = s.path("report.json");
    let w = workload_bin();
    let mut run = enforcer()
        .args(["run", "--config"])
        .arg(s.config(""))
        .args(["--no-idle", "--measure-only", "--protect"])
        .arg(training.0.id().to_string())
        .args([
            "--budget",
            "5%",
            "--progress",
            "--timeout",
            "120s",
            "--report",
        ])
        .arg(&report)
        .arg("--")
        .arg(&w)
        .args(["--cpu", "0", "spin", "1", "120"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("running enforcer run");
    // The supervisor loads the probes after starting the job (seconds under
    // emulation): meter 3 s from the moment they are attached, then stop the
    // job with SIGTERM, which the supervisor turns into a kill and a report.
    let mut stderr_lines = BufReader::new(run.stderr.take().expect("stderr")).lines();
    let mut stderr = String::new();
    for line in stderr_lines.by_ref() {
        let line = line.expect("reading stderr");
        stderr += &line;
        stderr.push('\n');
        if line.contains("steal meter attached") || line.contains("steal not measured") {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling the enforcer this test started.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    for line in stderr_lines {
        stderr += &line.expect("reading stderr");
        stderr.push('\n');
    }
    let _ = run.wait().expect("waiting for enforcer run");
    assert!(stderr.contains("steal meter attached"), "{stderr}");
    let r = read_report(&report);
    let steal = r["stolen_from_training_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("{r}"));
    let fraction = r["stolen_fraction"].as_f64().unwrap();
    assert!(
        steal > 0.3,
        "the job ran on the training's CPU: {r}\n{stderr}"
    );
    assert!(fraction > 0.05 && fraction < 1.0, "{r}");
    assert!(r["preemptions_of_training"].as_u64().unwrap() > 0, "{r}");
    // Steal is part of the training's run-queue wait; the two totals come
    // from readings a few microseconds apart, hence the small allowance.
    assert!(
        r["training_runq_wait_s"].as_f64().unwrap() >= steal * 0.99 - 0.005,
        "{r}"
    );
    assert!(
        r["unavailable"]["budget_used"]
            .as_str()
            .is_some_and(|why| why.contains("measured only")),
        "{r}"
    );
    assert_eq!(r["budget_fraction"].as_f64(), Some(0.05), "{r}");
    assert!(r["over_budget_s"].as_f64().unwrap() > 0.5, "{r}");
    assert!(
        r["events"]["budget_exceeded"].as_u64().unwrap_or(0) >= 1,
        "{r}"
    );
    assert!(r["unavailable"].get("stolen_fraction").is_none(), "{r}");
    assert!(
        stderr.contains("steal ") && stderr.contains("budget 5.0%"),
        "--progress line: {stderr}"
    );
}

/// Probes that cannot measure (here: the training PID does not exist) do not
/// stop the job: it runs and is reported, and the steal fields are null with
/// the reason in `unavailable`.
fn run_without_a_measurable_training_still_runs_and_reports_null_steal_with_reason() {
    let s = Scratch::new("enforcer-steal-run");
    let report = s.path("report.json");
    let out = EnforcerRun::new(s.config(""), &unique_name("unmeasured"))
        .flags(["--protect", &unused_pid().to_string(), "--report"])
        .flags([&report])
        .job([
            workload_bin().as_os_str(),
            "spin".as_ref(),
            "1".as_ref(),
            "0.2".as_ref(),
        ])
        .output()
        .expect("running enforcer run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r = read_report(&report);
    for field in [
        "stolen_from_training_s",
        "stolen_fraction",
        "preemptions_of_training",
        "training_runq_wait_s",
        "budget_fraction",
        "over_budget_s",
    ] {
        assert!(r[field].is_null(), "{field}: {r}");
        let reason = r["unavailable"][field].as_str().unwrap_or_default();
        assert!(reason.contains("has no threads"), "{field}: {reason}");
    }
    assert_eq!(
        stderr.matches("steal not measured").count(),
        1,
        "one warning: {stderr}"
    );
    assert!(
        r["cpu_s"].as_f64().is_some(),
        "the job itself is reported: {r}"
    );
}

enforcer_tests::root_tests!(
    run_protect_reports_the_jobs_steal_and_budget_events,
    run_without_a_measurable_training_still_runs_and_reports_null_steal_with_reason,
);
