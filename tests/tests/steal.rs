//! The steal meter against the real kernel: `enforcer meter` with real
//! spinning processes in a real cgroup, checked against the kernel's own
//! accounting (per-thread schedstat run_delay, the job cgroup's cpu.stat).
//!
//! The workloads come from the `eval-workload` binary of this crate
//! (`$EVAL_WORKLOAD_BIN` overrides its path; in the VMs it sits next to the
//! enforcer binary).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{ChildGuard, TestCgroup, enforcer};
use serde_json::Value;

fn workload_bin() -> PathBuf {
    enforcer_tests::eval_workload!()
}

/// The workload helper with `args`, killed on drop.
fn spawn(args: &[&str]) -> ChildGuard {
    let child = Command::new(workload_bin())
        .args(args)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", workload_bin().display()));
    ChildGuard(child)
}

/// CPU time of the job's cgroup so far, in ns.
fn usage_ns(job: &TestCgroup) -> u64 {
    job.cpu_usage().as_nanos() as u64
}

/// Sum of schedstat run_delay (ns) over the threads of `pid`.
fn run_delay_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Time CPU 0 spent in hard and soft interrupts and stolen by the
/// hypervisor so far (`/proc/stat`), in ns. The run queue's clock, which the
/// meter measures waits with, runs through all three; a task's CPU time
/// (cpu.stat) does not. So while a job task is current on CPU 0, training
/// waits through them and that wait is the job's steal, though not its CPU
/// time: RCU callbacks freeing a forked child's task, or a busy host.
fn cpu0_interrupted_ns() -> u64 {
    // irq, softirq, steal
    enforcer_tests::proc_stat_time("cpu0", 5..8).as_nanos() as u64
}

fn ncpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Waits until `pid` has `threads` threads (the workload is running).
fn wait_threads(pid: u32, threads: usize) {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let n = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
        if n >= threads {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("workload {pid} did not start {threads} threads");
}

/// What the test observed around one `enforcer meter --json` run.
struct Metered {
    summary: Value,
    /// Growth of the training threads' run_delay between the meter's start
    /// and summary lines.
    run_delay_ns: u64,
    /// Growth of the job cgroup's CPU usage over the same span.
    job_usage_ns: u64,
    /// Growth of `cpu0_interrupted_ns` from the meter's start line to its
    /// summary (this test's span, which holds the meter's).
    cpu0_interrupted_ns: u64,
}

/// Runs the meter; `during` runs once it has attached, and the meter is
/// stopped with SIGINT once `during` returns and `min` has passed.
fn meter(
    training_pid: u32,
    job: &TestCgroup,
    extra: &[&str],
    min: Duration,
    during: impl FnOnce(),
) -> Metered {
    let mut child = enforcer()
        .args(["meter", "--json", "--interval", "1s", "--protect"])
        .arg(training_pid.to_string())
        .args(["--cgroup", job.path_str()])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting enforcer meter");
    let guard_pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let start: Value = serde_json::from_str(
        &lines
            .next()
            .expect("a start line")
            .expect("reading the meter"),
    )
    .expect("JSON start line");
    let (delay0, usage0) = (run_delay_ns(training_pid), usage_ns(job));
    let interrupted0 = cpu0_interrupted_ns();
    let started = Instant::now();
    assert_eq!(start["event"], "start", "{start}");
    during();
    if let Some(rest) = min.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    // SAFETY: signalling the meter this test started.
    unsafe { libc::kill(guard_pid as i32, libc::SIGINT) };
    let mut summary = Value::Null;
    for line in lines {
        let line = line.expect("reading the meter");
        let v: Value = serde_json::from_str(&line).expect("JSON line");
        if v["event"] == "summary" {
            summary = v;
            break;
        }
    }
    let (delay1, usage1) = (run_delay_ns(training_pid), usage_ns(job));
    let cpu0_interrupted_ns = cpu0_interrupted_ns().saturating_sub(interrupted0);
    let status = child.wait().expect("waiting for the meter");
    assert!(status.success(), "enforcer meter failed: {status}");
    assert_eq!(summary["event"], "summary", "no summary line");
    // The meter samples the kernel's schedstat and cpu.stat right after its
    // first and last probe snapshots, so both cover the same interval (under
    // emulation, this test's own reads lag the meter's by up to a second).
    let truth = &summary["ground_truth"];
    let run_delay_ns = truth["training_schedstat_run_delay_ns"]
        .as_u64()
        .expect("schedstat sampled");
    let job_usage_ns = truth["jobs_cpu_usage_ns"][0]
        .as_u64()
        .expect("cpu.stat sampled");
    eprintln!(
        "ground truth sampled by the meter: run_delay +{run_delay_ns}, job usage +{job_usage_ns}; \
         by this test, later: +{}, +{}; CPU 0 in interrupts or stolen by the hypervisor \
         +{cpu0_interrupted_ns}",
        delay1.saturating_sub(delay0),
        usage1.saturating_sub(usage0)
    );
    Metered {
        summary,
        run_delay_ns,
        job_usage_ns,
        cpu0_interrupted_ns,
    }
}

fn job_steal_ns(m: &Metered) -> u64 {
    m.summary["jobs"][0]["steal_ns"].as_u64().expect("steal_ns")
}

fn assert_no_overflow(m: &Metered) {
    assert_no_overflow_but(m, &[]);
}

/// As `assert_no_overflow`, tolerating the counters in `tolerated` (which
/// must then be reported, never silent).
fn assert_no_overflow_but(m: &Metered, tolerated: &[&str]) {
    for key in ["threads_dropped", "cpu_out_of_range", "waiter_underflow"] {
        if tolerated.contains(&key) {
            assert!(m.summary["overflow"][key].is_u64(), "{key} reported");
            continue;
        }
        assert_eq!(
            m.summary["overflow"][key], 0,
            "overflow counter {key}: {}",
            m.summary
        );
    }
}

/// The steal of a job that shares CPU 0 with a training running there: the
/// job's CPU time (every nanosecond it ran, training waited), less at most
/// `below` of it, and at most that plus CPU 0's interrupt and hypervisor
/// time over the run (see `cpu0_interrupted_ns`), plus `above` of it.
fn assert_steal_is_the_jobs_time_on_cpu0(m: &Metered, below: f64, above: f64) {
    let steal = job_steal_ns(m);
    let (low, high) = (
        m.job_usage_ns as f64 * (1.0 - below),
        (m.job_usage_ns + m.cpu0_interrupted_ns) as f64 * (1.0 + above),
    );
    assert!(
        (low..=high).contains(&(steal as f64)),
        "steal {steal} ns outside [{low:.0}, {high:.0}]: job CPU time {} ns, CPU 0 in \
         interrupts or stolen {} ns",
        m.job_usage_ns,
        m.cpu0_interrupted_ns
    );
}

fn within(actual: u64, expected: u64, tolerance: f64) -> bool {
    (actual as f64 - expected as f64).abs() <= tolerance * expected as f64
}

fn steal_is_exactly_zero_without_evaluation() {
    let job = TestCgroup::unified("steal-test");
    let training = spawn(&["spin", "1", "60"]);
    wait_threads(training.pid(), 2);
    let m = meter(training.pid(), &job, &[], Duration::from_secs(2), || {});
    assert_eq!(job_steal_ns(&m), 0, "{}", m.summary);
    assert_eq!(m.summary["jobs"][0]["preemptions"], 0, "{}", m.summary);
    assert!(
        m.summary["training"]["on_cpu_ns"].as_u64().unwrap() > 100_000_000,
        "the training spinner ran: {}",
        m.summary
    );
    assert_no_overflow(&m);
}

/// Training and evaluation pinned to one CPU: every nanosecond the job runs
/// there, training waits. The meter's training wait must match the kernel's
/// run_delay, and the job's steal the job's own CPU time, plus the
/// interrupts and hypervisor steal it was current through (so, on a CPU
/// with nobody else, steal = run_delay growth, the criterion; on a
/// busy host other tasks add waits that are, rightly, not this job's steal).
fn same_cpu_steal_matches_run_delay_and_job_cpu_time_within_5_percent() {
    let job = TestCgroup::unified("steal-test");
    let training = spawn(&["--cpu", "0", "spin", "1", "60"]);
    let _evaluation = spawn(&["--cpu", "0", "--cgroup", job.path_str(), "spin", "1", "60"]);
    wait_threads(training.pid(), 2);
    let m = meter(training.pid(), &job, &[], Duration::from_secs(3), || {});
    let steal = job_steal_ns(&m);
    let wait = m.summary["training"]["runq_wait_ns"].as_u64().unwrap();
    eprintln!(
        "steal {steal} ns, meter wait {wait} ns, schedstat run_delay +{} ns, job usage +{} ns",
        m.run_delay_ns, m.job_usage_ns
    );
    assert!(
        steal > 300_000_000,
        "the job ran beside training: {}",
        m.summary
    );
    assert!(
        within(wait, m.run_delay_ns, 0.05),
        "meter training wait {wait} vs schedstat run_delay growth {}",
        m.run_delay_ns
    );
    assert_steal_is_the_jobs_time_on_cpu0(&m, 0.05, 0.05);
    assert!(steal <= wait + wait / 100, "steal {steal} > wait {wait}");
    assert!(m.summary["jobs"][0]["preemptions"].as_u64().unwrap() > 0);
    assert_no_overflow(&m);
}

fn evaluation_on_another_cpu_steals_under_1_percent() {
    if ncpus() < 2 {
        enforcer_tests::skip!("needs 2 CPUs");
    }
    let job = TestCgroup::unified("steal-test");
    let training = spawn(&["--cpu", "0", "spin", "1", "60"]);
    let _evaluation = spawn(&["--cpu", "1", "--cgroup", job.path_str(), "spin", "1", "60"]);
    wait_threads(training.pid(), 2);
    let m = meter(training.pid(), &job, &[], Duration::from_secs(3), || {});
    let fraction = m.summary["jobs"][0]["stolen_fraction"].as_f64().unwrap();
    assert!(fraction < 0.01, "stolen fraction {fraction}: {}", m.summary);
    assert!(
        m.job_usage_ns > 100_000_000,
        "the job ran: {}",
        m.job_usage_ns
    );
    assert_no_overflow(&m);
}

fn training_waiting_on_its_own_threads_is_not_steal() {
    let job = TestCgroup::unified("steal-test");
    let threads = 2 * ncpus() + 1;
    let training = spawn(&["spin", &threads.to_string(), "60"]);
    wait_threads(training.pid(), threads + 1);
    let m = meter(training.pid(), &job, &[], Duration::from_secs(2), || {});
    let wait = m.summary["training"]["runq_wait_ns"].as_u64().unwrap();
    assert!(
        wait > 100_000_000,
        "more threads than CPUs wait: {}",
        m.summary
    );
    assert_eq!(job_steal_ns(&m), 0, "{}", m.summary);
    assert_no_overflow(&m);
}

fn a_job_forking_200_short_processes_is_charged_its_steal_without_overflow() {
    let job = TestCgroup::unified("steal-test");
    let training = spawn(&["--cpu", "0", "spin", "1", "120"]);
    wait_threads(training.pid(), 2);
    let cg = job.path_str().to_owned();
    let m = meter(
        training.pid(),
        &job,
        &[],
        Duration::from_secs(1),
        move || {
            let mut forker = spawn(&["--cpu", "0", "--cgroup", &cg, "forker", "200", "10"]);
            assert!(
                forker.exits_within(Duration::from_secs(120)),
                "forker did not finish"
            );
        },
    );
    let steal = job_steal_ns(&m);
    eprintln!("steal {steal} ns, job usage +{} ns", m.job_usage_ns);
    assert!(steal > 200_000_000, "{}", m.summary);
    // Forking and reaping 200 processes makes kernel work (freeing their
    // task structures in RCU callbacks) that runs in softirqs while a job
    // task is current: the training waits through it, but it is nobody's
    // CPU time. Measured on the 2-CPU host under CI: steal 1.277 s, job CPU
    // time 1.127 s, schedstat run_delay 1.278 s. Either way, the 10 % the
    // test always allowed (between two children the training may run alone).
    assert_steal_is_the_jobs_time_on_cpu0(&m, 0.10, 0.10);
    assert!(
        steal <= m.run_delay_ns + m.run_delay_ns / 50,
        "steal {steal} ns > the training's whole wait (schedstat run_delay) {} ns",
        m.run_delay_ns
    );
    assert_no_overflow(&m);
}

fn meter_refuses_a_training_pid_that_does_not_exist() {
    let job = TestCgroup::unified("steal-test");
    let out = enforcer()
        .args([
            "meter",
            "--protect",
            "999999999",
            "--cgroup",
            job.path_str(),
            "--duration",
            "1s",
        ])
        .output()
        .expect("running enforcer meter");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no threads"), "{stderr}");
}

/// Training threads created and destroyed during the run (a new thread every
/// 20 ms) are tracked from their first wake-up: the job's steal still matches
/// its CPU time on the shared CPU, and the thread table balances.
fn threads_created_and_destroyed_during_the_run_are_tracked() {
    let job = TestCgroup::unified("steal-test");
    let training = spawn(&["--cpu", "0", "churn", "20", "60"]);
    let _evaluation = spawn(&["--cpu", "0", "--cgroup", job.path_str(), "spin", "1", "60"]);
    wait_threads(training.pid(), 2);
    let m = meter(training.pid(), &job, &[], Duration::from_secs(3), || {});
    let steal = job_steal_ns(&m);
    let t = &m.summary["training"];
    eprintln!(
        "steal {steal} ns, job usage +{} ns, training {t}",
        m.job_usage_ns
    );
    assert!(t["threads_forked"].as_u64().unwrap() > 10, "{t}");
    assert!(t["threads_exited"].as_u64().unwrap() > 10, "{t}");
    assert!(steal > 300_000_000, "{}", m.summary);
    // Below, the 10 % the test always allowed: between one training
    // thread's exit and the next one's first wake-up, the job may run with
    // no training thread waiting. Above, 15 %: in the 6.12 VM under TCG the
    // steal came to 1.608 s against 1.451 s of job CPU time and 0.07 s of
    // CPU 0's interrupts (108 thread lifetimes; the training's own wait
    // balanced, see below): under emulation the run queue's clock and the
    // job's CPU time part by more than the interrupt counts explain.
    assert_steal_is_the_jobs_time_on_cpu0(&m, 0.10, 0.15);
    // Every wait was attributed to someone, and nothing more: the per-CPU
    // waiter counts stayed balanced through thousands of thread lifetimes.
    let (attributed, wait) = (
        t["attributed_wait_ns"].as_u64().unwrap(),
        t["runq_wait_ns"].as_u64().unwrap(),
    );
    assert!(
        within(attributed, wait, 0.05),
        "attributed {attributed} vs completed waits {wait}"
    );
    // A missed switch-in under thread churn is detected at exit, corrected
    // and reported; the rest must be zero.
    assert_no_overflow_but(&m, &["waiter_underflow"]);
}

/// With `--follow-children`, processes the training forks are training: a
/// forking training's children lose CPU to the job and that is steal; without
/// it, only the parent (asleep in waitpid) is protected and nothing is.
fn follow_children_counts_the_training_children_and_only_then() {
    let job = TestCgroup::unified("steal-test");
    let training = spawn(&["--cpu", "0", "forker", "100000", "20"]);
    let _evaluation = spawn(&["--cpu", "0", "--cgroup", job.path_str(), "spin", "1", "60"]);
    wait_threads(training.pid(), 1);
    let with = meter(
        training.pid(),
        &job,
        &["--follow-children"],
        Duration::from_secs(3),
        || {},
    );
    let steal = job_steal_ns(&with);
    eprintln!(
        "following: steal {steal} ns, job usage +{} ns",
        with.job_usage_ns
    );
    // The job's CPU time is steal while a training process waits; between a
    // child's exit and the next fork (slow under emulation) none does. Steal
    // is per waiting thread: between a fork and its waitpid the parent and
    // the new child may both wait behind the job (at most these two training
    // tasks exist), so steal may pass the job's CPU time but not twice it
    // (seen at 1.10x on a 6.12 VM under emulation, where fork is slow).
    assert!(
        steal <= with.job_usage_ns * 2 && steal * 10 >= with.job_usage_ns * 7,
        "steal {steal} vs job CPU time {}",
        with.job_usage_ns
    );
    assert!(with.summary["training"]["threads_forked"].as_u64().unwrap() > 10);
    // As under thread churn: a rare missed switch-in is corrected at exit
    // and reported; nothing else may overflow.
    assert_no_overflow_but(&with, &["waiter_underflow"]);
    let without = meter(training.pid(), &job, &[], Duration::from_secs(2), || {});
    // The parent still runs a little between forks (more so under emulation),
    // so it can lose a little; its children's share is gone.
    assert!(
        job_steal_ns(&without) < steal / 5,
        "not following children, only the parent counts: {} vs {steal} following",
        without.summary
    );
}

enforcer_tests::root_tests!(
    steal_is_exactly_zero_without_evaluation,
    same_cpu_steal_matches_run_delay_and_job_cpu_time_within_5_percent,
    evaluation_on_another_cpu_steals_under_1_percent,
    training_waiting_on_its_own_threads_is_not_steal,
    a_job_forking_200_short_processes_is_charged_its_steal_without_overflow,
    meter_refuses_a_training_pid_that_does_not_exist,
    threads_created_and_destroyed_during_the_run_are_tracked,
    follow_children_counts_the_training_children_and_only_then,
);
