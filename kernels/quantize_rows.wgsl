//! kiln template: quantize_rows
//! Rows of an f32 input quantized to int8 per 32-element block, in the
//! layout matmul_vec reads with XQ=1: row m at word p.qo + m * (K/4 + K/32)
//! holds K/4 words of q (four int8 to a word, in element order), then K/32
//! f32 block scales. q = round(127 · x / max|x|) over the block (WGSL's
//! pack4x8snorm), scale = max|x| / 127, as llama.cpp quantizes the input of
//! its quantized matmuls.
//! NORM=1 folds an RMSNorm in: the block quantizes x · w, and its scale
//! carries the row's 1 / sqrt(mean(x²) + eps).
//! Dispatch: spread(ceil(K / 32 / WG)) over x and y (linear workgroup
//! index g = wg.x + wg.y * num_workgroups.x), z = M; one invocation per
//! block. K % 32 == 0; x rows (and w) are read as vec4.
//! knob WG: 64
//! knob NORM: 0 1
//! wg_storage: WG * 4
struct Params {
    m: u32,
    k: u32,
    qo: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
#if NORM
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;
#endif
@group(0) @binding(2) var<storage, read_write> q: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> red: array<f32, {{WG}}>;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m = wg.z;
    let blk = (wg.x + wg.y * nwg.x) * {{WG}}u + lid;
    let x4 = m * (p.k / 4u);
    var scale = 1.0;
#if NORM
    // Every workgroup sums the whole row: rows are short next to the
    // matmul that reads them, and no second dispatch is needed.
    var ss = 0.0;
    for (var i = lid; i < p.k / 4u; i += {{WG}}u) {
        let v = x[x4 + i];
        ss += dot(v, v);
    }
    red[lid] = ss;
    workgroupBarrier();
    for (var st = {{WG}}u / 2u; st > 0u; st /= 2u) {
        if lid < st {
            red[lid] += red[lid + st];
        }
        workgroupBarrier();
    }
    scale = inverseSqrt(red[0] / f32(p.k) + p.eps);
#endif
    if blk >= p.k / 32u {
        return;
    }
    var v: array<vec4<f32>, 8>;
    var amax = 0.0;
    for (var j = 0u; j < 8u; j++) {
        var e = x[x4 + blk * 8u + j];
#if NORM
        e *= w[blk * 8u + j];
#endif
        v[j] = e;
        let a = abs(e);
        amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
    }
    let inv = select(0.0, 1.0 / amax, amax > 0.0);
    let row = p.qo + m * (p.k / 4u + p.k / 32u);
    for (var j = 0u; j < 8u; j++) {
        q[row + blk * 8u + j] = pack4x8snorm(v[j] * inv);
    }
    q[row + p.k / 4u + blk] = bitcast<u32>(amax / 127.0 * scale);
}
