//! `cargo xtask load-test`: one agent under load. `--jobs` jobs run at once
//! through the agent (each an `enforcer run` client, as a trainer would
//! start them) while `--clients` connections send `--rps` API requests a
//! second (`status` and `report`, alternately) for `--secs` seconds. Then
//! the jobs are released and every check is made:
//!
//! - no lost job: each client exits with its job's own exit status (a
//!   different one per job) and its report file says the same;
//! - no leak: no cgroup of these jobs is left in any hierarchy and no shim
//!   of this agent is left running;
//! - the agent kept up: every request got the answer it should, at the
//!   asked rate (at least 95 % of it), and the agent stayed up;
//! - the agent's RSS (sampled every 100 ms, and its high-water mark) stayed
//!   under `--max-rss-mib`.
//!
//! Request latency (send to whole answer) is reported as p50 / p99 / max.
//! The agent is private (socket, records and state in a scratch directory
//! under the temp dir, `on_agent_stop = "end"`) and is stopped, with its
//! jobs, also when a check fails or the run errs.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Jobs held running at once through the agent for the whole load.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    jobs: u32,
    /// API requests a second (`status` and `report`, alternately).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rps: u32,
    /// Seconds the request load lasts.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// Connections the requests are spread over; each reconnects (with a
    /// new hello) every 100 requests.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    clients: u32,
    /// The agent's RSS bound, MiB: over it the run fails.
    #[arg(long, default_value_t = 64)]
    max_rss_mib: u64,
    /// The enforcer binary; default: target/debug/enforcer, built first.
    #[arg(long)]
    enforcer: Option<PathBuf>,
}

/// Requests on one connection before it is replaced by a new one.
const PER_CONNECTION: u64 = 100;

/// What a run left to clean up: the agent, the clients, the scratch
/// directory. Dropped on every way out: the jobs are released, the clients
/// and the agent (whose `on_agent_stop = "end"` ends any job left) are
/// stopped, our own children only, by pid.
struct Run {
    scratch: PathBuf,
    agent: Option<Child>,
    clients: Vec<Child>,
}

impl Run {
    fn release(&self) -> Result<()> {
        std::fs::write(self.scratch.join("release"), b"")
            .with_context(|| format!("writing {}", self.scratch.join("release").display()))
    }
}

/// SIGTERM to our child, then SIGKILL after `grace`; reaped.
fn stop(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: kill(2) on a child this process started and has not
        // reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + grace;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.release();
        let until = Instant::now() + Duration::from_secs(20);
        for c in &mut self.clients {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(mut agent) = self.agent.take() {
            stop(&mut agent, Duration::from_secs(20));
        }
        for c in &mut self.clients {
            stop(c, Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// One connection that said hello.
struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

impl Conn {
    fn open(socket: &Path) -> Result<Conn> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = Conn {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            line: String::new(),
        };
        let hello = c.ask(br#"{"type":"hello","api":1}"#)?;
        if !hello.starts_with(r#"{"type":"hello""#) {
            bail!("hello answered {hello:?}");
        }
        Ok(c)
    }

    /// Sends one request line and returns the answer line.
    fn ask(&mut self, request: &[u8]) -> Result<&str> {
        let mut msg = Vec::with_capacity(request.len() + 1);
        msg.extend_from_slice(request);
        msg.push(b'\n');
        self.stream.write_all(&msg)?;
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            bail!("the agent closed the connection");
        }
        Ok(self.line.trim_end())
    }
}

/// What the request clients measured.
#[derive(Default)]
struct Requests {
    latencies: Vec<Duration>,
    /// Answers that were not the one expected, and failed exchanges.
    errors: u64,
    first_error: Option<String>,
}

/// One request client: requests `k`, `k + clients`, ... of the schedule
/// (request `n` is due at `n / rps` seconds), until `end`.
fn client(
    socket: &Path,
    k: u64,
    clients: u64,
    rps: u64,
    start: Instant,
    end: Instant,
    finished_job: &str,
) -> Requests {
    let mut out = Requests::default();
    let report = json!({"type": "report", "id": finished_job}).to_string();
    let mut conn: Option<Conn> = None;
    let mut served = 0u64;
    let mut n = k;
    loop {
        let due = start + Duration::from_secs_f64(n as f64 / rps as f64);
        if due >= end {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (request, want) = if (n / clients).is_multiple_of(2) {
            (&br#"{"type":"status"}"#[..], r#"{"type":"status""#)
        } else {
            (report.as_bytes(), r#"{"type":"finished""#)
        };
        if conn.is_none() {
            match Conn::open(socket) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            // The request alone: a new connection's connect and hello are
            // not in it.
            let sent = Instant::now();
            match c.ask(request) {
                Ok(answer) if answer.starts_with(want) => out.latencies.push(sent.elapsed()),
                Ok(answer) => {
                    out.errors += 1;
                    let answer = format!("unexpected answer: {answer:.300}");
                    out.first_error.get_or_insert(answer);
                }
                Err(e) => {
                    out.errors += 1;
                    out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    conn = None;
                }
            }
        }
        served += 1;
        if served.is_multiple_of(PER_CONNECTION) {
            conn = None;
        }
        n += clients;
    }
    out
}

/// VmRSS and VmHWM of `pid`, KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// Cgroup directories in any hierarchy whose name starts with `prefix`.
fn cgroups_named(prefix: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut stack: Vec<(PathBuf, u32)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| (PathBuf::from(mount_point), 0))
        })
        .collect();
    let mut found = Vec::new();
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_string_lossy().starts_with(prefix) {
                found.push(e.path());
            }
            if depth < 12 {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    found
}

/// Live `enforcer shim <dir>` processes whose job directory is under
/// `lib_dir`.
fn shims_of(lib_dir: &Path) -> Vec<u32> {
    let lib = lib_dir.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            (args.get(1) == Some(&&b"shim"[..]) && args.get(2).is_some_and(|a| a.starts_with(lib)))
                .then_some(pid)
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn enforcer_binary(args: &LoadArgs, workspace: &Path) -> Result<PathBuf> {
    if let Some(path) = &args.enforcer {
        return Ok(path.clone());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .current_dir(workspace)
        .args(["build", "-q", "-p", "enforcer", "--bin", "enforcer"])
        .status()
        .with_context(|| format!("{cargo} build -p enforcer"))?;
    if !status.success() {
        bail!("building enforcer failed: {status}");
    }
    Ok(workspace.join("target/debug/enforcer"))
}

/// Waits until `done` holds, checking every 100 ms, at most `limit`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let until = Instant::now() + limit;
    while !done() {
        if Instant::now() > until {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// One line of the summary: what was checked, what was measured, whether
/// it held.
struct Check {
    what: String,
    measured: String,
    ok: bool,
}

pub fn run(args: &LoadArgs, workspace: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("load-test runs the node agent (cgroups, eBPF): run it as root");
    }
    let enforcer = enforcer_binary(args, workspace)?;
    if !enforcer.is_file() {
        bail!("--enforcer {}: no such file", enforcer.display());
    }
    let tag = format!("load-{}", std::process::id());
    // Under the temp dir: a socket path must fit in 108 bytes.
    let scratch = std::env::temp_dir().join(format!("enforcer-{tag}"));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700))?;
    let mut run = Run {
        scratch: scratch.clone(),
        agent: None,
        clients: Vec::new(),
    };
    let socket = scratch.join("enforcer.sock");
    let lib_dir = scratch.join("lib");
    let config = scratch.join("enforcer.toml");
    // Room for every job's client, the request clients and their
    // reconnections.
    let connections = (args.jobs + args.clients * 2 + 16).max(128);
    std::fs::write(
        &config,
        format!(
            "max_concurrent_jobs = {}\nstate_dir = {:?}\ntimeout = \"{}s\"\n\
             [agent]\nsocket = {:?}\nlib_dir = {:?}\non_agent_stop = \"end\"\n\
             max_connections = {}\nmax_connections_per_uid = {}\n",
            args.jobs + 1,
            scratch.join("state"),
            args.secs + 600,
            socket,
            lib_dir,
            connections.max(512),
            connections,
        ),
    )?;
    let log = scratch.join("agent.log");
    let agent = Command::new(&enforcer)
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting enforcer agent")?;
    let agent_pid = agent.id();
    run.agent = Some(agent);
    let log_tail = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    wait_for("the agent's socket", Duration::from_secs(30), || {
        Conn::open(&socket).is_ok()
    })
    .with_context(|| format!("the agent's log ends:\n{}", log_tail()))?;

    let client_cmd = |job: &str, report: &Path| {
        let mut c = Command::new(&enforcer);
        c.args(["run", "--config"])
            .arg(&config)
            .args(["--job", job, "--report"])
            .arg(report)
            .env("ENFORCER_SOCKET", &socket)
            .env_remove("ENFORCER_NO_AGENT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    // One finished job for the `report` requests to ask about.
    let finished_job = format!("{tag}-done");
    let status = client_cmd(&finished_job, &scratch.join("done.json"))
        .args(["--", "true"])
        .status()
        .context("running the finished job")?;
    if !status.success() {
        bail!(
            "the job for the report requests failed ({status}); the agent's log ends:\n{}",
            log_tail()
        );
    }

    // The held jobs: each ends with its own status once released.
    let release = scratch.join("release");
    let expected: Vec<i32> = (0..args.jobs).map(|i| (i % 100) as i32).collect();
    let t_jobs = Instant::now();
    for (i, code) in expected.iter().enumerate() {
        let script = format!("while [ ! -e {release:?} ]; do sleep 0.2; done; exit {code}");
        let child = client_cmd(&format!("{tag}-{i}"), &scratch.join(format!("{i}.json")))
            .args(["--", "sh", "-c", &script])
            .spawn()
            .context("starting enforcer run")?;
        run.clients.push(child);
    }
    let running = |v: &Value| {
        v["jobs"].as_array().map_or(0, |j| {
            j.iter()
                .filter(|j| {
                    j["state"] == "running" && j["id"].as_str().is_some_and(|i| i.starts_with(&tag))
                })
                .count()
        })
    };
    wait_for("every job running", Duration::from_secs(120), || {
        Conn::open(&socket)
            .and_then(|mut c| {
                Ok(serde_json::from_str::<Value>(
                    c.ask(br#"{"type":"status"}"#)?,
                )?)
            })
            .is_ok_and(|v| running(&v) >= args.jobs as usize)
    })
    .with_context(|| format!("the agent's log ends:\n{}", log_tail()))?;
    let jobs_started_in = t_jobs.elapsed();

    // The load, with the agent's memory sampled throughout.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop_sampling.clone(), peak_rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some((rss, _)) = rss_kib(agent_pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs(args.secs);
    let workers: Vec<_> = (0..u64::from(args.clients))
        .map(|k| {
            let socket = socket.clone();
            let job = finished_job.clone();
            let (clients, rps) = (u64::from(args.clients), u64::from(args.rps));
            std::thread::spawn(move || client(&socket, k, clients, rps, start, end, &job))
        })
        .collect();
    let mut requests = Requests::default();
    for w in workers {
        let r = w
            .join()
            .map_err(|_| anyhow::anyhow!("a request client panicked"))?;
        requests.latencies.extend(r.latencies);
        requests.errors += r.errors;
        if requests.first_error.is_none() {
            requests.first_error = r.first_error;
        }
    }
    let load_secs = start.elapsed().as_secs_f64();
    let agent_alive = run
        .agent
        .as_mut()
        .is_some_and(|a| matches!(a.try_wait(), Ok(None)));

    // Release the jobs; every client must end with its job's status.
    run.release()?;
    let mut lost = Vec::new();
    let until = Instant::now() + Duration::from_secs(120);
    for (i, (child, &code)) in run.clients.iter_mut().zip(&expected).enumerate() {
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
                _ => break None,
            }
        };
        let report: Option<Value> = std::fs::read(scratch.join(format!("{i}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let reported = report.as_ref().and_then(|r| r["exit_code"].as_i64());
        if status.and_then(|s| s.code()) != Some(code) || reported != Some(i64::from(code)) {
            lost.push(format!(
                "{tag}-{i}: expected {code}, client {status:?}, report exit_code {reported:?}"
            ));
        }
    }
    stop_sampling.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (end_rss, hwm) = rss_kib(agent_pid).unwrap_or((0, 0));
    let peak = peak_rss.load(Ordering::Relaxed).max(end_rss);

    // Nothing left: shims exit right after their jobs; cgroups go with them.
    let _ = wait_for("the shims to exit", Duration::from_secs(30), || {
        shims_of(&lib_dir).is_empty()
    });
    let _ = wait_for("the job cgroups to go", Duration::from_secs(30), || {
        cgroups_named(&format!("{tag}-")).is_empty()
    });
    let shims_left = shims_of(&lib_dir);
    let cgroups_left = cgroups_named(&format!("{tag}-"));

    let mut lat = requests.latencies.clone();
    lat.sort_unstable();
    let answered = lat.len() as u64;
    let asked = u64::from(args.rps) * args.secs;
    let achieved = (answered + requests.errors) as f64 / load_secs;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let checks = [
        Check {
            what: format!(
                "{} jobs: each client and report has its job's exit status",
                args.jobs
            ),
            measured: if lost.is_empty() {
                format!(
                    "{} of {} (started in {:.1} s)",
                    args.jobs,
                    args.jobs,
                    jobs_started_in.as_secs_f64()
                )
            } else {
                format!("{} lost: {}", lost.len(), lost.join("; "))
            },
            ok: lost.is_empty(),
        },
        Check {
            what: "no cgroup of the jobs left".to_owned(),
            measured: format!("{} left {:?}", cgroups_left.len(), cgroups_left),
            ok: cgroups_left.is_empty(),
        },
        Check {
            what: "no shim left".to_owned(),
            measured: format!("{} left {:?}", shims_left.len(), shims_left),
            ok: shims_left.is_empty(),
        },
        Check {
            what: format!(
                "{} requests/s for {} s, each answered as expected",
                args.rps, args.secs
            ),
            measured: format!(
                "{answered} answered, {} failed{}, {achieved:.0}/s",
                requests.errors,
                requests
                    .first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            ),
            ok: requests.errors == 0 && answered as f64 >= 0.95 * asked as f64,
        },
        Check {
            what: "the agent stayed up".to_owned(),
            measured: if agent_alive {
                "yes".to_owned()
            } else {
                format!("no; its log ends:\n{}", log_tail())
            },
            ok: agent_alive,
        },
        Check {
            what: format!("agent RSS < {} MiB", args.max_rss_mib),
            measured: format!(
                "peak sampled {:.1} MiB, high-water mark {:.1} MiB, at the end {:.1} MiB",
                mib(peak),
                mib(hwm),
                mib(end_rss)
            ),
            ok: peak.max(hwm) > 0 && mib(peak.max(hwm)) < args.max_rss_mib as f64,
        },
    ];
    let (p50, p99, max) = (
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let mut out = std::io::stdout().lock();
    writeln!(out, "load test: {} ({})", enforcer.display(), load.trim())?;
    writeln!(out, "{:<58} {:<6} measured", "check", "result")?;
    for c in &checks {
        writeln!(
            out,
            "{:<58} {:<6} {}",
            c.what,
            if c.ok { "ok" } else { "FAILED" },
            c.measured
        )?;
    }
    writeln!(
        out,
        "request latency (status / report, send to whole answer): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(p50),
        ms(p99),
        ms(max)
    )?;
    let summary = json!({
        "enforcer": enforcer,
        "jobs": args.jobs,
        "rps": args.rps,
        "secs": args.secs,
        "clients": args.clients,
        "answered": answered,
        "failed": requests.errors,
        "achieved_rps": achieved,
        "latency_ms": {"p50": ms(p50), "p99": ms(p99), "max": ms(max)},
        "agent_rss_mib": {"peak_sampled": mib(peak), "hwm": mib(hwm), "end": mib(end_rss)},
        "lost_jobs": lost,
        "cgroups_left": cgroups_left,
        "shims_left": shims_left,
        "loadavg": load.trim(),
        "ok": checks.iter().all(|c| c.ok),
    });
    let dir = workspace.join("target/load");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("load.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
    writeln!(out, "written to {}", path.display())?;
    drop(run);
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.what.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("load test failed: {}", failed.join("; "));
    }
    Ok(())
}
