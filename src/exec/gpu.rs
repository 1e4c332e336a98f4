//! The GPU executor: uploads weights once, keeps the KV cache on the GPU,
//! and runs a [`Plan`] per step. Pipelines and bind groups are made once per
//! bucket (and again only when a prefill outgrows its buffers); a step writes
//! the uniform parameters (T, positions) and encodes the launches.

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
    /// Per launch: uniform buffer and bind group (kernels only).
    bound: Vec<Option<(wgpu::Buffer, wgpu::BindGroup)>>,
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
        let n_ctx = n_ctx.min(graph.max_context);
        let caps = kernel::caps(ctx);
        let max_binding = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        let plans = [
            plan::plan(graph, Bucket::One, caps, max_binding)?,
            plan::plan(graph, Bucket::Many, caps, max_binding)?,
        ];
        let templates = crate::codegen::templates().map_err(|e| Error::Gpu(e.to_string()))?;
        let mut buckets = Vec::new();
        for p in plans {
            let mut kernels = Vec::new();
            for k in &p.kernels {
                let t = templates
                    .iter()
                    .find(|t| t.name == k.template)
                    .ok_or_else(|| Error::Gpu(format!("no template {}", k.template)))?;
                kernels.push(Kernel::build(ctx, t, &k.knobs)?);
            }
            buckets.push(BucketState {
                bound: vec![None; 0],
                plan: p,
                kernels,
                capacity: 0,
                values: HashMap::new(),
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
            if root != v {
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
        let mut bound = Vec::new();
        for l in &st.plan.launches {
            bound.push(match l {
                Launch::Kernel {
                    kernel,
                    binds,
                    params,
                    ..
                } => {
                    let ubuf = kernel::uniform(self.ctx, "params", &vec![0u32; params.len()]);
                    let mut bufs: Vec<&wgpu::Buffer> = Vec::new();
                    for bnd in binds {
                        bufs.push(resolve(
                            bnd,
                            &st.values,
                            &self.weights,
                            &self.k_cache,
                            &self.v_cache,
                            &self.dummy,
                        )?);
                    }
                    bufs.push(&ubuf);
                    let bg = st.kernels[*kernel].bind(self.ctx, &bufs);
                    Some((ubuf, bg))
                }
                Launch::Copy { .. } => None,
            });
        }
        st.bound = bound;
        Ok(())
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
        let st = &self.buckets[b];
        let tok_buf = resolve(
            &Buf::Value(st.plan.value_buf[g.tokens]),
            &st.values,
            &self.weights,
            &self.k_cache,
            &self.v_cache,
            &self.dummy,
        )?;
        ctx.queue
            .write_buffer(tok_buf, 0, bytemuck::cast_slice(tokens));
        let max_dim = ctx.limits.max_compute_workgroups_per_dimension;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for (l, bound) in st.plan.launches.iter().zip(&st.bound) {
            match l {
                Launch::Kernel {
                    kernel,
                    params,
                    groups,
                    ..
                } => {
                    let words: Vec<u32> = params
                        .iter()
                        .map(|w| match w {
                            Word::U(lin) => lin.at(t, pos0) as u32,
                            Word::F(f) => f.to_bits(),
                        })
                        .collect();
                    let Some((ubuf, bg)) = bound else { continue };
                    ctx.queue
                        .write_buffer(ubuf, 0, bytemuck::cast_slice(&words));
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
                    st.kernels[*kernel].dispatch(&mut enc, bg, gr);
                }
                Launch::Copy {
                    src,
                    src_off,
                    dst,
                    dst_off,
                    size,
                } => {
                    let s = resolve(
                        src,
                        &st.values,
                        &self.weights,
                        &self.k_cache,
                        &self.v_cache,
                        &self.dummy,
                    )?;
                    let d = resolve(
                        dst,
                        &st.values,
                        &self.weights,
                        &self.k_cache,
                        &self.v_cache,
                        &self.dummy,
                    )?;
                    let n = size.at(t, pos0);
                    if n > 0 {
                        enc.copy_buffer_to_buffer(
                            s,
                            src_off.at(t, pos0),
                            d,
                            dst_off.at(t, pos0),
                            n,
                        );
                    }
                }
            }
        }
        ctx.queue.submit([enc.finish()]);
        self.pos += t;
        // Read back only the rows asked for.
        let out = &g.values[g.output];
        let vocab = out.last(1);
        debug_assert!(out.kind == Kind::F32 && out.shape.first() == Some(&Dim::Tokens));
        let obuf = resolve(
            &Buf::Value(st.plan.value_buf[g.output]),
            &st.values,
            &self.weights,
            &self.k_cache,
            &self.v_cache,
            &self.dummy,
        )?;
        let (first, rows) = if last_only { (t - 1, 1) } else { (0, t) };
        let data = read_rows(ctx, obuf, (first * vocab * 4) as u64, rows * vocab)?;
        Ok(Logits { data, vocab })
    }

    fn reset(&mut self) {
        self.pos = 0;
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }
}

fn read_rows(ctx: &GpuContext, buf: &wgpu::Buffer, offset: u64, n: usize) -> Result<Vec<f32>> {
    let bytes = (n * 4) as u64;
    let tmp = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("rows"),
        size: bytes.max(4),
        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, offset, &tmp, 0, bytes);
    ctx.queue.submit([enc.finish()]);
    kernel::read_f32(ctx, &tmp, n)
}
