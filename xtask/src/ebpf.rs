// Builds the eBPF object. This file is also `include!`d by `enforcer/build.rs`,
// so `cargo xtask build-ebpf` and `cargo build -p enforcer` run exactly the
// same build and can never disagree about what is embedded. It therefore uses
// `std` alone.

/// Where the eBPF object lands, relative to the workspace root.
pub const EBPF_OBJECT: &str = "target/ebpf/bpfel-unknown-none/release/enforcer";

/// Builds `enforcer-ebpf` with the nightly toolchain into `target/ebpf` and
/// returns the object's path. Cargo's own fingerprinting makes this a no-op
/// when nothing changed, so the object is fresh whenever this returns `Ok`.
pub fn build_ebpf(workspace: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let crate_dir = workspace.join("enforcer-ebpf");
    let target_dir = workspace.join("target/ebpf");
    let mut cmd = std::process::Command::new("cargo");
    // The outer cargo (stable) exports variables that would leak into the
    // nested nightly build and make it use the wrong compiler or flags.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let leaks = key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
            || key == "RUSTDOC";
        if leaks && key != "CARGO_HOME" {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(&crate_dir)
        .args(["+nightly", "build", "--release", "--target-dir"])
        .arg(&target_dir);
    let status = cmd.status().map_err(|e| {
        format!(
            "could not run `cargo +nightly build` in {}: {e} (run scripts/setup)",
            crate_dir.display()
        )
    })?;
    if !status.success() {
        return Err(format!(
            "building the eBPF programs in {} failed ({status}); the nightly toolchain with \
             rust-src and bpf-linker are needed: run scripts/setup",
            crate_dir.display()
        ));
    }
    let object = workspace.join(EBPF_OBJECT);
    if !object.is_file() {
        return Err(format!(
            "the eBPF build did not produce {}",
            object.display()
        ));
    }
    Ok(object)
}
