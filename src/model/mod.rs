//! Model files: GGUF reading, dtype block layouts, CPU dequantization and the
//! tokenizer built from GGUF metadata.

pub mod dequant;
pub mod dtype;
pub mod gguf;
pub mod synth;
pub mod tokenizer;
