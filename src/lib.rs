//! kiln: a graph-compiled kernel runtime.
//!
//! A model architecture is a RON op-graph ([`graph`]); a GGUF file ([`model`])
//! binds it to weights and hyperparameters; the CPU [`reference`] interpreter
//! runs the bound graph and is the oracle every GPU kernel is checked against.

pub mod alloc;
pub mod codegen;
pub mod error;
pub mod exec;
pub mod graph;
pub mod model;
pub mod plan;
pub mod reference;
pub mod session;
