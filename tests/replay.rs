//! The recorded decode step: after warm-up, decode steps create no GPU
//! object (buffer, bind group, shader module, pipeline), so a step is only
//! uniform writes, encoding from the record, a submit and a small readback.

mod common;

use kiln::exec::gpu::{objects_created, GpuBackend};
use kiln::exec::{FeatureRequest, GpuContext};
use kiln::session::Backend;

#[test]
fn decode_steps_create_no_gpu_objects() {
    let (g, b) = common::tiny_model("llama", 2, 5);
    let ctx = GpuContext::with_features(FeatureRequest::EVERY[3])
        .unwrap_or_else(|e| panic!("no GPU adapter ({e}); run tools/setup.sh"));
    let mut gpu = GpuBackend::new(&ctx, &b, &g, 64, false).unwrap();
    // Warm-up: prefill, one greedy step and one logits step.
    let mut next = gpu.forward_greedy(&[3, 1, 4, 1, 5]).unwrap();
    next = gpu.forward_greedy(&[next]).unwrap();
    gpu.forward(&[next], true).unwrap();
    let before = objects_created();
    assert!(before > 0, "the counter counts nothing");
    let mut ids = Vec::new();
    for _ in 0..32 {
        next = gpu.forward_greedy(&[next]).unwrap();
        ids.push(next);
    }
    assert_eq!(
        objects_created(),
        before,
        "32 decode steps created GPU objects"
    );
    // And the greedy ids are the CPU reference's.
    let mut cpu = kiln::reference::Reference::new(&b, &g, 64).unwrap();
    let mut c = cpu.forward_greedy(&[3, 1, 4, 1, 5]).unwrap();
    c = cpu.forward_greedy(&[c]).unwrap();
    cpu.forward(&[c], true).unwrap();
    let mut want = Vec::new();
    for _ in 0..32 {
        c = cpu.forward_greedy(&[c]).unwrap();
        want.push(c);
    }
    assert_eq!(ids, want, "GPU greedy ids differ from the CPU reference's");
}
