//! The planner: a [`BoundGraph`] becomes a [`Plan`], a list of launches
//! (kernel dispatches and buffer copies) with every size written as a linear
//! function of the step's token count T and start position. A plan is data:
//! the executor only resolves T and pos0 and runs it.
//!
//! One plan per shape bucket: [`Bucket::One`] (decode, matrix × vector
//! kernels) and [`Bucket::Many`] (prefill, tiled kernels). The variant of each
//! template is chosen for the adapter's features by [`choose`]; fusion and
//! the liveness allocator come later and slot in here.

use std::collections::BTreeMap;

use crate::codegen::{self, Caps, Hooks, Knobs, Template};
use crate::error::{Error, Result};
use crate::graph::ir::{BoundGraph, BoundOp, Dim, RopeMode, Unary};

pub mod fuse;
mod hooks;
pub mod report;
pub mod stream;

pub use fuse::{FuseOptions, Group, PASSES};

/// Which kernels a plan uses: decode (T = 1) or prefill (T > 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Bucket {
    /// One token per step.
    One,
    /// Many tokens per step.
    Many,
}

/// `t·T + p·pos0 + c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Lin {
    /// Coefficient of T.
    pub t: u64,
    /// Coefficient of pos0.
    pub p: u64,
    /// Constant.
    pub c: u64,
}

impl Lin {
    /// A constant.
    pub fn c(c: u64) -> Lin {
        Lin { t: 0, p: 0, c }
    }
    /// `k·T`.
    pub fn t(k: u64) -> Lin {
        Lin { t: k, p: 0, c: 0 }
    }
    /// `k·pos0`.
    pub fn pos(k: u64) -> Lin {
        Lin { t: 0, p: k, c: 0 }
    }
    /// Evaluate.
    pub fn at(&self, t: usize, pos0: usize) -> u64 {
        self.t * t as u64 + self.p * pos0 as u64 + self.c
    }
}

/// One 32-bit word of a kernel's uniform parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Word {
    /// An integer.
    U(Lin),
    /// A float.
    F(f32),
}

/// How many workgroups a launch takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Groups {
    /// `ceil(n / div)` groups spread over x and y, and `z` in z.
    Linear {
        /// Work items.
        n: Lin,
        /// Items per group.
        div: u64,
        /// z count.
        z: Lin,
    },
    /// `tiles_n · ceil(m / tm)` groups spread over x and y (tiled matmul).
    Tiles {
        /// Tiles along N.
        tiles_n: u64,
        /// Rows M.
        m: Lin,
        /// Rows per tile.
        tm: u64,
    },
}

impl Groups {
    /// Workgroups (spread over x and y) and the z count for `t` tokens
    /// from position `pos0`.
    pub fn at(&self, t: usize, pos0: usize) -> (u64, u64) {
        match self {
            Groups::Linear { n, div, z } => (n.at(t, pos0).div_ceil((*div).max(1)), z.at(t, pos0)),
            Groups::Tiles { tiles_n, m, tm } => (tiles_n * m.at(t, pos0).div_ceil((*tm).max(1)), 1),
        }
    }
}

/// A buffer a launch reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Buf {
    /// An intermediate value (after aliasing: reshapes share their input's).
    Value(usize),
    /// A chunk of a weight's raw GGUF bytes.
    Raw {
        /// Weight id.
        weight: usize,
        /// Chunk index.
        chunk: usize,
    },
    /// A weight dequantized to f32.
    F32(usize),
    /// Key cache of an attention.
    KCache(usize),
    /// Value cache of an attention.
    VCache(usize),
    /// A 4-byte placeholder for an absent optional input.
    Dummy,
    /// [`Plan::counters`] u32 words, zero before every launch that binds
    /// them: each such kernel leaves them zero (matmul_vec QLAST).
    Counters,
    /// A binding number the kernel does not declare (skipped).
    Unbound,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Launch {
    /// A kernel dispatch.
    Kernel {
        /// Index into [`Plan::kernels`].
        kernel: usize,
        /// Buffers bound at 0, 1, ... (the uniform parameters come last).
        binds: Vec<Buf>,
        /// The uniform parameters.
        params: Vec<Word>,
        /// Workgroups.
        groups: Groups,
        /// The graph nodes it computes (several when fused).
        nodes: Vec<usize>,
    },
    /// A buffer copy, in bytes.
    Copy {
        /// Source.
        src: Buf,
        /// Source offset.
        src_off: Lin,
        /// Destination.
        dst: Buf,
        /// Destination offset.
        dst_off: Lin,
        /// Bytes.
        size: Lin,
    },
}

/// A kernel variant the plan uses.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelRef {
    /// Template name.
    pub template: String,
    /// Chosen knob values.
    pub knobs: Knobs,
    /// Generated hook texts (fusion), empty for a plain variant.
    pub hooks: Hooks,
    /// What the hooks fuse, for names and headers (e.g. `rms_norm+qkv`).
    pub fused: String,
    /// Bindings that hold values: declared read_write, since values share
    /// arenas and wgpu forbids one buffer being read-only and writable in
    /// the same dispatch. Weights stay read-only.
    pub arena_bindings: Vec<u32>,
}

impl KernelRef {
    /// `template.knobvalue...`, then `.fused-WHAT-HASH` for a fused variant.
    pub fn name(&self) -> String {
        let mut n = codegen::variant_name(&self.template, &self.knobs);
        if !self.hooks.is_empty() {
            // FNV-1a of the hook text: two fusions of the same ops differ.
            let mut h: u32 = 0x811c9dc5;
            for b in self.hooks.values().flat_map(|t| t.bytes()) {
                h = (h ^ b as u32).wrapping_mul(0x01000193);
            }
            n.push_str(&format!(".fused-{}-{h:08x}", self.fused));
        }
        n
    }

    /// Generate and validate the WGSL.
    pub fn build(&self, caps: &Caps) -> Result<String> {
        let t = codegen::template(&self.template).map_err(|e| Error::Gpu(e.to_string()))?;
        let mut wgsl = t
            .generate_hooked(&self.knobs, &self.hooks)
            .map_err(|e| Error::Gpu(e.to_string()))?;
        for b in &self.arena_bindings {
            wgsl = wgsl.replace(
                &format!("@binding({b}) var<storage, read>"),
                &format!("@binding({b}) var<storage, read_write>"),
            );
        }
        codegen::validate(&wgsl, caps).map_err(|m| {
            Error::Gpu(format!(
                "kernel {} (fusing {}): {m}",
                self.name(),
                self.fused
            ))
        })?;
        Ok(wgsl)
    }
}

/// How a weight is stored on the GPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WeightPlan {
    /// Raw chunks: (first row, rows); rows are GGML dims[1..] flattened.
    pub chunks: Vec<(usize, usize)>,
    /// Bytes per row.
    pub row_bytes: usize,
    /// Whether a dequantized f32 copy is needed (norm weights, Weight op).
    pub f32_copy: bool,
    /// Whether the raw bytes are needed (MatMul, Embed).
    pub raw: bool,
}

/// A plan for one bucket.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// The bucket.
    pub bucket: Bucket,
    /// Kernel variants, each once.
    pub kernels: Vec<KernelRef>,
    /// Launches in order.
    pub launches: Vec<Launch>,
    /// Per value: the buffer it lives in (its own or an alias) and its bytes
    /// per token row (`None` for values not proportional to T... all are).
    pub value_buf: Vec<usize>,
    /// Per weight: storage.
    pub weights: Vec<WeightPlan>,
    /// Per value: whether the plan stores it (fused-away values are not).
    pub made: Vec<bool>,
    /// The fused schedule the launches come from.
    pub groups: Vec<fuse::Group>,
    /// (root value, f32 elements per token): buffers that hold more than
    /// their value, after it (a split attention's partials, the int8 input of
    /// a matmul stored after its output).
    #[serde(default)]
    pub extra: Vec<(usize, u64)>,
    /// Words of [`Buf::Counters`] the launches need.
    #[serde(default)]
    pub counters: u64,
}

impl Plan {
    /// Dispatches per step (kernel launches, not copies).
    pub fn dispatches(&self) -> usize {
        self.launches
            .iter()
            .filter(|l| matches!(l, Launch::Kernel { .. }))
            .count()
    }

    /// Bytes of the buffer of root value `v` for `t` tokens: the value and
    /// whatever [`Plan::extra`] puts after it.
    pub fn value_bytes(&self, g: &BoundGraph, v: usize, t: usize) -> u64 {
        let extra: u64 = self
            .extra
            .iter()
            .filter(|e| e.0 == v)
            .map(|e| e.1 * t as u64)
            .sum();
        (g.values[v].numel(t) as u64 + extra) * 4
    }

    /// Bytes of weight rows among `binds` (a launch's bindings): what a
    /// matmul reads of its weights.
    pub fn weight_bytes(&self, binds: &[Buf]) -> u64 {
        binds
            .iter()
            .filter_map(|b| match b {
                Buf::Raw { weight, chunk } => {
                    let w = self.weights.get(*weight)?;
                    Some((w.chunks.get(*chunk)?.1 * w.row_bytes) as u64)
                }
                _ => None,
            })
            .sum()
    }
}

/// Knobs the planner may pin for speed alone (any legal value computes the
/// same): `KILN_KNOBS` overrides its choice for them.
pub const TUNING_KNOBS: [&str; 2] = ["WG", "ROWS"];

/// One knob pin: `[TEMPLATE[@ROLE].]KNOB=VALUE`.
struct Pin<'a> {
    /// The template it applies to (None: every template with the knob).
    template: Option<&'a str>,
    /// The kernel role it applies to: what the kernel fuses, as `kiln plan`
    /// and the `fused-` part of kernel names show it (`rmsnorm+matmul3`);
    /// None: every kernel of the template.
    role: Option<&'a str>,
    knob: &'a str,
    value: &'a str,
}

/// The pins of a `KILN_KNOBS`-style string.
fn parse_pins(pins: &str) -> Result<Vec<Pin<'_>>> {
    pins.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pin| {
            let bad = || {
                Error::Input(format!(
                    "knob pin '{pin}' (KILN_KNOBS or --try) is not KNOB=VALUE, TEMPLATE.KNOB=VALUE or TEMPLATE@ROLE.KNOB=VALUE"
                ))
            };
            let (name, value) = pin.split_once('=').ok_or_else(bad)?;
            // (A role holds no '.', a knob name neither.)
            let (scope, knob) = match name.rsplit_once('.') {
                Some((scope, knob)) => (Some(scope), knob),
                None => (None, name),
            };
            let (template, role) = match scope.map(|s| s.split_once('@')) {
                Some(Some((t, r))) if !r.is_empty() => (Some(t), Some(r)),
                Some(Some(_)) => return Err(bad()),
                Some(None) => (scope, None),
                None => (None, None),
            };
            Ok(Pin {
                template,
                role,
                knob,
                value,
            })
        })
        .collect()
}

/// Role pins (`TEMPLATE@ROLE.KNOB=VALUE`) in `pins` that no kernel of
/// `plans` has: planned, they pinned nothing. Returns them with the roles
/// the plans do have, for the error.
pub fn unmatched_role_pins(pins: &str, plans: &[&Plan]) -> Result<Option<String>> {
    let kernels: Vec<&KernelRef> = plans.iter().flat_map(|p| &p.kernels).collect();
    let missing: Vec<String> = parse_pins(pins)?
        .iter()
        .filter_map(|p| {
            let role = p.role?;
            let found = kernels
                .iter()
                .any(|k| k.fused == role && p.template.is_none_or(|t| t == k.template));
            (!found).then(|| format!("{}@{role}", p.template.unwrap_or("")))
        })
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let mut roles: Vec<String> = kernels
        .iter()
        .filter(|k| !k.fused.is_empty())
        .map(|k| format!("{}@{}", k.template, k.fused))
        .collect();
    roles.sort();
    roles.dedup();
    Ok(Some(format!(
        "knob pins for {} match no kernel of this model's plans; its kernel roles: {}",
        missing.join(", "),
        roles.join(", ")
    )))
}

/// Check knob pins (`KILN_KNOBS` syntax) before planning with them: each
/// names a knob of some kernel template (of the one it names), with one of
/// that knob's values; a typo would otherwise pin nothing.
pub fn check_pins(pins: &str) -> Result<()> {
    let templates = codegen::templates().map_err(|e| Error::Gpu(e.to_string()))?;
    for Pin {
        template: tn,
        knob,
        value,
        ..
    } in parse_pins(pins)?
    {
        let named: Vec<_> = templates
            .iter()
            .filter(|t| tn.is_none_or(|tn| tn == t.name))
            .collect();
        if named.is_empty() {
            return Err(Error::Input(format!(
                "knob pin {}.{knob}={value}: no kernel template '{}' (see kernels/*.wgsl)",
                tn.unwrap_or(""),
                tn.unwrap_or("")
            )));
        }
        let with: Vec<_> = named
            .iter()
            .filter_map(|t| t.knobs.iter().find(|k| k.name == knob).map(|k| (t, k)))
            .collect();
        if with.is_empty() {
            return Err(Error::Input(format!(
                "knob pin {knob}={value}: no knob {knob} in {}",
                tn.unwrap_or("any kernel template")
            )));
        }
        if !with
            .iter()
            .any(|(_, k)| k.values.iter().any(|v| v == value))
        {
            let (t, k) = with[0];
            return Err(Error::Input(format!(
                "knob pin {knob}={value}: {}.{knob} takes {}",
                t.name,
                k.values.join(", ")
            )));
        }
    }
    Ok(())
}

/// The knob pins a plan applies: `explicit` ([`FuseOptions::knob_pins`]),
/// else the `KILN_KNOBS` environment variable's, checked ([`check_pins`]).
pub fn resolve_pins(explicit: Option<&str>) -> Result<Option<String>> {
    let pins = explicit
        .map(str::to_string)
        .or_else(|| std::env::var("KILN_KNOBS").ok());
    if let Some(p) = &pins {
        check_pins(p)?;
    }
    Ok(pins)
}

/// Pick a variant of `t` with the `fixed` knobs that `caps` can run, for a
/// kernel fusing `role` (its label, "" for a plain kernel). The cost model
/// for now: subgroups and f16 when available, and for every other knob the
/// value listed last in the template (templates list values from least to
/// most preferred). `kiln bench --try` compares others by hand.
///
/// `pins` (checked knob pins, from [`resolve_pins`]) override the choice
/// for experiments and tuning by hand: comma-separated `KNOB=VALUE`,
/// `TEMPLATE.KNOB=VALUE` or `TEMPLATE@ROLE.KNOB=VALUE` pins (e.g.
/// `matmul_vec.WG=64,matmul_vec@rmsnorm+matmul3.ROWS=2`), applied to every
/// kernel of that template (and role) that has the knob with that value
/// among its own and where the planner did not pin it itself, or pinned
/// it only as a speed choice ([`TUNING_KNOBS`]).
pub fn choose(
    t: &Template,
    fixed: &Knobs,
    caps: &Caps,
    pins: Option<&str>,
    role: &str,
) -> Result<Knobs> {
    let mut fixed = fixed.clone();
    for pin in parse_pins(pins.unwrap_or(""))? {
        // (A pin naming no template passes over templates whose knob does
        // not list its value; check_pins made sure some template does.)
        let applies = pin.template.is_none_or(|tn| tn == t.name)
            && pin.role.is_none_or(|r| r == role)
            && t.knobs
                .iter()
                .any(|k| k.name == pin.knob && k.values.iter().any(|v| v == pin.value));
        if applies && (!fixed.contains_key(pin.knob) || TUNING_KNOBS.contains(&pin.knob)) {
            fixed.insert(pin.knob.to_string(), pin.value.to_string());
        }
    }
    let fixed = &fixed;
    let variants = t
        .variants_pinned(fixed, caps)
        .map_err(|e| Error::Gpu(e.to_string()))?;
    let score = |k: &Knobs| -> Vec<i64> {
        let mut s = Vec::new();
        for name in ["SUBGROUPS", "F16"] {
            s.push(k.get(name).map_or(0, |v| (v != "0") as i64));
        }
        for knob in &t.knobs {
            let v = &k[&knob.name];
            s.push(knob.values.iter().position(|x| x == v).unwrap_or(0) as i64);
        }
        s
    };
    variants
        .into_iter()
        .filter(|k| fixed.iter().all(|(a, b)| k.get(a) == Some(b)))
        .max_by_key(score)
        .ok_or_else(|| {
            Error::Gpu(format!(
                "template {} has no variant with {} that this adapter can run{}",
                t.name,
                codegen::knobs_str(fixed),
                if pins.is_some() {
                    " (check the knob pins: KILN_KNOBS or --try)"
                } else {
                    ""
                }
            ))
        })
}

pub(crate) struct Builder {
    caps: Caps,
    /// Fused matmuls with rows longer than this read an int8 input
    /// ([`FuseOptions::f32_activations`]); None: never.
    pub(crate) int8_input_over_k: Option<usize>,
    /// [`FuseOptions::quantize_every_dtype`].
    pub(crate) quantize_every_dtype: bool,
    /// [`FuseOptions::merge_int8_apart`].
    pub(crate) merge_int8_apart: bool,
    /// [`FuseOptions::qout_last`].
    pub(crate) qout_last: bool,
    /// Words of [`Buf::Counters`] the launches so far need.
    pub(crate) counters: u64,
    /// The knob pins, resolved ([`resolve_pins`]).
    knob_pins: Option<String>,
    /// Per-token f32 elements stored after a value's own (see [`Plan::extra`]).
    pub(crate) extra: Vec<(usize, u64)>,
    templates: BTreeMap<String, Template>,
    kernels: Vec<KernelRef>,
    launches: Vec<Launch>,
}

impl Builder {
    fn kernel(
        &mut self,
        template: &str,
        fixed: &[(&str, &str)],
        hooks: Hooks,
        fused: &str,
        arena_bindings: Vec<u32>,
    ) -> Result<(usize, Knobs)> {
        let t = self
            .templates
            .get(template)
            .ok_or_else(|| Error::Gpu(format!("no kernel template '{template}'")))?;
        let fixed: Knobs = fixed
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let knobs = choose(t, &fixed, &self.caps, self.knob_pins.as_deref(), fused)?;
        let r = KernelRef {
            template: template.into(),
            knobs: knobs.clone(),
            hooks,
            fused: fused.into(),
            arena_bindings,
        };
        let i = match self.kernels.iter().position(|k| *k == r) {
            Some(i) => i,
            None => {
                self.kernels.push(r);
                self.kernels.len() - 1
            }
        };
        Ok((i, knobs))
    }

    fn launch(
        &mut self,
        node: usize,
        template: &str,
        fixed: &[(&str, &str)],
        binds: Vec<Buf>,
        params: Vec<Word>,
        groups: impl FnOnce(&Knobs) -> Groups,
    ) -> Result<()> {
        self.launch_fused(
            vec![node],
            template,
            fixed,
            Hooks::new(),
            "",
            binds,
            params,
            groups,
        )
    }

    /// A launch of a template variant with generated hooks, computing `nodes`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_fused(
        &mut self,
        nodes: Vec<usize>,
        template: &str,
        fixed: &[(&str, &str)],
        hooks: Hooks,
        fused: &str,
        binds: Vec<Buf>,
        params: Vec<Word>,
        groups: impl FnOnce(&Knobs) -> Groups,
    ) -> Result<()> {
        let arena = binds
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b, Buf::Value(_)))
            .map(|(i, _)| i as u32)
            .collect();
        let (kernel, knobs) = self.kernel(template, fixed, hooks, fused, arena)?;
        self.launches.push(Launch::Kernel {
            kernel,
            binds,
            params,
            groups: groups(&knobs),
            nodes,
        });
        Ok(())
    }

    /// Reserve `words` u32 words per token after value `v`'s own elements
    /// and whatever was reserved there before (see [`Plan::extra`]); the
    /// word where they start.
    pub(crate) fn reserve_after(
        &mut self,
        g: &BoundGraph,
        root: usize,
        v: crate::graph::ir::ValueId,
        words: u64,
    ) -> Lin {
        let before: u64 = self.extra.iter().filter(|e| e.0 == root).map(|e| e.1).sum();
        self.extra.push((root, words));
        let n = numel(&g.values[v].shape);
        Lin {
            t: n.t + before,
            ..n
        }
    }
}

pub(crate) fn knob(k: &Knobs, name: &str, default: u64) -> u64 {
    k.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Elements of a value as a linear function of T.
pub(crate) fn numel(shape: &[Dim]) -> Lin {
    let mut fixed = 1u64;
    let mut has_t = false;
    for d in shape {
        match d {
            Dim::Tokens => has_t = true,
            Dim::Fixed(n) => fixed *= *n as u64,
        }
    }
    if has_t {
        Lin::t(fixed)
    } else {
        Lin::c(fixed)
    }
}

pub(crate) fn u(l: Lin) -> Word {
    Word::U(l)
}

pub(crate) fn uc(c: usize) -> Word {
    Word::U(Lin::c(c as u64))
}

/// Plan `g` for `bucket` on an adapter with `caps`; weights larger than
/// `max_binding` bytes are split into row chunks.
pub fn plan(g: &BoundGraph, bucket: Bucket, caps: Caps, max_binding: u64) -> Result<Plan> {
    plan_with(g, bucket, caps, max_binding, &FuseOptions::default())
}

/// [`plan`] with some fusion passes turned off.
pub fn plan_with(
    g: &BoundGraph,
    bucket: Bucket,
    caps: Caps,
    max_binding: u64,
    opts: &FuseOptions,
) -> Result<Plan> {
    let templates = codegen::templates()
        .map_err(|e| Error::Gpu(e.to_string()))?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mut b = Builder {
        caps,
        int8_input_over_k: opts.int8_over_k(),
        quantize_every_dtype: opts.quantize_every_dtype,
        merge_int8_apart: opts.merge_int8_apart,
        qout_last: opts.qout_last_on()?,
        counters: 0,
        knob_pins: resolve_pins(opts.knob_pins.as_deref())?,
        extra: Vec::new(),
        templates,
        kernels: Vec::new(),
        launches: Vec::new(),
    };
    // Weights: raw chunks for matmul/embed, f32 copies for the rest.
    let mut weights: Vec<WeightPlan> = g
        .weights
        .iter()
        .map(|w| {
            let row_elems = w.dims[0];
            let rows: usize = w.dims[1..].iter().product();
            let row_bytes = w.dtype.bytes_for(row_elems as u64).unwrap_or(0) as usize;
            let per_chunk = ((max_binding as usize) / row_bytes.max(1)).max(1);
            let chunks = (0..rows)
                .step_by(per_chunk)
                .map(|r| (r, per_chunk.min(rows - r)))
                .collect();
            WeightPlan {
                chunks,
                row_bytes,
                f32_copy: false,
                raw: false,
            }
        })
        .collect();
    if let Some(w) = g
        .weights
        .iter()
        .zip(&weights)
        .find(|(_, p)| p.row_bytes as u64 > max_binding)
    {
        return Err(Error::Gpu(format!(
            "one row of weight '{}' ({} bytes) exceeds the adapter's max_storage_buffer_binding_size ({max_binding} bytes)",
            w.0.name, w.1.row_bytes
        )));
    }
    // Reshape outputs share their input's buffer.
    let mut value_buf: Vec<usize> = (0..g.values.len()).collect();
    for n in &g.nodes {
        if matches!(n.op, BoundOp::Reshape) {
            value_buf[n.output] = value_buf[n.inputs[0]];
        }
    }
    let tiled = bucket == Bucket::Many;
    let groups = if bucket == Bucket::One {
        fuse::fuse(g, opts, true)
    } else {
        fuse::fuse(g, &FuseOptions::none(), false)
    };
    let made = fuse::check(g, &groups).map_err(|m| {
        Error::Gpu(format!(
            "fusion made an invalid schedule ({m}); turn passes off with --no-fuse to bisect"
        ))
    })?;
    let quant = if bucket == Bucket::One && opts.on("quantize") {
        hooks::plan_producer_quantize(&mut b, g, &groups, &weights, &value_buf)
    } else {
        hooks::Quantized::default()
    };
    for (gi, gr) in groups.iter().enumerate() {
        match gr {
            Group::Single(i) => plan_node(&mut b, g, *i, &mut weights, &value_buf, tiled)?,
            // A matmul nothing fused with is planned as itself (tiled in prefill).
            Group::Matvec(m) if hooks::plain_matmul(m) => {
                plan_node(&mut b, g, m.mats[0], &mut weights, &value_buf, tiled)?
            }
            Group::Matvec(m) => {
                hooks::plan_matvec(&mut b, g, gi, m, &quant, &mut weights, &value_buf)?
            }
            Group::Attention(a) => hooks::plan_attention(&mut b, g, a, &mut weights, &value_buf)?,
        }
    }
    let mut extra: Vec<(usize, u64)> = groups
        .iter()
        .filter_map(|gr| match gr {
            Group::Attention(a) if a.splits > 1 => Some((
                value_buf[g.nodes[a.attn].output],
                hooks::extra_elements(g, a) as u64,
            )),
            _ => None,
        })
        .collect();
    extra.extend(b.extra);
    Ok(Plan {
        bucket,
        kernels: b.kernels,
        launches: b.launches,
        value_buf,
        weights,
        made,
        groups,
        extra,
        counters: b.counters,
    })
}

/// Plan one graph node on its own (unfused).
fn plan_node(
    b: &mut Builder,
    g: &BoundGraph,
    i: usize,
    weights: &mut [WeightPlan],
    value_buf: &[usize],
    tiled: bool,
) -> Result<()> {
    let vb = |v: usize| Buf::Value(value_buf[v]);
    let n = &g.nodes[i];
    let in_shape = |j: usize| &g.values[n.inputs[j]].shape;
    let out = vb(n.output);
    let last = |s: &[Dim]| match s.last() {
        Some(Dim::Fixed(d)) => *d,
        _ => 1,
    };
    match &n.op {
        BoundOp::Embed { table } => {
            let w = &g.weights[*table];
            weights[*table].raw = true;
            let dt = w.dtype.gpu_layout(w.dims[0]);
            for (c, &(first, rows)) in weights[*table].chunks.clone().iter().enumerate() {
                b.launch(
                    i,
                    "embed",
                    &[("DTYPE", &dt)],
                    vec![
                        Buf::Raw {
                            weight: *table,
                            chunk: c,
                        },
                        vb(n.inputs[0]),
                        out,
                    ],
                    vec![u(Lin::t(1)), uc(w.dims[0]), uc(first), uc(rows)],
                    |_| Groups::Linear {
                        n: Lin::t(1),
                        div: 1,
                        z: Lin::c(1),
                    },
                )?;
            }
        }
        BoundOp::MatMul { w } => {
            let wd = &g.weights[*w];
            weights[*w].raw = true;
            let (k, nn) = (wd.dims[0], wd.dims[1]);
            let m = {
                let e = numel(in_shape(0));
                Lin {
                    t: e.t / k as u64,
                    p: 0,
                    c: e.c / k as u64,
                }
            };
            let dt = wd.dtype.gpu_layout(k);
            for (c, &(first, rows)) in weights[*w].chunks.clone().iter().enumerate() {
                let binds = vec![
                    Buf::Raw {
                        weight: *w,
                        chunk: c,
                    },
                    vb(n.inputs[0]),
                    out,
                ];
                let params = vec![u(m), uc(k), uc(rows), uc(first), uc(nn)];
                if tiled {
                    b.launch(i, "matmul_tiled", &[("DTYPE", &dt)], binds, params, |kn| {
                        let tn = knob(kn, "TN", 1);
                        Groups::Tiles {
                            tiles_n: (rows as u64).div_ceil(tn),
                            m,
                            tm: knob(kn, "TM", 1),
                        }
                    })?;
                } else {
                    // matmul_vec's default hook: w_a, (w_b, w_c), x, y, params.
                    let binds = vec![binds[0], Buf::Unbound, Buf::Unbound, binds[1], binds[2]];
                    let params = vec![
                        u(m),
                        uc(k),
                        uc(rows),
                        uc(0),
                        uc(0),
                        uc(first),
                        uc(nn),
                        uc(0),
                        uc(0),
                    ];
                    b.launch(
                        i,
                        "matmul_vec",
                        &[
                            ("DTYPE", &dt),
                            ("DTYPE_B", "NONE"),
                            ("DTYPE_C", "NONE"),
                            ("PAIR", "0"),
                            ("XS", "0"),
                            ("XQ", "0"),
                            ("QOUT", "0"),
                        ],
                        binds,
                        params,
                        |kn| Groups::Linear {
                            n: Lin::c(rows as u64),
                            div: knob(kn, "ROWS", 1),
                            z: m,
                        },
                    )?;
                }
            }
        }
        BoundOp::RmsNorm { weight, eps } => {
            let d = last(in_shape(0));
            let rows = numel(in_shape(0));
            let rows = Lin {
                t: rows.t / d as u64,
                p: 0,
                c: rows.c / d as u64,
            };
            if let Some(w) = weight {
                weights[*w].f32_copy = true;
            }
            let wbuf = weight.map_or(Buf::Dummy, Buf::F32);
            b.launch(
                i,
                "rms_norm",
                &[],
                vec![vb(n.inputs[0]), wbuf, out],
                vec![
                    uc(d),
                    u(rows),
                    Word::F(*eps as f32),
                    uc(weight.is_some() as usize),
                ],
                |_| Groups::Linear {
                    n: rows,
                    div: 1,
                    z: Lin::c(1),
                },
            )?;
        }
        BoundOp::LayerNorm { weight, bias, eps } => {
            let d = last(in_shape(0));
            let rows = numel(in_shape(0));
            let rows = Lin {
                t: rows.t / d as u64,
                p: 0,
                c: rows.c / d as u64,
            };
            for w in [weight, bias].into_iter().flatten() {
                weights[*w].f32_copy = true;
            }
            let flags = weight.is_some() as usize | (bias.is_some() as usize) << 1;
            b.launch(
                i,
                "layer_norm",
                &[],
                vec![
                    vb(n.inputs[0]),
                    weight.map_or(Buf::Dummy, Buf::F32),
                    bias.map_or(Buf::Dummy, Buf::F32),
                    out,
                ],
                vec![uc(d), u(rows), Word::F(*eps as f32), uc(flags)],
                |_| Groups::Linear {
                    n: rows,
                    div: 1,
                    z: Lin::c(1),
                },
            )?;
        }
        BoundOp::Rope {
            mode,
            base,
            dims,
            scale,
        } => {
            let (h, d) = heads(in_shape(0));
            let neox = if *mode == RopeMode::Neox { "1" } else { "0" };
            b.launch(
                i,
                "rope",
                &[("NEOX", neox)],
                vec![vb(n.inputs[0]), out],
                vec![
                    u(Lin::t(1)),
                    uc(h),
                    uc(d),
                    uc(*dims),
                    u(Lin::pos(1)),
                    Word::F(*base as f32),
                    Word::F(*scale as f32),
                ],
                |_| Groups::Linear {
                    n: Lin::t(h as u64),
                    div: 1,
                    z: Lin::c(1),
                },
            )?;
        }
        BoundOp::Attention {
            scale,
            window,
            softcap,
            cache,
        } => {
            let c = g.caches[*cache];
            let (h, d) = heads(in_shape(0));
            let kw = (c.kv_heads * c.k_dim * 4) as u64;
            let vw = (c.kv_heads * c.v_dim * 4) as u64;
            b.launches.push(Launch::Copy {
                src: vb(n.inputs[1]),
                src_off: Lin::c(0),
                dst: Buf::KCache(*cache),
                dst_off: Lin::pos(kw),
                size: Lin::t(kw),
            });
            b.launches.push(Launch::Copy {
                src: vb(n.inputs[2]),
                src_off: Lin::c(0),
                dst: Buf::VCache(*cache),
                dst_off: Lin::pos(vw),
                size: Lin::t(vw),
            });
            b.launch(
                i,
                "attention",
                &[("PREP", "0"), ("SPLIT", "1")],
                vec![
                    vb(n.inputs[0]),
                    Buf::KCache(*cache),
                    Buf::VCache(*cache),
                    out,
                ],
                vec![
                    u(Lin::t(1)),
                    uc(h),
                    uc(c.kv_heads),
                    uc(d),
                    uc(c.v_dim),
                    u(Lin::pos(1)),
                    uc(window.unwrap_or(0)),
                    Word::F(*scale as f32),
                    Word::F(softcap.unwrap_or(0.0) as f32),
                ],
                |_| Groups::Linear {
                    n: Lin::t(h as u64),
                    div: 1,
                    z: Lin::c(1),
                },
            )?;
        }
        BoundOp::Add | BoundOp::Mul => {
            let op = if matches!(n.op, BoundOp::Add) {
                "add"
            } else {
                "mul"
            };
            let ne = numel(in_shape(0));
            let nb = numel(in_shape(1));
            b.launch(
                i,
                "binary",
                &[("OP", op)],
                vec![vb(n.inputs[0]), vb(n.inputs[1]), out],
                vec![u(ne), u(nb)],
                |kn| Groups::Linear {
                    n: ne,
                    div: knob(kn, "WG", 1),
                    z: Lin::c(1),
                },
            )?;
        }
        BoundOp::Scale { .. } | BoundOp::Softcap { .. } | BoundOp::Unary(_) => {
            let (op, alpha) = match &n.op {
                BoundOp::Scale { by } => ("scale", *by),
                BoundOp::Softcap { cap } => ("softcap", *cap),
                BoundOp::Unary(Unary::Silu) => ("silu", 0.0),
                BoundOp::Unary(Unary::Gelu) => ("gelu", 0.0),
                BoundOp::Unary(Unary::GeluTanh) => ("gelu_tanh", 0.0),
                BoundOp::Unary(Unary::Tanh) => ("tanh", 0.0),
                _ => ("relu", 0.0),
            };
            let ne = numel(in_shape(0));
            b.launch(
                i,
                "unary",
                &[("OP", op)],
                vec![vb(n.inputs[0]), out],
                vec![u(ne), Word::F(alpha as f32)],
                |kn| Groups::Linear {
                    n: ne,
                    div: knob(kn, "WG", 1),
                    z: Lin::c(1),
                },
            )?;
        }
        BoundOp::Softmax | BoundOp::Argmax => {
            let d = last(in_shape(0));
            let rows = numel(in_shape(0));
            let rows = Lin {
                t: rows.t / d as u64,
                p: 0,
                c: rows.c / d as u64,
            };
            let t = if matches!(n.op, BoundOp::Softmax) {
                "softmax"
            } else {
                "argmax"
            };
            b.launch(
                i,
                t,
                &[],
                vec![vb(n.inputs[0]), out],
                vec![u(rows), uc(d)],
                |_| Groups::Linear {
                    n: rows,
                    div: 1,
                    z: Lin::c(1),
                },
            )?;
        }
        BoundOp::Reshape => {}
        BoundOp::Slice { axis, start, len } => {
            let (outer, inner, x_len) = strides(in_shape(0), *axis);
            copy_strided(
                b,
                i,
                vb(n.inputs[0]),
                out,
                outer,
                inner,
                *len,
                x_len,
                *start,
                *len,
                0,
            )?;
        }
        BoundOp::Concat { axis } => {
            let y_len = match g.values[n.output].shape[*axis] {
                Dim::Fixed(v) => v,
                Dim::Tokens => 0,
            };
            let mut at = 0;
            for j in 0..n.inputs.len() {
                let (outer, inner, x_len) = strides(in_shape(j), *axis);
                copy_strided(
                    b,
                    i,
                    vb(n.inputs[j]),
                    out,
                    outer,
                    inner,
                    x_len,
                    x_len,
                    0,
                    y_len,
                    at,
                )?;
                at += x_len;
            }
        }
        BoundOp::Weight { w } => {
            weights[*w].f32_copy = true;
            let bytes = (g.weights[*w].numel() * 4) as u64;
            b.launches.push(Launch::Copy {
                src: Buf::F32(*w),
                src_off: Lin::c(0),
                dst: out,
                dst_off: Lin::c(0),
                size: Lin::c(bytes),
            });
        }
    }
    Ok(())
}

pub(crate) fn heads(s: &[Dim]) -> (usize, usize) {
    match s {
        [_, Dim::Fixed(h), Dim::Fixed(d)] => (*h, *d),
        _ => (1, 1),
    }
}

/// (outer, inner, axis length) around `axis`; T counts in `outer` as a Lin.
fn strides(s: &[Dim], axis: usize) -> (Lin, usize, usize) {
    let outer = numel(&s[..axis]);
    let inner: usize = s[axis + 1..]
        .iter()
        .map(|d| if let Dim::Fixed(n) = d { *n } else { 1 })
        .product();
    let len = if let Some(Dim::Fixed(n)) = s.get(axis) {
        *n
    } else {
        1
    };
    (outer, inner, len)
}

#[allow(clippy::too_many_arguments)]
fn copy_strided(
    b: &mut Builder,
    node: usize,
    x: Buf,
    y: Buf,
    outer: Lin,
    inner: usize,
    len: usize,
    x_len: usize,
    x_start: usize,
    y_len: usize,
    y_start: usize,
) -> Result<()> {
    let total = Lin {
        t: outer.t * (len * inner) as u64,
        p: 0,
        c: outer.c * (len * inner) as u64,
    };
    b.launch(
        node,
        "copy_strided",
        &[],
        vec![x, y],
        vec![
            u(outer),
            uc(inner),
            uc(len),
            uc(x_len),
            uc(x_start),
            uc(y_len),
            uc(y_start),
        ],
        |kn| Groups::Linear {
            n: total,
            div: knob(kn, "WG", 1),
            z: Lin::c(1),
        },
    )
}

/// Every kernel the decode and prefill plans use, as (file name, WGSL):
/// named `template.knobvalues.wgsl` (op, dtype and knobs), each with a
/// header saying what it is for and which graph ops use it.
pub fn kernel_sources(
    g: &BoundGraph,
    caps: Caps,
    max_binding: u64,
) -> Result<Vec<(String, String)>> {
    kernel_sources_with(g, caps, max_binding, &FuseOptions::default())
}

/// [`kernel_sources`] with fusion options.
pub fn kernel_sources_with(
    g: &BoundGraph,
    caps: Caps,
    max_binding: u64,
    opts: &FuseOptions,
) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for bucket in [Bucket::One, Bucket::Many] {
        let p = plan_with(g, bucket, caps, max_binding, opts)?;
        for (i, k) in p.kernels.iter().enumerate() {
            let file = format!("{}.wgsl", k.name());
            if out.iter().any(|(f, _)| *f == file) {
                continue;
            }
            let wgsl = k.build(&caps)?;
            let uses = p
                .launches
                .iter()
                .filter(|l| matches!(l, Launch::Kernel { kernel, .. } if *kernel == i))
                .count();
            let header = format!(
                "// used by the {} plan: {uses} launch(es) per step\n",
                if bucket == Bucket::One {
                    "decode"
                } else {
                    "prefill"
                }
            );
            out.push((file, header + &wgsl));
        }
    }
    Ok(out)
}

/// Write [`kernel_sources`] into `dir`; returns the paths.
pub fn write_kernels(
    g: &BoundGraph,
    caps: Caps,
    max_binding: u64,
    dir: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
    let mut paths = Vec::new();
    for (f, src) in kernel_sources(g, caps, max_binding)? {
        let p = dir.join(f);
        std::fs::write(&p, src)
            .map_err(|e| Error::Input(format!("cannot write {}: {e}", p.display())))?;
        paths.push(p);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::check_pins;

    /// Knob pins are checked against the templates before anything is
    /// planned: a typo must not pin nothing in silence.
    #[test]
    fn knob_pins_are_checked() {
        for good in [
            "matmul_vec.WG=64",
            "WG=128,ROWS=2",
            " attention.WG=128 , matmul_vec.PAIR=1 ",
            "matmul_vec@rmsnorm+matmul3.ROWS=2",
            "",
        ] {
            check_pins(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for (bad, says) in [
            ("foo", "is not KNOB=VALUE"),
            ("matmul_vec@.WG=64", "TEMPLATE@ROLE.KNOB=VALUE"),
            ("nosuch@matmul1+add.WG=64", "no kernel template 'nosuch'"),
            ("matmul_vec.WGG=64", "no knob WGG in matmul_vec"),
            ("nosuch.WG=64", "no kernel template 'nosuch'"),
            ("matmul_vec.WG=7", "matmul_vec.WG takes 32, 64"),
            ("NOSUCHKNOB=1", "no knob NOSUCHKNOB in any kernel template"),
        ] {
            let e = check_pins(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
