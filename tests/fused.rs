//! Every fused kernel against the unfused CPU reference: tiny llama- and
//! gemma3-shaped models (random weights, mixed dtypes so sibling matmuls
//! have different dtypes, a sliding window shorter than the run) run a
//! prefill and decode steps on the GPU with all fusion passes, in every
//! feature set, and with each pass off in turn; the logits must equal the
//! CPU reference's by relative L2 error (1e-4 with f32 arithmetic, 1e-2
//! with f16 products). Decode attention is split over the keys: the tiny
//! models' own choice (2 splits on global layers), and 8 or 32 splits forced
//! (splits with no key at the early positions and in the sliding window),
//! merged in the output projection's prologue or by a merge dispatch.

mod common;

use common::tiny_model as model;
use kiln::exec::gpu::GpuBackend;
use kiln::exec::{FeatureRequest, GpuContext};
use kiln::graph::BoundGraph;
use kiln::model::gguf::Gguf;
use kiln::plan::{FuseOptions, Group, PASSES};
use kiln::reference::{Logits, Reference};
use kiln::session::Backend;

/// Kernel `k`'s value of knob `name` ("" where it has none).
fn knob<'a>(k: &'a kiln::plan::KernelRef, name: &str) -> &'a str {
    k.knobs.get(name).map_or("", String::as_str)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (f64::from(*x) - f64::from(*y)).powi(2);
        den += f64::from(*y).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

const PROMPT: [u32; 5] = [7, 1, 250, 33, 90];
const DECODE: [u32; 6] = [12, 128, 3, 500, 64, 9];

/// The CPU reference's prefill logits and each decode step's.
fn reference(g: &Gguf, b: &BoundGraph) -> (Logits, Vec<Logits>) {
    let mut cpu = Reference::new(b, g, 64).unwrap();
    let pre = cpu.forward(&PROMPT, false).unwrap();
    let dec = DECODE
        .iter()
        .map(|&t| cpu.forward(&[t], true).unwrap())
        .collect();
    (pre, dec)
}

/// How a decode plan splits its attention: (largest split count, merges
/// in a matmul prologue, merge dispatches).
fn split_shape(gpu: &GpuBackend) -> (usize, usize, usize) {
    let p = gpu.plans()[0];
    let mut r = (1, 0, 0);
    for gr in &p.groups {
        match gr {
            Group::Attention(a) => {
                r.0 = r.0.max(a.splits);
                r.2 += (a.splits > 1 && !a.merged_by_consumer) as usize;
            }
            Group::Matvec(m) => r.1 += m.merge.is_some() as usize,
            _ => {}
        }
    }
    r
}

/// Prefill logits and each decode step's on the GPU with `opts`.
fn gpu_run(
    ctx: &GpuContext,
    g: &Gguf,
    b: &BoundGraph,
    opts: &FuseOptions,
) -> (Logits, Vec<Logits>) {
    let mut gpu = GpuBackend::with_fusion(ctx, b, g, 64, false, opts).unwrap();
    let (splits, in_prologue, dispatched) = split_shape(&gpu);
    let fused = !opts
        .disabled
        .iter()
        .any(|p| p == "attention" || p == "split");
    if fused {
        assert!(
            splits >= opts.splits.unwrap_or(2),
            "{opts:?}: {splits} splits"
        );
        // Without the prologue pass, or with rows too long to stage read
        // in f32, an attention_merge dispatch merges.
        if opts.disabled.iter().any(|p| p == "prologue")
            || (opts.stage_up_to_k == Some(0) && opts.f32_activations)
        {
            assert!(in_prologue == 0 && dispatched > 0, "{opts:?}");
        } else {
            assert!(in_prologue > 0, "{opts:?}: no merge in a prologue");
        }
    } else {
        assert_eq!(splits, 1, "{opts:?}");
    }
    let int8 = gpu.plans()[0].kernels.iter().any(|k| knob(k, "XQ") == "1");
    assert_eq!(
        int8,
        opts.stage_up_to_k == Some(0) && !opts.f32_activations,
        "{opts:?}: int8 inputs only for rows over stage_up_to_k"
    );
    // A merge into an int8 reader is made into its int8 row in workgroup
    // memory by the reader's prologue (XQ with XS), not by quantize_rows
    // (the tiny models' rows are at most a word per invocation).
    if int8 && in_prologue > 0 {
        let staged = gpu.plans()[0]
            .kernels
            .iter()
            .any(|k| knob(k, "XQ") == "1" && !matches!(knob(k, "XS"), "0" | ""));
        let merged_apart = gpu.plans()[0]
            .kernels
            .iter()
            .any(|k| knob(k, "MERGE") == "1");
        assert_eq!(
            (staged, merged_apart),
            (!opts.merge_int8_apart, opts.merge_int8_apart),
            "{opts:?}: (merged in a staged int8 row, by quantize_rows)"
        );
    }
    // The quantize pass: int8 rows made by the matmuls that produce them.
    let qout = gpu.plans()[0]
        .kernels
        .iter()
        .filter(|k| knob(k, "QOUT") == "1")
        .count();
    // (Gemma 3 has none: its projections' outputs go through a norm
    // before the residual add, and its down projection reads f32 rows.)
    let arch = &b.arch;
    // (Without quantize_every_dtype only producers where the pass pays:
    // single weights, and pairs of re-laid Q4_0 weights.)
    let wanted = int8 && opts.on("quantize") && arch.as_str() != "gemma3";
    assert!(
        if wanted {
            qout > 0 || !opts.quantize_every_dtype
        } else {
            qout == 0
        },
        "{arch} {opts:?}: {qout} kernels quantize their output"
    );
    // With qout_last every one of them by the last workgroup of a block,
    // but those merging a split attention into a staged row (their
    // workgroups as wide as block-owning ones anyway).
    let last = gpu.plans()[0]
        .kernels
        .iter()
        .filter(|k| knob(k, "QLAST") == "1")
        .count();
    let staged = gpu.plans()[0]
        .kernels
        .iter()
        .filter(|k| knob(k, "QOUT") == "1" && !matches!(knob(k, "XS"), "0" | ""))
        .count();
    let on = opts.qout_last == Some(true);
    assert_eq!(
        last,
        if on { qout - staged } else { 0 },
        "{arch} {opts:?}: QLAST kernels"
    );
    if opts.stage_up_to_k == Some(0) && opts.f32_activations {
        let scaled = gpu.plans()[0]
            .groups
            .iter()
            .filter(|gr| matches!(gr, Group::Matvec(m) if m.scaled))
            .count();
        assert!(scaled > 0, "{opts:?}: no RMSNorm folded in as a scale");
    }
    let pre = gpu.forward(&PROMPT, false).unwrap();
    let dec = DECODE
        .iter()
        .map(|&t| gpu.forward(&[t], true).unwrap())
        .collect();
    (pre, dec)
}

/// Largest relative L2 error over the prefill and the decode steps.
fn worst(got: &(Logits, Vec<Logits>), want: &(Logits, Vec<Logits>)) -> f64 {
    std::iter::once((&got.0, &want.0))
        .chain(got.1.iter().zip(&want.1))
        .map(|(a, b)| rel_l2(&a.data, &b.data))
        .fold(0.0, f64::max)
}

/// Fused plan with int8 matmul inputs against the CPU reference and the
/// unfused plan (relative L2 of the logits).
const INT8_TOL: f64 = 5e-2;

fn every_feature_set_and_pass(arch: &str, layers: u64) {
    let (g, b) = model(arch, layers, 21);
    let cpu = reference(&g, &b);
    for req in FeatureRequest::EVERY {
        let ctx = GpuContext::with_features(req).unwrap_or_else(|e| {
            panic!("no GPU adapter ({e}); run tools/setup.sh (installs lavapipe)")
        });
        // Against the f64-accumulating CPU reference, end to end through
        // every layer: 1e-3 with f32 arithmetic (the single kernels meet
        // 1e-4; the unfused GPU plan is no closer), 3e-2 with f16 products.
        // Against the same feature set's unfused GPU plan, a fused plan
        // must agree to 1e-4 (f32: what a single kernel meets against the
        // CPU; the quantized dot products subtract Σx from a biased sum,
        // so a last-bit difference in a fused input grows ~30x) or 1e-2 (f16).
        let (tol_cpu, tol_unfused) = if ctx.features.f16 {
            (3e-2, 1e-2)
        } else {
            (1e-3, 1e-4)
        };
        let unfused = gpu_run(&ctx, &g, &b, &FuseOptions::none());
        let e = worst(&unfused, &cpu);
        assert!(
            e < tol_cpu,
            "{arch} {req:?} unfused vs CPU: relative L2 {e}"
        );
        let forced = |s: usize, off: &[&str]| FuseOptions {
            disabled: off.iter().map(|p| p.to_string()).collect(),
            splits: Some(s),
            ..Default::default()
        };
        let mut configs = vec![
            ("all passes".to_string(), FuseOptions::default()),
            ("8 splits".to_string(), forced(8, &[])),
            (
                // What rows longer than PROLOGUE_PAYS_UP_TO_K get with
                // --f32-activations.
                "no staged rows: RMSNorm folded in as a scale".to_string(),
                FuseOptions {
                    stage_up_to_k: Some(0),
                    f32_activations: true,
                    ..Default::default()
                },
            ),
        ];
        if req == FeatureRequest::EVERY[0] || req == FeatureRequest::EVERY[3] {
            for pass in PASSES {
                configs.push((
                    format!("--no-fuse {pass}"),
                    FuseOptions {
                        disabled: vec![pass.to_string()],
                        ..Default::default()
                    },
                ));
            }
            configs.push((
                "32 splits, --no-fuse prologue".to_string(),
                forced(32, &["prologue"]),
            ));
        }
        // What rows longer than PROLOGUE_PAYS_UP_TO_K get by default: int8
        // inputs (quantize_rows + integer dot products). The quantization
        // error (~0.4% per product) is the tolerance here, against the CPU
        // and the unfused plan alike.
        let opts = FuseOptions {
            stage_up_to_k: Some(0),
            quantize_every_dtype: true,
            ..Default::default()
        };
        let got = gpu_run(&ctx, &g, &b, &opts);
        let (e_cpu, e_un) = (worst(&got, &cpu), worst(&got, &unfused));
        eprintln!("{arch} {req:?} int8 inputs: rel L2 {e_cpu:e} vs CPU, {e_un:e} vs unfused GPU");
        assert!(
            e_cpu < INT8_TOL && e_un < INT8_TOL,
            "{arch} {req:?} int8 inputs: relative L2 {e_cpu} vs CPU, {e_un} vs unfused"
        );
        // Variants that must give the int8 default's numbers (up to the
        // summation order), each against it.
        let same = |what: &str, opts: FuseOptions| {
            let e = worst(&got, &gpu_run(&ctx, &g, &b, &opts));
            eprintln!("{arch} {req:?} int8 inputs, {what}: rel L2 {e:e} to the default");
            assert!(
                e < 1e-3,
                "{arch} {req:?} int8 inputs, {what}: relative L2 {e}"
            );
        };
        // Every int8 row made by a quantize_rows dispatch: the producers'
        // quantization must give the same numbers (the same rounding; only
        // the norm's scale is applied at the end).
        same(
            "quantize pass off (rows by quantize_rows, not their producers)",
            FuseOptions {
                disabled: vec!["quantize".into()],
                ..opts.clone()
            },
        );
        // The producers' quantization by the last workgroup of each block
        // (QLAST, plain matmul workgroups; then pairs of every dtype
        // quantize too).
        same(
            "QLAST (not workgroups owning blocks)",
            FuseOptions {
                qout_last: Some(true),
                ..opts.clone()
            },
        );
        // The split attention's merge by a quantize_rows dispatch instead
        // of in the reader's prologue (what narrow readers get).
        same(
            "merges apart (by quantize_rows, not in the int8 prologue)",
            FuseOptions {
                merge_int8_apart: true,
                ..opts.clone()
            },
        );
        for (what, opts) in configs {
            let got = gpu_run(&ctx, &g, &b, &opts);
            let e_cpu = worst(&got, &cpu);
            let e_un = worst(&got, &unfused);
            eprintln!("{arch} {req:?} {what}: rel L2 {e_cpu:e} vs CPU, {e_un:e} vs unfused GPU");
            assert!(
                e_cpu < tol_cpu,
                "{arch} {req:?} {what}: relative L2 {e_cpu} vs CPU"
            );
            assert!(
                e_un < tol_unfused,
                "{arch} {req:?} {what}: relative L2 {e_un} vs the unfused GPU plan"
            );
        }
    }
}

#[test]
fn llama_shaped_fused_equals_reference() {
    every_feature_set_and_pass("llama", 2);
}

/// Six layers: five sliding-window layers and one global one.
#[test]
fn gemma3_shaped_fused_equals_reference() {
    every_feature_set_and_pass("gemma3", 6);
}
