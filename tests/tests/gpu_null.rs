//! On a node without an NVIDIA GPU (every test machine here), GPU fields are
//! `null` with the reason, and nothing fails because of it.

use enforcer_tests::{enforcer, run_enforcer, unique_name};

fn has_nvidia_driver() -> bool {
    std::path::Path::new("/dev/nvidiactl").exists()
}

fn gpu_command_without_nvml_prints_null_with_the_case_and_exits_1() {
    if has_nvidia_driver() {
        enforcer_tests::skip!("this node has an NVIDIA driver");
    }
    let out = run_enforcer(&["gpu", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("enforcer gpu --json printed invalid JSON ({e}):\n{text}"));
    assert!(v["gpu"].is_null(), "{text}");
    assert_eq!(v["case"], "no_library", "{text}");
    assert!(
        v["unavailable"]
            .as_str()
            .is_some_and(|r| r.contains("libnvidia-ml.so.1")),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    let prom = run_enforcer(&["gpu", "--prometheus"]);
    assert!(
        String::from_utf8_lossy(&prom.stdout)
            .contains("enforcer_gpu_available{case=\"no_library\"} 0"),
        "{prom:?}"
    );
}

fn run_with_a_gpu_cap_on_a_cpu_only_node_exits_0_with_gpu_null_and_a_reason() {
    if has_nvidia_driver() {
        enforcer_tests::skip!("this node has an NVIDIA driver");
    }
    let report = std::env::temp_dir().join(format!("{}.json", unique_name("gpu-null")));
    let out = enforcer()
        .args([
            "run",
            "--gpu-util-limit",
            "80%",
            "--gpu-memory-limit",
            "1GiB",
        ])
        .arg("--report")
        .arg(&report)
        .args(["--", "true"])
        .output()
        .expect("starting enforcer run");
    let text = std::fs::read_to_string(&report);
    let _ = std::fs::remove_file(&report);
    assert!(
        out.status.success(),
        "enforcer run --gpu-util-limit 80% -- true failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = text.expect("the report file");
    let r: serde_json::Value = serde_json::from_str(&text).expect("report JSON");
    assert!(r["gpu"].is_null(), "{text}");
    assert!(
        r["unavailable"]["gpu"]
            .as_str()
            .is_some_and(|s| s.contains("libnvidia-ml.so.1")),
        "the reason should name the missing library: {text}"
    );
    assert_eq!(r["reason"], "exited", "{text}");
}

enforcer_tests::root_tests!(
    gpu_command_without_nvml_prints_null_with_the_case_and_exits_1,
    run_with_a_gpu_cap_on_a_cpu_only_node_exits_0_with_gpu_null_and_a_reason,
);
