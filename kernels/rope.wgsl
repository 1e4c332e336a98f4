//! kiln template: rope
//! Rotary position embedding on x [T, H, D]: token r is at position pos0 + r;
//! pair i < dims / 2 rotates by the angle (pos0 + r) * scale * base^(-2i / dims).
//! NEOX 0 pairs (2i, 2i + 1), NEOX 1 pairs (i, i + dims / 2); dimensions from
//! `dims` to D are copied unchanged. One workgroup per (token, head) (linear
//! workgroup index wg.x + wg.y * num_workgroups.x, beyond T * H return).
//! Bindings: 0 x [T, H, D], 1 y [T, H, D],
//! 2 Params{T, H, D, dims, pos0, base: f32, scale: f32}.
//! The angle is kept in turns and reduced exactly before sin/cos (own
//! polynomials on [-pi/4, pi/4]), so large positions lose no more than the
//! f32 rounding of the frequency itself.
//! knob NEOX: 0 1
//! knob WG: 32 64 128
struct Params {
    t: u32,
    h: u32,
    d: u32,
    dims: u32,
    pos0: u32,
    base: f32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

#include rope_angle.wgsl

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let item = wg.x + wg.y * nwg.x;
    if item >= p.t * p.h {
        return;
    }
    let r = item / p.h;
    let base = item * p.d;
    let pos = f32(p.pos0 + r);
    let half = p.dims / 2u;
    for (var i = lid; i < half; i += {{WG}}u) {
        let freq = p.scale * pow(p.base, -f32(2u * i) / f32(p.dims));
        let sc = sincos_turns(pos, freq * INV_TWO_PI);
#if NEOX
        let ia = base + i;
        let ib = base + i + half;
#else
        let ia = base + 2u * i;
        let ib = ia + 1u;
#endif
        let x0 = x[ia];
        let x1 = x[ib];
        y[ia] = x0 * sc.y - x1 * sc.x;
        y[ib] = x0 * sc.x + x1 * sc.y;
    }
    for (var j = p.dims + lid; j < p.d; j += {{WG}}u) {
        y[base + j] = x[base + j];
    }
}
