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

/// The count in `--verify-replay`'s "N tensors compared" (0 if absent).
fn tensors_compared(stdout: &str) -> usize {
    stdout
        .split(", ")
        .find_map(|p| p.strip_suffix(" tensors compared"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
    assert!(tensors_compared(&stdout) >= 16 * 30, "stdout: {stdout}");
}

/// A `kiln synth` model carries no vocabulary; the commands that never see
/// text (plan, kernels) still take it, so speed work can start from one.
#[test]
fn plan_and_kernels_take_a_model_without_a_vocabulary() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-synth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let model = dir.join("tiny.gguf");
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/specs/tiny-qwen2.json");
    let ok = |c: &mut Command, what: &str| -> String {
        let out = c.output().expect("the kiln binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what} failed: {err}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The stderr of a command that must fail.
    let fails = |c: &mut Command, what: &str| -> String {
        let out = c.output().expect("the kiln binary runs");
        assert!(!out.status.success(), "{what} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    ok(
        kiln().args(["synth", "--spec", spec, "--out"]).arg(&model),
        "synth",
    );
    // kiln with these arguments, on the synthetic model.
    let on_model = |args: &[&str]| -> Command {
        let mut c = kiln();
        c.args(args).arg("--model").arg(&model);
        c
    };
    // The vocabulary really is missing: run needs it and says so.
    let err = fails(
        &mut on_model(&["run", "-n", "1", "hi"]),
        "run without a vocabulary",
    );
    assert!(
        err.contains("no vocabulary") && err.contains("kiln bench"),
        "run on a model without a vocabulary: {err}"
    );
    // --verify-replay takes token ids instead of a prompt: the fused,
    // recorded decode equals a fresh unfused plan on the synthetic model.
    let replay = ok(
        &mut on_model(&["run", "--verify-replay", "4", "--tokens", "1,2,3"]),
        "run --tokens --verify-replay",
    );
    assert!(
        replay.contains("replay verified: 4 decode steps"),
        "run --verify-replay printed: {replay}"
    );
    assert!(
        tensors_compared(&replay) >= 4 * 4,
        "run --verify-replay printed: {replay}"
    );
    // --print-errors lists every comparison the count above made, each
    // with its error (within tolerance here).
    let listed = ok(
        &mut on_model(&[
            "run",
            "--verify-replay",
            "2",
            "--tokens",
            "1,2,3",
            "--print-errors",
        ]),
        "run --verify-replay --print-errors",
    );
    let errors: Vec<f64> = listed
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3 && w[0].parse::<usize>().is_ok())
                .then(|| w[2].parse::<f64>().expect("an error value"))
        })
        .collect();
    assert!(
        listed.starts_with("step  tensor") && !errors.is_empty(),
        "{listed}"
    );
    assert_eq!(errors.len(), tensors_compared(&listed), "{listed}");
    assert!(errors.iter().all(|e| (0.0..5e-2).contains(e)), "{listed}");
    // Knob pins (KILN_KNOBS) apply to the fused plan under test; the
    // unfused reference has no kernel roles to match them.
    let pinned = ok(
        on_model(&["run", "--verify-replay", "2", "--tokens", "1,2,3"])
            .env("KILN_KNOBS", "matmul_vec@rmsnorm+matmul2+unary_mul.WG=64"),
        "run --verify-replay with a role pin in KILN_KNOBS",
    );
    assert!(
        pinned.contains("replay verified: 2 decode steps"),
        "{pinned}"
    );
    let err = fails(
        &mut on_model(&["run", "--print-errors", "hi"]),
        "run --print-errors without --verify-replay",
    );
    assert!(
        err.contains("required arguments were not provided") && err.contains("--verify-replay"),
        "{err}"
    );
    // An id past the vocabulary is named, not a panic.
    let err = fails(
        &mut on_model(&["run", "--verify-replay", "2", "--tokens", "1,99999999"]),
        "run --tokens with an id past the vocabulary",
    );
    assert!(
        err.contains("99999999") && err.contains("out of range"),
        "run --tokens with an id past the vocabulary: {err}"
    );
    // bench --try: the default and a knob pin timed in turns, the pin
    // changing some decode kernels; a pin with an unlisted value is
    // refused, naming the values.
    let bench_try = |pin: &str| {
        on_model(&[
            "bench",
            "--decode",
            "2",
            "--prefill",
            "2",
            "--rounds",
            "2",
            "--try",
            pin,
        ])
    };
    let bench = ok(&mut bench_try("matmul_vec.WG=64"), "bench --try");
    // The words of the row of `out` that starts with `name`.
    let row = |out: &str, name: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no '{name}' row in: {out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    for name in ["(default)", "matmul_vec.WG=64"] {
        let r = row(&bench, name);
        // name, two rounds' tok/s, "best", the best...
        assert!(
            r.len() > 4 && r[1].parse::<f64>().is_ok_and(|x| x > 0.0) && r[3] == "best",
            "row {r:?} of: {bench}"
        );
    }
    let new_kernels = |r: Vec<String>| r[r.len() - 2].parse::<usize>().unwrap_or(0);
    assert_eq!(new_kernels(row(&bench, "(default)")), 0, "{bench}");
    let all = new_kernels(row(&bench, "matmul_vec.WG=64"));
    assert!(all > 0, "{bench}");
    // A pin scoped to one kernel role changes that role's kernels only.
    let role = "matmul_vec@rmsnorm+matmul2+unary_mul.WG=64";
    let scoped = ok(&mut bench_try(role), "bench --try with a role pin");
    let one = new_kernels(row(&scoped, role));
    assert!(one > 0 && one < all, "{one} of {all} new: {scoped}");
    let err = fails(
        &mut bench_try("matmul_vec@nosuch+role.WG=64"),
        "bench --try with a role no kernel has",
    );
    assert!(
        err.contains("matmul_vec@nosuch+role")
            && err.contains("matmul_vec@rmsnorm+matmul2+unary_mul"),
        "{err}"
    );
    let err = fails(&mut bench_try("qevery=2"), "bench --try qevery=2");
    assert!(err.contains("qevery is 0 or 1"), "{err}");
    let err = fails(
        &mut bench_try("matmul_vec.WG=7"),
        "bench --try with an unlisted value",
    );
    assert!(
        err.contains("WG=7") && err.contains("takes 32, 64"),
        "{err}"
    );
    // tune: a pin set that the planner takes, written to --out; (timings
    // on a CPU adapter are noise, so which pins win is not asserted).
    let pins_file = dir.join("pins.txt");
    let pins_arg = pins_file.to_string_lossy().to_string();
    let tuned = ok(
        &mut on_model(&["tune", "--decode", "2", "--rounds", "1", "--out", &pins_arg]),
        "tune",
    );
    assert!(
        tuned.contains("tuning ")
            && tuned.contains(" kernel roles")
            && tuned.contains("tuned pins: KILN_KNOBS="),
        "tune printed: {tuned}"
    );
    // Every role gets candidates timed (a row each, with its tok/s).
    assert!(
        tuned
            .lines()
            .filter(|l| l.contains(" tok/s against "))
            .count()
            >= 4,
        "tune printed: {tuned}"
    );
    let pins = std::fs::read_to_string(&pins_file).expect("tune --out writes the pins");
    ok(
        on_model(&["plan"]).env("KILN_KNOBS", pins.trim()),
        "plan with the tuned pins",
    );
    let err = fails(
        &mut on_model(&["tune", "--margin=-1"]),
        "tune with a negative margin",
    );
    assert!(err.contains("--margin"), "{err}");
    let plan = ok(&mut on_model(&["plan"]), "plan");
    assert!(plan.contains("decode plan (T = 1)"), "plan printed: {plan}");
    let kernels = ok(
        on_model(&["kernels"]).arg("--out").arg(dir.join("kernels")),
        "kernels",
    );
    assert!(
        kernels.lines().any(|l| l.ends_with(".wgsl")),
        "kernels printed: {kernels}"
    );
    // eval with token ids needs no vocabulary either: the GPU's logits
    // match the CPU reference's on the synthetic model.
    let eval = |backend: &str| -> serde_json::Value {
        let text = ok(
            &mut on_model(&[
                "eval",
                "--json",
                "--top",
                "3",
                "--tokens",
                "1,2,3,4",
                "--backend",
                backend,
            ]),
            "eval",
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("eval --json printed {text}: {e}"))
    };
    let (gpu, cpu) = (eval("gpu"), eval("cpu"));
    let rows = |v: &serde_json::Value| {
        v["cases"][0]["logits"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let (g, c) = (rows(&gpu), rows(&cpu));
    assert_eq!(g.len(), 4, "{gpu}");
    assert_eq!(c.len(), 4, "{cpu}");
    for (a, b) in g.iter().zip(&c) {
        let top = |r: &serde_json::Value, i: usize| r["top"][i][1].as_f64().unwrap_or(f64::NAN);
        for i in 0..3 {
            let (x, y) = (top(a, i), top(b, i));
            assert!(
                (x - y).abs() <= 1e-3 * (1.0 + y.abs()),
                "top {i} logit: GPU {x} vs CPU {y}\n{a}\n{b}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
