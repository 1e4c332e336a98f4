//! kiln template: binary
//! Elementwise y[i] = a[i] OP b[i % nb] for i < n (b broadcasts when nb < n).
//! OP: add, mul. Bindings: 0 a [n], 1 b [nb], 2 y [n], 3 Params{n, nb}.
//! Dispatch spread(ceil(n / WG)); the linear workgroup index is
//! wg.x + wg.y * num_workgroups.x and indices ≥ n return.
//! knob OP: add mul
//! knob WG: 64 256
struct Params {
    n: u32,
    nb: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

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
    var j = i;
    if p.nb < p.n {
        j = i % p.nb;
    }
#if OP == 'add'
    y[i] = a[i] + b[j];
#else
    y[i] = a[i] * b[j];
#endif
}
