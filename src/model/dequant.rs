//! CPU dequantization of GGML block types to `f32`.
//!
//! Every routine is bit-exact with the `gguf` Python package (gguf-py 0.19.0,
//! `gguf.quants.dequantize`): the same float32 operations in the same order,
//! never fused (Rust does not contract `a * b + c` into an FMA). For example
//! Q4_K computes `(d * sc) * q - (dmin * m)` as three rounded f32 operations,
//! and Q4_1 computes `(d * q) + m`. `tests/dequant_vectors.rs` checks this
//! against vectors that `tools/gen_dequant_vectors.py` made with gguf-py.
//!
//! Block layouts (offsets in bytes, `d`/`dmin`/`m` are little-endian f16):
//!
//! | type   | elems | bytes | layout                                             |
//! |--------|-------|-------|----------------------------------------------------|
//! | Q4_0   | 32    | 18    | d@0, qs@2..18 (nibbles)                            |
//! | Q4_1   | 32    | 20    | d@0, m@2, qs@4..20                                 |
//! | Q5_0   | 32    | 22    | d@0, qh@2..6 (u32), qs@6..22                       |
//! | Q5_1   | 32    | 24    | d@0, m@2, qh@4..8, qs@8..24                        |
//! | Q8_0   | 32    | 34    | d@0, qs@2..34 (i8)                                 |
//! | IQ4_NL | 32    | 18    | d@0, qs@2..18 (nibbles index a 16-entry table)     |
//! | Q2_K   | 256   | 84    | scales@0..16, qs@16..80, d@80, dmin@82             |
//! | Q3_K   | 256   | 110   | hmask@0..32, qs@32..96, scales@96..108, d@108      |
//! | Q4_K   | 256   | 144   | d@0, dmin@2, scales@4..16, qs@16..144              |
//! | Q5_K   | 256   | 176   | d@0, dmin@2, scales@4..16, qh@16..48, qs@48..176   |
//! | Q6_K   | 256   | 210   | ql@0..128, qh@128..192, scales@192..208 (i8), d@208|

use crate::model::dtype::DType;

/// Error for dequantizing a dtype kiln cannot compute with, or a byte slice of the wrong length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    /// kiln has no dequantization routine for this dtype.
    #[error("cannot dequantize {dtype}: kiln does not support this dtype")]
    Unsupported {
        /// The unsupported dtype.
        dtype: DType,
    },
    /// The element count is not a whole number of blocks.
    #[error(
        "cannot dequantize {n_elems} elements of {dtype}: not a multiple of its block size {block_size}"
    )]
    PartialBlock {
        /// The dtype.
        dtype: DType,
        /// Elements requested.
        n_elems: usize,
        /// Elements per block of `dtype`.
        block_size: usize,
    },
    /// The byte slice does not hold exactly the requested elements.
    #[error(
        "cannot dequantize {n_elems} elements of {dtype}: expected {expected} bytes, got {actual}"
    )]
    WrongLength {
        /// The dtype.
        dtype: DType,
        /// Elements requested.
        n_elems: usize,
        /// Bytes that `n_elems` elements of `dtype` take (u128: cannot overflow).
        expected: u128,
        /// Bytes given.
        actual: usize,
    },
}

/// Checks that `dtype` is supported and that `n_bytes` bytes hold exactly
/// `n_elems` elements of it.
fn check(dtype: DType, n_bytes: usize, n_elems: usize) -> Result<(), DequantError> {
    if !dtype.is_supported() {
        return Err(DequantError::Unsupported { dtype });
    }
    let block_size = dtype.block_size();
    if !n_elems.is_multiple_of(block_size) {
        return Err(DequantError::PartialBlock {
            dtype,
            n_elems,
            block_size,
        });
    }
    let expected = (n_elems / block_size) as u128 * dtype.type_size() as u128;
    if expected != n_bytes as u128 {
        return Err(DequantError::WrongLength {
            dtype,
            n_elems,
            expected,
            actual: n_bytes,
        });
    }
    Ok(())
}

/// Dequantize `out.len()` elements (a whole number of blocks) from `bytes` into `out`.
///
/// `bytes` must hold exactly those blocks: `out.len() / block_size * type_size`
/// bytes. The result is bit-identical to `gguf.quants.dequantize` (gguf-py 0.19.0),
/// including NaN payloads of F32, F16 and BF16 values.
pub fn dequantize_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    check(dtype, bytes.len(), out.len())?;
    match dtype {
        DType::F32 => blocks::<4, 1>(bytes, out, |b, o| o[0] = f32::from_le_bytes(*b)),
        DType::F16 => blocks::<2, 1>(bytes, out, |b, o| o[0] = f16_at(b, 0)),
        DType::BF16 => blocks::<2, 1>(bytes, out, |b, o| {
            o[0] = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16)
        }),
        DType::Q4_0 => blocks(bytes, out, q4_0),
        DType::Q4_1 => blocks(bytes, out, q4_1),
        DType::Q5_0 => blocks(bytes, out, q5_0),
        DType::Q5_1 => blocks(bytes, out, q5_1),
        DType::Q8_0 => blocks(bytes, out, q8_0),
        DType::Q2_K => blocks(bytes, out, q2_k),
        DType::Q3_K => blocks(bytes, out, q3_k),
        DType::Q4_K => blocks(bytes, out, q4_k),
        DType::Q5_K => blocks(bytes, out, q5_k),
        DType::Q6_K => blocks(bytes, out, q6_k),
        DType::IQ4_NL => blocks(bytes, out, iq4_nl),
        _ => return Err(DequantError::Unsupported { dtype }),
    }
    Ok(())
}

/// Convenience: allocate and dequantize `n` elements.
pub fn dequantize(dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    // Checked before allocating, so a bogus `n` is an error, not an abort.
    check(dtype, bytes.len(), n)?;
    let mut out = vec![0.0; n];
    dequantize_into(dtype, bytes, &mut out)?;
    Ok(out)
}

/// Run `f` over each `TS`-byte block of `bytes` and its `BS` outputs.
/// The caller has checked that the lengths match; any tail is ignored.
fn blocks<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; TS], &mut [f32; BS]),
) {
    let (ins, _) = bytes.as_chunks::<TS>();
    let (outs, _) = out.as_chunks_mut::<BS>();
    for (b, o) in ins.iter().zip(outs) {
        f(b, o);
    }
}

/// Little-endian f16 at `off`, widened to f32 exactly as numpy's
/// `astype(np.float32)` does: exact for every finite value and infinity, and
/// NaN payloads are kept as they are (a signaling NaN stays signaling). The
/// `half` crate sets the quiet bit instead, so it is not used here.
#[inline]
fn f16_at<const N: usize>(b: &[u8; N], off: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

#[inline]
fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = (h & 0x03ff) as u32;
    match exp {
        // Zero or subnormal: man * 2^-24 is exact in f32.
        0 => f32::from_bits(sign | (man as f32 * (1.0 / 16_777_216.0)).to_bits()),
        // Infinity or NaN, payload kept.
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | (((h & 0x7fff) as u32 + 0x1_c000) << 13)),
    }
}

/// The low (`j < 16`) or high nibble of a 16-byte run: element `j` of 32.
#[inline]
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    }
}

/// Q4_0: `d * (q - 8)`.
fn q4_0(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, y) in o.iter_mut().enumerate() {
        *y = d * (nibble(qs, j) as i8 - 8) as f32;
    }
}

/// Q4_1: `(d * q) + m`.
fn q4_1(b: &[u8; 20], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for (j, y) in o.iter_mut().enumerate() {
        *y = d * nibble(qs, j) as f32 + m;
    }
}

/// Q5_0: `d * (q - 16)`, the fifth bit of element `j` is bit `j` of `qh`.
fn q5_0(b: &[u8; 22], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, y) in o.iter_mut().enumerate() {
        let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
        *y = d * (q as i8 - 16) as f32;
    }
}

/// Q5_1: `(d * q) + m`, the fifth bit of element `j` is bit `j` of `qh`.
fn q5_1(b: &[u8; 24], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (j, y) in o.iter_mut().enumerate() {
        let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
        *y = d * q as f32 + m;
    }
}

/// Q8_0: `q * d` with signed bytes.
fn q8_0(b: &[u8; 34], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (y, &q) in o.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// Q2_K: 16 sub-blocks of 16; `(d * sc) * q - (dmin * m)`, with `sc` the low
/// and `m` the high nibble of the sub-block's scale byte. Element `k`'s 2 bits
/// are at shift `2 * ((k % 128) / 32)` of byte `(k / 128) * 32 + k % 32`.
fn q2_k(b: &[u8; 84], o: &mut [f32; 256]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (k, y) in o.iter_mut().enumerate() {
        let sc = scales[k / 16];
        let dl = d * (sc & 0x0f) as f32;
        let ml = dmin * (sc >> 4) as f32;
        let shift = 2 * ((k % 128) / 32);
        let q = (qs[(k / 128) * 32 + k % 32] >> shift) & 3;
        *y = dl * q as f32 - ml;
    }
}

/// Q3_K: 16 sub-blocks of 16; `(d * (sc - 32)) * q` with 6-bit scales and
/// `q = low2 - 4` where the hmask bit is 0 (`low2` when it is 1).
fn q3_k(b: &[u8; 110], o: &mut [f32; 256]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = f16_at(b, 108);
    let mut dl = [0.0f32; 16];
    for (i, dl) in dl.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0x0f } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        let scale = (low | high << 4) as i8 - 32;
        *dl = d * scale as f32;
    }
    for (k, y) in o.iter_mut().enumerate() {
        let l = k % 32;
        let low = (qs[(k / 128) * 32 + l] >> (2 * ((k % 128) / 32))) & 3;
        let hbit = (hmask[l] >> (k / 32)) & 1;
        let q = low as i8 - (((hbit ^ 1) << 2) as i8);
        *y = dl[k / 16] * q as f32;
    }
}

/// The 8 six-bit scales and mins of a Q4_K/Q5_K block (12 packed bytes).
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3f;
        mn[j] = s[4 + j] & 0x3f;
        sc[4 + j] = (s[8 + j] & 0x0f) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Q4_K: 8 sub-blocks of 32; `(d * sc) * q - (dmin * m)`. Sub-block `i` takes
/// the low (`i` even) or high nibbles of bytes `(i / 2) * 32 ..`.
fn q4_k(b: &[u8; 144], o: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    for (i, o) in o.chunks_exact_mut(32).enumerate() {
        let dl = d * sc[i] as f32;
        let ml = dmin * mn[i] as f32;
        let shift = 4 * (i % 2);
        for (y, &q) in o.iter_mut().zip(&qs[(i / 2) * 32..(i / 2) * 32 + 32]) {
            *y = dl * ((q >> shift) & 0x0f) as f32 - ml;
        }
    }
}

/// Q5_K: as Q4_K, with bit `i` of `qh[l]` the fifth bit of sub-block `i`'s element `l`.
fn q5_k(b: &[u8; 176], o: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (i, o) in o.chunks_exact_mut(32).enumerate() {
        let dl = d * sc[i] as f32;
        let ml = dmin * mn[i] as f32;
        let shift = 4 * (i % 2);
        let ql = &qs[(i / 2) * 32..(i / 2) * 32 + 32];
        for ((y, &lo), &hi) in o.iter_mut().zip(ql).zip(qh) {
            let q = ((lo >> shift) & 0x0f) | ((hi >> i) & 1) << 4;
            *y = dl * q as f32 - ml;
        }
    }
}

/// Q6_K: 16 sub-blocks of 16; `(d * sc) * (q - 32)` with signed 8-bit scales.
/// In each half `h` of 128 elements, element `r` has its low nibble in
/// `ql[h * 64 + r % 64]` (shift `4 * (r / 64)`) and its top 2 bits in
/// `qh[h * 32 + r % 32]` (shift `2 * (r / 32)`).
fn q6_k(b: &[u8; 210], o: &mut [f32; 256]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    let mut dl = [0.0f32; 16];
    for (dl, &s) in dl.iter_mut().zip(scales) {
        *dl = d * (s as i8) as f32;
    }
    for (k, y) in o.iter_mut().enumerate() {
        let (h, r) = (k / 128, k % 128);
        let lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
        let hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = (lo | hi << 4) as i8 - 32;
        *y = dl[k / 16] * q as f32;
    }
}

/// The IQ4_NL non-linear 4-bit code book.
const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// IQ4_NL: `d * table[q]`.
fn iq4_nl(b: &[u8; 18], o: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, y) in o.iter_mut().enumerate() {
        *y = d * IQ4_NL_VALUES[nibble(qs, j) as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_except_nan_quieting() {
        for h in 0..=u16::MAX {
            let ours = f16_bits_to_f32(h);
            let theirs = half::f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan());
                assert_eq!(ours.to_bits() | 0x0040_0000, theirs.to_bits(), "{h:#06x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
    }

    /// Each block is decoded from its own bytes (catches a block-size
    /// constant that disagrees with the dtype table) and every output is written.
    #[test]
    fn blocks_are_independent_and_outputs_all_written() {
        for dtype in DType::supported() {
            let (bs, ts) = (dtype.block_size(), dtype.type_size());
            // Patterned bytes whose f16 fields stay finite (high bytes < 0x78).
            let bytes: Vec<u8> = (0..3 * ts).map(|i| (i * 37 % 0x78) as u8).collect();
            let mut all = vec![f32::NAN; 3 * bs];
            dequantize_into(dtype, &bytes, &mut all).expect("supported");
            for blk in 0..3 {
                let one = dequantize(dtype, &bytes[blk * ts..(blk + 1) * ts], bs).expect("one");
                let got: Vec<u32> = all[blk * bs..(blk + 1) * bs]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let want: Vec<u32> = one.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "{dtype} block {blk}");
                assert!(one.iter().all(|x| x.is_finite()), "{dtype}");
            }
        }
    }
}
