//! The command line: one file per subcommand, clap derive, human output by
//! default and `--json` where a machine reads it.

mod agent;
mod attach;
mod config;
mod ctl;
mod doctor;
pub mod game;
mod gpu;
pub mod meter;
pub mod run;
mod top;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Kernel-enforced limits, deadlines and a CPU-steal budget for evaluation
/// jobs that run beside a training workload.
#[derive(Debug, Parser)]
#[command(name = "enforcer", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ENFORCER_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Log filter in `tracing` syntax (e.g. `info`, `enforcer=debug`).
    #[arg(long, global = true, default_value = "info", env = "ENFORCER_LOG")]
    pub log: String,

    /// Run `run` / `attach` in this process (root only) even when an agent
    /// listens. Without it they go through the agent on `ENFORCER_SOCKET`
    /// (default /run/enforcer/enforcer.sock) when one answers.
    #[arg(
        long,
        global = true,
        env = "ENFORCER_NO_AGENT",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_agent: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that this node can run the agent: kernel, cgroup mode and
    /// controllers, BTF, eBPF load and attach, privileges, NVML.
    Doctor(doctor::DoctorArgs),
    /// Show NVML's view of the GPUs and their processes (with their
    /// cgroups), or why GPU telemetry is unavailable on this node.
    Gpu(gpu::GpuArgs),
    /// Measure, without enforcing anything, how much the tasks of existing
    /// cgroups steal from a training workload's scheduling (eBPF).
    Meter(meter::MeterArgs),
    Run(run::RunArgs),
    Attach(attach::AttachArgs),
    Game(game::GameArgs),
    /// Check a config file or show the effective config.
    Config(config::ConfigArgs),
    Agent(agent::AgentArgs),
    Ctl(ctl::CtlArgs),
    Top(top::TopArgs),
    #[command(hide = true)]
    Shim(agent::ShimArgs),
}

/// Parses the command line, sets up logging and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Gpu(args) => gpu::run(args),
        Command::Meter(args) => meter::run(args),
        Command::Run(args) => run::run(args, cli.no_agent),
        Command::Attach(args) => attach::run(args, cli.no_agent),
        Command::Game(args) => game::run(args, cli.no_agent),
        Command::Config(args) => config::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Top(args) => top::run(args),
        Command::Shim(args) => agent::shim(args),
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
