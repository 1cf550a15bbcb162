//! Embeds a fresh eBPF object. The object is rebuilt (through the same code as
//! `cargo xtask build-ebpf`) whenever a source of `enforcer-ebpf` or
//! `enforcer-common` changes, so a stale object is never embedded silently.

include!("../xtask/src/ebpf.rs");

fn main() {
    let manifest = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest
        .parent()
        .expect("enforcer/ lives in the workspace root");
    for watched in [
        "enforcer-ebpf/src",
        "enforcer-ebpf/Cargo.toml",
        "enforcer-ebpf/.cargo/config.toml",
        "enforcer-common/src",
        "enforcer-common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let object = match build_ebpf(workspace) {
        Ok(object) => object,
        Err(message) => panic!("{message}"),
    };
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("enforcer.bpf.o");
    std::fs::copy(&object, &out)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), out.display()));
}
