//! Measurements: the streaming-read roof of the adapter, the cost of a
//! dependent dispatch, and timing helpers for `kiln bench`.

use std::time::Instant;

use super::kernel::{self, Kernel};
use super::GpuContext;
use crate::error::{Error, Result};

const ROOF_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let threads = nwg.x * 256u;
    var acc = vec4<f32>(0.0);
    for (var i = gid.x; i < arrayLength(&x); i += threads) {
        acc += x[i];
    }
    y[gid.x] = acc.x + acc.y + acc.z + acc.w;
}
"#;

// One step of a dependent chain: each dispatch reads what the previous one
// wrote, so the GPU runs them one after another with a barrier between, as
// a decode step's kernels do; each workgroup writes one word.
const CHAIN_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    if lid == 0u {
        y[wg.x + 1u] = y[0] + 1.0;
    }
    if wg.x == 0u && lid == 0u {
        y[0] = y[1];
    }
}
"#;

/// A kernel with no bindings: consecutive dispatches of it share no
/// resource, so wgpu puts no barrier between them.
const FREE_WGSL: &str = r#"
@compute @workgroup_size(256)
fn main() {}
"#;

/// Wait until the GPU has finished everything submitted.
pub fn finish(ctx: &GpuContext) -> Result<()> {
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
    Ok(())
}

/// Streaming-read bandwidth in bytes/s: a plain kernel summing vec4<f32>
/// over a buffer of up to 1 GiB (less if the adapter binds less); best of
/// `reps` timed runs after one warm-up. Where the buffer is large enough
/// that no cache holds it (512 MiB or more) each submission reads it four
/// times, so that the submit and wait (~0.1 ms) weigh a quarter as much.
/// A GPU error (e.g. no memory left for the buffer) is an error, never a
/// fast run. Returns (bytes read per pass, bytes/s).
pub fn read_roof(ctx: &GpuContext, reps: usize) -> Result<(u64, f64)> {
    let bytes = (1u64 << 30)
        .min(ctx.limits.max_storage_buffer_binding_size)
        .min(ctx.limits.max_buffer_size)
        / 16
        * 16;
    let passes: u32 = if bytes >= 512 << 20 { 4 } else { 1 };
    ctx.check_errors()?;
    let x = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("roof"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let groups = 4096u32;
    let y = kernel::poisoned(ctx, "roof out", groups as usize * 256);
    crate::codegen::validate(ROOF_WGSL, &kernel::caps(ctx)).map_err(Error::Gpu)?;
    let k = Kernel::from_wgsl(ctx, "read_roof", ROOF_WGSL.to_string());
    let bind = k.bind(ctx, &[&x, &y]);
    let mut best = f64::INFINITY;
    for i in 0..=reps {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for _ in 0..passes {
            k.dispatch(&mut enc, &bind, [groups, 1, 1]);
        }
        let t = Instant::now();
        ctx.queue.submit([enc.finish()]);
        finish(ctx)?;
        if i > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    ctx.check_errors()
        .map_err(|e| Error::Gpu(format!("measuring the read roof: {e}")))?;
    Ok((bytes, (bytes * u64::from(passes)) as f64 / best))
}

/// GPU time per dispatch of a chain of dependent dispatches in one compute
/// pass (what wgpu and the driver add between two kernels: barrier, launch,
/// drain), for a grid of `groups` workgroups of 256 invocations that do
/// almost nothing: the best of `reps` runs of 512 dispatches less the best
/// of `reps` runs of 16, per dispatch. With `dependent` false the kernel
/// has no bindings, so no barrier separates the dispatches: the
/// difference is what the barrier costs. Returns seconds (never negative).
pub fn dispatch_cost(ctx: &GpuContext, groups: u32, reps: usize, dependent: bool) -> Result<f64> {
    let wgsl = if dependent { CHAIN_WGSL } else { FREE_WGSL };
    crate::codegen::validate(wgsl, &kernel::caps(ctx)).map_err(Error::Gpu)?;
    let k = Kernel::from_wgsl(ctx, "dispatch_chain", wgsl.to_string());
    let bind = if dependent {
        let y = kernel::storage(
            ctx,
            "chain",
            bytemuck::cast_slice(&vec![0f32; groups as usize + 1]),
        );
        Some(k.bind(ctx, &[&y]))
    } else {
        None
    };
    let run = |n: usize| -> Result<f64> {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for _ in 0..n {
                pass.set_pipeline(&k.pipeline);
                if let Some(bind) = &bind {
                    pass.set_bind_group(0, bind, &[]);
                }
                pass.dispatch_workgroups(groups, 1, 1);
            }
        }
        let buf = enc.finish();
        let t = Instant::now();
        ctx.queue.submit([buf]);
        finish(ctx)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let (long, short) = (512usize, 16usize);
    run(long)?;
    // Each chain length's best run: one slow short run must not make the
    // difference small.
    let (mut t_long, mut t_short) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps.max(1) {
        t_long = t_long.min(run(long)?);
        t_short = t_short.min(run(short)?);
    }
    Ok(((t_long - t_short) / (long - short) as f64).max(0.0))
}
