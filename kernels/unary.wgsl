//! kiln template: unary
//! Elementwise y[i] = OP(x[i]) for i < n. OP: silu, gelu (erf form), gelu_tanh,
//! tanh, relu, scale (x * alpha), softcap (alpha * tanh(x / alpha)).
//! Bindings: 0 x [n], 1 y [n], 2 Params{n, alpha: f32}. Dispatch
//! spread(ceil(n / WG)); the linear workgroup index is
//! wg.x + wg.y * num_workgroups.x and indices ≥ n return.
//! knob OP: silu gelu gelu_tanh tanh relu scale softcap
//! knob WG: 64 256
struct Params {
    n: u32,
    alpha: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

#include act.wgsl

fn op(v: f32) -> f32 {
#if OP == 'silu'
    return act_silu(v);
#endif
#if OP == 'gelu'
    return act_gelu(v);
#endif
#if OP == 'gelu_tanh'
    return act_gelu_tanh(v);
#endif
#if OP == 'tanh'
    return tanh_k(v);
#endif
#if OP == 'relu'
    return act_relu(v);
#endif
#if OP == 'scale'
    return v * p.alpha;
#endif
#if OP == 'softcap'
    return act_softcap(v, p.alpha);
#endif
}

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.x + wg.y * nwg.x) * {{WG}}u + lid;
    if i >= p.n {
        return;
    }
    y[i] = op(x[i]);
}
