//! kiln template: layer_norm
//! Layer norm over rows: y = (x - mean) / sqrt(var + eps) * w + b, with w used
//! when flags bit 0 is set and b when bit 1 is set. One workgroup per row
//! (linear workgroup index wg.x + wg.y * num_workgroups.x, rows beyond `rows`
//! return). Bindings: 0 x [rows, d], 1 w [d], 2 b [d], 3 y [rows, d],
//! 4 Params{d, rows, eps: f32, flags}.
//! knob WG: 64 128 256
//! knob SUBGROUPS: 0 1
//! wg_storage: WG * 4
// (naga takes subgroup builtins without `enable subgroups;`: the validator's
// SUBGROUP capability gates them. The subgroup size is never assumed.)
struct Params {
    d: u32,
    rows: u32,
    eps: f32,
    flags: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> red: array<f32, {{WG}}>;

// Workgroup-wide sum; every invocation gets the result. It starts with a
// barrier so that a previous reduction's readers are done with `red`.
#if SUBGROUPS
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
    let row = wg.x + wg.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.d;
    let inv_d = 1.0 / f32(p.d);
    var s = 0.0;
    for (var i = lid; i < p.d; i += {{WG}}u) {
        s += x[base + i];
    }
#if SUBGROUPS
    let mean = reduce_sum(s, sg_lane, sg_id, n_sg) * inv_d;
#else
    let mean = reduce_sum(s, lid) * inv_d;
#endif
    // Two passes: the variance of the centred values (no cancellation).
    var q = 0.0;
    for (var i = lid; i < p.d; i += {{WG}}u) {
        let c = x[base + i] - mean;
        q += c * c;
    }
#if SUBGROUPS
    let var_ = reduce_sum(q, sg_lane, sg_id, n_sg) * inv_d;
#else
    let var_ = reduce_sum(q, lid) * inv_d;
#endif
    let scale = inverseSqrt(var_ + p.eps);
    for (var i = lid; i < p.d; i += {{WG}}u) {
        var v = (x[base + i] - mean) * scale;
        if (p.flags & 1u) != 0u {
            v *= w[i];
        }
        if (p.flags & 2u) != 0u {
            v += b[i];
        }
        y[base + i] = v;
    }
}
