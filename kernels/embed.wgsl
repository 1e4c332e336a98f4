//! kiln template: embed
//! Embedding gather with dequantization: for each token t whose id lies in
//! [row_offset, row_offset + rows), y[t*d + i] = dequant(table row
//! id - row_offset)[i]; other tokens are left untouched (the table may be
//! split into chunks, one dispatch each). `table` holds the chunk's raw GGUF
//! bytes (DTYPE; Q4_0X, Q6_KX: Q4_0 and Q6_K re-laid at upload, see dequant.wgsl). Dispatch: spread(T, 65535), one workgroup per token
//! (linear index wg.x + wg.y * num_workgroups.x).
//! knob DTYPE: F32 F16 BF16 Q4_0 Q4_0X Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q6_KX IQ4_NL
//! knob WG: 64 256

struct Params {
    T: u32,
    d: u32,
    row_offset: u32,
    rows: u32,
}

@group(0) @binding(0) var<storage, read> table: array<u32>;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn load_word(i: u32) -> u32 {
    return table[i];
}

#include dequant.wgsl

const WG: u32 = {{WG}}u;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = wg.x + wg.y * nwg.x;
    if t >= p.T {
        return;
    }
    let id = ids[t];
    if id < p.row_offset || id - p.row_offset >= p.rows {
        return;
    }
    let row = (id - p.row_offset) * row_bytes(p.d);
    let base = t * p.d;
    let pieces = p.d / 8u;
    for (var i = lid; i < pieces; i += WG) {
        let v = deq8(row, i * 8u);
        let o = base + i * 8u;
        y[o] = v.a.x;
        y[o + 1u] = v.a.y;
        y[o + 2u] = v.a.z;
        y[o + 3u] = v.a.w;
        y[o + 4u] = v.b.x;
        y[o + 5u] = v.b.y;
        y[o + 6u] = v.b.z;
        y[o + 7u] = v.b.w;
    }
    // Plain rows may end in a partial piece.
    for (var k = pieces * 8u + lid; k < p.d; k += WG) {
        y[base + k] = deq1(row, k);
    }
}
