//! kiln template: rms_norm
//! RMS norm over rows: y = x / sqrt(mean(x^2) + eps) * w. One workgroup per row
//! (linear workgroup index wg.x + wg.y * num_workgroups.x).
//! knob WG: 64 128 256
//! knob SUBGROUPS: 0 1
//! wg_storage: WG * 4
// (naga takes subgroup builtins without `enable subgroups;`: the validator's
// SUBGROUP capability gates them.)
struct Params {
    d: u32,
    rows: u32,
    eps: f32,
    has_weight: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> partial: array<f32, {{WG}}>;

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
    var acc = 0.0;
    for (var i = lid; i < p.d; i += {{WG}}u) {
        let v = x[base + i];
        acc += v * v;
    }
#if SUBGROUPS
    // Reduce within each subgroup, then across subgroups through workgroup
    // memory. Subgroup ids and counts come from the hardware: neither the
    // subgroup size nor the lane layout is assumed.
    acc = subgroupAdd(acc);
    if sg_lane == 0u {
        partial[sg_id] = acc;
    }
    workgroupBarrier();
    if lid == 0u {
        var total = 0.0;
        for (var s = 0u; s < n_sg; s++) {
            total += partial[s];
        }
        partial[0] = total;
    }
    workgroupBarrier();
#else
    partial[lid] = acc;
    workgroupBarrier();
    for (var stride = {{WG}}u / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
#endif
    let scale = inverseSqrt(partial[0] / f32(p.d) + p.eps);
    for (var i = lid; i < p.d; i += {{WG}}u) {
        var v = x[base + i] * scale;
        if p.has_weight != 0u {
            v *= w[i];
        }
        y[base + i] = v;
    }
}
