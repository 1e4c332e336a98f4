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

#if OP == 'tanh' || OP == 'gelu_tanh' || OP == 'softcap'
// tanh that is accurate near 0 and never NaN for large |v| (drivers may build
// tanh from exp, which overflows): odd polynomial for |v| < 0.125, else
// 1 - 2 / (exp(2|v|) + 1) with the argument clamped.
fn tanh_k(v: f32) -> f32 {
    let a = abs(v);
    if a < 0.125 {
        let v2 = v * v;
        return v * (1.0 + v2 * (-1.0 / 3.0 + v2 * (2.0 / 15.0 + v2 * (-17.0 / 315.0))));
    }
    let e = exp(2.0 * min(a, 20.0));
    return sign(v) * (1.0 - 2.0 / (e + 1.0));
}
#endif

#if OP == 'gelu'
// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26), as ops::erf.
fn erf_k(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
        + 0.254829592) * t;
    return sign(v) * (1.0 - poly * exp(-a * a));
}
#endif

fn op(v: f32) -> f32 {
#if OP == 'silu'
    return v / (1.0 + exp(-v));
#endif
#if OP == 'gelu'
    return 0.5 * v * (1.0 + erf_k(v * 0.70710678118654752));
#endif
#if OP == 'gelu_tanh'
    return 0.5 * v * (1.0 + tanh_k(0.79788456080286536 * (v + 0.044715 * v * v * v)));
#endif
#if OP == 'tanh'
    return tanh_k(v);
#endif
#if OP == 'relu'
    return max(v, 0.0);
#endif
#if OP == 'scale'
    return v * p.alpha;
#endif
#if OP == 'softcap'
    return p.alpha * tanh_k(v / p.alpha);
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
