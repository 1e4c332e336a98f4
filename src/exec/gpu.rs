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
use crate::plan::{self, Bucket, Buf, Launch, Plan, Word};
use crate::reference::Logits;

struct WeightBufs {
    raw: Vec<wgpu::Buffer>,
    f32: Option<wgpu::Buffer>,
}

/// A profiled step's timestamps: with `in_pass`, query 0 is written before
/// the first dispatch and query i + 1 after dispatch i, all inside the
/// step's usual passes (each dispatch's time is then what it adds to the
/// stream: its barrier, any copy and pass boundary just before it, and the
/// timestamp's own cost, ~5 µs on the H200); else each dispatch runs in its
/// own pass with queries 2i and 2i + 1 at its start and end (a pass costs
/// ~15 µs more than a barrier there). Either way small kernels look slower
/// than they are.
struct Profiling {
    queries: wgpu::QuerySet,
    in_pass: bool,
    /// Per timed dispatch: its kernel's name and the weight bytes it binds.
    names: Vec<(String, u64)>,
}

struct BucketState {
    plan: Plan,
    kernels: Vec<Kernel>,
    /// Token rows the value buffers hold.
    capacity: usize,
    /// The arenas every stored value lives in (liveness-planned).
    arenas: Vec<wgpu::Buffer>,
    /// Root value id (reshapes alias their input) → (arena, offset, bytes).
    values: HashMap<usize, (usize, u64, u64)>,
    /// Arena bytes, naive sum and lower bound of the current layout.
    mem: [u64; 3],
    /// All launches' uniform words, each launch at an aligned slot.
    uniforms: Option<wgpu::Buffer>,
    /// Per launch: its slot (in u32 words) and bind group (kernels only).
    bound: Vec<Option<(usize, wgpu::BindGroup)>>,
    /// Scratch for the uniform words of one step (reused: no allocation).
    words: Vec<u32>,
    /// The greedy argmax over the decode logits (decode bucket only).
    greedy: Option<wgpu::BindGroup>,
}

/// Runs a bound graph on the GPU.
pub struct GpuBackend<'a> {
    ctx: &'a GpuContext,
    graph: &'a BoundGraph,
    weights: Vec<WeightBufs>,
    k_cache: Vec<wgpu::Buffer>,
    v_cache: Vec<wgpu::Buffer>,
    dummy: wgpu::Buffer,
    /// [`Buf::Counters`]: zero, and left zero by every kernel using them.
    counters: wgpu::Buffer,
    buckets: Vec<BucketState>,
    pos: usize,
    n_ctx: usize,
    /// Staging buffer for readback (MAP_READ), grown on demand.
    staging: Option<(wgpu::Buffer, u64)>,
    /// Where greedy decode steps spent their time on the host.
    times: StepTimes,
    /// When set, the next encoded step is timed dispatch by dispatch.
    profiling: Option<Profiling>,
    /// Dispatches per submitted command buffer ([`SUBMIT_EVERY`], or
    /// `KILN_SUBMIT_EVERY`).
    submit_every: usize,
    /// Give every value its own bytes (no reuse), so that any value can be
    /// read back after a step (`--verify-replay`).
    keep_values: bool,
    /// Greedy decode: argmax of the logits row on the GPU.
    argmax: Kernel,
    argmax_out: wgpu::Buffer,
    argmax_params: wgpu::Buffer,
    /// Readback slots of the greedy steps run ahead ([`Backend::decode_greedy`]):
    /// each in-flight step copies its token id into its own slot.
    ahead_staging: [wgpu::Buffer; AHEAD],
    /// In-flight greedy steps, oldest first: slot and submission (the next
    /// one takes the slot after the newest's).
    ahead: std::collections::VecDeque<(usize, wgpu::SubmissionIndex)>,
}

/// The compute pass being recorded into `enc`, begun if none is open.
fn open_pass<'p>(
    pass: &'p mut Option<wgpu::ComputePass<'static>>,
    enc: &mut wgpu::CommandEncoder,
) -> &'p mut wgpu::ComputePass<'static> {
    pass.get_or_insert_with(|| {
        enc.begin_compute_pass(&Default::default())
            .forget_lifetime()
    })
}

/// A step's input tokens.
#[derive(Clone, Copy)]
enum StepInput<'t> {
    /// Token ids from the host.
    Tokens(&'t [u32]),
    /// One token: the greedy argmax of the step before, copied on the GPU.
    PrevArgmax,
}

impl StepInput<'_> {
    fn len(self) -> usize {
        match self {
            StepInput::Tokens(t) => t.len(),
            StepInput::PrevArgmax => 1,
        }
    }
}

/// Greedy decode steps in flight at most: one computing while the next is
/// queued behind it, so the GPU never waits for the host to read a token
/// and encode the next step.
const AHEAD: usize = 2;

/// Host time of greedy decode steps, summed since the last reset.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// Steps measured.
    pub steps: u32,
    /// Writing inputs and uniforms and encoding the dispatches (with the
    /// `finish` and `submit` of every chunk but the last, see
    /// [`SUBMIT_EVERY`]).
    pub encode: std::time::Duration,
    /// `finish` and `submit` of the last chunk.
    pub submit: std::time::Duration,
    /// Waiting for the GPU and mapping the token id.
    pub wait: std::time::Duration,
}

/// GPU memory of a [`GpuBackend`], in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Weights as uploaded (raw blocks and f32 copies).
    pub weights: u64,
    /// Key and value caches.
    pub kv: u64,
    /// Arena bytes per bucket (decode, prefill), as placed.
    pub arena: [u64; 2],
    /// Sum of the stored values' sizes per bucket (no reuse).
    pub naive: [u64; 2],
    /// Lower bound per bucket (most bytes alive at one time).
    pub lower: [u64; 2],
}

impl Memory {
    /// Weights + KV cache + both arenas.
    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.arena[0] + self.arena[1]
    }
}

static CREATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn created(n: usize) {
    CREATED.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// GPU objects (buffers, bind groups, shader modules, pipelines) the GPU
/// backends of this process have created so far: a recorded decode step
/// creates none.
pub fn objects_created() -> usize {
    CREATED.load(std::sync::atomic::Ordering::Relaxed)
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
        let plans = vec![
            plan::plan_with(graph, Bucket::One, caps, max_binding, fuse)?,
            plan::plan_with(graph, Bucket::Many, caps, max_binding, fuse)?,
        ];
        if let Some(pins) = plan::resolve_pins(fuse.knob_pins.as_deref())? {
            if let Some(e) = plan::unmatched_role_pins(&pins, &[&plans[0], &plans[1]])? {
                return Err(Error::Input(e));
            }
        }
        Self::with_plans(ctx, graph, gguf, n_ctx, progress, plans)
    }

    /// Run recorded plans (decode, prefill), e.g. from a stream file
    /// ([`crate::plan::stream`]), without planning.
    pub fn with_plans(
        ctx: &'a GpuContext,
        graph: &'a BoundGraph,
        gguf: &Gguf,
        n_ctx: usize,
        progress: bool,
        plans: Vec<Plan>,
    ) -> Result<Self> {
        let n_ctx = n_ctx.min(graph.max_context);
        let caps = kernel::caps(ctx);
        if plans.len() != 2 || plans[0].bucket != Bucket::One || plans[1].bucket != Bucket::Many {
            return Err(Error::Input(
                "expected a decode plan and a prefill plan, in that order".into(),
            ));
        }
        let mut buckets = Vec::new();
        for p in plans {
            let mut kernels = Vec::new();
            for k in &p.kernels {
                let t =
                    crate::codegen::template(&k.template).map_err(|e| Error::Gpu(e.to_string()))?;
                if !t
                    .legal(&k.knobs, &caps)
                    .map_err(|e| Error::Gpu(e.to_string()))?
                {
                    return Err(Error::Input(format!(
                        "kernel {} cannot run on this adapter or feature set (it was planned for another); plan again (record the stream again on this machine)",
                        k.name()
                    )));
                }
                kernels.push(Kernel::from_wgsl(ctx, &k.name(), k.build(&caps)?));
                created(2);
            }
            buckets.push(BucketState {
                bound: Vec::new(),
                plan: p,
                kernels,
                capacity: 0,
                values: HashMap::new(),
                arenas: Vec::new(),
                mem: [0; 3],
                uniforms: None,
                words: Vec::new(),
                greedy: None,
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
                    let bytes = w.dtype.to_gpu_layout(w.dims[0], bytes);
                    raw.push(kernel::storage(ctx, &w.name, &bytes));
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
        let argmax = {
            let t = crate::codegen::template("argmax").map_err(|e| Error::Gpu(e.to_string()))?;
            let knobs = plan::choose(
                &t,
                &Default::default(),
                &caps,
                plan::resolve_pins(None)?.as_deref(),
                "",
            )?;
            Kernel::build(ctx, &t, &knobs)?
        };
        created(3);
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
            counters: zeros(
                buckets
                    .iter()
                    .map(|b| b.plan.counters as usize)
                    .max()
                    .unwrap_or(0)
                    .max(1),
                "block counters",
            ),
            buckets,
            pos: 0,
            n_ctx,
            staging: None,
            times: StepTimes::default(),
            profiling: None,
            // A CPU adapter (lavapipe) runs the work on the cores that
            // record it: nothing to overlap, and each submit costs (~10%
            // of SmolLM2's fixture checks), so one buffer per step there.
            submit_every: std::env::var("KILN_SUBMIT_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or(if ctx.adapter_info.device_type == wgpu::DeviceType::Cpu {
                    usize::MAX
                } else {
                    SUBMIT_EVERY
                }),
            keep_values: false,
            argmax,
            argmax_out: zeros(1, "argmax"),
            argmax_params: kernel::uniform(ctx, "argmax params", &[1, graph.vocab as u32]),
            ahead_staging: std::array::from_fn(|_| {
                created(1);
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("greedy token readback"),
                    size: 4,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }),
            ahead: std::collections::VecDeque::with_capacity(AHEAD),
        })
    }

    /// Kernel dispatches per step in the decode bucket.
    pub fn dispatches_per_decode_step(&self) -> usize {
        self.buckets[0].plan.dispatches()
    }

    /// Run one decode step with GPU timestamps between its dispatches:
    /// (kernel variant, microseconds, bytes of weights it reads: a decode
    /// matmul's, else 0) in launch order. Needs the adapter's timestamp
    /// queries. Where it offers them inside passes (see [`Profiling`]) the
    /// times cover the whole step, each with its timestamp's own cost; else
    /// each dispatch runs in its own pass. Both sums are above a step's GPU
    /// time.
    pub fn profile_decode_step(&mut self, token: u32) -> Result<Vec<(String, f64, u64)>> {
        if !self.ctx.features.timestamps {
            return Err(Error::Gpu(
                "profiling needs timestamp queries, which this adapter or feature set does not offer".into(),
            ));
        }
        let n = self.buckets[0].plan.launches.len() as u32 * 2;
        let queries = self.ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: n.max(2),
        });
        let in_pass = self.ctx.timestamps_in_passes;
        self.finish_ahead();
        self.profiling = Some(Profiling {
            queries,
            in_pass,
            names: Vec::new(),
        });
        let r = self.encode_step(&[token]);
        let Profiling { queries, names, .. } = self
            .profiling
            .take()
            .ok_or_else(|| Error::Gpu("profiling state lost".into()))?;
        let (mut enc, _) = r?;
        let used = if names.is_empty() {
            0
        } else if in_pass {
            names.len() + 1
        } else {
            names.len() * 2
        };
        let bytes = (used * 8) as u64;
        let resolve = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes.max(16),
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        enc.resolve_query_set(&queries, 0..used as u32, &resolve, 0);
        self.staging(bytes.max(16))?;
        let Some((staging, _)) = &self.staging else {
            return Err(Error::Gpu("no readback buffer".into()));
        };
        enc.copy_buffer_to_buffer(&resolve, 0, staging, 0, bytes);
        self.ctx.queue.submit([enc.finish()]);
        let words = kernel::read_mapped(self.ctx, staging, used * 2)?;
        let period = self.ctx.queue.get_timestamp_period() as f64;
        let ticks: Vec<u64> = words
            .chunks(2)
            .map(|w| w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32)
            .collect();
        Ok(names
            .into_iter()
            .enumerate()
            .map(|(i, (name, bytes))| {
                let (a, b) = if in_pass {
                    (i, i + 1)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let d = ticks[b].saturating_sub(ticks[a]);
                (name, d as f64 * period / 1e3, bytes)
            })
            .collect())
    }

    /// Host time of the greedy decode steps since the last call (and reset).
    pub fn take_step_times(&mut self) -> StepTimes {
        std::mem::take(&mut self.times)
    }

    /// Keep every value readable after a step (no arena reuse; for
    /// verification). Takes effect for buckets not yet used.
    pub fn keep_values(&mut self, on: bool) {
        self.keep_values = on;
    }

    /// A value of the last decode (T = 1) step, if this plan stores it and
    /// the backend keeps values ([`GpuBackend::keep_values`]).
    pub fn read_value(&mut self, v: usize) -> Result<Option<Vec<f32>>> {
        let st = &self.buckets[0];
        if !st.plan.made.get(v).copied().unwrap_or(false) {
            return Ok(None);
        }
        let Some(&(arena, off, bytes)) = st.values.get(&st.plan.value_buf[v]) else {
            return Ok(None);
        };
        let n = self.graph.values[v].numel(1);
        let bytes = bytes.min((n * 4) as u64);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        self.staging(bytes)?;
        let st = &self.buckets[0];
        let Some((staging, _)) = &self.staging else {
            return Err(Error::Gpu("no readback buffer".into()));
        };
        enc.copy_buffer_to_buffer(&st.arenas[arena], off, staging, 0, bytes);
        self.ctx.queue.submit([enc.finish()]);
        Ok(Some(kernel::read_mapped(self.ctx, staging, n)?))
    }

    /// GPU memory kiln holds: weights, KV cache, and per bucket (decode,
    /// prefill) the arena with its naive sum and lower bound.
    pub fn memory(&self) -> Memory {
        let size = |b: &wgpu::Buffer| b.size();
        let weights = self
            .weights
            .iter()
            .map(|w| w.raw.iter().map(size).sum::<u64>() + w.f32.as_ref().map_or(0, size))
            .sum();
        let kv = self.k_cache.iter().chain(&self.v_cache).map(size).sum();
        let m = |i: usize| [0, 1].map(|b| self.buckets[b].mem[i]);
        Memory {
            weights,
            kv,
            arena: m(0),
            naive: m(1),
            lower: m(2),
        }
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
        st.arenas.clear();
        // Every stored value at its offset in an arena, from the liveness
        // plan (aligned to the adapter's storage offset alignment).
        let align = self.ctx.limits.min_storage_buffer_offset_alignment.max(4) as u64;
        let (ids, _iv, mut layout) = plan::report::layout(g, &st.plan, cap, align, max_binding)?;
        if self.keep_values {
            // Every value its own bytes, packed into arenas in order.
            let mut arenas: Vec<u64> = vec![0];
            for (j, iv) in _iv.iter().enumerate() {
                let size = iv.size.max(1).div_ceil(align) * align;
                let mut end = *arenas.last().unwrap_or(&0);
                if end + size > max_binding && end > 0 {
                    arenas.push(0);
                    end = 0;
                }
                let a = arenas.len() - 1;
                layout.placements[j] = crate::alloc::Placement {
                    arena: a,
                    offset: end,
                };
                arenas[a] = end + size;
            }
            layout.peak = arenas.iter().sum();
            layout.arenas = arenas;
        }
        for (i, &size) in layout.arenas.iter().enumerate() {
            st.arenas
                .push(self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("arena {i}")),
                    size: size.max(4),
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }));
            created(1);
        }
        for (j, &v) in ids.iter().enumerate() {
            let pl = &layout.placements[j];
            let bytes = st.plan.value_bytes(g, v, cap).max(4);
            st.values.insert(v, (pl.arena, pl.offset, bytes));
        }
        st.mem = [layout.peak, layout.naive, layout.lower_bound];
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
            arenas: &st.arenas,
            weights: &self.weights,
            k: &self.k_cache,
            v: &self.v_cache,
            dummy: &self.dummy,
            counters: &self.counters,
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
                            resource: bufs.binding(bnd)?,
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
                    created(1);
                    Some((*slot, bg))
                }
                _ => None,
            });
        }
        st.bound = bound;
        st.uniforms = Some(ubuf);
        created(1);
        st.greedy = None;
        if st.plan.bucket == Bucket::One {
            let logits = bufs.binding(&Buf::Value(st.plan.value_buf[g.output]))?;
            created(1);
            st.greedy = Some(
                self.ctx
                    .device
                    .create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("greedy argmax"),
                        layout: &self.argmax.pipeline.get_bind_group_layout(0),
                        entries: &[
                            wgpu::BindGroupEntry {
                                binding: 0,
                                resource: logits,
                            },
                            wgpu::BindGroupEntry {
                                binding: 1,
                                resource: self.argmax_out.as_entire_binding(),
                            },
                            wgpu::BindGroupEntry {
                                binding: 2,
                                resource: self.argmax_params.as_entire_binding(),
                            },
                        ],
                    }),
            );
        }
        Ok(())
    }
}

/// The buffers a plan's [`Buf`]s name.
struct Bufs<'b> {
    values: &'b HashMap<usize, (usize, u64, u64)>,
    arenas: &'b [wgpu::Buffer],
    weights: &'b [WeightBufs],
    k: &'b [wgpu::Buffer],
    v: &'b [wgpu::Buffer],
    dummy: &'b wgpu::Buffer,
    counters: &'b wgpu::Buffer,
}

impl<'b> Bufs<'b> {
    /// The buffer, the byte offset in it and the size (`None`: to the end).
    fn get(&self, b: &Buf) -> Result<(&'b wgpu::Buffer, u64, Option<u64>)> {
        if let Buf::Value(i) = b {
            let (a, off, size) = self.values.get(i).ok_or_else(|| {
                Error::Gpu(format!("plan refers to a value that was not placed: {b:?}"))
            })?;
            let arena = self
                .arenas
                .get(*a)
                .ok_or_else(|| Error::Gpu(format!("no arena {a}")))?;
            // Whole 16-byte units, so that a value read as vec4s (an int8
            // row's words) reaches its last word: every value's slot in the
            // arena is a multiple of the offset alignment (src/alloc; wgpu
            // reports at least 32 bytes), so this stays inside the slot.
            return Ok((arena, *off, Some(size.div_ceil(16) * 16)));
        }
        Ok((
            resolve(b, self.weights, self.k, self.v, [self.dummy, self.counters])?,
            0,
            None,
        ))
    }

    /// A binding of `b`.
    fn binding(&self, b: &Buf) -> Result<wgpu::BindingResource<'b>> {
        let (buffer, offset, size) = self.get(b)?;
        Ok(wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset,
            size: size.and_then(wgpu::BufferSize::new),
        }))
    }
}

fn resolve<'b>(
    b: &Buf,
    weights: &'b [WeightBufs],
    k: &'b [wgpu::Buffer],
    v: &'b [wgpu::Buffer],
    [dummy, counters]: [&'b wgpu::Buffer; 2],
) -> Result<&'b wgpu::Buffer> {
    let missing = || Error::Gpu(format!("plan refers to a buffer that was not made: {b:?}"));
    match b {
        Buf::Value(_) => Err(missing()),
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
        Buf::Counters => Ok(counters),
        Buf::Unbound => Err(missing()),
    }
}

/// Dispatches per submitted command buffer within a step when the GPU is
/// idle. wgpu does most of a dispatch's CPU work (~2 µs on the H200 machine)
/// when the command buffer is finished and submitted, and the GPU starts
/// only then: one buffer for a 300-dispatch step kept the GPU idle for
/// ~0.7 ms per token. Not on CPU adapters (one buffer per step there), nor
/// for a greedy step queued behind another (the GPU has work meanwhile).
/// `KILN_SUBMIT_EVERY=N` overrides it (experiments).
pub const SUBMIT_EVERY: usize = 32;

impl GpuBackend<'_> {
    /// Check the tokens, write the step's inputs and uniforms, and encode
    /// every launch of the step's bucket, submitting every [`SUBMIT_EVERY`]
    /// dispatches (not while profiling). Returns the encoder holding the
    /// rest, unsubmitted, and the bucket index.
    fn encode_step(&mut self, tokens: &[u32]) -> Result<(wgpu::CommandEncoder, usize)> {
        self.encode_step_from(StepInput::Tokens(tokens), false)
    }

    /// As [`Self::encode_step`], from `input`; with `greedy` the argmax of
    /// the last logits row ends the step (in its last pass: a pass of its
    /// own costs more).
    fn encode_step_from(
        &mut self,
        input: StepInput,
        greedy: bool,
    ) -> Result<(wgpu::CommandEncoder, usize)> {
        let g = self.graph;
        let t = input.len();
        if t == 0 {
            return Err(Error::Input("no tokens to run".into()));
        }
        // (The argmax is always in range: it indexes the logits.)
        if let StepInput::Tokens(tokens) = input {
            if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= g.vocab) {
                return Err(Error::Input(format!(
                    "token id {bad} is out of range: the model's vocabulary has {} tokens (ids 0..{})",
                    g.vocab,
                    g.vocab - 1
                )));
            }
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
            arenas: &st.arenas,
            weights: &self.weights,
            k: &self.k_cache,
            v: &self.v_cache,
            dummy: &self.dummy,
            counters: &self.counters,
        };
        let (tok_buf, tok_off, _) = bufs.get(&Buf::Value(st.plan.value_buf[g.tokens]))?;
        if let StepInput::Tokens(tokens) = input {
            ctx.queue
                .write_buffer(tok_buf, tok_off, bytemuck::cast_slice(tokens));
        }
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
        if let StepInput::PrevArgmax = input {
            enc.copy_buffer_to_buffer(&self.argmax_out, 0, tok_buf, tok_off, 4);
        }
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        let mut in_chunk = 0usize;
        // Behind a step still in flight the GPU is (most likely) busy: one submission
        // (each command buffer and pass boundary costs the GPU ~15 µs on
        // the H200); else chunks, so that it starts early.
        let chunked = self.ahead.is_empty() && self.profiling.is_none();
        for (l, bound) in st.plan.launches.iter().zip(&st.bound) {
            match l {
                Launch::Kernel {
                    kernel,
                    groups,
                    binds,
                    ..
                } => {
                    let Some((_, bg)) = bound else { continue };
                    // Submit what is recorded every SUBMIT_EVERY dispatches:
                    // the GPU starts on it while the rest is recorded.
                    if in_chunk == self.submit_every && chunked {
                        pass = None;
                        let full = std::mem::replace(
                            &mut enc,
                            ctx.device.create_command_encoder(&Default::default()),
                        );
                        ctx.queue.submit([full.finish()]);
                        in_chunk = 0;
                    }
                    in_chunk += 1;
                    let (count, z) = groups.at(t, pos0);
                    if count == 0 || z == 0 {
                        continue;
                    }
                    let mut gr = kernel::spread(count as u32, max_dim);
                    gr[2] = z as u32;
                    if let Some(prof) = &mut self.profiling {
                        let i = prof.names.len() as u32;
                        if 2 * i + 1 < prof.queries.count() {
                            // (A matmul reads all it binds; an embedding one row.)
                            let weight_bytes = if st.plan.kernels[*kernel].template == "matmul_vec"
                            {
                                st.plan.weight_bytes(binds)
                            } else {
                                0
                            };
                            prof.names
                                .push((st.plan.kernels[*kernel].name(), weight_bytes));
                            if prof.in_pass {
                                let p = open_pass(&mut pass, &mut enc);
                                if i == 0 {
                                    p.write_timestamp(&prof.queries, 0);
                                }
                                p.set_pipeline(&st.kernels[*kernel].pipeline);
                                p.set_bind_group(0, bg, &[]);
                                p.dispatch_workgroups(gr[0], gr[1], gr[2]);
                                p.write_timestamp(&prof.queries, i + 1);
                            } else {
                                pass = None;
                                let mut p = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                                    label: None,
                                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                                        query_set: &prof.queries,
                                        beginning_of_pass_write_index: Some(2 * i),
                                        end_of_pass_write_index: Some(2 * i + 1),
                                    }),
                                });
                                p.set_pipeline(&st.kernels[*kernel].pipeline);
                                p.set_bind_group(0, bg, &[]);
                                p.dispatch_workgroups(gr[0], gr[1], gr[2]);
                            }
                            continue;
                        }
                    }
                    let p = open_pass(&mut pass, &mut enc);
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
                        let (sb, so, _) = bufs.get(src)?;
                        let (db, dof, _) = bufs.get(dst)?;
                        enc.copy_buffer_to_buffer(
                            sb,
                            so + src_off.at(t, pos0),
                            db,
                            dof + dst_off.at(t, pos0),
                            n,
                        );
                    }
                }
            }
        }
        if greedy {
            let Some(bg) = &st.greedy else {
                return Err(Error::Gpu("the greedy argmax was not bound".into()));
            };
            let p = open_pass(&mut pass, &mut enc);
            p.set_pipeline(&self.argmax.pipeline);
            p.set_bind_group(0, bg, &[]);
            p.dispatch_workgroups(1, 1, 1);
        }
        drop(pass);
        self.pos += t;
        Ok((enc, b))
    }

    /// Encode a one-token step with the greedy argmax after it, copy the
    /// token id into `slot` of the run-ahead readbacks (None: the
    /// readback buffer) and submit. Returns when the encoding ended and the
    /// submission.
    fn submit_greedy(
        &mut self,
        input: StepInput,
        slot: Option<usize>,
    ) -> Result<(std::time::Instant, wgpu::SubmissionIndex)> {
        if slot.is_none() {
            self.staging(4)?;
        }
        let (mut enc, _) = self.encode_step_from(input, true)?;
        let staging = match (slot, &self.staging) {
            (Some(i), _) => &self.ahead_staging[i],
            (None, Some((s, _))) => s,
            (None, None) => return Err(Error::Gpu("no readback buffer".into())),
        };
        enc.copy_buffer_to_buffer(&self.argmax_out, 0, staging, 0, 4);
        let t = std::time::Instant::now();
        Ok((t, self.ctx.queue.submit([enc.finish()])))
    }

    /// Submit the next greedy step run ahead: its token is `token`, or
    /// with None the argmax of the step submitted before.
    fn push_ahead(&mut self, token: Option<u32>) -> Result<()> {
        let t0 = std::time::Instant::now();
        let slot = self.ahead.back().map_or(0, |&(s, _)| (s + 1) % AHEAD);
        let input = match &token {
            Some(tok) => StepInput::Tokens(std::slice::from_ref(tok)),
            None => StepInput::PrevArgmax,
        };
        let (t1, index) = self.submit_greedy(input, Some(slot))?;
        self.times.encode += t1 - t0;
        self.times.submit += t1.elapsed();
        self.ahead.push_back((slot, index));
        Ok(())
    }

    /// Wait for the oldest step run ahead and read its token.
    fn pop_ahead(&mut self) -> Result<u32> {
        let (slot, index) = self
            .ahead
            .pop_front()
            .ok_or_else(|| Error::Gpu("no greedy step in flight".into()))?;
        let t = std::time::Instant::now();
        let mut id = [0u32; 1];
        kernel::read_mapped_after(self.ctx, &self.ahead_staging[slot], &mut id, Some(index))?;
        self.times.wait += t.elapsed();
        self.times.steps += 1;
        Ok(id[0])
    }

    fn decode_ahead(
        &mut self,
        first: u32,
        n: usize,
        on_token: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.push_ahead(Some(first))?;
        let mut submitted = 1;
        for _ in 0..n {
            // Run ahead only where the context has room for the step.
            if submitted < n && (self.pos < self.n_ctx || self.ahead.is_empty()) {
                // (At the context's end with nothing in flight this reports
                // the end, as a step-by-step decode would.)
                self.push_ahead(None)?;
                submitted += 1;
            }
            let tok = self.pop_ahead()?;
            if !on_token(tok)? {
                break;
            }
        }
        Ok(())
    }

    /// Drop the greedy steps still in flight: their positions are taken
    /// back (their results are never read).
    fn finish_ahead(&mut self) {
        self.pos -= self.ahead.len().min(self.pos);
        self.ahead.clear();
    }

    /// Make the readback buffer hold `bytes`.
    fn staging(&mut self, bytes: u64) -> Result<&wgpu::Buffer> {
        if self.staging.as_ref().is_none_or(|s| s.1 < bytes) {
            let size = bytes.max(4);
            created(1);
            self.staging = Some((
                self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                size,
            ));
        }
        self.staging
            .as_ref()
            .map(|s| &s.0)
            .ok_or_else(|| Error::Gpu("no readback buffer".into()))
    }
}

impl crate::session::Backend for GpuBackend<'_> {
    fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Logits> {
        self.finish_ahead();
        let t = tokens.len();
        let (mut enc, b) = self.encode_step(tokens)?;
        let g = self.graph;
        // Read back only the rows asked for.
        let out = &g.values[g.output];
        let vocab = out.last(1);
        debug_assert!(out.kind == Kind::F32 && out.shape.first() == Some(&Dim::Tokens));
        let (first, rows) = if last_only { (t - 1, 1) } else { (0, t) };
        let bytes = (rows * vocab * 4) as u64;
        self.staging(bytes)?;
        let st = &self.buckets[b];
        let &(arena, off, _) = st
            .values
            .get(&st.plan.value_buf[g.output])
            .ok_or_else(|| Error::Gpu("the output buffer was not made".into()))?;
        let obuf = &st.arenas[arena];
        let Some((staging, _)) = &self.staging else {
            return Err(Error::Gpu("no readback buffer".into()));
        };
        enc.copy_buffer_to_buffer(obuf, off + (first * vocab * 4) as u64, staging, 0, bytes);
        self.ctx.queue.submit([enc.finish()]);
        let data = kernel::read_mapped(self.ctx, staging, rows * vocab)?;
        Ok(Logits { data, vocab })
    }

    /// One token: the argmax of the last logits row runs on the GPU and
    /// only its 4-byte id is read back.
    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        if tokens.len() != 1 {
            let l = self.forward(tokens, true)?;
            return Ok(crate::reference::ops::argmax(l.row(0), l.vocab)[0] as u32);
        }
        self.finish_ahead();
        let t0 = std::time::Instant::now();
        let (t1, index) = self.submit_greedy(StepInput::Tokens(tokens), None)?;
        let t2 = std::time::Instant::now();
        let mut id = [0u32; 1];
        let Some((staging, _)) = &self.staging else {
            return Err(Error::Gpu("no readback buffer".into()));
        };
        kernel::read_mapped_after(self.ctx, staging, &mut id, Some(index))?;
        let t3 = std::time::Instant::now();
        self.times.steps += 1;
        self.times.encode += t1 - t0;
        self.times.submit += t2 - t1;
        self.times.wait += t3 - t2;
        Ok(id[0])
    }

    /// Runs one step ahead: step i + 1 (its token the argmax of step i,
    /// copied on the GPU) is submitted before step i's token is read back,
    /// so the GPU always has the next step queued while the host reads a
    /// token, hands it to `on_token` and encodes the step after. When
    /// generation stops, the step run ahead is dropped: its position is
    /// taken back (its cache row is written again by the next step there).
    fn decode_greedy(
        &mut self,
        first: u32,
        n: usize,
        on_token: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<()> {
        self.finish_ahead();
        let r = self.decode_ahead(first, n, on_token);
        self.finish_ahead();
        r
    }

    fn reset(&mut self) {
        self.finish_ahead();
        self.pos = 0;
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }
}
