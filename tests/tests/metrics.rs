//! The agent's Prometheus endpoint: off by default (the agent holds no
//! listening TCP socket); when on, a scrape shows a protected and a plain
//! job with sane values (the protected one's stolen fraction among them,
//! no GPU series for jobs on no GPU), passes `promtool check metrics`, and has every
//! metric the Grafana dashboard in `deploy/` queries; a non-loopback
//! address is refused with exit 2 before anything is made.
//!
//! Each test starts its own agent on a private socket and record directory
//! and ends it (with its jobs), also on failure.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{
    ChildGuard, EnforcerGuard, EnforcerRun, Scratch, assert_no_cgroup_left, enforcer, job_cgroups,
    root_tests, unique_name,
};

/// An agent this test started; SIGTERM on drop ends it and (with
/// `on_agent_stop = "end"`) its jobs, SIGKILL if that takes too long.
struct Agent {
    child: Child,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts an agent whose `[agent]` table has `agent_keys` too, with
    /// `args` after `enforcer agent --config <config>`.
    fn start(s: &Scratch, agent_keys: &str, args: &[&str]) -> Agent {
        let socket = s.path("run/enforcer.sock");
        let config = s.config(&format!(
            "max_concurrent_jobs = 4\n[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\non_agent_stop = \"end\"\n{agent_keys}\n",
            socket.display(),
            s.path("lib").display()
        ));
        let log = s.path("agent.log");
        let child = enforcer()
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("ENFORCER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("starting enforcer agent");
        let mut agent = Agent {
            child,
            socket,
            config,
            log,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&agent.socket).is_err() {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("the agent exited at start ({st}):\n{}", agent.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent did not listen within 20 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `enforcer run` of `command` as job `name` through this agent.
    fn run(&self, name: &str, flags: &[&str], command: &[&str]) -> EnforcerGuard {
        let run = EnforcerRun::new(&self.config, name)
            .flags(flags)
            .job(command)
            .env("ENFORCER_SOCKET", &self.socket)
            .env_remove("ENFORCER_NO_AGENT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting enforcer run");
        EnforcerGuard(run)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the agent this test started and has not
            // reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while matches!(self.child.try_wait(), Ok(None))
                && t0.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One HTTP/1.1 request; the status line, the headers and the body.
fn http(addr: SocketAddr, request_line: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "{request_line}\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("reading the answer of {addr}: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, headers, body) = http(addr, "GET /metrics HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    body
}

/// The value of the sample `name{labels}` whose labels include every one of
/// `with` (`key="value"`).
fn value(text: &str, name: &str, with: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labels, v) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let labels: Vec<&str> = labels.split(',').collect();
        with.iter()
            .all(|w| labels.contains(w))
            .then(|| v.trim().parse().ok())?
    })
}

/// The names of the metric families in a scrape (from its samples).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The inodes of the TCP sockets that listen on this node now.
fn listening_inodes() -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A: TCP_LISTEN; the inode is the tenth field.
            if f.get(3) == Some(&"0A")
                && let Some(inode) = f.get(9).and_then(|i| i.parse().ok())
            {
                out.insert(inode);
            }
        }
    }
    out
}

/// How many listening TCP sockets process `pid` holds.
fn tcp_listeners_of(pid: u32) -> usize {
    let listening = listening_inodes();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        })
        .filter(|inode| listening.contains(inode))
        .count()
}

fn metrics_are_off_by_default_and_the_agent_listens_on_no_tcp_port() {
    let s = Scratch::new("enforcer-metrics");
    let off = Agent::start(&s, "", &[]);
    assert_eq!(
        tcp_listeners_of(off.child.id()),
        0,
        "an agent without metrics_listen listens on TCP:\n{}",
        off.log_text()
    );
    drop(off);
    // The same check sees the endpoint when it is on.
    let s = Scratch::new("enforcer-metrics");
    let port = free_port();
    let on = Agent::start(&s, &format!("metrics_listen = \"127.0.0.1:{port}\""), &[]);
    assert_eq!(tcp_listeners_of(on.child.id()), 1, "{}", on.log_text());
}

/// Waits until `job` has a cgroup (its command runs).
fn wait_started(job: &str) {
    let t0 = Instant::now();
    while job_cgroups(job).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "job {job} never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An agent with metrics on, a protected and a plain job, and the last
/// scrape. Dropped in field order: the agent ends the jobs first.
struct TwoJobs {
    scrape: String,
    addr: SocketAddr,
    agent: Agent,
    names: [String; 2],
    _jobs: Vec<EnforcerGuard>,
    _training: ChildGuard,
}

/// Starts [`TwoJobs`] and checks what a scrape must show of them.
fn scrape_with_two_jobs(s: &Scratch) -> TwoJobs {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        enforcer_tests::skip!("the kernel has no BTF: the steal meter cannot load");
    }
    let port = free_port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let agent = Agent::start(s, "", &["--metrics-listen", &addr.to_string()]);
    // The training sleeps: the test needs its meter, not its CPU.
    let training = ChildGuard(
        Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("starting the training"),
    );
    let training_pid = training.pid().to_string();
    let workload = enforcer_tests::eval_workload!();
    let workload = workload.to_str().expect("workload path");
    let (protected, plain) = (unique_name("metrics-prot"), unique_name("metrics-plain"));
    // Each job spins under a small quota: it uses CPU time and is
    // throttled, without taking the machine. In the normal class: in the
    // idle class a busy machine would leave them no CPU time at all.
    let jobs = vec![
        agent.run(
            &protected,
            &[
                "--protect",
                &training_pid,
                "--budget",
                "5%",
                "--cpu",
                "0.2",
                "--no-idle",
                "--timeout",
                "120s",
            ],
            &[workload, "spin", "1", "120"],
        ),
        agent.run(
            &plain,
            &["--cpu", "0.2", "--no-idle", "--timeout", "120s"],
            &[workload, "spin", "1", "120"],
        ),
    ];
    wait_started(&protected);
    wait_started(&plain);
    let training_label = format!("training=\"pid-{training_pid}\"");
    let prot_label = format!("job_id=\"{protected}\"");
    let plain_label = format!("job_id=\"{plain}\"");
    // Until the protected job is metered (its cgroup is found at a tick).
    let t0 = Instant::now();
    let first = loop {
        let text = scrape(addr);
        if value(&text, "enforcer_job_steal_seconds_total", &[&prot_label]).is_some()
            && value(&text, "enforcer_job_cpu_seconds_total", &[&plain_label]).is_some()
        {
            break text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the scrape never showed both jobs within 30 s:\n{text}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_millis(1500));
    let second = scrape(addr);
    eprintln!("{second}");
    for label in [&prot_label, &plain_label] {
        let memory = value(&second, "enforcer_job_memory_bytes", &[label]);
        assert!(
            memory.is_some_and(|m| m > 0.0),
            "{label}: memory {memory:?}"
        );
        let limit = value(&second, "enforcer_job_memory_limit_bytes", &[label]);
        assert_eq!(
            limit,
            Some(1000.0 * 1024.0 * 1024.0),
            "{label}: the default 1000MiB limit"
        );
        let cpu = |t: &str| value(t, "enforcer_job_cpu_seconds_total", &[label]);
        assert!(
            cpu(&second) > cpu(&first),
            "{label}: CPU seconds did not increase between scrapes: {:?} then {:?}",
            cpu(&first),
            cpu(&second)
        );
        // Whether it was throttled yet depends on how busy the machine is.
        for name in [
            "enforcer_job_cpu_throttled_periods_total",
            "enforcer_job_cpu_throttled_seconds_total",
        ] {
            assert!(
                value(&second, name, &[label]).is_some(),
                "{label}: no {name}"
            );
        }
    }
    assert_eq!(
        value(
            &second,
            "enforcer_job_budget_fraction",
            &[&prot_label, &training_label]
        ),
        Some(0.05)
    );
    assert_eq!(
        value(
            &second,
            "enforcer_training_budget_fraction",
            &[&training_label]
        ),
        Some(0.05)
    );
    assert_eq!(
        value(&second, "enforcer_training_jobs", &[&training_label]),
        Some(1.0)
    );
    assert!(
        value(&second, "enforcer_job_steal_seconds_total", &[&plain_label]).is_none(),
        "the plain job protects nothing: no steal series"
    );
    for window in ["window=\"10s\"", "window=\"job\""] {
        let stolen = value(
            &second,
            "enforcer_job_stolen_ratio",
            &[&prot_label, &training_label, window],
        );
        assert!(
            stolen.is_some_and(|f| (0.0..=1.0).contains(&f)),
            "the protected job's stolen fraction ({window}) is not in [0, 1]: {stolen:?}"
        );
        assert!(
            value(
                &second,
                "enforcer_job_stolen_ratio",
                &[&plain_label, window]
            )
            .is_none(),
            "the plain job protects nothing: no stolen fraction"
        );
    }
    let used = value(&second, "enforcer_job_budget_used_ratio", &[&prot_label]);
    assert!(
        used.is_some_and(|f| (0.0..=1.0).contains(&f)),
        "budget used: {used:?}"
    );
    // Prometheus sets `job` on every series it scrapes: the agent's own
    // label must not be called that.
    for line in second.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("{job=") && !line.contains(",job="),
            "a series carries the reserved job label: {line}"
        );
    }
    // The jobs use no GPU, and on a node without one the agent says so
    // rather than showing zeros.
    let gpu = value(&second, "enforcer_gpu_telemetry_available", &[]);
    assert!(matches!(gpu, Some(v) if v == 0.0 || v == 1.0), "{gpu:?}");
    assert!(
        !second.contains("\nenforcer_job_gpu_"),
        "GPU series for jobs that use none (telemetry {gpu:?})"
    );
    assert_eq!(
        value(&second, "enforcer_jobs", &["state=\"running\""]),
        Some(2.0)
    );
    assert!(value(&second, "enforcer_requests_total", &["type=\"run\""]).is_some_and(|n| n >= 2.0));
    assert!(value(&second, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0));
    assert!(
        value(&second, "enforcer_control_loop_lag_seconds_count", &[]).is_some_and(|v| v > 0.0)
    );
    TwoJobs {
        scrape: second,
        addr,
        agent,
        names: [protected, plain],
        _jobs: jobs,
        _training: training,
    }
}

fn a_scrape_shows_a_protected_and_a_plain_job_with_sane_values() {
    let s = Scratch::new("enforcer-metrics");
    let t = scrape_with_two_jobs(&s);
    // Only GET and HEAD of /metrics are served.
    assert!(http(t.addr, "GET / HTTP/1.1").0.starts_with("HTTP/1.1 404"));
    assert!(
        http(t.addr, "POST /metrics HTTP/1.1")
            .0
            .starts_with("HTTP/1.1 405")
    );
    let (status, headers, body) = http(t.addr, "HEAD /metrics HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}");
    assert!(body.is_empty(), "HEAD has no body: {body:?}");
    let names = t.names.clone();
    drop(t);
    for name in &names {
        assert_no_cgroup_left(name);
    }
}

fn a_live_scrape_passes_promtool_check_metrics() {
    let Some(promtool) = which("promtool") else {
        enforcer_tests::skip!(
            "promtool is not installed (Debian package prometheus; scripts/setup installs it)"
        );
    };
    let s = Scratch::new("enforcer-metrics");
    let t = scrape_with_two_jobs(&s);
    let text = &t.scrape;
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    check
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("feeding promtool");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- scrape ---\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        t.agent.log_text()
    );
}

/// `program` on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The metric names in every `expr` (and variable `query`) of a Grafana
/// dashboard.
fn dashboard_metrics(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for key in ["expr", "query"] {
                if let Some(serde_json::Value::String(expr)) = m.get(key) {
                    out.extend(
                        expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .filter(|w| w.starts_with("enforcer_") || w.starts_with("process_"))
                            .map(str::to_owned),
                    );
                }
            }
            m.values().for_each(|v| dashboard_metrics(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_metrics(v, out)),
        _ => {}
    }
}

fn every_metric_of_the_grafana_dashboard_is_in_a_live_scrape() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana-dashboard.json"
    );
    let Ok(text) = std::fs::read_to_string(path) else {
        enforcer_tests::skip!(
            "{path} is not on this machine (the VM image carries only the binaries)"
        );
    };
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut wanted = BTreeSet::new();
    dashboard_metrics(&dashboard, &mut wanted);
    assert!(
        wanted.len() > 10,
        "the dashboard queries almost nothing: {wanted:?}"
    );
    let s = Scratch::new("enforcer-metrics");
    let t = scrape_with_two_jobs(&s);
    let scrape = &t.scrape;
    let have = sample_names(scrape);
    let bpf_stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|v| v.trim() == "1");
    // Series that exist only in some states, each with why it may be
    // absent from this scrape (the unit test holds every name to the
    // agent's list of metrics).
    let conditional = |name: &str| -> Option<&'static str> {
        match name {
            "enforcer_probe_runs_total" | "enforcer_probe_run_seconds_total" if !bpf_stats => {
                Some("kernel.bpf_stats_enabled is 0")
            }
            "enforcer_training_slowdown_ratio" => Some("the training has no progress file"),
            "enforcer_training_cpu_quota_cores" | "enforcer_job_cpu_quota_cores" => {
                Some("the budget may leave the jobs unlimited")
            }
            _ => None,
        }
    };
    let mut missing = Vec::new();
    for name in &wanted {
        if have.contains(name) {
            continue;
        }
        match conditional(name) {
            Some(why) => eprintln!("not in this scrape, as expected: {name} ({why})"),
            None => missing.push(name.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics this scrape lacks: {missing:?}\n{scrape}"
    );
}

fn metrics_listen_on_a_non_loopback_address_is_exit_2_naming_the_key_and_makes_nothing() {
    for (keys, args, named) in [
        (
            "metrics_listen = \"0.0.0.0:9464\"",
            &[][..],
            "agent.metrics_listen = \"0.0.0.0:9464\"",
        ),
        (
            "",
            &["--metrics-listen", "192.0.2.1:9464"][..],
            "--metrics-listen 192.0.2.1:9464",
        ),
    ] {
        let s = Scratch::new("enforcer-metrics");
        let socket = s.path("run/enforcer.sock");
        let lib = s.path("lib");
        let config = s.config(&format!(
            "[agent]\nsocket = \"{}\"\nlib_dir = \"{}\"\n{keys}\n",
            socket.display(),
            lib.display()
        ));
        let child = ChildGuard(
            enforcer()
                .arg("agent")
                .arg("--config")
                .arg(&config)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting enforcer agent"),
        );
        let out = child
            .output_within(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("the agent did not refuse {named}: it runs"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{named}: {stderr}");
        assert!(
            stderr.contains(named),
            "the error names {named:?}: {stderr}"
        );
        assert!(
            stderr.contains("loopback"),
            "the error says what is allowed: {stderr}"
        );
        assert!(!lib.exists(), "the refused agent made its lib_dir");
        assert!(!socket.exists(), "the refused agent made its socket");
    }
}

root_tests!(
    metrics_are_off_by_default_and_the_agent_listens_on_no_tcp_port,
    a_scrape_shows_a_protected_and_a_plain_job_with_sane_values,
    a_live_scrape_passes_promtool_check_metrics,
    every_metric_of_the_grafana_dashboard_is_in_a_live_scrape,
    metrics_listen_on_a_non_loopback_address_is_exit_2_naming_the_key_and_makes_nothing,
);
