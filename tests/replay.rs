//! The recorded decode step: after warm-up, decode steps create no GPU
//! object (buffer, bind group, shader module, pipeline), so a step is only
//! uniform writes, encoding from the record, a submit and a small readback.

mod common;

use kiln::exec::gpu::{objects_created, GpuBackend};
use kiln::exec::{FeatureRequest, GpuContext};
use kiln::session::Backend;

/// The GPU object counter is process-wide: this file's tests run one at a
/// time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn decode_steps_create_no_gpu_objects() {
    let _serial = serial();
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

/// Greedy decode run a step ahead (each step's token the argmax of the step
/// before, copied on the GPU) gives the CPU reference's ids, creates no GPU
/// object, and when stopped early leaves the position after the last token
/// handed out: decoding on step by step from there continues the sequence.
#[test]
fn greedy_decode_run_ahead_matches_the_reference() {
    let _serial = serial();
    let (g, b) = common::tiny_model("llama", 2, 5);
    let prompt = [3, 1, 4, 1, 5];
    let mut cpu = kiln::reference::Reference::new(&b, &g, 64).unwrap();
    let first = cpu.forward_greedy(&prompt).unwrap();
    let mut want = Vec::new();
    let mut c = first;
    for _ in 0..24 {
        c = cpu.forward_greedy(&[c]).unwrap();
        want.push(c);
    }
    let mut distinct = want.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() >= 3,
        "the reference repeats itself ({want:?}): a stale token would go unseen"
    );

    let ctx = GpuContext::with_features(FeatureRequest::EVERY[3])
        .unwrap_or_else(|e| panic!("no GPU adapter ({e}); run tools/setup.sh"));
    let mut gpu = GpuBackend::new(&ctx, &b, &g, 64, false).unwrap();
    assert_eq!(gpu.forward_greedy(&prompt).unwrap(), first);
    let mut got = Vec::new();
    gpu.decode_greedy(first, 24, &mut |t| {
        got.push(t);
        Ok(true)
    })
    .unwrap();
    assert_eq!(
        got, want,
        "run-ahead greedy ids differ from the reference's"
    );

    // Stopped after 5 tokens (one step was in flight), then step by step;
    // the decode bucket is warm now, so nothing may be created.
    gpu.reset();
    assert_eq!(gpu.forward_greedy(&prompt).unwrap(), first);
    let before = objects_created();
    let mut got = Vec::new();
    gpu.decode_greedy(first, 24, &mut |t| {
        got.push(t);
        Ok(got.len() < 5)
    })
    .unwrap();
    let mut next = *got.last().unwrap();
    while got.len() < want.len() {
        next = gpu.forward_greedy(&[next]).unwrap();
        got.push(next);
    }
    assert_eq!(got, want, "decoding on after an early stop went wrong");
    assert_eq!(
        objects_created(),
        before,
        "run-ahead decode created GPU objects"
    );
}

/// Run-ahead greedy decode into the end of the context hands out every
/// token that fits, then the context error, as step-by-step decoding does
/// (the CPU reference, through the trait's default).
#[test]
fn greedy_decode_run_ahead_stops_at_the_context_end() {
    let _serial = serial();
    let (g, b) = common::tiny_model("llama", 2, 5);
    let prompt = [3, 1, 4, 1, 5];
    let n_ctx = 12;
    let run = |be: &mut dyn Backend| {
        let first = be.forward_greedy(&prompt).unwrap();
        let mut got = Vec::new();
        let r = be.decode_greedy(first, 20, &mut |t| {
            got.push(t);
            Ok(true)
        });
        (got, r.map_err(|e| e.to_string()))
    };
    let mut cpu = kiln::reference::Reference::new(&b, &g, n_ctx).unwrap();
    let (want, want_r) = run(&mut cpu);
    let ctx = GpuContext::with_features(FeatureRequest::EVERY[3])
        .unwrap_or_else(|e| panic!("no GPU adapter ({e}); run tools/setup.sh"));
    let mut gpu = GpuBackend::new(&ctx, &b, &g, n_ctx, false).unwrap();
    let (got, got_r) = run(&mut gpu);
    assert_eq!(
        want.len(),
        n_ctx - prompt.len(),
        "the reference ran {want:?}"
    );
    assert_eq!(got, want);
    let (Err(w), Err(e)) = (&want_r, &got_r) else {
        panic!("expected the context error from both: {want_r:?} / {got_r:?}");
    };
    assert!(e.contains("context") && w.contains("context"), "{e} / {w}");
}
