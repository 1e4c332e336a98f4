//! The GPU executor: uploads weights once, keeps the KV cache on the GPU,
//! and runs a [`Plan`] per step from a record made once per bucket: the
//! pipelines, the bind groups (each launch's uniforms live at a fixed,
//! aligned offset of one uniform buffer) and the value buffers are created
//! when a bucket is first used (and again only when a prefill outgrows its
//! buffers). A step computes the uniform words into a reused scratch vector,
//! writes them with one `write_buffer`, encodes every dispatch into as few
//! compute passes as the plan's copies allow, submits, and reads back only
//! the rows asked for through a persistent staging buffer.

use std::collections::HashMap;

use super::kernel::{self, Kernel};
use super::GpuContext;
use crate::error::{Error, Result};
use crate::graph::ir::{BoundGraph, Dim, Kind};
use crate::model::dequant::dequantize;
use crate::model::gguf::Gguf;
use crate::plan::{self, Bucket, Buf, Groups, Launch, Plan, Word};
use crate::reference::Logits;

struct WeightBufs {
    raw: Vec<wgpu::Buffer>,
    f32: Option<wgpu::Buffer>,
}

struct BucketState {
    plan: Plan,
    kernels: Vec<Kernel>,
    /// Token rows the value buffers hold.
    capacity: usize,
    /// Value buffers by root value id (reshapes alias their input).
    values: HashMap<usize, wgpu::Buffer>,
    /// All launches' uniform words, each launch at an aligned slot.
    uniforms: Option<wgpu::Buffer>,
    /// Per launch: its slot (in u32 words) and bind group (kernels only).
    bound: Vec<Option<(usize, wgpu::BindGroup)>>,
    /// Scratch for the uniform words of one step (reused: no allocation).
    words: Vec<u32>,
}

/// Runs a bound graph on the GPU.
pub struct GpuBackend<'a> {
    ctx: &'a GpuContext,
    graph: &'a BoundGraph,
    weights: Vec<WeightBufs>,
    k_cache: Vec<wgpu::Buffer>,
    v_cache: Vec<wgpu::Buffer>,
    dummy: wgpu::Buffer,
    buckets: Vec<BucketState>,
    pos: usize,
    n_ctx: usize,
    /// Staging buffer for readback (MAP_READ), grown on demand.
    staging: Option<(wgpu::Buffer, u64)>,
}

impl<'a> GpuBackend<'a> {
    /// Plan both buckets, upload the weights (with a progress bar on a
    /// terminal) and allocate the KV cache for `n_ctx` positions.
    pub fn new(
        ctx: &'a GpuContext,
        graph: &'a BoundGraph,
        gguf: &Gguf,
        n_ctx: usize,
        progress: bool,
    ) -> Result<Self> {
        Self::with_fusion(
            ctx,
            graph,
            gguf,
            n_ctx,
            progress,
            &plan::FuseOptions::default(),
        )
    }

    /// [`GpuBackend::new`] with some fusion passes turned off.
    pub fn with_fusion(
        ctx: &'a GpuContext,
        graph: &'a BoundGraph,
        gguf: &Gguf,
        n_ctx: usize,
        progress: bool,
        fuse: &plan::FuseOptions,
    ) -> Result<Self> {
        let n_ctx = n_ctx.min(graph.max_context);
        let caps = kernel::caps(ctx);
        let max_binding = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        let plans = [
            plan::plan_with(graph, Bucket::One, caps, max_binding, fuse)?,
            plan::plan_with(graph, Bucket::Many, caps, max_binding, fuse)?,
        ];
        let mut buckets = Vec::new();
        for p in plans {
            let mut kernels = Vec::new();
            for k in &p.kernels {
                let wgsl = k.build(&caps)?;
                kernels.push(Kernel::from_wgsl(ctx, &k.name(), wgsl));
            }
            buckets.push(BucketState {
                bound: Vec::new(),
                plan: p,
                kernels,
                capacity: 0,
                values: HashMap::new(),
                uniforms: None,
                words: Vec::new(),
            });
        }
        // Upload weights: raw chunks and/or f32 copies, as the plans need.
        let total: u64 = graph
            .weights
            .iter()
            .filter_map(|w| gguf.tensor(&w.name))
            .map(|t| t.size)
            .sum();
        let bar = if progress {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading weights {bar:40} {binary_bytes}/{binary_total_bytes} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut weights = Vec::new();
        for (i, w) in graph.weights.iter().enumerate() {
            let info = gguf.tensor(&w.name).ok_or_else(|| {
                Error::Input(format!("weight '{}' vanished from the model", w.name))
            })?;
            let data = gguf.tensor_data(info);
            let need_raw = buckets.iter().any(|b| b.plan.weights[i].raw);
            let need_f32 = buckets.iter().any(|b| b.plan.weights[i].f32_copy);
            let wp = &buckets[0].plan.weights[i];
            let mut raw = Vec::new();
            if need_raw {
                for &(first, rows) in &wp.chunks {
                    let bytes = &data[first * wp.row_bytes..(first + rows) * wp.row_bytes];
                    raw.push(kernel::storage(ctx, &w.name, bytes));
                }
            }
            let f32 = if need_f32 {
                let v = dequantize(w.dtype, data, w.numel())?;
                Some(kernel::storage(ctx, &w.name, bytemuck::cast_slice(&v)))
            } else {
                None
            };
            bar.inc(info.size);
            weights.push(WeightBufs { raw, f32 });
        }
        bar.finish_and_clear();
        let zeros = |n: usize, label: &str| kernel::storage(ctx, label, &vec![0u8; n * 4]);
        let k_cache = graph
            .caches
            .iter()
            .map(|c| zeros(n_ctx * c.kv_heads * c.k_dim, "k cache"))
            .collect();
        let v_cache = graph
            .caches
            .iter()
            .map(|c| zeros(n_ctx * c.kv_heads * c.v_dim, "v cache"))
            .collect();
        Ok(GpuBackend {
            ctx,
            graph,
            weights,
            k_cache,
            v_cache,
            dummy: zeros(4, "dummy"),
            buckets,
            pos: 0,
            n_ctx,
            staging: None,
        })
    }

    /// Kernel dispatches per step in the decode bucket.
    pub fn dispatches_per_decode_step(&self) -> usize {
        self.buckets[0].plan.dispatches()
    }

    /// The plans (decode, prefill).
    pub fn plans(&self) -> [&Plan; 2] {
        [&self.buckets[0].plan, &self.buckets[1].plan]
    }

    /// Make the bucket's value buffers hold `t` rows (and rebuild its bind
    /// groups if they had to grow).
    fn ensure(&mut self, b: usize, t: usize) -> Result<()> {
        let cap = if self.buckets[b].plan.bucket == Bucket::One {
            1
        } else {
            t.next_power_of_two()
        };
        if self.buckets[b].capacity >= t {
            return Ok(());
        }
        let max_binding = self.ctx.limits.max_storage_buffer_binding_size;
        let g = self.graph;
        let st = &mut self.buckets[b];
        st.values.clear();
        for (v, desc) in g.values.iter().enumerate() {
            let root = st.plan.value_buf[v];
            if root != v
                || !st
                    .plan
                    .value_buf
                    .iter()
                    .enumerate()
                    .any(|(x, &r)| r == v && st.plan.made[x])
            {
                continue;
            }
            let bytes = (desc.numel(cap) * 4).max(4) as u64;
            if bytes > max_binding {
                return Err(Error::Input(format!(
                    "{} tokens need {bytes} bytes for '{}', more than this adapter binds ({max_binding}); run the prompt in smaller pieces",
                    cap, desc.name
                )));
            }
            let buf = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&desc.name),
                size: bytes.div_ceil(4) * 4,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            st.values.insert(v, buf);
        }
        st.capacity = cap;
        // One uniform buffer; each launch's words at an aligned slot.
        let align = (self.ctx.limits.min_uniform_buffer_offset_alignment.max(16) / 4) as usize;
        let mut slots = Vec::new();
        let mut total = 0usize;
        for l in &st.plan.launches {
            if let Launch::Kernel { params, .. } = l {
                slots.push(Some(total));
                total += params.len().max(4).div_ceil(align) * align;
            } else {
                slots.push(None);
            }
        }
        let ubuf = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("launch uniforms"),
            size: (total.max(align) * 4) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        st.words = vec![0u32; total.max(align)];
        let mut bound = Vec::new();
        let bufs = Bufs {
            values: &st.values,
            weights: &self.weights,
            k: &self.k_cache,
            v: &self.v_cache,
            dummy: &self.dummy,
        };
        for (l, slot) in st.plan.launches.iter().zip(&slots) {
            bound.push(match (l, slot) {
                (
                    Launch::Kernel {
                        kernel,
                        binds,
                        params,
                        ..
                    },
                    Some(slot),
                ) => {
                    let mut entries: Vec<wgpu::BindGroupEntry> = Vec::new();
                    for (i, bnd) in binds.iter().enumerate() {
                        if *bnd == Buf::Unbound {
                            continue;
                        }
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32,
                            resource: bufs.get(bnd)?.as_entire_binding(),
                        });
                    }
                    entries.push(wgpu::BindGroupEntry {
                        binding: binds.len() as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &ubuf,
                            offset: (*slot * 4) as u64,
                            // The whole slot: a template's Params may pad past its words.
                            size: wgpu::BufferSize::new(
                                (params.len().max(4).div_ceil(align) * align * 4) as u64,
                            ),
                        }),
                    });
                    let k = &st.kernels[*kernel];
                    let bg = self
                        .ctx
                        .device
                        .create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some(&k.name),
                            layout: &k.pipeline.get_bind_group_layout(0),
                            entries: &entries,
                        });
                    Some((*slot, bg))
                }
                _ => None,
            });
        }
        st.bound = bound;
        st.uniforms = Some(ubuf);
        Ok(())
    }
}

/// The buffers a plan's [`Buf`]s name.
struct Bufs<'b> {
    values: &'b HashMap<usize, wgpu::Buffer>,
    weights: &'b [WeightBufs],
    k: &'b [wgpu::Buffer],
    v: &'b [wgpu::Buffer],
    dummy: &'b wgpu::Buffer,
}

impl<'b> Bufs<'b> {
    fn get(&self, b: &Buf) -> Result<&'b wgpu::Buffer> {
        resolve(b, self.values, self.weights, self.k, self.v, self.dummy)
    }
}

fn resolve<'b>(
    b: &Buf,
    values: &'b HashMap<usize, wgpu::Buffer>,
    weights: &'b [WeightBufs],
    k: &'b [wgpu::Buffer],
    v: &'b [wgpu::Buffer],
    dummy: &'b wgpu::Buffer,
) -> Result<&'b wgpu::Buffer> {
    let missing = || Error::Gpu(format!("plan refers to a buffer that was not made: {b:?}"));
    match b {
        Buf::Value(i) => values.get(i).ok_or_else(missing),
        Buf::Raw { weight, chunk } => weights
            .get(*weight)
            .and_then(|w| w.raw.get(*chunk))
            .ok_or_else(missing),
        Buf::F32(w) => weights
            .get(*w)
            .and_then(|w| w.f32.as_ref())
            .ok_or_else(missing),
        Buf::KCache(c) => k.get(*c).ok_or_else(missing),
        Buf::VCache(c) => v.get(*c).ok_or_else(missing),
        Buf::Dummy => Ok(dummy),
        Buf::Unbound => Err(missing()),
    }
}

impl crate::session::Backend for GpuBackend<'_> {
    fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Logits> {
        let g = self.graph;
        let t = tokens.len();
        if t == 0 {
            return Err(Error::Input("no tokens to run".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= g.vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range: the model's vocabulary has {} tokens (ids 0..{})",
                g.vocab,
                g.vocab - 1
            )));
        }
        if self.pos + t > self.n_ctx {
            return Err(Error::Input(format!(
                "{t} tokens at position {} exceed the context of {} positions; use a shorter prompt or fewer tokens, or raise --ctx",
                self.pos, self.n_ctx
            )));
        }
        let b = if t == 1 { 0 } else { 1 };
        self.ensure(b, t)?;
        let pos0 = self.pos;
        let ctx = self.ctx;
        let st = &mut self.buckets[b];
        let bufs = Bufs {
            values: &st.values,
            weights: &self.weights,
            k: &self.k_cache,
            v: &self.v_cache,
            dummy: &self.dummy,
        };
        let tok_buf = bufs.get(&Buf::Value(st.plan.value_buf[g.tokens]))?;
        ctx.queue
            .write_buffer(tok_buf, 0, bytemuck::cast_slice(tokens));
        // This step's uniform words, all launches at once.
        for (l, bound) in st.plan.launches.iter().zip(&st.bound) {
            if let (Launch::Kernel { params, .. }, Some((slot, _))) = (l, bound) {
                for (j, w) in params.iter().enumerate() {
                    st.words[slot + j] = match w {
                        Word::U(lin) => lin.at(t, pos0) as u32,
                        Word::F(f) => f.to_bits(),
                    };
                }
            }
        }
        let ubuf = st
            .uniforms
            .as_ref()
            .ok_or_else(|| Error::Gpu("uniform buffer missing".into()))?;
        ctx.queue
            .write_buffer(ubuf, 0, bytemuck::cast_slice(&st.words));
        let max_dim = ctx.limits.max_compute_workgroups_per_dimension;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        for (l, bound) in st.plan.launches.iter().zip(&st.bound) {
            match l {
                Launch::Kernel { kernel, groups, .. } => {
                    let Some((_, bg)) = bound else { continue };
                    let (count, z) = match groups {
                        Groups::Linear { n, div, z } => {
                            (n.at(t, pos0).div_ceil((*div).max(1)), z.at(t, pos0))
                        }
                        Groups::Tiles { tiles_n, m, tm } => {
                            (tiles_n * m.at(t, pos0).div_ceil((*tm).max(1)), 1)
                        }
                    };
                    if count == 0 || z == 0 {
                        continue;
                    }
                    let mut gr = kernel::spread(count as u32, max_dim);
                    gr[2] = z as u32;
                    let p = pass.get_or_insert_with(|| {
                        enc.begin_compute_pass(&Default::default())
                            .forget_lifetime()
                    });
                    p.set_pipeline(&st.kernels[*kernel].pipeline);
                    p.set_bind_group(0, bg, &[]);
                    p.dispatch_workgroups(gr[0], gr[1], gr[2]);
                }
                Launch::Copy {
                    src,
                    src_off,
                    dst,
                    dst_off,
                    size,
                } => {
                    pass = None;
                    let n = size.at(t, pos0);
                    if n > 0 {
                        enc.copy_buffer_to_buffer(
                            bufs.get(src)?,
                            src_off.at(t, pos0),
                            bufs.get(dst)?,
                            dst_off.at(t, pos0),
                            n,
                        );
                    }
                }
            }
        }
        drop(pass);
        self.pos += t;
        // Read back only the rows asked for.
        let out = &g.values[g.output];
        let vocab = out.last(1);
        debug_assert!(out.kind == Kind::F32 && out.shape.first() == Some(&Dim::Tokens));
        let obuf = bufs.get(&Buf::Value(st.plan.value_buf[g.output]))?;
        let (first, rows) = if last_only { (t - 1, 1) } else { (0, t) };
        let bytes = (rows * vocab * 4) as u64;
        if self.staging.as_ref().is_none_or(|s| s.1 < bytes) {
            let size = bytes.max(4);
            self.staging = Some((
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                size,
            ));
        }
        let Some((staging, _)) = &self.staging else {
            return Err(Error::Gpu("no readback buffer".into()));
        };
        enc.copy_buffer_to_buffer(obuf, (first * vocab * 4) as u64, staging, 0, bytes);
        ctx.queue.submit([enc.finish()]);
        let data = kernel::read_mapped(ctx, staging, rows * vocab)?;
        Ok(Logits { data, vocab })
    }

    fn reset(&mut self) {
        self.pos = 0;
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }
}
