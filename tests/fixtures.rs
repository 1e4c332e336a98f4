//! End-to-end correctness of the CPU reference against the fixtures:
//! kiln's logits against the exact float64 forward pass (tight), and against
//! llama.cpp (top-1 where it is unambiguous, greedy continuations).

mod common;

use common::*;
use kiln::graph::Graph;
use kiln::model::gguf::Gguf;
use kiln::reference::Reference;

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
fn check_exact(m: &Loaded, fixture_name: &str) {
    let fx = fixture(fixture_name);
    for case in &fx.cases {
        let mut r = Reference::new(&m.bound, &m.gguf, 256).unwrap();
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
                mean <= 0.01 && max <= 0.05,
                "{fixture_name} {:?} pos {}: mean |diff| {mean:.4} (≤ 0.01), max {max:.4} (≤ 0.05)",
                case.prompt,
                row.pos
            );
            let s = kiln::session::summarize(row.pos, got, 16);
            assert!(
                (s.mean - row.mean).abs() < 0.01 && (s.std - row.std).abs() < 0.01,
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
fn check_llamacpp(m: &Loaded, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let mut all_diffs = Vec::new();
    let mut total_compared = 0;
    for case in &fx.cases {
        let mut r = Reference::new(&m.bound, &m.gguf, 256).unwrap();
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

#[test]
fn smollm2_matches_exact_reference() {
    let m = load(SMOLLM2, "llama.ron");
    check_exact(&m, "smollm2-135m-q4_1.exact.json");
}

#[test]
fn smollm2_agrees_with_llamacpp() {
    let m = load(SMOLLM2, "llama.ron");
    check_llamacpp(&m, "smollm2-135m-q4_1.llamacpp.json");
}

#[test]
fn gemma3_matches_exact_reference() {
    let m = load(GEMMA3, "gemma3.ron");
    check_exact(&m, "gemma3-270m-q4_k_m.exact.json");
}

#[test]
fn gemma3_agrees_with_llamacpp() {
    let m = load(GEMMA3, "gemma3.ron");
    check_llamacpp(&m, "gemma3-270m-q4_k_m.llamacpp.json");
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
