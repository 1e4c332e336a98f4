//! The wgpu context on whatever adapter this machine has (lavapipe in CI):
//! every feature request opens a device with a subset of what the adapter
//! offers, and tiny compute shaders (plain f32, shader-f16, subgroupAdd) agree
//! with the CPU on fresh random inputs written into NaN-poisoned outputs.
//!
//! There is no skip: a machine without any adapter fails here, and the
//! message says to run tools/setup.sh (which installs Mesa's lavapipe).
//!
//! Tolerance: relative L2 error ≤ 1e-6 for every check. The f16 check compares
//! with a CPU reference that rounds to f16 exactly where the shader does, so
//! the same bound applies to it.

use half::f16;
use kiln::exec::{list_adapters, FeatureRequest, GpuContext};
use wgpu::util::DeviceExt;

const N: usize = 1000;
const WG: u32 = 64;
const TOL: f64 = 1e-6;

fn open(req: FeatureRequest) -> GpuContext {
    GpuContext::with_features(req)
        .unwrap_or_else(|e| panic!("could not open a GPU context with --features {req}: {e}"))
}

/// splitmix64, seeded from the clock unless KILN_TEST_SEED is set.
struct Rng(u64);

impl Rng {
    fn fresh(what: &str) -> Self {
        let seed = std::env::var("KILN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{what}: KILN_TEST_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let err: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (err / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    if let Some(i) = got.iter().position(|g| !g.is_finite()) {
        panic!(
            "{what}: element {i} is {} (the poison was not overwritten)",
            got[i]
        );
    }
    let e = rel_l2(got, want);
    assert!(e <= TOL, "{what}: relative L2 error {e:e} > {TOL:e}");
}

/// Run `wgsl` (entry point `main`, bind group 0) over `N` invocations.
/// `inputs` are bound read-only at 0.., then each of `outputs` (bytes,
/// initial contents = the poison) read-write after them; returns the outputs.
fn run(ctx: &GpuContext, wgsl: &str, inputs: &[&[u8]], outputs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let dev = &ctx.device;
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("gpu_context test"),
        source: wgpu::ShaderSource::Wgsl(wgsl.into()),
    });
    let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let usage_in = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let usage_out = usage_in | wgpu::BufferUsages::COPY_SRC;
    let ins: Vec<wgpu::Buffer> = inputs
        .iter()
        .map(|b| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: b,
                usage: usage_in,
            })
        })
        .collect();
    let outs: Vec<wgpu::Buffer> = outputs
        .iter()
        .map(|b| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: b,
                usage: usage_out,
            })
        })
        .collect();
    let entries: Vec<wgpu::BindGroupEntry> = ins
        .iter()
        .chain(&outs)
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let staging: Vec<wgpu::Buffer> = outputs
        .iter()
        .map(|b| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: b.len() as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
        .collect();
    let mut enc = dev.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups((N as u32).div_ceil(WG), 1, 1);
    }
    for (o, s) in outs.iter().zip(&staging) {
        enc.copy_buffer_to_buffer(o, 0, s, 0, o.size());
    }
    ctx.queue.submit([enc.finish()]);
    for s in &staging {
        s.map_async(wgpu::MapMode::Read, .., |r| r.expect("map staging buffer"));
    }
    dev.poll(wgpu::PollType::wait_indefinitely())
        .expect("wait for the GPU");
    ctx.check_errors().expect("no uncaptured GPU errors");
    staging
        .iter()
        .map(|s| {
            let v = s.get_mapped_range(..).expect("read mapped range").to_vec();
            s.unmap();
            v
        })
        .collect()
}

fn nan_f32(n: usize) -> Vec<u8> {
    bytemuck::cast_slice(&vec![f32::NAN; n]).to_vec()
}

fn to_f64_f32(bytes: &[u8]) -> Vec<f64> {
    bytemuck::cast_slice::<u8, f32>(bytes)
        .iter()
        .map(|&v| v as f64)
        .collect()
}

#[test]
fn every_feature_request_opens_a_subset_of_the_adapter() {
    let adapters = list_adapters();
    assert!(
        !adapters.is_empty(),
        "no GPU/Vulkan adapter found: run tools/setup.sh (it installs Mesa's lavapipe)"
    );
    for req in FeatureRequest::EVERY {
        let ctx = open(req);
        let f = ctx.features;
        eprintln!(
            "--features {req}: {} [{}]: enabled {f}; offered {}",
            ctx.adapter_info.name, ctx.adapter_info.backend, ctx.offered
        );
        assert!(
            f.is_subset_of(&ctx.offered),
            "{req}: {f:?} ⊄ {:?}",
            ctx.offered
        );
        // The device has exactly the features kiln meant to enable: the
        // set's, and timestamps inside passes (for profiles) only with
        // timestamps.
        let mut want = f.wgpu_features();
        if ctx.timestamps_in_passes {
            assert!(
                f.timestamps,
                "{req}: timestamps inside passes without timestamps"
            );
            want |= wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        }
        assert_eq!(ctx.device.features(), want, "{req}");
        assert_eq!(f.f16, ctx.offered.f16 && req.wants_f16(), "{req}");
        assert_eq!(
            f.subgroups,
            ctx.offered.subgroups && req.wants_subgroups(),
            "{req}"
        );
        if req == FeatureRequest::None {
            assert!(!f.f16 && !f.subgroups, "none enabled {f}");
        }
        if f.subgroups {
            // From the adapter, never assumed.
            assert_eq!(f.subgroup_min, ctx.adapter_info.subgroup_min_size);
            assert_eq!(f.subgroup_max, ctx.adapter_info.subgroup_max_size);
            assert!(f.subgroup_min >= 1 && f.subgroup_min <= f.subgroup_max);
        } else {
            assert_eq!((f.subgroup_min, f.subgroup_max), (0, 0));
        }
        // The limits kiln uses are the adapter's own.
        let a = adapters
            .iter()
            .find(|a| a.info == ctx.adapter_info)
            .expect("the chosen adapter is listed");
        assert_eq!(ctx.limits, a.limits, "{req}");
        assert!(ctx.limits.max_storage_buffer_binding_size <= ctx.limits.max_buffer_size);
    }
}

#[test]
fn f32_compute_matches_cpu_in_every_feature_set() {
    let wgsl = "
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    if (i < arrayLength(&x)) {
        y[i] = x[i] * 2.0 + 1.0;
    }
}
";
    for req in FeatureRequest::EVERY {
        let ctx = open(req);
        let mut rng = Rng::fresh(&format!("f32 y = 2x + 1, --features {req}"));
        let x: Vec<f32> = (0..N).map(|_| rng.f32()).collect();
        let out = run(&ctx, wgsl, &[bytemuck::cast_slice(&x)], &[nan_f32(N)]);
        let want: Vec<f64> = x.iter().map(|&v| (v * 2.0 + 1.0) as f64).collect();
        assert_close(
            &format!("f32, --features {req}"),
            &to_f64_f32(&out[0]),
            &want,
        );
    }
}

#[test]
fn f16_compute_matches_cpu_when_enabled() {
    // f16 storage in and out, f16 arithmetic in between.
    let wgsl = "
enable f16;

@group(0) @binding(0) var<storage, read> x: array<f16>;
@group(0) @binding(1) var<storage, read_write> y: array<f16>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = g.x;
    if (i < arrayLength(&x)) {
        y[i] = x[i] * 2.0h + 1.0h;
    }
}
";
    let mut ran = false;
    for req in [FeatureRequest::F16, FeatureRequest::All] {
        let ctx = open(req);
        if !ctx.features.f16 {
            assert!(
                !ctx.offered.f16,
                "--features {req} did not enable offered f16"
            );
            eprintln!(
                "--features {req}: {} offers no shader-f16",
                ctx.adapter_info.name
            );
            continue;
        }
        let mut rng = Rng::fresh(&format!("f16 y = 2x + 1, --features {req}"));
        let x: Vec<f16> = (0..N).map(|_| f16::from_f32(rng.f32())).collect();
        let bits: Vec<u16> = x.iter().map(|v| v.to_bits()).collect();
        let poison = vec![f16::NAN.to_bits(); N];
        let out = run(
            &ctx,
            wgsl,
            &[bytemuck::cast_slice(&bits)],
            &[bytemuck::cast_slice(&poison).to_vec()],
        );
        let got: Vec<f64> = bytemuck::cast_slice::<u8, u16>(&out[0])
            .iter()
            .map(|&b| f16::from_bits(b).to_f64())
            .collect();
        // x*2 is exact in f16; the + 1 rounds once to f16.
        let want: Vec<f64> = x
            .iter()
            .map(|v| f16::from_f32(v.to_f32() * 2.0 + 1.0).to_f64())
            .collect();
        assert_close(&format!("f16, --features {req}"), &got, &want);
        ran = true;
    }
    // The design relies on lavapipe offering shader-f16 in CI.
    let offered = open(FeatureRequest::All).offered;
    assert_eq!(ran, offered.f16);
}

#[test]
fn subgroup_add_matches_cpu_when_enabled() {
    // Each invocation records its subgroup (workgroup id, subgroup id) and the
    // subgroup size, so the CPU check assumes no mapping of invocations to
    // subgroups and no size: it sums x over each subgroup as reported.
    let wgsl = "
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> sg: array<u32>;

@compute @workgroup_size(64)
fn main(
    @builtin(global_invocation_id) g: vec3<u32>,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sid: u32,
    @builtin(subgroup_size) size: u32,
) {
    let i = g.x;
    let n = arrayLength(&x);
    var v = 0.0;
    if (i < n) {
        v = x[i];
    }
    let s = subgroupAdd(v);
    if (i < n) {
        y[i] = s;
        sg[2u * i] = wg.x * 1024u + sid;
        sg[2u * i + 1u] = size;
    }
}
";
    let mut ran = false;
    for req in [FeatureRequest::Subgroups, FeatureRequest::All] {
        let ctx = open(req);
        let f = ctx.features;
        if !f.subgroups {
            assert!(
                !ctx.offered.subgroups,
                "--features {req} did not enable offered subgroups"
            );
            eprintln!(
                "--features {req}: {} offers no subgroups",
                ctx.adapter_info.name
            );
            continue;
        }
        let mut rng = Rng::fresh(&format!("subgroupAdd, --features {req}"));
        let x: Vec<f32> = (0..N).map(|_| rng.f32()).collect();
        let poison_ids = vec![u32::MAX; 2 * N];
        let out = run(
            &ctx,
            wgsl,
            &[bytemuck::cast_slice(&x)],
            &[nan_f32(N), bytemuck::cast_slice(&poison_ids).to_vec()],
        );
        let got = to_f64_f32(&out[0]);
        let ids: &[u32] = bytemuck::cast_slice(&out[1]);
        let mut sums = std::collections::BTreeMap::<u32, (f64, usize)>::new();
        for i in 0..N {
            let size = ids[2 * i + 1];
            assert!(
                (f.subgroup_min..=f.subgroup_max).contains(&size),
                "--features {req}: invocation {i} reports subgroup size {size}, adapter says {}..{}",
                f.subgroup_min,
                f.subgroup_max
            );
            let e = sums.entry(ids[2 * i]).or_default();
            e.0 += x[i] as f64;
            e.1 += 1;
        }
        for (id, (_, count)) in &sums {
            let size = ids[2 * ids.chunks(2).position(|c| c[0] == *id).unwrap() + 1];
            assert!(
                *count <= size as usize,
                "subgroup {id} has {count} members, more than its size {size}"
            );
        }
        let want: Vec<f64> = (0..N).map(|i| sums[&ids[2 * i]].0).collect();
        let sizes: std::collections::BTreeSet<u32> = ids.chunks(2).map(|c| c[1]).collect();
        eprintln!(
            "--features {req}: subgroup sizes seen {sizes:?}, {} subgroups over {N} invocations",
            sums.len()
        );
        assert_close(&format!("subgroupAdd, --features {req}"), &got, &want);
        ran = true;
    }
    let offered = open(FeatureRequest::All).offered;
    assert_eq!(ran, offered.subgroups);
}

#[test]
fn masked_features_are_really_off_and_errors_do_not_panic() {
    // With --features none the device must reject f16 and subgroup shaders:
    // that is what makes the forced-down feature sets honest. The rejection
    // arrives as an uncaptured error, logged and returned by check_errors.
    let ctx = open(FeatureRequest::None);
    for (what, wgsl) in [
        (
            "f16",
            "enable f16;\n@group(0) @binding(0) var<storage, read_write> y: array<f16>;\n\
             @compute @workgroup_size(1) fn main() { y[0] = 1.0h; }",
        ),
        (
            "subgroups",
            "@group(0) @binding(0) var<storage, read_write> y: array<f32>;\n\
             @compute @workgroup_size(1) fn main() { y[0] = subgroupAdd(1.0); }",
        ),
    ] {
        let _ = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(what),
                source: wgpu::ShaderSource::Wgsl(wgsl.into()),
            });
        let errs = ctx.take_errors();
        assert!(
            !errs.is_empty(),
            "a {what} shader was accepted by a device opened with --features none"
        );
        eprintln!(
            "{what} on --features none: {}",
            errs[0].lines().next().unwrap_or("")
        );
    }
    ctx.check_errors().expect("errors were taken");
}

/// `kiln bench`'s two roofs run on any adapter: the read roof comes out
/// finite and positive, the cost of a dispatch (dependent or not) finite
/// and not negative (their values are the GPU's, printed by bench, never asserted).
#[test]
fn bench_roofs_measure_on_any_adapter() {
    let ctx = open(FeatureRequest::EVERY[3]);
    let (bytes, roof) = kiln::exec::bench::read_roof(&ctx, 1).unwrap();
    assert!(
        bytes > 0 && roof.is_finite() && roof > 0.0,
        "read roof {roof}"
    );
    for groups in [1, 4] {
        for dependent in [true, false] {
            let t = kiln::exec::bench::dispatch_cost(&ctx, groups, 1, dependent).unwrap();
            assert!(
                t.is_finite() && t >= 0.0,
                "dispatch cost {t} s (dependent: {dependent})"
            );
        }
    }
}
