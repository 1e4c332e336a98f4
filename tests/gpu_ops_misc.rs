//! Rope, attention, unary, binary, softmax, argmax, layer norm and strided
//! copy: for every variant each template can produce (`Template::variants`)
//! in each of the four feature sets (none, f16, subgroups, all) and a set of
//! shape classes, the GPU kernel equals the CPU reference (src/reference/ops.rs)
//! on fresh random inputs written into a poisoned (NaN) output buffer.
//!
//! Tolerance: all of these templates compute in f32 (none has an F16 knob:
//! their inputs and outputs are f32 and f16 arithmetic would only lose
//! precision), so the f32 bound applies everywhere: relative L2 error
//! ≤ 1e-4. Argmax must match exactly.
//!
//! Half of the cases spread their workgroups over x and y with a tiny x limit,
//! so the kernels' linear workgroup index (wg.x + wg.y * num_workgroups.x) and
//! their guard against surplus workgroups are exercised too.

mod common;

use common::*;
use kiln::codegen::{self, variant_name, Knobs};
use kiln::exec::kernel::{self, caps, rel_l2, spread, Kernel};
use kiln::exec::GpuContext;
use kiln::graph::ir::{RopeMode, Unary};
use kiln::reference::ops;

/// The bound for f32 arithmetic (every template in this file).
const TOL_F32: f64 = 1e-4;

/// Build every legal variant of `template` in every feature-set context and
/// call `f(ctx, kernel, knobs, label)` for each.
fn each_variant(template: &str, mut f: impl FnMut(&GpuContext, &Kernel, &Knobs, &str)) {
    let t = codegen::template(template).unwrap();
    let mut count = 0;
    for ctx in gpu_contexts() {
        let variants = t.variants(&caps(&ctx)).unwrap();
        assert!(
            !variants.is_empty(),
            "{template}: no variant for {}",
            ctx.features
        );
        for knobs in variants {
            let k = Kernel::build(&ctx, &t, &knobs).unwrap_or_else(|e| panic!("{e}"));
            let label = format!("{} on [{}]", variant_name(&t.name, &knobs), ctx.features);
            f(&ctx, &k, &knobs, &label);
            count += 1;
        }
    }
    assert!(count >= 4, "{template}: only {count} variants ran");
}

/// The x limit for `spread`: odd cases use a tiny one, so workgroups spread
/// over y and some fall beyond the work (the kernel must skip them).
fn x_limit(case: usize) -> u32 {
    if case % 2 == 1 {
        3
    } else {
        65535
    }
}

/// Bind `bufs` then a uniform of `params`, dispatch `groups` workgroups
/// (spread over x and y, at most `max_x` along x) and submit.
fn run(
    ctx: &GpuContext,
    k: &Kernel,
    bufs: &[&wgpu::Buffer],
    params: &[u32],
    groups: u32,
    max_x: u32,
) {
    let pb = kernel::uniform(ctx, "params", params);
    let mut all = bufs.to_vec();
    all.push(&pb);
    let bind = k.bind(ctx, &all);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    k.dispatch(&mut enc, &bind, spread(groups, max_x));
    ctx.queue.submit([enc.finish()]);
}

fn upload(ctx: &GpuContext, label: &str, v: &[f32]) -> wgpu::Buffer {
    kernel::storage(ctx, label, bytemuck::cast_slice(v))
}

/// `n` values uniform in [-s, s).
fn scaled(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    rng.vec(n).into_iter().map(|v| v * s).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f64, what: &str) {
    let err = rel_l2(got, want);
    assert!(err <= tol, "{what}: rel L2 {err:e} > {tol:e}");
}

#[test]
fn rope_all_variants() {
    let mut rng = Rng(fresh_seed());
    // (T, H, D, dims, pos0, base, scale): one token at a late position, many
    // tokens from 0, partial rotation (dims < D), D not a multiple of WG,
    // another base and a position scale.
    let shapes: [(usize, usize, usize, usize, usize, f32, f32); 5] = [
        (1, 3, 64, 64, 4090, 10000.0, 1.0),
        (6, 4, 64, 64, 0, 10000.0, 1.0),
        (3, 2, 80, 48, 17, 1_000_000.0, 1.0),
        (2, 5, 256, 256, 1000, 500_000.0, 0.25),
        (1, 1, 8, 4, 3, 10000.0, 1.0),
    ];
    each_variant("rope", |ctx, k, knobs, label| {
        let mode = if knobs["NEOX"] == "1" {
            RopeMode::Neox
        } else {
            RopeMode::Normal
        };
        for (case, &(t, h, d, dims, pos0, base, scale)) in shapes.iter().enumerate() {
            let x = rng.vec(t * h * d);
            let mut want = x.clone();
            ops::rope(&mut want, h, d, pos0, mode, base as f64, dims, scale as f64);
            let xb = upload(ctx, "x", &x);
            let yb = kernel::poisoned(ctx, "y", x.len());
            let params = [
                t as u32,
                h as u32,
                d as u32,
                dims as u32,
                pos0 as u32,
                base.to_bits(),
                scale.to_bits(),
            ];
            run(ctx, k, &[&xb, &yb], &params, (t * h) as u32, x_limit(case));
            let got = kernel::read_f32(ctx, &yb, x.len()).unwrap();
            assert_close(
                &got,
                &want,
                TOL_F32,
                &format!("{label} T {t} H {h} D {d} dims {dims} pos0 {pos0}"),
            );
        }
    });
}

/// Far positions: the angle error stays small (measured, with a looser bound
/// than the f32 one: at position p the f32 rounding of the frequency alone
/// moves the fastest angles by about p · 6e-8 radians).
#[test]
fn rope_far_positions() {
    let mut rng = Rng(fresh_seed());
    let t = codegen::template("rope").unwrap();
    let ctx = &gpu_contexts()[0];
    for neox in ["0", "1"] {
        let knobs: Knobs = [("NEOX", neox), ("WG", "64")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let k = Kernel::build(ctx, &t, &knobs).unwrap();
        let mode = if neox == "1" {
            RopeMode::Neox
        } else {
            RopeMode::Normal
        };
        let (h, d) = (8, 128);
        for pos0 in [8191, 32760] {
            let x = rng.vec(h * d);
            let mut want = x.clone();
            ops::rope(&mut want, h, d, pos0, mode, 10000.0, d, 1.0);
            let xb = upload(ctx, "x", &x);
            let yb = kernel::poisoned(ctx, "y", x.len());
            let params = [
                1,
                h as u32,
                d as u32,
                d as u32,
                pos0 as u32,
                10000f32.to_bits(),
                1f32.to_bits(),
            ];
            run(ctx, &k, &[&xb, &yb], &params, h as u32, 65535);
            let got = kernel::read_f32(ctx, &yb, x.len()).unwrap();
            let err = rel_l2(&got, &want);
            eprintln!("rope neox {neox} pos {pos0}: rel L2 {err:e}");
            let tol = 1e-3 * (pos0 as f64 / 32768.0).max(0.25);
            assert!(
                err <= tol,
                "rope neox {neox} pos {pos0}: rel L2 {err:e} > {tol:e}"
            );
        }
    }
}

/// One attention shape class.
#[derive(Clone, Copy)]
struct Attn {
    t: usize,
    h: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    pos0: usize,
    window: usize,
    softcap: f32,
}

/// `Attn` from (T, H, Hkv, D, Dv, pos0, window, softcap).
const fn attn(
    (t, h, hkv, d, dv, pos0, window): (usize, usize, usize, usize, usize, usize, usize),
    softcap: f32,
) -> Attn {
    Attn {
        t,
        h,
        hkv,
        d,
        dv,
        pos0,
        window,
        softcap,
    }
}

#[test]
fn attention_all_variants() {
    let mut rng = Rng(fresh_seed());
    // ((T, H, Hkv, D, Dv, pos0, window), softcap): prefill from 0 and decode
    // at 37 (GQA H=4/Hkv=2 and H=Hkv, D=64 and 256), a sliding window smaller
    // than the context, softcap on and off, Dv ≠ D with sizes that are not
    // multiples of WG, long contexts that span several key blocks, and a long
    // prefill with a window (blocks cut by both the window and causality).
    let shapes = [
        attn((5, 4, 2, 64, 64, 0, 0), 0.0),
        attn((1, 4, 2, 64, 64, 37, 0), 0.0),
        attn((5, 2, 2, 256, 256, 0, 0), 5.0),
        attn((1, 2, 2, 256, 256, 37, 0), 0.0),
        attn((1, 4, 2, 256, 256, 37, 16), 5.0),
        attn((5, 3, 3, 64, 64, 0, 3), 0.0),
        attn((1, 4, 4, 64, 64, 37, 10), 2.0),
        attn((3, 6, 2, 96, 80, 5, 0), 0.0),
        attn((2, 4, 2, 64, 64, 600, 0), 5.0),
        attn((3, 2, 1, 128, 128, 700, 300), 0.0),
        attn((70, 2, 1, 64, 64, 0, 50), 0.0),
        attn((1, 4, 1, 64, 64, 2000, 0), 0.0),
        // For split-K decode: positions before every split has a key
        // (pos0 < S), a window cutting a range that is not a multiple of S.
        attn((1, 2, 1, 64, 64, 0, 0), 0.0),
        attn((1, 4, 2, 64, 64, 3, 0), 5.0),
        attn((1, 2, 2, 128, 128, 300, 45), 5.0),
        // D not a multiple of 4 (the subgroup scoring's runs of four).
        attn((1, 2, 1, 70, 62, 45, 0), 0.0),
        attn((3, 2, 2, 70, 70, 5, 0), 0.0),
    ];
    let merge_t = codegen::template("attention_merge").unwrap();
    // Split counts for the SPLIT=1 variants' split twins, in turn.
    let mut twin = 0usize;
    let mut split_variants = 0usize;
    each_variant("attention", |ctx, k, knobs, label| {
        if knobs["PREP"] == "1" {
            attention_prep(ctx, k, knobs, label, &shapes, &mut rng, &merge_t);
            if knobs["SPLIT"] != "1" {
                split_variants += 1;
                return;
            }
            // The same knobs split too: every WG, subgroup and prep variant
            // meets one split count (the counts in turn).
            let mut kn = knobs.clone();
            kn.insert("SPLIT".into(), ["2", "4", "8", "16", "32"][twin % 5].into());
            twin += 1;
            let t = codegen::template("attention").unwrap();
            let ks = Kernel::build(ctx, &t, &kn).unwrap_or_else(|e| panic!("{e}"));
            let label = format!("{} on [{}]", variant_name(&t.name, &kn), ctx.features);
            attention_prep(ctx, &ks, &kn, &label, &shapes, &mut rng, &merge_t);
            split_variants += 1;
            return;
        }
        for (case, a) in shapes.iter().enumerate() {
            let Attn {
                t,
                h,
                hkv,
                d,
                dv,
                pos0,
                window,
                softcap,
            } = *a;
            // Two spare cache rows beyond pos0 + T: the kernel must not read them.
            let n_ctx = pos0 + t + 2;
            // Scaled so that the scores spread over a few units.
            let q = scaled(&mut rng, t * h * d, 3.0);
            let kc = scaled(&mut rng, n_ctx * hkv * d, 1.0);
            let vc = rng.vec(n_ctx * hkv * dv);
            let scale = 1.0 / (d as f32).sqrt();
            let want = ops::attention(
                &q,
                t,
                h,
                hkv,
                d,
                dv,
                &kc,
                &vc,
                pos0,
                scale as f64,
                (window > 0).then_some(window),
                (softcap > 0.0).then_some(softcap as f64),
            );
            let qb = upload(ctx, "q", &q);
            let kb = upload(ctx, "k_cache", &kc);
            let vb = upload(ctx, "v_cache", &vc);
            let ob = kernel::poisoned(ctx, "out", want.len());
            let params = [
                t as u32,
                h as u32,
                hkv as u32,
                d as u32,
                dv as u32,
                pos0 as u32,
                window as u32,
                scale.to_bits(),
                softcap.to_bits(),
            ];
            run(
                ctx,
                k,
                &[&qb, &kb, &vb, &ob],
                &params,
                (t * h) as u32,
                x_limit(case),
            );
            let got = kernel::read_f32(ctx, &ob, want.len()).unwrap();
            assert_close(
                &got,
                &want,
                TOL_F32,
                &format!(
                    "{label} T {t} H {h} Hkv {hkv} D {d} Dv {dv} pos0 {pos0} \
                     window {window} softcap {softcap}"
                ),
            );
        }
    });
    // Every split count as its own variant, and a split twin of each
    // unsplit PREP variant, in all four feature sets.
    assert!(
        split_variants >= 4 * 5 + 8,
        "{split_variants} split variants ran"
    );
}

/// Merge split-attention partial rows [H, S, Dv + 2] on the CPU (f64).
fn merge_partials(part: &[f32], h: usize, s: usize, dv: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * dv);
    for hh in 0..h {
        let row = |j: usize| &part[(hh * s + j) * (dv + 2)..(hh * s + j + 1) * (dv + 2)];
        let mx = (0..s)
            .map(|j| f64::from(row(j)[0]))
            .fold(f64::MIN, f64::max);
        let w: Vec<f64> = (0..s).map(|j| (f64::from(row(j)[0]) - mx).exp()).collect();
        let den: f64 = (0..s).map(|j| w[j] * f64::from(row(j)[1])).sum();
        for d in 0..dv {
            let num: f64 = (0..s).map(|j| w[j] * f64::from(row(j)[2 + d])).sum();
            out.push((num / den) as f32);
        }
    }
    out
}

/// Fused decode attention (PREP=1): raw q, k, v of the current token, the
/// per-head norms and rope applied in the kernel, the KV-cache rows of the
/// position written, against the CPU ops applied one after another.
/// SPLIT > 1: the partial rows (after the unwritten [H, Dv] output) merged
/// on the CPU and by attention_merge must both equal the reference, and
/// splits with no key are neutral (l = 0, acc = 0).
fn attention_prep(
    ctx: &GpuContext,
    k: &Kernel,
    knobs: &Knobs,
    label: &str,
    shapes: &[Attn],
    rng: &mut Rng,
    merge_t: &codegen::Template,
) {
    let splits: usize = knobs["SPLIT"].parse().unwrap();
    let merge = (splits > 1).then(|| {
        let mut kn = merge_t.variants(&caps(ctx)).unwrap()[0].clone();
        kn.insert("SPLIT".into(), splits.to_string());
        Kernel::build(ctx, merge_t, &kn).unwrap_or_else(|e| panic!("{e}"))
    });
    let qnorm = knobs["QNORM"] == "1";
    let knorm = knobs["KNORM"] == "1";
    let mode = match knobs["ROPE"].as_str() {
        "NORMAL" => Some(RopeMode::Normal),
        "NEOX" => Some(RopeMode::Neox),
        _ => None,
    };
    let eps = 1e-6f32;
    let (base, rscale) = (10000.0f32, 0.5f32);
    for a in shapes.iter().filter(|a| a.t == 1 && a.d == a.dv) {
        let Attn {
            h,
            hkv,
            d,
            dv,
            pos0,
            window,
            softcap,
            ..
        } = *a;
        // Rotate part of the head when the head is large.
        let dims = if d > 64 { d / 2 } else { d };
        let n_ctx = pos0 + 3;
        let q_raw = scaled(rng, h * d, 3.0);
        let k_raw = scaled(rng, hkv * d, 1.0);
        let v_raw = rng.vec(hkv * dv);
        let mut kc = scaled(rng, n_ctx * hkv * d, 1.0);
        let mut vc = rng.vec(n_ctx * hkv * dv);
        let qw: Vec<f32> = rng.vec(d).iter().map(|v| 1.0 + 0.5 * v).collect();
        let kw: Vec<f32> = rng.vec(d).iter().map(|v| 1.0 + 0.5 * v).collect();
        let prep = |x: &[f32], heads: usize, norm: Option<&[f32]>| {
            let mut y = match norm {
                Some(w) => ops::rms_norm(x, d, Some(w), eps as f64),
                None => x.to_vec(),
            };
            if let Some(m) = mode {
                ops::rope(&mut y, heads, d, pos0, m, base as f64, dims, rscale as f64);
            }
            y
        };
        let q = prep(&q_raw, h, qnorm.then_some(&qw[..]));
        let kn = prep(&k_raw, hkv, knorm.then_some(&kw[..]));
        // The GPU caches start with the current row poisoned: the kernel
        // must write it and never read it.
        let row_k = pos0 * hkv * d..(pos0 + 1) * hkv * d;
        let row_v = pos0 * hkv * dv..(pos0 + 1) * hkv * dv;
        let mut kc_gpu = kc.clone();
        let mut vc_gpu = vc.clone();
        kc_gpu[row_k.clone()].fill(f32::NAN);
        vc_gpu[row_v.clone()].fill(f32::NAN);
        kc[row_k.clone()].copy_from_slice(&kn);
        vc[row_v.clone()].copy_from_slice(&v_raw);
        let scale = 1.0 / (d as f32).sqrt();
        let want = ops::attention(
            &q,
            1,
            h,
            hkv,
            d,
            dv,
            &kc,
            &vc,
            pos0,
            scale as f64,
            (window > 0).then_some(window),
            (softcap > 0.0).then_some(softcap as f64),
        );
        let bufs = [
            upload(ctx, "q", &q_raw),
            upload(ctx, "k", &k_raw),
            upload(ctx, "v", &v_raw),
            upload(ctx, "k_cache", &kc_gpu),
            upload(ctx, "v_cache", &vc_gpu),
            // With SPLIT > 1 the partials follow the output row.
            kernel::poisoned(
                ctx,
                "out",
                want.len() + h * splits * (dv + 2) * (splits > 1) as usize,
            ),
            upload(ctx, "q_norm", &qw),
            upload(ctx, "k_norm", &kw),
        ];
        let params = [
            1,
            h as u32,
            hkv as u32,
            d as u32,
            dv as u32,
            pos0 as u32,
            window as u32,
            scale.to_bits(),
            softcap.to_bits(),
            eps.to_bits(),
            dims as u32,
            base.to_bits(),
            rscale.to_bits(),
        ];
        let pb = kernel::uniform(ctx, "params", &params);
        let mut binds: Vec<(u32, &wgpu::Buffer)> = (0..6).map(|i| (i as u32, &bufs[i])).collect();
        if qnorm {
            binds.push((6, &bufs[6]));
        }
        if knorm {
            binds.push((7, &bufs[7]));
        }
        binds.push((8, &pb));
        let bind = k.bind_at(ctx, &binds);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        k.dispatch(&mut enc, &bind, spread((h * splits) as u32, 65535));
        ctx.queue.submit([enc.finish()]);
        let what = format!(
            "{label} prep H {h} Hkv {hkv} D {d} pos0 {pos0} window {window} softcap {softcap}"
        );
        if let Some(mk) = &merge {
            let n = want.len() + h * splits * (dv + 2);
            let all = kernel::read_f32(ctx, &bufs[5], n).unwrap();
            let part = &all[want.len()..];
            assert_close(
                &merge_partials(part, h, splits, dv),
                &want,
                TOL_F32,
                &format!("{what}: partials merged on the CPU"),
            );
            // Splits past the attended keys are neutral.
            let first = if window > 0 && pos0 + 1 > window {
                pos0 + 1 - window
            } else {
                0
            };
            let keys = pos0 + 1 - first;
            // (attention.wgsl's MIN_CHUNK: a split takes at least 32 keys.)
            let chunk = keys.div_ceil(splits).max(32);
            for hh in 0..h {
                for j in (0..splits).filter(|&j| j * chunk >= keys) {
                    let r = &part[(hh * splits + j) * (dv + 2)..(hh * splits + j + 1) * (dv + 2)];
                    assert!(
                        r[0] < -1e38 && r[1..].iter().all(|&v| v == 0.0),
                        "{what}: empty split {j} of head {hh} is not neutral: {:?}",
                        &r[..4]
                    );
                }
            }
            // And merged on the GPU, in the same buffer as a plan does.
            let mp = kernel::uniform(ctx, "merge params", &[h as u32, dv as u32, (h * dv) as u32]);
            let mb = mk.bind(ctx, &[&bufs[5], &bufs[5], &mp]);
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            mk.dispatch(&mut enc, &mb, spread(h as u32, 65535));
            ctx.queue.submit([enc.finish()]);
            let got = kernel::read_f32(ctx, &bufs[5], want.len()).unwrap();
            assert_close(&got, &want, TOL_F32, &format!("{what}: {} merge", mk.name));
        } else {
            let got = kernel::read_f32(ctx, &bufs[5], want.len()).unwrap();
            assert_close(&got, &want, TOL_F32, &what);
        }
        // The current position's cache rows hold the prepared k and raw v.
        let kc_got = kernel::read_f32(ctx, &bufs[3], kc.len()).unwrap();
        let vc_got = kernel::read_f32(ctx, &bufs[4], vc.len()).unwrap();
        assert_close(
            &kc_got[row_k],
            &kn,
            TOL_F32,
            &format!("{what}: k cache row"),
        );
        assert_close(
            &vc_got[row_v],
            &v_raw,
            TOL_F32,
            &format!("{what}: v cache row"),
        );
    }
}

/// The reference of one unary OP knob value (scale and softcap take alpha).
fn unary_ref(op: &str, x: f32, alpha: f32) -> f32 {
    match op {
        "silu" => ops::unary(Unary::Silu, x),
        "gelu" => ops::unary(Unary::Gelu, x),
        "gelu_tanh" => ops::unary(Unary::GeluTanh, x),
        "tanh" => ops::unary(Unary::Tanh, x),
        "relu" => ops::unary(Unary::Relu, x),
        "scale" => x * alpha,
        "softcap" => (alpha as f64 * (x as f64 / alpha as f64).tanh()) as f32,
        other => panic!("unary OP {other} has no reference in this test"),
    }
}

#[test]
fn unary_all_variants() {
    let mut rng = Rng(fresh_seed());
    each_variant("unary", |ctx, k, knobs, label| {
        let op = knobs["OP"].as_str();
        // One element, a size that is not a multiple of WG, and a larger one
        // with a wide range of inputs.
        for (case, (n, range)) in [(1, 2.0), (1000, 4.0), (70_001, 12.0)]
            .into_iter()
            .enumerate()
        {
            let x = scaled(&mut rng, n, range);
            let alpha = 2.5f32;
            let want: Vec<f32> = x.iter().map(|&v| unary_ref(op, v, alpha)).collect();
            let xb = upload(ctx, "x", &x);
            let yb = kernel::poisoned(ctx, "y", n);
            let wg: usize = knobs["WG"].parse().unwrap();
            run(
                ctx,
                k,
                &[&xb, &yb],
                &[n as u32, alpha.to_bits()],
                n.div_ceil(wg) as u32,
                x_limit(case),
            );
            let got = kernel::read_f32(ctx, &yb, n).unwrap();
            assert_close(&got, &want, TOL_F32, &format!("{label} n {n}"));
        }
    });
}

#[test]
fn binary_all_variants() {
    let mut rng = Rng(fresh_seed());
    each_variant("binary", |ctx, k, knobs, label| {
        let wg: usize = knobs["WG"].parse().unwrap();
        // (n, nb): same length, a broadcast row, a scalar, one element.
        for (case, (n, nb)) in [(1000, 1000), (7 * 130, 130), (333, 1), (1, 1)]
            .into_iter()
            .enumerate()
        {
            let a = rng.vec(n);
            let b = rng.vec(nb);
            let want: Vec<f32> = (0..n)
                .map(|i| match knobs["OP"].as_str() {
                    "add" => a[i] + b[i % nb],
                    "mul" => a[i] * b[i % nb],
                    other => panic!("binary OP {other} has no reference in this test"),
                })
                .collect();
            let ab = upload(ctx, "a", &a);
            let bb = upload(ctx, "b", &b);
            let yb = kernel::poisoned(ctx, "y", n);
            run(
                ctx,
                k,
                &[&ab, &bb, &yb],
                &[n as u32, nb as u32],
                n.div_ceil(wg) as u32,
                x_limit(case),
            );
            let got = kernel::read_f32(ctx, &yb, n).unwrap();
            assert_close(&got, &want, TOL_F32, &format!("{label} n {n} nb {nb}"));
        }
    });
}

#[test]
fn softmax_all_variants() {
    let mut rng = Rng(fresh_seed());
    each_variant("softmax", |ctx, k, _knobs, label| {
        // One row of vocabulary size, many short rows, rows shorter than WG.
        for (case, (rows, d)) in [(1, 49_152), (5, 1000), (9, 77), (2, 1)]
            .into_iter()
            .enumerate()
        {
            let x = scaled(&mut rng, rows * d, 8.0);
            let want = ops::softmax(&x, d);
            let xb = upload(ctx, "x", &x);
            let yb = kernel::poisoned(ctx, "y", rows * d);
            run(
                ctx,
                k,
                &[&xb, &yb],
                &[rows as u32, d as u32],
                rows as u32,
                x_limit(case),
            );
            let got = kernel::read_f32(ctx, &yb, rows * d).unwrap();
            assert_close(&got, &want, TOL_F32, &format!("{label} rows {rows} d {d}"));
        }
    });
}

#[test]
fn argmax_all_variants() {
    let mut rng = Rng(fresh_seed());
    each_variant("argmax", |ctx, k, _knobs, label| {
        // (rows, d, levels): levels > 0 quantizes the inputs to that many
        // values, so rows have ties and the first index must win; one row is
        // constant (answer 0).
        for (case, (rows, d, levels)) in [
            (1, 49_152, 0),
            (7, 100, 0),
            (4, 1000, 3),
            (3, 37, 2),
            (1, 5000, 1),
            (2, 1, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let x: Vec<f32> = rng
                .vec(rows * d)
                .into_iter()
                .map(|v| {
                    if levels > 0 {
                        ((v + 1.0) * 0.5 * levels as f32)
                            .floor()
                            .min(levels as f32 - 1.0)
                    } else {
                        v
                    }
                })
                .collect();
            let want: Vec<u32> = ops::argmax(&x, d).into_iter().map(|i| i as u32).collect();
            let xb = upload(ctx, "x", &x);
            let yb = kernel::poisoned(ctx, "y", rows);
            run(
                ctx,
                k,
                &[&xb, &yb],
                &[rows as u32, d as u32],
                rows as u32,
                x_limit(case),
            );
            let bytes = kernel::read_bytes(ctx, &yb, rows as u64 * 4).unwrap();
            let got: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
            assert_eq!(got, want, "{label} rows {rows} d {d} levels {levels}");
        }
    });
}

#[test]
fn layer_norm_all_variants() {
    let mut rng = Rng(fresh_seed());
    each_variant("layer_norm", |ctx, k, _knobs, label| {
        // One row and many; d not a multiple of WG, d below WG; every
        // combination of weight and bias.
        for (case, (rows, d, flags)) in [(1, 576, 3), (7, 100, 1), (3, 640, 2), (4, 33, 0)]
            .into_iter()
            .enumerate()
        {
            // Offset, so that the mean matters.
            let x: Vec<f32> = rng
                .vec(rows * d)
                .into_iter()
                .map(|v| v * 2.0 + 3.0)
                .collect();
            let w = rng.vec(d);
            let b = rng.vec(d);
            let eps = 1e-5f32;
            let want = ops::layer_norm(
                &x,
                d,
                (flags & 1 != 0).then_some(&w[..]),
                (flags & 2 != 0).then_some(&b[..]),
                eps as f64,
            );
            let xb = upload(ctx, "x", &x);
            let wb = upload(ctx, "w", &w);
            let bb = upload(ctx, "b", &b);
            let yb = kernel::poisoned(ctx, "y", rows * d);
            run(
                ctx,
                k,
                &[&xb, &wb, &bb, &yb],
                &[d as u32, rows as u32, eps.to_bits(), flags],
                rows as u32,
                x_limit(case),
            );
            let got = kernel::read_f32(ctx, &yb, rows * d).unwrap();
            assert_close(
                &got,
                &want,
                TOL_F32,
                &format!("{label} rows {rows} d {d} flags {flags}"),
            );
        }
    });
}

/// Params of copy_strided for copying `len` entries along an axis.
#[allow(clippy::too_many_arguments)]
fn copy_params(
    outer: usize,
    inner: usize,
    len: usize,
    x_len: usize,
    x_start: usize,
    y_len: usize,
    y_start: usize,
) -> [u32; 7] {
    [outer, inner, len, x_len, x_start, y_len, y_start].map(|v| v as u32)
}

#[test]
fn copy_strided_slice_and_concat() {
    let mut rng = Rng(fresh_seed());
    each_variant("copy_strided", |ctx, k, knobs, label| {
        let wg: usize = knobs["WG"].parse().unwrap();
        let groups =
            |outer: usize, len: usize, inner: usize| (outer * len * inner).div_ceil(wg) as u32;
        // Slices along the first, a middle and the last axis.
        for (case, (dims, axis, start, len)) in [
            (vec![10usize, 6], 0usize, 2usize, 5usize),
            (vec![4, 10, 6], 1, 3, 5),
            (vec![3, 7, 50], 2, 11, 30),
            (vec![200, 9], 1, 8, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let x = rng.vec(dims.iter().product());
            let want = ops::slice(&x, &dims, axis, start, len);
            let outer: usize = dims[..axis].iter().product();
            let inner: usize = dims[axis + 1..].iter().product();
            let xb = upload(ctx, "x", &x);
            let yb = kernel::poisoned(ctx, "y", want.len());
            let params = copy_params(outer, inner, len, dims[axis], start, len, 0);
            run(
                ctx,
                k,
                &[&xb, &yb],
                &params,
                groups(outer, len, inner),
                x_limit(case),
            );
            let got = kernel::read_f32(ctx, &yb, want.len()).unwrap();
            assert_eq!(
                got, want,
                "{label} slice {dims:?} axis {axis} {start}+{len}"
            );
        }
        // Concatenations of three tensors along the first, a middle and the
        // last axis: one dispatch per input into the same poisoned output.
        for (case, (shapes, axis)) in [
            (vec![vec![2usize, 5], vec![3, 5], vec![1, 5]], 0usize),
            (vec![vec![4, 3, 6], vec![4, 5, 6], vec![4, 1, 6]], 1),
            (vec![vec![3, 2, 7], vec![3, 2, 1], vec![3, 2, 130]], 2),
        ]
        .into_iter()
        .enumerate()
        {
            let xs: Vec<Vec<f32>> = shapes.iter().map(|s| rng.vec(s.iter().product())).collect();
            let refs: Vec<&[f32]> = xs.iter().map(|v| &v[..]).collect();
            let want = ops::concat(&refs, &shapes, axis);
            let outer: usize = shapes[0][..axis].iter().product();
            let inner: usize = shapes[0][axis + 1..].iter().product();
            let y_len: usize = shapes.iter().map(|s| s[axis]).sum();
            let yb = kernel::poisoned(ctx, "y", want.len());
            let mut y_start = 0;
            for (x, s) in xs.iter().zip(&shapes) {
                let xb = upload(ctx, "x", x);
                let len = s[axis];
                let params = copy_params(outer, inner, len, len, 0, y_len, y_start);
                run(
                    ctx,
                    k,
                    &[&xb, &yb],
                    &params,
                    groups(outer, len, inner),
                    x_limit(case),
                );
                y_start += len;
            }
            let got = kernel::read_f32(ctx, &yb, want.len()).unwrap();
            assert_eq!(got, want, "{label} concat {shapes:?} axis {axis}");
        }
    });
}
