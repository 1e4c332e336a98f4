//! kiln template: softmax
//! Softmax over rows of length d: y = exp(x - max) / sum(exp(x - max)).
//! One workgroup per row (linear workgroup index wg.x + wg.y * num_workgroups.x,
//! rows beyond `rows` return). Bindings: 0 x [rows, d], 1 y [rows, d],
//! 2 Params{rows, d}.
//! knob WG: 64 128 256
//! knob SUBGROUPS: 0 1
//! wg_storage: WG * 4
// (naga takes subgroup builtins without `enable subgroups;`: the validator's
// SUBGROUP capability gates them. The subgroup size is never assumed.)
struct Params {
    rows: u32,
    d: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> red: array<f32, {{WG}}>;

// Workgroup-wide reductions; every invocation gets the result. Each starts
// with a barrier so that a previous reduction's readers are done with `red`.
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
    let row = wg.x + wg.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.d;
    var m = -3.0e38;
    for (var i = lid; i < p.d; i += {{WG}}u) {
        m = max(m, x[base + i]);
    }
#if SUBGROUPS
    m = reduce_max(m, sg_lane, sg_id, n_sg);
#else
    m = reduce_max(m, lid);
#endif
    var s = 0.0;
    for (var i = lid; i < p.d; i += {{WG}}u) {
        s += exp(x[base + i] - m);
    }
#if SUBGROUPS
    s = reduce_sum(s, sg_lane, sg_id, n_sg);
#else
    s = reduce_sum(s, lid);
#endif
    let inv = 1.0 / s;
    for (var i = lid; i < p.d; i += {{WG}}u) {
        y[base + i] = exp(x[base + i] - m) * inv;
    }
}
