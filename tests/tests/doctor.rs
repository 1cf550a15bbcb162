//! `enforcer doctor` against the real kernel.

use enforcer_tests::run_enforcer;

fn doctor_json_reports_mode_loads_ebpf_and_gpu_null_with_reason() {
    let out = run_enforcer(&["doctor", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("doctor --json printed invalid JSON ({e}):\n{text}"));
    eprintln!(
        "kernel {} cgroup mode {}",
        report["kernel_release"], report["cgroup"]["mode"]
    );
    let mode = report["cgroup"]["mode"].as_str().unwrap_or_default();
    assert!(
        mode == "unified" || mode == "hybrid",
        "unexpected cgroup mode in {text}"
    );
    if mode == "unified" {
        for c in ["cpu", "memory", "pids"] {
            assert_eq!(
                report["cgroup"]["controllers"][c]["usable"], true,
                "controller {c} not usable in unified mode: {text}"
            );
        }
    }
    assert!(
        report["ebpf"]["switches_seen"].as_u64().unwrap_or(0) > 0,
        "the embedded eBPF object did not load/attach/count: {text}"
    );
    // No GPU on the test machines: the GPU field is null with a reason.
    if report["gpu"].is_null() {
        assert!(
            report["gpu_unavailable"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
    }
    assert!(
        out.status.success(),
        "doctor failed on a capable node:\n{text}"
    );
}

enforcer_tests::root_tests!(doctor_json_reports_mode_loads_ebpf_and_gpu_null_with_reason,);
