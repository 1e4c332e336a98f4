// Activation functions shared by unary, attention and fused epilogues.
// Same formulas as src/reference/ops.rs.

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

// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26), as ops::erf.
fn erf_k(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
        + 0.254829592) * t;
    return sign(v) * (1.0 - poly * exp(-a * a));
}

fn act_silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

fn act_gelu(v: f32) -> f32 {
    return 0.5 * v * (1.0 + erf_k(v * 0.70710678118654752));
}

fn act_gelu_tanh(v: f32) -> f32 {
    return 0.5 * v * (1.0 + tanh_k(0.79788456080286536 * (v + 0.044715 * v * v * v)));
}

fn act_relu(v: f32) -> f32 {
    return max(v, 0.0);
}

fn act_softcap(v: f32, cap: f32) -> f32 {
    return cap * tanh_k(v / cap);
}
