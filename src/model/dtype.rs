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

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
