//! The `kiln` binary end to end: the GPU is the default backend and agrees
//! with the CPU oracle; a machine without any adapter gets a message that
//! names the fix, not a panic.

mod common;

use std::process::Command;

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("NODEVICE_SELECT", "1");
    c
}

#[test]
fn run_without_any_adapter_names_setup_and_does_not_panic() {
    let model = common::model_path(common::SMOLLM2);
    // Only Vulkan is searched, and the loader is pointed at no driver.
    let out = kiln()
        .args(["run", "-n", "2", "--model"])
        .arg(&model)
        .arg("hello")
        .env("WGPU_BACKEND", "vulkan")
        .env("VK_DRIVER_FILES", "/nonexistent/kiln-test-icd.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/kiln-test-icd.json")
        .env_remove("KILN_ADAPTER")
        .output()
        .expect("the kiln binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "kiln run succeeded without an adapter"
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("no GPU/Vulkan adapter"), "stderr: {err}");
    assert!(err.contains("tools/setup.sh"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

/// `kiln run` uses the GPU unless told otherwise, and its greedy tokens are
/// the CPU reference's.
#[test]
fn run_defaults_to_gpu_and_matches_the_cpu_oracle() {
    let model = common::model_path(common::SMOLLM2);
    let go = |extra: &[&str]| {
        let out = kiln()
            .args(["run", "-n", "8", "--model"])
            .arg(&model)
            .args(extra)
            .arg("The capital of France is")
            .output()
            .expect("the kiln binary runs");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "kiln run {extra:?} failed: {err}");
        (String::from_utf8_lossy(&out.stdout).to_string(), err)
    };
    let (gpu_text, gpu_err) = go(&[]);
    let (cpu_text, _) = go(&["--backend", "cpu"]);
    assert!(
        gpu_text.len() > "The capital of France is".len(),
        "no continuation: {gpu_text:?}"
    );
    assert_eq!(gpu_text, cpu_text, "GPU and CPU greedy runs differ");
    // The default run says which adapter it used.
    assert!(gpu_err.contains("kiln: GPU "), "stderr: {gpu_err}");
    assert!(gpu_err.contains("tok/s"), "stderr: {gpu_err}");
}

/// `--verify-replay 16`: the fused, recorded decode of SmolLM2 equals a
/// fresh unfused plan tensor by tensor over 16 steps.
#[test]
fn verify_replay_16_steps() {
    let model = common::model_path(common::SMOLLM2);
    let out = kiln()
        .args(["run", "--verify-replay", "16", "--model"])
        .arg(&model)
        .arg("The capital of France is")
        .output()
        .expect("the kiln binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(
        stdout.contains("replay verified: 16 decode steps"),
        "stdout: {stdout}"
    );
    // Every step compares the stored tensors (not zero of them).
    let compared: usize = stdout
        .split(", ")
        .find_map(|p| p.strip_suffix(" tensors compared"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(compared >= 16 * 30, "stdout: {stdout}");
}
