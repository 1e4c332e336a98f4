//! GGML tensor element types: ids as stored in GGUF and their block layouts.
//!
//! Quantized types store elements in blocks: `block_size` elements take
//! `type_size` bytes. Dequantization lives in [`crate::model::dequant`].

use std::fmt;

/// A GGML element type, as named by its id in a GGUF tensor header.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
}

/// (type, ggml id, elements per block, bytes per block, kiln can compute with it)
const TABLE: &[(DType, u32, usize, usize, bool)] = &[
    (DType::F32, 0, 1, 4, true),
    (DType::F16, 1, 1, 2, true),
    (DType::Q4_0, 2, 32, 18, true),
    (DType::Q4_1, 3, 32, 20, true),
    (DType::Q5_0, 6, 32, 22, true),
    (DType::Q5_1, 7, 32, 24, true),
    (DType::Q8_0, 8, 32, 34, true),
    (DType::Q8_1, 9, 32, 36, false),
    (DType::Q2_K, 10, 256, 84, true),
    (DType::Q3_K, 11, 256, 110, true),
    (DType::Q4_K, 12, 256, 144, true),
    (DType::Q5_K, 13, 256, 176, true),
    (DType::Q6_K, 14, 256, 210, true),
    (DType::Q8_K, 15, 256, 292, false),
    (DType::IQ2_XXS, 16, 256, 66, false),
    (DType::IQ2_XS, 17, 256, 74, false),
    (DType::IQ3_XXS, 18, 256, 98, false),
    (DType::IQ1_S, 19, 256, 50, false),
    (DType::IQ4_NL, 20, 32, 18, true),
    (DType::IQ3_S, 21, 256, 110, false),
    (DType::IQ2_S, 22, 256, 82, false),
    (DType::IQ4_XS, 23, 256, 136, false),
    (DType::I8, 24, 1, 1, false),
    (DType::I16, 25, 1, 2, false),
    (DType::I32, 26, 1, 4, false),
    (DType::I64, 27, 1, 8, false),
    (DType::F64, 28, 1, 8, false),
    (DType::IQ1_M, 29, 256, 56, false),
    (DType::BF16, 30, 1, 2, true),
    (DType::TQ1_0, 34, 256, 54, false),
    (DType::TQ2_0, 35, 256, 66, false),
];

impl DType {
    fn row(self) -> &'static (DType, u32, usize, usize, bool) {
        // Every variant is in TABLE (checked by a unit test).
        TABLE.iter().find(|r| r.0 == self).unwrap_or(&TABLE[0])
    }

    /// The type with this GGML id, if kiln knows it.
    pub fn from_id(id: u32) -> Option<DType> {
        TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The type with this name (as printed by [`fmt::Display`], case-insensitive).
    pub fn from_name(name: &str) -> Option<DType> {
        TABLE
            .iter()
            .find(|r| r.0.to_string().eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }

    /// The GGML id stored in GGUF.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.row().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().3
    }

    /// Whether kiln can dequantize and compute with this type.
    pub fn is_supported(self) -> bool {
        self.row().4
    }

    /// All types kiln can compute with.
    pub fn supported() -> impl Iterator<Item = DType> {
        TABLE.iter().filter(|r| r.4).map(|r| r.0)
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number
    /// of blocks or the size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

/// Q4_0 rows of a multiple of this many elements go to the GPU re-laid
/// ([`DType::gpu_layout`]).
pub const Q4_0X_SUPER: usize = 256;

impl DType {
    /// The layout of rows of `k` elements of this type in a GPU buffer, as
    /// kernel templates name it in their DTYPE knobs: the GGUF layout
    /// (the type's name), except Q4_0 rows of a multiple of 256 elements,
    /// which are uploaded as "Q4_0X": per 256 elements (eight blocks, 144
    /// bytes, as in GGUF) the eight blocks' 16 nibble bytes first, each
    /// 16-byte aligned, then their eight f16 scales. Row bytes and row
    /// offsets are GGUF's; a kernel loads a block's nibbles as one aligned
    /// 16-byte vector instead of out of unaligned 18-byte blocks (measured
    /// on an H200: an int8 matvec streams at ~3.7 TB/s against ~2.6).
    pub fn gpu_layout(self, k: usize) -> String {
        if self.relaid_on_gpu(k) {
            "Q4_0X".to_string()
        } else {
            self.to_string()
        }
    }

    /// Whether rows of `k` elements of this type go to the GPU re-laid
    /// (Q4_0X).
    fn relaid_on_gpu(self, k: usize) -> bool {
        self == DType::Q4_0 && k.is_multiple_of(Q4_0X_SUPER)
    }

    /// Whole rows of `k` elements of this type (GGUF bytes) in the layout
    /// [`DType::gpu_layout`] names: borrowed where it is GGUF's.
    pub fn to_gpu_layout(self, k: usize, bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
        if !self.relaid_on_gpu(k) {
            return std::borrow::Cow::Borrowed(bytes);
        }
        let mut out = vec![0u8; bytes.len()];
        // 256 elements are 144 bytes in both layouts, so superblocks map
        // one to one whatever the row length.
        for (src, dst) in bytes.chunks(144).zip(out.chunks_mut(144)) {
            for (t, blk) in src.chunks(18).enumerate() {
                dst[16 * t..16 * t + 16].copy_from_slice(&blk[2..18]);
                dst[128 + 2 * t..130 + 2 * t].copy_from_slice(&blk[..2]);
            }
        }
        std::borrow::Cow::Owned(out)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_0X holds each block's bytes once: putting every block's scale
    /// back before its nibbles gives the GGUF rows again; other types and
    /// rows that are not whole 256-element groups stay as they are.
    #[test]
    fn q4_0x_relays_whole_blocks() {
        let k = 512;
        let gguf: Vec<u8> = (0..3 * k / 32 * 18).map(|i| (i * 7 + 3) as u8).collect();
        let x = DType::Q4_0.to_gpu_layout(k, &gguf);
        assert_eq!(DType::Q4_0.gpu_layout(k), "Q4_0X");
        assert_eq!(x.len(), gguf.len());
        let mut back = Vec::new();
        for sb in x.chunks(144) {
            for t in 0..8 {
                back.extend_from_slice(&sb[128 + 2 * t..130 + 2 * t]);
                back.extend_from_slice(&sb[16 * t..16 * t + 16]);
            }
        }
        assert_eq!(back, gguf);
        assert_eq!(DType::Q4_0.gpu_layout(96), "Q4_0");
        assert_eq!(DType::Q4_1.gpu_layout(512), "Q4_1");
        assert!(matches!(
            DType::Q4_0.to_gpu_layout(96, &gguf[..54]),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn table_round_trips_ids_and_names() {
        for r in TABLE {
            assert_eq!(DType::from_id(r.1), Some(r.0));
            assert_eq!(DType::from_name(&r.0.to_string()), Some(r.0));
            assert_eq!(r.0.id(), r.1);
        }
        assert_eq!(DType::from_id(4), None);
        assert_eq!(DType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(DType::Q4_K.bytes_for(100), None);
    }
}
