//! Plans of the real models: kernels chosen per feature set (snapshotted as
//! generated WGSL, for review as diffs), weight splitting at the binding limit.

mod common;

use common::*;
use kiln::codegen::Caps;
use kiln::graph::Graph;
use kiln::model::gguf::Gguf;
use kiln::plan::{kernel_sources, kernel_sources_with, plan, Bucket, FuseOptions};

/// lavapipe's limits: 128 MiB per storage binding, 32 KiB workgroup storage.
const MAX_BINDING: u64 = 128 << 20;

fn bound(file: &str, graph: &str) -> (Gguf, kiln::graph::BoundGraph) {
    let gguf = Gguf::open(model_path(file)).unwrap();
    let g = Graph::load(format!("{}/graphs/{graph}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let b = g.bind(&gguf).unwrap();
    (gguf, b)
}

fn snapshot(name: &str, file: &str, graph: &str) {
    let (_g, b) = bound(file, graph);
    let sets = Caps::feature_sets(1024, 32 << 10);
    for (label, caps) in [("none", sets[0]), ("all", sets[3])] {
        let kernels = kernel_sources(&b, caps, MAX_BINDING).unwrap();
        let mut text = String::new();
        for (f, src) in &kernels {
            text.push_str(&format!("==== {f}\n{src}\n"));
        }
        insta::assert_snapshot!(format!("{name}_{label}"), text);
    }
}

/// The int8-input kernels (quantize_rows, matmul_vec XQ=1), as SmolLM2's
/// decode plan gets them with every row treated as too long to stage.
#[test]
fn int8_input_kernels_snapshot() {
    let (_g, b) = bound(SMOLLM2, "llama.ron");
    let caps = Caps::feature_sets(1024, 32 << 10)[3];
    let opts = FuseOptions {
        stage_up_to_k: Some(0),
        quantize_every_dtype: true,
        ..Default::default()
    };
    let kernels = kernel_sources_with(&b, caps, MAX_BINDING, &opts).unwrap();
    let mut text = String::new();
    for (f, src) in &kernels {
        if f.starts_with("quantize_rows") || f.contains(".xq1.") {
            text.push_str(&format!("==== {f}\n{src}\n"));
        }
    }
    assert!(text.contains("quantize_rows") && text.contains("dot4I8Packed"));
    insta::assert_snapshot!("smollm2_int8_inputs", text);
}

#[test]
fn smollm2_kernels_snapshot() {
    snapshot("smollm2", SMOLLM2, "llama.ron");
}

#[test]
fn gemma3_kernels_snapshot() {
    snapshot("gemma3", GEMMA3, "gemma3.ron");
}

/// Gemma 3's Q8_0 token embedding (178 MB) is larger than lavapipe's binding
/// limit: it is split by rows into chunks that each fit.
#[test]
fn large_weights_are_split_by_rows() {
    let (gguf, b) = bound(GEMMA3, "gemma3.ron");
    let caps = Caps::feature_sets(1024, 32 << 10)[0];
    let p = plan(&b, Bucket::One, caps, MAX_BINDING).unwrap();
    let (i, w) = b
        .weights
        .iter()
        .enumerate()
        .max_by_key(|(_, w)| gguf.tensor(&w.name).unwrap().size)
        .unwrap();
    let size = gguf.tensor(&w.name).unwrap().size;
    assert!(size > MAX_BINDING, "{} is {size} bytes", w.name);
    let wp = &p.weights[i];
    assert!(wp.chunks.len() >= 2);
    let rows: usize = wp.chunks.iter().map(|c| c.1).sum();
    assert_eq!(rows, w.dims[1]);
    for &(first, n) in &wp.chunks {
        assert!(
            (n * wp.row_bytes) as u64 <= MAX_BINDING,
            "chunk at row {first}"
        );
    }
}

/// Decode of both real models: at most 5 dispatches per layer plus 3
/// (issue 4), and every pass off at once gives the unfused count back.
#[test]
fn fused_decode_dispatches_per_layer() {
    for (file, graph) in [(SMOLLM2, "llama.ron"), (GEMMA3, "gemma3.ron")] {
        let (_g, b) = bound(file, graph);
        let layers = b.param("n_layer").unwrap() as usize;
        // H100-like limits: no weight is split.
        let caps = Caps::feature_sets(1024, 48 << 10)[3];
        let p = plan(&b, Bucket::One, caps, 2 << 30).unwrap();
        assert!(
            p.dispatches() <= 5 * layers + 3,
            "{file}: {} dispatches for {layers} layers",
            p.dispatches()
        );
        let unfused = kiln::plan::plan_with(
            &b,
            Bucket::One,
            caps,
            2 << 30,
            &kiln::plan::FuseOptions::none(),
        )
        .unwrap();
        assert!(unfused.dispatches() > 2 * p.dispatches(), "{file}");
    }
}

/// The liveness allocator on the real plans (decode and a 512-token
/// prefill): no two values alive at once overlap, and the arena peak is
/// within 5% of the lower bound (computed independently by alloc).
#[test]
fn arena_peak_near_lower_bound() {
    for (file, graph) in [(SMOLLM2, "llama.ron"), (GEMMA3, "gemma3.ron")] {
        let (_g, b) = bound(file, graph);
        let caps = Caps::feature_sets(1024, 32 << 10)[3];
        for (bucket, t) in [(Bucket::One, 1), (Bucket::Many, 512)] {
            // H100 binding limit: Gemma's 512 rows of logits are 512 MiB.
            let max = 2u64 << 30;
            let p = plan(&b, bucket, caps, max).unwrap();
            let (_, iv, l) = kiln::plan::report::layout(&b, &p, t, 256, max).unwrap();
            kiln::alloc::check(&iv, 256, &l).unwrap_or_else(|e| panic!("{file} T={t}: {e}"));
            assert_eq!(l.lower_bound, kiln::alloc::lower_bound(&iv, 256));
            assert!(
                (l.peak as f64) <= 1.05 * l.lower_bound as f64,
                "{file} T={t}: peak {} vs lower bound {}",
                l.peak,
                l.lower_bound
            );
            assert!(l.peak < l.naive, "{file} T={t}: no reuse");
        }
    }
}

/// A recorded stream round-trips through its file format, and a stream for
/// another model or a damaged one is refused with the fix.
#[test]
fn stream_files_round_trip_and_are_checked() {
    use kiln::plan::stream;
    let (_g, b) = bound(SMOLLM2, "llama.ron");
    let caps = Caps::feature_sets(1024, 32 << 10)[3];
    let plans = vec![
        plan(&b, Bucket::One, caps, MAX_BINDING).unwrap(),
        plan(&b, Bucket::Many, caps, MAX_BINDING).unwrap(),
    ];
    let text = stream::to_json(&b, &plans).unwrap();
    let back = stream::from_json(&b, &text).unwrap();
    for (a, c) in plans.iter().zip(&back) {
        assert_eq!(a.launches, c.launches);
        assert_eq!(a.kernels, c.kernels);
        assert_eq!(a.made, c.made);
    }
    let (_g2, other) = bound(GEMMA3, "gemma3.ron");
    let e = stream::from_json(&other, &text).unwrap_err().to_string();
    assert!(
        e.contains("another model") && e.contains("--stream-out"),
        "{e}"
    );
    let damaged = text.replacen("\"kernel\":0,", "\"kernel\":99999,", 1);
    assert_ne!(damaged, text);
    let e = stream::from_json(&b, &damaged).unwrap_err().to_string();
    assert!(e.contains("damaged stream"), "{e}");
    let e = stream::from_json(&b, "{}").unwrap_err().to_string();
    assert!(e.contains("not a kiln stream"), "{e}");
    // Recorded by a kiln with other kernel templates (or before streams
    // named them): refused by name, not when a kernel fails to build.
    let hash = kiln::codegen::sources_hash();
    let stale = text.replacen(
        &format!("\"kernels\":\"{hash}\""),
        "\"kernels\":\"0123456789abcdef\"",
        1,
    );
    assert_ne!(stale, text);
    let old = text.replacen(&format!(",\"kernels\":\"{hash}\""), "", 1);
    assert_ne!(old, text);
    for t in [stale, old] {
        let e = stream::from_json(&b, &t).unwrap_err().to_string();
        assert!(
            e.contains("other kernel templates") && e.contains("--stream-out"),
            "{e}"
        );
    }
}
