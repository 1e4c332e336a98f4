//! kiln template: matmul_tiled
//! Prefill matmul (many token rows), dequantizing inside:
//! y[m*ldy + n_offset + n] = Σ_k x[m*K + k] · W[n, k] for m < M, n < N, where
//! W is the chunk of N rows of K elements in `w` (raw GGUF bytes, DTYPE;
//! Q4_0X, Q6_KX: Q4_0 and Q6_K re-laid at upload, see dequant.wgsl).
//! Dispatch: spread(ceil(N / TN) * ceil(M / TM), 65535) over x and y, z = 1.
//! Linear workgroup g = wg.x + wg.y * num_workgroups.x computes the TM × TN
//! output tile tile_n = g % ceil(N / TN), tile_m = g / ceil(N / TN), with
//! TM*TN/16 invocations of 4 × 4 outputs each. Per 32-wide step of K, x and
//! the dequantized w are staged in workgroup memory (k-major, as vec4s along
//! m and n). F16=1 stages them as f16 and does the products in f16,
//! accumulating in f32.
//! knob DTYPE: F32 F16 BF16 Q4_0 Q4_0X Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q6_KX IQ4_NL
//! knob TM: 32 64
//! knob TN: 32 64
//! knob F16: 0 1
//! wg_storage: (TM + TN) * 32 * (4 - 2 * F16)
#if F16
enable f16;
#endif

struct Params {
    M: u32,
    K: u32,
    N: u32,
    n_offset: u32,
    ldy: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn load_word(i: u32) -> u32 {
    return w[i];
}

#include dequant.wgsl

#if F16
alias T = f16;
#else
alias T = f32;
#endif

const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const TK: u32 = 32u;
// Invocations per row of the tile grid (each owns 4 consecutive n) and
// rows of it (each owns 4 consecutive m).
const TX: u32 = TN / 4u;
const TY: u32 = TM / 4u;
const WGS: u32 = TX * TY;

// xs[k * TY + m / 4][m % 4] = x[m0 + m, k0 + k]; ws likewise along n.
var<workgroup> xs: array<vec4<T>, TK * TY>;
var<workgroup> ws: array<vec4<T>, TK * TX>;

#if DTYPE == 'F32' || DTYPE == 'F16' || DTYPE == 'BF16'
// Elements e..e+8 of a row that ends at k (zeros past it).
fn deq8_partial(row: u32, e: u32, k: u32) -> Deq8 {
    let i = vec4<u32>(e) + vec4<u32>(0u, 1u, 2u, 3u);
    let a = vec4<f32>(deq1(row, min(i.x, k - 1u)), deq1(row, min(i.y, k - 1u)), deq1(row, min(i.z, k - 1u)), deq1(row, min(i.w, k - 1u)));
    let j = i + vec4<u32>(4u);
    let b = vec4<f32>(deq1(row, min(j.x, k - 1u)), deq1(row, min(j.y, k - 1u)), deq1(row, min(j.z, k - 1u)), deq1(row, min(j.w, k - 1u)));
    return Deq8(select(vec4<f32>(0.0), a, i < vec4<u32>(k)), select(vec4<f32>(0.0), b, j < vec4<u32>(k)));
}
#endif

// Store outputs (m, n..n+4) that lie inside the M × N result.
fn store(m: u32, n: u32, v: vec4<f32>) {
    if m >= p.M {
        return;
    }
    let o = m * p.ldy + p.n_offset;
    for (var j = 0u; j < 4u; j++) {
        if n + j < p.N {
            y[o + n + j] = v[j];
        }
    }
}

@compute @workgroup_size(WGS)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tiles_n = (p.N + TN - 1u) / TN;
    let tiles_m = (p.M + TM - 1u) / TM;
    let g = wg.x + wg.y * nwg.x;
    if g >= tiles_n * tiles_m {
        return;
    }
    let n0 = (g % tiles_n) * TN;
    let m0 = (g / tiles_n) * TM;
    let tx = lid % TX;
    let ty = lid / TX;
    let rb = row_bytes(p.K);
    // Four accumulator rows as plain variables (dynamic indexing into a
    // function-local array can put it in slow local memory).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.K; k0 += TK) {
        // Stage x: consecutive invocations take consecutive m.
        for (var idx = lid; idx < TM * TK; idx += WGS) {
            let mm = idx % TM;
            let kk = idx / TM;
            let gm = m0 + mm;
            let gk = k0 + kk;
            var v = 0.0;
            if gm < p.M && gk < p.K {
                v = x[gm * p.K + gk];
            }
            xs[kk * TY + mm / 4u][mm % 4u] = T(v);
        }
        // Stage w: 8-element pieces, consecutive invocations take
        // consecutive n. Rows past N repeat the last one (never stored).
        for (var idx = lid; idx < TN * (TK / 8u); idx += WGS) {
            let nn = idx % TN;
            let kp = (idx / TN) * 8u;
            let row = min(n0 + nn, p.N - 1u) * rb;
            let gk = k0 + kp;
#if DTYPE == 'F32' || DTYPE == 'F16' || DTYPE == 'BF16'
            // Plain rows may end in a partial piece.
            var v: Deq8;
            if gk + 8u <= p.K {
                v = deq8(row, gk);
            } else {
                v = deq8_partial(row, gk, p.K);
            }
#else
            // Quantized rows hold whole blocks, so K % TK == 0.
            let v = deq8(row, gk);
#endif
            let c = nn % 4u;
            let base = kp * TX + nn / 4u;
            ws[base][c] = T(v.a.x);
            ws[base + TX][c] = T(v.a.y);
            ws[base + 2u * TX][c] = T(v.a.z);
            ws[base + 3u * TX][c] = T(v.a.w);
            ws[base + 4u * TX][c] = T(v.b.x);
            ws[base + 5u * TX][c] = T(v.b.y);
            ws[base + 6u * TX][c] = T(v.b.z);
            ws[base + 7u * TX][c] = T(v.b.w);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a = xs[kk * TY + ty];
            let b = ws[kk * TX + tx];
#if F16
            acc0 += vec4<f32>(a.x * b);
            acc1 += vec4<f32>(a.y * b);
            acc2 += vec4<f32>(a.z * b);
            acc3 += vec4<f32>(a.w * b);
#else
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
#endif
        }
        workgroupBarrier();
    }
    let gm = m0 + ty * 4u;
    let gn = n0 + tx * 4u;
    store(gm, gn, acc0);
    store(gm + 1u, gn, acc1);
    store(gm + 2u, gn, acc2);
    store(gm + 3u, gn, acc3);
}
