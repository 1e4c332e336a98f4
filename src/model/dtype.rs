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

/// The layouts kiln re-lays weights into at upload, so that kernels read
/// aligned 16-byte fields: (GGUF type, layout name as DTYPE knobs spell
/// it, elements per re-laid group; rows of a multiple of it are re-laid).
/// A group's bytes are GGUF's bytes for the same elements, so row sizes and
/// offsets do not change.
pub const GPU_LAYOUTS: [(DType, &str, usize); 2] =
    [(DType::Q4_0, "Q4_0X", 256), (DType::Q6_K, "Q6_KX", 2048)];

impl DType {
    /// The layout of rows of `k` elements of this type in a GPU buffer, as
    /// kernel templates name it in their DTYPE knobs: the GGUF layout
    /// (the type's name), except where [`GPU_LAYOUTS`] re-lays the rows
    /// (measured on an H200: an int8 matvec over aligned 16-byte fields
    /// streams at ~3.7 TB/s, over GGUF's unaligned blocks ~2.6):
    ///
    /// - "Q4_0X", Q4_0 rows of whole 256-element groups: per group (eight
    ///   blocks, 144 bytes) the eight blocks' 16 nibble bytes first, each
    ///   16-byte aligned, then their eight f16 scales;
    /// - "Q6_KX", Q6_K rows of whole 2048-element groups: per group (eight
    ///   super-blocks, 1680 bytes) the eight 128-byte `ql` fields, then the
    ///   eight 64-byte `qh`, the eight 16-byte int8 `scales` and the eight
    ///   f16 `d` (offsets 128t, 1024 + 64t, 1536 + 16t, 1664 + 2t for
    ///   super-block t).
    pub fn gpu_layout(self, k: usize) -> String {
        match self.relaid_on_gpu(k) {
            Some(name) => name.to_string(),
            None => self.to_string(),
        }
    }

    /// The re-laid layout rows of `k` elements of this type go to the GPU
    /// in, if any.
    fn relaid_on_gpu(self, k: usize) -> Option<&'static str> {
        GPU_LAYOUTS
            .iter()
            .find(|(d, _, group)| *d == self && k.is_multiple_of(*group))
            .map(|r| r.1)
    }

    /// The GGUF type a GPU layout name ([`DType::gpu_layout`]) holds, and
    /// the elements per re-laid group (1 for GGUF layouts).
    pub fn from_gpu_layout(name: &str) -> Option<(DType, usize)> {
        match GPU_LAYOUTS.iter().find(|r| r.1 == name) {
            Some(r) => Some((r.0, r.2)),
            None => DType::from_name(name).map(|d| (d, 1)),
        }
    }

    /// Whole rows of `k` elements of this type (GGUF bytes) in the layout
    /// [`DType::gpu_layout`] names: borrowed where it is GGUF's.
    pub fn to_gpu_layout(self, k: usize, bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
        let Some(name) = self.relaid_on_gpu(k) else {
            return std::borrow::Cow::Borrowed(bytes);
        };
        let mut out = vec![0u8; bytes.len()];
        // A group is the same bytes in both layouts, so groups map one to
        // one whatever the row length. Each field list is (offset in the
        // GGUF block, length); the re-laid group holds field f of all eight
        // blocks together, in the order of the list.
        let (block, fields): (usize, &[(usize, usize)]) = match name {
            "Q4_0X" => (18, &[(2, 16), (0, 2)]),
            _ => (210, &[(0, 128), (128, 64), (192, 16), (208, 2)]),
        };
        for (src, dst) in bytes.chunks(8 * block).zip(out.chunks_mut(8 * block)) {
            let mut at = 0;
            for &(off, len) in fields {
                for blk in src.chunks(block) {
                    dst[at..at + len].copy_from_slice(&blk[off..off + len]);
                    at += len;
                }
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

    /// Q6_KX holds each super-block's bytes once, at the offsets
    /// gpu_layout documents; rows that are not whole 2048-element groups
    /// stay GGUF's.
    #[test]
    fn q6_kx_relays_whole_groups() {
        let k = 4096;
        let gguf: Vec<u8> = (0..2 * k / 256 * 210).map(|i| (i * 13 + 5) as u8).collect();
        assert_eq!(DType::Q6_K.gpu_layout(k), "Q6_KX");
        let x = DType::Q6_K.to_gpu_layout(k, &gguf);
        assert_eq!(x.len(), gguf.len());
        let mut back = Vec::new();
        for g in x.chunks(1680) {
            for t in 0..8 {
                back.extend_from_slice(&g[128 * t..128 * t + 128]);
                back.extend_from_slice(&g[1024 + 64 * t..1088 + 64 * t]);
                back.extend_from_slice(&g[1536 + 16 * t..1552 + 16 * t]);
                back.extend_from_slice(&g[1664 + 2 * t..1666 + 2 * t]);
            }
        }
        assert_eq!(back, gguf);
        assert_eq!(DType::Q6_K.gpu_layout(1024), "Q6_K");
        assert_eq!(DType::from_gpu_layout("Q6_KX"), Some((DType::Q6_K, 2048)));
        assert_eq!(DType::from_gpu_layout("Q6_K"), Some((DType::Q6_K, 1)));
        assert_eq!(DType::from_gpu_layout("Q6_KY"), None);
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
