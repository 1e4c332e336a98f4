//! kiln template: argmax
//! Index of the largest value of each row of length d (the first one on ties,
//! as ops::argmax). One workgroup per row (linear workgroup index
//! wg.x + wg.y * num_workgroups.x, rows beyond `rows` return).
//! Bindings: 0 x [rows, d], 1 y: array<u32> [rows], 2 Params{rows, d}.
//! knob WG: 64 128 256
//! knob SUBGROUPS: 0 1
//! wg_storage: WG * 8
// (naga takes subgroup builtins without `enable subgroups;`: the validator's
// SUBGROUP capability gates them. The subgroup size is never assumed.)
struct Params {
    rows: u32,
    d: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<u32>;
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> red_v: array<f32, {{WG}}>;
var<workgroup> red_i: array<u32, {{WG}}>;

// (value, index) `b` beats `a`: larger, or equal with a smaller index.
fn better(bv: f32, bi: u32, av: f32, ai: u32) -> bool {
    return bv > av || (bv == av && bi < ai);
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
    let row = wg.x + wg.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.d;
    // Each invocation scans increasing indices, so a strict > keeps its first.
    var bv = -3.4028235e38;
    var bi = 0xffffffffu;
    for (var i = lid; i < p.d; i += {{WG}}u) {
        let v = x[base + i];
        if bi == 0xffffffffu || v > bv {
            bv = v;
            bi = i;
        }
    }
#if SUBGROUPS
    let sv = subgroupMax(select(bv, -3.4028235e38, bi == 0xffffffffu));
    let si = subgroupMin(select(0xffffffffu, bi, bv == sv && bi != 0xffffffffu));
    if sg_lane == 0u {
        red_v[sg_id] = sv;
        red_i[sg_id] = si;
    }
    workgroupBarrier();
    if lid == 0u {
        var v = red_v[0];
        var idx = red_i[0];
        for (var s = 1u; s < n_sg; s++) {
            if red_i[s] != 0xffffffffu && (idx == 0xffffffffu || better(red_v[s], red_i[s], v, idx)) {
                v = red_v[s];
                idx = red_i[s];
            }
        }
        y[row] = select(idx, 0u, idx == 0xffffffffu);
    }
#else
    red_v[lid] = bv;
    red_i[lid] = bi;
    workgroupBarrier();
    for (var stride = {{WG}}u / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            let ov = red_v[lid + stride];
            let oi = red_i[lid + stride];
            let mi = red_i[lid];
            if oi != 0xffffffffu && (mi == 0xffffffffu || better(ov, oi, red_v[lid], mi)) {
                red_v[lid] = ov;
                red_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        y[row] = select(red_i[0], 0u, red_i[0] == 0xffffffffu);
    }
#endif
}
