//! kiln template: attention
//! Causal attention against the KV cache, for decode (T = 1) and prefill.
//! Query r of head h sits at position p = pos0 + r and attends, through kv
//! head h / (H / Hkv) (GQA), to the keys j ≤ p with window == 0 or
//! p - j < window: s = dot(q, k) * scale, then s = softcap * tanh(s / softcap)
//! when softcap > 0, softmax, out = Σ softmax_j · v_j. Keys 0..pos0 + T are
//! already in the caches. One workgroup per (token, head) (linear workgroup
//! index wg.x + wg.y * num_workgroups.x, beyond T * H return).
//! The keys go in blocks of WG: each invocation scores one key of the block,
//! a workgroup max gives the running maximum (online softmax), then each
//! invocation accumulates its own output dimensions over the block's keys.
//! D and Dv are at most 256.
//! Bindings: 0 q [T, H, D], 1 k_cache [n_ctx, Hkv, D], 2 v_cache [n_ctx, Hkv, Dv],
//! 3 out [T, H, Dv], 4 Params{T, H, Hkv, D, Dv, pos0, window, scale: f32, softcap: f32}.
//! knob WG: 64 128 256
//! knob SUBGROUPS: 0 1
//! wg_storage: (256 + 2 * WG) * 4
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
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_cache: array<f32>;
@group(0) @binding(2) var<storage, read> v_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

// Output dimensions each invocation owns (Dv ≤ 256).
const NACC: u32 = (256u + {{WG}}u - 1u) / {{WG}}u;
const NEG: f32 = -3.0e38;

var<workgroup> q_sh: array<f32, 256>;
var<workgroup> pw: array<f32, {{WG}}>;
var<workgroup> red: array<f32, {{WG}}>;

// tanh that never gives NaN for large |v| and is accurate near 0.
fn tanh_k(v: f32) -> f32 {
    let a = abs(v);
    if a < 0.125 {
        let v2 = v * v;
        return v * (1.0 + v2 * (-1.0 / 3.0 + v2 * (2.0 / 15.0 + v2 * (-17.0 / 315.0))));
    }
    let e = exp(2.0 * min(a, 20.0));
    return sign(v) * (1.0 - 2.0 / (e + 1.0));
}

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
    if item >= p.t * p.h {
        return;
    }
    let r = item / p.h;
    let h = item - r * p.h;
    let kh = h / (p.h / p.hkv);
    let pos = p.pos0 + r;
    var first = 0u;
    if p.window > 0u && pos + 1u > p.window {
        first = pos + 1u - p.window;
    }
    for (var c = lid; c < p.d; c += {{WG}}u) {
        q_sh[c] = q[item * p.d + c];
    }
    workgroupBarrier();

    let k_off = kh * p.d;
    let k_stride = p.hkv * p.d;
    let v_off = kh * p.dv;
    let v_stride = p.hkv * p.dv;
    // Running max (the same in every invocation), this invocation's share of
    // the running sum, and its output dimensions lid + c * WG.
    var m = NEG;
    var l = 0.0;
    var acc: array<f32, NACC>;
    for (var j0 = first; j0 <= pos; j0 += {{WG}}u) {
        let j = j0 + lid;
        var s = NEG;
        if j <= pos {
            let kb = j * k_stride + k_off;
            var qk = 0.0;
            for (var c = 0u; c < p.d; c++) {
                qk += q_sh[c] * k_cache[kb + c];
            }
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
        if j <= pos {
            e = exp(s - m_new);
        }
        l = l * corr + e;
        pw[lid] = e;
        workgroupBarrier();
        let nk = min({{WG}}u, pos + 1u - j0);
        for (var c = 0u; c < NACC; c++) {
            let dd = lid + c * {{WG}}u;
            if dd < p.dv {
                var a = acc[c] * corr;
                var vb = j0 * v_stride + v_off + dd;
                for (var t = 0u; t < nk; t++) {
                    a += pw[t] * v_cache[vb];
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
    let inv = 1.0 / total;
    for (var c = 0u; c < NACC; c++) {
        let dd = lid + c * {{WG}}u;
        if dd < p.dv {
            out[item * p.dv + dd] = acc[c] * inv;
        }
    }
}
