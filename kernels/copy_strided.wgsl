//! kiln template: copy_strided
//! Strided block copy, the building block of Slice and Concat along any axis:
//! for o < outer, i < len, j < inner:
//!   y[(o * y_len + y_start + i) * inner + j] = x[(o * x_len + x_start + i) * inner + j].
//! Bindings: 0 x, 1 y, 2 Params{outer, inner, len, x_len, x_start, y_len, y_start}.
//! Dispatch spread(ceil(outer * len * inner / WG)); the linear workgroup index
//! is wg.x + wg.y * num_workgroups.x and elements beyond the count return.
//! knob WG: 64 256
struct Params {
    outer: u32,
    inner: u32,
    len: u32,
    x_len: u32,
    x_start: u32,
    y_len: u32,
    y_start: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wg.x + wg.y * nwg.x) * {{WG}}u + lid;
    let block = p.len * p.inner;
    if e >= p.outer * block {
        return;
    }
    let o = e / block;
    let rem = e - o * block;
    let i = rem / p.inner;
    let j = rem - i * p.inner;
    y[(o * p.y_len + p.y_start + i) * p.inner + j] = x[(o * p.x_len + p.x_start + i) * p.inner + j];
}
