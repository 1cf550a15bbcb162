//! `enforcer doctor`.

use std::{io::Write, process::ExitCode};

use clap::Args;

use crate::doctor;

/// Check that this node can run the agent. Exit status 0 when it can; 1
/// otherwise, with each missing piece named and how to fix it.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs) -> ExitCode {
    let report = doctor::check();
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        write_text(&mut out, &report)
    };
    if let Err(e) = written {
        tracing::error!(error = %e, "writing the doctor report to stdout failed");
        return ExitCode::from(125);
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn write_text(out: &mut impl Write, r: &doctor::Report) -> std::io::Result<()> {
    let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
    writeln!(out, "kernel      {}", r.kernel_release)?;
    match &r.cgroup {
        Ok(layout) => {
            writeln!(out, "cgroup      mode {}", layout.mode)?;
            for (name, c) in &layout.controllers {
                writeln!(
                    out,
                    "  {} {:<10} v{} {}{}",
                    mark(c.usable),
                    name,
                    c.version,
                    c.own_cgroup.display(),
                    c.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )?;
            }
        }
        Err(e) => writeln!(out, "cgroup      FAIL {e}")?,
    }
    match &r.btf {
        Ok(b) => writeln!(out, "btf         ok   {b}")?,
        Err(e) => writeln!(out, "btf         FAIL {e}")?,
    }
    match &r.ebpf {
        Ok(t) => writeln!(
            out,
            "ebpf        ok   loaded, attached, {} switches in {} ms, detached",
            t.switches_seen, t.attached_ms
        )?,
        Err(e) => writeln!(out, "ebpf        FAIL {e}")?,
    }
    let p = &r.privileges;
    writeln!(
        out,
        "privileges  {} euid {} CAP_SYS_ADMIN={} CAP_BPF={} CAP_PERFMON={}",
        mark(p.missing().is_empty()),
        p.euid,
        p.cap_sys_admin,
        p.cap_bpf,
        p.cap_perfmon
    )?;
    match (&r.gpu, &r.gpu_unavailable) {
        (Some(g), None) => writeln!(
            out,
            "gpu         {}",
            serde_json::to_string(g).unwrap_or_default()
        )?,
        (Some(g), Some(reason)) => writeln!(
            out,
            "gpu         {} but per-job telemetry unavailable: {}: {reason}",
            serde_json::to_string(g).unwrap_or_default(),
            r.gpu_unavailable_case.unwrap_or("error")
        )?,
        (None, reason) => writeln!(
            out,
            "gpu         null ({}: {})",
            r.gpu_unavailable_case.unwrap_or("error"),
            reason.as_deref().unwrap_or("unknown")
        )?,
    }
    if r.problems.is_empty() {
        writeln!(out, "\nthis node can run enforcer")?;
    } else {
        writeln!(out, "\nproblems:")?;
        for p in &r.problems {
            writeln!(out, "  - {p}")?;
        }
    }
    Ok(())
}
