//! End-to-end correctness of the CPU reference against the fixtures:
//! kiln's logits against the exact float64 forward pass (tight), and against
//! llama.cpp (top-1 where it is unambiguous, greedy continuations).

mod common;

use common::*;
use kiln::exec::gpu::GpuBackend;
use kiln::exec::{FeatureRequest, GpuContext};
use kiln::graph::Graph;
use kiln::model::gguf::Gguf;
use kiln::plan::{FuseOptions, PASSES};
use kiln::reference::Reference;
use kiln::session::Backend;

/// Makes a fresh backend (empty KV cache) for each case.
type Make<'a> = dyn Fn() -> Box<dyn Backend + 'a> + 'a;

/// Tolerances against the exact reference: (mean, max) |diff| over its top 16.
const F32_TOL: (f64, f64) = (0.01, 0.05);
/// With f16 arithmetic the issue allows mean 0.1 and max 0.5.
const F16_TOL: (f64, f64) = (0.1, 0.5);

struct Loaded {
    gguf: Gguf,
    bound: kiln::graph::BoundGraph,
}

fn load(file: &str, graph: &str) -> Loaded {
    let gguf = Gguf::open(model_path(file)).expect("open model");
    let g = Graph::load(format!("{}/graphs/{graph}", env!("CARGO_MANIFEST_DIR"))).expect("graph");
    let bound = g.bind(&gguf).unwrap_or_else(|e| panic!("{e}"));
    Loaded { gguf, bound }
}

/// Against the exact reference: over its top 16 at every position,
/// mean |difference| ≤ 0.01 and max ≤ 0.05.
fn check_exact(make: &Make, fixture_name: &str, tol: (f64, f64)) {
    let fx = fixture(fixture_name);
    for case in &fx.cases {
        let mut r = make();
        let logits = r.forward(&case.prompt_ids, false).unwrap();
        assert_eq!(logits.rows(), case.prompt_ids.len());
        for row in &case.logits {
            let got = logits.row(row.pos);
            let diffs: Vec<f64> = row
                .top
                .iter()
                .map(|&(t, l)| (got[t as usize] as f64 - l).abs())
                .collect();
            let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
            let max = diffs.iter().cloned().fold(0.0, f64::max);
            assert!(
                mean <= tol.0 && max <= tol.1,
                "{fixture_name} {:?} pos {}: mean |diff| {mean:.4} (≤ {}), max {max:.4} (≤ {})",
                case.prompt,
                row.pos,
                tol.0,
                tol.1
            );
            let s = kiln::session::summarize(row.pos, got, 16);
            assert!(
                (s.mean - row.mean).abs() < tol.0 && (s.std - row.std).abs() < tol.0,
                "{fixture_name} {:?} pos {}: mean/std {}/{} vs {}/{}",
                case.prompt,
                row.pos,
                s.mean,
                s.std,
                row.mean,
                row.std
            );
        }
    }
}

/// Against llama.cpp: top-1 equal where its top two differ by > 0.5; over its
/// top 16 at all positions, mean |diff| ≤ 0.4 and max ≤ 1.5 (it quantizes
/// activations to 8 bits, see tests/fixtures/README.md: the exact reference
/// itself sits at 0.18-0.20 mean, 1.14 max); greedy continuation equal until
/// the first step whose top two (kiln's) are within 0.5.
fn check_llamacpp(make: &Make, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let mut all_diffs = Vec::new();
    let mut total_compared = 0;
    for case in &fx.cases {
        let mut r = make();
        let logits = r.forward(&case.prompt_ids, false).unwrap();
        for row in &case.logits {
            let got = logits.row(row.pos);
            let ours = kiln::session::summarize(row.pos, got, 2);
            if row.top[0].1 - row.top[1].1 > 0.5 {
                assert_eq!(
                    ours.top[0].0, row.top[0].0,
                    "{fixture_name} {:?} pos {}: top-1",
                    case.prompt, row.pos
                );
            }
            all_diffs.extend(
                row.top
                    .iter()
                    .map(|&(t, l)| (got[t as usize] as f64 - l).abs()),
            );
        }
        // Greedy continuation through the decode path (one token per step).
        let mut last = logits.row(logits.rows() - 1).to_vec();
        let mut compared = 0;
        for (step, &want) in case.greedy_ids.iter().enumerate() {
            let s = kiln::session::summarize(0, &last, 2);
            if s.top[0].1 - s.top[1].1 < 0.5 {
                break; // ambiguous: engines may legitimately differ from here on
            }
            assert_eq!(
                s.top[0].0, want,
                "{fixture_name} {:?}: greedy step {step}",
                case.prompt
            );
            compared += 1;
            last = r.forward(&[want], true).unwrap().data;
        }
        total_compared += compared;
        eprintln!(
            "{fixture_name} {:?}: {compared}/{} greedy tokens equal",
            case.prompt,
            case.greedy_ids.len()
        );
    }
    // Guard against a check that compares nothing.
    assert!(
        total_compared >= 8,
        "{fixture_name}: only {total_compared} unambiguous greedy steps compared"
    );
    let mean = all_diffs.iter().sum::<f64>() / all_diffs.len() as f64;
    let max = all_diffs.iter().cloned().fold(0.0, f64::max);
    eprintln!("{fixture_name}: mean |diff| {mean:.3}, max {max:.3} over llama.cpp's top 16");
    assert!(
        mean <= 0.4 && max <= 1.5,
        "{fixture_name}: mean |diff| {mean:.3} (≤ 0.4), max {max:.3} (≤ 1.5)"
    );
}

fn cpu<'a>(m: &'a Loaded) -> impl Fn() -> Box<dyn Backend + 'a> + 'a {
    move || Box::new(Reference::new(&m.bound, &m.gguf, 256).unwrap())
}

#[test]
fn smollm2_matches_exact_reference() {
    let m = load(SMOLLM2, "llama.ron");
    check_exact(&cpu(&m), "smollm2-135m-q4_1.exact.json", F32_TOL);
}

#[test]
fn smollm2_agrees_with_llamacpp() {
    let m = load(SMOLLM2, "llama.ron");
    check_llamacpp(&cpu(&m), "smollm2-135m-q4_1.llamacpp.json");
}

#[test]
fn gemma3_matches_exact_reference() {
    let m = load(GEMMA3, "gemma3.ron");
    check_exact(&cpu(&m), "gemma3-270m-q4_k_m.exact.json", F32_TOL);
}

#[test]
fn gemma3_agrees_with_llamacpp() {
    let m = load(GEMMA3, "gemma3.ron");
    check_llamacpp(&cpu(&m), "gemma3-270m-q4_k_m.llamacpp.json");
}

/// Both fixture checks on the GPU backend in one feature set.
fn gpu_checks(file: &str, graph: &str, stem: &str, req: FeatureRequest) {
    gpu_checks_with(file, graph, stem, req, &FuseOptions::default());
}

/// Both fixture checks on the GPU backend in one feature set, with the
/// fusion passes `opts` leaves on.
fn gpu_checks_with(file: &str, graph: &str, stem: &str, req: FeatureRequest, opts: &FuseOptions) {
    let m = load(file, graph);
    let ctx = GpuContext::with_features(req)
        .unwrap_or_else(|e| panic!("no GPU adapter ({e}); run tools/setup.sh (installs lavapipe)"));
    // Weights are uploaded once; each case gets a fresh KV cache by reset.
    let backend = std::cell::RefCell::new(
        GpuBackend::with_fusion(&ctx, &m.bound, &m.gguf, 256, false, opts).unwrap(),
    );
    struct Shared<'r, 'a>(&'r std::cell::RefCell<GpuBackend<'a>>);
    impl Backend for Shared<'_, '_> {
        fn forward(
            &mut self,
            t: &[u32],
            last: bool,
        ) -> kiln::error::Result<kiln::reference::Logits> {
            self.0.borrow_mut().forward(t, last)
        }
        fn reset(&mut self) {
            self.0.borrow_mut().reset()
        }
        fn n_ctx(&self) -> usize {
            self.0.borrow().n_ctx()
        }
    }
    let make = || -> Box<dyn Backend + '_> {
        backend.borrow_mut().reset();
        Box::new(Shared(&backend))
    };
    let tol = if ctx.features.f16 { F16_TOL } else { F32_TOL };
    check_exact(&make, &format!("{stem}.exact.json"), tol);
    check_llamacpp(&make, &format!("{stem}.llamacpp.json"));
}

#[test]
fn gpu_smollm2_every_feature_set() {
    for req in FeatureRequest::EVERY {
        gpu_checks(SMOLLM2, "llama.ron", "smollm2-135m-q4_1", req);
    }
}

/// Both fixture checks with each fusion pass off in turn (all features): a
/// pass that breaks a real model shows up here by name.
fn gpu_checks_each_pass_off(file: &str, graph: &str, stem: &str) {
    for pass in PASSES {
        eprintln!("{stem} on the GPU with --no-fuse {pass}");
        let opts = FuseOptions {
            disabled: vec![pass.to_string()],
            ..Default::default()
        };
        gpu_checks_with(file, graph, stem, FeatureRequest::EVERY[3], &opts);
    }
}

#[test]
fn gpu_smollm2_each_pass_off() {
    gpu_checks_each_pass_off(SMOLLM2, "llama.ron", "smollm2-135m-q4_1");
}

// Long suite (run with `--ignored`): Gemma 3 end to end takes 15-25 minutes
// on lavapipe and 2 cores for the four feature sets.
#[test]
#[ignore]
fn gpu_gemma3_every_feature_set() {
    for req in FeatureRequest::EVERY {
        gpu_checks(GEMMA3, "gemma3.ron", "gemma3-270m-q4_k_m", req);
    }
}

/// Long suite: Gemma 3 with each fusion pass off in turn.
#[test]
#[ignore]
fn gpu_gemma3_each_pass_off() {
    gpu_checks_each_pass_off(GEMMA3, "gemma3.ron", "gemma3-270m-q4_k_m");
}

/// Prefill of n tokens and n single-token decode steps give the same logits.
#[test]
fn prefill_equals_decode() {
    let m = load(SMOLLM2, "llama.ron");
    let ids = [504u32, 3575, 282, 4649, 314, 7042];
    let mut a = Reference::new(&m.bound, &m.gguf, 64).unwrap();
    let all = a.forward(&ids, false).unwrap();
    let mut b = Reference::new(&m.bound, &m.gguf, 64).unwrap();
    for (i, &t) in ids.iter().enumerate() {
        let one = b.forward(&[t], true).unwrap();
        let max = one
            .row(0)
            .iter()
            .zip(all.row(i))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(max < 1e-3, "position {i}: max diff {max}");
    }
}
