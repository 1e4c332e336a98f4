//! kiln template: attention
//! Causal attention against the KV cache, for decode (T = 1) and prefill.
//! Query r of head h sits at position p = pos0 + r and attends, through kv
//! head h / (H / Hkv) (GQA), to the keys j ≤ p with window == 0 or
//! p - j < window: s = dot(q, k) * scale, then s = softcap * tanh(s / softcap)
//! when softcap > 0, softmax, out = Σ softmax_j · v_j. Keys 0..pos0 + T are
//! already in the caches. One workgroup per (token, head) and split (linear
//! workgroup index wg.x + wg.y * num_workgroups.x, beyond T * H * SPLIT
//! return).
//! The keys go in blocks of WG: the block's keys are scored (with
//! SUBGROUPS=1 by subgroups, lanes splitting each key's dimensions and
//! four keys per subgroup at a time; else one key per invocation), a
//! workgroup max gives the running maximum (online softmax), then each
//! invocation accumulates its output dimensions over the block's keys,
//! sixteen at a time (where WG >= 2 Dv, over every (WG / Dv)-th key, the
//! phases summed at the end).
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
//! the attended keys first..=pos0 (chunk = max(ceil(keys / SPLIT), 32); a
//! split past the end is empty) and write an unnormalized partial row
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
// Fewest keys a split takes (SPLIT > 1): one pass of the scoring and value
// loops at WG 256 with 32-wide subgroups, so a short context runs on fewer
// splits at the same latency and leaves the merge fewer partial rows.
const MIN_CHUNK: u32 = 32u;

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

// Rotate pairs of the first `dims` dimensions of q_sh and k_sh in place by
// position `pos` (one angle for both).
fn rope_qk(lid: u32, pos: f32) {
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
        let q0 = q_sh[ia];
        let q1 = q_sh[ib];
        q_sh[ia] = q0 * sc.y - q1 * sc.x;
        q_sh[ib] = q0 * sc.x + q1 * sc.y;
        let k0 = k_sh[ia];
        let k1 = k_sh[ib];
        k_sh[ia] = k0 * sc.y - k1 * sc.x;
        k_sh[ib] = k0 * sc.x + k1 * sc.y;
    }
}
#endif

#if SUBGROUPS
// Elements c..c+4 of the key row at kb, or of the fresh key (PREP: the
// current position's, not yet in the cache for every workgroup); zero past
// the head's D.
fn key4(kb: u32, c: u32, fresh: bool) -> vec4<f32> {
    let i = min(vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.d - 1u));
    var v = vec4<f32>(k_cache[kb + i.x], k_cache[kb + i.y], k_cache[kb + i.z], k_cache[kb + i.w]);
#if PREP
    v = select(v, vec4<f32>(k_sh[i.x], k_sh[i.y], k_sh[i.z], k_sh[i.w]), fresh);
#endif
    return select(vec4<f32>(0.0), v, vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.d));
}

// The scores q · k of keys j0 + t (t < nk) into pw[t]. The lanes of a
// subgroup split a key's dimensions in runs of four (a subgroup reads the
// row contiguously) and subgroupAdd sums them; subgroups take keys t,
// t + n_sg, ..., four at a time, so that sixteen loads per lane are in
// flight rather than one key row's walk per invocation. Call in uniform
// control flow.
fn score_block(j0: u32, nk: u32, pos: u32, k_off: u32, k_stride: u32, lane: u32, sg: u32, n_sg: u32, sg_size: u32) {
    // The previous block's readers of pw are done.
    workgroupBarrier();
    for (var t = sg; t < nk; t += 4u * n_sg) {
        var kb: array<u32, 4>;
        var fresh: array<bool, 4>;
        for (var u = 0u; u < 4u; u++) {
            let j = j0 + min(t + u * n_sg, nk - 1u);
            kb[u] = j * k_stride + k_off;
            fresh[u] = j == pos;
        }
        var acc = vec4<f32>(0.0);
        for (var c = 4u * lane; c < p.d; c += 4u * sg_size) {
            let cs = vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u);
            let qv = select(vec4<f32>(0.0), vec4<f32>(q_sh[cs.x], q_sh[cs.y], q_sh[cs.z], q_sh[cs.w]), cs < vec4<u32>(p.d));
            acc += vec4<f32>(
                dot(qv, key4(kb[0], c, fresh[0])),
                dot(qv, key4(kb[1], c, fresh[1])),
                dot(qv, key4(kb[2], c, fresh[2])),
                dot(qv, key4(kb[3], c, fresh[3])),
            );
        }
        let tot = subgroupAdd(acc);
        if lane == 0u {
            for (var u = 0u; u < 4u; u++) {
                if t + u * n_sg < nk {
                    pw[t + u * n_sg] = tot[u];
                }
            }
        }
    }
    workgroupBarrier();
}
#else
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
#endif

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
    @builtin(subgroup_size) sg_size: u32,
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
    let chunk = max((keys + SPLIT - 1u) / SPLIT, MIN_CHUNK);
    let lo = first + min(sp * chunk, keys);
    let end = first + min(sp * chunk + chunk, keys);
#if SPLIT > 1
    if lo == end {
        // Nothing to attend (sp > 0: split 0 always has keys and writes the
        // cache): the neutral partial row, before any load.
        let pb = p.t * p.h * p.dv + item * (p.dv + 2u);
        for (var c = lid; c < p.dv + 2u; c += {{WG}}u) {
            out[pb + c] = select(0.0, NEG, c == 0u);
        }
        return;
    }
#endif
    // q (and with PREP the current token's k and v for this kv head,
    // prepared like q) in one phase: their loads are in flight together.
    for (var c = lid; c < p.d; c += {{WG}}u) {
        q_sh[c] = q[row * p.d + c];
#if PREP
        k_sh[c] = k_new[kh * p.d + c];
#endif
    }
#if PREP
    for (var c = lid; c < p.dv; c += {{WG}}u) {
        v_sh[c] = v_new[kh * p.dv + c];
    }
#endif
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
#if QNORM || KNORM
    workgroupBarrier();
#endif
#if ROPE != 'NONE'
    rope_qk(lid, f32(pos));
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
    // Key phases: where the workgroup is at least twice as wide as Dv,
    // invocation lid takes dimension d0 of the keys t ≡ kp (mod ph) of each
    // block (more loads in flight), and the phases add up at the end;
    // otherwise dimensions d0 + c * WG of every key.
    let ph = max(1u, {{WG}}u / p.dv);
    let kp = select(0u, lid / p.dv, ph > 1u);
    let d0 = select(lid, lid % p.dv, ph > 1u);
    for (var j0 = lo; j0 < end; j0 += {{WG}}u) {
        let j = j0 + lid;
        var s = NEG;
#if SUBGROUPS
        score_block(j0, min({{WG}}u, end - j0), pos, k_off, k_stride, sg_lane, sg_id, n_sg, sg_size);
#endif
        if j < end {
#if SUBGROUPS
            let qk = pw[lid];
#else
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
            let dd = d0 + c * {{WG}}u;
            if dd < p.dv && kp < ph {
                var a = acc[c] * corr;
                // Sixteen keys (t, t + ph, ...) per iteration, their loads
                // independent: each key's row is a new cache line, and a
                // loop that waits for one load at a time is bound by memory
                // latency. Keys past the block repeat its last with weight 0.
                for (var t = kp; t < nk; t += 16u * ph) {
                    var v: array<f32, 16>;
                    var w: array<f32, 16>;
                    for (var u = 0u; u < 16u; u++) {
                        let tu = min(t + u * ph, nk - 1u);
                        v[u] = vrow(j0 + tu, (j0 + tu) * v_stride + v_off + dd, dd, pos);
                        w[u] = select(0.0, pw[tu], t + u * ph < nk);
                    }
                    var a4 = vec4<f32>(0.0);
                    for (var u = 0u; u < 16u; u += 4u) {
                        a4 += vec4<f32>(w[u], w[u + 1u], w[u + 2u], w[u + 3u])
                            * vec4<f32>(v[u], v[u + 1u], v[u + 2u], v[u + 3u]);
                    }
                    a += (a4.x + a4.y) + (a4.z + a4.w);
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
    if ph > 1u {
        // (reduce_sum's barriers end the last block's reads of pw.)
        if kp < ph {
            pw[lid] = acc[0];
        }
        workgroupBarrier();
        if kp == 0u {
            for (var q = 1u; q < ph; q++) {
                acc[0] += pw[q * p.dv + d0];
            }
        }
    }
#if SPLIT > 1
    // The partial row after the [T, H, Dv] output.
    let pb = p.t * p.h * p.dv + item * (p.dv + 2u);
    if lid == 0u {
        out[pb] = m;
        out[pb + 1u] = total;
    }
    for (var c = 0u; c < NACC; c++) {
        let dd = d0 + c * {{WG}}u;
        if dd < p.dv && kp == 0u {
            out[pb + 2u + dd] = acc[c];
        }
    }
#else
    let inv = 1.0 / total;
    for (var c = 0u; c < NACC; c++) {
        let dd = d0 + c * {{WG}}u;
        if dd < p.dv && kp == 0u {
            out[item * p.dv + dd] = acc[c] * inv;
        }
    }
#endif
}
