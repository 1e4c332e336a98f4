// kiln lib needs: load_word
// Dequantization of raw GGUF bytes (or, for DTYPE Q4_0X and Q6_KX, Q4_0
// and Q6_K re-laid at upload), shared by matmul_vec, matmul_tiled and embed. The including template defines
//     fn load_word(i: u32) -> u32   // 32-bit word i of its raw byte binding
// and the knob DTYPE; this file then gives
//     const BLOCK: u32, BLOCK_BYTES: u32   // elements and bytes per block
//     fn row_bytes(k: u32) -> u32          // bytes of a row of k elements
//     fn deq8(row: u32, e: u32) -> Deq8    // elements e..e+8 of the row that
//                                          // starts at byte `row` (e % 8 == 0,
//                                          // e + 8 <= row length)
//     fn deq1(row: u32, e: u32) -> f32     // element e (any e for F32, F16,
//                                          // BF16; quantized rows always hold
//                                          // whole 8-element pieces)
// GGUF blocks are not 4-byte aligned (Q4_0 blocks are 18 bytes), so bytes are
// read out of u32 words. f16 fields always sit at even byte offsets. The
// arithmetic follows src/model/dequant.rs (same operations, same order).

struct Deq8 {
    a: vec4<f32>,
    b: vec4<f32>,
}

fn row_bytes(k: u32) -> u32 {
    return k / BLOCK * BLOCK_BYTES;
}

// The byte at byte offset `off`.
fn load_u8(off: u32) -> u32 {
    return (load_word(off >> 2u) >> ((off & 3u) * 8u)) & 0xffu;
}

// The 32 bits at bit `sh` (0, 8, 16 or 24) of the 64-bit lo | hi << 32.
fn funnel(lo: u32, hi: u32, sh: u32) -> u32 {
    // `(hi << (31 - sh)) << 1` is `hi << (32 - sh)`, and 0 when sh == 0.
    return (lo >> sh) | ((hi << (31u - sh)) << 1u);
}

// Four little-endian bytes at any byte offset.
fn load_u32(off: u32) -> u32 {
    let i = off >> 2u;
    return funnel(load_word(i), load_word(i + 1u), (off & 3u) * 8u);
}

// Eight little-endian bytes at any byte offset: three word loads.
fn load_u64(off: u32) -> vec2<u32> {
    let i = off >> 2u;
    let sh = (off & 3u) * 8u;
    let w1 = load_word(i + 1u);
    return vec2<u32>(funnel(load_word(i), w1, sh), funnel(w1, load_word(i + 2u), sh));
}

// Two f16 (low half first) widened to f32, exactly as the CPU does: normals
// and subnormals exact, infinities and NaN payloads kept. (Bit arithmetic
// rather than unpack2x16float, which naga 30 gates behind a capability the
// validator does not grant, and which drivers may flush to zero on
// subnormals.)
fn f16x2(w: u32) -> vec2<f32> {
    let h = vec2<u32>(w & 0xffffu, w >> 16u);
    let sign = (h & vec2<u32>(0x8000u)) << vec2<u32>(16u);
    let em = h & vec2<u32>(0x7fffu);
    let normal = select(
        (em << vec2<u32>(13u)) + vec2<u32>(0x38000000u),
        (em << vec2<u32>(13u)) | vec2<u32>(0x7f800000u),
        em >= vec2<u32>(0x7c00u),
    );
    // Subnormal: man * 2^-24 (0x33800000 is 2^-24), exact in f32.
    let sub = bitcast<vec2<u32>>(vec2<f32>(em) * bitcast<f32>(0x33800000u));
    return bitcast<vec2<f32>>(sign | select(normal, sub, em < vec2<u32>(0x400u)));
}

// The f16 at an even byte offset, widened to f32.
fn load_f16(off: u32) -> f32 {
    return f16x2(load_word(off >> 2u) >> ((off & 2u) * 8u)).x;
}

// Two consecutive f16 at an even byte offset.
fn load_f16x2(off: u32) -> vec2<f32> {
    return f16x2(load_u32(off));
}

// The four bytes of a word, low byte first.
fn bytes4(w: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
}

// Bits `sh .. sh + width` of each byte of a word (mask = 2^width - 1).
fn bits4(w: u32, sh: u32, mask: u32) -> vec4<u32> {
    return (bytes4(w) >> vec4<u32>(sh)) & vec4<u32>(mask);
}

// The four bytes of a word as signed integers.
fn sbytes4(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

#if DTYPE == 'F32'
const BLOCK: u32 = 1u;
const BLOCK_BYTES: u32 = 4u;

fn deq1(row: u32, e: u32) -> f32 {
    return bitcast<f32>(load_word((row >> 2u) + e));
}

fn deq8(row: u32, e: u32) -> Deq8 {
    let i = (row >> 2u) + e;
    let a = vec4<u32>(load_word(i), load_word(i + 1u), load_word(i + 2u), load_word(i + 3u));
    let b = vec4<u32>(load_word(i + 4u), load_word(i + 5u), load_word(i + 6u), load_word(i + 7u));
    return Deq8(bitcast<vec4<f32>>(a), bitcast<vec4<f32>>(b));
}
#endif

#if DTYPE == 'F16'
const BLOCK: u32 = 1u;
const BLOCK_BYTES: u32 = 2u;

fn deq1(row: u32, e: u32) -> f32 {
    return load_f16(row + 2u * e);
}

fn deq8(row: u32, e: u32) -> Deq8 {
    let o = row + 2u * e;
    return Deq8(
        vec4<f32>(load_f16x2(o), load_f16x2(o + 4u)),
        vec4<f32>(load_f16x2(o + 8u), load_f16x2(o + 12u)),
    );
}
#endif

#if DTYPE == 'BF16'
const BLOCK: u32 = 1u;
const BLOCK_BYTES: u32 = 2u;

fn bf16x2(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn deq1(row: u32, e: u32) -> f32 {
    let o = row + 2u * e;
    return bitcast<f32>(((load_word(o >> 2u) >> ((o & 2u) * 8u)) & 0xffffu) << 16u);
}

fn deq8(row: u32, e: u32) -> Deq8 {
    let o = row + 2u * e;
    return Deq8(
        vec4<f32>(bf16x2(load_u32(o)), bf16x2(load_u32(o + 4u))),
        vec4<f32>(bf16x2(load_u32(o + 8u)), bf16x2(load_u32(o + 12u))),
    );
}
#endif

#if DTYPE == 'Q4_0'
// d@0, qs@2..18: element j < 16 is the low nibble of qs[j], j >= 16 the high
// nibble of qs[j - 16]; value d * (q - 8).
const BLOCK: u32 = 32u;
const BLOCK_BYTES: u32 = 18u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 32u) * 18u;
    let j = e % 32u;
    let d = load_f16(b);
    let sh = select(0u, 4u, j >= 16u);
    let qo = b + 2u + j % 16u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 15u));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 15u));
    return Deq8(d * (q0 - 8.0), d * (q1 - 8.0));
}
#endif

#if DTYPE == 'Q4_0X'
// Q4_0 re-laid at upload (DType::gpu_layout in src/model/dtype.rs): per
// 256 elements (144 bytes) the eight blocks' 16 nibble bytes (16t..16t+16
// for block t), then their eight f16 scales (128 + 2t).
const BLOCK: u32 = 32u;
const BLOCK_BYTES: u32 = 18u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let sb = row + (e / 256u) * 144u;
    let t = (e / 32u) % 8u;
    let j = e % 32u;
    let d = load_f16(sb + 128u + 2u * t);
    let sh = select(0u, 4u, j >= 16u);
    let qo = sb + 16u * t + j % 16u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 15u));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 15u));
    return Deq8(d * (q0 - 8.0), d * (q1 - 8.0));
}
#endif

#if DTYPE == 'Q4_1'
// d@0, m@2, qs@4..20; value (d * q) + m.
const BLOCK: u32 = 32u;
const BLOCK_BYTES: u32 = 20u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 32u) * 20u;
    let j = e % 32u;
    let dm = load_f16x2(b);
    let sh = select(0u, 4u, j >= 16u);
    let qo = b + 4u + j % 16u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 15u));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 15u));
    return Deq8(dm.x * q0 + dm.y, dm.x * q1 + dm.y);
}
#endif

#if DTYPE == 'Q5_0' || DTYPE == 'Q5_1'
// The fifth bits of elements j..j+4 (bit j of qh), as 0 or 16.
fn high5(qh: u32, j: u32) -> vec4<u32> {
    return ((vec4<u32>(qh) >> (vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u))) & vec4<u32>(1u)) << vec4<u32>(4u);
}
#endif

#if DTYPE == 'Q5_0'
// d@0, qh@2..6, qs@6..22; value d * (q - 16).
const BLOCK: u32 = 32u;
const BLOCK_BYTES: u32 = 22u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 32u) * 22u;
    let j = e % 32u;
    let d = load_f16(b);
    let qh = load_u32(b + 2u);
    let sh = select(0u, 4u, j >= 16u);
    let qo = b + 6u + j % 16u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 15u) | high5(qh, j));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 15u) | high5(qh, j + 4u));
    return Deq8(d * (q0 - 16.0), d * (q1 - 16.0));
}
#endif

#if DTYPE == 'Q5_1'
// d@0, m@2, qh@4..8, qs@8..24; value (d * q) + m.
const BLOCK: u32 = 32u;
const BLOCK_BYTES: u32 = 24u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 32u) * 24u;
    let j = e % 32u;
    let dm = load_f16x2(b);
    let qh = load_u32(b + 4u);
    let sh = select(0u, 4u, j >= 16u);
    let qo = b + 8u + j % 16u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 15u) | high5(qh, j));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 15u) | high5(qh, j + 4u));
    return Deq8(dm.x * q0 + dm.y, dm.x * q1 + dm.y);
}
#endif

#if DTYPE == 'Q8_0'
// d@0, qs@2..34 (i8); value q * d.
const BLOCK: u32 = 32u;
const BLOCK_BYTES: u32 = 34u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 32u) * 34u;
    let qo = b + 2u + e % 32u;
    let d = load_f16(b);
    return Deq8(sbytes4(load_u32(qo)) * d, sbytes4(load_u32(qo + 4u)) * d);
}
#endif

#if DTYPE == 'IQ4_NL'
// d@0, qs@2..18 (nibbles as in Q4_0) indexing the non-linear code book;
// value d * table[q]. The 16 signed table bytes are packed into 4 words.
const BLOCK: u32 = 32u;
const BLOCK_BYTES: u32 = 18u;
const IQ4_NL_TABLE: vec4<u32> = vec4<u32>(0xbfad9881u, 0xf6eaddcfu, 0x26190d01u, 0x71594535u);

fn iq4_nl4(q: vec4<u32>) -> vec4<f32> {
    let t = IQ4_NL_TABLE;
    let w = vec4<u32>(t[q.x >> 2u], t[q.y >> 2u], t[q.z >> 2u], t[q.w >> 2u]);
    let sh = vec4<u32>(24u) - (q & vec4<u32>(3u)) * 8u;
    return vec4<f32>(bitcast<vec4<i32>>(w << sh) >> vec4<u32>(24u));
}

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 32u) * 18u;
    let j = e % 32u;
    let d = load_f16(b);
    let sh = select(0u, 4u, j >= 16u);
    let qo = b + 2u + j % 16u;
    return Deq8(d * iq4_nl4(bits4(load_u32(qo), sh, 15u)), d * iq4_nl4(bits4(load_u32(qo + 4u), sh, 15u)));
}
#endif

#if DTYPE == 'Q2_K'
// scales@0..16, qs@16..80, d@80, dmin@82. Sub-block k/16 has scale byte sc:
// value (d * (sc & 15)) * q - (dmin * (sc >> 4)); element k's 2 bits are at
// shift 2 * ((k % 128) / 32) of qs[(k / 128) * 32 + k % 32].
const BLOCK: u32 = 256u;
const BLOCK_BYTES: u32 = 84u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 256u) * 84u;
    let k = e % 256u;
    let sc = load_u8(b + k / 16u);
    let dm = load_f16x2(b + 80u);
    let dl = dm.x * f32(sc & 15u);
    let ml = dm.y * f32(sc >> 4u);
    let sh = 2u * ((k % 128u) / 32u);
    let qo = b + 16u + (k / 128u) * 32u + k % 32u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 3u));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 3u));
    return Deq8(dl * q0 - ml, dl * q1 - ml);
}
#endif

#if DTYPE == 'Q3_K'
// hmask@0..32, qs@32..96, scales@96..108 (6-bit, packed), d@108. Value
// (d * (sc - 32)) * q with q = low2 - 4 where the hmask bit is 0.
const BLOCK: u32 = 256u;
const BLOCK_BYTES: u32 = 110u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 256u) * 110u;
    let k = e % 256u;
    let i = k / 16u;
    let low = (load_u8(b + 96u + i % 8u) >> select(0u, 4u, i >= 8u)) & 15u;
    let high = (load_u8(b + 104u + i % 4u) >> (2u * (i / 4u))) & 3u;
    let dl = load_f16(b + 108u) * f32(i32(low | (high << 4u)) - 32);
    let l = k % 32u;
    let sh = 2u * ((k % 128u) / 32u);
    let qo = b + 32u + (k / 128u) * 32u + l;
    let hs = k / 32u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 3u)) - 4.0 * vec4<f32>(vec4<u32>(1u) - bits4(load_u32(b + l), hs, 1u));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 3u)) - 4.0 * vec4<f32>(vec4<u32>(1u) - bits4(load_u32(b + l + 4u), hs, 1u));
    return Deq8(dl * q0, dl * q1);
}
#endif

#if DTYPE == 'Q4_K' || DTYPE == 'Q5_K'
// The 6-bit scale and min of sub-block i (0..8) from the 12 bytes at `s`.
fn scale_min_k4(s: u32, i: u32) -> vec2<u32> {
    if i < 4u {
        return vec2<u32>(load_u8(s + i) & 63u, load_u8(s + i + 4u) & 63u);
    }
    let q = load_u8(s + i + 4u);
    return vec2<u32>(
        (q & 15u) | ((load_u8(s + i - 4u) >> 2u) & 0x30u),
        (q >> 4u) | ((load_u8(s + i) >> 2u) & 0x30u),
    );
}
#endif

#if DTYPE == 'Q4_K'
// d@0, dmin@2, scales@4..16, qs@16..144. Sub-block i = k / 32 takes the low
// (i even) or high nibbles of qs[(i / 2) * 32 ..]; value (d * sc) * q - (dmin * m).
const BLOCK: u32 = 256u;
const BLOCK_BYTES: u32 = 144u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 256u) * 144u;
    let k = e % 256u;
    let i = k / 32u;
    let dm = load_f16x2(b);
    let sm = scale_min_k4(b + 4u, i);
    let dl = dm.x * f32(sm.x);
    let ml = dm.y * f32(sm.y);
    let sh = 4u * (i % 2u);
    let qo = b + 16u + (i / 2u) * 32u + k % 32u;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 15u));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 15u));
    return Deq8(dl * q0 - ml, dl * q1 - ml);
}
#endif

#if DTYPE == 'Q5_K'
// d@0, dmin@2, scales@4..16, qh@16..48, qs@48..176: as Q4_K, bit i of
// qh[k % 32] is the fifth bit of sub-block i's element.
const BLOCK: u32 = 256u;
const BLOCK_BYTES: u32 = 176u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 256u) * 176u;
    let k = e % 256u;
    let i = k / 32u;
    let l = k % 32u;
    let dm = load_f16x2(b);
    let sm = scale_min_k4(b + 4u, i);
    let dl = dm.x * f32(sm.x);
    let ml = dm.y * f32(sm.y);
    let sh = 4u * (i % 2u);
    let qo = b + 48u + (i / 2u) * 32u + l;
    let q0 = vec4<f32>(bits4(load_u32(qo), sh, 15u) | (bits4(load_u32(b + 16u + l), i, 1u) << vec4<u32>(4u)));
    let q1 = vec4<f32>(bits4(load_u32(qo + 4u), sh, 15u) | (bits4(load_u32(b + 20u + l), i, 1u) << vec4<u32>(4u)));
    return Deq8(dl * q0 - ml, dl * q1 - ml);
}
#endif

#if DTYPE == 'Q6_K'
// ql@0..128, qh@128..192, scales@192..208 (i8), d@208. In half h = k / 128,
// element r = k % 128 has its low nibble in ql[h * 64 + r % 64] (shift
// 4 * (r / 64)) and its top 2 bits in qh[h * 32 + r % 32] (shift 2 * (r / 32));
// value (d * sc) * (q - 32).
const BLOCK: u32 = 256u;
const BLOCK_BYTES: u32 = 210u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let b = row + (e / 256u) * 210u;
    let k = e % 256u;
    let h = k / 128u;
    let r = k % 128u;
    let sc = f32(bitcast<i32>(load_u8(b + 192u + k / 16u) << 24u) >> 24u);
    let dl = load_f16(b + 208u) * sc;
    let lo = b + h * 64u + r % 64u;
    let hi = b + 128u + h * 32u + r % 32u;
    let lsh = 4u * (r / 64u);
    let hsh = 2u * (r / 32u);
    let q0 = vec4<i32>(bits4(load_u32(lo), lsh, 15u) | (bits4(load_u32(hi), hsh, 3u) << vec4<u32>(4u)));
    let q1 = vec4<i32>(bits4(load_u32(lo + 4u), lsh, 15u) | (bits4(load_u32(hi + 4u), hsh, 3u) << vec4<u32>(4u)));
    return Deq8(dl * vec4<f32>(q0 - 32), dl * vec4<f32>(q1 - 32));
}
#endif

#if DTYPE == 'Q6_KX'
// Q6_K re-laid at upload (DType::gpu_layout in src/model/dtype.rs): per
// 2048 elements (eight super-blocks, 1680 bytes) the eight ql fields
// (128t), qh (1024 + 64t), int8 scales (1536 + 16t) and f16 d (1664 + 2t)
// of super-block t; inside each field as Q6_K.
const BLOCK: u32 = 256u;
const BLOCK_BYTES: u32 = 210u;

fn deq8(row: u32, e: u32) -> Deq8 {
    let g = row + (e / 2048u) * 1680u;
    let t = (e / 256u) % 8u;
    let k = e % 256u;
    let h = k / 128u;
    let r = k % 128u;
    let sc = f32(bitcast<i32>(load_u8(g + 1536u + 16u * t + k / 16u) << 24u) >> 24u);
    let dl = load_f16(g + 1664u + 2u * t) * sc;
    let lo = g + 128u * t + h * 64u + r % 64u;
    let hi = g + 1024u + 64u * t + h * 32u + r % 32u;
    let lsh = 4u * (r / 64u);
    let hsh = 2u * (r / 32u);
    // Fields start 16-byte aligned and e % 8 == 0: whole words.
    let lw = lo >> 2u;
    let hw = hi >> 2u;
    let q0 = vec4<i32>(bits4(load_word(lw), lsh, 15u) | (bits4(load_word(hw), hsh, 3u) << vec4<u32>(4u)));
    let q1 = vec4<i32>(bits4(load_word(lw + 1u), lsh, 15u) | (bits4(load_word(hw + 1u), hsh, 3u) << vec4<u32>(4u)));
    return Deq8(dl * vec4<f32>(q0 - 32), dl * vec4<f32>(q1 - 32));
}
#endif

#if DTYPE != 'F32' && DTYPE != 'F16' && DTYPE != 'BF16'
// One element of a quantized row (only tails of plain rows need this; here
// it keeps every template well-formed).
fn deq1(row: u32, e: u32) -> f32 {
    let v = deq8(row, e & ~7u);
    let s = e & 7u;
    return select(v.a, v.b, s >= 4u)[s & 3u];
}
#endif
