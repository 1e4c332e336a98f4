// Int8 quantization per 32-element block, as llama.cpp quantizes the input
// of its quantized matmuls (quantize_rows.wgsl's layout): q = round(127 ·
// x / max|x|) (WGSL's pack4x8snorm), scale max|x| / 127. A word (four
// elements) an invocation: invocations lid & ~7 .. + 8 hold a block's 8
// words. The includer declares the workgroup array `red` (at least as
// many floats as invocations).

// max |x| over the block of this invocation's word (its values v). Call in
// uniform control flow; it starts with a barrier, so that earlier readers
// of `red` are done.
fn q8_amax(v: vec4<f32>, lid: u32) -> f32 {
    let a = abs(v);
    workgroupBarrier();
    red[lid] = max(max(a.x, a.y), max(a.z, a.w));
    workgroupBarrier();
    let b0 = lid & ~7u;
    var amax = red[b0];
    for (var j = 1u; j < 8u; j++) {
        amax = max(amax, red[b0 + j]);
    }
    return amax;
}

// The packed word of values v in a block of max |x| amax.
fn q8_word(v: vec4<f32>, amax: f32) -> u32 {
    return pack4x8snorm(v * select(0.0, 1.0 / amax, amax > 0.0));
}
