//! kiln's error type: every failure a user can cause, with what to do.

use crate::graph::GraphError;
use crate::model::dequant::DequantError;
use crate::model::gguf::GgufError;
use crate::model::tokenizer::TokenizerError;

/// Any kiln error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file problem.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A graph file problem.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// A tokenizer problem.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A weight that cannot be dequantized.
    #[error(transparent)]
    Dequant(#[from] DequantError),
    /// Bad input at run time (token out of range, context exceeded, ...).
    #[error("{0}")]
    Input(String),
    /// No usable GPU adapter, a device request that failed, or a GPU error.
    #[error("{0}")]
    Gpu(String),
}

/// kiln's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
