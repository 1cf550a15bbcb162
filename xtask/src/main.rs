//! Project tasks, run as `cargo xtask <task>`.

mod bench;
mod deploy;
mod dist;
mod ebpf;
mod load;
mod vm;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "enforcer project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the eBPF object (enforcer-ebpf) with the nightly toolchain into
    /// target/ebpf. `cargo build -p enforcer` runs the same build.
    BuildEbpf,
    /// Boot the Debian kernels of the VM matrix (5.10, 6.1, 6.12) under QEMU
    /// (TCG) and run `enforcer doctor` and the root integration tests inside
    /// each, on pure cgroup v2. Needs `scripts/setup` first.
    VmTest(vm::VmTestArgs),
    /// Boot a Debian rootfs (made by `scripts/setup` with debootstrap) with
    /// systemd as PID 1 under QEMU (TCG), with deploy/enforcer.service
    /// enabled, and check that jobs run through the agent (as root and as a
    /// user) land in the unit's delegated cgroup subtree.
    VmSystemd(vm::systemd::VmSystemdArgs),
    /// Run a benchmark; prints side-by-side numbers and writes JSON under
    /// target/bench/.
    Bench {
        #[command(subcommand)]
        what: bench::BenchTask,
    },
    /// Make the install bundle in target/dist: the release binary, shell
    /// completions (bash, zsh, fish) and man pages generated from the CLI,
    /// the deploy files and an install.sh for Debian nodes.
    Dist(dist::DistArgs),
    /// Check the deploy files: the systemd unit with `systemd-analyze
    /// verify`, the DaemonSet against the Kubernetes schemas, the configs
    /// with `enforcer config check`. Needs `scripts/setup` first.
    CheckDeploy,
    /// One agent under load, as root: `--jobs` jobs held at once through it
    /// while `--rps` status/report requests a second go to it for `--secs`
    /// seconds; checks that no job is lost (each gets its report with its
    /// own exit status), no cgroup or shim is left, every request is
    /// answered at the asked rate and the agent's RSS stays bounded; prints
    /// a summary (with p50/p99 request latency), writes target/load/load.json
    /// and exits non-zero if a check fails.
    LoadTest(load::LoadArgs),
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

fn main() -> ExitCode {
    // Errors are reported as their chain of causes, without the backtrace
    // anyhow would add under RUST_BACKTRACE: a failed task is not a bug here.
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::BuildEbpf => {
            let object = ebpf::build_ebpf(&workspace_root())
                .map_err(anyhow::Error::msg)
                .context("cargo xtask build-ebpf")?;
            let size = std::fs::metadata(&object)?.len();
            if size == 0 {
                bail!("{} is empty", object.display());
            }
            eprintln!("built {} ({size} bytes)", object.display());
        }
        Task::VmTest(args) => vm::run(&workspace_root(), &args)?,
        Task::VmSystemd(args) => vm::systemd::run(&workspace_root(), &args)?,
        Task::Bench { what } => bench::run(what, &workspace_root())?,
        Task::Dist(args) => dist::run(&workspace_root(), &args)?,
        Task::CheckDeploy => deploy::run(&workspace_root())?,
        Task::LoadTest(args) => load::run(&args, &workspace_root())?,
    }
    Ok(())
}
