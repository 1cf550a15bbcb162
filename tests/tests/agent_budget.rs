//! The node agent's budgets against the real kernel: two jobs that protect
//! one training through one agent share one budget. Training and both jobs
//! spin on CPU 0 (the same-CPU set-up of the steal tests), so every
//! nanosecond a job runs there is a nanosecond the training waits: each job
//! alone would take far more than the budget. The agent's `status` must show
//! one budget for the training with both jobs in it, and the steal of both
//! together (the training's stolen fraction, as the agent's status gives it
//! once a second) must end up under that one budget. The jobs run in the
//! normal class (`--no-idle`): each alone steals most of the training's CPU,
//! so two loops that each held their own job to 5 % would let the two
//! together take about 10 %.

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
    // A status never waits for the steal programs' load (the agent loads
    // them once, at its start, off its request path).
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

/// The protected trainings in a `status` answer.
fn trainings(status: &Value) -> Vec<Value> {
    status["budget"]["trainings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Seconds of status (one a second) collected once both jobs share the
/// budget; the last ten (the budget's horizon) are judged.
const CONTROLLED_SECONDS: usize = 15;

fn two_jobs_protecting_one_training_share_one_budget() {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        enforcer_tests::skip!("the kernel has no BTF: the steal meter cannot load");
    }
    let scratch = Scratch::new("enforcer-agent-budget");
    let socket = scratch.path("enforcer.sock");
    let config = scratch.config(&format!(
        "max_concurrent_jobs = 4\n[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\non_agent_stop = \"end\"\n",
        socket.display(),
        scratch.path("lib").display()
    ));
    let training = ChildGuard(
        Command::new(workload())
            .args(["--cpu", "0", "spin", "1", "600"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the training"),
    );
    let training_pid = training.0.id().to_string();
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
            "the agent did not answer on {} within 30 s\n{}",
            socket.display(),
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let names = [unique_name("agent-budget"), unique_name("agent-budget")];
    let _runs: Vec<EnforcerGuard> = names
        .iter()
        .map(|name| {
            let job: Vec<std::ffi::OsString> = [workload().into_os_string()]
                .into_iter()
                .chain(["--cpu", "0", "spin", "1", "600"].map(Into::into))
                .collect();
            // In the normal class: in the idle class the training would
            // preempt them and they would steal next to nothing.
            let run = EnforcerRun::new(&config, name)
                .flags(["--protect", &training_pid, "--budget", "5%"])
                .flags(["--timeout", "300s", "--no-idle"])
                .job(job)
                .env("ENFORCER_SOCKET", &socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting enforcer run");
            EnforcerGuard(run)
        })
        .collect();

    // Until the one budget holds both jobs.
    let mut shared = None;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let status = ask(&socket, json!({"type": "status"}))
            .unwrap_or_else(|e| panic!("status: {e}\n{}", agent_log()));
        let t = trainings(&status);
        if t.len() == 1 && t[0]["jobs"].as_array().is_some_and(|j| j.len() == 2) {
            shared = Some(status);
            break;
        }
        assert!(
            t.len() <= 1,
            "two jobs protecting one training made {} budgets: {status}",
            t.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let shared = shared.unwrap_or_else(|| {
        panic!(
            "status never showed one budget with both jobs within 60 s\n{}",
            agent_log()
        )
    });
    let budget = &trainings(&shared)[0];
    assert_eq!(budget["budget"].as_f64(), Some(0.05), "{budget}");
    assert_eq!(
        budget["pid"].as_i64().map(|p| p.to_string()),
        Some(training_pid.clone()),
        "{budget}"
    );

    // The training's stolen fraction (both jobs together) over the last
    // second, once a second.
    let mut used = Vec::new();
    let mut last = Value::Null;
    while used.len() < CONTROLLED_SECONDS {
        std::thread::sleep(Duration::from_secs(1));
        let status = ask(&socket, json!({"type": "status"}))
            .unwrap_or_else(|e| panic!("status: {e}\n{}", agent_log()));
        let t = trainings(&status);
        assert_eq!(t.len(), 1, "one training, one budget: {status}");
        assert_eq!(
            t[0]["jobs"].as_array().map(Vec::len),
            Some(2),
            "both jobs stay under the one budget: {status}"
        );
        if let Some(f) = t[0]["used_recent"].as_f64() {
            used.push(f);
        }
        last = status;
    }
    // The budget holds over its horizon: the last 10 s, once the loop has
    // had a few seconds to bring the start-up steal down.
    let horizon = &used[used.len() - 10..];
    let mean = horizon.iter().sum::<f64>() / horizon.len() as f64;
    assert!(
        mean < 0.05,
        "combined stolen fraction over the last 10 s {:.1}% (per second {used:?}) over the one 5% budget\n{last}\n{}",
        mean * 100.0,
        agent_log()
    );
    let t = &trainings(&last)[0];
    assert!(
        t["used"].as_f64().is_some_and(|u| u <= 0.05),
        "the loop's own 10 s figure is over the budget: {t}\n{}",
        agent_log()
    );
    // One quota, split between the two jobs: their shares add up to it.
    let t = &trainings(&last)[0];
    if let Some(total) = t["quota_cores"].as_f64() {
        let shares: Vec<f64> = t["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|j| j["share_cores"].as_f64())
            .collect();
        assert_eq!(shares.len(), 2, "{t}");
        let sum: f64 = shares.iter().sum();
        assert!(
            (sum - total).abs() <= 0.03,
            "shares {shares:?} do not add up to the training's quota {total}: {t}"
        );
    }
}

enforcer_tests::root_tests!(two_jobs_protecting_one_training_share_one_budget);
