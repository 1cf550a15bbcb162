//! `enforcer config`: check a config file, show the effective config.

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use super::run::{EXIT_FAILURE, EXIT_USAGE};
use crate::config::Config;

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check FILE: exit 0 if valid, else 2 with the key, value and line.
    Check {
        /// The config file to check.
        file: PathBuf,
    },
    /// Print the effective config (file values over the built-in defaults).
    Show {
        /// Config file (default /etc/enforcer/enforcer.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: ConfigArgs) -> ExitCode {
    match args.command {
        ConfigCommand::Check { file } => match Config::load(&file) {
            Ok(_) => {
                eprintln!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        ConfigCommand::Show { config, json } => {
            let (cfg, source) = match Config::load_or_default(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let text = if json {
                serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())
            } else {
                toml::to_string(&cfg).map_err(|e| e.to_string())
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("serialising the config: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            let mut out = std::io::stdout().lock();
            let header = match source {
                Some(p) if !json => {
                    format!("# effective config: {} over the defaults\n", p.display())
                }
                None if !json => {
                    "# effective config: built-in defaults (no config file)\n".to_owned()
                }
                _ => String::new(),
            };
            if write!(out, "{header}{text}")
                .and_then(|()| writeln!(out))
                .is_err()
            {
                return ExitCode::from(EXIT_FAILURE);
            }
            ExitCode::SUCCESS
        }
    }
}
