//! kiln template: attention_merge
//! The merge step of split-K decode attention (attention with SPLIT > 1):
//! the SPLIT partial rows [m, l, acc[0..Dv]] of each head h, read from
//! part[part_off + (h * SPLIT + s) * (Dv + 2)], become
//! out[h * Dv + d] = Σ_s e^(m_s - M) acc_s[d] / Σ_s e^(m_s - M) l_s with
//! M = max_s m_s (kernels/lib/merge.wgsl; an empty split, m = -3e38 and
//! l = 0, weighs nothing).
//! One workgroup per head (linear workgroup index wg.x + wg.y *
//! num_workgroups.x, beyond H return); invocations stride over Dv.
//! Bindings: 0 part, 1 out, 2 Params{h, dv, part_off}. In a plan part and
//! out are one buffer (the partials sit after the output row), so part is
//! declared read_write too.
//! knob WG: 256 64
//! knob SPLIT: 2 4 8 16 32
//! cover: SPLIT
struct Params {
    h: u32,
    dv: u32,
    part_off: u32,
}

@group(0) @binding(0) var<storage, read_write> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

const SPLIT: u32 = {{SPLIT}}u;
const MERGE_S: u32 = SPLIT;

fn part_ld(i: u32) -> f32 {
    return part[i];
}

#include merge.wgsl

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let h = wg.x + wg.y * nwg.x;
    if h >= p.h {
        return;
    }
    let row = p.dv + 2u;
    let hb = p.part_off + h * SPLIT * row;
    let w = merge_weights(hb, row);
    for (var d = lid; d < p.dv; d += {{WG}}u) {
        out[h * p.dv + d] = merge1(w, hb, row, d);
    }
}
