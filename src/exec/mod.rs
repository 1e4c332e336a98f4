//! The GPU executor: wgpu context (adapter, features, limits); later the
//! pipeline cache, stream record/replay, KV cache and readback.

pub mod bench;
pub mod context;
pub mod gpu;
pub mod kernel;

pub use context::{
    choose_adapter, list_adapters, AdapterSummary, FeatureRequest, FeatureSet, GpuContext,
    GpuOptions, KilnLimits,
};
