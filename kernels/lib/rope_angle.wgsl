// Rotary-embedding angles, shared by rope and attention's fused prep.

const TWO_PI: f32 = 6.2831853071795865;
const INV_TWO_PI: f32 = 0.15915494309189534;

// (sin, cos) of 2π·(pos · g) for an integer pos < 2^17. g is split so that
// pos · g_hi is exact; its integer part is dropped exactly.
fn sincos_turns(pos: f32, g: f32) -> vec2<f32> {
    let g_hi = bitcast<f32>(bitcast<u32>(g) & 0xfffe0000u);
    let g_lo = g - g_hi;
    let t_hi = pos * g_hi;
    var t = (t_hi - floor(t_hi)) + pos * g_lo;
    t = t - round(t);
    // Quadrant and remainder: t = q/4 + u with |u| ≤ 1/8 turn.
    let qf = round(t * 4.0);
    let u = t - qf * 0.25;
    let a = u * TWO_PI;
    let a2 = a * a;
    let s = a * (1.0 + a2 * (-1.0 / 6.0 + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0
        + a2 * (1.0 / 362880.0 + a2 * (-1.0 / 39916800.0))))));
    let c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24.0 + a2 * (-1.0 / 720.0 + a2 * (1.0 / 40320.0
        + a2 * (-1.0 / 3628800.0 + a2 * (1.0 / 479001600.0))))));
    switch (u32(i32(qf)) & 3u) {
        case 1u: {
            return vec2<f32>(c, -s);
        }
        case 2u: {
            return vec2<f32>(-s, -c);
        }
        case 3u: {
            return vec2<f32>(-c, s);
        }
        default: {
            return vec2<f32>(s, c);
        }
    }
}
