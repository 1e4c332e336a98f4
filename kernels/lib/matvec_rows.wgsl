// kiln lib needs: load_word
// Partial dot products of ROWS weight rows with one input row, dequantizing
// inside (DTYPE). Included once per weight of a matmul_vec kernel, each time
// under its own suffix. The including template defines ROWS, WG, lid_ (this
// invocation's index), X8 and x8(xo, e) (input elements e..e+8 of the row at
// xo) and x1(xo, e).
//
// Each invocation takes 8-element pieces (consecutive input elements, so a
// subgroup's input reads are contiguous) and the piece of every row from
// them. Quantized pieces decode whole words of packed integers and become
// floats without int→float conversions (a quarter of the FMA rate or less
// on NVIDIA): an unsigned field u of b bits is placed at the top of the
// mantissa of 1.0, giving f = 1 + u / 2^b, so Σ u·x = 2^b · (Σ f·x − Σ x),
// with Σ x computed once per piece for all rows. The scales multiply the
// piece's sum once rather than every element.
#include dequant.wgsl

#if DTYPE != 'F32' && DTYPE != 'F16' && DTYPE != 'BF16'
// Two f16 scales (low half first) widened to f32: the exponent and
// mantissa bits moved into place and rebiased by a multiply with 2^112 —
// exact for normal and (where the GPU keeps f32 denormals) subnormal
// halves, in a third of f16x2's instructions; an infinite or NaN scale
// comes out finite, which no valid block has. (Not bitcast<vec2<f16>>:
// lavapipe miscompiles it.)
fn scales2(w: u32) -> vec2<f32> {
    let h = vec2<u32>(w & 0xffffu, w >> 16u);
    let bits = ((h & vec2<u32>(0x7fffu)) << vec2<u32>(13u)) | ((h & vec2<u32>(0x8000u)) << vec2<u32>(16u));
    return bitcast<vec2<f32>>(bits) * bitcast<f32>(0x77800000u);
}

// The f16 scale at an even byte offset.
fn scale_at(off: u32) -> f32 {
    return scales2(load_word(off >> 2u) >> ((off & 2u) * 8u)).x;
}

// 1 + n/16 for the low nibble of each byte of w (fields at bits 19..23).
fn nib_lo(w: u32) -> vec4<f32> {
    let v = vec4<u32>(w << 19u, w << 11u, w << 3u, w >> 5u);
    return bitcast<vec4<f32>>((v & vec4<u32>(0x780000u)) | vec4<u32>(0x3f800000u));
}

// 1 + u/256 for each byte u of w (fields at bits 15..23).
fn ubytes(w: u32) -> vec4<f32> {
    let v = vec4<u32>(w << 15u, w << 7u, w >> 1u, w >> 9u);
    return bitcast<vec4<f32>>((v & vec4<u32>(0x7f8000u)) | vec4<u32>(0x3f800000u));
}
#endif

#if DTYPE == 'Q4_0'
// Nibbles at shift sh of 8 bytes: d · Σ (n − 8)·x = d · (16·S − 24·Σx).
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let b = row + (e / 32u) * 18u;
    let j = e % 32u;
    let sh = select(0u, 4u, j >= 16u);
    let qo = b + 2u + j % 16u;
    let s = dot(nib_lo(load_u32(qo) >> sh), xa) + dot(nib_lo(load_u32(qo + 4u) >> sh), xb);
    return scale_at(b) * (16.0 * s - 24.0 * sx);
}
#elif DTYPE == 'Q4_1'
// Σ (d·n + m)·x = d · 16 · (S − Σx) + m · Σx (blocks are word-aligned).
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let b = row + (e / 32u) * 20u;
    let j = e % 32u;
    let sh = select(0u, 4u, j >= 16u);
    let qw = (b + 4u + j % 16u) >> 2u;
    let s = dot(nib_lo(load_word(qw) >> sh), xa) + dot(nib_lo(load_word(qw + 1u) >> sh), xb);
    let dm = scales2(load_word(b >> 2u));
    return dm.x * (16.0 * (s - sx)) + dm.y * sx;
}
#elif DTYPE == 'Q8_0'
// Bytes q + 128 (sign bit flipped): d · Σ q·x = d · (256·S − 384·Σx).
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let b = row + (e / 32u) * 34u;
    let qo = b + 2u + e % 32u;
    let f = 0x80808080u;
    let s = dot(ubytes(load_u32(qo) ^ f), xa) + dot(ubytes(load_u32(qo + 4u) ^ f), xb);
    return scale_at(b) * (256.0 * s - 384.0 * sx);
}
#elif DTYPE == 'Q4_K'
// Sub-block i: (d·sc)·Σ n·x − (dmin·m)·Σx, the nibbles the low (i even) or
// high halves of 32 bytes (word-aligned).
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let b = row + (e / 256u) * 144u;
    let k = e % 256u;
    let i = k / 32u;
    let sh = 4u * (i % 2u);
    let qw = (b + 16u + (i / 2u) * 32u + k % 32u) >> 2u;
    let s = dot(nib_lo(load_word(qw) >> sh), xa) + dot(nib_lo(load_word(qw + 1u) >> sh), xb);
    let dm = scales2(load_word(b >> 2u));
    let sm = vec2<f32>(scale_min_k4(b + 4u, i));
    return dm.x * sm.x * (16.0 * (s - sx)) - dm.y * sm.y * sx;
}
#elif DTYPE == 'Q6_K'
// 6-bit q = low nibble | 2 high bits << 4, one byte each:
// d · sc · Σ (q − 32)·x = d · sc · (256·S − 288·Σx).
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let b = row + (e / 256u) * 210u;
    let k = e % 256u;
    let h = k / 128u;
    let r = k % 128u;
    let lo = b + h * 64u + r % 64u;
    let hi = b + 128u + h * 32u + r % 32u;
    let lsh = 4u * (r / 64u);
    let hsh = 2u * (r / 32u);
    let m4 = 0x0f0f0f0fu;
    let m2 = 0x03030303u;
    let u0 = ((load_u32(lo) >> lsh) & m4) | (((load_u32(hi) >> hsh) & m2) << 4u);
    let u1 = ((load_u32(lo + 4u) >> lsh) & m4) | (((load_u32(hi + 4u) >> hsh) & m2) << 4u);
    let s = dot(ubytes(u0), xa) + dot(ubytes(u1), xb);
    let sc = f32(bitcast<i32>(load_u8(b + 192u + k / 16u) << 24u) >> 24u);
    return scale_at(b + 208u) * sc * (256.0 * s - 288.0 * sx);
}
#else
// Other formats: the dequantized piece.
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let v = deq8(row, e);
    return dot(v.a, xa) + dot(v.b, xb);
}
#endif

// This invocation's share of Σ_k W[row r, k] · x[xo + k] for each r < ROWS;
// `rows` holds the rows' byte offsets. The caller reduces over the workgroup.
fn dot_rows(rows: array<u32, ROWS>, xo: u32, k: u32) -> array<f32, ROWS> {
    var acc: array<f32, ROWS>;
    let pieces = k / 8u;
    var i = lid_;
#if DTYPE != 'F32' && DTYPE != 'F16' && DTYPE != 'BF16'
    // Four pieces per iteration: their loads are independent, so more of
    // them are in flight per invocation.
    for (; i + 3u * WG < pieces; i += 4u * WG) {
        let p0 = x8(xo, i * 8u);
        let p1 = x8(xo, (i + WG) * 8u);
        let p2 = x8(xo, (i + 2u * WG) * 8u);
        let p3 = x8(xo, (i + 3u * WG) * 8u);
        let one = vec4<f32>(1.0);
        let s0 = dot(p0.a + p0.b, one);
        let s1 = dot(p1.a + p1.b, one);
        let s2 = dot(p2.a + p2.b, one);
        let s3 = dot(p3.a + p3.b, one);
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += dot8(rows[r], i * 8u, p0.a, p0.b, s0) + dot8(rows[r], (i + WG) * 8u, p1.a, p1.b, s1)
                + dot8(rows[r], (i + 2u * WG) * 8u, p2.a, p2.b, s2) + dot8(rows[r], (i + 3u * WG) * 8u, p3.a, p3.b, s3);
        }
    }
#endif
    for (; i < pieces; i += WG) {
        let xv = x8(xo, i * 8u);
#if DTYPE != 'F32' && DTYPE != 'F16' && DTYPE != 'BF16'
        let sx = dot(xv.a + xv.b, vec4<f32>(1.0));
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += dot8(rows[r], i * 8u, xv.a, xv.b, sx);
        }
#else
#if F16
        let ha = vec4<f16>(xv.a);
        let hb = vec4<f16>(xv.b);
#endif
        for (var r = 0u; r < ROWS; r++) {
            let v = deq8(rows[r], i * 8u);
#if F16
            acc[r] += f32(dot(vec4<f16>(v.a), ha)) + f32(dot(vec4<f16>(v.b), hb));
#else
            acc[r] += dot(v.a, xv.a) + dot(v.b, xv.b);
#endif
        }
#endif
    }
#if DTYPE == 'F32' || DTYPE == 'F16' || DTYPE == 'BF16'
    // Plain rows may end in a partial piece.
    for (var e = pieces * 8u + lid_; e < k; e += WG) {
        let xv = x1(xo, e);
        for (var r = 0u; r < ROWS; r++) {
#if F16
            acc[r] += f32(f16(deq1(rows[r], e)) * f16(xv));
#else
            acc[r] += deq1(rows[r], e) * xv;
#endif
        }
    }
#endif
    return acc;
}

// Byte offsets of rows n0 .. n0 + ROWS of a weight with `n` rows of `k`
// elements; rows past the end repeat the last (computed, never stored).
fn row_offsets(n0: u32, n: u32, k: u32) -> array<u32, ROWS> {
    var rows: array<u32, ROWS>;
    let rb = row_bytes(k);
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = min(n0 + r, n - 1u) * rb;
    }
    return rows;
}
