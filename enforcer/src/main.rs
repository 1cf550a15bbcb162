//! The `enforcer` binary: see `enforcer --help`.

fn main() -> std::process::ExitCode {
    enforcer::cli::main()
}
