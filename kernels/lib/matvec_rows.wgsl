// kiln lib needs: load_vec4
// kiln lib needs: load_word
// Partial dot products of ROWS weight rows with one input row, dequantizing
// inside (DTYPE). Included once per weight of a matmul_vec kernel, each time
// under its own suffix. The including template defines ROWS, TW (the
// invocations that share these rows), tl_ (this invocation's index among
// them), X8 and x8(xo, e) (input elements e..e+8 of the row at xo) and
// x1(xo, e).
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
#elif DTYPE == 'Q4_0X'
// As Q4_0, from the re-laid groups (dequant.wgsl): the nibble words are
// aligned.
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let sb = row + (e / 256u) * 144u;
    let t = (e / 32u) % 8u;
    let j = e % 32u;
    let sh = select(0u, 4u, j >= 16u);
    let qw = (sb + 16u * t + j % 16u) >> 2u;
    let s = dot(nib_lo(load_word(qw) >> sh), xa) + dot(nib_lo(load_word(qw + 1u) >> sh), xb);
    return scale_at(sb + 128u + 2u * t) * (16.0 * s - 24.0 * sx);
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
#elif DTYPE == 'Q6_KX'
// As Q6_K, from the re-laid groups (dequant.wgsl): the words are aligned.
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let g = row + (e / 2048u) * 1680u;
    let t = (e / 256u) % 8u;
    let k = e % 256u;
    let h = k / 128u;
    let r = k % 128u;
    let lw = (g + 128u * t + h * 64u + r % 64u) >> 2u;
    let hw = (g + 1024u + 64u * t + h * 32u + r % 32u) >> 2u;
    let lsh = 4u * (r / 64u);
    let hsh = 2u * (r / 32u);
    let m4 = 0x0f0f0f0fu;
    let m2 = 0x03030303u;
    let u0 = ((load_word(lw) >> lsh) & m4) | (((load_word(hw) >> hsh) & m2) << 4u);
    let u1 = ((load_word(lw + 1u) >> lsh) & m4) | (((load_word(hw + 1u) >> hsh) & m2) << 4u);
    let s = dot(ubytes(u0), xa) + dot(ubytes(u1), xb);
    let sc = f32(bitcast<i32>(load_u8(g + 1536u + 16u * t + k / 16u) << 24u) >> 24u);
    return scale_at(g + 1664u + 2u * t) * sc * (256.0 * s - 288.0 * sx);
}
#else
// Other formats: the dequantized piece.
fn dot8(row: u32, e: u32, xa: vec4<f32>, xb: vec4<f32>, sx: f32) -> f32 {
    let v = deq8(row, e);
    return dot(v.a, xa) + dot(v.b, xb);
}
#endif

#if XQ
// The quantized-input path (see matmul_vec's XQ): a piece is PIECE elements
// of one row; xq_piece(pi) gathers the input words piece pi needs (once for
// all rows), dotq(row, pi, xp) is the row's share. The packed fields become
// int8 bytes (nibbles 0..15, 6-bit values 0..63, Q8_0's signed bytes) for
// dot4I8Packed; offsets (−8, −32, −min) go through xp.s = d · Σ q.
// Σ over two nibble words w0, w1 (four nibbles a byte): low nibbles with
// q.x, q.y, high nibbles with q.z, q.w.
fn dot_nibbles(w0: u32, w1: u32, q: vec4<u32>) -> i32 {
    let m4 = 0x0f0f0f0fu;
    return (dot4I8Packed(w0 & m4, q.x) + dot4I8Packed(w1 & m4, q.y))
        + (dot4I8Packed((w0 >> 4u) & m4, q.z) + dot4I8Packed((w1 >> 4u) & m4, q.w));
}

#if DTYPE == 'Q4_K' || DTYPE == 'Q6_KX'
// The input of two 16-element runs at e0 and e1, each inside one 32-element
// block: words q (e0..) and r (e1..), the blocks' scales d.xy and
// d · Σ q of each run in s.xy.
fn xq_runs(e0: u32, e1: u32) -> XP {
    let q = xq_word4(e0);
    let r = xq_word4(e1);
    let d = vec2<f32>(xq_d(e0), xq_d(e1));
    let s = vec2<f32>(
        xq_sum4(q, d.x),
        xq_sum4(r, d.y),
    );
    return XP(q, r, vec4<f32>(d, 0.0, 0.0), vec4<f32>(s, 0.0, 0.0));
}
#endif

#if DTYPE == 'Q4_0' || DTYPE == 'Q4_1'
// Piece p: half h = p % 2 of block p / 2's 16 nibble bytes (bytes
// 8h..8h+8): the low nibbles are elements 8h.., the high ones 16 + 8h..
const PIECE: u32 = 16u;

fn xq_piece(pi: u32) -> XP {
    let e = (pi / 2u) * 32u + (pi % 2u) * 8u;
    let q = vec4<u32>(xq_word(e), xq_word(e + 4u), xq_word(e + 16u), xq_word(e + 20u));
    let d = xq_d(e);
    let s = xq_sum4(q, d);
    return XP(q, vec4<u32>(0u), vec4<f32>(d), vec4<f32>(s));
}

#if DTYPE == 'Q4_0'
// 18-byte blocks (d, 16 nibble bytes): d · Σ (n − 8)·q·dx.
fn dotq(row: u32, pi: u32, xp: XP) -> f32 {
    let b = row + (pi / 2u) * 18u;
    let w = load_u64(b + 2u + (pi % 2u) * 8u);
    return scale_at(b) * (xp.d.x * i2f(dot_nibbles(w.x, w.y, xp.q)) - 8.0 * xp.s.x);
}
#else
// 20-byte blocks (d, m, 16 nibble bytes; word-aligned): Σ (d·n + m)·q·dx.
fn dotq(row: u32, pi: u32, xp: XP) -> f32 {
    let bw = (row + (pi / 2u) * 20u) >> 2u;
    let qw = bw + 1u + (pi % 2u) * 2u;
    let dm = scales2(load_word(bw));
    return dm.x * xp.d.x * i2f(dot_nibbles(load_word(qw), load_word(qw + 1u), xp.q)) + dm.y * xp.s.x;
}
#endif
#elif DTYPE == 'Q4_0X'
// Piece p: block p whole, its 16 nibble bytes one aligned 16-byte load
// (load_vec4, vector index) from the re-laid groups (dequant.wgsl): word
// w's low nibbles are elements 4w.., its high ones 16 + 4w...
const PIECE: u32 = 32u;

fn xq_piece(pi: u32) -> XP {
    let e = pi * 32u;
    let q = xq_word4(e);
    let r = xq_word4(e + 16u);
    let d = xq_d(e);
    let one = vec4<u32>(0x01010101u);
    let n = dot16(q, one) + dot16(r, one);
    return XP(q, r, vec4<f32>(d), vec4<f32>(d * i2f(n)));
}

// d · Σ (n − 8)·q·dx.
fn dotq(row: u32, pi: u32, xp: XP) -> f32 {
    let sb = row + (pi / 8u) * 144u;
    let t = pi % 8u;
    let w = load_vec4((sb + 16u * t) >> 4u);
    let m4 = vec4<u32>(0x0f0f0f0fu);
    let lo = w & m4;
    let hi = (w >> vec4<u32>(4u)) & m4;
    let s = dot16(lo, xp.q) + dot16(hi, xp.r);
    return scale_at(sb + 128u + 2u * t) * (xp.d.x * i2f(s) - 8.0 * xp.s.x);
}
#elif DTYPE == 'Q8_0'
// Piece p: elements 8j..8j+8 (j = p % 4) of block p / 4.
const PIECE: u32 = 8u;

fn xq_piece(pi: u32) -> XP {
    let e = pi * 8u;
    return XP(vec4<u32>(xq_word(e), xq_word(e + 4u), 0u, 0u), vec4<u32>(0u), vec4<f32>(xq_d(e)), vec4<f32>(0.0));
}

fn dotq(row: u32, pi: u32, xp: XP) -> f32 {
    let b = row + (pi / 4u) * 34u;
    let w = load_u64(b + 2u + (pi % 4u) * 8u);
    let s = dot4I8Packed(w.x, xp.q.x) + dot4I8Packed(w.y, xp.q.y);
    return scale_at(b) * xp.d.x * i2f(s);
}
#elif DTYPE == 'Q4_K'
// Piece p: words 4t..4t+4 (t = p % 2) of sub-block pair i = (p / 2) % 4 of
// super-block p / 8: low nibbles are elements 64i + 16t.. (sub-block 2i),
// high ones 64i + 32 + 16t.. (sub-block 2i + 1).
const PIECE: u32 = 32u;

fn xq_piece(pi: u32) -> XP {
    let e = (pi / 2u) * 64u + (pi % 2u) * 16u;
    return xq_runs(e, e + 32u);
}

// (sc, m) of sub-blocks 2i and 2i + 1 from the 12 scale bytes (words
// s0 s1 s2), as scale_min_k4 unpacks them, without branches (i differs
// between neighbouring invocations) and without int→float conversions:
// the four 6-bit fields are gathered as the bytes of one word.
fn k4_pair(s0: u32, s1: u32, s2: u32, i: u32) -> vec4<f32> {
    let sh = 16u * (i % 2u);
    // Bytes sc(2i) sc(2i+1) m(2i) m(2i+1) of the first eight, and for
    // i >= 2 their top two bits (bits 4-5 of each byte after the shift).
    let am = ((s0 >> sh) & 0xffffu) | (((s1 >> sh) & 0xffffu) << 16u);
    let c = (s2 >> sh) & 0xffffu;
    let hi = (c & 0x0f0fu) | (((c >> 4u) & 0x0f0fu) << 16u) | ((am >> 2u) & 0x30303030u);
    let v = select(hi, am & 0x3f3f3f3fu, i < 2u);
    return u2f4((vec4<u32>(v) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu));
}

// A super-block is nine aligned 16-byte vectors (load_vec4): d, dmin and
// the 12 scale bytes, then the 128 nibble bytes.
fn dotq(row: u32, pi: u32, xp: XP) -> f32 {
    let bv = (row + (pi / 8u) * 144u) >> 4u;
    let i = (pi / 2u) % 4u;
    let hd = load_vec4(bv);
    let w = load_vec4(bv + 1u + i * 2u + pi % 2u);
    let m4 = vec4<u32>(0x0f0f0f0fu);
    let slo = dot16(w & m4, xp.q);
    let shi = dot16((w >> vec4<u32>(4u)) & m4, xp.r);
    let dm = scales2(hd.x);
    let sm = k4_pair(hd.y, hd.z, hd.w, i);
    return dm.x * (sm.x * xp.d.x * i2f(slo) + sm.y * xp.d.y * i2f(shi)) - dm.y * (sm.z * xp.s.x + sm.w * xp.s.y);
}
#elif DTYPE == 'Q6_K'
// Piece p: bytes l..l+4 (l = 4 (p % 8)) of half h = (p / 8) % 2 of
// super-block p / 16: elements 128h + l + 32c.. for c = 0..4, each with its
// own int8 scale (ql's low nibbles at l are c = 0, at l + 32 c = 1, high
// nibbles c = 2, 3; qh's 2-bit fields c = 0..4 from the bottom).
const PIECE: u32 = 16u;

fn xq_piece(pi: u32) -> XP {
    let e = (pi / 8u) * 128u + (pi % 8u) * 4u;
    let q = vec4<u32>(xq_word(e), xq_word(e + 32u), xq_word(e + 64u), xq_word(e + 96u));
    let d = vec4<f32>(xq_d(e), xq_d(e + 32u), xq_d(e + 64u), xq_d(e + 96u));
    let s = vec4<f32>(xq_sum(q.x, d.x), xq_sum(q.y, d.y), xq_sum(q.z, d.z), xq_sum(q.w, d.w));
    return XP(q, vec4<u32>(0u), d, s);
}

fn dotq(row: u32, pi: u32, xp: XP) -> f32 {
    let b = row + (pi / 16u) * 210u;
    let h = (pi / 8u) % 2u;
    let l = (pi % 8u) * 4u;
    let ql0 = load_u32(b + h * 64u + l);
    let ql1 = load_u32(b + h * 64u + 32u + l);
    let qh = load_u32(b + 128u + h * 32u + l);
    let m4 = 0x0f0f0f0fu;
    let m2 = 0x03030303u;
    let q0 = (ql0 & m4) | ((qh & m2) << 4u);
    let q1 = (ql1 & m4) | (((qh >> 2u) & m2) << 4u);
    let q2 = ((ql0 >> 4u) & m4) | (((qh >> 4u) & m2) << 4u);
    let q3 = ((ql1 >> 4u) & m4) | (((qh >> 6u) & m2) << 4u);
    let s = vec4<f32>(vec4<i32>(dot4I8Packed(q0, xp.q.x), dot4I8Packed(q1, xp.q.y), dot4I8Packed(q2, xp.q.z), dot4I8Packed(q3, xp.q.w)));
    // The int8 scales of the four: bytes 8h + l / 16 + 2c.
    let so = b + 192u + h * 8u + l / 16u;
    let sa = load_u32(so);
    let sb = load_u32(so + 4u);
    let sc = vec4<f32>(vec4<i32>(bitcast<i32>(sa << 24u), bitcast<i32>(sa << 8u), bitcast<i32>(sb << 24u), bitcast<i32>(sb << 8u)) >> vec4<u32>(24u));
    return scale_at(b + 208u) * dot(sc, xp.d * s - 32.0 * xp.s);
}
#elif DTYPE == 'Q6_KX'
// Piece p: 32 elements of super-block p / 8, half h = (p / 4) % 2,
// l = 16 (p % 4): the 16 ql bytes at 64h + l (one aligned vector; low
// nibbles are elements 128h + l.., high ones 128h + 64 + l..) and the 16 qh
// bytes at 32h + l % 32 (one vector; their 2-bit fields at 2 (l / 32) and
// 4 + 2 (l / 32)), of the re-laid groups (dequant.wgsl). Each half is one
// 16-element sub-block with its own int8 scale.
const PIECE: u32 = 32u;

fn xq_piece(pi: u32) -> XP {
    let e = (pi / 4u) * 128u + (pi % 4u) * 16u;
    return xq_runs(e, e + 64u);
}

// d · Σ_halves sc · Σ (q − 32)·q_x·dx.
fn dotq(row: u32, pi: u32, xp: XP) -> f32 {
    let g = row + (pi / 64u) * 1680u;
    let t = (pi / 8u) % 8u;
    let h = (pi / 4u) % 2u;
    let l = (pi % 4u) * 16u;
    let w = load_vec4((g + 128u * t + 64u * h + l) >> 4u);
    let hb = load_vec4((g + 1024u + 64u * t + 32u * h + l % 32u) >> 4u);
    let sv = load_vec4((g + 1536u + 16u * t) >> 4u);
    let hsh = vec4<u32>(2u * (l / 32u));
    let m4 = vec4<u32>(0x0f0f0f0fu);
    let m2 = vec4<u32>(0x03030303u);
    let lo = (w & m4) | (((hb >> hsh) & m2) << vec4<u32>(4u));
    let hi = ((w >> vec4<u32>(4u)) & m4) | (((hb >> (hsh + vec4<u32>(4u))) & m2) << vec4<u32>(4u));
    let slo = dot16(lo, xp.q);
    let shi = dot16(hi, xp.r);
    // The halves' int8 scales: byte l / 16 of words 2h and 2h + 1.
    let sw = select(sv.xy, sv.zw, h == 1u) << vec2<u32>(24u - 8u * (l / 16u));
    let sc = vec2<f32>(i2f(bitcast<i32>(sw.x) >> 24u), i2f(bitcast<i32>(sw.y) >> 24u));
    return scale_at(g + 1664u + 2u * t) * (sc.x * (xp.d.x * i2f(slo) - 32.0 * xp.s.x) + sc.y * (xp.d.y * i2f(shi) - 32.0 * xp.s.y));
}
#endif

// As dot_rows below, with the quantized input.
fn dot_rows(rows: array<u32, ROWS>, xo: u32, k: u32) -> array<f32, ROWS> {
    var acc: array<f32, ROWS>;
    for (var pi = tl_; pi < k / PIECE; pi += TW) {
        let xp = xq_piece(pi);
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += dotq(rows[r], pi, xp);
        }
    }
    return acc;
}
#else
// This invocation's share of Σ_k W[row r, k] · x[xo + k] for each r < ROWS;
// `rows` holds the rows' byte offsets. The caller reduces over the TW
// invocations.
fn dot_rows(rows: array<u32, ROWS>, xo: u32, k: u32) -> array<f32, ROWS> {
    var acc: array<f32, ROWS>;
    let pieces = k / 8u;
    var i = tl_;
#if DTYPE != 'F32' && DTYPE != 'F16' && DTYPE != 'BF16'
    // Four pieces per iteration: their loads are independent, so more of
    // them are in flight per invocation.
    for (; i + 3u * TW < pieces; i += 4u * TW) {
        let p0 = x8(xo, i * 8u);
        let p1 = x8(xo, (i + TW) * 8u);
        let p2 = x8(xo, (i + 2u * TW) * 8u);
        let p3 = x8(xo, (i + 3u * TW) * 8u);
        let one = vec4<f32>(1.0);
        let s0 = dot(p0.a + p0.b, one);
        let s1 = dot(p1.a + p1.b, one);
        let s2 = dot(p2.a + p2.b, one);
        let s3 = dot(p3.a + p3.b, one);
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += dot8(rows[r], i * 8u, p0.a, p0.b, s0) + dot8(rows[r], (i + TW) * 8u, p1.a, p1.b, s1)
                + dot8(rows[r], (i + 2u * TW) * 8u, p2.a, p2.b, s2) + dot8(rows[r], (i + 3u * TW) * 8u, p3.a, p3.b, s3);
        }
    }
#endif
    for (; i < pieces; i += TW) {
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
    for (var e = pieces * 8u + tl_; e < k; e += TW) {
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
#endif

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
