//! kiln template: layer_norm
//! (placeholder: being written)
@compute @workgroup_size(1)
fn main() {}
