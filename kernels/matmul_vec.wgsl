//! kiln template: matmul_vec
//! Decode matmul (matrix × vector per token row), dequantizing inside:
//! y[m*ldy + n_offset + n] = Σ_k x[m*K + k] · W[n, k] for m < M, n < N, where
//! W is the chunk of N rows of K elements in `w` (raw GGUF bytes, DTYPE).
//! Dispatch: spread(ceil(N / ROWS), 65535) over x and y, z = M. Linear
//! workgroup g = wg.x + wg.y * num_workgroups.x handles rows g*ROWS ..
//! g*ROWS + ROWS; its WG invocations stride over 8-element pieces of K and
//! reduce (through subgroups with SUBGROUPS=1). F16=1 does the weight × x
//! products in f16 (4-wide dots), accumulating in f32.
//! knob DTYPE: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL
//! knob WG: 64 256
//! knob ROWS: 1 4
//! knob SUBGROUPS: 0 1
//! knob F16: 0 1
//! wg_storage: WG * ROWS * 4
#if F16
enable f16;
#endif
// (naga takes subgroup builtins without `enable subgroups;`.)

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

fn load_x8(e: u32) -> Deq8 {
    return Deq8(
        vec4<f32>(x[e], x[e + 1u], x[e + 2u], x[e + 3u]),
        vec4<f32>(x[e + 4u], x[e + 5u], x[e + 6u], x[e + 7u]),
    );
}
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn load_word(i: u32) -> u32 {
    return w[i];
}

#include dequant.wgsl

const WG: u32 = {{WG}}u;
const ROWS: u32 = {{ROWS}}u;
const PARTIAL: u32 = WG * ROWS;

// partial[r * WG + i]: row r's partial sum from invocation (or subgroup) i.
var<workgroup> partial: array<f32, PARTIAL>;

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
    let n0 = (wg.x + wg.y * nwg.x) * ROWS;
    if n0 >= p.N {
        return;
    }
    let m = wg.z;
    let xo = m * p.K;
    let rb = row_bytes(p.K);
    // Byte offsets of this group's rows; rows past N repeat the last one
    // (computed, never stored).
    var rows: array<u32, ROWS>;
    var acc: array<f32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = min(n0 + r, p.N - 1u) * rb;
        acc[r] = 0.0;
    }
    let pieces = p.K / 8u;
    for (var i = lid; i < pieces; i += WG) {
        let xv = load_x8(xo + i * 8u);
        let xa = xv.a;
        let xb = xv.b;
#if F16
        let ha = vec4<f16>(xa);
        let hb = vec4<f16>(xb);
#endif
        for (var r = 0u; r < ROWS; r++) {
            let v = deq8(rows[r], i * 8u);
#if F16
            acc[r] += f32(dot(vec4<f16>(v.a), ha)) + f32(dot(vec4<f16>(v.b), hb));
#else
            acc[r] += dot(v.a, xa) + dot(v.b, xb);
#endif
        }
    }
#if DTYPE == 'F32' || DTYPE == 'F16' || DTYPE == 'BF16'
    // Plain rows may end in a partial piece.
    for (var k = pieces * 8u + lid; k < p.K; k += WG) {
        let xv = x[xo + k];
        for (var r = 0u; r < ROWS; r++) {
#if F16
            acc[r] += f32(f16(deq1(rows[r], k)) * f16(xv));
#else
            acc[r] += deq1(rows[r], k) * xv;
#endif
        }
    }
#endif
#if SUBGROUPS
    // Within each subgroup, then across subgroups: neither the subgroup size
    // nor the lane layout is assumed.
    for (var r = 0u; r < ROWS; r++) {
        let s = subgroupAdd(acc[r]);
        if sg_lane == 0u {
            partial[r * WG + sg_id] = s;
        }
    }
    workgroupBarrier();
    if lid < ROWS && n0 + lid < p.N {
        var total = 0.0;
        for (var s = 0u; s < n_sg; s++) {
            total += partial[lid * WG + s];
        }
        y[m * p.ldy + p.n_offset + n0 + lid] = total;
    }
#else
    for (var r = 0u; r < ROWS; r++) {
        partial[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            for (var r = 0u; r < ROWS; r++) {
                partial[r * WG + lid] += partial[r * WG + lid + stride];
            }
        }
        workgroupBarrier();
    }
    if lid < ROWS && n0 + lid < p.N {
        y[m * p.ldy + p.n_offset + n0 + lid] = partial[lid * WG];
    }
#endif
}
