//! `enforcer gpu`: NVML's view of this node, and of a process tree.

use std::{
    collections::BTreeMap,
    io::Write,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Args;
use serde::Serialize;

use crate::cgroup::membership::{Hierarchy, ProcCgroups};
use crate::gpu::{
    self, DeviceSample, GpuSource, NvmlSource, Unavailable,
    attribution::{JobDeviceUsage, JobUsage, job_tick},
    guard::GpuSnapshot,
    metrics,
};

/// Show NVML's view: each GPU's utilisation and memory, each process on it
/// with its cgroup, and (with `--pid`) the aggregate of one process tree as a
/// job report would show it. Exit status 0 when NVML answered; 1 when GPU
/// telemetry is unavailable on this node (the case and reason are printed).
#[derive(Debug, Args)]
pub struct GpuArgs {
    /// Sample for this long (e.g. `10s`, `500ms`), once per `--interval`;
    /// without it, one sample.
    #[arg(long = "for", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Time between samples.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Aggregate the GPU use of this process and its descendants (repeat for
    /// several trees), like a job's `gpu` report field.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,

    /// Print JSON on stdout instead of text.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,

    /// Print the last sample in Prometheus text exposition format.
    #[arg(long)]
    pub prometheus: bool,
}

/// Parses `500ms`, `10s`, `2m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Debug, Serialize)]
struct ProcessView {
    device: u32,
    pid: u32,
    cgroup: Option<String>,
    in_selection: bool,
    memory_used_bytes: Option<u64>,
    sm_util_pct_mean: Option<f64>,
    sm_util_pct_max: Option<u32>,
}

#[derive(Debug, Serialize)]
struct View {
    gpu: Option<Vec<DeviceSample>>,
    unavailable: Option<String>,
    case: Option<&'static str>,
    samples: u32,
    seconds: f64,
    processes: Vec<ProcessView>,
    /// The aggregate of the `--pid` trees; `None` without `--pid`.
    selected: Option<Vec<JobDeviceUsage>>,
    selected_pids_seen: Vec<u32>,
    #[serde(skip)]
    reason: Option<Unavailable>,
}

pub fn run(args: GpuArgs) -> ExitCode {
    let source = gpu::pid_namespace_check().and_then(|()| NvmlSource::init().map_err(|e| e.reason));
    let view = match source {
        Ok(mut src) => sample(&mut src, &args),
        Err(u) => Err(u),
    };
    let view = view.unwrap_or_else(|u| View {
        gpu: None,
        unavailable: Some(u.to_string()),
        case: Some(u.case()),
        samples: 0,
        seconds: 0.0,
        processes: Vec::new(),
        selected: None,
        selected_pids_seen: Vec::new(),
        reason: Some(u),
    });
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &view)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else if args.prometheus {
        let snap = GpuSnapshot {
            unavailable: view.reason.clone(),
            devices: view.gpu.clone().unwrap_or_default(),
            ..GpuSnapshot::default()
        };
        write!(out, "{}", metrics::device_lines(&snap))
    } else {
        write_text(&mut out, &view)
    };
    if let Err(e) = written {
        tracing::error!(error = %e, "writing to stdout failed");
        return ExitCode::from(125);
    }
    if view.gpu.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn sample(src: &mut NvmlSource, args: &GpuArgs) -> Result<View, Unavailable> {
    let procs = ProcCgroups::default();
    let start = Instant::now();
    let mut since = 0;
    let mut usage = JobUsage::default();
    let mut samples = 0;
    let mut per_pid: BTreeMap<(u32, u32), ProcessView> = BTreeMap::new();
    let mut sums: BTreeMap<(u32, u32), (f64, u32)> = BTreeMap::new();
    let mut selected_seen = Vec::new();
    let mut devices;
    loop {
        devices = src.devices().map_err(|e| e.reason)?;
        let ps = src.processes(since).map_err(|e| e.reason)?;
        samples += 1;
        for p in &ps {
            since = since.max(p.sm_samples.iter().map(|s| s.0).max().unwrap_or(0));
            let in_selection = !args.pids.is_empty() && procs.descends_from(p.pid, &args.pids);
            if in_selection && !selected_seen.contains(&p.pid) {
                selected_seen.push(p.pid);
            }
            let v = per_pid
                .entry((p.device, p.pid))
                .or_insert_with(|| ProcessView {
                    device: p.device,
                    pid: p.pid,
                    cgroup: procs.cgroup_of(p.pid, &Hierarchy::Unified),
                    in_selection,
                    memory_used_bytes: None,
                    sm_util_pct_mean: None,
                    sm_util_pct_max: None,
                });
            v.memory_used_bytes = v.memory_used_bytes.max(p.memory_used_bytes);
            let s = sums.entry((p.device, p.pid)).or_default();
            for &(_, u) in &p.sm_samples {
                s.0 += f64::from(u);
                s.1 += 1;
                v.sm_util_pct_max = v.sm_util_pct_max.max(Some(u));
            }
        }
        if !args.pids.is_empty() {
            let tick = job_tick(&ps, |pid| selected_seen.contains(&pid));
            usage.add(&tick, &devices);
        }
        let Some(d) = args.duration else { break };
        if start.elapsed() + args.interval > d {
            break;
        }
        std::thread::sleep(args.interval);
    }
    for (k, v) in &mut per_pid {
        if let Some(&(sum, n)) = sums.get(k)
            && n > 0
        {
            v.sm_util_pct_mean = Some(sum / f64::from(n));
        }
    }
    Ok(View {
        gpu: Some(devices),
        unavailable: None,
        case: None,
        samples,
        seconds: start.elapsed().as_secs_f64(),
        processes: per_pid.into_values().collect(),
        selected: (!args.pids.is_empty()).then(|| usage.summary()),
        selected_pids_seen: selected_seen,
        reason: None,
    })
}

#[expect(clippy::cast_precision_loss, reason = "bytes shown in GiB")]
fn gib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 30)
}

fn write_text(out: &mut impl Write, v: &View) -> std::io::Result<()> {
    let Some(devices) = &v.gpu else {
        return writeln!(
            out,
            "gpu null ({}: {})",
            v.case.unwrap_or("error"),
            v.unavailable.as_deref().unwrap_or("unknown")
        );
    };
    writeln!(out, "{} sample(s) over {:.1} s", v.samples, v.seconds)?;
    for d in devices {
        writeln!(
            out,
            "gpu {} {}: util {}%, memory {:.2} / {:.2} GiB",
            d.index,
            d.name,
            d.gpu_util_pct,
            gib(d.memory_used_bytes),
            gib(d.memory_total_bytes)
        )?;
    }
    for p in &v.processes {
        writeln!(
            out,
            "  {} pid {} on gpu {}: memory {}, sm mean {}, max {} (cgroup {})",
            if p.in_selection { "*" } else { " " },
            p.pid,
            p.device,
            p.memory_used_bytes
                .map_or("n/a".into(), |b| format!("{:.2} GiB", gib(b))),
            p.sm_util_pct_mean
                .map_or("n/a".into(), |u| format!("{u:.1}%")),
            p.sm_util_pct_max.map_or("n/a".into(), |u| format!("{u}%")),
            p.cgroup.as_deref().unwrap_or("?")
        )?;
    }
    if let Some(sel) = &v.selected {
        writeln!(
            out,
            "selected process trees (pids seen on a GPU: {:?}):",
            v.selected_pids_seen
        )?;
        if sel.is_empty() {
            writeln!(out, "  not seen on any GPU")?;
        }
        for d in sel {
            writeln!(
                out,
                "  gpu {} {}: memory {:.2} GiB, sm mean {}, max {}",
                d.index,
                d.name,
                gib(d.memory_used_bytes),
                d.sm_util_pct_mean
                    .map_or("n/a".into(), |u| format!("{u:.1}%")),
                d.sm_util_pct_max
                    .map_or("n/a".into(), |u| format!("{u:.1}%")),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
