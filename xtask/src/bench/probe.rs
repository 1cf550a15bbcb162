//! `cargo xtask bench probe`: what the steal probes cost the scheduler.
//!
//! A context-switch storm (pairs of threads ping-ponging one byte over pipes,
//! each pair pinned to one CPU, so every message is a wake-up and a switch)
//! runs in alternating rounds with the probes detached and attached, in three
//! attached modes: the storm itself is the protected training workload (the
//! worst case: every switch and wake-up hits a training thread and moves its
//! wait state), the protected workload is an idle bystander (the common
//! case on a node: most switches belong to tasks that are not training), and
//! the floor: empty programs on sched_switch and sched_wakeup (`enforcer
//! meter --floor`), what attaching anything to these tracepoints costs.
//! Attached rounds run the real `enforcer meter`; per-program cost comes from
//! the kernel's own accounting (`kernel.bpf_stats_enabled`: run_time_ns and
//! run_cnt per program). That accounting reads the clock twice per program
//! run, so it is switched on only for a second phase of each attached round
//! (cost), never while throughput is measured; its old value is restored at
//! the end.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Command, Stdio},
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
pub struct ProbeArgs {
    /// Rounds per mode (detached and attached alternate).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds each storm round lasts.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Ping-pong pairs (each pinned to CPU `i % ncpus`).
    #[arg(long, default_value_t = 2)]
    pairs: usize,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Restores `kernel.bpf_stats_enabled` on drop.
struct StatsGuard(String);

impl StatsGuard {
    fn new() -> Result<Self> {
        let old = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        let guard = Self(old.trim().to_owned());
        guard.set(false)?;
        Ok(guard)
    }

    fn set(&self, on: bool) -> Result<()> {
        let v = if on { "1" } else { "0" };
        std::fs::write(STATS_SYSCTL, v).with_context(|| format!("writing {v} to {STATS_SYSCTL}"))
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.0) {
            eprintln!("could not restore {STATS_SYSCTL} to {}: {e}", self.0);
        }
    }
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % 1024, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn pipe() -> Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// The storm: `pairs` ping-pong pairs running until stopped; the counter
/// holds round trips so far.
struct Storm {
    stop: Arc<AtomicBool>,
    trips: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Storm {
    fn start(pairs: usize, ncpus: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let trips = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in 0..pairs {
            let cpu = i % ncpus;
            let (mut a_rx, mut b_tx) = pipe()?;
            let (mut b_rx, mut a_tx) = pipe()?;
            let (stop_a, trips_a) = (stop.clone(), trips.clone());
            threads.push(std::thread::spawn(move || {
                pin(cpu);
                let mut byte = [0u8; 1];
                while !stop_a.load(Ordering::Relaxed) {
                    if a_tx.write_all(&[1]).is_err() || a_rx.read_exact(&mut byte).is_err() {
                        break;
                    }
                    trips_a.fetch_add(1, Ordering::Relaxed);
                }
                // Closing a_tx ends the echo thread.
            }));
            threads.push(std::thread::spawn(move || {
                pin(cpu);
                let mut byte = [0u8; 1];
                while b_rx.read_exact(&mut byte).is_ok() {
                    if b_tx.write_all(&byte).is_err() {
                        break;
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            trips,
            threads,
        })
    }

    /// Round trips per second over `d`.
    fn measure(&self, d: Duration) -> f64 {
        let (t0, n0) = (Instant::now(), self.trips.load(Ordering::Relaxed));
        std::thread::sleep(d);
        let n1 = self.trips.load(Ordering::Relaxed);
        (n1 - n0) as f64 / t0.elapsed().as_secs_f64()
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One attached configuration of a round.
struct Mode {
    name: &'static str,
    /// The PID `enforcer meter` protects.
    protect: u32,
    /// Attach the empty programs instead of the meter (`--floor`).
    floor: bool,
    /// Other PIDs metered as trainings of their own (`--also-protect`).
    also: Vec<u32>,
}

/// Runs one attached round: starts `enforcer meter` protecting this process,
/// measures the storm once it is attached, stops it and returns the storm
/// rate and the meter's summary (with per-program stats).
fn attached_round(
    enforcer: &Path,
    mode: &Mode,
    storm: &Storm,
    stats: &StatsGuard,
    d: Duration,
) -> Result<(f64, Value)> {
    let mut child = Command::new(enforcer)
        .args(["meter", "--json", "--interval", "1h", "--protect"])
        .arg(mode.protect.to_string())
        .args(mode.floor.then_some("--floor"))
        .args(
            mode.also
                .iter()
                .flat_map(|pid| ["--also-protect".to_owned(), pid.to_string()]),
        )
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", enforcer.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("meter stdout")?).lines();
    let start = lines.next().context("no start line from the meter")??;
    if !start.contains("\"start\"") {
        bail!("unexpected meter output: {start}");
    }
    let rate = storm.measure(d);
    stats.set(true)?;
    std::thread::sleep(d / 2);
    stats.set(false)?;
    // SAFETY: signalling the meter we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut summary = Value::Null;
    for line in lines {
        let v: Value = serde_json::from_str(&line?)?;
        if v["event"] == "summary" {
            summary = v;
        }
    }
    let status = child.wait()?;
    if !status.success() || summary.is_null() {
        bail!("enforcer meter failed ({status})");
    }
    Ok((rate, summary))
}

pub fn run(args: &ProbeArgs, workspace: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench probe loads eBPF programs and sets a sysctl: run it as root");
    }
    let status = Command::new("cargo")
        .current_dir(workspace)
        .args(["build", "--release", "-q", "-p", "enforcer"])
        .status()
        .context("cargo build --release -p enforcer")?;
    if !status.success() {
        bail!("building enforcer failed");
    }
    let enforcer = workspace.join("target/release/enforcer");
    let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let d = Duration::from_secs_f64(args.seconds);
    let stats = StatsGuard::new()?;
    let storm = Storm::start(args.pairs, ncpus)?;
    std::thread::sleep(Duration::from_millis(300));

    // The bystander: a sleeping process as the "training workload".
    let bystander = Command::new("sleep")
        .arg("3600")
        .spawn()
        .context("starting the bystander (sleep)")?;
    // Seven more sleeping "trainings": the meter then keeps the state of
    // eight (its most), as the agent's does on a node protecting eight.
    let mut others = Vec::new();
    for _ in 1..enforcer_common::MAX_TRAININGS {
        others.push(
            Command::new("sleep")
                .arg("3600")
                .spawn()
                .context("starting a bystander (sleep)")?,
        );
    }
    let modes = [
        Mode {
            name: "storm is training",
            protect: std::process::id(),
            floor: false,
            also: Vec::new(),
        },
        Mode {
            name: "storm is training, 8 trainings",
            protect: std::process::id(),
            floor: false,
            also: others.iter().map(|c| c.id()).collect(),
        },
        Mode {
            name: "storm is not training",
            protect: bystander.id(),
            floor: false,
            also: Vec::new(),
        },
        Mode {
            name: "empty programs (floor)",
            protect: bystander.id(),
            floor: true,
            also: Vec::new(),
        },
    ];
    let mut detached = Vec::new();
    let mut attached: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // (mode, program) → (per-round ns/event, events)
    let mut per_program: std::collections::BTreeMap<(usize, String), (Vec<f64>, u64)> =
        Default::default();
    let result = (|| -> Result<()> {
        for round in 0..args.rounds {
            let off = storm.measure(d);
            detached.push(off);
            let mut line = format!("round {}: detached {off:.0}", round + 1);
            for (m, mode) in modes.iter().enumerate() {
                let (on, summary) = attached_round(&enforcer, mode, &storm, &stats, d)?;
                line += &format!(", {} {on:.0}", mode.name);
                attached[m].push(on);
                for p in summary["programs"].as_array().into_iter().flatten() {
                    let prog = p["name"].as_str().unwrap_or_default().to_owned();
                    let entry = per_program.entry((m, prog)).or_default();
                    if let Some(ns) = p["ns_per_event"].as_f64() {
                        entry.0.push(ns);
                    }
                    entry.1 += p["run_count"].as_u64().unwrap_or(0);
                }
            }
            eprintln!("{line} round trips/s");
        }
        Ok(())
    })();
    for mut child in others.into_iter().chain([bystander]) {
        let _ = child.kill();
        let _ = child.wait();
    }
    storm.stop();
    result?;

    let off = median(detached.clone());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "steal probe cost ({} rounds x {:.1}s per mode, {} ping-pong pairs, {ncpus} CPUs)",
        args.rounds, args.seconds, args.pairs
    )?;
    let mut header = format!("{:<28}", "median ns/event");
    for mode in &modes {
        header += &format!(" {:>30}", mode.name);
    }
    writeln!(out, "{header}")?;
    let names: std::collections::BTreeSet<&String> = per_program.keys().map(|(_, n)| n).collect();
    let mut programs = Vec::new();
    for name in names {
        let mut cells = Vec::new();
        let mut row = json!({"name": name});
        for (m, mode) in modes.iter().enumerate() {
            let (ns, count) = per_program
                .get(&(m, name.clone()))
                .cloned()
                .unwrap_or_default();
            let med = median(ns.clone());
            cells.push(format!(" {:>30}", format!("{med:.1} ({count:>9})")));
            row[mode.name] =
                json!({"median_ns_per_event": med, "per_round_ns_per_event": ns, "events": count});
        }
        writeln!(out, "{name:<28}{}", cells.concat())?;
        programs.push(row);
    }
    let mut storm_json = json!({"detached_trips_per_s": detached, "median_detached": off});
    let mut line = format!("storm round trips/s: detached {off:.0}");
    for (m, mode) in modes.iter().enumerate() {
        let on = median(attached[m].clone());
        let loss = 100.0 * (1.0 - on / off);
        line += &format!("; {}: {on:.0} (loss {loss:.2} %)", mode.name);
        storm_json[mode.name] =
            json!({"trips_per_s": attached[m], "median": on, "loss_percent": loss});
    }
    writeln!(out, "{line}")?;
    writeln!(out, "targets: <= 150 ns/event, <= 2 % throughput loss")?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let report = json!({
        "kernel": kernel.trim(),
        "cpus": ncpus,
        "rounds": args.rounds,
        "round_seconds": args.seconds,
        "pairs": args.pairs,
        "programs": programs,
        "storm": storm_json,
    });
    let dir = workspace.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("probe.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    writeln!(out, "wrote {}", path.display())?;
    Ok(())
}
