//! kiln template: quantize_rows
//! Rows of an f32 input quantized to int8 per 32-element block, in the
//! layout matmul_vec reads with XQ=1: row m at word p.qo + m * (K/4 + K/32)
//! holds K/4 words of q (four int8 to a word, in element order), then K/32
//! f32 block scales. q = round(127 · x / max|x|) over the block (WGSL's
//! pack4x8snorm), scale = max|x| / 127, as llama.cpp quantizes the input of
//! its quantized matmuls.
//! NORM=1 folds an RMSNorm in: the block quantizes x · w, and its scale
//! carries the row's 1 / sqrt(mean(x²) + eps).
//! MERGE=1 makes the row from a split attention's partials instead: after
//! the M rows of K (= heads × p.dv) elements, each token's [heads, SPLIT,
//! p.dv + 2] partial rows (max score, Σ exp, Σ exp · v) merge into the head's
//! output (kernels/lib/merge.wgsl; p.dv % 4 == 0). SPLIT is a knob
//! so that the loops over the splits unroll and their loads are in flight
//! together (with a runtime count each split's loads waited for the last).
//! Dispatch: spread(ceil(K / 4 / WG)) over x and y (linear workgroup
//! index g = wg.x + wg.y * num_workgroups.x), z = M; one invocation per
//! word of q, eight to a block (WG % 8 == 0, so blocks never straddle
//! workgroups). K % 32 == 0; x rows (and w) are read as vec4.
//! The kernel is small and on the critical path of every decode step, so
//! it is built for latency: every load is issued before any is waited on.
//! knob WG: 256
//! knob NORM: 0 1
//! knob MERGE: 0 1
//! knob SPLIT: 1 2 4 8 16 32
//! require: (NORM == 0 || MERGE == 0) && ((MERGE == 0 && SPLIT == 1) || (MERGE == 1 && SPLIT > 1))
//! wg_storage: WG * 4
struct Params {
    m: u32,
    k: u32,
    qo: u32,
    eps: f32,
    // MERGE: the head width (the split count is the knob SPLIT).
    dv: u32,
}

#if MERGE
@group(0) @binding(0) var<storage, read> x: array<f32>;
#else
@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
#endif
#if NORM
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;
#endif
@group(0) @binding(2) var<storage, read_write> q: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

const WG: u32 = {{WG}}u;
const SPLIT: u32 = {{SPLIT}}u;
#if MERGE
const MERGE_S: u32 = SPLIT;

fn part_ld(i: u32) -> f32 {
    return x[i];
}

#include merge.wgsl
#endif

var<workgroup> red: array<f32, WG>;

#include q8.wgsl

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m = wg.z;
    let n4 = p.k / 4u;
    let word = (wg.x + wg.y * nwg.x) * WG + lid;
    let x4 = m * n4;
    // Invocations past the row repeat its last word (uniform barriers).
    let wi = min(word, n4 - 1u);
#if MERGE
    // Elements 4 wi.. lie in one head; its partial rows for this token.
    let prow = p.dv + 2u;
    let hb = p.m * p.k + m * (p.k / p.dv) * SPLIT * prow + ((4u * wi) / p.dv) * SPLIT * prow;
    let d = (4u * wi) % p.dv;
    var v = merge4(merge_weights(hb, prow), hb, prow, d);
#else
    var v = x[x4 + wi];
#endif
    var scale = 1.0;
#if NORM
    v *= w[wi];
    // Every workgroup sums the whole row (a few KiB, from cache): no
    // second dispatch. Four loads in flight per invocation.
    var ss = 0.0;
    var i = lid;
    for (; i + 3u * WG < n4; i += 4u * WG) {
        let a = x[x4 + i];
        let b = x[x4 + i + WG];
        let c = x[x4 + i + 2u * WG];
        let d = x[x4 + i + 3u * WG];
        ss += (dot(a, a) + dot(b, b)) + (dot(c, c) + dot(d, d));
    }
    for (; i < n4; i += WG) {
        let a = x[x4 + i];
        ss += dot(a, a);
    }
    red[lid] = ss;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st /= 2u) {
        if lid < st {
            red[lid] += red[lid + st];
        }
        workgroupBarrier();
    }
    scale = inverseSqrt(red[0] / f32(p.k) + p.eps);
#endif
    let amax = q8_amax(v, lid);
    if word >= n4 {
        return;
    }
    let row = p.qo + m * (n4 + p.k / 32u);
    q[row + word] = q8_word(v, amax);
    if lid % 8u == 0u {
        q[row + n4 + word / 8u] = bitcast<u32>(amax / 127.0 * scale);
    }
}
