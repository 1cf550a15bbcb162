//! `cargo xtask bench agent`: what the node agent costs.
//!
//! One agent (`enforcer agent`, socket and records in a scratch directory)
//! runs `--jobs` sleeping jobs, `--protected` of them protecting one
//! training process; its CPU (utime + stime from `/proc/<pid>/stat` over the
//! measured span) and memory (VmRSS at the end, VmHWM) are printed side by
//! side with one protected in-process `enforcer run`, measured the same way
//! in the same run, after the agent. The jobs' shims (`enforcer shim`, one
//! per job, their pids from the job records) are measured too and shown
//! apart: they are the per-job part of the agent's design.
//!
//! The jobs sleep: what is measured is the supervision (control loops,
//! meter polls, cgroup reads), not the jobs' own work. The training is a
//! sleeping process too, so the kernel programs' per-event cost (charged to
//! the tasks that switch, not to the agent; see `bench probe`) stays out.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Jobs run through the agent.
    #[arg(long, default_value_t = 10)]
    jobs: usize,
    /// How many of them protect the training.
    #[arg(long, default_value_t = 2)]
    protected: usize,
    /// Seconds measured (after the jobs are running).
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Seconds between the jobs' start and the measurement (meters loaded,
    /// loops settled).
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// The enforcer binary; built (release) when left at the default.
    #[arg(long)]
    enforcer: Option<PathBuf>,
}

/// Stops and reaps a child on drop (our own children only, by pid):
/// SIGTERM first (an agent with `on_agent_stop = "end"` then ends its jobs,
/// an `enforcer run` removes its job), SIGKILL after 10 s.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time and memory of one process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu: Duration,
    rss_kib: u64,
    hwm_kib: u64,
}

fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11, 12 here).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Some(Usage {
        cpu: Duration::from_secs_f64(ticks as f64 / hz as f64),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// What was measured of a set of processes over one span.
#[derive(Debug, Default)]
struct Measured {
    /// CPU used over the span, as a fraction of one core.
    core_fraction: f64,
    rss_mib: f64,
    hwm_mib: f64,
    processes: usize,
}

/// Measures `pids` over `span`: CPU from two samples, memory at the end.
fn measure(pids: &[u32], span: Duration) -> Measured {
    let before: Vec<Option<Usage>> = pids.iter().map(|&p| usage(p)).collect();
    let started = Instant::now();
    std::thread::sleep(span);
    let elapsed = started.elapsed();
    let mut m = Measured::default();
    for (&pid, before) in pids.iter().zip(before) {
        let (Some(before), Some(after)) = (before, usage(pid)) else {
            continue;
        };
        m.processes += 1;
        m.core_fraction += after.cpu.saturating_sub(before.cpu).as_secs_f64();
        m.rss_mib += after.rss_kib as f64 / 1024.0;
        m.hwm_mib += after.hwm_kib as f64 / 1024.0;
    }
    m.core_fraction /= elapsed.as_secs_f64();
    m
}

fn as_json(m: &Measured) -> Value {
    json!({
        "cpu_percent_of_one_core": m.core_fraction * 100.0,
        "rss_mib": m.rss_mib,
        "hwm_mib": m.hwm_mib,
        "processes": m.processes,
    })
}

/// One request over the agent's socket (a connection each: hello first).
fn ask(socket: &Path, request: &Value) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    for message in [json!({"type": "hello", "api": 1}), request.clone()] {
        writeln!(stream, "{message}")?;
        line.clear();
        reader.read_line(&mut line)?;
    }
    serde_json::from_str(&line).with_context(|| format!("agent answered {line:?}"))
}

fn enforcer_binary(args: &AgentArgs, workspace: &Path) -> Result<PathBuf> {
    if let Some(path) = &args.enforcer {
        return Ok(path.clone());
    }
    let status = Command::new("cargo")
        .current_dir(workspace)
        .args(["build", "--release", "-q", "-p", "enforcer"])
        .status()
        .context("cargo build --release -p enforcer")?;
    if !status.success() {
        bail!("building enforcer failed");
    }
    Ok(workspace.join("target/release/enforcer"))
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let until = Instant::now() + timeout;
    while !done() {
        if Instant::now() > until {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The shims' pids, from the job records under `lib_dir`.
fn shim_pids(lib_dir: &Path) -> Vec<u32> {
    let jobs = lib_dir.join("jobs");
    std::fs::read_dir(&jobs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let shim = std::fs::read(e.path().join("shim.json")).ok()?;
            let v: Value = serde_json::from_slice(&shim).ok()?;
            u32::try_from(v["pid"].as_i64()?).ok()
        })
        .collect()
}

pub fn run(args: &AgentArgs, workspace: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench agent runs the node agent, which loads eBPF programs: run it as root");
    }
    if args.protected > args.jobs {
        bail!(
            "--protected {} is more than --jobs {}",
            args.protected,
            args.jobs
        );
    }
    let enforcer = enforcer_binary(args, workspace)?;
    let out_dir = workspace.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let scratch = out_dir.join(format!("agent-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let socket = scratch.join("enforcer.sock");
    let lib_dir = scratch.join("lib");
    let config = scratch.join("enforcer.toml");
    std::fs::write(
        &config,
        format!(
            "max_concurrent_jobs = {}\nstate_dir = {:?}\n[agent]\nsocket = {:?}\nlib_dir = {:?}\non_agent_stop = \"end\"\n",
            args.jobs + 1,
            scratch.join("state"),
            socket,
            lib_dir
        ),
    )?;
    let span = Duration::from_secs_f64(args.seconds);
    let job_secs = (args.warmup + args.seconds + 30.0).ceil() as u64;

    let training = Guard(
        Command::new("sleep")
            .arg("3600")
            .spawn()
            .context("starting the training (sleep)")?,
    );
    let training_pid = training.0.id().to_string();

    // The agent and its jobs.
    let agent = Guard(
        Command::new(&enforcer)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting enforcer agent")?,
    );
    wait_for("the agent's socket", Duration::from_secs(30), || {
        ask(&socket, &json!({"type": "status"})).is_ok()
    })?;
    let mut clients = Vec::new();
    for i in 0..args.jobs {
        let mut cmd = Command::new(&enforcer);
        cmd.args(["run", "--config"])
            .arg(&config)
            .args(["--job", &format!("bench-agent-{i}")])
            .env("ENFORCER_SOCKET", &socket);
        if i < args.protected {
            cmd.args(["--protect", &training_pid, "--budget", "5%"]);
        }
        cmd.arg("--")
            .args(["sleep", &job_secs.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        clients.push(Guard(cmd.spawn().context("starting enforcer run")?));
    }
    let running = |v: &Value| {
        v["jobs"]
            .as_array()
            .map_or(0, |j| j.iter().filter(|j| j["state"] == "running").count())
    };
    wait_for("every job running", Duration::from_secs(60), || {
        ask(&socket, &json!({"type": "status"})).is_ok_and(|v| running(&v) >= args.jobs)
    })?;
    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    let shims = shim_pids(&lib_dir);
    let status = ask(&socket, &json!({"type": "status"})).unwrap_or(Value::Null);
    let agent_m = measure(&[agent.0.id()], span);
    // Shims were measured apart, over a span of their own right after
    // (one process set per span keeps both simple).
    let shims_m = measure(&shims, span.min(Duration::from_secs(10)));
    drop(clients);
    drop(agent);

    // One protected in-process run, measured the same way.
    let run = Guard(
        Command::new(&enforcer)
            // The CLI runs the job itself, as without an agent.
            .args(["run", "--config"])
            .arg(&config)
            .env("ENFORCER_NO_AGENT", "1")
            .args(["--job", "bench-inprocess", "--protect", &training_pid])
            .args(["--budget", "5%", "--"])
            .args(["sleep", &job_secs.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.join("in-process.log"))?)
            .spawn()
            .context("starting enforcer run (in-process)")?,
    );
    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    let run_m = measure(&[run.0.id()], span);
    drop(run);
    if run_m.processes == 0 || run_m.rss_mib == 0.0 {
        let log = std::fs::read_to_string(scratch.join("in-process.log")).unwrap_or_default();
        eprintln!("the in-process run was not running when measured; its log:\n{log}");
    }
    drop(training);
    let _ = std::fs::remove_dir_all(&scratch);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<44} {:>15} {:>9} {:>9}",
        "", "CPU % of 1 core", "RSS MiB", "HWM MiB"
    )?;
    let agent_row = format!("agent, {} jobs ({} protected)", args.jobs, args.protected);
    let shims_row = format!("their {} shims together", shims_m.processes);
    for (name, m) in [
        (agent_row.as_str(), &agent_m),
        (shims_row.as_str(), &shims_m),
        ("one protected in-process `enforcer run`", &run_m),
    ] {
        writeln!(
            out,
            "{:<44} {:>15.3} {:>9.1} {:>9.1}",
            name,
            m.core_fraction * 100.0,
            m.rss_mib,
            m.hwm_mib
        )?;
    }
    writeln!(
        out,
        "target: agent <= 0.5 % of one core, <= 30 MiB RSS; load average {}",
        load.trim()
    )?;
    let result = json!({
        "jobs": args.jobs,
        "protected": args.protected,
        "seconds": args.seconds,
        "agent": as_json(&agent_m),
        "shims": as_json(&shims_m),
        "in_process_run": as_json(&run_m),
        "agent_status": status,
        "loadavg": load.trim(),
    });
    let path = out_dir.join("agent.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    writeln!(out, "written to {}", path.display())?;
    Ok(())
}
