//! Per op × variant × feature set × shape class: the GPU kernel equals the
//! CPU reference on fresh random inputs with a poisoned output buffer, by
//! relative L2 error ≤ 1e-4 (f32 arithmetic).

mod common;

use common::*;
use kiln::codegen::{self, variant_name};
use kiln::exec::kernel::{self, caps, rel_l2, Kernel};
use kiln::reference::ops;

#[test]
fn rms_norm_all_variants() {
    let mut rng = Rng(fresh_seed());
    let t = codegen::template("rms_norm").unwrap();
    for ctx in gpu_contexts() {
        for knobs in t.variants(&caps(&ctx)).unwrap() {
            let k = Kernel::build(&ctx, &t, &knobs).unwrap();
            // Shape classes: one row and many; d not a multiple of WG.
            for (rows, d, with_w) in [(1, 576, true), (7, 100, true), (3, 640, false)] {
                let x = rng.vec(rows * d);
                let w = rng.vec(d);
                let eps = 1e-5;
                let want = ops::rms_norm(&x, d, with_w.then_some(&w[..]), eps);
                let xb = kernel::storage(&ctx, "x", bytemuck::cast_slice(&x));
                let wb = kernel::storage(&ctx, "w", bytemuck::cast_slice(&w));
                let yb = kernel::poisoned(&ctx, "y", rows * d);
                let pb = kernel::uniform(
                    &ctx,
                    "p",
                    &[d as u32, rows as u32, (eps as f32).to_bits(), with_w as u32],
                );
                let bind = k.bind(&ctx, &[&xb, &wb, &yb, &pb]);
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                k.dispatch(&mut enc, &bind, [rows as u32, 1, 1]);
                ctx.queue.submit([enc.finish()]);
                let got = kernel::read_f32(&ctx, &yb, rows * d).unwrap();
                let err = rel_l2(&got, &want);
                assert!(
                    err <= 1e-4,
                    "{} on {:?} rows {rows} d {d}: rel L2 {err:e}",
                    variant_name(&t.name, &knobs),
                    ctx.features
                );
            }
        }
    }
}
