//! kiln template: attention
//! Causal attention against the KV cache, for decode (T = 1) and prefill.
//! Query r of head h sits at position p = pos0 + r and attends, through kv
//! head h / (H / Hkv) (GQA), to the keys j ≤ p with window == 0 or
//! p - j < window: s = dot(q, k) * scale, then s = softcap * tanh(s / softcap)
//! when softcap > 0, softmax, out = Σ softmax_j · v_j. Keys 0..pos0 + T are
//! already in the caches. One workgroup per (token, head) and split (linear
//! workgroup index wg.x + wg.y * num_workgroups.x, beyond T * H * SPLIT
//! return).
//! The keys go in blocks of WG: each invocation scores one key of the block,
//! a workgroup max gives the running maximum (online softmax), then each
//! invocation accumulates its own output dimensions over the block's keys.
//! D and Dv are at most 256.
//! Bindings: 0 q [T, H, D], 1 k_cache [n_ctx, Hkv, D], 2 v_cache [n_ctx, Hkv, Dv],
//! 3 out [T, H, Dv], 4 Params{T, H, Hkv, D, Dv, pos0, window, scale: f32, softcap: f32}.
//! PREP=1 (decode, T = 1, fused): q, k and v are the raw projections of
//! the current token ([H, D], [Hkv, D], [Hkv, Dv]); each workgroup applies
//! the per-head prep itself (QNORM / KNORM: RMSNorm over D with weights
//! q_norm / k_norm and eps; ROPE: NORMAL or NEOX rotation of the first
//! `dims` dimensions by pos0 · rope_scale · rope_base^(-2i/dims)), uses the
//! fresh k and v for position pos0, and the first query head of each kv
//! head writes them into the caches. Bindings then: 0 q, 1 k, 2 v,
//! 3 k_cache, 4 v_cache, 5 out, 6 q_norm, 7 k_norm, 8 Params (with eps,
//! dims, rope_base, rope_scale).
//! SPLIT > 1 (with PREP=1; split-K decode): SPLIT workgroups per head
//! (linear index item = head * SPLIT + s) each take one contiguous chunk of
//! the attended keys first..=pos0 (chunk = ceil(keys / SPLIT); a split past
//! the end is empty) and write an unnormalized partial row
//! [m, l, acc[0..Dv]] (running max, Σ exp(s - m), Σ exp(s - m) · v) at
//! out[T * H * Dv + item * (Dv + 2)], i.e. after the [T, H, Dv] output it
//! leaves unwritten. An empty split writes m = -3e38, l = 0, acc = 0. The
//! merge (attention_merge, or a matmul prologue) forms
//! out[h] = Σ_s e^(m_s - M) acc_s / Σ_s e^(m_s - M) l_s, M = max_s m_s.
//! Every split preps its own q; the split holding pos0 uses the fresh k, v;
//! split 0 of the first query head of each kv head writes the cache rows.
//! knob WG: 64 128 256
//! knob SUBGROUPS: 0 1
//! knob PREP: 1 0
//! knob QNORM: 0 1
//! knob KNORM: 0 1
//! knob ROPE: NONE NORMAL NEOX
//! knob SPLIT: 1 2 4 8 16 32
//! cover: QNORM KNORM ROPE SPLIT
//! require: PREP == 1 || SPLIT == 1
//! wg_storage: (256 + 2 * WG + PREP * 512) * 4
// (naga takes subgroup builtins without `enable subgroups;`: the validator's
// SUBGROUP capability gates them. The subgroup size is never assumed.)
struct Params {
    t: u32,
    h: u32,
    hkv: u32,
    d: u32,
    dv: u32,
    pos0: u32,
    window: u32,
    scale: f32,
    softcap: f32,
#if PREP
    eps: f32,
    dims: u32,
    rope_base: f32,
    rope_scale: f32,
#endif
}

#if PREP
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_new: array<f32>;
@group(0) @binding(2) var<storage, read> v_new: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
#if QNORM
@group(0) @binding(6) var<storage, read> q_norm: array<f32>;
#endif
#if KNORM
@group(0) @binding(7) var<storage, read> k_norm: array<f32>;
#endif
@group(0) @binding(8) var<uniform> p: Params;
var<workgroup> k_sh: array<f32, 256>;
var<workgroup> v_sh: array<f32, 256>;
#include rope_angle.wgsl
#else
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_cache: array<f32>;
@group(0) @binding(2) var<storage, read> v_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;
#endif

// Output dimensions each invocation owns (Dv ≤ 256).
const NACC: u32 = (256u + {{WG}}u - 1u) / {{WG}}u;
const NEG: f32 = -3.0e38;
const SPLIT: u32 = {{SPLIT}}u;

var<workgroup> q_sh: array<f32, 256>;
var<workgroup> pw: array<f32, {{WG}}>;
var<workgroup> red: array<f32, {{WG}}>;

#include act.wgsl

// Workgroup-wide reductions; every invocation gets the result. Each starts
// with a barrier so that a previous reduction's readers (and the previous
// block's readers of `pw`) are done.
#if SUBGROUPS
fn reduce_max(v: f32, lane: u32, sg: u32, n_sg: u32) -> f32 {
    let s = subgroupMax(v);
    workgroupBarrier();
    if lane == 0u {
        red[sg] = s;
    }
    workgroupBarrier();
    var r = red[0];
    for (var i = 1u; i < n_sg; i++) {
        r = max(r, red[i]);
    }
    return r;
}

fn reduce_sum(v: f32, lane: u32, sg: u32, n_sg: u32) -> f32 {
    let s = subgroupAdd(v);
    workgroupBarrier();
    if lane == 0u {
        red[sg] = s;
    }
    workgroupBarrier();
    var r = 0.0;
    for (var i = 0u; i < n_sg; i++) {
        r += red[i];
    }
    return r;
}
#else
fn reduce_max(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var stride = {{WG}}u / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            red[lid] = max(red[lid], red[lid + stride]);
        }
        workgroupBarrier();
    }
    return red[0];
}

fn reduce_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var stride = {{WG}}u / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            red[lid] += red[lid + stride];
        }
        workgroupBarrier();
    }
    return red[0];
}
#endif

#if PREP
#if SUBGROUPS
fn sum_all(v: f32, lid: u32, lane: u32, sg: u32, n_sg: u32) -> f32 {
    return reduce_sum(v, lane, sg, n_sg);
}
#else
fn sum_all(v: f32, lid: u32, lane: u32, sg: u32, n_sg: u32) -> f32 {
    return reduce_sum(v, lid);
}
#endif

// Rotate pairs of the first `dims` of v_in-place array `which` (0: q_sh,
// 1: k_sh) by position `pos`.
fn rope_sh(which: u32, lid: u32, pos: f32) {
    let half = p.dims / 2u;
    for (var i = lid; i < half; i += {{WG}}u) {
        let freq = p.rope_scale * pow(p.rope_base, -f32(2u * i) / f32(p.dims));
        let sc = sincos_turns(pos, freq * INV_TWO_PI);
#if ROPE == 'NEOX'
        let ia = i;
        let ib = i + half;
#else
        let ia = 2u * i;
        let ib = ia + 1u;
#endif
        if which == 0u {
            let x0 = q_sh[ia];
            let x1 = q_sh[ib];
            q_sh[ia] = x0 * sc.y - x1 * sc.x;
            q_sh[ib] = x0 * sc.x + x1 * sc.y;
        } else {
            let x0 = k_sh[ia];
            let x1 = k_sh[ib];
            k_sh[ia] = x0 * sc.y - x1 * sc.x;
            k_sh[ib] = x0 * sc.x + x1 * sc.y;
        }
    }
}
#endif

// q · k for the key row at kb: four independent partial sums so that the
// loads of a row are in flight together.
fn dot_key(kb: u32) -> f32 {
    var s0 = 0.0;
    var s1 = 0.0;
    var s2 = 0.0;
    var s3 = 0.0;
    var c = 0u;
    for (; c + 4u <= p.d; c += 4u) {
        s0 += q_sh[c] * k_cache[kb + c];
        s1 += q_sh[c + 1u] * k_cache[kb + c + 1u];
        s2 += q_sh[c + 2u] * k_cache[kb + c + 2u];
        s3 += q_sh[c + 3u] * k_cache[kb + c + 3u];
    }
    for (; c < p.d; c++) {
        s0 += q_sh[c] * k_cache[kb + c];
    }
    return (s0 + s1) + (s2 + s3);
}

// Value dimension dd of key j (row element at vb of the cache); with PREP
// the current position's value comes from the fresh row, never the cache.
fn vrow(j: u32, vb: u32, dd: u32, pos: u32) -> f32 {
#if PREP
    return select(v_cache[vb], v_sh[dd], j == pos);
#else
    return v_cache[vb];
#endif
}

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
    let item = wg.x + wg.y * nwg.x;
    if item >= p.t * p.h * SPLIT {
        return;
    }
    // (token, head) row and split.
    let row = item / SPLIT;
    let sp = item - row * SPLIT;
    let r = row / p.h;
    let h = row - r * p.h;
    let kh = h / (p.h / p.hkv);
    let pos = p.pos0 + r;
    var first = 0u;
    if p.window > 0u && pos + 1u > p.window {
        first = pos + 1u - p.window;
    }
    // This split's keys: lo..end (end exclusive; empty when lo == end).
    let keys = pos + 1u - first;
    let chunk = (keys + SPLIT - 1u) / SPLIT;
    let lo = first + min(sp * chunk, keys);
    let end = first + min(sp * chunk + chunk, keys);
    for (var c = lid; c < p.d; c += {{WG}}u) {
        q_sh[c] = q[row * p.d + c];
    }
    workgroupBarrier();
#if PREP
#if SUBGROUPS
    let lane_ = sg_lane;
    let sgi_ = sg_id;
    let nsg_ = n_sg;
#else
    let lane_ = 0u;
    let sgi_ = 0u;
    let nsg_ = 0u;
#endif
    // The current token's k and v for this kv head, prepared like q.
    for (var c = lid; c < p.d; c += {{WG}}u) {
        k_sh[c] = k_new[kh * p.d + c];
    }
    for (var c = lid; c < p.dv; c += {{WG}}u) {
        v_sh[c] = v_new[kh * p.dv + c];
    }
#if QNORM
    var ssq = 0.0;
    for (var c = lid; c < p.d; c += {{WG}}u) {
        ssq += q_sh[c] * q_sh[c];
    }
    let rq = inverseSqrt(sum_all(ssq, lid, lane_, sgi_, nsg_) / f32(p.d) + p.eps);
    for (var c = lid; c < p.d; c += {{WG}}u) {
        q_sh[c] = q_sh[c] * rq * q_norm[c];
    }
#endif
#if KNORM
    var ssk = 0.0;
    for (var c = lid; c < p.d; c += {{WG}}u) {
        ssk += k_sh[c] * k_sh[c];
    }
    let rk = inverseSqrt(sum_all(ssk, lid, lane_, sgi_, nsg_) / f32(p.d) + p.eps);
    for (var c = lid; c < p.d; c += {{WG}}u) {
        k_sh[c] = k_sh[c] * rk * k_norm[c];
    }
#endif
    workgroupBarrier();
#if ROPE != 'NONE'
    rope_sh(0u, lid, f32(pos));
    rope_sh(1u, lid, f32(pos));
    workgroupBarrier();
#endif
    if h % (p.h / p.hkv) == 0u && sp == 0u {
        for (var c = lid; c < p.d; c += {{WG}}u) {
            k_cache[pos * p.hkv * p.d + kh * p.d + c] = k_sh[c];
        }
        for (var c = lid; c < p.dv; c += {{WG}}u) {
            v_cache[pos * p.hkv * p.dv + kh * p.dv + c] = v_sh[c];
        }
    }
#endif

    let k_off = kh * p.d;
    let k_stride = p.hkv * p.d;
    let v_off = kh * p.dv;
    let v_stride = p.hkv * p.dv;
    // Running max (the same in every invocation), this invocation's share of
    // the running sum, and its output dimensions lid + c * WG.
    var m = NEG;
    var l = 0.0;
    var acc: array<f32, NACC>;
    for (var j0 = lo; j0 < end; j0 += {{WG}}u) {
        let j = j0 + lid;
        var s = NEG;
        if j < end {
            let kb = j * k_stride + k_off;
            var qk = 0.0;
#if PREP
            if j == pos {
                for (var c = 0u; c < p.d; c++) {
                    qk += q_sh[c] * k_sh[c];
                }
            } else {
                qk = dot_key(kb);
            }
#else
            qk = dot_key(kb);
#endif
            s = qk * p.scale;
            if p.softcap > 0.0 {
                s = p.softcap * tanh_k(s / p.softcap);
            }
        }
#if SUBGROUPS
        let m_new = max(m, reduce_max(s, sg_lane, sg_id, n_sg));
#else
        let m_new = max(m, reduce_max(s, lid));
#endif
        let corr = exp(m - m_new);
        var e = 0.0;
        if j < end {
            e = exp(s - m_new);
        }
        l = l * corr + e;
        pw[lid] = e;
        workgroupBarrier();
        let nk = min({{WG}}u, end - j0);
        for (var c = 0u; c < NACC; c++) {
            let dd = lid + c * {{WG}}u;
            if dd < p.dv {
                var a = acc[c] * corr;
                var vb = j0 * v_stride + v_off + dd;
                // Eight keys per iteration with independent loads: each
                // key's row is a new cache line, and a loop that waits for
                // one load at a time is bound by memory latency.
                var t = 0u;
                for (; t + 8u <= nk; t += 8u) {
                    let s = v_stride;
                    let v0 = vrow(j0 + t, vb, dd, pos);
                    let v1 = vrow(j0 + t + 1u, vb + s, dd, pos);
                    let v2 = vrow(j0 + t + 2u, vb + 2u * s, dd, pos);
                    let v3 = vrow(j0 + t + 3u, vb + 3u * s, dd, pos);
                    let v4 = vrow(j0 + t + 4u, vb + 4u * s, dd, pos);
                    let v5 = vrow(j0 + t + 5u, vb + 5u * s, dd, pos);
                    let v6 = vrow(j0 + t + 6u, vb + 6u * s, dd, pos);
                    let v7 = vrow(j0 + t + 7u, vb + 7u * s, dd, pos);
                    a += (pw[t] * v0 + pw[t + 1u] * v1) + (pw[t + 2u] * v2 + pw[t + 3u] * v3)
                        + ((pw[t + 4u] * v4 + pw[t + 5u] * v5) + (pw[t + 6u] * v6 + pw[t + 7u] * v7));
                    vb += 8u * s;
                }
                for (; t < nk; t++) {
                    a += pw[t] * vrow(j0 + t, vb, dd, pos);
                    vb += v_stride;
                }
                acc[c] = a;
            }
        }
        m = m_new;
    }
#if SUBGROUPS
    let total = reduce_sum(l, sg_lane, sg_id, n_sg);
#else
    let total = reduce_sum(l, lid);
#endif
#if SPLIT > 1
    // The partial row after the [T, H, Dv] output.
    let pb = p.t * p.h * p.dv + item * (p.dv + 2u);
    if lid == 0u {
        out[pb] = m;
        out[pb + 1u] = total;
    }
    for (var c = 0u; c < NACC; c++) {
        let dd = lid + c * {{WG}}u;
        if dd < p.dv {
            out[pb + 2u + dd] = acc[c];
        }
    }
#else
    let inv = 1.0 / total;
    for (var c = 0u; c < NACC; c++) {
        let dd = lid + c * {{WG}}u;
        if dd < p.dv {
            out[item * p.dv + dd] = acc[c] * inv;
        }
    }
#endif
}
