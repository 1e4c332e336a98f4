//! Fused groups become launches: the hook WGSL a fused `matmul_vec` needs
//! (bindings, prologue, store epilogue) is generated here from the graph
//! nodes the group holds, and decode attention gets its prep knobs.

use std::fmt::Write;

use super::fuse::{self, AttnPrep, Matvec, Merge};
use super::{heads, knob, numel, u, uc, Buf, Builder, Groups, Lin, WeightPlan, Word};
use crate::codegen::Hooks;
use crate::error::{Error, Result};
use crate::graph::ir::{BoundGraph, BoundOp, Dim, RopeMode, Unary, ValueId};
use crate::model::dtype::DType;

/// Staging capacities of matmul_vec's prologue (its XS knob).
const XS: [usize; 4] = [1024, 2048, 4096, 8192];

/// Largest input row a prologue can stage.
pub const MAX_PROLOGUE_K: usize = 8192;

fn lit(x: f64) -> String {
    let s = format!("{:?}", x as f32);
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

fn act(u: &Unary) -> &'static str {
    match u {
        Unary::Silu => "act_silu",
        Unary::Gelu => "act_gelu",
        Unary::GeluTanh => "act_gelu_tanh",
        Unary::Tanh => "tanh_k",
        Unary::Relu => "act_relu",
    }
}

/// Bindings of a hook: numbered from `next`, each with its buffer.
struct Binds {
    decl: String,
    bufs: Vec<Buf>,
}

impl Binds {
    fn add(&mut self, name: &str, write: bool, buf: Buf) {
        self.add_as(name, write, buf, "f32");
    }

    /// A binding of `elem` elements (`vec4<f32>` for 16-byte loads).
    fn add_as(&mut self, name: &str, write: bool, buf: Buf, elem: &str) {
        let n = self.bufs.len();
        let access = if write { "read_write" } else { "read" };
        let _ = writeln!(
            self.decl,
            "@group(0) @binding({n}) var<storage, {access}> {name}: array<{elem}>;"
        );
        self.bufs.push(buf);
    }
}

#[allow(clippy::too_many_arguments)]
/// The WGSL expression for elementwise op `n` applied to `v`, reading its
/// other operand (bound as `r`) at `same` (same shape) or `bcast`.
fn elementwise(
    g: &BoundGraph,
    node: usize,
    carry: usize,
    v: &str,
    binds: &mut Binds,
    vb: &dyn Fn(ValueId) -> Buf,
    same: &str,
    bcast: &str,
) -> Result<String> {
    let n = &g.nodes[node];
    Ok(match &n.op {
        BoundOp::Add | BoundOp::Mul => {
            let o = n.inputs[1 - carry.min(1)];
            let name = format!("r{}", binds.bufs.len());
            binds.add(&name, false, vb(o));
            let idx = if g.values[o].shape.first() == Some(&Dim::Tokens) {
                same
            } else {
                bcast
            };
            let op = if matches!(n.op, BoundOp::Add) {
                "+"
            } else {
                "*"
            };
            format!("{v} {op} {name}[{idx}]")
        }
        BoundOp::Scale { by } => format!("{v} * {}", lit(*by)),
        BoundOp::Unary(u) => format!("{}({v})", act(u)),
        BoundOp::Softcap { cap } => format!("act_softcap({v}, {})", lit(*cap)),
        other => {
            return Err(Error::Gpu(format!(
                "internal: {other:?} cannot be fused as an elementwise op"
            )))
        }
    })
}

/// Plan a fused matrix × vector group.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_matvec(
    b: &mut Builder,
    g: &BoundGraph,
    gi: usize,
    m: &Matvec,
    quant: &Quantized,
    weights: &mut [WeightPlan],
    value_buf: &[usize],
) -> Result<()> {
    let vb = |v: usize| Buf::Value(value_buf[v]);
    // Epilogue operands: values, or the f32 copies of absorbed weights.
    let consts: Vec<(ValueId, usize)> = m
        .consts
        .iter()
        .filter_map(|&c| match g.nodes[c].op {
            BoundOp::Weight { w } => Some((g.nodes[c].output, w)),
            _ => None,
        })
        .collect();
    for &(_, w) in &consts {
        weights[w].f32_copy = true;
    }
    let vbe = |v: usize| match consts.iter().find(|c| c.0 == v) {
        Some(&(_, w)) => Buf::F32(w),
        None => vb(v),
    };
    let ws = mat_weights(g, m);
    for &w in &ws {
        weights[w].raw = true;
    }
    let k = g.weights[ws[0]].dims[0];
    let input = g.nodes[m.mats[0]].inputs[0];
    let rows_m = {
        let e = numel(&g.values[input].shape);
        Lin {
            t: e.t / k as u64,
            p: 0,
            c: e.c / k as u64,
        }
    };
    let (_, writes) = fuse::io(g, &super::fuse::Group::Matvec(m.clone()));
    let chunked = ws.iter().any(|&w| weights[w].chunks.len() > 1);
    if chunked && ws.len() > 1 {
        return Err(Error::Gpu(format!(
            "weights {} are fused as siblings but one is split across bindings; run with --no-fuse siblings",
            ws.iter().map(|&w| g.weights[w].name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    let pair = m.pair.is_some();
    let start = group_start(g, m);
    let outs = group_outputs(g, m);
    let mut nodes: Vec<usize> = super::fuse::Group::Matvec(m.clone()).nodes();
    nodes.sort_unstable();
    let int8 = int8_reader(b, g, m, weights);
    // The producer already wrote the int8 row (its QOUT) after `start`.
    let prequant = quant.readers.get(&gi).copied().filter(|_| int8);
    let qout = quant.by_producer.get(&gi).copied();
    let dts: Vec<String> = ws
        .iter()
        .map(|&w| g.weights[w].dtype.gpu_layout(g.weights[w].dims[0]))
        .collect();
    // Output rows of the group (a pair's count once: its rows go together).
    let n_rows: usize = if pair { &ws[..1] } else { &ws[..] }
        .iter()
        .map(|&w| g.weights[w].dims[1..].iter().product::<usize>())
        .sum();
    // A split attention's merge made into the int8 row in workgroup memory
    // by the matmul's own prologue (XQ with XS), where the workgroup is wide
    // enough to take the row a word an invocation: no quantize_rows
    // dispatch before it. (Narrower workgroups would merge in several
    // rounds of dependent loads, each longer than that dispatch.)
    let stage = XS.iter().copied().find(|&c| c >= k);
    let int8_shape = |staged: bool| {
        int8_shape(
            b,
            &ws,
            &dts,
            weights,
            n_rows,
            k,
            pair,
            qout.is_some(),
            stage.filter(|_| staged).unwrap_or(0),
        )
    };
    let merge_staged = int8
        && m.merge.is_some()
        && !b.merge_int8_apart
        && stage.is_some()
        && int8_shape(true).0 as usize >= k / 4;
    let (wg8, rows8) = int8_shape(merge_staged);
    // The output quantized by the last workgroup of each block (QLAST).
    let qlast = qout.is_some() && b.qout_last && !merge_staged;
    let xs = if merge_staged {
        stage.unwrap_or(0)
    } else if int8 || ((m.prologue.is_empty() || m.scaled) && m.merge.is_none()) {
        0
    } else {
        stage.ok_or_else(|| {
            Error::Gpu(format!(
                "a fused prologue needs a row of {k} elements, more than {MAX_PROLOGUE_K}; run with --no-fuse prologue"
            ))
        })?
    };
    let dt = |j: usize| dts.get(j).cloned().unwrap_or_else(|| "NONE".into());
    let (dt_a, dt_b, dt_c) = (dt(0), dt(1), dt(2));
    let xs_s = xs.to_string();
    // Where the int8 row starts: after the producer's output, or after this
    // group's own (written by quantize_rows before the matmul runs); in
    // workgroup memory when the prologue makes it.
    let xqo = match prequant {
        Some(o) => o,
        None if int8 && !merge_staged => plan_quantize(
            b, g, m, &nodes, start, outs[0], k, rows_m, weights, value_buf,
        )?,
        None => Lin::c(0),
    };
    let wg_knob = wg8.to_string();
    let rows_knob = rows8.to_string();
    let mut fixed = vec![
        ("DTYPE", dt_a.as_str()),
        ("DTYPE_B", dt_b.as_str()),
        ("DTYPE_C", dt_c.as_str()),
        ("PAIR", if pair { "1" } else { "0" }),
        ("XS", xs_s.as_str()),
        (
            "NORM",
            if m.scaled && (!int8 || prequant.is_some()) {
                "1"
            } else {
                "0"
            },
        ),
        ("XQ", if int8 { "1" } else { "0" }),
        ("QOUT", if qout.is_some() { "1" } else { "0" }),
        ("QLAST", if qlast { "1" } else { "0" }),
    ];
    if int8 {
        if rows8 == 2 || qout.is_some() {
            fixed.push(("ROWS", rows_knob.as_str()));
        }
        fixed.push(("WG", wg_knob.as_str()));
    } else if n_rows.div_ceil(4) >= WIDE_OUTPUT_WORKGROUPS {
        // f32 input over very many workgroups (an output projection over a
        // large vocabulary): 64 invocations and 8 rows a workgroup. Each
        // workgroup stages (and with a prologue normalizes) the whole
        // input row again, and at the short rows such models have most of
        // 256 invocations idle. H200, output projections: Gemma 3 (262144
        // rows of 640) 517 -> 336 µs a step at 64 wide, 282 with 8 rows;
        // SmolLM2 (49152 of 576) 82 -> 55 -> 53; the per-layer matmuls
        // (<= 2048 workgroups) are faster at 256 wide and 4 rows (SmolLM2
        // o-proj 347 -> 425 µs at 64 wide; either model 5-12% slower in
        // decode with 8 rows everywhere; matmul_vec.wgsl lists ROWS 8
        // before 4 so that 4 stays the default).
        fixed.push(("WG", "64"));
        fixed.push(("ROWS", "8"));
    }
    let fused = if qout.is_some() {
        describe(g, m) + "+quantize"
    } else {
        describe(g, m)
    };
    for c in 0..weights[ws[0]].chunks.len() {
        let (first, rows) = weights[ws[0]].chunks[c];
        // Bindings: 0..2 weights, 3 the input row, then the rest.
        let mut bd = Binds {
            decl: String::new(),
            bufs: Vec::new(),
        };
        for (j, name) in ["w_a", "w_b", "w_c"].iter().enumerate() {
            match ws.get(j) {
                Some(&w) => {
                    // Layouts with aligned 16-byte fields are read as
                    // vectors (matmul_vec.wgsl).
                    let ty = if VECTOR_LAYOUTS.contains(&dts[j].as_str()) {
                        "array<vec4<u32>>"
                    } else {
                        "array<u32>"
                    };
                    let _ = writeln!(
                        bd.decl,
                        "@group(0) @binding({j}) var<storage, read> {name}: {ty};"
                    );
                    bd.bufs.push(Buf::Raw {
                        weight: w,
                        chunk: if j == 0 { c } else { 0 },
                    });
                }
                None => bd.bufs.push(Buf::Unbound),
            }
        }
        // Without a staged row the input is read straight from memory: as
        // 16-byte loads where rows are whole vec4s (every quantized K); or
        // quantized, after the first output.
        let x4 = xs == 0 && m.merge.is_none() && k.is_multiple_of(4);
        let mut x_fns = if merge_staged {
            // The attention's output buffer (partials after the row); the
            // prologue makes the int8 row in workgroup memory.
            bd.add("x", false, vb(start));
            xq_fns("xqs")
        } else if int8 {
            // After the producer's output row, or after this group's own
            // output (where quantize_rows put it).
            bd.add_as(
                "x",
                false,
                vb(if prequant.is_some() { start } else { outs[0] }),
                "vec4<u32>",
            );
            let mut f = xq_fns("x");
            if prequant.is_some() && m.scaled {
                let Some(BoundOp::RmsNorm { eps, .. }) =
                    m.prologue.first().map(|&(p, _)| &g.nodes[p].op)
                else {
                    return Err(Error::Gpu(
                        "internal: a scaled prologue is not an RMSNorm".into(),
                    ));
                };
                let _ = write!(f, "\nconst NORM_EPS: f32 = {};\n", lit(*eps));
            }
            f
        } else if x4 {
            bd.add_as("x", false, vb(start), "vec4<f32>");
            String::from("fn x_in(i: u32) -> f32 {\n    return x[i >> 2u][i & 3u];\n}\n\nfn x_in4(i: u32) -> vec4<f32> {\n    return x[i >> 2u];\n}\n")
        } else {
            bd.add("x", false, vb(start));
            String::from("fn x_in(i: u32) -> f32 {\n    return x[i];\n}\n\nfn x_in4(i: u32) -> vec4<f32> {\n    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);\n}\n")
        };
        // The folded RMSNorm (rows of whole vec4s, so x4): its weight, as
        // vec4s, and its epsilon.
        if m.scaled && !int8 {
            let Some(BoundOp::RmsNorm { weight, eps }) =
                m.prologue.first().map(|&(p, _)| &g.nodes[p].op)
            else {
                return Err(Error::Gpu(
                    "internal: a scaled prologue is not an RMSNorm".into(),
                ));
            };
            let wmul = match weight {
                Some(w) => {
                    weights[*w].f32_copy = true;
                    bd.add_as("nw", false, Buf::F32(*w), "vec4<f32>");
                    "nw[e >> 2u]"
                }
                None => "vec4<f32>(1.0)",
            };
            let _ = write!(
                x_fns,
                "\nfn x_w4(e: u32) -> vec4<f32> {{\n    return {wmul};\n}}\n\nconst NORM_EPS: f32 = {};\n",
                lit(*eps)
            );
        }
        let mut pro = String::from("fn prologue(m: u32, g: u32) {\n");
        if let Some(mg) = m.merge.as_ref().filter(|_| merge_staged || !int8) {
            let (defs, body) = merge_prologue(g, mg, k, int8)?;
            x_fns += &defs;
            pro += &body;
        } else if int8 {
            // quantize_rows did the norm or merge.
        } else if xs > 0 {
            pro += "    let xo = m * p.k;\n";
            pro +=
                "    for (var e = lid_; e < p.k; e += WG) {\n        xs_st(e, x[xo + e]);\n    }\n";
            for &(p, carry) in &m.prologue {
                let n = &g.nodes[p];
                // Op names only: the same fusion in every layer is one kernel.
                let _ = writeln!(pro, "    // {}", op_name(&n.op));
                let side = if writes.contains(&n.output) {
                    let name = format!("s{}", bd.bufs.len());
                    bd.add(&name, true, vb(n.output));
                    format!(
                        "\n        if g == 0u {{\n            {name}[xo + e] = xs_ld(e);\n        }}"
                    )
                } else {
                    String::new()
                };
                match &n.op {
                    BoundOp::RmsNorm { weight, eps } => {
                        let wmul = match weight {
                            Some(w) => {
                                weights[*w].f32_copy = true;
                                let name = format!("r{}", bd.bufs.len());
                                bd.add(&name, false, Buf::F32(*w));
                                format!(" * {name}[e]")
                            }
                            None => String::new(),
                        };
                        let _ = write!(
                            pro,
                            "    {{\n        var ss = 0.0;\n        for (var e = lid_; e < p.k; e += WG) {{\n            let v = xs_ld(e);\n            ss += v * v;\n        }}\n        let r = inverseSqrt(wg_sum(ss) / f32(p.k) + {});\n        for (var e = lid_; e < p.k; e += WG) {{\n            xs_st(e, xs_ld(e) * r{wmul});{}\n        }}\n    }}\n",
                            lit(*eps),
                            side.replace("\n        ", "\n            ")
                        );
                    }
                    _ => {
                        let ex = elementwise(g, p, carry, "xs_ld(e)", &mut bd, &vb, "xo + e", "e")?;
                        let _ = write!(
                            pro,
                            "    for (var e = lid_; e < p.k; e += WG) {{\n        xs_st(e, {ex});{side}\n    }}\n"
                        );
                    }
                }
            }
            pro += "    workgroupBarrier();\n";
        }
        pro += "}\n";
        // Store: the pair's activation, the epilogue, the outputs.
        let mut st = String::from("fn store(seg: u32, m: u32, n: u32, a: f32, b: f32) -> f32 {\n");
        match m.pair {
            Some((Some(a), _)) => {
                let BoundOp::Unary(u) = &g.nodes[a].op else {
                    return Err(Error::Gpu("internal: gated activation is not unary".into()));
                };
                let _ = writeln!(st, "    var v = {}(a) * b;", act(u));
            }
            Some((None, _)) => st += "    var v = a * b;\n",
            None => st += "    var v = a;\n",
        }
        for &(e, carry) in &m.epilogue {
            let ex = elementwise(
                g,
                e,
                carry,
                "v",
                &mut bd,
                &vbe,
                "m * p.ldy + p.n_offset + n",
                "p.n_offset + n",
            )?;
            let _ = writeln!(st, "    v = {ex};");
        }
        if pair || ws.len() == 1 {
            let name = format!("y{}", bd.bufs.len());
            bd.add(&name, true, vb(outs[0]));
            let _ = writeln!(st, "    {name}[m * p.ldy + p.n_offset + n] = v;");
            if let Some(q) = qout {
                x_fns += &qout_fns(&mut bd, q, vb(outs[0]), weights);
                if qlast {
                    bd.add_as("qcnt", true, Buf::Counters, "atomic<u32>");
                    let _ = write!(
                        x_fns,
                        "\nfn qout_stored(m: u32, n: u32) -> f32 {{\n    return {name}[m * p.ldy + p.n_offset + n];\n}}\n"
                    );
                }
            }
        } else {
            // Each sibling's output, after its own epilogue.
            for (j, &o) in outs.iter().enumerate() {
                let name = format!("y{}", bd.bufs.len());
                bd.add(&name, true, vb(o));
                let ld = ["p.na", "p.nb", "p.nc"][j];
                let mut body = String::new();
                for &(e, carry) in m.seg_epilogue.get(j).into_iter().flatten() {
                    let ex = elementwise(
                        g,
                        e,
                        carry,
                        "v",
                        &mut bd,
                        &vbe,
                        &format!("m * {ld} + n"),
                        "p.n_offset + n",
                    )?;
                    let _ = writeln!(body, "        v = {ex};");
                }
                let _ = writeln!(
                    st,
                    "    if seg == {j}u {{\n{body}        {name}[m * {ld} + n] = v;\n    }}"
                );
            }
        }
        st += "    return v;\n}\n";
        let nb = bd.bufs.len();
        let hook = format!(
            "{}@group(0) @binding({nb}) var<uniform> p: Params;\n\n{x_fns}\n{pro}\n{st}",
            bd.decl
        );
        let mut hooks = Hooks::new();
        hooks.insert("FUSED".into(), hook);
        let n_of = |j: usize| -> usize {
            if j == 0 {
                rows
            } else {
                ws.get(j)
                    .map(|&w| g.weights[w].dims[1..].iter().product())
                    .unwrap_or(0)
            }
        };
        let (na, nbr, nc) = if pair {
            (rows, 0, 0)
        } else {
            (n_of(0), n_of(1), n_of(2))
        };
        let ldy: usize = g.weights[ws[0]].dims[1..].iter().product();
        let params = vec![
            u(rows_m),
            uc(k),
            uc(na),
            uc(nbr),
            uc(nc),
            uc(first),
            uc(ldy),
            u(xqo),
            u(qout.map_or(Lin::c(0), |q| q.qo)),
        ];
        b.launch_fused(
            nodes.clone(),
            "matmul_vec",
            &fixed,
            hooks,
            &fused,
            bd.bufs,
            params,
            |kn| {
                let r = knob(kn, "ROWS", 1) as usize;
                let mut total = na.div_ceil(r) + nbr.div_ceil(r) + nc.div_ceil(r);
                if knob(kn, "QOUT", 0) == 1 && knob(kn, "QLAST", 0) == 0 {
                    // A workgroup per 32-row block.
                    total = na / 32;
                }
                Groups::Linear {
                    n: Lin::c(total as u64),
                    div: 1,
                    z: rows_m,
                }
            },
        )?;
        if qlast {
            // A counter per 32-row block and token row (the quantize pass
            // plans decode steps only: one row).
            b.counters = b.counters.max(rows_m.at(1, 0).max(1) * na as u64 / 32);
        }
    }
    Ok(())
}

/// The workgroup width and rows a workgroup of an int8-input matmul group
/// (weights `ws` of layouts `dts`, `n_rows` output rows of `k`), with
/// `stage` elements of int8 row staged in workgroup memory (0: none).
///
/// Width: each invocation's share of a weight row should be about one
/// Q4_0 block's bytes (18), the nearest power of two in log scale, and
/// every invocation must get a piece of each row. Measured on the H200
/// (8B shapes, decode tok/s): Q4_0 at K=4096 (2304-byte rows) 274 -> 290
/// from 256 invocations (9 B each) to 128 (18 B), 64 slower again; Q4_0 at
/// K=3584: 128 (15.75 B) beats 64 (31.5 B) by 6%; Q8_0 at K=3584: 256
/// (14.9 B) beats 128 (29.8 B) by 3%; Q4_K at K=4096 with 256 left half
/// the invocations without a piece (172 -> 197 with 128); at K=14336 128
/// and 256 are the same. With QOUT workgroups own whole 32-row blocks:
/// 32 / ROWS teams, each as wide as a workgroup of its rows would be.
#[allow(clippy::too_many_arguments)]
fn int8_shape(
    b: &Builder,
    ws: &[usize],
    dts: &[String],
    weights: &[WeightPlan],
    n_rows: usize,
    k: usize,
    pair: bool,
    qout: bool,
    stage: usize,
) -> (u32, usize) {
    let piece = dts.iter().filter_map(|d| int8_piece(d)).max().unwrap_or(8);
    let row = ws.iter().map(|&w| weights[w].row_bytes).max().unwrap_or(0);
    // Workgroups owning whole 32-row blocks (QOUT without QLAST, or QLAST
    // where the prologue stages a merged row, which needs them as wide).
    let block_owning = qout && !(b.qout_last && stage == 0);
    let (wg, rows) = base_shape(dts, row, n_rows, k, piece, pair, block_owning);
    // (QLAST keeps these; not where the prologue stages a merged row,
    // which needs a workgroup as wide as a block-owning one.)
    if !block_owning {
        return (wg, rows);
    }
    let staged_words = (stage / 4 + stage / 32) as u32;
    block_owning_shape(wg, rows, k / piece, pair, staged_words, &b.caps)
}

/// The workgroup width and rows a workgroup of an int8 matmul group of
/// layouts `dts` (`row_bytes` and `piece` the largest of theirs), `n_rows`
/// output rows of `k`; for a `block_owning` one (QOUT), the width of its
/// teams, before [`block_owning_shape`].
fn base_shape(
    dts: &[String],
    row_bytes: usize,
    n_rows: usize,
    k: usize,
    piece: usize,
    pair: bool,
    block_owning: bool,
) -> (u32, usize) {
    // Re-laid weights (Q4_0X, Q6_KX): each piece aligned vectors (see
    // aligned_workgroup).
    let relaid = dts
        .iter()
        .any(|d| DType::from_gpu_layout(d).is_some_and(|l| l.1 > 1));
    // Sibling matmuls with a Q4_K weight (a Q4_K_M QKV) run two rows a
    // workgroup and the re-laid rule's width at that count: 32 wide for
    // the 8B QKV (3072 workgroups). H100 (PERF stop 23): 8B Q4_K_M 327.8 ->
    // 337.3 tok/s (before: 128 wide, four rows, two beside a Q6_KX V; 64
    // wide 334.9, 128 wide with two rows 331.8), Qwen2.5-7B Q4_K_M 295.4 ->
    // 298.1 (64 wide 299.1). Re-laid Q4_0 siblings lose with it (8B Q4_0
    // 382.0 -> 380.1).
    // (Narrower where a row has fewer pieces than invocations, down to 32.)
    let q4k_siblings = !pair && !block_owning && dts.len() > 1 && dts.iter().any(|d| d == "Q4_K");
    let wg = if q4k_siblings {
        let mut wg = aligned_workgroup(n_rows, 2);
        while wg > 32 && wg as usize > k / piece {
            wg /= 2;
        }
        wg
    } else if relaid {
        aligned_workgroup(n_rows, 4)
    } else if pair && block_owning {
        // A pair quantizing its output (not re-laid: Q4_K) runs 32-wide
        // teams whatever its row count. H100, Llama-3-8B Q4_K_M (PERF stop
        // 23): teams of 32 (256 invocations) 306.7 -> 314.3 tok/s against
        // the plain pair and a quantize_rows dispatch, teams of 64 308.9,
        // of 128 (1024 invocations) 49% slower (stop 16).
        32
    } else {
        int8_workgroup(row_bytes, k, piece)
    };
    // Q6_K pieces are the heaviest to decode (three words and two scale
    // words a row): two rows a workgroup instead of four. H200, Llama-3-8B
    // Q4_K_M: its Q6_K down projections 674 -> 554 µs a step; a QKV with a
    // Q6_K V the same (271 -> 274); Q4_0 and Q4_K rows gain nothing from
    // it (Q4_K down 392 -> 412). Re-laid (Q6_KX) a Q6_K matmul of its own
    // is lighter and runs four (down 517 -> 487 µs a step), but a QKV with
    // a Q6_KX V still gains from two (306 -> 281 µs).
    let q6 = |d: &String| d == "Q6_K" || (d == "Q6_KX" && dts.len() > 1);
    let rows = if q4k_siblings || dts.iter().any(q6) {
        2
    } else {
        4
    };
    (wg, rows)
}

/// The workgroup size and rows of a team of a block-owning matmul
/// (matmul_vec QOUT) whose teams would be `team` wide with `rows` rows,
/// over rows of `pieces` pieces: teams as wide as the adapter lets the
/// workgroup be, then balanced over the pieces (a Q4_K down at K = 14336
/// asks for 256 but gets 128-wide teams, 3.5 pieces an invocation: 64
/// wide with two rows instead, H100 Q4_K_M 306.7 -> 308.1 tok/s, PERF
/// stop 23).
fn block_owning_shape(
    team: u32,
    rows: usize,
    pieces: usize,
    pair: bool,
    staged_words: u32,
    caps: &crate::codegen::Caps,
) -> (u32, usize) {
    let team = qout_workgroup(team, rows, pair, staged_words, caps) / (32 / rows as u32);
    let (team, rows) = balanced_team(pieces, team, rows);
    (qout_workgroup(team, rows, pair, staged_words, caps), rows)
}

/// A QOUT team of `team` invocations with `rows` rows takes a row's
/// `pieces` in turn: where they do not divide evenly among its invocations,
/// a team half as wide with half the rows (the workgroup as wide) may share
/// them better. H100, Llama-3-8B Q4_0 down (K = 14336: 448 pieces, 3.5 an
/// invocation at 128 wide): 875-887 -> 845-856 µs a step at 64 wide with
/// two rows (docs/PERF.md, stop 17).
fn balanced_team(pieces: usize, team: u32, rows: usize) -> (u32, usize) {
    let spread = |team: u32| pieces.div_ceil(team as usize) * team as usize;
    if rows >= 2 && team >= 64 && spread(team / 2) < spread(team) {
        (team / 2, rows / 2)
    } else {
        (team, rows)
    }
}

/// Workgroup width of an int8 matmul over re-laid weights (Q4_0X, Q6_KX:
/// each piece aligned vector loads; and Q4_K siblings, see int8_shape)
/// with `rows` output rows, `per_workgroup` rows a workgroup (counted at
/// 4 for re-laid weights even where a Q6_K sibling makes it two; and
/// unlike int8_workgroup the width ignores
/// K, so at K = 3584 some of 128 invocations have no block: measured fine
/// on Qwen2.5-7B, not tuned): 32 invocations (one subgroup on NVIDIA, four
/// pieces each of a 4096 row) where there are at least 2048 workgroups,
/// else 128 so that the fewer workgroups still fill the GPU. Measured on
/// the H200 (Llama-3-8B Q4_0 step, µs, widths 32 / 64 / 128): gate/up
/// (14336 rows, 3584 workgroups) 912 / 1101 / 1084, output projection
/// (128256 rows) 91 / 94 / 96; down (4096 rows) 761 / 848 / 717, QKV
/// (6144) 476 / 506 / 469, o-proj (4096) 438 / 465 / 421. Q6_KX alone
/// (gpu_matmul print_speed, int8, ROWS 4): K=4096 N=128256 3.89 TB/s at
/// 32 wide against 3.08 at 128; K=14336 N=4096 2.48 at 128, 1.68 at 32.
fn aligned_workgroup(rows: usize, per_workgroup: usize) -> u32 {
    if rows.div_ceil(per_workgroup) >= 2048 {
        32
    } else {
        128
    }
}

/// The workgroup size of a QOUT matmul (matmul_vec.wgsl; `staged_words`
/// of int8 row in workgroup memory): 32 / `rows` teams of `team`
/// invocations, halved (down to 8 a team) while the
/// adapter's invocation or workgroup-memory limit is exceeded.
fn qout_workgroup(
    team: u32,
    rows: usize,
    pair: bool,
    staged_words: u32,
    caps: &crate::codegen::Caps,
) -> u32 {
    let teams = 32 / rows as u32;
    let mut wg = team * teams;
    // matmul_vec's wg_storage: partial sums for every invocation's rows,
    // the reduction slots, the block and a staged int8 row.
    let bytes = |wg: u32| (wg * rows as u32 * (1 + pair as u32) + wg + 32 + staged_words) * 4;
    while wg > 8 * teams && (wg > caps.max_invocations.min(1024) || bytes(wg) > caps.max_wg_storage)
    {
        wg /= 2;
    }
    wg
}

/// The weights of a matmul group's MatMul nodes, in order.
fn mat_weights(g: &BoundGraph, m: &Matvec) -> Vec<usize> {
    m.mats
        .iter()
        .map(|&i| match g.nodes[i].op {
            BoundOp::MatMul { w } => w,
            _ => 0,
        })
        .collect()
}

/// The group's outputs other than a prologue's side outputs.
fn group_outputs(g: &BoundGraph, m: &Matvec) -> Vec<ValueId> {
    let (_, writes) = fuse::io(g, &super::fuse::Group::Matvec(m.clone()));
    writes
        .into_iter()
        .filter(|v| !m.prologue.iter().any(|&(p, _)| g.nodes[p].output == *v))
        .collect()
}

/// The row a matmul group's dot products read (before its prologue).
fn group_start(g: &BoundGraph, m: &Matvec) -> ValueId {
    match (m.merge, m.prologue.first()) {
        (Some(mg), _) => g.nodes[mg.attn].output,
        (None, Some(&(p, carry))) => g.nodes[p].inputs[carry],
        (None, None) => g.nodes[m.mats[0]].inputs[0],
    }
}

/// Whether a matmul group reads its input as int8: rows too long to stage,
/// no prologue but a lone weighted RMSNorm or a split attention's merge
/// (both done where the row is quantized), weights with an integer dot
/// product (matmul_vec's XQ).
fn int8_reader(b: &Builder, g: &BoundGraph, m: &Matvec, weights: &[WeightPlan]) -> bool {
    let ws = mat_weights(g, m);
    let k = g.weights[ws[0]].dims[0];
    b.int8_input_over_k.is_some_and(|over| k > over)
        && int8_input_ok(g, &m.mats, k)
        && !ws.iter().any(|&w| weights[w].chunks.len() > 1)
        && !group_outputs(g, m).is_empty()
        && m.merge.is_none_or(|mg| {
            let (h, _) = heads(&g.values[g.nodes[mg.attn].inputs[0]].shape);
            h > 0 && (k / h).is_multiple_of(4)
        })
        && (m.prologue.is_empty()
            || matches!(
                m.prologue.as_slice(),
                [(p, _)] if m.scaled && matches!(
                    g.nodes[*p].op,
                    BoundOp::RmsNorm {
                        weight: Some(_),
                        ..
                    }
                )
            ))
}

/// A matmul group that quantizes its own output for the int8 matmul that
/// reads it next (matmul_vec's QOUT).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuantOut {
    /// The reader's RMSNorm weight: blocks quantize x · w.
    pub norm: Option<usize>,
    /// The word of the output's buffer where the int8 rows start.
    pub qo: Lin,
}

/// Where int8 rows are made by their producers (the `quantize` pass):
/// producer group index → what it adds to its store, and the reader groups
/// that then need no quantize_rows dispatch.
#[derive(Debug, Default)]
pub(crate) struct Quantized {
    pub by_producer: std::collections::HashMap<usize, QuantOut>,
    /// Reader group index → the word where its int8 row starts.
    pub readers: std::collections::HashMap<usize, Lin>,
}

/// A group that is one matmul and nothing else is planned as a plain
/// matmul (tiled in prefill), not through [`plan_matvec`].
pub(crate) fn plain_matmul(m: &Matvec) -> bool {
    m.mats.len() == 1
        && m.pair.is_none()
        && m.prologue.is_empty()
        && m.merge.is_none()
        && m.epilogue.is_empty()
}

/// The `quantize` pass (decode plans): an int8 reader whose row (raw, or
/// under a lone RMSNorm) is the single output of the fused matmul just
/// before it in the data flow gets that row quantized by the producer,
/// whose workgroups then own whole 32-row blocks (matmul_vec QOUT),
/// instead of by a quantize_rows dispatch. One reader per row; the
/// producer's rows must be whole blocks in one binding (an int8 reader's
/// weights are never chunked). Space for the int8
/// row and its per-block Σ x² is put after the producer's output
/// (`b.extra`).
pub(crate) fn plan_producer_quantize(
    b: &mut Builder,
    g: &BoundGraph,
    groups: &[super::fuse::Group],
    weights: &[WeightPlan],
    value_buf: &[usize],
) -> Quantized {
    use super::fuse::Group;
    let mut q = Quantized::default();
    let mut maker = std::collections::HashMap::new();
    for (i, gr) in groups.iter().enumerate() {
        if let Group::Matvec(m) = gr {
            let ws = mat_weights(g, m);
            let single = ws.len() == 1 || m.pair.is_some();
            let outs = group_outputs(g, m);
            let rows: usize = g.weights[ws[0]].dims[1..].iter().product();
            if !plain_matmul(m)
                && int8_reader(b, g, m, weights)
                && single
                && outs.len() == 1
                && rows.is_multiple_of(32)
                && (b.quantize_every_dtype || b.qout_last || quantize_pays(g, &ws))
            {
                maker.insert(outs[0], (i, rows));
            }
        }
    }
    for (i, gr) in groups.iter().enumerate() {
        let Group::Matvec(m) = gr else { continue };
        if plain_matmul(m) || m.merge.is_some() || !int8_reader(b, g, m, weights) {
            continue;
        }
        let start = group_start(g, m);
        let k = g.weights[mat_weights(g, m)[0]].dims[0];
        let Some(&(p, rows)) = maker.get(&start) else {
            continue;
        };
        if p >= i || rows != k || q.by_producer.contains_key(&p) {
            continue;
        }
        let norm = match m.prologue.first().map(|&(n, _)| &g.nodes[n].op) {
            Some(BoundOp::RmsNorm { weight, .. }) => *weight,
            _ => None,
        };
        let qo = b.reserve_after(g, value_buf[start], start, (k / 4 + k / 16) as u64);
        q.by_producer.insert(p, QuantOut { norm, qo });
        q.readers.insert(i, qo);
    }
    q
}

/// Whether a producer with these weights gains from quantizing its own
/// output (the `quantize` pass) on the measured GPU. Its workgroups own
/// whole 32-row blocks (32 / ROWS teams), so it runs fewer, wider
/// workgroups than alone. A single weight pays in every layout: with every
/// weight re-laid Q4_0 (Q4_0X) Q4_0 decode 332 -> 342 tok/s, Qwen2.5-7B
/// shape 345 -> 371 (stop 15); in the Q4_K_M mix (Q4_K and Q6_KX
/// o-projections and downs) 295.0 -> 310.6, the merge prologue taking the
/// o-projection's quantize_rows too (stop 19). A pair pays in layouts
/// whose pieces are aligned 16-byte loads, with 32-wide teams (8 teams, 256
/// invocations; see int8_shape): re-laid Q4_0 (Q4_0X), and Q4_K since its
/// int8 products lost their int→float conversions and branches (stop 22):
/// 8B Q4_K_M 306.7 -> 314.3 tok/s (stop 23; in stop 16, before those, 291
/// -> 272). A Q6_K pair (two rows a team) is not measured. H100,
/// Llama-3-8B shape; docs/PERF.md.
fn quantize_pays(g: &BoundGraph, ws: &[usize]) -> bool {
    ws.len() == 1
        || ws.iter().all(|&w| {
            matches!(
                g.weights[w].dtype.gpu_layout(g.weights[w].dims[0]).as_str(),
                "Q4_0X" | "Q4_K"
            )
        })
}

/// matmul_vec's int8 input hooks (xq_in: a word, xq_in4: four) over the
/// array of vec4 words `arr` (the bound row, or the staged `xqs`).
fn xq_fns(arr: &str) -> String {
    format!(
        "fn xq_in(i: u32) -> u32 {{\n    return {arr}[i >> 2u][i & 3u];\n}}\n\nfn xq_in4(i: u32) -> vec4<u32> {{\n    return {arr}[i >> 2u];\n}}\n"
    )
}

/// The hook functions of matmul_vec's QOUT for a producer storing into
/// `buf`: the int8 row's binding (the same buffer, read as words) and the
/// reader's norm weight.
fn qout_fns(bd: &mut Binds, q: QuantOut, buf: Buf, weights: &mut [WeightPlan]) -> String {
    bd.add_as("yq", true, buf, "u32");
    let w = match q.norm {
        Some(w) => {
            weights[w].f32_copy = true;
            bd.add_as("qw", false, Buf::F32(w), "vec4<f32>");
            "qw[n >> 2u]"
        }
        None => "vec4<f32>(1.0)",
    };
    format!(
        "\nfn qout_w4(n: u32) -> vec4<f32> {{\n    return {w};\n}}\n\nfn qout_word(i: u32, v: u32) {{\n    yq[i] = v;\n}}\n"
    )
}

/// Workgroups (at four rows each) from which an f32-input matvec runs
/// narrow workgroups (plan_matvec).
const WIDE_OUTPUT_WORKGROUPS: usize = 8192;

/// Weight layouts (DType::gpu_layout) matmul_vec multiplies with an int8
/// input (XQ=1), with the elements one invocation takes at a time (PIECE in
/// matvec_rows.wgsl).
const INT8_DOT_DTYPES: [(&str, usize); 7] = [
    ("Q4_0", 16),
    ("Q4_0X", 32),
    ("Q4_1", 16),
    ("Q8_0", 8),
    ("Q4_K", 32),
    ("Q6_K", 16),
    ("Q6_KX", 32),
];

/// Weight layouts matmul_vec binds as `array<vec4<u32>>` (their 16-byte
/// fields are aligned; the template's default hook lists the same).
const VECTOR_LAYOUTS: [&str; 3] = ["Q4_0X", "Q4_K", "Q6_KX"];

/// The int8 piece size of a weight `layout` (DType::gpu_layout), if
/// matmul_vec has an int8 path for it.
fn int8_piece(layout: &str) -> Option<usize> {
    INT8_DOT_DTYPES
        .iter()
        .find(|(d, _)| *d == layout)
        .map(|p| p.1)
}

/// The bytes of a weight row an int8 matmul invocation should take: one
/// Q4_0 block's (see plan_matvec for the measurements).
const INT8_BYTES_PER_INVOCATION: f64 = 18.0;

/// matmul_vec's workgroup width for an int8 input: rows of `k` elements,
/// `row_bytes` and `piece` the largest of the group's weights (the width
/// follows the heaviest row; the largest piece is the strictest bound).
fn int8_workgroup(row_bytes: usize, k: usize, piece: usize) -> u32 {
    let off = |wg: u32| {
        (row_bytes as f64 / f64::from(wg) / INT8_BYTES_PER_INVOCATION)
            .log2()
            .abs()
    };
    // 64 even where it leaves invocations without a piece (K < 64 pieces).
    [256u32, 128, 64]
        .into_iter()
        .filter(|&wg| wg as usize <= k / piece || wg == 64)
        .min_by(|&a, &b| off(a).total_cmp(&off(b)))
        .unwrap_or(64)
}

/// Whether matmul nodes `mats` (rows of `k`) can read an int8 input: every
/// weight of a dtype with an int8 path, whole 32-element blocks.
pub(crate) fn int8_input_ok(g: &BoundGraph, mats: &[usize], k: usize) -> bool {
    k.is_multiple_of(32)
        && mats.iter().all(|&i| match g.nodes[i].op {
            BoundOp::MatMul { w } => {
                int8_piece(&g.weights[w].dtype.gpu_layout(g.weights[w].dims[0])).is_some()
            }
            _ => false,
        })
}

/// The quantize_rows launch before an int8-input matmul: the input row
/// `start` (times a scaled group's lone RMSNorm, or merged from a split
/// attention's partials) quantized into the space
/// after the group's first output `out`, where the matmul reads it (the
/// output is not written before the matmul runs, and no buffer alive at
/// the group overlaps it).
#[allow(clippy::too_many_arguments)]
fn plan_quantize(
    b: &mut Builder,
    g: &BoundGraph,
    m: &Matvec,
    nodes: &[usize],
    start: ValueId,
    out: ValueId,
    k: usize,
    rows_m: Lin,
    weights: &mut [WeightPlan],
    value_buf: &[usize],
) -> Result<Lin> {
    // A split attention's partials follow its output row: [H, S, Dv + 2]
    // per token (see merge_prologue).
    let (splits, dv) = match m.merge {
        Some(mg) => {
            let (h, _) = heads(&g.values[g.nodes[mg.attn].inputs[0]].shape);
            (mg.splits, k / h.max(1))
        }
        None => (0, 0),
    };
    let (norm, eps) = match m.prologue.first().map(|&(p, _)| &g.nodes[p].op) {
        Some(BoundOp::RmsNorm {
            weight: Some(w),
            eps,
        }) if m.scaled => {
            weights[*w].f32_copy = true;
            (Some(Buf::F32(*w)), *eps)
        }
        _ if m.scaled => {
            return Err(Error::Gpu(
                "internal: an int8 input's folded norm is not a weighted RMSNorm".into(),
            ))
        }
        _ => (None, 0.0),
    };
    let qo = b.reserve_after(g, value_buf[out], out, (k / 4 + k / 32) as u64);
    let split = splits.max(1).to_string();
    b.launch_fused(
        nodes.to_vec(),
        "quantize_rows",
        &[
            ("NORM", if norm.is_some() { "1" } else { "0" }),
            ("MERGE", if splits > 0 { "1" } else { "0" }),
            ("SPLIT", split.as_str()),
        ],
        Hooks::new(),
        "",
        vec![
            Buf::Value(value_buf[start]),
            norm.unwrap_or(Buf::Unbound),
            Buf::Value(value_buf[out]),
        ],
        vec![u(rows_m), uc(k), u(qo), Word::F(eps as f32), uc(dv)],
        |kn| Groups::Linear {
            n: Lin::c((k / 4) as u64),
            div: knob(kn, "WG", 1),
            z: rows_m,
        },
    )?;
    Ok(qo)
}

fn op_name(op: &BoundOp) -> String {
    let s = format!("{op:?}");
    s.split([' ', '{', '(']).next().unwrap_or("").to_string()
}

/// The merge of a split attention's partials in a matmul prologue (the
/// attention node `mg.attn`; rows of `k` = H · Dv elements; row m's
/// partials [H, S, Dv + 2] sit after the M × K output in `x`): the module
/// definitions (kernels/lib/merge.wgsl and what it needs) and the prologue
/// body, which stages the merged row in `xs`; with `int8` the definitions
/// give matmul_vec's xq_src4 the merged elements, and the body has
/// xq_stage_row quantize them into `xqs` (Dv % 4 == 0).
fn merge_prologue(g: &BoundGraph, mg: &Merge, k: usize, int8: bool) -> Result<(String, String)> {
    let n = &g.nodes[mg.attn];
    let (h, _) = heads(&g.values[n.inputs[0]].shape);
    let dv = k / h.max(1);
    if dv * h != k || (int8 && !dv.is_multiple_of(4)) {
        return Err(Error::Gpu(format!(
            "internal: attention output rows of {k} are not {h} heads{}",
            if int8 { " of whole vec4s" } else { "" }
        )));
    }
    let s = mg.splits;
    let row = dv + 2;
    let defs = format!(
        "\nconst MERGE_S: u32 = {s}u;\n\nfn part_ld(i: u32) -> f32 {{\n    return x[i];\n}}\n\n#include merge.wgsl\n"
    );
    let head = format!(
        "    // merge of {s} split-attention partials per head ({h} heads x {dv})\n    let pb = p.m * p.k + m * {hsr}u;\n",
        hsr = h * s * row,
    );
    let sr = s * row;
    if int8 {
        // The template's xq_stage_row quantizes the merged elements.
        let defs = format!(
            "{defs}\nfn xq_src4(m: u32, e: u32) -> vec4<f32> {{\n{head}    let hb = pb + (e / {dv}u) * {sr}u;\n    return merge4(merge_weights(hb, {row}u), hb, {row}u, e % {dv}u);\n}}\n"
        );
        return Ok((defs, "    xq_stage_row(m);\n".into()));
    }
    let body = format!(
        "{head}    for (var e = lid_; e < p.k; e += WG) {{
        let hb = pb + (e / {dv}u) * {sr}u;
        xs_st(e, merge1(merge_weights(hb, {row}u), hb, {row}u, e % {dv}u));
    }}
    workgroupBarrier();
"
    );
    Ok((defs, body))
}

/// `rmsnorm+add+matmul3+silu_mul+add`: what a fused matvec holds.
fn describe(g: &BoundGraph, m: &Matvec) -> String {
    let mut parts: Vec<String> = m
        .prologue
        .iter()
        .map(|&(p, _)| op_name(&g.nodes[p].op).to_lowercase())
        .collect();
    if let Some(mg) = &m.merge {
        parts.push(format!("merge{}", mg.splits));
    }
    parts.push(format!("matmul{}", m.mats.len()));
    if let Some((a, _)) = m.pair {
        parts.push(match a {
            Some(a) => format!("{}_mul", op_name(&g.nodes[a].op).to_lowercase()),
            None => "mul".into(),
        });
    }
    parts.extend(
        m.epilogue
            .iter()
            .chain(m.seg_epilogue.iter().flatten())
            .map(|&(e, _)| op_name(&g.nodes[e].op).to_lowercase()),
    );
    parts.join("+")
}

/// Plan a fused decode attention (PREP=1).
pub(crate) fn plan_attention(
    b: &mut Builder,
    g: &BoundGraph,
    a: &AttnPrep,
    weights: &mut [WeightPlan],
    value_buf: &[usize],
) -> Result<()> {
    let vb = |v: usize| Buf::Value(value_buf[v]);
    let n = &g.nodes[a.attn];
    let BoundOp::Attention {
        scale,
        window,
        softcap,
        cache,
    } = &n.op
    else {
        return Err(Error::Gpu("internal: not an attention node".into()));
    };
    let c = g.caches[*cache];
    let (h, d) = heads(&g.values[n.inputs[0]].shape);
    let norm_w = |x: Option<usize>| -> (Buf, f64, bool) {
        match x.map(|i| &g.nodes[i].op) {
            Some(BoundOp::RmsNorm {
                weight: Some(w),
                eps,
            }) => (Buf::F32(*w), *eps, true),
            _ => (Buf::Unbound, 0.0, false),
        }
    };
    let (qw, qeps, qn) = norm_w(a.norm[0]);
    let (kw, keps, kn) = norm_w(a.norm[1]);
    for w in [&qw, &kw] {
        if let Buf::F32(w) = w {
            weights[*w].f32_copy = true;
        }
    }
    let eps = if qn { qeps } else { keps };
    let (rope, base, dims, rscale) = match a.rope[0].map(|i| &g.nodes[i].op) {
        Some(BoundOp::Rope {
            mode,
            base,
            dims,
            scale,
        }) => (
            if *mode == RopeMode::Neox {
                "NEOX"
            } else {
                "NORMAL"
            },
            *base,
            *dims,
            *scale,
        ),
        _ => ("NONE", 0.0, 0, 1.0),
    };
    let mut nodes = a.absorbed.clone();
    nodes.push(a.attn);
    nodes.sort_unstable();
    let splits = a.splits.max(1);
    let split = splits.to_string();
    b.launch_fused(
        nodes.clone(),
        "attention",
        &[
            ("PREP", "1"),
            ("QNORM", if qn { "1" } else { "0" }),
            ("KNORM", if kn { "1" } else { "0" }),
            ("ROPE", rope),
            ("SPLIT", &split),
        ],
        Hooks::new(),
        "",
        vec![
            vb(a.src[0]),
            vb(a.src[1]),
            vb(a.src[2]),
            Buf::KCache(*cache),
            Buf::VCache(*cache),
            vb(n.output),
            qw,
            kw,
        ],
        vec![
            u(Lin::t(1)),
            uc(h),
            uc(c.kv_heads),
            uc(d),
            uc(c.v_dim),
            u(Lin::pos(1)),
            uc(window.unwrap_or(0)),
            Word::F(*scale as f32),
            Word::F(softcap.unwrap_or(0.0) as f32),
            Word::F(eps as f32),
            uc(dims),
            Word::F(base as f32),
            Word::F(rscale as f32),
        ],
        |_| Groups::Linear {
            n: Lin::t((h * splits) as u64),
            div: 1,
            z: Lin::c(1),
        },
    )?;
    if splits > 1 && !a.merged_by_consumer {
        // The partials follow the output row in the same buffer.
        let out = vb(n.output);
        b.launch_fused(
            nodes,
            "attention_merge",
            &[("SPLIT", &split)],
            Hooks::new(),
            "",
            vec![out, out],
            vec![uc(h), uc(c.v_dim), u(Lin::t((h * c.v_dim) as u64))],
            |_| Groups::Linear {
                n: Lin::t(h as u64),
                div: 1,
                z: Lin::c(1),
            },
        )?;
    }
    Ok(())
}

/// f32 elements per token that a value's buffer holds beyond the value
/// itself: a split attention's partial rows [H, S, Dv + 2] after its output.
pub(crate) fn extra_elements(g: &BoundGraph, a: &AttnPrep) -> usize {
    if a.splits <= 1 {
        return 0;
    }
    let n = &g.nodes[a.attn];
    let (h, _) = heads(&g.values[n.inputs[0]].shape);
    let BoundOp::Attention { cache, .. } = &n.op else {
        return 0;
    };
    h * a.splits * (g.caches[*cache].v_dim + 2)
}

#[cfg(test)]
mod tests {
    use super::{
        aligned_workgroup, balanced_team, base_shape, block_owning_shape, int8_workgroup,
        qout_workgroup, INT8_DOT_DTYPES,
    };

    /// QOUT teams are halved (with half the rows) only where a row's pieces
    /// then spread more evenly: the 8B down projection's 448, not the
    /// 128 of a 4096-wide row or Qwen2.5-7B's 592 (as uneven either way).
    #[test]
    fn qout_teams_share_pieces_evenly() {
        assert_eq!(balanced_team(448, 128, 4), (64, 2));
        assert_eq!(balanced_team(128, 128, 4), (128, 4));
        assert_eq!(balanced_team(592, 128, 4), (128, 4));
        assert_eq!(balanced_team(128, 32, 4), (32, 4));
        assert_eq!(balanced_team(448, 128, 1), (128, 1));
    }

    /// Int8 matmuls over re-laid weights: 32 wide with many workgroups
    /// (the 8B feed-forward, the output projection), 128 with few (QKV,
    /// o-proj, down), as measured on the H200.
    #[test]
    fn aligned_workgroups_follow_the_workgroup_count() {
        for (rows, want) in [
            (14336, 32),
            (128256, 32),
            (8192, 32),
            (4096, 128),
            (6144, 128),
            (8188, 128),
        ] {
            assert_eq!(aligned_workgroup(rows, 4), want, "{rows} rows");
            assert_eq!(
                aligned_workgroup(rows / 2, 2),
                want,
                "{rows} rows, two a group"
            );
        }
    }

    /// Shapes of the Llama-3-8B decode's int8 groups (K = 4096).
    #[test]
    fn base_shapes_of_the_8b_decode() {
        let l = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let q4k_row = 4096 / 256 * 144;
        let relaid_row = 4096 / 32 * 18;
        // A Q4_K_M QKV: two rows, 32 wide (3072 workgroups), with or
        // without a re-laid Q6_K V.
        for dts in [l(&["Q4_K", "Q4_K", "Q4_K"]), l(&["Q4_K", "Q4_K", "Q6_KX"])] {
            assert_eq!(
                base_shape(&dts, q4k_row, 6144, 4096, 32, false, false),
                (32, 2)
            );
        }
        // A Q4_0 QKV (re-laid): four rows, 128 wide.
        let q40 = l(&["Q4_0X", "Q4_0X", "Q4_0X"]);
        assert_eq!(
            base_shape(&q40, relaid_row, 6144, 4096, 32, false, false),
            (128, 4)
        );
        // A Q4_K gate/up pair: 32-wide teams where it quantizes its output,
        // else int8_workgroup's 128.
        let pair = l(&["Q4_K", "Q4_K"]);
        assert_eq!(
            base_shape(&pair, q4k_row, 14336, 4096, 32, true, true),
            (32, 4)
        );
        assert_eq!(
            base_shape(&pair, q4k_row, 14336, 4096, 32, true, false),
            (128, 4)
        );
        // (Also with fewer rows than the 8B's.)
        assert_eq!(
            base_shape(&pair, q4k_row, 4096, 4096, 32, true, true),
            (32, 4)
        );
        // Q4_K siblings with fewer pieces a row than the width: narrower
        // (K = 2560: 80 pieces, 64 wide).
        let q4k = l(&["Q4_K", "Q4_K", "Q4_K"]);
        assert_eq!(
            base_shape(&q4k, 2560 / 256 * 144, 3072, 2560, 32, false, false),
            (64, 2)
        );
        // A Q4_K o-projection alone keeps int8_workgroup's width.
        assert_eq!(
            base_shape(&l(&["Q4_K"]), q4k_row, 4096, 4096, 32, false, true),
            (128, 4)
        );
    }

    /// Block-owning shapes of the Llama-3-8B decode (K = 4096 or 14336):
    /// teams balanced after the adapter's width cap.
    #[test]
    fn block_owning_shapes_balance_the_capped_team() {
        let caps = crate::codegen::Caps {
            f16: true,
            subgroups: true,
            max_invocations: 1024,
            max_wg_storage: 48 * 1024,
        };
        // Q4_K down: 256 asked, capped to 128-wide teams (3.5 of 448
        // pieces each), balanced to 64 wide with two rows.
        assert_eq!(block_owning_shape(256, 4, 448, false, 0, &caps), (1024, 2));
        // Re-laid Q4_0 down: the same from 128.
        assert_eq!(block_owning_shape(128, 4, 448, false, 0, &caps), (1024, 2));
        // A gate/up pair from 32-wide teams: 8 teams, 4 pieces each.
        assert_eq!(block_owning_shape(32, 4, 128, true, 0, &caps), (256, 4));
        // An o-projection staging its merged int8 row: one piece each.
        assert_eq!(
            block_owning_shape(128, 4, 128, false, 1024 + 128, &caps),
            (1024, 4)
        );
    }

    /// A QOUT workgroup holds 32 / ROWS teams as wide as asked, halved
    /// within the adapter's invocation and workgroup-memory limits, never
    /// under 8 invocations a team.
    #[test]
    fn qout_workgroups_fit_the_adapter() {
        let caps = crate::codegen::Caps::feature_sets(1024, 48 << 10)[3];
        assert_eq!(qout_workgroup(128, 4, false, 0, &caps), 1024);
        assert_eq!(qout_workgroup(32, 4, true, 0, &caps), 256);
        assert_eq!(qout_workgroup(64, 2, false, 0, &caps), 1024);
        // 16 teams of 128 are over 1024 invocations.
        assert_eq!(qout_workgroup(128, 2, false, 0, &caps), 1024);
        let small = crate::codegen::Caps::feature_sets(256, 16 << 10)[3];
        assert_eq!(qout_workgroup(128, 4, false, 0, &small), 256);
        // A pair at 256: (256 * 4 * 2 + 256) * 4 = 9 KiB fits 16 KiB.
        assert_eq!(qout_workgroup(128, 4, true, 0, &small), 256);
        let tiny = crate::codegen::Caps::feature_sets(1024, 1 << 10)[3];
        assert_eq!(qout_workgroup(128, 4, true, 0, &tiny), 64);
    }

    /// The planner's int8 piece sizes are matvec_rows.wgsl's PIECE: the
    /// workgroup width is chosen from them.
    #[test]
    fn int8_piece_sizes_match_the_kernel() {
        let t = crate::codegen::template("matmul_vec").expect("template");
        for (dt, piece) in INT8_DOT_DTYPES {
            let knobs: crate::codegen::Knobs = [
                ("DTYPE", dt.to_string()),
                ("DTYPE_B", "NONE".into()),
                ("DTYPE_C", "NONE".into()),
                ("PAIR", "0".into()),
                ("XS", "0".into()),
                ("WG", "64".into()),
                ("ROWS", "4".into()),
                ("SUBGROUPS", "0".into()),
                ("F16", "0".into()),
                ("NORM", "0".into()),
                ("XQ", "1".into()),
                ("QOUT", "0".into()),
                ("QLAST", "0".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let wgsl = t.generate(&knobs).expect("generate");
            // (matmul_vec includes matvec_rows.wgsl with the suffix _a.)
            let want = format!("const PIECE_a: u32 = {piece}u;");
            assert!(wgsl.contains(&want), "{dt}: the kernel has no `{want}`");
        }
    }

    #[test]
    fn int8_workgroups_give_each_invocation_about_a_block() {
        // (row bytes, K, piece) -> the width measured best on the H200.
        let q4_0 = |k: usize| (k / 32 * 18, k, 16);
        let q8_0 = |k: usize| (k / 32 * 34, k, 8);
        let q4_k = |k: usize| (k / 256 * 144, k, 32);
        for ((row, k, piece), want) in [
            (q4_0(4096), 128),
            (q4_0(3584), 128),
            (q4_0(14336), 256),
            (q8_0(3584), 256),
            (q8_0(4096), 256),
            (q4_k(4096), 128),
            // 112 pieces: 128 invocations would leave some without one.
            (q4_k(3584), 64),
            (q4_0(576), 64),
        ] {
            assert_eq!(
                int8_workgroup(row, k, piece),
                want,
                "row {row} B, K {k}, piece {piece}"
            );
        }
    }
}
