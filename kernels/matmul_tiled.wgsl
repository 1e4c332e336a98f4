//! kiln template: matmul_tiled
//! (placeholder: being written)
@compute @workgroup_size(1)
fn main() {}
