//! Fusion passes: a bound graph's nodes become a schedule of [`Group`]s,
//! each one dispatch (or one per weight chunk). The passes work on graph
//! patterns, never on names (DESIGN rules 1 and 5), and each can be turned
//! off by name to bisect a wrong result (`--no-fuse NAME`):
//!
//! - `siblings`: matmuls that read the same input become one dispatch
//!   (Q, K and V; gate and up), each weight with its own dtype;
//! - `gated`: `act(x·Wa) * (x·Wb)` of two siblings is computed in the
//!   dispatch's epilogue (SwiGLU, GEGLU), so neither product is stored;
//! - `epilogue`: elementwise ops that alone consume a matmul's output
//!   (residual add, bias, scale, activation, softcap) run on its store;
//! - `prologue`: the row-local ops a matmul's input comes from (RMSNorm,
//!   adds, scales, activations, back to the last matmul or embedding) run
//!   on its load; values others still need are written by one workgroup.
//!   Staged only where it pays: rows up to [`PROLOGUE_PAYS_UP_TO_K`]
//!   elements; a longer row folds a lone RMSNorm in as a scale of the dot
//!   products ([`Matvec::scaled`]);
//! - `attention`: in decode, the per-head norm and rotary embedding of q and
//!   k and the KV-cache write run inside the attention dispatch;
//! - `split`: a fused decode attention runs as split-K over the cache length
//!   ([`attention_splits`] workgroups per head, each writing a partial
//!   softmax row); the partials are merged in the prologue of the matmul
//!   that reads the attention output where a prologue pays (rows up to
//!   [`PROLOGUE_PAYS_UP_TO_K`], the `prologue` pass on), else by a small
//!   merge dispatch of their own.
//! - `quantize` (decode plans, planned in src/plan/hooks.rs): where a
//!   matmul reads its row as int8 and that row (raw or under a lone
//!   RMSNorm) is the single output of the fused matmul before it (whose
//!   weights are of a dtype where this pays), the
//!   producer's workgroups each own whole 32-row blocks and quantize them
//!   on their store, instead of a quantize_rows dispatch between the two.
//!
//! Fused decode kernels are matrix × vector kernels; prefill plans use the
//! same passes except `attention` (see [`fuse`]).

use std::collections::BTreeSet;

use crate::graph::ir::{BoundGraph, BoundOp, Dim, ValueId};

/// The fusion passes, in the order they run.
pub const PASSES: [&str; 7] = [
    "siblings",
    "gated",
    "epilogue",
    "prologue",
    "attention",
    "split",
    "quantize",
];

/// One dispatch of a fused schedule (before weight chunking).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Group {
    /// A node planned on its own.
    Single(usize),
    /// Matrix × vector with fused neighbours.
    Matvec(Matvec),
    /// Decode attention with the q/k prep and the KV-cache write inside.
    Attention(AttnPrep),
}

/// A fused matrix × vector group.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Matvec {
    /// MatMul nodes (1 to 3) reading the same input: weights A, B, C.
    pub mats: Vec<usize>,
    /// Gated pair: the optional activation node on A's output and the Mul
    /// of it with B's output.
    pub pair: Option<(Option<usize>, usize)>,
    /// Row-local nodes computing the input, in evaluation order, each with
    /// the index of its operand that carries the running row.
    pub prologue: Vec<(usize, usize)>,
    /// Elementwise nodes applied to the (single) output, in order, each with
    /// the operand index that carries the running value.
    pub epilogue: Vec<(usize, usize)>,
    /// Sibling groups (2-3 weights, no pair): elementwise nodes on each
    /// weight's own output (a bias on each of Q, K and V), as `epilogue`.
    #[serde(default)]
    pub seg_epilogue: Vec<Vec<(usize, usize)>>,
    /// Weight nodes whose only reader is an epilogue node here: the kernel
    /// reads the weight's f32 copy itself (no copy into a value first).
    #[serde(default)]
    pub consts: Vec<usize>,
    /// The input row is the merge of a split decode attention's partials
    /// (instead of a prologue chain).
    #[serde(default)]
    pub merge: Option<Merge>,
    /// The prologue is one RMSNorm too long to stage, folded in as a scale:
    /// the kernel reads the raw row times the norm weight, sums its squares
    /// on the way, and scales each dot product by 1/rms (RMSNorm is linear
    /// up to that scalar).
    #[serde(default)]
    pub scaled: bool,
}

/// A matmul prologue merging a split decode attention's partials.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Merge {
    /// The Attention node (planned in its own group).
    pub attn: usize,
    /// The Reshape between it and the matmul, absorbed into the matmul's group.
    pub reshape: Option<usize>,
    /// The attention's split count.
    pub splits: usize,
}

/// A fused decode attention: the attention node and the nodes between it
/// and the q, k, v projections (reshapes, per-head norms, rope).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttnPrep {
    /// The Attention node.
    pub attn: usize,
    /// Values read: the raw q, k, v rows.
    pub src: [ValueId; 3],
    /// Per-head RMSNorm nodes on q and k (if any).
    pub norm: [Option<usize>; 2],
    /// Rope nodes on q and k (if any; both or neither).
    pub rope: [Option<usize>; 2],
    /// Every absorbed node (reshapes too).
    pub absorbed: Vec<usize>,
    /// Workgroups per head (split-K over the keys); 1: not split.
    #[serde(default = "one")]
    pub splits: usize,
    /// With `splits > 1`: whether the consumer matmul's prologue merges the
    /// partials (else the group's own merge dispatch does, and the output
    /// is stored as usual).
    #[serde(default)]
    pub merged_by_consumer: bool,
}

fn one() -> usize {
    1
}

impl Group {
    /// Every graph node this group computes, in graph order.
    pub fn nodes(&self) -> Vec<usize> {
        let mut v = match self {
            Group::Single(n) => vec![*n],
            Group::Matvec(m) => {
                let mut v = m.mats.clone();
                if let Some((a, mul)) = m.pair {
                    v.extend(a);
                    v.push(mul);
                }
                v.extend(m.prologue.iter().map(|p| p.0));
                v.extend(m.epilogue.iter().map(|p| p.0));
                v.extend(m.seg_epilogue.iter().flatten().map(|p| p.0));
                v.extend(&m.consts);
                v.extend(m.merge.and_then(|mg| mg.reshape));
                v
            }
            Group::Attention(a) => {
                let mut v = a.absorbed.clone();
                v.push(a.attn);
                v
            }
        };
        v.sort_unstable();
        v
    }

    /// The node whose place in graph order the group takes.
    pub fn anchor(&self) -> usize {
        match self {
            Group::Single(n) => *n,
            Group::Matvec(m) => m.mats[0],
            Group::Attention(a) => a.attn,
        }
    }
}

/// Which passes run and for which step shape.
#[derive(Debug, Clone, Default)]
pub struct FuseOptions {
    /// Pass names turned off.
    pub disabled: Vec<String>,
    /// Force the split count of every fused decode attention (1, 2, 4, 8,
    /// 16 or 32; tests and tuning) instead of [`attention_splits`]'s choice.
    pub splits: Option<usize>,
    /// Stage prologue rows up to this many elements (default
    /// [`PROLOGUE_PAYS_UP_TO_K`]); longer rows fold a lone RMSNorm in as a
    /// scale instead. Tests set 0 to exercise the scaled form on small models.
    pub stage_up_to_k: Option<usize>,
    /// Keep every matmul input in f32. By default a fused decode matmul
    /// whose rows are too long to stage (the same bound as
    /// `stage_up_to_k`) and whose weights are Q4_0, Q4_1, Q8_0, Q4_K or
    /// Q6_K reads its input quantized to int8 per 32 elements by a
    /// quantize_rows dispatch, and multiplies with integer dot products, as
    /// llama.cpp does (its logits are within ~0.2 of the exact ones).
    pub f32_activations: bool,
    /// Run the `quantize` pass for producers of every int8-capable dtype,
    /// not only where it pays on the measured GPU (single weights, and
    /// pairs of re-laid Q4_0 or of Q4_K weights: see src/plan/hooks.rs).
    /// Tests set it to exercise every dtype; `bench --try qevery=1` times
    /// it.
    pub quantize_every_dtype: bool,
    /// Merge a split attention's partials for an int8 reader in a
    /// quantize_rows dispatch even where the reader's own prologue could
    /// (the planner keeps the dispatch only for narrow readers). Tests set
    /// it to exercise that path.
    pub merge_int8_apart: bool,
    /// Knob pins in `KILN_KNOBS` syntax (`matmul_vec.WG=64,ROWS=2`; see
    /// [`crate::plan::choose`]) for this plan alone; None: the
    /// `KILN_KNOBS` environment variable's. `kiln bench --try` times
    /// several in one process.
    pub knob_pins: Option<String>,
    /// A matmul that quantizes its own output (the `quantize` pass) keeps
    /// a plain matmul's workgroups, and the last workgroup of each 32-row
    /// block quantizes it (matmul_vec QLAST), instead of workgroups that
    /// own whole blocks; and then pairs of any dtype quantize their
    /// output. None: `KILN_QLAST=1` turns it on, else off.
    pub qout_last: Option<bool>,
}

impl FuseOptions {
    /// Whether QLAST is asked for (`qout_last`, else `KILN_QLAST`).
    pub fn qout_last_on(&self) -> Result<bool, crate::error::Error> {
        match self.qout_last {
            Some(on) => Ok(on),
            None => match std::env::var("KILN_QLAST").as_deref() {
                Ok("1") => Ok(true),
                Ok("0") | Err(_) => Ok(false),
                Ok(v) => Err(crate::error::Error::Input(format!(
                    "KILN_QLAST={v}: give 1 (on) or 0 (off)"
                ))),
            },
        }
    }

    /// Rows up to this many elements are staged in a prologue
    /// (`stage_up_to_k`, default [`PROLOGUE_PAYS_UP_TO_K`]).
    pub fn stage_limit(&self) -> usize {
        self.stage_up_to_k.unwrap_or(PROLOGUE_PAYS_UP_TO_K)
    }

    /// Matmuls with rows longer than this read an int8 input where their
    /// weights allow ([`FuseOptions::f32_activations`]); None: never.
    pub fn int8_over_k(&self) -> Option<usize> {
        (!self.f32_activations).then(|| self.stage_limit())
    }

    /// Whether `pass` runs.
    pub fn on(&self, pass: &str) -> bool {
        !self.disabled.iter().any(|d| d == pass)
    }

    /// All passes off.
    pub fn none() -> FuseOptions {
        FuseOptions {
            disabled: PASSES.iter().map(|s| s.to_string()).collect(),
            splits: None,
            stage_up_to_k: None,
            f32_activations: false,
            quantize_every_dtype: false,
            merge_int8_apart: false,
            knob_pins: None,
            qout_last: None,
        }
    }
}

/// Decode attention workgroups to aim for in one dispatch: about two per SM
/// of a large GPU (132 on an H100). One workgroup per head leaves most of
/// such a GPU idle, and attention over a long cache is then latency-bound.
const TARGET_ATTENTION_WORKGROUPS: usize = 256;

/// Fewest keys of the longest context a split should cover: below this the
/// per-split fixed cost (q prep, one partial row, its share of the merge)
/// outweighs the keys it scores.
const MIN_KEYS_PER_SPLIT: usize = 64;

/// The most splits the planner picks. Measured on an H200 at a 514-position
/// cache: the attention kernel's time is mostly fixed cost, so more splits
/// barely shorten it, while the merge grows with S (SmolLM2's output
/// projection merging 32 splits in its prologue took 40% of the decode
/// step; the 8B shape's merge dispatch 227 -> 366 µs from 8 to 32 splits).
pub const MAX_ATTENTION_SPLITS: usize = 8;

/// The split-K count of a decode attention with `heads` query heads that
/// attends to at most `keys` keys (the context, or the sliding window):
/// the smallest power of two giving `heads · S ≥` [`TARGET_ATTENTION_WORKGROUPS`],
/// at most [`MAX_ATTENTION_SPLITS`] (the merge reads S partial rows per
/// output element), and
/// lowered until each split covers at least [`MIN_KEYS_PER_SPLIT`] keys of
/// the longest context. 1 (one workgroup per head, no merge) when the
/// heads alone fill the GPU or the context is short. Fixed at plan time (a
/// recorded step replays with fixed workgroup counts); the kernel divides
/// the keys attended at each step among the splits.
pub fn attention_splits(heads: usize, keys: usize) -> usize {
    let mut s = 1;
    while heads * s < TARGET_ATTENTION_WORKGROUPS && s < MAX_ATTENTION_SPLITS {
        s *= 2;
    }
    while s > 1 && keys / s < MIN_KEYS_PER_SPLIT {
        s /= 2;
    }
    s
}

/// Whether a node is an elementwise op on one row (epilogue/prologue-able).
fn elementwise(op: &BoundOp) -> bool {
    matches!(
        op,
        BoundOp::Add
            | BoundOp::Mul
            | BoundOp::Scale { .. }
            | BoundOp::Unary(_)
            | BoundOp::Softcap { .. }
    )
}

fn last_dim(g: &BoundGraph, v: ValueId) -> usize {
    match g.values[v].shape.last() {
        Some(Dim::Fixed(n)) => *n,
        _ => 0,
    }
}

/// Elements per token of a value (its shape without the token dim).
fn per_token(g: &BoundGraph, v: ValueId) -> usize {
    g.values[v]
        .shape
        .iter()
        .map(|d| if let Dim::Fixed(n) = d { *n } else { 1 })
        .product()
}

fn has_tokens(g: &BoundGraph, v: ValueId) -> bool {
    g.values[v].shape.first() == Some(&Dim::Tokens)
}

struct Ctx<'a> {
    g: &'a BoundGraph,
    /// consumers[v]: nodes reading v (usize::MAX for the graph output).
    consumers: Vec<Vec<usize>>,
    producer: Vec<Option<usize>>,
    taken: Vec<bool>,
}

impl Ctx<'_> {
    fn only_consumer(&self, v: ValueId) -> Option<usize> {
        match self.consumers[v].as_slice() {
            [c] if *c != usize::MAX => Some(*c),
            _ => None,
        }
    }
}

/// Group `g`'s nodes into a schedule. `decode` enables the passes that
/// assume one token per step (`attention`).
pub fn fuse(g: &BoundGraph, opts: &FuseOptions, decode: bool) -> Vec<Group> {
    let mut consumers = vec![Vec::new(); g.values.len()];
    let mut producer = vec![None; g.values.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in &n.inputs {
            consumers[v].push(i);
        }
        producer[n.output] = Some(i);
    }
    consumers[g.output].push(usize::MAX);
    let mut cx = Ctx {
        g,
        consumers,
        producer,
        taken: vec![false; g.nodes.len()],
    };
    let mut groups: Vec<Group> = Vec::new();

    // Matvec groups (siblings merged).
    for (i, n) in g.nodes.iter().enumerate() {
        if cx.taken[i] || !matches!(n.op, BoundOp::MatMul { .. }) {
            continue;
        }
        let mut mats = vec![i];
        cx.taken[i] = true;
        if opts.on("siblings") {
            let k = weight_k(g, i);
            for &c in &cx.consumers[n.inputs[0]].clone() {
                if mats.len() < 3
                    && c != usize::MAX
                    && !cx.taken[c]
                    && matches!(g.nodes[c].op, BoundOp::MatMul { .. })
                    && weight_k(g, c) == k
                {
                    mats.push(c);
                    cx.taken[c] = true;
                }
            }
        }
        groups.push(Group::Matvec(Matvec {
            mats,
            ..Default::default()
        }));
    }
    if opts.on("gated") {
        for gr in &mut groups {
            if let Group::Matvec(m) = gr {
                gated(&mut cx, m);
            }
        }
    }
    if opts.on("epilogue") {
        for gr in &mut groups {
            if let Group::Matvec(m) = gr {
                epilogue(&mut cx, m);
            }
        }
    }
    if decode && opts.on("attention") {
        for (i, n) in g.nodes.iter().enumerate() {
            if !cx.taken[i] && matches!(n.op, BoundOp::Attention { .. }) {
                if let Some(a) = attention(&mut cx, i) {
                    groups.push(Group::Attention(a));
                }
            }
        }
    }
    if decode && opts.on("split") {
        split(&mut cx, &mut groups, opts);
    }
    if opts.on("prologue") {
        groups.sort_by_key(|gr| gr.anchor());
        for gr in &mut groups {
            if let Group::Matvec(m) = gr {
                if m.merge.is_none() {
                    prologue(&mut cx, m, opts.stage_limit());
                }
            }
        }
    }
    for i in 0..g.nodes.len() {
        if !cx.taken[i] {
            groups.push(Group::Single(i));
        }
    }
    groups.sort_by_key(|gr| gr.anchor());
    groups
}

fn weight_k(g: &BoundGraph, node: usize) -> usize {
    match g.nodes[node].op {
        BoundOp::MatMul { w } => g.weights[w].dims[0],
        _ => 0,
    }
}

fn weight_n(g: &BoundGraph, node: usize) -> usize {
    match g.nodes[node].op {
        BoundOp::MatMul { w } => g.weights[w].dims[1..].iter().product(),
        _ => 0,
    }
}

/// `Mul(act(a), b)` (or `Mul(a, b)`) of the outputs of a two-matmul group.
fn gated(cx: &mut Ctx, m: &mut Matvec) {
    let g = cx.g;
    if m.mats.len() != 2 || weight_n(g, m.mats[0]) != weight_n(g, m.mats[1]) {
        return;
    }
    for swap in [false, true] {
        let (a, b) = if swap {
            (m.mats[1], m.mats[0])
        } else {
            (m.mats[0], m.mats[1])
        };
        let (ao, bo) = (g.nodes[a].output, g.nodes[b].output);
        let Some(c) = cx.only_consumer(ao) else {
            continue;
        };
        if cx.taken[c] {
            continue;
        }
        let (act, av) = if matches!(g.nodes[c].op, BoundOp::Unary(_)) {
            (Some(c), g.nodes[c].output)
        } else {
            (None, ao)
        };
        let Some(mul) = cx.only_consumer(av) else {
            continue;
        };
        let mn = &g.nodes[mul];
        if cx.taken[mul]
            || !matches!(mn.op, BoundOp::Mul)
            || cx.only_consumer(bo) != Some(mul)
            || !(mn.inputs == [av, bo] || mn.inputs == [bo, av])
        {
            continue;
        }
        m.mats = vec![a, b];
        m.pair = Some((act, mul));
        cx.taken[mul] = true;
        if let Some(c) = act {
            cx.taken[c] = true;
        }
        return;
    }
}

/// The group's single output value (after pair and epilogue so far).
fn group_output(g: &BoundGraph, m: &Matvec) -> Option<ValueId> {
    if let Some(&(e, _)) = m.epilogue.last() {
        return Some(g.nodes[e].output);
    }
    if let Some((_, mul)) = m.pair {
        return Some(g.nodes[mul].output);
    }
    (m.mats.len() == 1).then(|| g.nodes[m.mats[0]].output)
}

/// The values a matvec group writes for its consumers: the single output
/// (after pair and epilogue), or each sibling's own (after its epilogue).
fn group_outputs(g: &BoundGraph, m: &Matvec) -> Vec<ValueId> {
    match group_output(g, m) {
        Some(o) => vec![o],
        None => m
            .mats
            .iter()
            .enumerate()
            .map(
                |(j, &x)| match m.seg_epilogue.get(j).and_then(|e| e.last()) {
                    Some(&(e, _)) => g.nodes[e].output,
                    None => g.nodes[x].output,
                },
            )
            .collect(),
    }
}

fn epilogue(cx: &mut Ctx, m: &mut Matvec) {
    let anchor = m.mats[0];
    if let Some(out) = group_output(cx.g, m) {
        let chain = elementwise_chain(cx, out, anchor, &mut m.consts);
        m.epilogue.extend(chain);
    } else if m.pair.is_none() {
        m.seg_epilogue = m
            .mats
            .clone()
            .into_iter()
            .map(|x| elementwise_chain(cx, cx.g.nodes[x].output, anchor, &mut m.consts))
            .collect();
    }
}

/// The elementwise nodes that can follow `out` in the epilogue of the group
/// anchored at `anchor`, taken; Weight nodes only they read go to `consts`.
fn elementwise_chain(
    cx: &mut Ctx,
    mut out: ValueId,
    anchor: usize,
    consts: &mut Vec<usize>,
) -> Vec<(usize, usize)> {
    let g = cx.g;
    let mut chain = Vec::new();
    loop {
        let Some(c) = cx.only_consumer(out) else {
            return chain;
        };
        let n = &g.nodes[c];
        if cx.taken[c] || !elementwise(&n.op) {
            return chain;
        }
        let carry = n.inputs.iter().position(|&v| v == out).unwrap_or(0);
        if n.inputs.iter().filter(|&&v| v == out).count() != 1 {
            return chain;
        }
        // The other operand: the output's shape or a broadcast row, computed
        // before the group or a weight that only this node reads.
        if let Some(&o) = n.inputs.iter().find(|&&v| v != out) {
            let ok_shape = g.values[o].shape == g.values[out].shape
                || (!has_tokens(g, o) && per_token(g, o) == last_dim(g, out));
            let weight = cx.producer[o].filter(|&p| {
                matches!(g.nodes[p].op, BoundOp::Weight { .. })
                    && !cx.taken[p]
                    && cx.only_consumer(o) == Some(c)
            });
            if !ok_shape || (weight.is_none() && cx.producer[o].is_some_and(|p| p > anchor)) {
                return chain;
            }
            if let Some(w) = weight {
                consts.push(w);
                cx.taken[w] = true;
            }
        }
        chain.push((c, carry));
        cx.taken[c] = true;
        out = n.output;
    }
}

/// Rows longer than this are not staged by a fused prologue: every
/// workgroup would re-read and re-normalize the whole row (measured on an
/// H100 with Llama-3-8B shapes, K = 4096: the staged kernels ran 2-4x slower
/// per weight byte than a separate norm dispatch plus a plain matmul).
pub const PROLOGUE_PAYS_UP_TO_K: usize = 2048;

fn prologue(cx: &mut Ctx, m: &mut Matvec, stage_up_to_k: usize) {
    let g = cx.g;
    let anchor = m.mats[0];
    let k = weight_k(g, anchor);
    if k > stage_up_to_k {
        scaled_norm(cx, m, k);
        return;
    }
    let mut chain: Vec<(usize, usize)> = Vec::new();
    let mut v = g.nodes[anchor].inputs[0];
    let mut inside: BTreeSet<usize> = m.mats.iter().copied().collect();
    while let Some(p) = cx.producer[v] {
        let n = &g.nodes[p];
        let row_ok = has_tokens(g, v) && per_token(g, v) == k && last_dim(g, v) == k;
        let op_ok = elementwise(&n.op) || matches!(n.op, BoundOp::RmsNorm { .. });
        if cx.taken[p] || !row_ok || !op_ok {
            break;
        }
        // Everything else that reads v comes after the group (v is then a
        // side output) or is inside it.
        if cx.consumers[v]
            .iter()
            .any(|&c| c != usize::MAX && !inside.contains(&c) && c <= anchor)
        {
            break;
        }
        // The running row continues through an operand made by a fusible,
        // untaken row op; other operands are read as they are.
        let carry = (0..n.inputs.len())
            .find(|&j| {
                let u = n.inputs[j];
                cx.producer[u].is_some_and(|q| {
                    !cx.taken[q]
                        && (elementwise(&g.nodes[q].op)
                            || matches!(g.nodes[q].op, BoundOp::RmsNorm { .. }))
                        && per_token(g, u) == k
                        && has_tokens(g, u)
                })
            })
            .unwrap_or(0);
        let carried = n.inputs[carry];
        let others_ok = n.inputs.iter().enumerate().all(|(j, &u)| {
            j == carry
                || (g.values[u].shape == g.values[v].shape
                    || (!has_tokens(g, u) && per_token(g, u) == k))
        });
        if !others_ok || !has_tokens(g, carried) || per_token(g, carried) != k {
            break;
        }
        chain.push((p, carry));
        cx.taken[p] = true;
        inside.insert(p);
        v = carried;
    }
    chain.reverse();
    m.prologue = chain;
}

/// A row too long to stage: fold the RMSNorm that makes the matmul's input
/// in as a scale ([`Matvec::scaled`]) when nothing else reads the normalized
/// row (it is never written) and rows are whole vec4s.
fn scaled_norm(cx: &mut Ctx, m: &mut Matvec, k: usize) {
    let g = cx.g;
    let v = g.nodes[m.mats[0]].inputs[0];
    let Some(p) = cx.producer[v] else { return };
    let n = &g.nodes[p];
    let inside = |c: usize| m.mats.contains(&c);
    let ok = !cx.taken[p]
        && matches!(n.op, BoundOp::RmsNorm { .. })
        && k.is_multiple_of(4)
        && has_tokens(g, v)
        && per_token(g, v) == k
        && last_dim(g, v) == k
        && v != g.output
        && cx.consumers[v]
            .iter()
            .all(|&c| c != usize::MAX && inside(c))
        && has_tokens(g, n.inputs[0])
        && per_token(g, n.inputs[0]) == k;
    if ok {
        m.prologue = vec![(p, 0)];
        m.scaled = true;
        cx.taken[p] = true;
    }
}

/// Split every fused decode attention over its keys, and hand the merge to
/// the matmul that reads the output where its prologue pays.
fn split(cx: &mut Ctx, groups: &mut [Group], opts: &FuseOptions) {
    let g = cx.g;
    for i in 0..groups.len() {
        let Group::Attention(a) = &groups[i] else {
            continue;
        };
        let n = &g.nodes[a.attn];
        let BoundOp::Attention { window, .. } = n.op else {
            continue;
        };
        let heads = match g.values[n.inputs[0]].shape.as_slice() {
            [_, Dim::Fixed(h), _] => *h,
            _ => continue,
        };
        let keys = window.map_or(g.max_context, |w| w.min(g.max_context));
        let s = opts.splits.unwrap_or_else(|| attention_splits(heads, keys));
        if s <= 1 {
            continue;
        }
        let (attn, out) = (a.attn, n.output);
        let merger = if opts.on("prologue") {
            merge_consumer(cx, groups, out, heads, opts)
        } else {
            None
        };
        if let Some((j, reshape)) = merger {
            if let Some(r) = reshape {
                cx.taken[r] = true;
            }
            if let Group::Matvec(m) = &mut groups[j] {
                m.merge = Some(Merge {
                    attn,
                    reshape,
                    splits: s,
                });
            }
        }
        if let Group::Attention(a) = &mut groups[i] {
            a.splits = s;
            a.merged_by_consumer = merger.is_some();
        }
    }
}

/// The matvec group (index) whose input row is attention output `out`
/// (through at most one Reshape, returned too), if its prologue can merge
/// the partials: nothing else reads them, no other prologue, and a row
/// short enough to stage ([`FuseOptions::stage_limit`]) or a longer one
/// the matmul reads as int8 (the quantize_rows dispatch before it merges,
/// four elements of one of the `heads` heads at a time).
fn merge_consumer(
    cx: &Ctx,
    groups: &[Group],
    out: ValueId,
    heads: usize,
    opts: &FuseOptions,
) -> Option<(usize, Option<usize>)> {
    let g = cx.g;
    let mut row = out;
    let mut reshape = None;
    let mut c = cx.only_consumer(row)?;
    if matches!(g.nodes[c].op, BoundOp::Reshape) {
        if cx.taken[c] {
            return None;
        }
        reshape = Some(c);
        row = g.nodes[c].output;
        c = cx.only_consumer(row)?;
    }
    let k = weight_k(g, c);
    if k == 0 || per_token(g, row) != k || !has_tokens(g, row) {
        return None;
    }
    let j = groups.iter().position(
        |gr| matches!(gr, Group::Matvec(m) if m.mats.contains(&c) && m.prologue.is_empty()),
    )?;
    let Group::Matvec(m) = &groups[j] else {
        return None;
    };
    // An int8 reader merges four elements of one head at a time (in its
    // own prologue, or quantize_rows before it; see hooks::plan_matvec).
    let int8 = opts.int8_over_k().is_some_and(|over| k > over)
        && heads > 0
        && (k / heads).is_multiple_of(4)
        && super::hooks::int8_input_ok(g, &m.mats, k);
    (k <= opts.stage_limit() || int8).then_some((j, reshape))
}

/// (source row, per-head norm node, rope node, absorbed nodes).
type AttnInput = (ValueId, Option<usize>, Option<usize>, Vec<usize>);

/// Walk back from an attention input through rope, a per-head RMSNorm and
/// a reshape to the projection's row.
fn attn_input(cx: &Ctx, v: ValueId, allow_prep: bool) -> Option<AttnInput> {
    let g = cx.g;
    let mut absorbed = Vec::new();
    let mut v = v;
    let mut rope = None;
    let mut norm = None;
    let single = |v: ValueId, c: usize| cx.consumers[v] == [c];
    let take =
        |v: &mut ValueId, want: &dyn Fn(&BoundOp) -> bool, next: &mut usize| -> Option<usize> {
            let p = cx.producer[*v]?;
            if cx.taken[p] || !want(&g.nodes[p].op) || !single(*v, *next) {
                return None;
            }
            *next = p;
            *v = g.nodes[p].inputs[0];
            Some(p)
        };
    // The attention node itself is the first consumer.
    let mut next = cx.consumers[v].first().copied().unwrap_or(usize::MAX);
    if allow_prep {
        rope = take(&mut v, &|op| matches!(op, BoundOp::Rope { .. }), &mut next);
        norm = take(
            &mut v,
            &|op| {
                matches!(
                    op,
                    BoundOp::RmsNorm {
                        weight: Some(_),
                        ..
                    }
                )
            },
            &mut next,
        );
    }
    if let Some(r) = take(&mut v, &|op| matches!(op, BoundOp::Reshape), &mut next) {
        absorbed.push(r);
    }
    absorbed.extend(rope);
    absorbed.extend(norm);
    // The norm must be over the head dim (the value's last dim).
    if let Some(nn) = norm {
        let x = g.nodes[nn].inputs[0];
        if g.values[x].shape.len() != 3 {
            return None;
        }
    }
    Some((v, norm, rope, absorbed))
}

fn attention(cx: &mut Ctx, i: usize) -> Option<AttnPrep> {
    let g = cx.g;
    let n = &g.nodes[i];
    let (q, qn, qr, mut abs) = attn_input(cx, n.inputs[0], true)?;
    let (k, kn, kr, ka) = attn_input(cx, n.inputs[1], true)?;
    let (v, vn, vr, va) = attn_input(cx, n.inputs[2], false)?;
    if vn.is_some() || vr.is_some() || qr.is_some() != kr.is_some() {
        return None;
    }
    if let (Some(a), Some(b)) = (qr, kr) {
        if g.nodes[a].op != g.nodes[b].op {
            return None;
        }
    }
    if let (Some(a), Some(b)) = (qn, kn) {
        let eps = |x: usize| match g.nodes[x].op {
            BoundOp::RmsNorm { eps, .. } => eps,
            _ => 0.0,
        };
        if eps(a) != eps(b) {
            return None;
        }
    }
    // The sources are flat rows [T, H * D] made before the attention.
    for s in [q, k, v] {
        if !has_tokens(g, s) || g.values[s].shape.len() != 2 {
            return None;
        }
    }
    abs.extend(ka);
    abs.extend(va);
    for &a in &abs {
        cx.taken[a] = true;
    }
    cx.taken[i] = true;
    Some(AttnPrep {
        attn: i,
        src: [q, k, v],
        norm: [qn, kn],
        rope: [qr, kr],
        absorbed: abs,
        splits: 1,
        merged_by_consumer: false,
    })
}

/// Values a schedule materializes (written by some group), and a check
/// that every group reads only values made by an earlier group (or the
/// token ids). Returns the first violation as a message.
pub fn check(g: &BoundGraph, groups: &[Group]) -> Result<Vec<bool>, String> {
    let mut made = vec![false; g.values.len()];
    made[g.tokens] = true;
    for gr in groups {
        let (reads, writes) = io(g, gr);
        for r in reads {
            if !made[r] {
                return Err(format!(
                    "group at node {} reads '{}' before it is made",
                    gr.anchor(),
                    g.values[r].name
                ));
            }
        }
        for w in writes {
            made[w] = true;
        }
    }
    if !made[g.output] {
        return Err("the output is never made".into());
    }
    // A split attention merged by its consumer stores only partials.
    for gr in groups {
        if let Group::Attention(a) = gr {
            if a.merged_by_consumer {
                made[g.nodes[a.attn].output] = false;
            }
        }
    }
    Ok(made)
}

/// (values read, values written) by a group.
pub fn io(g: &BoundGraph, gr: &Group) -> (Vec<ValueId>, Vec<ValueId>) {
    let nodes = gr.nodes();
    let inside: BTreeSet<ValueId> = nodes.iter().map(|&n| g.nodes[n].output).collect();
    let mut reads = Vec::new();
    for &n in &nodes {
        for &v in &g.nodes[n].inputs {
            if !inside.contains(&v) && !reads.contains(&v) {
                reads.push(v);
            }
        }
    }
    let writes = match gr {
        Group::Single(n) => vec![g.nodes[*n].output],
        Group::Attention(a) => vec![g.nodes[a.attn].output],
        Group::Matvec(m) => {
            let mut w = Vec::new();
            // Side outputs of the prologue: read outside the group.
            for &(p, _) in &m.prologue {
                let o = g.nodes[p].output;
                let used_outside = g
                    .nodes
                    .iter()
                    .enumerate()
                    .any(|(i, n)| !nodes.contains(&i) && n.inputs.contains(&o))
                    || o == g.output;
                if used_outside {
                    w.push(o);
                }
            }
            w.extend(group_outputs(g, m));
            w
        }
    };
    (reads, writes)
}
