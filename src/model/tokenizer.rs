//! Tokenizer (being written by a helper; this stub keeps the crate building).

/// Tokenizer error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerError(pub String);
