//! `cargo xtask check-deploy`: the deploy files hold up against the tools
//! that will read them on a node, before any node does.
//!
//! - `deploy/enforcer.service`: `systemd-analyze verify`, with `ExecStart`
//!   pointed at the freshly built binary (verify refuses a unit whose binary
//!   is missing), and any warning counts as a failure (verify exits 0 on
//!   unknown keys and bad values);
//! - `deploy/daemonset.yaml`: the Kubernetes schemas, strictly (unknown
//!   fields fail), through `kubernetes-validate` from the venv that
//!   `scripts/setup` makes;
//! - `deploy/enforcer.toml` and the config in the DaemonSet's ConfigMap:
//!   `enforcer config check`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};

/// The venv `scripts/setup` installs `kubernetes-validate` into.
pub const VENV: &str = "deploy-venv";
/// Kubernetes releases the DaemonSet must be valid for: the oldest still
/// common on clusters and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29", "1.37"];
/// `ExecStart` of the shipped unit, replaced by the built binary for verify.
const INSTALLED_BINARY: &str = "/usr/local/bin/enforcer";

pub fn run(root: &Path) -> Result<()> {
    let binary = build_enforcer(root)?;
    let deploy = root.join("deploy");

    verify_unit(&deploy.join("enforcer.service"), &binary)?;
    eprintln!("ok: deploy/enforcer.service (systemd-analyze verify)");

    let venv = cache_dir(root).join(VENV);
    validate_kubernetes(&deploy.join("daemonset.yaml"), &venv)?;
    eprintln!("ok: deploy/daemonset.yaml (Kubernetes {KUBERNETES_VERSIONS:?} schemas, strict)");

    check_config(&binary, &deploy.join("enforcer.toml"))?;
    let scratch = tempdir("configmap")?;
    let from_map = scratch.join("enforcer.toml");
    fs::write(
        &from_map,
        configmap_config(&deploy.join("daemonset.yaml"), &venv)?,
    )?;
    check_config(&binary, &from_map).context("the config in deploy/daemonset.yaml's ConfigMap")?;
    let _ = fs::remove_dir_all(&scratch);
    eprintln!("ok: deploy/enforcer.toml and the ConfigMap's enforcer.toml (enforcer config check)");
    Ok(())
}

fn cache_dir(root: &Path) -> PathBuf {
    std::env::var_os("ENFORCER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache"))
}

fn build_enforcer(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "-p", "enforcer", "--bin", "enforcer"])
        .status()
        .with_context(|| format!("running {cargo} build -p enforcer"))?;
    if !status.success() {
        bail!("cargo build -p enforcer: {status}");
    }
    Ok(root.join("target/debug/enforcer"))
}

/// Runs `systemd-analyze verify` on a copy of `unit` whose `ExecStart` runs
/// `binary`. Fails on a non-zero exit and on any diagnostic.
pub fn verify_unit(unit: &Path, binary: &Path) -> Result<()> {
    let text = fs::read_to_string(unit).with_context(|| format!("reading {}", unit.display()))?;
    if !text.contains(&format!("ExecStart={INSTALLED_BINARY} ")) {
        bail!(
            "{}: ExecStart does not run {INSTALLED_BINARY}",
            unit.display()
        );
    }
    let binary = binary
        .canonicalize()
        .with_context(|| format!("{} (build it first)", binary.display()))?;
    let dir = tempdir("unit")?;
    let copy = dir.join(unit.file_name().context("unit path has no file name")?);
    let text = text.replace(
        &format!("ExecStart={INSTALLED_BINARY} "),
        &format!("ExecStart={} ", binary.display()),
    );
    fs::write(&copy, text).with_context(|| format!("writing {}", copy.display()))?;
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output();
    let _ = fs::remove_dir_all(&dir);
    let output =
        output.context("running systemd-analyze (Debian package systemd; run scripts/setup)")?;
    clean(&output, "systemd-analyze verify", unit)
}

/// Validates every document of `manifest` against the Kubernetes schemas.
pub fn validate_kubernetes(manifest: &Path, venv: &Path) -> Result<()> {
    let validator = venv.join("bin/kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(&validator)
            .args(["--strict", "--quiet", "-k", version])
            .arg(manifest)
            .output()
            .with_context(|| format!("running {} (run scripts/setup)", validator.display()))?;
        clean(
            &output,
            &format!("kubernetes-validate -k {version}"),
            manifest,
        )?;
    }
    Ok(())
}

/// The `enforcer.toml` key of the ConfigMap in `manifest`, read with the
/// venv's PyYAML (the validator's own dependency).
fn configmap_config(manifest: &Path, venv: &Path) -> Result<String> {
    const SCRIPT: &str = r#"
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "ConfigMap" and "enforcer.toml" in doc.get("data", {}):
        sys.stdout.write(doc["data"]["enforcer.toml"])
        sys.exit(0)
sys.exit("no ConfigMap with an enforcer.toml key")
"#;
    let output = Command::new(venv.join("bin/python"))
        .args(["-c", SCRIPT])
        .arg(manifest)
        .output()
        .context("running the venv's python (run scripts/setup)")?;
    if !output.status.success() {
        bail!(
            "{}: {}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("the ConfigMap's enforcer.toml is not UTF-8")
}

fn check_config(binary: &Path, config: &Path) -> Result<()> {
    let output = Command::new(binary)
        .args(["config", "check"])
        .arg(config)
        .output()
        .with_context(|| format!("running {} config check", binary.display()))?;
    if !output.status.success() {
        bail!(
            "enforcer config check {}: {}{}",
            config.display(),
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A checker that exits 0 but says something has found a problem it does
/// not count as fatal (an unknown key, an invalid value): fail on it too.
fn clean(output: &Output, what: &str, file: &Path) -> Result<()> {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || !said.trim().is_empty() {
        bail!(
            "{what} {} ({}):\n{}",
            file.display(),
            output.status,
            said.trim_end()
        );
    }
    Ok(())
}

fn tempdir(what: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("xtask-deploy-{what}-{}-{n}", std::process::id()));
    // A leftover of a killed run with the same pid is not ours to trust.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        crate::workspace_root()
    }

    fn have_systemd_analyze() -> bool {
        let found = Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            eprintln!("SKIP: systemd-analyze not installed (Debian package systemd)");
        }
        found
    }

    /// The check is only worth something if verify's warnings fail it:
    /// `systemd-analyze verify` itself exits 0 on an unknown key.
    #[test]
    fn unit_check_fails_on_a_key_systemd_ignores() {
        if !have_systemd_analyze() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("enforcer.service");
        let shipped = fs::read_to_string(root().join("deploy/enforcer.service")).unwrap();
        fs::write(
            &unit,
            shipped.replace("Delegate=yes", "Delegate=yes\nDelegateTypo=yes"),
        )
        .unwrap();
        // Any existing executable will do for ExecStart here.
        let err = verify_unit(&unit, Path::new("/bin/sh")).unwrap_err();
        assert!(format!("{err:#}").contains("DelegateTypo"), "{err:#}");
    }

    #[test]
    fn shipped_unit_passes_verify() {
        if !have_systemd_analyze() {
            return;
        }
        verify_unit(
            &root().join("deploy/enforcer.service"),
            Path::new("/bin/sh"),
        )
        .unwrap();
    }
}
