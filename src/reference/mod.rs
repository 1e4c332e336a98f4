//! The CPU reference interpreter: runs a [`BoundGraph`] op by op in f32,
//! unfused, with a KV cache. Prefill (many tokens) and decode (one token) go
//! through the same code. It is the oracle every GPU kernel is checked
//! against, so it is written to be obviously right rather than fast.

pub mod ops;

use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::graph::ir::{BoundGraph, BoundOp, Dim, Kind};
use crate::model::dequant::dequantize;
use crate::model::gguf::Gguf;

/// Runs a bound graph on the CPU.
pub struct Reference<'a> {
    graph: &'a BoundGraph,
    gguf: &'a Gguf,
    /// Weights dequantized on first use.
    weights: Vec<OnceLock<Vec<f32>>>,
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    pos: usize,
    n_ctx: usize,
    /// Index of the last value use, per value (to free buffers early).
    last_use: Vec<usize>,
    last_attention: Option<usize>,
}

/// Logits for some rows of a step.
#[derive(Debug, Clone)]
pub struct Logits {
    /// Row-major [rows, vocab].
    pub data: Vec<f32>,
    /// Vocabulary size (row length).
    pub vocab: usize,
}

impl Logits {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len() / self.vocab.max(1)
    }
    /// One row.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }
}

impl<'a> Reference<'a> {
    /// An interpreter with room for `n_ctx` positions.
    pub fn new(graph: &'a BoundGraph, gguf: &'a Gguf, n_ctx: usize) -> Result<Reference<'a>> {
        let n_ctx = n_ctx.min(graph.max_context);
        let mut last_use = vec![0; graph.values.len()];
        for (i, n) in graph.nodes.iter().enumerate() {
            for &v in &n.inputs {
                last_use[v] = i;
            }
        }
        last_use[graph.output] = usize::MAX;
        let last_attention = graph
            .nodes
            .iter()
            .rposition(|n| matches!(n.op, BoundOp::Attention { .. }));
        Ok(Reference {
            graph,
            gguf,
            weights: (0..graph.weights.len()).map(|_| OnceLock::new()).collect(),
            k_cache: graph
                .caches
                .iter()
                .map(|c| vec![0.0; n_ctx * c.kv_heads * c.k_dim])
                .collect(),
            v_cache: graph
                .caches
                .iter()
                .map(|c| vec![0.0; n_ctx * c.kv_heads * c.v_dim])
                .collect(),
            pos: 0,
            n_ctx,
            last_use,
            last_attention,
        })
    }

    /// Positions already in the KV cache.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Context length.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Forget the KV cache.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    fn weight(&self, id: usize) -> Result<&[f32]> {
        if let Some(w) = self.weights[id].get() {
            return Ok(w);
        }
        let desc = &self.graph.weights[id];
        let info = self.gguf.tensor(&desc.name).ok_or_else(|| {
            Error::Input(format!("weight '{}' vanished from the model", desc.name))
        })?;
        let v = dequantize(desc.dtype, self.gguf.tensor_data(info), desc.numel())?;
        Ok(self.weights[id].get_or_init(|| v))
    }

    /// Run `tokens` at the next positions, appending to the KV cache.
    /// Returns logits for every token, or only the last when `last_only`.
    pub fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Logits> {
        let g = self.graph;
        if tokens.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= g.vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range: the model's vocabulary has {} tokens (ids 0..{})",
                g.vocab,
                g.vocab - 1
            )));
        }
        if self.pos + tokens.len() > self.n_ctx {
            return Err(Error::Input(format!(
                "{} tokens at position {} exceed the context of {} positions; use a shorter prompt or fewer tokens, or raise --ctx (the model allows {})",
                tokens.len(),
                self.pos,
                self.n_ctx,
                g.max_context
            )));
        }
        let pos0 = self.pos;
        let t_all = tokens.len();
        let mut vals: Vec<Option<Vec<f32>>> = vec![None; g.values.len()];
        // Token rows each value holds (a value after the cut holds one).
        let mut rows = vec![t_all; g.values.len()];
        vals[g.tokens] = Some(tokens.iter().map(|&t| t as f32).collect());

        for (i, node) in g.nodes.iter().enumerate() {
            let cut = last_only && self.last_attention.is_none_or(|a| i > a);
            if cut {
                // Only the last row matters from here on: every op after the
                // last attention is row-local.
                for &v in &node.inputs {
                    if rows[v] > 1 && g.values[v].shape.first() == Some(&Dim::Tokens) {
                        let per = g.values[v].numel(1);
                        let x = vals[v].take().unwrap_or_default();
                        vals[v] = Some(x[x.len() - per..].to_vec());
                        rows[v] = 1;
                    }
                }
            }
            let t = node.inputs.first().map_or(t_all, |&v| rows[v]);
            let input = |j: usize| -> &[f32] { vals[node.inputs[j]].as_deref().unwrap_or(&[]) };
            let out_desc = &g.values[node.output];
            let in_desc = |j: usize| &g.values[node.inputs[j]];
            let y: Vec<f32> = match &node.op {
                BoundOp::Embed { table } => {
                    let w = &g.weights[*table];
                    let d = w.dims[0];
                    let info = self.gguf.tensor(&w.name).ok_or_else(|| {
                        Error::Input(format!("weight '{}' vanished from the model", w.name))
                    })?;
                    let data = self.gguf.tensor_data(info);
                    let row_bytes = w.dtype.bytes_for(d as u64).unwrap_or(0) as usize;
                    let mut y = Vec::with_capacity(t * d);
                    for &id in input(0) {
                        let id = id as usize;
                        let row =
                            data.get(id * row_bytes..(id + 1) * row_bytes)
                                .ok_or_else(|| {
                                    Error::Input(format!(
                                        "Embed: id {id} is out of range for '{}' ({} rows)",
                                        w.name, w.dims[1]
                                    ))
                                })?;
                        y.extend(dequantize(w.dtype, row, d)?);
                    }
                    y
                }
                BoundOp::MatMul { w } => {
                    let wd = &g.weights[*w];
                    let (k, n) = (wd.dims[0], wd.dims[1]);
                    let x = input(0);
                    ops::matmul(x, x.len() / k, self.weight(*w)?, k, n)
                }
                BoundOp::RmsNorm { weight, eps } => {
                    let w = weight.map(|w| self.weight(w)).transpose()?;
                    ops::rms_norm(input(0), in_desc(0).last(t), w, *eps)
                }
                BoundOp::LayerNorm { weight, bias, eps } => {
                    let w = weight.map(|w| self.weight(w)).transpose()?;
                    let b = bias.map(|b| self.weight(b)).transpose()?;
                    ops::layer_norm(input(0), in_desc(0).last(t), w, b, *eps)
                }
                BoundOp::Rope {
                    mode,
                    base,
                    dims,
                    scale,
                } => {
                    let (heads, hd) = three(&in_desc(0).shape);
                    let mut y = input(0).to_vec();
                    ops::rope(&mut y, heads, hd, pos0, *mode, *base, *dims, *scale);
                    y
                }
                BoundOp::Attention {
                    scale,
                    window,
                    softcap,
                    cache,
                } => {
                    let c = g.caches[*cache];
                    let (heads, d) = three(&in_desc(0).shape);
                    let (k, v) = (input(1), input(2));
                    let kw = c.kv_heads * c.k_dim;
                    let vw = c.kv_heads * c.v_dim;
                    self.k_cache[*cache][pos0 * kw..(pos0 + t) * kw].copy_from_slice(k);
                    self.v_cache[*cache][pos0 * vw..(pos0 + t) * vw].copy_from_slice(v);
                    ops::attention(
                        input(0),
                        t,
                        heads,
                        c.kv_heads,
                        d,
                        c.v_dim,
                        &self.k_cache[*cache],
                        &self.v_cache[*cache],
                        pos0,
                        *scale,
                        *window,
                        *softcap,
                    )
                }
                BoundOp::Add | BoundOp::Mul => {
                    let (a, b) = (input(0), input(1));
                    let add = matches!(node.op, BoundOp::Add);
                    a.iter()
                        .enumerate()
                        .map(|(i, &x)| {
                            let y = b[i % b.len()];
                            if add {
                                x + y
                            } else {
                                x * y
                            }
                        })
                        .collect()
                }
                BoundOp::Scale { by } => input(0).iter().map(|&x| x * *by as f32).collect(),
                BoundOp::Unary(f) => input(0).iter().map(|&x| ops::unary(*f, x)).collect(),
                BoundOp::Softcap { cap } => input(0)
                    .iter()
                    .map(|&x| (cap * (x as f64 / cap).tanh()) as f32)
                    .collect(),
                BoundOp::Softmax => ops::softmax(input(0), in_desc(0).last(t)),
                BoundOp::Reshape => input(0).to_vec(),
                BoundOp::Slice { axis, start, len } => {
                    ops::slice(input(0), &dims(&in_desc(0).shape, t), *axis, *start, *len)
                }
                BoundOp::Concat { axis } => {
                    let xs: Vec<&[f32]> = (0..node.inputs.len()).map(input).collect();
                    let ds: Vec<Vec<usize>> = (0..node.inputs.len())
                        .map(|j| dims(&in_desc(j).shape, t))
                        .collect();
                    ops::concat(&xs, &ds, *axis)
                }
                BoundOp::Argmax => ops::argmax(input(0), in_desc(0).last(t))
                    .into_iter()
                    .map(|i| i as f32)
                    .collect(),
                BoundOp::Weight { w } => self.weight(*w)?.to_vec(),
            };
            debug_assert_eq!(y.len(), out_desc.numel(t), "{:?}", node.op);
            debug_assert!(out_desc.kind == Kind::Ids || !matches!(node.op, BoundOp::Argmax));
            rows[node.output] = t;
            vals[node.output] = Some(y);
            for &v in &node.inputs {
                if self.last_use[v] == i {
                    vals[v] = None;
                }
            }
        }
        self.pos += t_all;
        let data = vals[g.output].take().unwrap_or_default();
        let vocab = g.values[g.output].last(1);
        Ok(Logits { data, vocab })
    }
}

/// (heads, head_dim) of a [T, heads, head_dim] shape.
fn three(s: &[Dim]) -> (usize, usize) {
    match s {
        [_, Dim::Fixed(h), Dim::Fixed(d)] => (*h, *d),
        _ => (1, 1),
    }
}

fn dims(s: &[Dim], t: usize) -> Vec<usize> {
    s.iter()
        .map(|d| match d {
            Dim::Tokens => t,
            Dim::Fixed(n) => *n,
        })
        .collect()
}
