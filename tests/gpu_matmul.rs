//! Every variant of the dequantizing kernels (matmul_vec, matmul_tiled,
//! embed) × the four feature sets × every weight dtype × shape classes: the
//! GPU result equals kiln's CPU dequantization (src/model/dequant.rs) plus the
//! reference matmul, on fresh random inputs with a poisoned output buffer.
//!
//! Tolerance: relative L2 error ≤ 1e-4 with f32 arithmetic (F16=0 or no F16
//! knob; XQ=1 against the reference fed the same int8 input, see
//! quantize_rows below) and ≤ 1e-2 for variants with F16=1 (products in
//! f16). Embedding
//! gathers do no arithmetic beyond dequantization and must agree to 1e-6.
//! Outputs the kernel must not write (other columns of a wider y, tokens
//! outside the table chunk) must still hold the poison.
//!
//! Shape classes: one token row and several; K a multiple of the block size
//! but not of the workgroup or tile (plain dtypes use an odd K, which also
//! misaligns F16/BF16 rows); N not a multiple of ROWS or TN; an output chunk
//! with n_offset > 0 and ldy > N; and the workgroup grid spread over x and y
//! (the kernels recover the linear index from both).

mod common;

use common::*;
use kiln::codegen::{self, variant_name, Knobs, Template};
use kiln::exec::kernel::{self, caps, rel_l2, spread, Kernel};
use kiln::exec::GpuContext;
use kiln::model::dequant;
use kiln::model::dtype::DType;
use kiln::reference::ops;

/// Byte offsets of the f16 scale fields (d, dmin, m) inside one block.
fn scale_offsets(dt: DType) -> &'static [usize] {
    match dt {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4_NL => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows` rows of `k` random elements of `dt`, as raw GGUF bytes. Quantized
/// blocks are random bytes except their f16 scale fields, which get modest
/// finite values of either sign (as tools/gen_dequant_vectors.py does, but
/// kept small so that sums stay in a sane range).
fn random_weights(rng: &mut Rng, dt: DType, rows: usize, k: usize) -> Vec<u8> {
    let n = rows * k;
    match dt {
        DType::F32 => (0..n).flat_map(|_| rng.f32().to_le_bytes()).collect(),
        DType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.f32()).to_le_bytes())
            .collect(),
        DType::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.f32()).to_le_bytes())
            .collect(),
        _ => {
            let (bs, ts) = (dt.block_size(), dt.type_size());
            assert_eq!(n % bs, 0);
            let mut bytes: Vec<u8> = (0..n / bs * ts).map(|_| rng.next_u64() as u8).collect();
            for block in bytes.chunks_mut(ts) {
                for &off in scale_offsets(dt) {
                    // |s| in [1/512, 1/16).
                    let s = (rng.f32() + 1.0) / 2.0 * (1.0 / 16.0 - 1.0 / 512.0) + 1.0 / 512.0;
                    let s = if rng.next_u64() & 1 == 1 { -s } else { s };
                    block[off..off + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
                }
            }
            bytes
        }
    }
}

/// Row length used for `dt`: a multiple of its block size, not of the
/// workgroup size or tile; odd for plain dtypes (partial 8-element piece,
/// rows not 4-byte aligned for F16/BF16).
fn k_for(dt: DType) -> usize {
    match dt.block_size() {
        1 => 99,
        32 => 96,
        _ => 512,
    }
}

fn dtype(knobs: &Knobs) -> DType {
    layout_dtype(&knobs["DTYPE"]).expect("DTYPE knob names a dtype")
}

/// The GGUF dtype of a DTYPE knob value (a weight layout on the GPU, see
/// DType::gpu_layout): Q4_0X is Q4_0 re-laid, Q6_KX Q6_K.
fn layout_dtype(name: &str) -> Option<DType> {
    DType::from_gpu_layout(name).map(|l| l.0)
}

/// Elements per re-laid group of a layout (1 for GGUF layouts): rows must
/// be whole groups.
fn layout_group(name: &str) -> usize {
    DType::from_gpu_layout(name).map_or(1, |l| l.1)
}

/// Row length for a re-laid layout's tests: two groups (so that the group
/// stride is exercised), or 0 for GGUF layouts.
fn relaid_k(name: &str) -> usize {
    match layout_group(name) {
        1 => 0,
        g => 2 * g,
    }
}

/// Raw GGUF rows of `k` elements of `dt`, uploaded in the layout `layout`
/// names (re-laid as the backend does for Q4_0X and Q6_KX; kernels for the
/// GGUF layout take any K).
fn upload_weights(
    ctx: &GpuContext,
    layout: &str,
    dt: DType,
    k: usize,
    bytes: &[u8],
) -> wgpu::Buffer {
    if layout_group(layout) > 1 {
        assert_eq!(dt.gpu_layout(k), layout, "K = {k} has no {layout} layout");
        kernel::storage(ctx, "w", &dt.to_gpu_layout(k, bytes))
    } else {
        kernel::storage(ctx, "w", bytes)
    }
}

fn knob(knobs: &Knobs, name: &str) -> u32 {
    knobs[name].parse().expect("numeric knob")
}

/// Tolerance for a matmul variant (see the file comment).
fn tolerance(knobs: &Knobs) -> f64 {
    let on = |k: &str| knobs.get(k).is_some_and(|v| v != "0");
    if on("F16") {
        1e-2
    } else if on("XQ") && on("XS") {
        // The kernel quantizes the row itself: where x / max|x| · 127 lands
        // within an ulp of .5, the GPU's 1 / max may round it the other
        // way than the CPU reference's (as check_qout allows), and one
        // element one step off moves a K = 96 row's product by ~1.4e-3.
        3e-3
    } else {
        1e-4
    }
}

/// One matmul shape class: token rows, output rows, where the chunk's
/// output goes, and the largest workgroup count per grid dimension.
#[derive(Debug, Clone, Copy)]
struct Shape {
    m: usize,
    n: usize,
    n_offset: usize,
    ldy: usize,
    spread_max: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    /// matmul_vec: spread(ceil(N / ROWS)) over x, y; z = M.
    Vec,
    /// matmul_tiled: spread(ceil(N / TN) * ceil(M / TM)); z = 1.
    Tiled,
}

/// Run one matmul variant on one shape: the relative L2 error, or what
/// went wrong.
fn check_matmul(
    ctx: &GpuContext,
    family: Family,
    k: &Kernel,
    knobs: &Knobs,
    rng: &mut Rng,
    s: Shape,
) -> Result<f64, String> {
    let dt = dtype(knobs);
    // QOUT (the output quantized per 32-row block as well) needs whole
    // blocks of rows: 64 of them, two blocks.
    let qout = knobs.get("QOUT").is_some_and(|v| v == "1");
    // QLAST: plain workgroups, the last of each block quantizing it.
    let qlast = knobs.get("QLAST").is_some_and(|v| v == "1");
    let s = if qout {
        Shape {
            n: 64,
            ldy: s.ldy.max(s.n_offset + 64),
            ..s
        }
    } else {
        s
    };
    // matmul_vec's extra weights (default hook: B and C rows follow A's in
    // y; PAIR=1 stores a * b).
    let extra: Vec<DType> = ["DTYPE_B", "DTYPE_C"]
        .iter()
        .filter_map(|n| knobs.get(*n))
        .filter_map(|v| layout_dtype(v))
        .collect();
    let layouts: Vec<&str> = ["DTYPE", "DTYPE_B", "DTYPE_C"]
        .iter()
        .filter_map(|n| knobs.get(*n))
        .map(|v| v.as_str())
        .filter(|v| *v != "NONE")
        .collect();
    let pair = knobs.get("PAIR").is_some_and(|v| v == "1");
    // Rows of re-laid layouts are whole groups (Q4_0X 256 elements, Q6_KX
    // 2048): two of them.
    let kk = std::iter::once(dt)
        .chain(extra.iter().copied())
        .map(|d| match d.block_size() {
            1 => 0,
            32 => 1,
            _ => 2,
        })
        .max()
        .map(|c| [99, 96, 512][c])
        .unwrap_or(99)
        .max(layouts.iter().map(|l| relaid_k(l)).max().unwrap_or(0));
    // NORM=1 (an RMSNorm folded in as a scale; the default hook has no norm
    // weight and eps 1e-6) reads whole vec4 rows: K a multiple of 4.
    let norm = knobs.get("NORM").is_some_and(|v| v == "1");
    let kk: usize = if norm {
        (kk as usize).next_multiple_of(4)
    } else {
        kk
    };
    let xs: usize = knobs.get("XS").map_or(0, |v| v.parse().unwrap_or(0));
    assert!(
        xs == 0 || kk <= xs,
        "a staged row of {kk} elements needs XS >= K, not {xs}"
    );
    let x = rng.vec(s.m * kk);
    // NORM: the reference multiplies by the norm's row scale before the
    // matmul (every weight's product, so a PAIR's a * b carries it twice).
    // XQ: the kernel reads the input quantized (on the CPU here, as
    // quantize_rows does it); the reference gets the same values.
    let xq = knobs.get("XQ").is_some_and(|v| v != "0");
    let x_used = if xq {
        q8_dequantize(&q8_quantize(&x, kk, None), kk)
    } else {
        x.clone()
    };
    let x_ref: Vec<f32> = if norm {
        x.chunks(kk)
            .zip(x_used.chunks(kk))
            .flat_map(|(row, used)| {
                let ms = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / kk as f64;
                let r = (1.0 / (ms + 1e-6).sqrt()) as f32;
                used.iter().map(move |v| v * r)
            })
            .collect()
    } else {
        x_used
    };
    let mut all_w = Vec::new();
    let mut outs = Vec::new();
    for &d in std::iter::once(&dt).chain(&extra) {
        let wbytes = random_weights(rng, d, s.n, kk);
        let w = dequant::dequantize(d, &wbytes, s.n * kk).expect("CPU dequant");
        outs.push(ops::matmul(&x_ref, s.m, &w, kk, s.n));
        all_w.push(wbytes);
    }
    let (nb, nc) = if pair {
        (0, 0)
    } else {
        (
            if extra.is_empty() { 0 } else { s.n },
            if extra.len() > 1 { s.n } else { 0 },
        )
    };
    // Expected [m, ldy] rows in the chunk's columns: A's rows (times B's
    // with PAIR), then B's and C's for matmul_vec's segments.
    let width = s.n + nb + nc;
    let mut want = vec![0f32; s.m * width];
    for m in 0..s.m {
        for j in 0..s.n {
            want[m * width + j] = if pair {
                outs[0][m * s.n + j] * outs[1][m * s.n + j]
            } else {
                outs[0][m * s.n + j]
            };
            if nb > 0 {
                want[m * width + s.n + j] = outs[1][m * s.n + j];
            }
            if nc > 0 {
                want[m * width + 2 * s.n + j] = outs[2][m * s.n + j];
            }
        }
    }
    let s = Shape {
        n: width,
        ldy: s.ldy.max(s.n_offset + width),
        ..s
    };

    let wbs: Vec<wgpu::Buffer> = all_w
        .iter()
        .zip(&layouts)
        .zip(std::iter::once(&dt).chain(&extra))
        .map(|((b, l), d)| upload_weights(ctx, l, *d, kk, b))
        .collect();
    // XQ with XS: the kernel quantizes the f32 row into workgroup memory
    // itself (the reference's values are the same).
    let staged = xs > 0;
    // Several tokens: the int8 rows start one word into the buffer (p.xqo),
    // so that rows whose words the kernel reads four at a time also run
    // its unaligned path.
    let xqo = usize::from(xq && !staged && s.m > 1);
    let xb = if xq && !staged {
        // The int8 rows, then (for NORM) each row's per-block Σ x², as a
        // producer's QOUT writes them.
        let mut words = vec![0u32; xqo];
        words.extend(q8_quantize(&x, kk, None));
        words.extend(
            x.chunks(32)
                .map(|b| b.iter().map(|v| v * v).sum::<f32>().to_bits()),
        );
        // The kernel reads the words as vec4s.
        words.resize(words.len().div_ceil(4) * 4, 0);
        kernel::storage(ctx, "x", bytemuck::cast_slice(&words))
    } else {
        kernel::storage(ctx, "x", bytemuck::cast_slice(&x))
    };
    let ylen = s.m * s.ldy;
    let yb = kernel::poisoned(ctx, "y", ylen);
    let rows_a = s.n - nb - nc;
    let words: Vec<u32> = match family {
        Family::Vec => [s.m, kk, rows_a, nb, nc, s.n_offset, s.ldy, xqo, 0]
            .iter()
            .map(|&v| v as u32)
            .collect(),
        Family::Tiled => [s.m, kk, s.n, s.n_offset, s.ldy]
            .iter()
            .map(|&v| v as u32)
            .collect(),
    };
    let pb = kernel::uniform(ctx, "p", &words);
    let groups = match family {
        Family::Vec => {
            let r = knob(knobs, "ROWS") as usize;
            // QOUT: a workgroup per 32-row block.
            let count = if qout && !qlast {
                rows_a / 32
            } else {
                rows_a.div_ceil(r) + nb.div_ceil(r) + nc.div_ceil(r)
            };
            let mut g = spread(count as u32, s.spread_max);
            g[2] = s.m as u32;
            g
        }
        Family::Tiled => {
            let tiles =
                (s.n as u32).div_ceil(knob(knobs, "TN")) * (s.m as u32).div_ceil(knob(knobs, "TM"));
            spread(tiles, s.spread_max)
        }
    };
    // QOUT: the int8 rows and block sums.
    let blocks = s.m * s.n / 32;
    let qwords = s.m * (s.n / 4 + s.n / 32) + blocks;
    let qb = kernel::poisoned(ctx, "yq", qwords);
    let counters = kernel::storage(ctx, "qcnt", &vec![0u8; blocks * 4]);
    let bind = match family {
        Family::Vec => {
            let mut b: Vec<(u32, &wgpu::Buffer)> =
                wbs.iter().enumerate().map(|(i, w)| (i as u32, w)).collect();
            b.extend([(3, &xb), (4, &yb), (5, &pb)]);
            if qout {
                b.push((6, &qb));
            }
            if qlast {
                b.push((7, &counters));
            }
            k.bind_at(ctx, &b)
        }
        Family::Tiled => k.bind(ctx, &[&wbs[0], &xb, &yb, &pb]),
    };
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    k.dispatch(&mut enc, &bind, groups);
    ctx.queue.submit([enc.finish()]);
    let y = kernel::read_f32(ctx, &yb, ylen).map_err(|e| e.to_string())?;
    if qout {
        let rows: Vec<f32> = y
            .chunks(s.ldy)
            .flat_map(|r| r[s.n_offset..s.n_offset + s.n].to_vec())
            .collect();
        check_qout(ctx, &rows, s.n, &qb, blocks)?;
    }
    if qlast {
        // Every block's last workgroup left its counter zero for the next
        // dispatch.
        let left =
            kernel::read_bytes(ctx, &counters, (blocks * 4) as u64).map_err(|e| e.to_string())?;
        if left.iter().any(|&b| b != 0) {
            return Err(format!("QLAST left block counters nonzero: {left:?}"));
        }
    }

    let mut got = Vec::with_capacity(s.m * s.n);
    for m in 0..s.m {
        for (j, v) in y[m * s.ldy..(m + 1) * s.ldy].iter().enumerate() {
            if (s.n_offset..s.n_offset + s.n).contains(&j) {
                got.push(*v);
            } else if !v.is_nan() {
                return Err(format!(
                    "{s:?} K {kk}: wrote y[{m}, {j}] = {v} outside the chunk's columns"
                ));
            }
        }
    }
    let err = rel_l2(&got, &want);
    if err <= tolerance(knobs) {
        Ok(err)
    } else {
        let bad = got
            .iter()
            .zip(&want)
            .position(|(g, w)| !g.is_finite() || (g - w).abs() > 1e-3 * (1.0 + w.abs()));
        let detail = bad
            .map(|i| {
                format!(
                    "; first bad y[{}, {}]: {} vs {}",
                    i / s.n,
                    i % s.n,
                    got[i],
                    want[i]
                )
            })
            .unwrap_or_default();
        Err(format!(
            "{s:?} K {kk}: rel L2 {err:e} > {:e}{detail}",
            tolerance(knobs)
        ))
    }
}

/// matmul_vec QOUT's int8 rows against the CPU quantization of the rows it
/// stored (`y`, M rows of N): q within 1 (the GPU's 1 / max may round a
/// product at .5 the other way), scales and per-block Σ x² within 1e-5
/// relative.
fn check_qout(
    ctx: &GpuContext,
    y: &[f32],
    n: usize,
    qb: &wgpu::Buffer,
    blocks: usize,
) -> Result<(), String> {
    let m = y.len() / n;
    let row = n / 4 + n / 32;
    let got: Vec<u32> = bytemuck::pod_collect_to_vec(
        &kernel::read_bytes(ctx, qb, 4 * (m * row + blocks) as u64).map_err(|e| e.to_string())?,
    );
    let want = q8_quantize(y, n, None);
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1e-30);
    for r in 0..m {
        for i in 0..row {
            let (g, w) = (got[r * row + i], want[r * row + i]);
            let ok = if i < n / 4 {
                g.to_le_bytes()
                    .iter()
                    .zip(w.to_le_bytes())
                    .all(|(a, b)| (*a as i8 as i32 - b as i8 as i32).abs() <= 1)
            } else {
                close(f32::from_bits(g), f32::from_bits(w))
            };
            if !ok {
                return Err(format!("QOUT row {r} word {i}: {g:#010x}, want {w:#010x}"));
            }
        }
    }
    for (b, blk) in y.chunks(32).enumerate() {
        let want = blk.iter().map(|v| v * v).sum::<f32>();
        let g = f32::from_bits(got[m * row + b]);
        if (g - want).abs() > 1e-5 * want.max(1e-30) {
            return Err(format!("QOUT block {b}: Σ x² {g}, want {want}"));
        }
    }
    Ok(())
}

/// Every variant of a matmul template on every feature set, dtype and shape,
/// and every variant with the knobs of each of `pins` pinned (knob values
/// the template's cover rule would only meet with DTYPE at its first).
fn matmul_all_variants(name: &str, family: Family, shapes: &[Shape], pins: &[&[(&str, &str)]]) {
    let mut rng = Rng(fresh_seed());
    let t = codegen::template(name).unwrap();
    let mut failures = Vec::new();
    let mut runs = 0;
    // Largest error seen with f32 and with f16 products.
    let mut worst = [0f64; 2];
    for ctx in gpu_contexts() {
        let mut variants = t.variants(&caps(&ctx)).unwrap();
        for pin in pins {
            let fixed: Knobs = pin
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            let more = t.variants_pinned(&fixed, &caps(&ctx)).unwrap();
            assert!(!more.is_empty(), "{name}: no variant with {pin:?}");
            for k in more {
                if !variants.contains(&k) {
                    variants.push(k);
                }
            }
        }
        assert!(
            !variants.is_empty(),
            "{name}: no variant for {:?}",
            ctx.features
        );
        for knobs in variants {
            let k = build(&ctx, &t, &knobs);
            for &s in shapes {
                runs += 1;
                match check_matmul(&ctx, family, &k, &knobs, &mut rng, s) {
                    Ok(err) => {
                        let tol = tolerance(&knobs);
                        let w = &mut worst[(tol > 1e-4) as usize];
                        *w = w.max(err);
                    }
                    Err(e) => failures.push(format!(
                        "{} on {:?}: {e}",
                        variant_name(&t.name, &knobs),
                        ctx.features
                    )),
                }
            }
        }
    }
    eprintln!(
        "{name}: worst rel L2 {:e} with f32 products, {:e} with f16",
        worst[0], worst[1]
    );
    report(name, runs, &failures);
}

fn build(ctx: &GpuContext, t: &Template, knobs: &Knobs) -> Kernel {
    Kernel::build(ctx, t, knobs).unwrap_or_else(|e| panic!("{e}"))
}

fn report(name: &str, runs: usize, failures: &[String]) {
    eprintln!(
        "{name}: {runs} variant × shape runs, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {runs} runs failed:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn matmul_vec_all_variants() {
    matmul_all_variants(
        "matmul_vec",
        Family::Vec,
        &[
            // One token; the whole output.
            Shape {
                m: 1,
                n: 13,
                n_offset: 0,
                ldy: 13,
                spread_max: 65535,
            },
            // Several tokens; a chunk of a wider output; a 2-D grid.
            Shape {
                m: 5,
                n: 13,
                n_offset: 7,
                ldy: 29,
                spread_max: 2,
            },
        ],
        // The int8-input path (XQ) with one weight, with a pair, and with
        // three siblings of mixed dtypes and layouts; a pair reading a
        // normed int8 row and quantizing its own output (as the gate and
        // up of a decode layer between two others do).
        &[
            &[
                ("DTYPE_B", "Q4_0"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "1"),
                ("XS", "0"),
                ("NORM", "1"),
                ("XQ", "1"),
                ("QOUT", "1"),
            ],
            // The same with plain workgroups, the last of a block
            // quantizing it.
            &[
                ("DTYPE_B", "Q4_0"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "1"),
                ("XS", "0"),
                ("NORM", "1"),
                ("XQ", "1"),
                ("QOUT", "1"),
                ("QLAST", "1"),
            ],
            // A Q4_K_M gate/up: a pair beside a Q4_K weight quantizing
            // its output in block-owning workgroups (planned since stop 23).
            &[
                ("DTYPE_B", "Q4_K"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "1"),
                ("XS", "0"),
                ("NORM", "1"),
                ("XQ", "1"),
                ("QOUT", "1"),
            ],
            // One weight quantizing its output (an o-proj or down with
            // the residual add), with its int8 row made in workgroup
            // memory by the prologue (as an o-proj merging a split
            // attention does) and from a producer.
            &[
                ("DTYPE_B", "NONE"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "0"),
                // (K <= XS: re-laid Q6_K rows are 2048 elements here.)
                ("XS", "4096"),
                ("NORM", "0"),
                ("XQ", "1"),
                ("QOUT", "1"),
            ],
            &[
                ("DTYPE_B", "NONE"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "0"),
                ("XS", "0"),
                ("NORM", "0"),
                ("XQ", "1"),
                ("QOUT", "1"),
            ],
            &[
                ("DTYPE_B", "NONE"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "0"),
                ("XS", "0"),
                ("NORM", "0"),
                ("XQ", "1"),
                ("QOUT", "1"),
                ("QLAST", "1"),
            ],
            &[
                ("DTYPE_B", "NONE"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "0"),
                ("XS", "0"),
                ("NORM", "0"),
                ("XQ", "1"),
            ],
            &[
                ("DTYPE_B", "Q6_K"),
                ("DTYPE_C", "NONE"),
                ("PAIR", "1"),
                ("XS", "0"),
                ("NORM", "0"),
                ("XQ", "1"),
            ],
            &[
                ("DTYPE_B", "Q8_0"),
                ("DTYPE_C", "Q4_0"),
                ("PAIR", "0"),
                ("XS", "0"),
                ("NORM", "0"),
                ("XQ", "1"),
            ],
            // A Q4_K_M-style QKV: a re-laid Q6_K V beside Q4_K.
            &[
                ("DTYPE_B", "Q4_K"),
                ("DTYPE_C", "Q6_KX"),
                ("PAIR", "0"),
                ("XS", "0"),
                ("NORM", "0"),
                ("XQ", "1"),
            ],
        ],
    );
}

#[test]
fn matmul_tiled_all_variants() {
    matmul_all_variants(
        "matmul_tiled",
        Family::Tiled,
        &[
            // One token: a single, mostly empty tile.
            Shape {
                m: 1,
                n: 13,
                n_offset: 0,
                ldy: 13,
                spread_max: 65535,
            },
            // Several tiles along m and n, both partial; a chunk of a wider
            // output; a 2-D grid.
            Shape {
                m: 37,
                n: 70,
                n_offset: 5,
                ldy: 80,
                spread_max: 2,
            },
        ],
        &[],
    );
}

/// One embed shape class: tokens, the table chunk, the largest workgroup
/// count per grid dimension.
#[derive(Debug, Clone, Copy)]
struct EmbedShape {
    t: usize,
    row_offset: usize,
    rows: usize,
    spread_max: u32,
}

fn check_embed(
    ctx: &GpuContext,
    k: &Kernel,
    knobs: &Knobs,
    rng: &mut Rng,
    s: EmbedShape,
) -> Result<(), String> {
    let dt = dtype(knobs);
    let d = k_for(dt).max(relaid_k(&knobs["DTYPE"]));
    let bytes = random_weights(rng, dt, s.rows, d);
    let table = dequant::dequantize(dt, &bytes, s.rows * d).expect("CPU dequant");
    // Random ids around the chunk, plus its first and last rows and the
    // rows just outside it.
    let span = (s.row_offset + s.rows + 8) as u64;
    let mut ids: Vec<u32> = (0..s.t).map(|_| (rng.next_u64() % span) as u32).collect();
    let edges = [
        Some(s.row_offset),
        Some(s.row_offset + s.rows - 1),
        s.row_offset.checked_sub(1),
        Some(s.row_offset + s.rows),
    ];
    for (id, e) in ids.iter_mut().zip(edges) {
        if let Some(e) = e {
            *id = e as u32;
        }
    }

    let tb = upload_weights(ctx, &knobs["DTYPE"], dt, d, &bytes);
    let ib = kernel::storage(ctx, "ids", bytemuck::cast_slice(&ids));
    let yb = kernel::poisoned(ctx, "y", s.t * d);
    let pb = kernel::uniform(
        ctx,
        "p",
        &[s.t as u32, d as u32, s.row_offset as u32, s.rows as u32],
    );
    let bind = k.bind(ctx, &[&tb, &ib, &yb, &pb]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    k.dispatch(&mut enc, &bind, spread(s.t as u32, s.spread_max));
    ctx.queue.submit([enc.finish()]);
    let y = kernel::read_f32(ctx, &yb, s.t * d).map_err(|e| e.to_string())?;

    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (t, &id) in ids.iter().enumerate() {
        let row = &y[t * d..(t + 1) * d];
        let id = id as usize;
        if (s.row_offset..s.row_offset + s.rows).contains(&id) {
            got.extend_from_slice(row);
            let r = id - s.row_offset;
            want.extend_from_slice(&table[r * d..(r + 1) * d]);
        } else if let Some(i) = row.iter().position(|v| !v.is_nan()) {
            return Err(format!(
                "{s:?} d {d}: token {t} (id {id}, outside the chunk) got y[{t}, {i}] = {}",
                row[i]
            ));
        }
    }
    assert!(!got.is_empty(), "the ids always include rows in the chunk");
    let err = rel_l2(&got, &want);
    if err <= 1e-6 {
        Ok(())
    } else {
        Err(format!("{s:?} d {d} ids {ids:?}: rel L2 {err:e}"))
    }
}

#[test]
fn embed_all_variants() {
    let mut rng = Rng(fresh_seed());
    let t = codegen::template("embed").unwrap();
    let shapes = [
        EmbedShape {
            t: 9,
            row_offset: 5,
            rows: 11,
            spread_max: 65535,
        },
        // The first chunk of a table; a 2-D grid.
        EmbedShape {
            t: 7,
            row_offset: 0,
            rows: 6,
            spread_max: 3,
        },
    ];
    let mut failures = Vec::new();
    let mut runs = 0;
    for ctx in gpu_contexts() {
        let variants = t.variants(&caps(&ctx)).unwrap();
        assert!(
            !variants.is_empty(),
            "embed: no variant for {:?}",
            ctx.features
        );
        for knobs in variants {
            let k = build(&ctx, &t, &knobs);
            for &s in &shapes {
                runs += 1;
                if let Err(e) = check_embed(&ctx, &k, &knobs, &mut rng, s) {
                    failures.push(format!(
                        "{} on {:?}: {e}",
                        variant_name(&t.name, &knobs),
                        ctx.features
                    ));
                }
            }
        }
    }
    report("embed", runs, &failures);
}

/// The templates offer every dtype kiln can dequantize (and the GPU
/// layouts of their own), and nothing else.
#[test]
fn templates_cover_every_supported_dtype() {
    let mut want: Vec<String> = DType::supported().map(|d| d.to_string()).collect();
    // Layouts of their own on the GPU (DType::gpu_layout).
    want.extend(
        kiln::model::dtype::GPU_LAYOUTS
            .iter()
            .map(|l| l.1.to_string()),
    );
    want.sort();
    for name in ["matmul_vec", "matmul_tiled", "embed"] {
        let t = codegen::template(name).unwrap();
        let knob = t
            .knobs
            .iter()
            .find(|k| k.name == "DTYPE")
            .expect("DTYPE knob");
        let mut have = knob.values.clone();
        have.sort();
        assert_eq!(have, want, "{name}");
    }
}

/// Seconds per dispatch of `k` over `groups`: 100 dispatches in one
/// compute pass, as a decode step runs them (on the H200 a pass of its own
/// costs ~15 µs more per dispatch), less 10, after a warm-up run (clocks
/// ramp: the first runs of a fresh GPU are slower).
fn time_in_one_pass(ctx: &GpuContext, k: &Kernel, bind: &wgpu::BindGroup, groups: [u32; 3]) -> f64 {
    let reps = 100u32;
    let run = |n: u32| {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for _ in 0..n {
                pass.set_pipeline(&k.pipeline);
                pass.set_bind_group(0, bind, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
        }
        let t0 = std::time::Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
        t0.elapsed().as_secs_f64()
    };
    run(reps);
    (run(reps + 10) - run(10)) / reps as f64
}

/// The (K, N) shapes of `KILN_SPEED_SHAPES` (`KxN,...`), else `default`.
fn speed_shapes(default: &str) -> Vec<(usize, usize)> {
    std::env::var("KILN_SPEED_SHAPES")
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| {
            let (k, n) = s.split_once('x').expect("KILN_SPEED_SHAPES: KxN,...");
            (k.parse().expect("K"), n.parse().expect("N"))
        })
        .collect()
}

/// Not a check: prints decode (matrix × vector) bandwidth and prefill
/// throughput of the variants on the adapter (run on a real GPU with
/// `cargo test --release --test gpu_matmul -- --ignored --nocapture`).
///
/// matmul_vec runs alone (no sibling weights, default hook) with one token
/// row, for each shape of `KILN_SPEED_SHAPES` (K x N pairs, default
/// `4096x14336,4096x32768`: the Llama-3-8B feed-forward and a wide output)
/// and each input mode of `KILN_SPEED_INPUT` (`f32` read from memory,
/// `staged` in workgroup memory (XS 4096, K <= 4096), `int8` quantized (XQ
/// 1); default all): every (WG, ROWS, SUBGROUPS, F16) variant prints a
/// line, then one summary line per shape, dtype and mode gives the
/// fastest. `KILN_SPEED_DTYPES=Q4_0,Q4_K` limits the dtypes;
/// `KILN_SPEED_TILED=0` skips matmul_tiled. The dispatches of a timing run
/// share one compute pass, so weights that fit the GPU's last-level cache
/// (50 MB on an H200) are read from it after the first: choose shapes
/// larger than the cache for memory bandwidth.
#[test]
#[ignore]
fn print_speed() {
    let mut rng = Rng(fresh_seed());
    let ctx = gpu_contexts().pop().expect("all features");
    let time = |k: &Kernel, bind: &wgpu::BindGroup, groups: [u32; 3]| {
        time_in_one_pass(&ctx, k, bind, groups)
    };
    let all = [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_0X", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q6_KX",
    ];
    let want = std::env::var("KILN_SPEED_DTYPES").ok();
    let dtypes: Vec<&str> = all
        .into_iter()
        .filter(|d| want.as_ref().is_none_or(|w| w.split(',').any(|x| x == *d)))
        .collect();

    // matmul_vec: one token row, (K, N) shapes, each input mode.
    let t = codegen::template("matmul_vec").unwrap();
    let shapes = speed_shapes("4096x14336,4096x32768");
    let modes: Vec<(&str, &str, &str)> = [
        ("f32", "0", "0"),
        ("staged", "4096", "0"),
        ("int8", "0", "1"),
    ]
    .into_iter()
    .filter(|m| std::env::var("KILN_SPEED_INPUT").map_or(true, |w| w.split(',').any(|x| x == m.0)))
    .collect();
    let mut summary = Vec::new();
    for &dt in &dtypes {
        let d = layout_dtype(dt).unwrap();
        for &(kk, n) in &shapes {
            let wbytes = random_weights(&mut rng, d, n, kk);
            let row_bytes = wbytes.len() / n;
            let wb = upload_weights(&ctx, dt, d, kk, &wbytes);
            let xb = kernel::storage(&ctx, "x", bytemuck::cast_slice(&rng.vec(kk)));
            let yb = kernel::poisoned(&ctx, "y", n);
            let pb = kernel::uniform(
                &ctx,
                "p",
                &[1, kk as u32, n as u32, 0, 0, 0, n as u32, 0, 0],
            );
            for &(mode, xs, xq) in &modes {
                if xs != "0" && kk > 4096 {
                    continue;
                }
                let fixed: Knobs = [
                    ("DTYPE", dt),
                    ("DTYPE_B", "NONE"),
                    ("DTYPE_C", "NONE"),
                    ("PAIR", "0"),
                    ("XS", xs),
                    ("NORM", "0"),
                    ("XQ", xq),
                    ("QOUT", "0"),
                ]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
                let mut best = (0.0f64, String::new());
                for knobs in t.variants_pinned(&fixed, &caps(&ctx)).unwrap() {
                    let k = build(&ctx, &t, &knobs);
                    let bind = k.bind_at(&ctx, &[(0, &wb), (3, &xb), (4, &yb), (5, &pb)]);
                    let mut g = spread((n as u32).div_ceil(knob(&knobs, "ROWS")), 65535);
                    g[2] = 1;
                    let s = time(&k, &bind, g);
                    let gbs = (n * row_bytes) as f64 / s / 1e9;
                    let name = variant_name(&t.name, &knobs);
                    eprintln!(
                        "K={kk:5} N={n:5} {name:75} {:8.1} us {gbs:8.1} GB/s",
                        s * 1e6
                    );
                    if gbs > best.0 {
                        best = (gbs, name);
                    }
                }
                summary.push(format!(
                    "summary K={kk:5} N={n:5} {dt:7} {mode:6} best {:7.1} GB/s ({})",
                    best.0, best.1
                ));
            }
        }
    }
    for l in &summary {
        eprintln!("{l}");
    }

    if std::env::var("KILN_SPEED_TILED").is_ok_and(|v| v == "0") {
        return;
    }
    let t = codegen::template("matmul_tiled").unwrap();
    let (m, kk, n) = (512, 2048, 2048);
    for &dt in &dtypes {
        let d = layout_dtype(dt).unwrap();
        let wbytes = random_weights(&mut rng, d, n, kk);
        let wb = upload_weights(&ctx, dt, d, kk, &wbytes);
        let xb = kernel::storage(&ctx, "x", bytemuck::cast_slice(&rng.vec(m * kk)));
        let yb = kernel::poisoned(&ctx, "y", m * n);
        let pb = kernel::uniform(&ctx, "p", &[m as u32, kk as u32, n as u32, 0, n as u32]);
        for knobs in t.variants(&caps(&ctx)).unwrap() {
            if knobs["DTYPE"] != dt {
                continue;
            }
            let k = build(&ctx, &t, &knobs);
            let groups = spread(
                (n as u32).div_ceil(knob(&knobs, "TN")) * (m as u32).div_ceil(knob(&knobs, "TM")),
                65535,
            );
            let bind = k.bind(&ctx, &[&wb, &xb, &yb, &pb]);
            let s = time(&k, &bind, groups);
            eprintln!(
                "{:60} {:8.1} us {:8.1} GB/s {:8.2} TFLOP/s",
                variant_name(&t.name, &knobs),
                s * 1e6,
                wbytes.len() as f64 / s / 1e9,
                2.0 * (m * n * kk) as f64 / s / 1e12
            );
        }
    }
}

/// quantize_rows (the int8 input of matmul_vec's XQ) in every variant and
/// feature set against tests/common's q8_quantize: rows of K = 4160 (130
/// blocks: several workgroups, the last one partial, and the norm's sum
/// through both of its loops; with MERGE, 65 heads of 64 merged from SPLIT (2 to 32)
/// split-attention partial rows each), written after a 5-word offset that
/// must keep its poison. q may differ by
/// one step where the GPU's 1 / max|x| rounds differently (at most 1 in
/// 500 bytes), scales by 1e-5 relative (the norm's sum in another order).
#[test]
fn quantize_rows_all_variants() {
    let mut rng = Rng(fresh_seed());
    let t = codegen::template("quantize_rows").unwrap();
    let (m, kk, qo) = (3usize, 4160usize, 5usize);
    let row_words = kk / 4 + kk / 32;
    let mut runs = 0;
    for ctx in gpu_contexts() {
        for knobs in t.variants(&caps(&ctx)).unwrap() {
            let norm = knobs["NORM"] == "1";
            let merge = knobs["MERGE"] == "1";
            let mut x = rng.vec(m * kk);
            let w = rng.vec(kk);
            let eps = 1e-5f32;
            // MERGE: 65 heads of 64, SPLIT splits; partial rows (max score,
            // Σ exp, Σ exp · v) after the M rows; the merged row replaces x.
            let (heads, dv, splits) = (65usize, 64usize, knob(&knobs, "SPLIT") as usize);
            let row = dv + 2;
            let want = if merge {
                let mut merged = Vec::new();
                for _ in 0..m * heads {
                    let rows: Vec<Vec<f32>> = (0..splits)
                        .map(|_| {
                            let mut r = rng.vec(row);
                            r[0] *= 2.0;
                            r[1] = r[1].abs() + 0.5;
                            r
                        })
                        .collect();
                    let mx = rows.iter().fold(f32::MIN, |a, r| a.max(r[0]));
                    let den: f32 = rows.iter().map(|r| (r[0] - mx).exp() * r[1]).sum();
                    for d in 0..dv {
                        let num: f32 = rows.iter().map(|r| (r[0] - mx).exp() * r[2 + d]).sum();
                        merged.push(num / den);
                    }
                    x.extend(rows.into_iter().flatten());
                }
                q8_quantize(&merged, kk, None)
            } else {
                q8_quantize(&x, kk, norm.then_some((&w[..], eps)))
            };
            let k = build(&ctx, &t, &knobs);
            let xb = kernel::storage(&ctx, "x", bytemuck::cast_slice(&x));
            let wb = kernel::storage(&ctx, "w", bytemuck::cast_slice(&w));
            let qb = kernel::poisoned(&ctx, "q", qo + m * row_words);
            let pb = kernel::uniform(
                &ctx,
                "p",
                &[m as u32, kk as u32, qo as u32, eps.to_bits(), dv as u32],
            );
            let mut binds = vec![(0, &xb), (2, &qb), (3, &pb)];
            if norm {
                binds.push((1, &wb));
            }
            let bind = k.bind_at(&ctx, &binds);
            let words = (kk / 4) as u32;
            let mut g = spread(words.div_ceil(knob(&knobs, "WG")), 2);
            g[2] = m as u32;
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            k.dispatch(&mut enc, &bind, g);
            ctx.queue.submit([enc.finish()]);
            let got: Vec<u32> = kernel::read_f32(&ctx, &qb, qo + m * row_words)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let name = variant_name(&t.name, &knobs);
            assert!(
                got[..qo].iter().all(|v| f32::from_bits(*v).is_nan()),
                "{name}: wrote before the offset"
            );
            let mut off_by_one = 0;
            for r in 0..m {
                let g = &got[qo + r * row_words..qo + (r + 1) * row_words];
                let e = &want[r * row_words..(r + 1) * row_words];
                for i in 0..kk / 4 {
                    for (a, b) in g[i].to_le_bytes().iter().zip(e[i].to_le_bytes()) {
                        let d = (*a as i8 as i32 - b as i8 as i32).abs();
                        assert!(
                            d <= 1,
                            "{name}: row {r} word {i}: {:#x} vs {:#x}",
                            g[i],
                            e[i]
                        );
                        off_by_one += d;
                    }
                }
                for i in kk / 4..row_words {
                    let (a, b) = (f32::from_bits(g[i]), f32::from_bits(e[i]));
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs(),
                        "{name}: row {r} scale {}: {a} vs {b}",
                        i - kk / 4
                    );
                }
            }
            assert!(
                off_by_one * 500 <= (m * kk) as i32,
                "{name}: {off_by_one} q off by one"
            );
            runs += 1;
        }
    }
    assert!(runs >= 12, "quantize_rows: {runs} variant runs");
}

/// Diagnostic (ignored; run on a real GPU): how fast an int8 Q4_0 matvec
/// streams when each block's 16 nibble bytes are re-laid at load as one
/// aligned 16-byte vector (nibbles of a row contiguous, the f16 scales in a
/// region of their own) and each invocation takes whole blocks, against
/// matmul_vec XQ=1 on the GGUF layout (18-byte blocks, unaligned loads).
/// Both are checked against the CPU first. `KILN_SPEED_SHAPES` as in
/// print_speed.
#[test]
#[ignore]
fn q4_0_relaid_speed() {
    let mut rng = Rng(fresh_seed());
    let ctx = gpu_contexts().pop().expect("all features");
    let time = |k: &Kernel, bind: &wgpu::BindGroup, groups: [u32; 3]| {
        time_in_one_pass(&ctx, k, bind, groups)
    };
    let shapes = speed_shapes("4096x57344,14336x16384,4096x28672,4096x6144");
    for (kk, n) in shapes {
        let wbytes = random_weights(&mut rng, DType::Q4_0, n, kk);
        let x = rng.vec(kk);
        let xq = q8_quantize(&x, kk, None);
        let w = dequant::dequantize(DType::Q4_0, &wbytes, n * kk).unwrap();
        let want = ops::matmul(&q8_dequantize(&xq, kk), 1, &w, kk, n);
        let xb = kernel::storage(&ctx, "x", bytemuck::cast_slice(&xq));
        // The current kernel.
        let t = codegen::template("matmul_vec").unwrap();
        let knobs: Knobs = [
            ("DTYPE", "Q4_0"),
            ("DTYPE_B", "NONE"),
            ("DTYPE_C", "NONE"),
            ("PAIR", "0"),
            ("XS", "0"),
            ("WG", "128"),
            ("ROWS", "4"),
            ("SUBGROUPS", "1"),
            ("F16", "0"),
            ("NORM", "0"),
            ("XQ", "1"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let k = build(&ctx, &t, &knobs);
        let wb = kernel::storage(&ctx, "w", &wbytes);
        let yb = kernel::poisoned(&ctx, "y", n);
        let pb = kernel::uniform(
            &ctx,
            "p",
            &[1, kk as u32, n as u32, 0, 0, 0, n as u32, 0, 0],
        );
        let bind = k.bind_at(&ctx, &[(0, &wb), (3, &xb), (4, &yb), (5, &pb)]);
        let mut g = spread((n as u32).div_ceil(4), 65535);
        g[2] = 1;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        k.dispatch(&mut enc, &bind, g);
        ctx.queue.submit([enc.finish()]);
        let err = rel_l2(&kernel::read_f32(&ctx, &yb, n).unwrap(), &want);
        assert!(err < 1e-4, "matmul_vec: rel L2 {err}");
        let s = time(&k, &bind, g);
        eprintln!(
            "K={kk:5} N={n:6} matmul_vec XQ=1 GGUF layout      {:7.1} us {:7.1} GB/s",
            s * 1e6,
            wbytes.len() as f64 / s / 1e9
        );
        drop((wb, yb));
        // Re-laid: nibbles [n, K/32] of 16 bytes, then scales [n, K/32] f16.
        let nb = kk / 32;
        let mut nib = Vec::with_capacity(n * nb * 16);
        let mut sc = Vec::with_capacity(n * nb * 2);
        for blk in wbytes.chunks(18) {
            sc.extend_from_slice(&blk[..2]);
            nib.extend_from_slice(&blk[2..]);
        }
        let nibb = kernel::storage(&ctx, "nib", &nib);
        let scb = kernel::storage(&ctx, "sc", &sc);
        for (wg, rows, blocks) in [
            (128, 4, 1),
            (64, 4, 1),
            (128, 2, 1),
            (128, 4, 2),
            (256, 4, 1),
            (64, 4, 2),
            (32, 4, 1),
        ] {
            let wgsl = relaid_q4_0_kernel(wg, rows, blocks);
            let k = Kernel::from_wgsl(&ctx, "q4_0_relaid", wgsl);
            let yb = kernel::poisoned(&ctx, "y", n);
            let pb = kernel::uniform(&ctx, "p", &[kk as u32, n as u32, 0, 0]);
            let bind = k.bind(&ctx, &[&nibb, &scb, &xb, &yb, &pb]);
            let mut g = spread((n as u32).div_ceil(rows), 65535);
            g[2] = 1;
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            k.dispatch(&mut enc, &bind, g);
            ctx.queue.submit([enc.finish()]);
            let err = rel_l2(&kernel::read_f32(&ctx, &yb, n).unwrap(), &want);
            assert!(err < 1e-4, "re-laid WG {wg} ROWS {rows}: rel L2 {err}");
            let s = time(&k, &bind, g);
            eprintln!(
                "K={kk:5} N={n:6} re-laid WG={wg:3} ROWS={rows} BLOCKS={blocks} {:7.1} us {:7.1} GB/s",
                s * 1e6,
                wbytes.len() as f64 / s / 1e9
            );
        }
    }
}

/// The re-laid Q4_0 int8 matvec of [`q4_0_relaid_speed`]: WG invocations,
/// ROWS rows a workgroup, BLOCKS blocks an invocation per iteration (their
/// loads issued together). Needs subgroups.
fn relaid_q4_0_kernel(wg: u32, rows: u32, blocks: u32) -> String {
    format!(
        r#"
struct P {{ k: u32, n: u32, a: u32, b: u32 }}
@group(0) @binding(0) var<storage, read> nib: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> sc: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
const WG: u32 = {wg}u;
const ROWS: u32 = {rows}u;
const BL: u32 = {blocks}u;
var<workgroup> part: array<f32, ROWS * WG>;

fn f16_at(h: u32) -> f32 {{
    let w = sc[h >> 1u] >> ((h & 1u) * 16u);
    let bits = ((w & 0x7fffu) << 13u) | ((w & 0x8000u) << 16u);
    return bitcast<f32>(bits) * bitcast<f32>(0x77800000u);
}}

@compute @workgroup_size({wg})
fn main(@builtin(workgroup_id) wgid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_id) sg: u32,
        @builtin(num_subgroups) nsg: u32) {{
    let g = wgid.x + wgid.y * nwg.x;
    let n0 = g * ROWS;
    if n0 >= p.n {{ return; }}
    let nb = p.k / 32u;
    var acc: array<f32, ROWS>;
    let m4 = 0x0f0f0f0fu;
    let one = 0x01010101u;
    for (var j0 = lid * BL; j0 < nb; j0 += WG * BL) {{
        for (var u = 0u; u < BL; u++) {{
            let j = j0 + u;
            if j < nb {{
                // The input block: 8 words of q, its scale, Σ q.
                let qa = x[2u * j];
                let qb = x[2u * j + 1u];
                let dx = bitcast<f32>(x[nb * 2u + j / 4u][j % 4u]);
                let sq = (dot4I8Packed(qa.x, one) + dot4I8Packed(qa.y, one)) + (dot4I8Packed(qa.z, one) + dot4I8Packed(qa.w, one))
                    + (dot4I8Packed(qb.x, one) + dot4I8Packed(qb.y, one)) + (dot4I8Packed(qb.z, one) + dot4I8Packed(qb.w, one));
                for (var r = 0u; r < ROWS; r++) {{
                    let row = min(n0 + r, p.n - 1u);
                    let w = nib[row * nb + j];
                    let lo = w & vec4<u32>(m4);
                    let hi = (w >> vec4<u32>(4u)) & vec4<u32>(m4);
                    let s = (dot4I8Packed(lo.x, qa.x) + dot4I8Packed(lo.y, qa.y)) + (dot4I8Packed(lo.z, qa.z) + dot4I8Packed(lo.w, qa.w))
                        + (dot4I8Packed(hi.x, qb.x) + dot4I8Packed(hi.y, qb.y)) + (dot4I8Packed(hi.z, qb.z) + dot4I8Packed(hi.w, qb.w));
                    acc[r] += f16_at(row * nb + j) * dx * f32(s - 8 * sq);
                }}
            }}
        }}
    }}
    for (var r = 0u; r < ROWS; r++) {{
        let t = subgroupAdd(acc[r]);
        if lane == 0u {{ part[r * WG + sg] = t; }}
    }}
    workgroupBarrier();
    if lid < ROWS && n0 + lid < p.n {{
        var t = 0.0;
        for (var s = 0u; s < nsg; s++) {{ t += part[lid * WG + s]; }}
        y[n0 + lid] = t;
    }}
}}
"#
    )
}
