//! Synthetic models (`kiln synth`): dtype mixes, the 8B-class specs in
//! tools/specs, and graphs/qwen2.ron run end to end on a tiny qwen2-shaped
//! model (tests/specs/tiny-qwen2.json) on the CPU reference and the GPU.

use std::path::PathBuf;

use kiln::exec::gpu::GpuBackend;
use kiln::exec::{FeatureRequest, GpuContext};
use kiln::graph::{BoundGraph, Graph};
use kiln::model::gguf::Gguf;
use kiln::model::synth::{self, Spec};
use kiln::reference::{Logits, Reference};
use kiln::session::Backend;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn spec(path: &str) -> Spec {
    let p = root().join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn tiny() -> Spec {
    spec("tests/specs/tiny-qwen2.json")
}

/// Write `spec` with random weights and read it back.
fn gguf(spec: &Spec, seed: u64) -> Gguf {
    Gguf::from_bytes(synth::write(spec, seed).expect("synth write")).expect("synth GGUF parses")
}

fn bind(g: &Gguf, graph: &str) -> BoundGraph {
    Graph::load(root().join("graphs").join(graph))
        .expect("graph")
        .bind(g)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (f64::from(*x) - f64::from(*y)).powi(2);
        den += f64::from(*y).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// The dtype of every tensor in a written model, by name.
fn dtypes(g: &Gguf) -> Vec<(String, String, usize)> {
    g.tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype.to_string(), t.dims.len()))
        .collect()
}

/// K-quant blocks with mins get a real quantizer's centered weights:
/// random 6-bit mins made every weight of a sub-block lean the same way,
/// and the 8B Q4_K_M synth's activations overflowed (docs/PERF.md, stop 22).
#[test]
fn synth_k_quant_weights_are_centered() {
    use kiln::model::dtype::DType;
    for dt in [DType::Q4_K, DType::Q5_K] {
        let n = 256 * 512;
        let mut rng = 7u64;
        let bytes = synth::random_data(dt, n as u64, 0.0, &mut rng).unwrap();
        let w = kiln::model::dequant::dequantize(dt, &bytes, n).unwrap();
        let mean = w.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let rms = (w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(
            rms > 1e-4 && mean.abs() < 0.05 * rms,
            "{dt}: mean {mean} against rms {rms}"
        );
    }
}

#[test]
fn builtin_mixes_set_every_matrix() {
    let s = tiny();
    for (mix, want) in [("q4_0", "Q4_0"), ("q8_0", "Q8_0"), ("f16", "F16")] {
        let g = gguf(&s.with_mix(mix).unwrap(), 3);
        assert_eq!(g.tensors.len(), s.tensors.len());
        for (name, dt, rank) in dtypes(&g) {
            let expect = if rank >= 2 { want } else { "F32" };
            assert_eq!(dt, expect, "mix {mix}: {name}");
        }
        let ft = g.meta("general.file_type").and_then(|v| v.as_f64());
        let expect = match mix {
            "q4_0" => 2.0,
            "q8_0" => 7.0,
            _ => 1.0,
        };
        assert_eq!(ft, Some(expect), "mix {mix}: general.file_type");
    }
    // as-is keeps the spec's dtypes.
    let g = gguf(&s.with_mix("as-is").unwrap(), 3);
    for ((name, dt, _), (n2, d2, _)) in dtypes(&g).into_iter().zip(&s.tensors) {
        assert_eq!((&name, &dt), (n2, d2));
    }
}

#[test]
fn spec_mix_rules_first_match_wins() {
    let s = tiny();
    let g = gguf(&s.with_mix("mixed").unwrap(), 5);
    // Rules: blk.0.* Q8_0; *.attn_{k,v}.weight F16; output.weight F32; * Q4_0.
    for (name, dt, rank) in dtypes(&g) {
        let expect = if rank < 2 {
            "F32"
        } else if name.starts_with("blk.0.") {
            "Q8_0"
        } else if name.ends_with(".attn_k.weight") || name.ends_with(".attn_v.weight") {
            "F16"
        } else if name == "output.weight" {
            "F32"
        } else {
            "Q4_0"
        };
        assert_eq!(dt, expect, "{name}");
    }
    // The spec's mix is listed beside the built-in ones.
    assert_eq!(s.mix_names(), ["as-is", "q4_0", "q8_0", "f16", "mixed"]);
}

#[test]
fn bad_mixes_are_clear_errors() {
    let s = tiny();
    let e = s.with_mix("q4_k_s").unwrap_err().to_string();
    assert!(
        e.contains("unknown mix 'q4_k_s'") && e.contains("as-is, q4_0, q8_0, f16, mixed"),
        "{e}"
    );
    // Rows of 64 are not whole Q4_K blocks (256): the error names the tensor.
    let mut bad = s.clone();
    bad.mixes
        .insert("k".into(), vec![("*".into(), "Q4_K".into())]);
    let e = bad.with_mix("k").unwrap_err().to_string();
    assert!(
        e.contains("'token_embd.weight'")
            && e.contains("256-element blocks")
            && e.contains("mix 'k'"),
        "{e}"
    );
    for (glob, dt, want) in [
        ("*", "Q9_9", "unknown dtype Q9_9"),
        ("blk.{0,1.attn_q.weight", "Q8_0", "'{' without '}'"),
        ("*", "Q4_K_M", "unknown dtype"),
    ] {
        let mut bad = s.clone();
        bad.mixes.insert("x".into(), vec![(glob.into(), dt.into())]);
        let e = bad.with_mix("x").unwrap_err().to_string();
        assert!(
            e.contains("mix 'x'") && e.contains(want),
            "{glob} {dt}: {e}"
        );
    }
    // A spec tensor (as-is) that is not whole blocks, named when writing.
    let mut bad = s.clone();
    bad.tensors[0].2 = vec![48, 256];
    let e = synth::write(&bad, 1).unwrap_err().to_string();
    assert!(
        e.contains("'token_embd.weight'") && e.contains("32-element blocks"),
        "{e}"
    );
}

/// The hand-written 8B-class specs: their tensor lists are their own q4_k_m
/// rules (llama.cpp's Q4_K_M counts), and every built-in mix applies.
#[test]
fn real_arch_specs_are_consistent() {
    for (path, n_layer, counts) in [
        ("tools/specs/llama3-8b.json", 32, [65, 193, 33]),
        ("tools/specs/qwen2.5-7b.json", 28, [141, 169, 29]),
    ] {
        let s = spec(path);
        let mixed = s.with_mix("q4_k_m").unwrap();
        assert_eq!(
            mixed.tensors, s.tensors,
            "{path}: the list is not its q4_k_m mix"
        );
        let count = |d: &str| s.tensors.iter().filter(|t| t.1 == d).count();
        assert_eq!(
            [count("F32"), count("Q4_K"), count("Q6_K")],
            counts,
            "{path}"
        );
        let blocks = s
            .tensors
            .iter()
            .filter(|t| t.0.ends_with(".attn_norm.weight"));
        assert_eq!(blocks.count(), n_layer, "{path}");
        for mix in ["q4_0", "q8_0", "f16"] {
            s.with_mix(mix)
                .unwrap_or_else(|e| panic!("{path} {mix}: {e}"));
        }
        s.check().unwrap();
    }
}

/// graphs/qwen2.ron on the tiny model: finite logits that depend on the
/// input, and the tied-output fallback.
#[test]
fn qwen2_graph_runs_on_cpu() {
    let g = gguf(&tiny(), 11);
    let bound = bind(&g, "qwen2.ron");
    let mut r = Reference::new(&bound, &g, 64).unwrap();
    let a = r.forward(&[1, 2, 3, 4], false).unwrap();
    r.reset();
    let b = r.forward(&[1, 2, 3, 200], false).unwrap();
    assert_eq!((a.rows(), a.vocab), (4, 256));
    assert!(a.data.iter().chain(&b.data).all(|x| x.is_finite()));
    // Same prefix, same logits; a different last token changes the last row.
    assert!(rel_l2(b.row(2), a.row(2)) < 1e-6);
    assert!(
        rel_l2(b.row(3), a.row(3)) > 1e-3,
        "logits do not depend on the input"
    );
    // Without output.weight the graph falls back to the embedding.
    let mut tied = tiny();
    tied.tensors.retain(|t| t.0 != "output.weight");
    let g = gguf(&tied, 11);
    let bound = bind(&g, "qwen2.ron");
    let mut r = Reference::new(&bound, &g, 64).unwrap();
    let l = r.forward(&[5, 6], true).unwrap();
    assert!(l.data.iter().all(|x| x.is_finite()));
}

/// The prompt and the decode steps after it of the GPU-against-CPU tests.
const PROMPT: [u32; 5] = [7, 1, 250, 33, 90];
const DECODE: [u32; 3] = [12, 128, 3];

/// The CPU reference's logits for PROMPT and then each DECODE step.
fn cpu_logits(bound: &BoundGraph, g: &Gguf) -> (Logits, Vec<Logits>) {
    let mut cpu = Reference::new(bound, g, 64).unwrap();
    let prefill = cpu.forward(&PROMPT, false).unwrap();
    let decode = DECODE
        .iter()
        .map(|&t| cpu.forward(&[t], true).unwrap())
        .collect();
    (prefill, decode)
}

/// The GPU backend equals the CPU reference on the tiny qwen2 model, in
/// prefill and in decode steps after it, in every feature set.
#[test]
fn qwen2_gpu_matches_cpu() {
    let g = gguf(&tiny(), 13);
    let bound = bind(&g, "qwen2.ron");
    let (want_prefill, want_decode) = cpu_logits(&bound, &g);
    for req in FeatureRequest::EVERY {
        let ctx = GpuContext::with_features(req).unwrap_or_else(|e| {
            panic!("no GPU adapter ({e}); run tools/setup.sh (installs lavapipe)")
        });
        // f32 feature sets agree to ~3e-7, f16 ones to ~7e-4 (lavapipe).
        let tol = 1e-3;
        let mut gpu = GpuBackend::new(&ctx, &bound, &g, 64, false).unwrap();
        let got = gpu.forward(&PROMPT, false).unwrap();
        let e = rel_l2(&got.data, &want_prefill.data);
        assert!(e < tol, "{req:?} prefill: relative L2 {e}");
        for (i, (&t, want)) in DECODE.iter().zip(&want_decode).enumerate() {
            let got = gpu.forward(&[t], true).unwrap();
            let e = rel_l2(&got.data, &want.data);
            assert!(e < tol, "{req:?} decode step {i}: relative L2 {e}");
        }
    }
}

/// graphs/qwen2.ron's q, k and v biases fold into the fused QKV matmul's
/// epilogue, one per sibling, reading the bias weights directly: a decode
/// step has no elementwise dispatch and no copy, and keeps llama's count.
#[test]
fn qwen2_biases_fold_into_the_qkv_matmul() {
    use kiln::plan::{plan, Bucket, Launch};
    let g = gguf(&tiny(), 5);
    let b = bind(&g, "qwen2.ron");
    let layers = b.param("n_layer").unwrap() as usize;
    let caps = kiln::codegen::Caps::feature_sets(1024, 48 << 10)[3];
    let p = plan(&b, Bucket::One, caps, 2 << 30).unwrap();
    assert!(
        p.dispatches() <= 5 * layers + 3,
        "{} dispatches for {layers} layers",
        p.dispatches()
    );
    assert!(
        !p.launches.iter().any(|l| matches!(l, Launch::Copy { .. })),
        "a decode step copies a weight"
    );
    let names: Vec<String> = p.kernels.iter().map(|k| k.name()).collect();
    assert!(
        names.iter().all(|n| !n.starts_with("binary")),
        "unfused elementwise kernels: {names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("matmul3+add+add+add")),
        "no QKV matmul with its three bias adds: {names:?}"
    );
}

/// The tiny qwen2 model widened (rows of 256 elements, the feed-forward
/// `ffn` wide), with every matrix `dtype` and the down projections `down`.
fn tiny_wide(ffn: u64, dtype: &str, down: &str) -> Spec {
    let mut s = tiny();
    let wide = |d: u64| match d {
        32 => 128,
        64 => 256,
        128 => ffn,
        d => d,
    };
    for t in &mut s.tensors {
        for d in &mut t.2 {
            *d = wide(*d);
        }
        if t.2.len() >= 2 {
            t.1 = if t.0.contains("ffn_down") {
                down
            } else {
                dtype
            }
            .to_string();
        }
    }
    for (key, v) in [
        ("qwen2.embedding_length", 256),
        ("qwen2.feed_forward_length", ffn),
        ("qwen2.rope.dimension_count", 64),
    ] {
        s.metadata
            .insert(key.into(), serde_json::json!({ "u32": v }));
    }
    s
}

/// Q4_0 weights re-laid on the GPU (Q4_0X, rows of 256 and 512 elements)
/// through the whole backend (see relaid_layout_matches_cpu).
#[test]
fn q4_0_relaid_on_the_gpu_matches_cpu() {
    relaid_layout_matches_cpu(
        &tiny_wide(512, "Q4_0", "Q4_0"),
        "Q4_0X",
        Some("Q4_0"),
        FeatureRequest::All,
    );
}

/// Q6_K down projections with rows of 2048 elements re-laid on the GPU
/// (Q6_KX) beside Q4_K matrices and a Q6_K V projection too short to
/// re-lay.
#[test]
fn q6_k_relaid_on_the_gpu_matches_cpu() {
    let mut s = tiny_wide(2048, "Q4_K", "Q6_K");
    for t in &mut s.tensors {
        if t.0.contains("attn_v.weight") {
            t.1 = "Q6_K".into();
        }
    }
    // Without shader-f16: this model's random feed-forward activations
    // overflow f16 products in prefill's tiled matmuls (NaN on every
    // layout; the int8 decode path has no f16 variant).
    relaid_layout_matches_cpu(&s, "Q6_KX", None, FeatureRequest::Subgroups);
}

/// A model whose weights the GPU reads re-laid (`layout`), through the
/// whole backend: the plan reads its weights in that layout, and prefill
/// (tiled matmuls), decode (fused matmuls with f32 inputs, and with int8
/// inputs as rows over the staging limit get them) and the embedding equal
/// the CPU reference, which reads the GGUF bytes. `replaced`: a GGUF
/// layout no kernel may read (every row of that type is re-laid). `req`:
/// the adapter features.
fn relaid_layout_matches_cpu(
    spec: &Spec,
    layout: &str,
    replaced: Option<&str>,
    req: FeatureRequest,
) {
    use kiln::plan::{plan, Bucket, FuseOptions};
    let g = gguf(spec, 17);
    let bound = bind(&g, "qwen2.ron");
    let ctx = GpuContext::with_features(req)
        .unwrap_or_else(|e| panic!("no GPU adapter ({e}); run tools/setup.sh (installs lavapipe)"));
    let p = plan(&bound, Bucket::One, kiln::exec::kernel::caps(&ctx), 2 << 30).unwrap();
    let names: Vec<String> = p.kernels.iter().map(|k| k.name()).collect();
    assert!(
        names.iter().any(|n| n.contains(&format!("dtype{layout}."))),
        "no kernel reads the {layout} layout: {names:?}"
    );
    if let Some(r) = replaced {
        assert!(
            !names.iter().any(|n| n.contains(&format!("dtype{r}."))),
            "a kernel reads {r}, not {layout}: {names:?}"
        );
    }
    let (want_prefill, want_decode) = cpu_logits(&bound, &g);
    // f32 inputs agree to f16-product precision; int8 inputs carry their
    // quantization error (~1%, as tests/fused.rs).
    for (what, opts, tol) in [
        ("f32 inputs", FuseOptions::default(), 1e-3),
        (
            "int8 inputs",
            FuseOptions {
                stage_up_to_k: Some(0),
                ..Default::default()
            },
            5e-2,
        ),
    ] {
        let mut gpu = GpuBackend::with_fusion(&ctx, &bound, &g, 64, false, &opts).unwrap();
        let got = gpu.forward(&PROMPT, false).unwrap();
        let e = rel_l2(&got.data, &want_prefill.data);
        assert!(e < 1e-3, "{what}: prefill relative L2 {e}");
        for (i, (&t, want)) in DECODE.iter().zip(&want_decode).enumerate() {
            let got = gpu.forward(&[t], true).unwrap();
            let e = rel_l2(&got.data, &want.data);
            assert!(e < tol, "{what}: decode step {i} relative L2 {e}");
        }
    }
}
