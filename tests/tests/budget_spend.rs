//! The budget is spent, not feared: where the idle class alone keeps the
//! training within budget, `enforcer run --protect --budget` takes nothing
//! from the evaluation. A training on CPU 0 beside a one-thread job in the
//! idle class loses next to nothing to it: the job must start without a
//! quota, never be tightened, frozen or confined to CPUs (placement answers
//! steal, and there is none to answer), and its report must say how much
//! of the budget it used.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use enforcer_tests::{
    ChildGuard, EnforcerGuard, Scratch, enforcer, read_report, skip, unique_name,
};

fn workload() -> std::path::PathBuf {
    enforcer_tests::eval_workload!()
}

/// The `detail` of a `budget` job event of a JSON log line.
fn budget_event(line: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["fields"]["event"] != "budget" {
        return None;
    }
    serde_json::from_str(v["fields"]["detail"].as_str()?).ok()
}

fn a_job_the_idle_class_keeps_within_budget_gets_no_quota() {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online CPUs");
    if online.trim() == "0" {
        skip!("needs two CPUs (one the training leaves to the job)");
    }
    let scratch = Scratch::new("budget-spend");
    let training = ChildGuard(
        Command::new(workload())
            .args(["--cpu", "0", "spin", "1", "600"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the training"),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let report_path = scratch.path("report.json");
    let name = unique_name("spend");
    let mut run = EnforcerGuard(
        enforcer()
            .args(["--log-format", "json", "run", "--job", &name, "--protect"])
            .arg(training.0.id().to_string())
            .args(["--budget", "5%", "--timeout", "6s", "--report"])
            .arg(&report_path)
            .arg("--")
            .arg(workload())
            .args(["spin", "1", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting enforcer run"),
    );
    let stderr = run.0.stderr.take().expect("stderr");
    let mut events = Vec::new();
    let mut log = Vec::new();
    let mut unmeasured = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("steal not measured") {
            unmeasured = Some(line.clone());
        }
        events.extend(budget_event(&line));
        log.push(line);
    }
    let _ = run.0.wait();
    let log = log.join("\n");
    if let Some(reason) = unmeasured {
        panic!("the steal meter did not run, so the budget cannot be judged: {reason}\n{log}");
    }
    let start = events
        .iter()
        .find(|e| e["action"] == "start")
        .unwrap_or_else(|| panic!("no start decision\n{log}"));
    assert!(
        start["quota_cores"].is_null(),
        "the job started under a quota: {start}\n{log}"
    );
    let tightened: Vec<_> = events
        .iter()
        .filter(|e| ["tighten", "freeze", "place"].contains(&e["action"].as_str().unwrap_or("")))
        .collect();
    assert!(
        tightened.is_empty(),
        "the job was limited although it stole nothing: {tightened:?}\n{log}"
    );
    let report = read_report(&report_path);
    let used = report["budget_used"]
        .as_f64()
        .unwrap_or_else(|| panic!("no budget_used in the report: {report}"));
    assert!(
        (0.0..=0.05).contains(&used),
        "budget used {used} of 0.05: {report}"
    );
}

enforcer_tests::root_tests!(a_job_the_idle_class_keeps_within_budget_gets_no_quota);
