//! The budget is spent, not feared: where the idle class alone keeps the
//! training within budget, `enforcer run --protect --budget` takes nothing
//! from the evaluation. A training on CPU 0 beside a one-thread job in the
//! idle class loses next to nothing to it: the job must start without a
//! quota, never be tightened, frozen or confined to CPUs (placement answers
//! steal, and there is none to answer), and its report must say how much
//! of the budget it used. Beside a training on every CPU, where the idle
//! class leaves the job next to nothing, the loop lifts the job out of the
//! class on trial, its threads and the evaluation slice with it.

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

/// Starts the training (the workload with `training`) and, once it runs,
/// `enforcer run --protect` on it with a one-thread spinning job named
/// `name` for `timeout`, its JSON log on a pipe and its report to `report`.
fn protected_run(
    training: &[&str],
    name: &str,
    timeout: &str,
    report: &std::path::Path,
) -> (ChildGuard, EnforcerGuard) {
    let training = ChildGuard(
        Command::new(workload())
            .args(training)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the training"),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let run = EnforcerGuard(
        enforcer()
            .args(["--log-format", "json", "run", "--job", name, "--protect"])
            .arg(training.0.id().to_string())
            .args(["--budget", "5%", "--timeout", timeout, "--report"])
            .arg(report)
            .arg("--")
            .arg(workload())
            .args(["spin", "1", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting enforcer run"),
    );
    (training, run)
}

/// What a protected run logged, read to its end.
struct BudgetLog {
    /// The `detail` of every `budget` event.
    events: Vec<serde_json::Value>,
    log: String,
    /// The line saying the steal was not measured, if one came.
    unmeasured: Option<String>,
}

impl BudgetLog {
    /// Reads `run`'s log until it ends and waits for it.
    fn read(run: &mut EnforcerGuard) -> BudgetLog {
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
        BudgetLog {
            events,
            log: log.join("\n"),
            unmeasured,
        }
    }

    /// Panics when the steal meter did not run: the budget cannot be judged.
    fn assert_measured(&self) {
        if let Some(reason) = &self.unmeasured {
            panic!(
                "the steal meter did not run, so the budget cannot be judged: {reason}\n{}",
                self.log
            );
        }
    }
}

fn a_job_the_idle_class_keeps_within_budget_gets_no_quota() {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online CPUs");
    if online.trim() == "0" {
        skip!("needs two CPUs (one the training leaves to the job)");
    }
    let scratch = Scratch::new("budget-spend");
    let report_path = scratch.path("report.json");
    let name = unique_name("spend");
    let (_training, mut run) = protected_run(
        &["--cpu", "0", "spin", "1", "600"],
        &name,
        "6s",
        &report_path,
    );
    let read = BudgetLog::read(&mut run);
    read.assert_measured();
    let BudgetLog { events, log, .. } = read;
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

/// What the poller saw of the job at one moment: whether every thread of
/// its first process was `SCHED_IDLE` (`None`: no thread read), and the
/// slice's `cpu.idle` (`None`: no such file, a kernel before 5.15).
#[derive(Debug, Clone, Copy)]
struct Seen {
    threads_idle: Option<bool>,
    slice_idle: Option<bool>,
}

fn threads_idle(pid: &str) -> Option<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut any = false;
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Through the raw system call: the VMs run a musl build, whose
        // sched_getscheduler() is a stub. A gone thread is skipped.
        let Ok(policy) = enforcer::sched::thread_policy(tid) else {
            continue;
        };
        any = true;
        if policy & !libc::SCHED_RESET_ON_FORK != libc::SCHED_IDLE {
            return Some(false);
        }
    }
    any.then_some(true)
}

fn slice_idle(slice: &std::path::Path) -> Option<bool> {
    let v = std::fs::read_to_string(slice.join("cpu.idle")).ok()?;
    Some(v.trim() == "1")
}

fn a_job_the_idle_class_starves_beside_a_training_on_every_cpu_is_lifted_out_of_it_with_its_threads_and_slice()
 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let scratch = Scratch::new("budget-lift");
    // The training keeps every CPU busy: an idle-class job gets next to
    // nothing and steals next to nothing, so the loop lifts it (after 3 s
    // well under budget) to see whether the budget can pay for more.
    let report_path = scratch.path("report.json");
    let name = unique_name("lift");
    let (_training, mut run) = protected_run(
        &["spin", &cpus.to_string(), "600"],
        &name,
        "9s",
        &report_path,
    );
    // Watch the job's threads and its slice while it runs.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (done, name) = (done.clone(), name.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut dir = None;
            let mut slice = None;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(25));
                if dir.is_none() {
                    dir = enforcer_tests::cgroup::job_cpu_dir(&name);
                }
                let Some(d) = dir.as_ref() else { continue };
                slice = d.parent().map(std::path::Path::to_path_buf);
                // The job's processes are in its `main` leaf.
                let procs = ["main/cgroup.procs", "cgroup.procs"]
                    .iter()
                    .map(|f| std::fs::read_to_string(d.join(f)).unwrap_or_default())
                    .collect::<String>();
                let Some(pid) = procs.lines().next() else {
                    continue;
                };
                seen.push(Seen {
                    threads_idle: threads_idle(pid),
                    slice_idle: slice.as_deref().and_then(slice_idle),
                });
            }
            let found = format!("job cgroup {dir:?}, slice {slice:?}");
            (seen, slice, found)
        })
    };
    let read = BudgetLog::read(&mut run);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (seen, slice, found) = poller.join().expect("the poller");
    read.assert_measured();
    let BudgetLog { events, log, .. } = read;
    let actions: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    let lift = events
        .iter()
        .find(|e| e["action"] == "lift")
        .unwrap_or_else(|| panic!("the job was never lifted: {actions:?}\n{log}"));
    assert_eq!(lift["idle"], false, "{lift}");
    // Its threads left SCHED_IDLE with it, once they had settled in it
    // (the first sample may catch the command before it is in the class),
    // and where the kernel has cpu.idle, the slice left the idle class at
    // the same time.
    let settled = seen
        .windows(8)
        .position(|w| w.iter().all(|s| s.threads_idle == Some(true)))
        .unwrap_or_else(|| {
            panic!("the job's threads never settled in SCHED_IDLE ({found}): {seen:?}")
        });
    let out = settled
        + seen[settled..]
            .iter()
            .position(|s| s.threads_idle == Some(false))
            .unwrap_or_else(|| {
                panic!("the job's threads never left SCHED_IDLE: {actions:?}\n{seen:?}")
            });
    if seen.iter().any(|s| s.slice_idle.is_some()) {
        assert!(
            seen[out..]
                .iter()
                .any(|s| s.slice_idle == Some(false) && s.threads_idle == Some(false)),
            "the job's threads and the slice were never out of the idle class together: {seen:?}"
        );
    }
    // A lift undone sends the threads back.
    if actions
        .iter()
        .skip_while(|a| **a != "lift")
        .any(|a| ["lower", "lift_did_not_pay"].contains(a))
    {
        assert!(
            seen[out..].iter().any(|s| s.threads_idle == Some(true)),
            "the lift was undone ({actions:?}) but the threads were not seen back in SCHED_IDLE: {seen:?}"
        );
    }
    // Whatever the job ended in, the slice is idle again after it.
    if let Some(idle) = slice.as_deref().and_then(slice_idle) {
        assert!(
            idle,
            "the slice was left out of the idle class after the job\n{log}"
        );
    }
    let tightened: Vec<_> = events
        .iter()
        .filter(|e| ["tighten", "freeze"].contains(&e["action"].as_str().unwrap_or("")))
        .collect();
    assert!(
        tightened.is_empty(),
        "the job was cut or frozen: {tightened:?}\n{log}"
    );
    let report = read_report(&report_path);
    let used = report["budget_used"]
        .as_f64()
        .unwrap_or_else(|| panic!("no budget_used in the report: {report}"));
    assert!(
        (0.0..=0.05).contains(&used),
        "budget used {used} of 0.05: {report}"
    );
    // The report counts the lifts the log shows, and time out of the
    // class within the job's own.
    let lifts = actions.iter().filter(|a| **a == "lift").count() as u64;
    assert_eq!(
        report["idle_class_lifts"].as_u64(),
        Some(lifts),
        "{actions:?}: {report}"
    );
    let out = report["out_of_idle_class_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no out_of_idle_class_s in the report: {report}"));
    let wall = report["wall_s"].as_f64().expect("wall_s");
    assert!(
        out > 0.0 && out < wall,
        "out of the idle class {out}s of {wall}s: {report}"
    );
}

enforcer_tests::root_tests!(
    a_job_the_idle_class_keeps_within_budget_gets_no_quota,
    a_job_the_idle_class_starves_beside_a_training_on_every_cpu_is_lifted_out_of_it_with_its_threads_and_slice
);
