//! Building and running single kernels: a generated WGSL variant becomes a
//! pipeline; buffers are uploaded, bound in order and read back. The plan
//! executor and the per-op GPU tests both use this.

use wgpu::util::DeviceExt;

use super::GpuContext;
use crate::codegen::{Caps, CodegenError, Knobs, Template};
use crate::error::{Error, Result};

/// What codegen may use on this context.
pub fn caps(ctx: &GpuContext) -> Caps {
    Caps {
        f16: ctx.features.f16,
        subgroups: ctx.features.subgroups,
        max_invocations: ctx.limits.max_compute_invocations_per_workgroup,
        max_wg_storage: ctx.limits.max_compute_workgroup_storage_size,
    }
}

/// A compiled kernel variant.
pub struct Kernel {
    /// `template.knob-values`, for labels and messages.
    pub name: String,
    /// The generated WGSL.
    pub wgsl: String,
    /// The pipeline (bind group 0 layout derived from the shader).
    pub pipeline: wgpu::ComputePipeline,
}

impl Kernel {
    /// Generate, validate with naga, and compile a template variant.
    pub fn build(ctx: &GpuContext, t: &Template, knobs: &Knobs) -> Result<Kernel> {
        let caps = caps(ctx);
        if !t.legal(knobs, &caps).map_err(cg)? {
            return Err(Error::Gpu(format!(
                "kernel {} [{}] cannot run on this adapter/feature set",
                t.name,
                crate::codegen::knobs_str(knobs)
            )));
        }
        let wgsl = t.build(knobs, &caps).map_err(cg)?;
        let name = crate::codegen::variant_name(&t.name, knobs);
        Ok(Self::from_wgsl(ctx, &name, wgsl))
    }

    /// Compile WGSL that naga has already validated (without wgpu's injected
    /// bounds checks and loop counters unless KILN_SHADER_CHECKS=1).
    pub fn from_wgsl(ctx: &GpuContext, name: &str, wgsl: String) -> Kernel {
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(wgsl.as_str().into()),
        };
        let module = if shader_checks() {
            ctx.device.create_shader_module(desc)
        } else {
            let mut checks = wgpu::ShaderRuntimeChecks::checked();
            checks.bounds_checks = false;
            checks.force_loop_bounding = false;
            // SAFETY: kiln's kernels come from its own templates, validated
            // by naga; every loop is bounded by plan shapes, and every
            // index is derived from the bound buffers' shapes (user token
            // ids are range-checked on the host before upload). Without
            // wgpu's injected checks each storage access costs a length
            // clamp and each loop a hidden counter, which kept the
            // per-row loops from unrolling (see docs/PERF.md).
            unsafe { ctx.device.create_shader_module_trusted(desc, checks) }
        };
        let pipeline = ctx
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        Kernel {
            name: name.to_string(),
            wgsl,
            pipeline,
        }
    }

    /// A bind group over `buffers`, bound at 0, 1, 2, ... in order.
    pub fn bind(&self, ctx: &GpuContext, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.name),
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// A bind group over `(binding, buffer)` pairs (bindings a variant does
    /// not declare are left out).
    pub fn bind_at(&self, ctx: &GpuContext, buffers: &[(u32, &wgpu::Buffer)]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: *i,
                resource: b.as_entire_binding(),
            })
            .collect();
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.name),
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// Record one dispatch.
    pub fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        bind: &wgpu::BindGroup,
        groups: [u32; 3],
    ) {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(&self.name),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, bind, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }
}

fn cg(e: CodegenError) -> Error {
    Error::Gpu(e.to_string())
}

/// Spread `n` workgroups over x and y so neither exceeds `max` (65535 on
/// most adapters); kernels recover the linear index as
/// `wg.x + wg.y * num_workgroups.x` and return when it is ≥ n.
pub fn spread(n: u32, max: u32) -> [u32; 3] {
    if n <= max {
        [n.max(1), 1, 1]
    } else {
        let y = n.div_ceil(max);
        [n.div_ceil(y), y, 1]
    }
}

/// A storage buffer holding `bytes` (padded to 4 bytes), usable as a copy
/// source and destination.
pub fn storage(ctx: &GpuContext, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let mut padded;
    let contents = if !bytes.len().is_multiple_of(4) || bytes.is_empty() {
        padded = bytes.to_vec();
        padded.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
        &padded[..]
    } else {
        bytes
    };
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        })
}

/// A storage buffer of `n` f32 filled with NaN (to catch unwritten outputs).
pub fn poisoned(ctx: &GpuContext, label: &str, n: usize) -> wgpu::Buffer {
    storage(ctx, label, bytemuck::cast_slice(&vec![f32::NAN; n.max(1)]))
}

/// A uniform buffer of 32-bit words (f32 values go in as `to_bits()`),
/// padded to 16 bytes.
pub fn uniform(ctx: &GpuContext, label: &str, words: &[u32]) -> wgpu::Buffer {
    let mut w = words.to_vec();
    w.resize(words.len().div_ceil(4).max(1) * 4, 0);
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(&w),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
}

/// Copy `bytes` bytes from the start of `buf` back to the CPU (waits).
pub fn read_bytes(ctx: &GpuContext, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
    let size = bytes.div_ceil(4) * 4;
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, size);
    ctx.queue.submit([enc.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Gpu(format!("reading back a buffer: {e}"))),
        Err(_) => return Err(Error::Gpu("reading back a buffer: no answer".into())),
    }
    let errors = ctx.take_errors();
    if !errors.is_empty() {
        return Err(Error::Gpu(errors.join("; ")));
    }
    let v = staging
        .get_mapped_range(..)
        .map_err(|e| Error::Gpu(format!("mapping a buffer: {e:?}")))?
        .to_vec();
    staging.unmap();
    Ok(v[..bytes as usize].to_vec())
}

/// Map a MAP_READ buffer the caller has already copied into and submitted,
/// wait, and take its first `n` f32 (the buffer is unmapped again, so it
/// can be reused for the next step).
pub fn read_mapped(ctx: &GpuContext, staging: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
    let mut v = vec![0f32; n];
    read_mapped_into(ctx, staging, &mut v)?;
    Ok(v)
}

/// Fill `out` from the start of the MAP_READ buffer `staging` (after the
/// submit that wrote it) without allocating in kiln: the map callback
/// answers through a flag made once per thread and reused (0: no answer,
/// 1: mapped, 2: failed); the blocking poll runs the callback before it
/// returns.
pub fn read_mapped_into<T: bytemuck::Pod>(
    ctx: &GpuContext,
    staging: &wgpu::Buffer,
    out: &mut [T],
) -> Result<()> {
    read_mapped_after(ctx, staging, out, None)
}

/// As [`read_mapped_into`], waiting only for submission `after` (None: for
/// everything submitted), so that later submissions may still run.
pub fn read_mapped_after<T: bytemuck::Pod>(
    ctx: &GpuContext,
    staging: &wgpu::Buffer,
    out: &mut [T],
    after: Option<wgpu::SubmissionIndex>,
) -> Result<()> {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    let bytes = std::mem::size_of_val(out) as u64;
    thread_local! {
        static STATE: Arc<AtomicU8> = Arc::new(AtomicU8::new(0));
    }
    let state = STATE.with(Arc::clone);
    state.store(0, Ordering::SeqCst);
    let answer = Arc::clone(&state);
    staging.map_async(wgpu::MapMode::Read, ..bytes.max(4), move |r| {
        answer.store(if r.is_ok() { 1 } else { 2 }, Ordering::SeqCst);
    });
    ctx.device
        .poll(wgpu::PollType::Wait {
            submission_index: after,
            timeout: None,
        })
        .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
    match state.load(Ordering::SeqCst) {
        1 => {}
        2 => return Err(Error::Gpu("reading back a buffer: mapping failed".into())),
        _ => return Err(Error::Gpu("reading back a buffer: no answer".into())),
    }
    let errors = ctx.take_errors();
    if !errors.is_empty() {
        // Mapped: unmap, so that the buffer can be used again.
        staging.unmap();
        return Err(Error::Gpu(errors.join("; ")));
    }
    {
        let view = staging
            .get_mapped_range(..bytes.max(4))
            .map_err(|e| Error::Gpu(format!("mapping a buffer: {e:?}")))?;
        bytemuck::cast_slice_mut::<T, u8>(out).copy_from_slice(&view[..bytes as usize]);
    }
    staging.unmap();
    Ok(())
}

/// Read `n` f32 from the start of `buf`.
pub fn read_f32(ctx: &GpuContext, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
    let b = read_bytes(ctx, buf, n as u64 * 4)?;
    Ok(bytemuck::pod_collect_to_vec(&b))
}

/// Relative L2 error ‖a − b‖ / ‖b‖ (NaN anywhere gives infinity).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Whether generated kernels keep wgpu's injected runtime checks (bounds
/// clamps on every storage access, a counter in every loop):
/// `KILN_SHADER_CHECKS=1` turns them back on, to tell a kernel indexing bug
/// from a driver problem.
pub fn shader_checks() -> bool {
    std::env::var("KILN_SHADER_CHECKS").is_ok_and(|v| v == "1")
}
