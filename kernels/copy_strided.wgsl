//! kiln template: copy_strided
//! (placeholder: being written)
@compute @workgroup_size(1)
fn main() {}
