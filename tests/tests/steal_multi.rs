//! One node agent meters two trainings with one loaded copy of the steal
//! programs, and charges each job only the wait of the training it
//! protects.
//!
//! Training A spins on CPU 0 and training B on CPU 1. Job `a` (protecting
//! A) spins on CPU 0: A waits while it runs, so it steals from A. Job `b1`
//! (protecting B) spins on CPU 1 and steals from B. Job `b0` (protecting B)
//! spins on CPU 0, where only A's threads wait: B never waits while it
//! runs, so its steal must stay about zero, although A's wait grows the
//! whole time it runs there. The jobs run in the normal class (`--no-idle`)
//! so that they really take CPU from the trainings.
//!
//! The programs the agent holds are counted from its open file descriptors
//! (a loaded BPF program's fdinfo has a `prog_type` line): the count with
//! both trainings metered must be the count with one.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{ChildGuard, EnforcerGuard, EnforcerRun, Scratch, enforcer, unique_name};
use serde_json::{Value, json};

fn workload() -> PathBuf {
    enforcer_tests::eval_workload!()
}

/// One request over the agent's socket, on a connection of its own.
fn ask(socket: &Path, request: Value) -> Result<Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    for message in [json!({"type": "hello", "api": 1}), request] {
        writeln!(stream, "{message}").map_err(|e| e.to_string())?;
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
    }
    serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))
}

/// How many BPF programs process `pid` holds open.
fn bpf_programs_held(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter(|info| info.lines().any(|l| l.starts_with("prog_type:")))
        .count()
}

/// How many BPF links (attached programs) process `pid` holds open.
fn bpf_links_held(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter(|info| info.lines().any(|l| l.starts_with("link_type:")))
        .count()
}

/// A spinning process pinned to `cpu`, killed on drop.
fn spinner(cpu: &str) -> ChildGuard {
    ChildGuard(
        Command::new(workload())
            .args(["--cpu", cpu, "spin", "1", "600"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting a spinning workload"),
    )
}

/// `enforcer run` through the agent: a job spinning on `cpu` that protects
/// `training`, with `flags` (its timeout, a report file) added.
fn job(
    config: &Path,
    socket: &Path,
    name: &str,
    training: u32,
    cpu: &str,
    flags: &[&std::ffi::OsStr],
) -> EnforcerGuard {
    let command: Vec<std::ffi::OsString> = [workload().into_os_string()]
        .into_iter()
        .chain(["--cpu", cpu, "spin", "1", "600"].map(Into::into))
        .collect();
    let run = EnforcerRun::new(config, name)
        .flags(["--protect", &training.to_string(), "--budget", "50%"])
        .flags(["--no-idle"])
        .flags(flags)
        .job(command)
        .env("ENFORCER_SOCKET", socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting enforcer run");
    EnforcerGuard(run)
}

/// The protected training `pid` in a `status` answer.
fn training_status(status: &Value, pid: u32) -> Option<Value> {
    status["budget"]["trainings"]
        .as_array()?
        .iter()
        .find(|t| t["pid"].as_u64() == Some(u64::from(pid)))
        .cloned()
}

/// The steal charged so far to the job named `name` under `training`.
fn job_steal(training: &Value, name: &str) -> Option<f64> {
    training["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["job"].as_str().is_some_and(|id| id.contains(name)))?["steal_s"]
        .as_f64()
}

/// Polls `status` until `ready` accepts it (panics after `limit`).
fn wait_status(
    socket: &Path,
    limit: Duration,
    what: &str,
    log: &dyn Fn() -> String,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        if let Ok(status) = ask(socket, json!({"type": "status"}))
            && ready(&status)
        {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "{what} not seen within {limit:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn two_trainings_share_one_meter_and_each_job_is_charged_its_own() {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        enforcer_tests::skip!("the kernel has no BTF: the steal meter cannot load");
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        enforcer_tests::skip!("needs two CPUs: one per training");
    }
    let scratch = Scratch::new("enforcer-steal-multi");
    let socket = scratch.path("enforcer.sock");
    let config = scratch.config(&format!(
        "max_concurrent_jobs = 4\n[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\non_agent_stop = \"end\"\n",
        socket.display(),
        scratch.path("lib").display()
    ));
    let training_a = spinner("0");
    let training_b = spinner("1");
    let (pid_a, pid_b) = (training_a.0.id(), training_b.0.id());
    let log = scratch.path("agent.log");
    let mut agent = EnforcerGuard(
        enforcer()
            .args(["agent", "--config"])
            .arg(&config)
            .env("ENFORCER_SOCKET", &socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("starting enforcer agent"),
    );
    let agent_pid = agent.id();
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let up = Instant::now();
    while ask(&socket, json!({"type": "status"})).is_err() {
        if let Ok(Some(exit)) = agent.try_wait() {
            panic!(
                "enforcer agent exited ({exit}) before it answered\n{}",
                agent_log()
            );
        }
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "the agent did not answer within 30 s\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Loaded at the agent's start, attached only once a training is.
    assert_eq!(
        bpf_links_held(agent_pid),
        0,
        "the agent's BPF programs are attached before anything is protected"
    );

    // One training metered: the programs of one meter.
    // Job a ends at its deadline, once the steal below has been judged,
    // and reports its own steal.
    let name_a = unique_name("multi-a");
    let report_a = scratch.path("a.json");
    let mut job_a = job(
        &config,
        &socket,
        &name_a,
        pid_a,
        "0",
        &[
            "--timeout".as_ref(),
            "90s".as_ref(),
            "--report".as_ref(),
            report_a.as_os_str(),
        ],
    );
    wait_status(
        &socket,
        Duration::from_secs(60),
        "training A metered with job a",
        &agent_log,
        |s| training_status(s, pid_a).is_some_and(|t| job_steal(&t, &name_a).is_some()),
    );
    let one_training = bpf_programs_held(agent_pid);
    assert!(
        one_training > 0,
        "the agent holds no BPF program while it meters a training\n{}",
        agent_log()
    );

    // A second training with two jobs, one of them on A's CPU.
    let (name_b1, name_b0) = (unique_name("multi-b1"), unique_name("multi-b0"));
    let long: [&std::ffi::OsStr; 2] = ["--timeout".as_ref(), "300s".as_ref()];
    let _job_b1 = job(&config, &socket, &name_b1, pid_b, "1", &long);
    let _job_b0 = job(&config, &socket, &name_b0, pid_b, "0", &long);
    let both = wait_status(
        &socket,
        Duration::from_secs(60),
        "training B metered with jobs b1 and b0",
        &agent_log,
        |s| {
            training_status(s, pid_b).is_some_and(|t| {
                job_steal(&t, &name_b1).is_some() && job_steal(&t, &name_b0).is_some()
            })
        },
    );
    let two_trainings = bpf_programs_held(agent_pid);
    assert_eq!(
        two_trainings, one_training,
        "a second training loaded more programs: {two_trainings} held with two trainings, \
         {one_training} with one\n{both}"
    );

    // Until both a and b1 have been charged a clear amount (b0 runs on
    // CPU 0 beside training A all along).
    let steals = |status: &Value| {
        let a = training_status(status, pid_a)?;
        let b = training_status(status, pid_b)?;
        Some((
            job_steal(&a, &name_a)?,
            job_steal(&b, &name_b1)?,
            job_steal(&b, &name_b0)?,
        ))
    };
    let status = wait_status(
        &socket,
        Duration::from_secs(60),
        "0.3 s of steal charged to jobs a and b1",
        &agent_log,
        |s| steals(s).is_some_and(|(a, b1, _)| a > 0.3 && b1 > 0.3),
    );
    let (steal_a, steal_b1, steal_b0) = steals(&status).expect("all three jobs in status");
    eprintln!("steal: a {steal_a:.3}s, b1 {steal_b1:.3}s, b0 {steal_b0:.3}s");
    assert!(
        steal_b0 < 0.05 * steal_a,
        "job b0 protects B but ran beside A only: charged {steal_b0:.3}s of B's wait \
         (job a, beside A: {steal_a:.3}s)\n{status}"
    );
    assert_eq!(
        bpf_programs_held(agent_pid),
        one_training,
        "the agent's programs changed while it metered"
    );

    // Its report carries the steal the agent charged it, not null.
    let end = Instant::now() + Duration::from_secs(150);
    while job_a.try_wait().ok().flatten().is_none() {
        assert!(
            Instant::now() < end,
            "job a outlived its 90 s deadline\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_a).expect("job a's report file"))
            .expect("job a's report is JSON");
    let stolen = report["stolen_from_training_s"].as_f64();
    assert!(
        stolen.is_some_and(|s| s >= steal_a),
        "job a's report says it stole {stolen:?} s; the agent had charged it {steal_a:.3}s: {report}"
    );
    assert!(
        report["stolen_fraction"].as_f64().is_some_and(|f| f > 0.0),
        "{report}"
    );
    assert_eq!(report["budget_fraction"].as_f64(), Some(0.5), "{report}");
    assert!(report["budget_used"].as_f64().is_some(), "{report}");
}

enforcer_tests::root_tests!(two_trainings_share_one_meter_and_each_job_is_charged_its_own);
