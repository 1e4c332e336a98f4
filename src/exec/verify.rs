//! `--verify-replay N`: the recorded, fused decode step beside a freshly
//! planned unfused one. Both run the same greedy tokens; after every step
//! each value both plans store is read back and compared, and the first
//! tensor (in graph order) that differs beyond tolerance is named.

use super::gpu::GpuBackend;
use super::kernel::rel_l2;
use super::GpuContext;
use crate::error::Result;
use crate::graph::ir::{BoundGraph, Kind};
use crate::model::gguf::Gguf;
use crate::plan::FuseOptions;
use crate::session::Backend;

/// Where the two runs first disagree.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// Decode step (0-based).
    pub step: usize,
    /// The value's name in the graph (`x@3`).
    pub value: String,
    /// Relative L2 error of the fused value against the unfused one.
    pub err: f64,
}

/// The outcome of a verification.
#[derive(Debug, Clone)]
pub struct Report {
    /// Decode steps run.
    pub steps: usize,
    /// Value comparisons made.
    pub compared: usize,
    /// Largest relative L2 error seen, and where.
    pub worst: (f64, String),
    /// The tolerance used (1e-4 with f32 arithmetic, 1e-2 with f16, 5e-2
    /// where the fused plan quantizes matmul inputs to int8).
    pub tol: f64,
    /// The first value beyond tolerance, if any.
    pub first: Option<Mismatch>,
    /// Every comparison in order: (step, value name, relative L2 error).
    /// With `keep_going` these run to the last step; else to the end of
    /// the step with the first mismatch.
    pub errors: Vec<(usize, String, f64)>,
}

/// Run `prompt` then `n` greedy decode steps with `fuse` and unfused;
/// stop after the step with the first mismatch unless `keep_going`.
pub fn verify_replay(
    ctx: &GpuContext,
    g: &BoundGraph,
    gguf: &Gguf,
    prompt: &[u32],
    n: usize,
    fuse: &FuseOptions,
    keep_going: bool,
) -> Result<Report> {
    let n_ctx = prompt.len() + n + 1;
    let mut a = GpuBackend::with_fusion(ctx, g, gguf, n_ctx, false, fuse)?;
    // The unfused reference takes no knob pins (not KILN_KNOBS's either):
    // they are for the plan under test, and a role pin matches no kernel
    // of an unfused plan.
    let reference = FuseOptions {
        knob_pins: Some(String::new()),
        ..FuseOptions::none()
    };
    let mut b = GpuBackend::with_fusion(ctx, g, gguf, n_ctx, false, &reference)?;
    a.keep_values(true);
    b.keep_values(true);
    // Int8 matmul inputs (FuseOptions::f32_activations off, long rows)
    // round every product's input to ~0.4%: compared at that scale.
    let int8 = a.plans()[0]
        .kernels
        .iter()
        .any(|k| k.template == "quantize_rows");
    let tol = if int8 {
        5e-2
    } else if ctx.features.f16 {
        1e-2
    } else {
        1e-4
    };
    let mut report = Report {
        steps: 0,
        compared: 0,
        worst: (0.0, String::new()),
        tol,
        first: None,
        errors: Vec::new(),
    };
    a.forward_greedy(prompt)?;
    let mut next = b.forward_greedy(prompt)?;
    for step in 0..n {
        a.forward_greedy(&[next])?;
        let tb = b.forward_greedy(&[next])?;
        report.steps += 1;
        for (v, desc) in g.values.iter().enumerate() {
            if desc.kind != Kind::F32 {
                continue;
            }
            let (Some(x), Some(y)) = (a.read_value(v)?, b.read_value(v)?) else {
                continue;
            };
            let e = rel_l2(&x, &y);
            report.compared += 1;
            report.errors.push((step, desc.name.clone(), e));
            if e > report.worst.0 {
                report.worst = (e, desc.name.clone());
            }
            if e > tol && report.first.is_none() {
                report.first = Some(Mismatch {
                    step,
                    value: desc.name.clone(),
                    err: e,
                });
            }
        }
        if report.first.is_some() && !keep_going {
            break;
        }
        next = tb;
    }
    Ok(report)
}
