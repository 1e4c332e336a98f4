//! The GPU executor: wgpu context (adapter, features, limits), the recorded
//! per-bucket launches with their arenas and KV cache, readback, and the
//! replay verifier.

pub mod bench;
pub mod context;
pub mod gpu;
pub mod kernel;
pub mod verify;

pub use context::{
    choose_adapter, list_adapters, AdapterSummary, FeatureRequest, FeatureSet, GpuContext,
    GpuOptions, KilnLimits,
};
