//! `cargo xtask dist`: the bundle a Debian node is installed from, in
//! `target/dist/`: the release binary, shell completions and man pages
//! generated from the `enforcer` clap definitions, the deploy files, and an
//! `install.sh` that puts each where the node expects it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory};
use clap_complete::Shell;

/// Where `install.sh` puts each part of the bundle (relative to `$DESTDIR`).
pub const BIN_DIR: &str = "/usr/local/bin";
pub const MAN_DIR: &str = "/usr/share/man/man1";
pub const BASH_DIR: &str = "/usr/share/bash-completion/completions";
pub const ZSH_DIR: &str = "/usr/share/zsh/vendor-completions";
pub const FISH_DIR: &str = "/usr/share/fish/vendor_completions.d";
pub const UNIT_DIR: &str = "/etc/systemd/system";
pub const CONFIG_DIR: &str = "/etc/enforcer";

#[derive(Debug, Args)]
pub struct DistArgs {
    /// Output directory (default: target/dist in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only generate completions, man pages, deploy files and install.sh;
    /// do not build or copy the release binary.
    #[arg(long)]
    no_binary: bool,
}

pub fn run(root: &Path, args: &DistArgs) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| root.join("target/dist"));
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    generate(&out)?;
    copy_deploy(root, &out)?;
    if !args.no_binary {
        let binary = build_release(root)?;
        copy(&binary, &out.join("bin/enforcer"))?;
    }
    eprintln!(
        "dist bundle in {}; install with {}/install.sh",
        out.display(),
        out.display()
    );
    Ok(())
}

/// Completions for bash, zsh and fish, and one man page for `enforcer` and
/// one per subcommand (`enforcer-run.1`, ...), as `man` and `git` do.
pub fn generate(out: &Path) -> Result<()> {
    let mut cmd = enforcer::cli::Cli::command();
    cmd.build();

    let completions = out.join("completions");
    mkdir(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd.clone(), "enforcer", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
        non_trivial(&path)?;
    }

    let man = out.join("man");
    mkdir(&man)?;
    write_man(&cmd, "enforcer", &man)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("enforcer-{}", sub.get_name());
        // The page's NAME and SYNOPSIS say `enforcer-run`, as git's pages do.
        let sub = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("enforcer {}", sub.get_name()));
        write_man(&sub, &name, &man)?;
    }

    fs::write(out.join("install.sh"), install_script())
        .with_context(|| format!("writing {}/install.sh", out.display()))?;
    set_mode(&out.join("install.sh"), 0o755)?;
    Ok(())
}

fn write_man(cmd: &clap::Command, name: &str, dir: &Path) -> Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    non_trivial(&path)
}

/// A generated file that came out empty or nearly so means the clap
/// definitions were not seen; fail here rather than ship it.
fn non_trivial(path: &Path) -> Result<()> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len < 200 {
        bail!("{} is only {len} bytes", path.display());
    }
    Ok(())
}

fn copy_deploy(root: &Path, out: &Path) -> Result<()> {
    for file in ["enforcer.service", "enforcer.toml", "daemonset.yaml"] {
        copy(
            &root.join("deploy").join(file),
            &out.join("deploy").join(file),
        )?;
    }
    Ok(())
}

fn build_release(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "enforcer", "--bin", "enforcer"])
        .status()
        .with_context(|| format!("running {cargo} build --release -p enforcer"))?;
    if !status.success() {
        bail!("cargo build --release -p enforcer: {status}");
    }
    Ok(root.join("target/release/enforcer"))
}

/// The installer: `install -D` lines into `$DESTDIR` (default /), so it can
/// also stage a package root. The config is installed only when none is
/// there, never over an operator's edits.
fn install_script() -> String {
    format!(
        r#"#!/bin/sh
# Installs the enforcer bundle this script is part of (made by
# `cargo xtask dist`) on a Debian node. Run as root; DESTDIR=/some/root
# stages the same layout elsewhere. Then:
#   systemctl daemon-reload && systemctl enable --now enforcer
set -eu
here=$(cd "$(dirname "$0")" && pwd)
d=${{DESTDIR:-}}
if [ -f "$here/bin/enforcer" ]; then
    install -D -m 0755 "$here/bin/enforcer" "$d{BIN_DIR}/enforcer"
else
    echo "install.sh: no bin/enforcer in $here (bundle made with --no-binary)" >&2
fi
for page in "$here"/man/*.1; do
    install -D -m 0644 "$page" "$d{MAN_DIR}/$(basename "$page")"
done
install -D -m 0644 "$here/completions/enforcer.bash" "$d{BASH_DIR}/enforcer"
install -D -m 0644 "$here/completions/_enforcer" "$d{ZSH_DIR}/_enforcer"
install -D -m 0644 "$here/completions/enforcer.fish" "$d{FISH_DIR}/enforcer.fish"
install -D -m 0644 "$here/deploy/enforcer.service" "$d{UNIT_DIR}/enforcer.service"
if [ ! -e "$d{CONFIG_DIR}/enforcer.toml" ]; then
    install -D -m 0644 "$here/deploy/enforcer.toml" "$d{CONFIG_DIR}/enforcer.toml"
else
    echo "install.sh: keeping the existing $d{CONFIG_DIR}/enforcer.toml"
fi
echo "installed; now: systemctl daemon-reload && systemctl enable --now enforcer"
"#
    )
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        mkdir(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn completions_and_man_pages_know_the_flags_of_run() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        // fish names long flags `-l memory`, the others `--memory`.
        for (file, memory) in [
            ("enforcer.bash", "--memory"),
            ("_enforcer", "--memory"),
            ("enforcer.fish", "-l memory"),
        ] {
            let text = read(&dir.path().join("completions").join(file));
            assert!(text.contains(memory), "{file} lacks {memory}");
        }
        let main = read(&dir.path().join("man/enforcer.1"));
        assert!(
            main.contains("enforcer\\-run"),
            "enforcer.1 does not list run"
        );
        let run = read(&dir.path().join("man/enforcer-run.1"));
        assert!(
            run.contains("\\-\\-memory"),
            "enforcer-run.1 lacks --memory"
        );
        assert!(run.contains("enforcer run"), "enforcer-run.1 synopsis");
        let script = read(&dir.path().join("install.sh"));
        assert!(script.contains("install -D -m 0644 \"$here/deploy/enforcer.service\""));
    }
}
