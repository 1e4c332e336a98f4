//! The wgpu context: which adapter kiln runs on, which optional features it
//! enables there, and the limits every later stage (codegen, alloc, record)
//! must respect.
//!
//! Choice of adapter: `--adapter NAME` / `KILN_ADAPTER` (a case-insensitive
//! substring of the adapter name), otherwise a discrete GPU, then an
//! integrated one, then a virtual one, then a CPU adapter (Mesa's lavapipe).
//! For the same kind of device Vulkan is preferred over other backends.
//!
//! Features: `--features none|f16|subgroups|all` / `KILN_FEATURES` forces kiln
//! to use less than the adapter offers. The [`FeatureSet`] kiln works with is
//! what the adapter offers intersected with that request, and the device is
//! created with exactly those features, so a kernel that uses more fails
//! validation instead of silently working.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// What a user asks kiln to use of the adapter's optional shader features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FeatureRequest {
    /// Plain f32 kernels, no subgroup operations.
    None,
    /// shader-f16 arithmetic, no subgroup operations.
    F16,
    /// Subgroup operations, no f16.
    Subgroups,
    /// Everything the adapter offers (the default).
    #[default]
    All,
}

impl FeatureRequest {
    /// The four requests, smallest first: every feature set tests run through.
    pub const EVERY: [FeatureRequest; 4] = [
        FeatureRequest::None,
        FeatureRequest::F16,
        FeatureRequest::Subgroups,
        FeatureRequest::All,
    ];

    /// The name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FeatureRequest::None => "none",
            FeatureRequest::F16 => "f16",
            FeatureRequest::Subgroups => "subgroups",
            FeatureRequest::All => "all",
        }
    }

    /// Whether shader-f16 may be used.
    pub fn wants_f16(self) -> bool {
        matches!(self, FeatureRequest::F16 | FeatureRequest::All)
    }

    /// Whether subgroup operations may be used.
    pub fn wants_subgroups(self) -> bool {
        matches!(self, FeatureRequest::Subgroups | FeatureRequest::All)
    }

    /// The request in `KILN_FEATURES`, if set and not empty.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var("KILN_FEATURES") {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map(Some)
                .map_err(|e| Error::Input(format!("KILN_FEATURES: {e}"))),
            _ => Ok(None),
        }
    }
}

impl FromStr for FeatureRequest {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(FeatureRequest::None),
            "f16" => Ok(FeatureRequest::F16),
            "subgroups" => Ok(FeatureRequest::Subgroups),
            "all" => Ok(FeatureRequest::All),
            _ => Err(format!(
                "unknown feature set '{s}': expected one of none, f16, subgroups, all"
            )),
        }
    }
}

impl fmt::Display for FeatureRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Optional features kiln uses: what an adapter offers, or what a device has
/// enabled (offered ∩ requested).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet {
    /// WGSL `enable f16;` (wgpu `SHADER_F16`).
    pub f16: bool,
    /// Subgroup builtins and operations (wgpu `SUBGROUP`).
    pub subgroups: bool,
    /// Smallest subgroup size the adapter may use; 0 when `subgroups` is off.
    pub subgroup_min: u32,
    /// Largest subgroup size the adapter may use; 0 when `subgroups` is off.
    pub subgroup_max: u32,
    /// GPU timestamp queries (wgpu `TIMESTAMP_QUERY`), for timing and tuning.
    pub timestamps: bool,
}

impl FeatureSet {
    /// What an adapter with these features and info offers.
    pub fn offered(features: wgpu::Features, info: &wgpu::AdapterInfo) -> Self {
        let subgroups = features.contains(wgpu::Features::SUBGROUP);
        FeatureSet {
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups,
            subgroup_min: if subgroups { info.subgroup_min_size } else { 0 },
            subgroup_max: if subgroups { info.subgroup_max_size } else { 0 },
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        }
    }

    /// This set restricted to a request.
    ///
    /// Timestamp queries are kept whenever offered: they change no kernel, and
    /// timing (the autotuner) is needed for every feature set.
    pub fn restrict(self, req: FeatureRequest) -> Self {
        let subgroups = self.subgroups && req.wants_subgroups();
        FeatureSet {
            f16: self.f16 && req.wants_f16(),
            subgroups,
            subgroup_min: if subgroups { self.subgroup_min } else { 0 },
            subgroup_max: if subgroups { self.subgroup_max } else { 0 },
            timestamps: self.timestamps,
        }
    }

    /// Whether everything enabled here is also in `other`.
    pub fn is_subset_of(&self, other: &FeatureSet) -> bool {
        (!self.f16 || other.f16)
            && (!self.subgroups
                || (other.subgroups
                    && self.subgroup_min >= other.subgroup_min
                    && self.subgroup_max <= other.subgroup_max))
            && (!self.timestamps || other.timestamps)
    }

    /// The wgpu features to request for this set.
    pub fn wgpu_features(&self) -> wgpu::Features {
        let mut f = wgpu::Features::empty();
        if self.f16 {
            f |= wgpu::Features::SHADER_F16;
        }
        if self.subgroups {
            f |= wgpu::Features::SUBGROUP;
        }
        if self.timestamps {
            f |= wgpu::Features::TIMESTAMP_QUERY;
        }
        f
    }
}

impl fmt::Display for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.f16 {
            parts.push("shader-f16".to_string());
        }
        if self.subgroups {
            if self.subgroup_min == self.subgroup_max {
                parts.push(format!("subgroups (size {})", self.subgroup_min));
            } else {
                parts.push(format!(
                    "subgroups (size {}..{})",
                    self.subgroup_min, self.subgroup_max
                ));
            }
        }
        if self.timestamps {
            parts.push("timestamp queries".to_string());
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// The device limits kiln's kernels, allocator and recorder depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KilnLimits {
    /// Largest range one storage binding may cover, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer, bytes.
    pub max_buffer_size: u64,
    /// Largest range one uniform binding may cover, bytes.
    pub max_uniform_buffer_binding_size: u64,
    /// `var<workgroup>` bytes per workgroup.
    pub max_compute_workgroup_storage_size: u32,
    /// Invocations per workgroup (x*y*z).
    pub max_compute_invocations_per_workgroup: u32,
    /// Workgroup size in x.
    pub max_compute_workgroup_size_x: u32,
    /// Workgroup size in y.
    pub max_compute_workgroup_size_y: u32,
    /// Workgroup size in z.
    pub max_compute_workgroup_size_z: u32,
    /// Workgroups per dispatch dimension.
    pub max_compute_workgroups_per_dimension: u32,
    /// Storage buffers one shader may bind.
    pub max_storage_buffers_per_shader_stage: u32,
    /// Uniform buffers one shader may bind.
    pub max_uniform_buffers_per_shader_stage: u32,
    /// Bindings in one bind group.
    pub max_bindings_per_bind_group: u32,
    /// Bind groups per pipeline.
    pub max_bind_groups: u32,
    /// Alignment of storage binding offsets, bytes.
    pub min_storage_buffer_offset_alignment: u32,
    /// Alignment of uniform binding offsets, bytes.
    pub min_uniform_buffer_offset_alignment: u32,
}

impl KilnLimits {
    /// The kiln-relevant part of wgpu limits.
    pub fn from_wgpu(l: &wgpu::Limits) -> Self {
        KilnLimits {
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_buffer_size: l.max_buffer_size,
            max_uniform_buffer_binding_size: l.max_uniform_buffer_binding_size,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x: l.max_compute_workgroup_size_x,
            max_compute_workgroup_size_y: l.max_compute_workgroup_size_y,
            max_compute_workgroup_size_z: l.max_compute_workgroup_size_z,
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
            max_uniform_buffers_per_shader_stage: l.max_uniform_buffers_per_shader_stage,
            max_bindings_per_bind_group: l.max_bindings_per_bind_group,
            max_bind_groups: l.max_bind_groups,
            min_storage_buffer_offset_alignment: l.min_storage_buffer_offset_alignment,
            min_uniform_buffer_offset_alignment: l.min_uniform_buffer_offset_alignment,
        }
    }

    /// The limits to request from an adapter that has `adapter` limits:
    /// WebGPU defaults (lowered where the adapter has less) for everything
    /// kiln does not use, the adapter's own values for what it does.
    pub fn request(adapter: &wgpu::Limits) -> wgpu::Limits {
        let k = KilnLimits::from_wgpu(adapter);
        wgpu::Limits {
            max_storage_buffer_binding_size: k.max_storage_buffer_binding_size,
            max_buffer_size: k.max_buffer_size,
            max_uniform_buffer_binding_size: k.max_uniform_buffer_binding_size,
            max_compute_workgroup_storage_size: k.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: k.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x: k.max_compute_workgroup_size_x,
            max_compute_workgroup_size_y: k.max_compute_workgroup_size_y,
            max_compute_workgroup_size_z: k.max_compute_workgroup_size_z,
            max_compute_workgroups_per_dimension: k.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_shader_stage: k.max_storage_buffers_per_shader_stage,
            max_uniform_buffers_per_shader_stage: k.max_uniform_buffers_per_shader_stage,
            max_bindings_per_bind_group: k.max_bindings_per_bind_group,
            max_bind_groups: k.max_bind_groups,
            min_storage_buffer_offset_alignment: k.min_storage_buffer_offset_alignment,
            min_uniform_buffer_offset_alignment: k.min_uniform_buffer_offset_alignment,
            ..wgpu::Limits::default().or_worse_values_from(adapter)
        }
    }
}

/// Which adapter and features to use; `None` fields fall back to the
/// environment (`KILN_ADAPTER`, `KILN_FEATURES`), then to the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// Case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// Which optional features kiln may use.
    pub features: Option<FeatureRequest>,
}

impl GpuOptions {
    /// Options that force a feature request (tests), adapter from the environment.
    pub fn with_features(req: FeatureRequest) -> Self {
        GpuOptions {
            adapter: None,
            features: Some(req),
        }
    }

    /// Fill what is unset from `KILN_ADAPTER` and `KILN_FEATURES`.
    pub fn or_env(mut self) -> Result<Self> {
        if self.adapter.as_deref().is_none_or(|a| a.trim().is_empty()) {
            self.adapter = std::env::var("KILN_ADAPTER")
                .ok()
                .filter(|a| !a.trim().is_empty());
        }
        if self.features.is_none() {
            self.features = FeatureRequest::from_env()?;
        }
        Ok(self)
    }

    /// The feature request in effect (default: all).
    pub fn feature_request(&self) -> FeatureRequest {
        self.features.unwrap_or_default()
    }
}

/// One adapter as `kiln devices` shows it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// Name, backend, device type, driver, subgroup sizes, ...
    pub info: wgpu::AdapterInfo,
    /// The optional features kiln could use on it.
    pub offered: FeatureSet,
    /// Its limits that kiln uses.
    pub limits: KilnLimits,
}

impl AdapterSummary {
    fn new(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        AdapterSummary {
            offered: FeatureSet::offered(adapter.features(), &info),
            limits: KilnLimits::from_wgpu(&adapter.limits()),
            info,
        }
    }

    /// "name (backend, device type)".
    pub fn label(&self) -> String {
        format!(
            "{} ({}, {})",
            self.info.name,
            self.info.backend,
            device_type_name(self.info.device_type)
        )
    }
}

/// A short name for a device type.
pub fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete GPU",
        wgpu::DeviceType::IntegratedGpu => "integrated GPU",
        wgpu::DeviceType::VirtualGpu => "virtual GPU",
        wgpu::DeviceType::Cpu => "CPU",
        wgpu::DeviceType::Other => "other",
    }
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan => 0,
        wgpu::Backend::Metal => 1,
        wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 3,
        _ => 4,
    }
}

/// All adapters wgpu finds, best first (the order [`choose_adapter`] prefers).
///
/// Vulkan, Metal and DX12 first; the GL backend only when none of those finds
/// an adapter (it offers neither subgroups nor shader-f16, and probing it
/// prints noise on headless machines). `WGPU_BACKEND=vulkan,gl,...` overrides.
fn enumerate() -> Vec<(wgpu::Adapter, AdapterSummary)> {
    let tiers = match wgpu::Backends::from_env() {
        Some(b) => vec![b],
        None => vec![wgpu::Backends::PRIMARY, wgpu::Backends::SECONDARY],
    };
    for backends in tiers {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let mut all: Vec<_> = adapters
            .into_iter()
            .map(|a| {
                let s = AdapterSummary::new(&a);
                (a, s)
            })
            .collect();
        if !all.is_empty() {
            // Stable: ties keep wgpu's order.
            all.sort_by_key(|(_, s)| (type_rank(s.info.device_type), backend_rank(s.info.backend)));
            return all;
        }
    }
    Vec::new()
}

/// Every adapter wgpu finds, best first: index 0 is the default choice.
pub fn list_adapters() -> Vec<AdapterSummary> {
    enumerate().into_iter().map(|(_, s)| s).collect()
}

/// The message for a machine without any adapter.
fn no_adapter() -> Error {
    let mut msg = String::from(
        "no GPU/Vulkan adapter was found. Install a Vulkan driver: run tools/setup.sh, \
         which installs Mesa's lavapipe (the CPU Vulkan driver, Debian packages \
         mesa-vulkan-drivers and libvulkan1) when no Vulkan driver is present. \
         If a driver is installed, `VK_LOADER_DEBUG=error,warn kiln devices` shows why \
         the Vulkan loader could not use it",
    );
    if let Ok(b) = std::env::var("WGPU_BACKEND") {
        msg += &format!(" (WGPU_BACKEND={b} limits the backends searched)");
    }
    Error::Gpu(msg)
}

/// Which of `adapters` (best first, as [`list_adapters`] returns them) to
/// use: the first whose name contains `name` (case-insensitive), else the first.
pub fn choose_adapter(adapters: &[AdapterSummary], name: Option<&str>) -> Result<usize> {
    if adapters.is_empty() {
        return Err(no_adapter());
    }
    let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok(0);
    };
    let needle = name.to_lowercase();
    adapters
        .iter()
        .position(|a| a.info.name.to_lowercase().contains(&needle))
        .ok_or_else(|| {
            let list: Vec<String> = adapters.iter().map(|a| format!("  {}", a.label())).collect();
            Error::Gpu(format!(
                "no adapter name contains '{name}' (from --adapter or KILN_ADAPTER); adapters found:\n{}",
                list.join("\n")
            ))
        })
}

/// The device kiln runs on, with what it may use there.
pub struct GpuContext {
    /// The logical device, created with exactly `features` and the limits below.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter it was created from.
    pub adapter_info: wgpu::AdapterInfo,
    /// The optional features enabled on `device` (offered ∩ requested).
    pub features: FeatureSet,
    /// The limits enabled on `device`.
    pub limits: KilnLimits,
    /// What the adapter offers, before the request narrowed it.
    pub offered: FeatureSet,
    /// Timestamps may be written between the dispatches of one compute
    /// pass (wgpu `TIMESTAMP_QUERY_INSIDE_PASSES`, requested with
    /// `features.timestamps` where the adapter offers it): profiles then time
    /// each dispatch inside the step's own passes.
    pub timestamps_in_passes: bool,
    /// Uncaptured errors and device loss, newest last, not yet taken.
    errors: Arc<Mutex<Vec<String>>>,
}

impl fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.adapter_info.name)
            .field("backend", &self.adapter_info.backend)
            .field("features", &self.features)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl GpuContext {
    /// Open the adapter and features `opts` select (unset fields come from
    /// `KILN_ADAPTER` / `KILN_FEATURES`, then the defaults).
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let opts = opts.clone().or_env()?;
        let request = opts.feature_request();
        let mut all = enumerate();
        let summaries: Vec<AdapterSummary> = all.iter().map(|(_, s)| s.clone()).collect();
        let i = choose_adapter(&summaries, opts.adapter.as_deref())?;
        let (adapter, summary) = all.swap_remove(i);
        let features = summary.offered.restrict(request);
        let required_limits = KilnLimits::request(&adapter.limits());
        // Changes no kernel, so it is not part of the feature set.
        let timestamps_in_passes = features.timestamps
            && adapter
                .features()
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
        let mut required_features = features.wgpu_features();
        if timestamps_in_passes {
            required_features |= wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features,
            required_limits,
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            Error::Gpu(format!(
                "could not open {} with features [{}]: {e}",
                summary.label(),
                features
            ))
        })?;

        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let msg = format!("GPU error: {e}");
            eprintln!("kiln: {msg}");
            if let Ok(mut v) = sink.lock() {
                v.push(msg);
            }
        }));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if reason == wgpu::DeviceLostReason::Destroyed {
                return;
            }
            let msg = format!("GPU device lost ({reason:?}): {msg}");
            eprintln!("kiln: {msg}");
            if let Ok(mut v) = sink.lock() {
                v.push(msg);
            }
        });

        if summary.info.backend == wgpu::Backend::Gl {
            eprintln!(
                "kiln: note: running on {} through OpenGL: no subgroups or shader-f16 there; \
                 a Vulkan driver is better (tools/setup.sh installs Mesa's lavapipe)",
                summary.info.name
            );
        }
        let limits = KilnLimits::from_wgpu(&device.limits());
        Ok(GpuContext {
            device,
            queue,
            adapter_info: summary.info,
            features,
            limits,
            offered: summary.offered,
            timestamps_in_passes,
            errors,
        })
    }

    /// Open the default (or `KILN_ADAPTER`) adapter with a forced feature request.
    pub fn with_features(req: FeatureRequest) -> Result<Self> {
        Self::new(&GpuOptions::with_features(req))
    }

    /// Take the uncaptured GPU errors seen so far (they were also printed to
    /// stderr when they happened).
    pub fn take_errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// `Err` with every uncaptured GPU error since the last check, if any.
    pub fn check_errors(&self) -> Result<()> {
        let errs = self.take_errors();
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Error::Gpu(errs.join("\n")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_request_parses() {
        for r in FeatureRequest::EVERY {
            assert_eq!(r.name().parse::<FeatureRequest>(), Ok(r));
        }
        assert_eq!(" F16 ".parse::<FeatureRequest>(), Ok(FeatureRequest::F16));
        let e = "fp16".parse::<FeatureRequest>().unwrap_err();
        assert!(e.contains("none, f16, subgroups, all"), "{e}");
    }

    #[test]
    fn restrict_masks_features() {
        let all = FeatureSet {
            f16: true,
            subgroups: true,
            subgroup_min: 8,
            subgroup_max: 8,
            timestamps: true,
        };
        let none = all.restrict(FeatureRequest::None);
        assert!(!none.f16 && !none.subgroups && none.subgroup_min == 0 && none.timestamps);
        assert!(none.is_subset_of(&all));
        let sg = all.restrict(FeatureRequest::Subgroups);
        assert!(!sg.f16 && sg.subgroups && sg.subgroup_max == 8);
        assert_eq!(all.restrict(FeatureRequest::All), all);
        let no_sg = FeatureSet {
            subgroups: false,
            subgroup_min: 0,
            subgroup_max: 0,
            ..all
        };
        assert!(!all.is_subset_of(&no_sg));
        assert!(!no_sg.restrict(FeatureRequest::All).subgroups);
    }

    #[test]
    fn choose_by_name_or_rank() {
        assert!(
            matches!(choose_adapter(&[], None), Err(Error::Gpu(m)) if m.contains("tools/setup.sh"))
        );
        let mk = |name: &str| AdapterSummary {
            info: wgpu::AdapterInfo {
                name: name.into(),
                ..wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan)
            },
            offered: FeatureSet::default(),
            limits: KilnLimits::default(),
        };
        let list = [mk("NVIDIA H100"), mk("llvmpipe (LLVM 15)")];
        assert_eq!(choose_adapter(&list, None).unwrap(), 0);
        assert_eq!(choose_adapter(&list, Some("LLVMPIPE")).unwrap(), 1);
        let e = choose_adapter(&list, Some("radeon"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("radeon") && e.contains("NVIDIA H100") && e.contains("llvmpipe"),
            "{e}"
        );
    }
}
