//! kiln template: matmul_vec
//! (placeholder: being written)
@compute @workgroup_size(1)
fn main() {}
