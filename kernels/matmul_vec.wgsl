//! kiln template: matmul_vec
//! Decode matmul (matrix × vector per token row m < M), dequantizing inside,
//! with fusion hooks. Up to three weights A, B, C (knobs DTYPE, DTYPE_B,
//! DTYPE_C; NONE when absent) of K columns read the same input row:
//! - PAIR=0: the N_A rows of A, then the N_B of B and the N_C of C form one
//!   row space; workgroup g handles ROWS rows of one weight (each weight's
//!   rows start at a multiple of ROWS). Sibling matmuls (Q, K, V) are one
//!   dispatch this way.
//! - PAIR=1: workgroup g handles rows g*ROWS .. g*ROWS + ROWS of both A and
//!   B (N_A rows each), so the epilogue sees a and b for the same row: the
//!   gated feed-forward act(x·Wg) * (x·Wu) is one dispatch.
//! Hook FUSED defines the bindings (w_a, w_b, w_c as array<u32> of raw GGUF
//! bytes, array<vec4<u32>> for Q4_0X, Q4_K and Q6_KX, whose 16-byte fields
//! are aligned; the uniform `p: Params`,
//! inputs, outputs) and
//!   prologue(m, g): with XS > 0 stage the input row in `xs` (after any
//!     fused norms and adds; workgroup g == 0 writes fused side outputs);
//!   x_in(i), x_in4(i): the input element i, elements i..i+4 (XS == 0;
//!     x_in4 only at i % 4 == 0); with XQ=1 instead xq_in(i): word i of
//!     the quantized input, xq_in4(i): words i..i+4 (i % 4 == 0; the
//!     kernel reads a row's words four at a time where the row starts on
//!     a multiple of four), and with XS > 0 also xq_src4(m, e): row m's
//!     elements e..e+4 before quantization (the prologue calls
//!     xq_stage_row(m), which quantizes them into `xqs`);
//!   with NORM=1 (an RMSNorm folded in as a scale, XS == 0): x_w4(e) the
//!     norm weight of row elements e..e+4 and NORM_EPS its epsilon; the
//!     input is read as x_in times x_w, and every dot product is scaled by
//!     1 / sqrt(mean(x²) + eps) over the raw row;
//!   store(seg, m, n, a, b) -> f32: write row n of weight `seg` (a; PAIR:
//!     b too), returning the value stored.
//! The default hook is the plain matmul: y[m * ldy + n_offset + base + n]
//! where base is the row's segment start (Q, K, V rows concatenated), and
//! PAIR stores a * b.
//! Dispatch: spread(Σ ceil(N_w / ROWS)) (PAIR: ceil(N_A / ROWS); QOUT
//! without QLAST: N_A / 32) over x and y
//! (linear group g = wg.x + wg.y * num_workgroups.x), z = M.
//! WG invocations stride over 8-element pieces of K and reduce (through
//! subgroups with SUBGROUPS=1, never assuming their size). F16=1 does the
//! products in f16 (4-wide dots), accumulating in f32.
//! XQ=1 (every weight dtype Q4_0, Q4_0X, Q4_1, Q8_0, Q4_K, Q6_K or Q6_KX;
//! K % 32 == 0):
//! the input arrives quantized to int8 per 32-element block, as
//! quantize_rows writes it (hook xq_in(i): word i of that buffer, row m at
//! p.xqo + m * (K/4 + K/32)); the products are integer 4-wide dot products
//! of the packed weight fields with q (dot4I8Packed), scaled once per piece.
//! QOUT=1 (one output, or a pair's; its rows a multiple of 32): the matmul
//! also writes its output quantized to int8 per 32-element block for the
//! int8 matmul that reads it next, so no quantize_rows dispatch runs
//! between them. Each workgroup owns one block: TEAMS = 32 / ROWS teams of
//! TW = WG / TEAMS invocations, each team its own ROWS rows (as a
//! workgroup of TW would take them). The values store returns are kept in
//! workgroup memory; once the block is complete it is multiplied by the
//! reader's norm weight (qout_w4(n), 1.0 without one) and written through
//! qout_word(i, v) at p.qo + m * (N/4 + N/32): N/4 words of q, N/32 block
//! scales (quantize_rows' layout), and after all M rows the per-block Σ x²
//! (raw x) at p.qo + M (N/4 + N/32) + m N/32, from which the reader's NORM
//! takes its 1 / rms.
//! QLAST=1 (with QOUT=1) keeps the workgroups of a plain matmul (ROWS rows
//! each, dispatch ceil(N_A / ROWS)) instead: each counts its rows into its
//! block's counter (hook binding `qcnt`, array<atomic<u32>>, M * N/32
//! words, zero before the dispatch), and the one that completes a block
//! reads the block's stored values back (hook qout_stored(m, n)) and
//! quantizes it, leaving the counter zero again.
//! With XQ=1, NORM=1 reads that Σ x² (after the int8 rows, p.xqo + M (K/4
//! + K/32) + m K/32) instead of summing x² itself.
//! XQ=1 with XS > 0 (K <= XS, NORM=0): the prologue makes the int8 row in
//! workgroup memory instead (`xqs`, the same layout, from word 0), each
//! invocation quantizing a word at a time (xq_stage_row); xq_in reads
//! `xqs`. The default hook's xq_src4 reads the f32 input row x; a fused
//! one makes the row as it goes (a split attention's merge), so no
//! quantize_rows dispatch runs before the matmul.
//! knob DTYPE: F32 F16 BF16 Q4_0 Q4_0X Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q6_KX IQ4_NL
//! knob DTYPE_B: F32 F16 BF16 Q4_0 Q4_0X Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q6_KX IQ4_NL NONE
//! knob DTYPE_C: NONE F32 F16 BF16 Q4_0 Q4_0X Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q6_KX IQ4_NL
//! knob PAIR: 0 1
//! knob XS: 0 1024 2048 4096 8192
//! knob WG: 32 64 128 256 512 1024
//! knob ROWS: 1 2 8 4
//! knob SUBGROUPS: 0 1
//! knob F16: 0 1
//! knob NORM: 0 1
//! knob XQ: 0 1
//! knob QOUT: 0 1
//! knob QLAST: 0 1
//! cover: DTYPE_B DTYPE_C PAIR XS NORM XQ QOUT QLAST
//! require: (ROWS != 8 || XQ == 0) && (WG <= 256 || QOUT == 1) && (QOUT == 0 || (DTYPE_C == 'NONE' && (PAIR == 1 || DTYPE_B == 'NONE') && (XS == 0 || XQ == 1) && (QLAST == 1 || (WG * ROWS >= 256 && WG * ROWS <= 4096)))) && (QLAST == 0 || QOUT == 1) && (DTYPE_C == 'NONE' || DTYPE_B != 'NONE') && (PAIR == 0 || (DTYPE_B != 'NONE' && DTYPE_C == 'NONE')) && (NORM == 0 || XS == 0) && (WG != 32 || XQ == 1) && (XQ == 0 || (F16 == 0 && (XS == 0 || NORM == 0) && (DTYPE == 'Q4_0' || DTYPE == 'Q4_0X' || DTYPE == 'Q4_1' || DTYPE == 'Q8_0' || DTYPE == 'Q4_K' || DTYPE == 'Q6_K' || DTYPE == 'Q6_KX') && (DTYPE_B == 'NONE' || DTYPE_B == 'Q4_0' || DTYPE_B == 'Q4_0X' || DTYPE_B == 'Q4_1' || DTYPE_B == 'Q8_0' || DTYPE_B == 'Q4_K' || DTYPE_B == 'Q6_K' || DTYPE_B == 'Q6_KX') && (DTYPE_C == 'NONE' || DTYPE_C == 'Q4_0' || DTYPE_C == 'Q4_0X' || DTYPE_C == 'Q4_1' || DTYPE_C == 'Q8_0' || DTYPE_C == 'Q4_K' || DTYPE_C == 'Q6_K' || DTYPE_C == 'Q6_KX')))
//! wg_storage: (WG * ROWS * (1 + PAIR) + WG + XS - XQ * (XS - XS / 4 - XS / 32) + 32 * QOUT + QLAST) * 4
#if F16
enable f16;
#endif
// (naga takes subgroup builtins without `enable subgroups;`.)

struct Params {
    m: u32,
    k: u32,
    na: u32,
    nb: u32,
    nc: u32,
    n_offset: u32,
    ldy: u32,
    // XQ: the word where row 0 of the quantized input starts.
    xqo: u32,
    // QOUT: the word of qout_word where row 0 of the quantized output starts.
    qo: u32,
}

const WG: u32 = {{WG}}u;
const ROWS: u32 = {{ROWS}}u;
const NACC: u32 = 1u + {{PAIR}}u;
#if QOUT && QLAST == 0
const TEAMS: u32 = 32u / ROWS;
#else
const TEAMS: u32 = 1u;
#endif
// Invocations that share ROWS rows (matvec_rows.wgsl's stride).
const TW: u32 = WG / TEAMS;

// partial[(j * ROWS + r) * WG + i]: accumulator j, row r, from invocation
// (or subgroup) i.
var<workgroup> partial: array<f32, WG * ROWS * NACC>;
var<workgroup> red: array<f32, WG>;
#if XS && XQ
// The staged int8 row: K/4 words of q, then K/32 block scales (as vec4s:
// xq_in4 reads four words at once).
var<workgroup> xqs: array<vec4<u32>, ({{XS}} / 4 + {{XS}} / 32) / 4>;
#elif XS
// The staged input row, as vec4 so that x8's reads are two 16-byte loads
// (scalar reads at a stride of 8 floats would conflict on 8-way banks).
var<workgroup> xs: array<vec4<f32>, {{XS}} / 4>;

fn xs_ld(e: u32) -> f32 {
    return xs[e >> 2u][e & 3u];
}

fn xs_st(e: u32, v: f32) {
    xs[e >> 2u][e & 3u] = v;
}
#endif

#if XQ
// One piece's share of the quantized input (matvec_rows.wgsl's xq_piece
// says which): up to eight words of q (q, r), block scales d and sums
// d · Σ q.
struct XP {
    q: vec4<u32>,
    r: vec4<u32>,
    d: vec4<f32>,
    s: vec4<f32>,
}

// Word where this token's quantized row starts.
var<private> xqo_: u32;

// The word of q holding elements e..e+4 (e % 4 == 0), and its block scale.
fn xq_word(e: u32) -> u32 {
    return xq_in(xqo_ + (e >> 2u));
}

// The four words of q holding elements e..e+16 (e % 16 == 0): one 16-byte
// load where the row starts on one (a lane's scalar loads would each touch
// a new 32-byte sector: a piece's words are eight apart across lanes).
fn xq_word4(e: u32) -> vec4<u32> {
    let i = xqo_ + (e >> 2u);
    if (xqo_ & 3u) == 0u {
        return xq_in4(i);
    }
    return vec4<u32>(xq_in(i), xq_in(i + 1u), xq_in(i + 2u), xq_in(i + 3u));
}

fn xq_d(e: u32) -> f32 {
    return bitcast<f32>(xq_in(xqo_ + p.k / 4u + (e >> 5u)));
}

// i32 to f32 without a conversion instruction (those run at a quarter of
// the FMA rate or less on NVIDIA): v added to the bits of 1.5 · 2^23, whose
// ulp is 1. Exact for |v| < 2^22, which every sum of int8 products of a
// piece is.
fn i2f(v: i32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) + 0x4b400000u) - 12582912.0;
}

// u32 to f32 the same way (u < 2^23).
fn u2f4(u: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(u | vec4<u32>(0x4b000000u)) - vec4<f32>(8388608.0);
}

// d · Σ q over word w with block scale d.
fn xq_sum(w: u32, d: f32) -> f32 {
    return d * i2f(dot4I8Packed(w, 0x01010101u));
}

// Σ a·b over the sixteen int8 pairs of a and b.
fn dot16(a: vec4<u32>, b: vec4<u32>) -> i32 {
    return (dot4I8Packed(a.x, b.x) + dot4I8Packed(a.y, b.y)) + (dot4I8Packed(a.z, b.z) + dot4I8Packed(a.w, b.w));
}

// d · Σ q over the four words of q.
fn xq_sum4(q: vec4<u32>, d: f32) -> f32 {
    return d * i2f(dot16(q, vec4<u32>(0x01010101u)));
}
#if XS

// Quantize row m (xq_src4, the hook's) into xqs as quantize_rows does
// (q8.wgsl), a word an invocation. Call in uniform control flow.
fn xq_stage_row(m: u32) {
    let n4 = p.k / 4u;
    for (var w0 = 0u; w0 < n4; w0 += WG) {
        let w = w0 + lid_;
        let v = xq_src4(m, 4u * min(w, n4 - 1u));
        let amax = q8_amax(v, lid_);
        if w < n4 {
            xqs[w >> 2u][w & 3u] = q8_word(v, amax);
            if lid_ % 8u == 0u {
                let s = n4 + w / 8u;
                xqs[s >> 2u][s & 3u] = bitcast<u32>(amax / 127.0);
            }
        }
    }
    workgroupBarrier();
}
#endif

#endif
var<private> lid_: u32;
// This invocation's index in its team.
var<private> tl_: u32;
#if QOUT && SUBGROUPS
// 1 where some subgroup holds invocations of two teams (then the teams
// reduce through workgroup memory).
var<workgroup> mixed_: u32;
#endif
#if QOUT
// The workgroup's 32-row block as stored (team t's rows at t * ROWS..).
var<workgroup> qblk: array<f32, 32>;
#endif
#if QLAST
// 1 in the workgroup that completed its block.
var<workgroup> qlast_: u32;
#endif
#if NORM
// 1 / rms of this token's raw input row.
var<private> norm_r_: f32;
#endif
#if SUBGROUPS
var<private> sg_lane_: u32;
var<private> sg_id_: u32;
var<private> n_sg_: u32;
#endif

// Σ v over the workgroup, to every invocation (call in uniform control flow).
fn wg_sum(v: f32) -> f32 {
#if SUBGROUPS
    let s = subgroupAdd(v);
    workgroupBarrier();
    if sg_lane_ == 0u {
        red[sg_id_] = s;
    }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < n_sg_; i++) {
        t += red[i];
    }
    return t;
#else
    workgroupBarrier();
    red[lid_] = v;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st /= 2u) {
        if lid_ < st {
            red[lid_] += red[lid_ + st];
        }
        workgroupBarrier();
    }
    return red[0];
#endif
}

// Σ over the team's invocations of a[r] (and b[r]), for r = tl_ < ROWS
// (call in uniform control flow).
fn team_tree(a: array<f32, ROWS>, b: array<f32, ROWS>, team: u32) -> vec2<f32> {
    for (var r = 0u; r < ROWS; r++) {
        partial[r * WG + lid_] = a[r];
#if PAIR
        partial[(ROWS + r) * WG + lid_] = b[r];
#endif
    }
    workgroupBarrier();
    for (var stride = TW / 2u; stride > 0u; stride /= 2u) {
        if tl_ < stride {
            for (var j = 0u; j < ROWS * NACC; j++) {
                partial[j * WG + lid_] += partial[j * WG + lid_ + stride];
            }
        }
        workgroupBarrier();
    }
    var t = vec2<f32>(0.0);
    if tl_ < ROWS {
        t.x = partial[tl_ * WG + team * TW];
#if PAIR
        t.y = partial[(ROWS + tl_) * WG + team * TW];
#endif
    }
    return t;
}

struct X8 {
    a: vec4<f32>,
    b: vec4<f32>,
}

#if XQ == 0
fn x1(xo: u32, e: u32) -> f32 {
#if XS
    return xs_ld(e);
#elif NORM
    return x_in(xo + e) * x_w4(e & ~3u)[e & 3u];
#else
    return x_in(xo + e);
#endif
}

// Elements e..e+8 (e % 8 == 0) of the input row at xo.
fn x8(xo: u32, e: u32) -> X8 {
#if XS
    return X8(xs[e >> 2u], xs[(e >> 2u) + 1u]);
#else
#if NORM
    return X8(x_in4(xo + e) * x_w4(e), x_in4(xo + e + 4u) * x_w4(e + 4u));
#else
    return X8(x_in4(xo + e), x_in4(xo + e + 4u));
#endif
#endif
}
#endif

#if DTYPE == 'Q4_0X' || DTYPE == 'Q4_K' || DTYPE == 'Q6_KX'
fn load_word_a(i: u32) -> u32 {
    return w_a[i >> 2u][i & 3u];
}

fn load_vec4_a(i: u32) -> vec4<u32> {
    return w_a[i];
}
#else
fn load_word_a(i: u32) -> u32 {
    return w_a[i];
}
#endif
#include matvec_rows.wgsl as _a
#if DTYPE_B != 'NONE'
#if DTYPE_B == 'Q4_0X' || DTYPE_B == 'Q4_K' || DTYPE_B == 'Q6_KX'
fn load_word_b(i: u32) -> u32 {
    return w_b[i >> 2u][i & 3u];
}

fn load_vec4_b(i: u32) -> vec4<u32> {
    return w_b[i];
}
#else
fn load_word_b(i: u32) -> u32 {
    return w_b[i];
}
#endif
#include matvec_rows.wgsl as _b DTYPE=DTYPE_B
#endif
#if DTYPE_C != 'NONE'
#if DTYPE_C == 'Q4_0X' || DTYPE_C == 'Q4_K' || DTYPE_C == 'Q6_KX'
fn load_word_c(i: u32) -> u32 {
    return w_c[i >> 2u][i & 3u];
}

fn load_vec4_c(i: u32) -> vec4<u32> {
    return w_c[i];
}
#else
fn load_word_c(i: u32) -> u32 {
    return w_c[i];
}
#endif
#include matvec_rows.wgsl as _c DTYPE=DTYPE_C
#endif

#include act.wgsl
#if XQ || QOUT
#include q8.wgsl
#endif

#hook FUSED
#if DTYPE == 'Q4_0X' || DTYPE == 'Q4_K' || DTYPE == 'Q6_KX'
@group(0) @binding(0) var<storage, read> w_a: array<vec4<u32>>;
#else
@group(0) @binding(0) var<storage, read> w_a: array<u32>;
#endif
#if DTYPE_B != 'NONE'
#if DTYPE_B == 'Q4_0X' || DTYPE_B == 'Q4_K' || DTYPE_B == 'Q6_KX'
@group(0) @binding(1) var<storage, read> w_b: array<vec4<u32>>;
#else
@group(0) @binding(1) var<storage, read> w_b: array<u32>;
#endif
#endif
#if DTYPE_C != 'NONE'
#if DTYPE_C == 'Q4_0X' || DTYPE_C == 'Q4_K' || DTYPE_C == 'Q6_KX'
@group(0) @binding(2) var<storage, read> w_c: array<vec4<u32>>;
#else
@group(0) @binding(2) var<storage, read> w_c: array<u32>;
#endif
#endif
#if XQ && XS == 0
@group(0) @binding(3) var<storage, read> x: array<vec4<u32>>;
#else
@group(0) @binding(3) var<storage, read> x: array<f32>;
#endif
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;
#if QOUT
@group(0) @binding(6) var<storage, read_write> yq: array<u32>;

fn qout_w4(n: u32) -> vec4<f32> {
    return vec4<f32>(1.0);
}

fn qout_word(i: u32, v: u32) {
    yq[i] = v;
}
#if QLAST
@group(0) @binding(7) var<storage, read_write> qcnt: array<atomic<u32>>;

fn qout_stored(m: u32, n: u32) -> f32 {
    return y[m * p.ldy + p.n_offset + n];
}
#endif
#endif

#if XQ
fn xq_in(i: u32) -> u32 {
#if XS
    return xqs[i >> 2u][i & 3u];
#else
    return x[i >> 2u][i & 3u];
#endif
}

fn xq_in4(i: u32) -> vec4<u32> {
#if XS
    return xqs[i >> 2u];
#else
    return x[i >> 2u];
#endif
}
#if XS

fn xq_src4(m: u32, e: u32) -> vec4<f32> {
    let i = m * p.k + e;
    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
}
#endif
#else
fn x_in(i: u32) -> f32 {
    return x[i];
}

fn x_in4(i: u32) -> vec4<f32> {
    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
}
#endif

fn x_w4(e: u32) -> vec4<f32> {
    return vec4<f32>(1.0);
}

const NORM_EPS: f32 = 1e-6;

fn prologue(m: u32, g: u32) {
#if XS && XQ
    xq_stage_row(m);
#elif XS
    for (var e = lid_; e < p.k; e += WG) {
        xs_st(e, x[m * p.k + e]);
    }
    workgroupBarrier();
#endif
}

fn store(seg: u32, m: u32, n: u32, a: f32, b: f32) -> f32 {
#if PAIR
    let v = a * b;
    y[m * p.ldy + p.n_offset + n] = v;
#else
    let v = a;
    let base = select(0u, select(p.na, p.na + p.nb, seg == 2u), seg > 0u);
    y[m * p.ldy + p.n_offset + base + n] = v;
#endif
    return v;
}
#endhook

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUPS
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
#endif
) {
    lid_ = lid;
    tl_ = lid % TW;
    let team = lid / TW;
#if SUBGROUPS
    sg_lane_ = sg_lane;
    sg_id_ = sg_id;
    n_sg_ = n_sg;
#endif
    let g = wg.x + wg.y * nwg.x;
    let m = wg.z;
    prologue(m, g);
#if XQ && XS
    xqo_ = 0u;
#elif XQ
    xqo_ = p.xqo + m * (p.k / 4u + p.k / 32u);
#endif
#if NORM
    // The folded RMSNorm: Σ x² over the raw row (p.k % 4 == 0), or with XQ
    // the producer's per-block sums; reduced over the workgroup after the
    // dot products, so that the weight loads go first.
    var ssq = 0.0;
#if XQ
    let so = p.xqo + p.m * (p.k / 4u + p.k / 32u) + m * (p.k / 32u);
    for (var i = lid; i < p.k / 32u; i += WG) {
        ssq += bitcast<f32>(xq_in(so + i));
    }
#else
    for (var i = lid; i < p.k / 4u; i += WG) {
        let v = x_in4(m * p.k + 4u * i);
        ssq += dot(v, v);
    }
#endif
#endif
    // This team's rows: row group vg of the dispatch.
#if QOUT
    let vg = g * TEAMS + team;
#else
    let vg = g;
#endif
    let ga = (p.na + ROWS - 1u) / ROWS;
    let gb = (p.nb + ROWS - 1u) / ROWS;
    let gc = (p.nc + ROWS - 1u) / ROWS;
    var seg = 0u;
    var n0 = vg * ROWS;
    var nseg = p.na;
#if PAIR == 0
    if vg >= ga + gb {
        seg = 2u;
        n0 = (vg - ga - gb) * ROWS;
        nseg = p.nc;
    } else if vg >= ga {
        seg = 1u;
        n0 = (vg - ga) * ROWS;
        nseg = p.nb;
    }
#endif
#if QOUT == 0 || QLAST
    // (QOUT: every team has rows, the dispatch covering whole blocks.
    // QLAST: only workgroups the dispatch's spread over x and y adds.)
    if n0 >= nseg {
        return;
    }
#endif
    let xo = m * p.k;
    var a: array<f32, ROWS>;
    var b: array<f32, ROWS>;
    if seg == 0u {
        a = dot_rows_a(row_offsets_a(n0, nseg, p.k), xo, p.k);
#if PAIR
        b = dot_rows_b(row_offsets_b(n0, nseg, p.k), xo, p.k);
#endif
    }
#if DTYPE_B != 'NONE' && PAIR == 0
    if seg == 1u {
        a = dot_rows_b(row_offsets_b(n0, nseg, p.k), xo, p.k);
    }
#endif
#if DTYPE_C != 'NONE'
    if seg == 2u {
        a = dot_rows_c(row_offsets_c(n0, nseg, p.k), xo, p.k);
    }
#endif
#if NORM
    norm_r_ = inverseSqrt(wg_sum(ssq) / f32(p.k) + NORM_EPS);
#endif
    var t = vec2<f32>(0.0);
#if SUBGROUPS
#if QOUT
    // Teams reduce through their subgroups where no subgroup holds two
    // teams (every GPU seen: subgroups are runs of consecutive invocations,
    // at most a team wide), else through workgroup memory.
    if !subgroupAll(subgroupBroadcastFirst(team) == team) && sg_lane == 0u {
        mixed_ = 1u;
    }
    if workgroupUniformLoad(&mixed_) == 0u {
        if sg_lane == 0u {
            red[sg_id] = f32(team);
        }
#endif
        for (var r = 0u; r < ROWS; r++) {
            let s = subgroupAdd(a[r]);
#if PAIR
            let sb = subgroupAdd(b[r]);
#endif
            if sg_lane == 0u {
                partial[r * WG + sg_id] = s;
#if PAIR
                partial[(ROWS + r) * WG + sg_id] = sb;
#endif
            }
        }
        workgroupBarrier();
        if tl_ < ROWS {
            for (var s = 0u; s < n_sg; s++) {
#if QOUT
                if red[s] != f32(team) {
                    continue;
                }
#endif
                t.x += partial[tl_ * WG + s];
#if PAIR
                t.y += partial[(ROWS + tl_) * WG + s];
#endif
            }
        }
#if QOUT
    } else {
        t = team_tree(a, b, team);
    }
#endif
#else
    t = team_tree(a, b, team);
#endif
    if tl_ < ROWS && n0 + tl_ < nseg {
#if NORM
        t *= norm_r_;
#endif
        let v = store(seg, m, n0 + tl_, t.x, t.y);
#if QOUT
        qblk[team * ROWS + tl_] = v;
#endif
    }
#if QOUT && QLAST
    // Count this workgroup's rows into their 32-row block; the workgroup
    // that completes the block quantizes it, reading back what the others
    // stored (their stores ordered before their counts, its reads after,
    // by the device-scope barriers), and zeroes the count for the next
    // dispatch.
    storageBarrier();
    let qg = g * ROWS / 32u;
    if lid == 0u {
        let c = m * (p.na / 32u) + qg;
        let done = atomicAdd(&qcnt[c], ROWS) + ROWS;
        var last = 0u;
        if done == 32u {
            atomicStore(&qcnt[c], 0u);
            last = 1u;
        }
        qlast_ = last;
    }
    if workgroupUniformLoad(&qlast_) == 0u {
        return;
    }
    storageBarrier();
    var x = vec4<f32>(0.0);
    if lid < 8u {
        let e = qg * 32u + 4u * lid;
        x = vec4<f32>(qout_stored(m, e), qout_stored(m, e + 1u), qout_stored(m, e + 2u), qout_stored(m, e + 3u));
    }
#elif QOUT
    // The workgroup's block (rows 32 g .. 32 g + 32) is complete.
    workgroupBarrier();
    let qg = g;
    var x = vec4<f32>(0.0);
    if lid < 8u {
        x = vec4<f32>(qblk[4u * lid], qblk[4u * lid + 1u], qblk[4u * lid + 2u], qblk[4u * lid + 3u]);
    }
#endif
#if QOUT
    // Quantize the block as quantize_rows would, after the norm weight of
    // the row's reader.
    let nq = p.na / 32u;
    var v = vec4<f32>(0.0);
    if lid < 8u {
        let e = qg * 32u + 4u * lid;
        v = x * qout_w4(e);
        red[lid] = max(max(abs(v.x), abs(v.y)), max(abs(v.z), abs(v.w)));
        red[8u + lid] = dot(x, x);
    }
    workgroupBarrier();
    if lid < 8u {
        var amax = red[0];
        var ss = red[8];
        for (var j = 1u; j < 8u; j++) {
            amax = max(amax, red[j]);
            ss += red[8u + j];
        }
        let row = p.qo + m * (p.na / 4u + nq);
        qout_word(row + qg * 8u + lid, q8_word(v, amax));
        if lid == 0u {
            qout_word(row + p.na / 4u + qg, bitcast<u32>(amax / 127.0));
            qout_word(p.qo + p.m * (p.na / 4u + nq) + m * nq + qg, bitcast<u32>(ss));
        }
    }
#endif
}
