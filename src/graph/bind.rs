//! Binding: a parsed graph file plus a GGUF model become a [`BoundGraph`].
//!
//! Hyperparameters are evaluated from metadata, repeats and conditions are
//! unrolled, weight names are expanded and looked up, and every op's shapes
//! and dtypes are checked. Every error names the RON position it came from.

use std::collections::HashMap;

use super::expr::{self, Env, Value};
use super::ir::*;
use super::schema::{Ex, GraphFile, Op, Stmt, WRef};
use super::span::{Pos, Str};
use super::{Graph, GraphError};
use crate::model::dtype::DType;
use crate::model::gguf::{Gguf, MetaValue};

/// Name of the token-id input every graph can read.
pub const TOKENS: &str = "tokens";

/// Most statements (and repeat iterations) binding may unroll: real models
/// unroll a few thousand, and a runaway repeat count must fail fast rather
/// than spin or exhaust memory.
pub const MAX_UNROLL: usize = 100_000;

struct Binder<'a> {
    graph: &'a Graph,
    gguf: &'a Gguf,
    arch: String,
    /// Hyperparameters and loop variables, innermost last.
    vars: Vec<(String, Value)>,
    names: HashMap<String, ValueId>,
    weight_ids: HashMap<String, WeightId>,
    out: BoundGraph,
    /// Statements and repeat iterations unrolled so far (at most [`MAX_UNROLL`]).
    steps: usize,
}

impl Env for Binder<'_> {
    fn var(&self, name: &str) -> Option<Value> {
        if name == "arch" {
            return Some(Value::Str(self.arch.clone()));
        }
        self.vars
            .iter()
            .rev()
            .find(|v| v.0 == name)
            .map(|v| v.1.clone())
    }
    fn names(&self) -> Vec<String> {
        self.vars.iter().map(|v| v.0.clone()).collect()
    }
    fn meta(&self, key: &str) -> Result<Option<Value>, String> {
        match self.gguf.meta(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(Value::Str(s.clone()))),
            Some(v) => match v.as_f64() {
                Some(n) => Ok(Some(Value::Num(n))),
                None => Err(format!(
                    "metadata '{key}' is an {} (expressions read numbers and strings)",
                    v.type_name()
                )),
            },
        }
    }
    fn has_weight(&self, name: &str) -> bool {
        self.gguf.tensor(name).is_some()
    }
}

/// Bind `graph` to `gguf`.
pub fn bind(graph: &Graph, gguf: &Gguf) -> Result<BoundGraph, GraphError> {
    let arch = gguf.architecture().unwrap_or("").to_string();
    let mut b = Binder {
        graph,
        gguf,
        arch: arch.clone(),
        vars: Vec::new(),
        names: HashMap::new(),
        weight_ids: HashMap::new(),
        out: BoundGraph {
            source: graph.source.clone(),
            arch,
            params: Vec::new(),
            values: Vec::new(),
            weights: Vec::new(),
            nodes: Vec::new(),
            caches: Vec::new(),
            tokens: 0,
            output: 0,
            vocab: 0,
            max_context: 0,
            stop_tokens: Vec::new(),
        },
        steps: 0,
    };
    let file: &GraphFile = &graph.file;
    for (name, ex) in &file.params.0 {
        if name.text == "arch" || name.text == TOKENS {
            return Err(b.err(
                name.pos,
                format!("'{}' is reserved; pick another name", name.text),
            ));
        }
        let v = b.eval(ex)?;
        if let Value::Num(n) = v {
            b.out.params.push((name.text.clone(), n));
        }
        b.vars.push((name.text.clone(), v));
    }
    b.out.stop_tokens = file.stop_tokens.iter().map(|t| t.text.clone()).collect();
    b.out.max_context = match &file.max_context {
        Some(e) => b.usize(e, "max_context")?,
        None => usize::MAX,
    };
    let tokens = b.value(vec![Dim::Tokens], Kind::Ids, TOKENS);
    b.out.tokens = tokens;
    b.names.insert(TOKENS.to_string(), tokens);
    b.stmts(&file.body)?;
    let out = b.lookup(&file.output)?;
    let desc = &b.out.values[out];
    if desc.kind != Kind::F32 || desc.shape.len() != 2 || desc.shape[0] != Dim::Tokens {
        return Err(b.err(
            file.output.pos,
            format!(
                "the output '{}' must be logits of shape [T, vocab], found {}",
                file.output.text,
                shape_str(&desc.shape)
            ),
        ));
    }
    b.out.output = out;
    if b.out.vocab == 0 {
        return Err(b.err(
            None,
            "the graph has no Embed op, so it cannot read tokens".into(),
        ));
    }
    Ok(b.out)
}

impl Binder<'_> {
    fn err(&self, pos: Option<Pos>, msg: String) -> GraphError {
        GraphError {
            file: self.graph.source.clone(),
            pos,
            msg,
        }
    }

    fn eval(&self, ex: &Ex) -> Result<Value, GraphError> {
        let Some(p) = &ex.parsed else {
            return Err(self.err(
                ex.src.pos,
                format!("unparsed expression \"{}\"", ex.src.text),
            ));
        };
        p.eval(self).map_err(|e| {
            self.err(
                ex.src.pos_at(e.offset),
                format!("in \"{}\": {}", ex.src.text, e.msg),
            )
        })
    }

    fn num(&self, ex: &Ex, what: &str) -> Result<f64, GraphError> {
        match self.eval(ex)? {
            Value::Num(n) if n.is_finite() => Ok(n),
            v => Err(self.err(
                ex.src.pos,
                format!(
                    "{what} must be a finite number, \"{}\" gives {v}",
                    ex.src.text
                ),
            )),
        }
    }

    fn usize(&self, ex: &Ex, what: &str) -> Result<usize, GraphError> {
        let n = self.num(ex, what)?;
        if n < 0.0 || n.fract() != 0.0 || n > (1u64 << 40) as f64 {
            return Err(self.err(
                ex.src.pos,
                format!(
                    "{what} must be a non-negative integer, \"{}\" gives {n}",
                    ex.src.text
                ),
            ));
        }
        Ok(n as usize)
    }

    fn opt_num(&self, ex: &Option<Ex>, what: &str) -> Result<Option<f64>, GraphError> {
        ex.as_ref().map(|e| self.num(e, what)).transpose()
    }

    fn value(&mut self, shape: Vec<Dim>, kind: Kind, name: &str) -> ValueId {
        let suffix: Vec<String> = self
            .vars
            .iter()
            .skip(self.graph.file.params.0.len())
            .map(|v| v.1.to_string())
            .collect();
        let name = if suffix.is_empty() {
            name.to_string()
        } else {
            format!("{name}@{}", suffix.join("."))
        };
        self.out.values.push(ValueDesc { shape, kind, name });
        self.out.values.len() - 1
    }

    fn lookup(&self, name: &Str) -> Result<ValueId, GraphError> {
        self.names.get(&name.text).copied().ok_or_else(|| {
            let known: Vec<String> = self.names.keys().cloned().collect();
            let mut msg = format!("undefined tensor '{}'", name.text);
            if let Some(c) = expr::closest(&name.text, &known) {
                msg.push_str(&format!(" (did you mean '{c}'?)"));
            } else {
                msg.push_str(" (a value must be bound by an earlier Let)");
            }
            self.err(name.pos, msg)
        })
    }

    /// Resolve a weight reference; `dtypes` are the ones the op can take
    /// (`None`: any dtype kiln can dequantize).
    fn weight(
        &mut self,
        w: &WRef,
        op: &str,
        dtypes: Option<&[DType]>,
    ) -> Result<WeightId, GraphError> {
        let mut tried = Vec::new();
        for (t, src) in w.templates.iter().zip(&w.names) {
            let name = t.eval(self).map_err(|e| {
                self.err(
                    src.pos_at(e.offset),
                    format!("in weight name \"{}\": {}", src.text, e.msg),
                )
            })?;
            if let Some(info) = self.gguf.tensor(&name) {
                if info.dims.contains(&0) {
                    // Every op (and every kernel) assumes non-empty rows.
                    return Err(self.err(src.pos, format!(
                        "weight '{name}' has a zero dimension (GGML dims {:?}); the model file is corrupt",
                        info.dims)));
                }
                let ok = match dtypes {
                    Some(list) => list.contains(&info.dtype),
                    None => info.dtype.is_supported(),
                };
                if !ok {
                    let allowed: Vec<String> = match dtypes {
                        Some(l) => l.iter().map(|d| d.to_string()).collect(),
                        None => DType::supported().map(|d| d.to_string()).collect(),
                    };
                    return Err(self.err(
                        src.pos,
                        format!(
                            "weight '{name}' is {}, which {op} cannot take (it takes {}); re-quantize the model to a supported type",
                            info.dtype,
                            allowed.join(", ")
                        ),
                    ));
                }
                if let Some(&id) = self.weight_ids.get(&name) {
                    return Ok(id);
                }
                let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
                self.out.weights.push(WeightDesc {
                    name: name.clone(),
                    dtype: info.dtype,
                    dims,
                });
                let id = self.out.weights.len() - 1;
                self.weight_ids.insert(name, id);
                return Ok(id);
            }
            tried.push(name);
        }
        let known: Vec<String> = self.gguf.tensors.iter().map(|t| t.name.clone()).collect();
        let mut msg = format!("weight '{}' is missing from the model", tried[0]);
        if tried.len() > 1 {
            msg = format!("none of the weights {tried:?} is in the model");
        }
        if let Some(c) = expr::closest(&tried[0], &known) {
            msg.push_str(&format!(" (closest: '{c}')"));
        }
        msg.push_str("; check the name in the graph, or `kiln inspect` the model");
        Err(self.err(w.names.first().and_then(|n| n.pos), msg))
    }

    fn stmts(&mut self, stmts: &[Stmt]) -> Result<(), GraphError> {
        for s in stmts {
            match s {
                Stmt::Let(name, op) => {
                    self.step(name.pos)?;
                    if name.text == TOKENS {
                        return Err(self.err(
                            name.pos,
                            format!("'{TOKENS}' is the input and cannot be rebound"),
                        ));
                    }
                    let id = self.op(name, op)?;
                    self.names.insert(name.text.clone(), id);
                }
                Stmt::Repeat { var, count, body } => {
                    let n = self.usize(count, "a repeat count")?;
                    // A number literal has no position; point at the variable.
                    let at = count.src.pos.or(var.pos);
                    if n > MAX_UNROLL {
                        return Err(self.err(at, format!(
                            "repeat count \"{}\" gives {n}, more than the {MAX_UNROLL} statements kiln unrolls; check the expression",
                            count.src.text)));
                    }
                    for i in 0..n {
                        self.step(at)?;
                        self.vars.push((var.text.clone(), Value::Num(i as f64)));
                        let r = self.stmts(body);
                        self.vars.pop();
                        r?;
                    }
                }
                Stmt::If {
                    cond,
                    then,
                    otherwise,
                } => {
                    if self.num(cond, "a condition")? != 0.0 {
                        self.stmts(then)?;
                    } else {
                        self.stmts(otherwise)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Count one unrolled statement or iteration against [`MAX_UNROLL`].
    fn step(&mut self, at: Option<Pos>) -> Result<(), GraphError> {
        self.steps += 1;
        if self.steps > MAX_UNROLL {
            return Err(self.err(
                at,
                format!(
                "the graph unrolls to more than {MAX_UNROLL} statements; check the repeat counts"),
            ));
        }
        Ok(())
    }

    fn shape_err(&self, at: Option<Pos>, op: &str, msg: String) -> GraphError {
        self.err(at, format!("{op}: {msg}"))
    }

    fn f32_input(&self, name: &Str, op: &str) -> Result<(ValueId, Vec<Dim>), GraphError> {
        let id = self.lookup(name)?;
        let d = &self.out.values[id];
        if d.kind != Kind::F32 {
            return Err(self.err(
                name.pos,
                format!(
                    "{op} needs float values, but '{}' holds token ids",
                    name.text
                ),
            ));
        }
        Ok((id, d.shape.clone()))
    }

    fn op(&mut self, name: &Str, op: &Op) -> Result<ValueId, GraphError> {
        const FLOAT: &[DType] = &[DType::F32, DType::F16, DType::BF16];
        let at = name.pos;
        let opname = op.name();
        let (bop, inputs, shape, kind): (BoundOp, Vec<ValueId>, Vec<Dim>, Kind) = match op {
            Op::Embed { table, ids } => {
                let ids_id = self.lookup(ids)?;
                let idd = &self.out.values[ids_id];
                if idd.kind != Kind::Ids {
                    return Err(self.err(
                        ids.pos,
                        format!("Embed needs token ids, but '{}' holds floats", ids.text),
                    ));
                }
                let ishape = idd.shape.clone();
                let t = self.weight(table, opname, None)?;
                let w = &self.out.weights[t];
                if w.dims.len() != 2 {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!(
                            "table '{}' must be 2-D [dim, vocab], has dims {:?}",
                            w.name, w.dims
                        ),
                    ));
                }
                let (d, vocab) = (w.dims[0], w.dims[1]);
                if self.out.vocab != 0 && self.out.vocab != vocab {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!(
                            "two Embed ops disagree on the vocabulary ({} and {vocab})",
                            self.out.vocab
                        ),
                    ));
                }
                self.out.vocab = vocab;
                let mut s = ishape;
                s.push(Dim::Fixed(d));
                (BoundOp::Embed { table: t }, vec![ids_id], s, Kind::F32)
            }
            Op::MatMul { x, w } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let wid = self.weight(w, opname, None)?;
                let wd = &self.out.weights[wid];
                if wd.dims.len() != 2 {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!(
                            "weight '{}' must be 2-D [in, out], has dims {:?}",
                            wd.name, wd.dims
                        ),
                    ));
                }
                let (k, n) = (wd.dims[0], wd.dims[1]);
                if xs.last() != Some(&Dim::Fixed(k)) {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!(
                        "'{}' has shape {} but weight '{}' takes {k} inputs (GGML dims [{k}, {n}])",
                        x.text, shape_str(&xs), wd.name),
                    ));
                }
                let mut s = xs;
                *s.last_mut().unwrap_or(&mut Dim::Tokens) = Dim::Fixed(n);
                (BoundOp::MatMul { w: wid }, vec![xid], s, Kind::F32)
            }
            Op::RmsNorm { x, weight, eps } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let weight = self.norm_weight(weight, &xs, at, opname, FLOAT)?;
                let eps = self.num(eps, "eps")?;
                (BoundOp::RmsNorm { weight, eps }, vec![xid], xs, Kind::F32)
            }
            Op::LayerNorm {
                x,
                weight,
                bias,
                eps,
            } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let weight = self.norm_weight(weight, &xs, at, opname, FLOAT)?;
                let bias = self.norm_weight(bias, &xs, at, opname, FLOAT)?;
                let eps = self.num(eps, "eps")?;
                (
                    BoundOp::LayerNorm { weight, bias, eps },
                    vec![xid],
                    xs,
                    Kind::F32,
                )
            }
            Op::Rope {
                x,
                mode,
                base,
                dims,
                scale,
            } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let head_dim = match xs.as_slice() {
                    [Dim::Tokens, Dim::Fixed(_), Dim::Fixed(d)] => *d,
                    _ => {
                        return Err(self.shape_err(
                            at,
                            opname,
                            format!(
                                "'{}' must be [T, heads, head_dim], found {}; Reshape it first",
                                x.text,
                                shape_str(&xs)
                            ),
                        ))
                    }
                };
                let rot = match dims {
                    Some(e) => self.usize(e, "rope dims")?,
                    None => head_dim,
                };
                if rot == 0 || rot % 2 != 0 || rot > head_dim {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!("dims must be even and at most head_dim {head_dim}, found {rot}"),
                    ));
                }
                let base = self.num(base, "rope base")?;
                let scale = self.opt_num(scale, "rope scale")?.unwrap_or(1.0);
                (
                    BoundOp::Rope {
                        mode: *mode,
                        base,
                        dims: rot,
                        scale,
                    },
                    vec![xid],
                    xs,
                    Kind::F32,
                )
            }
            Op::Attention {
                q,
                k,
                v,
                scale,
                window,
                softcap,
            } => {
                let (qid, qs) = self.f32_input(q, opname)?;
                let (kid, ks) = self.f32_input(k, opname)?;
                let (vid, vs) = self.f32_input(v, opname)?;
                let three = |s: &[Dim]| match s {
                    [Dim::Tokens, Dim::Fixed(h), Dim::Fixed(d)] => Some((*h, *d)),
                    _ => None,
                };
                let (Some((h, dq)), Some((hk, dk)), Some((hv, dv))) =
                    (three(&qs), three(&ks), three(&vs))
                else {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!(
                            "q, k and v must be [T, heads, head_dim]; found {}, {} and {}",
                            shape_str(&qs),
                            shape_str(&ks),
                            shape_str(&vs)
                        ),
                    ));
                };
                if dq != dk || hk != hv || hk == 0 || h % hk != 0 {
                    return Err(self.shape_err(at, opname, format!(
                        "q {} and k {} need the same head_dim, k and v {} the same head count, and q's heads a multiple of k's",
                        shape_str(&qs), shape_str(&ks), shape_str(&vs))));
                }
                let scale = self.num(scale, "attention scale")?;
                let window = match window {
                    Some(e) => Some(self.usize(e, "window")?).filter(|&w| w > 0),
                    None => None,
                };
                let softcap = self.opt_num(softcap, "softcap")?.filter(|&c| c != 0.0);
                let cache = self.out.caches.len();
                self.out.caches.push(CacheDesc {
                    kv_heads: hk,
                    k_dim: dk,
                    v_dim: dv,
                    window,
                });
                (
                    BoundOp::Attention {
                        scale,
                        window,
                        softcap,
                        cache,
                    },
                    vec![qid, kid, vid],
                    vec![Dim::Tokens, Dim::Fixed(h), Dim::Fixed(dv)],
                    Kind::F32,
                )
            }
            Op::Add { a, b } | Op::Mul { a, b } => {
                let (aid, as_) = self.f32_input(a, opname)?;
                let (bid, bs) = self.f32_input(b, opname)?;
                if bs.len() > as_.len() || as_[as_.len() - bs.len()..] != bs[..] {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!(
                        "'{}' {} and '{}' {} do not match (b must equal a or a's trailing dims)",
                        a.text, shape_str(&as_), b.text, shape_str(&bs)),
                    ));
                }
                let bop = if matches!(op, Op::Add { .. }) {
                    BoundOp::Add
                } else {
                    BoundOp::Mul
                };
                (bop, vec![aid, bid], as_, Kind::F32)
            }
            Op::Scale { x, by } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                (
                    BoundOp::Scale {
                        by: self.num(by, "scale")?,
                    },
                    vec![xid],
                    xs,
                    Kind::F32,
                )
            }
            Op::Softcap { x, cap } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let cap = self.num(cap, "cap")?;
                if cap <= 0.0 {
                    return Err(self.err(at, format!("Softcap: cap must be positive, found {cap}")));
                }
                (BoundOp::Softcap { cap }, vec![xid], xs, Kind::F32)
            }
            Op::Silu { x }
            | Op::Gelu { x }
            | Op::GeluTanh { x }
            | Op::Tanh { x }
            | Op::Relu { x }
            | Op::Softmax { x } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let bop = match op {
                    Op::Silu { .. } => BoundOp::Unary(Unary::Silu),
                    Op::Gelu { .. } => BoundOp::Unary(Unary::Gelu),
                    Op::GeluTanh { .. } => BoundOp::Unary(Unary::GeluTanh),
                    Op::Tanh { .. } => BoundOp::Unary(Unary::Tanh),
                    Op::Relu { .. } => BoundOp::Unary(Unary::Relu),
                    _ => BoundOp::Softmax,
                };
                (bop, vec![xid], xs, Kind::F32)
            }
            Op::Argmax { x } => {
                let (xid, mut xs) = self.f32_input(x, opname)?;
                xs.pop();
                (BoundOp::Argmax, vec![xid], xs, Kind::Ids)
            }
            Op::Reshape { x, shape } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let mut s = Vec::new();
                for e in shape {
                    if e.src.text.trim() == "T" {
                        s.push(Dim::Tokens);
                    } else {
                        s.push(Dim::Fixed(self.usize(e, "a dimension")?));
                    }
                }
                let count = |s: &[Dim]| {
                    (
                        s.iter().filter(|d| **d == Dim::Tokens).count(),
                        s.iter()
                            .map(|d| if let Dim::Fixed(n) = d { *n } else { 1 })
                            .fold(1usize, |a, n| a.saturating_mul(n)),
                    )
                };
                if count(&s) != count(&xs) || s.first() != xs.first() {
                    return Err(self.shape_err(
                        at,
                        opname,
                        format!(
                            "cannot reshape '{}' {} to {} (same element count, T first in both)",
                            x.text,
                            shape_str(&xs),
                            shape_str(&s)
                        ),
                    ));
                }
                (BoundOp::Reshape, vec![xid], s, Kind::F32)
            }
            Op::Slice {
                x,
                axis,
                start,
                len,
            } => {
                let (xid, xs) = self.f32_input(x, opname)?;
                let axis_n = self.usize(axis, "axis")?;
                let (start, len) = (self.usize(start, "start")?, self.usize(len, "len")?);
                match xs.get(axis_n) {
                    Some(Dim::Fixed(n)) if start + len <= *n && len > 0 => {}
                    _ => {
                        return Err(self.shape_err(
                            at,
                            opname,
                            format!(
                                "cannot take {start}..{} along axis {axis_n} of {}",
                                start + len,
                                shape_str(&xs)
                            ),
                        ))
                    }
                }
                let mut s = xs;
                s[axis_n] = Dim::Fixed(len);
                (
                    BoundOp::Slice {
                        axis: axis_n,
                        start,
                        len,
                    },
                    vec![xid],
                    s,
                    Kind::F32,
                )
            }
            Op::Concat { xs, axis } => {
                let axis_n = self.usize(axis, "axis")?;
                let mut ids = Vec::new();
                let mut shape: Option<Vec<Dim>> = None;
                for x in xs {
                    let (id, s) = self.f32_input(x, opname)?;
                    ids.push(id);
                    match (&mut shape, s.get(axis_n)) {
                        (_, None) | (_, Some(Dim::Tokens)) => {
                            return Err(self.shape_err(
                                at,
                                opname,
                                format!(
                                    "axis {axis_n} of '{}' {} is not a fixed dim",
                                    x.text,
                                    shape_str(&s)
                                ),
                            ))
                        }
                        (None, _) => shape = Some(s),
                        (Some(acc), Some(Dim::Fixed(n))) => {
                            let mut a2 = acc.clone();
                            let mut s2 = s.clone();
                            a2[axis_n] = Dim::Fixed(0);
                            s2[axis_n] = Dim::Fixed(0);
                            if a2 != s2 {
                                return Err(self.shape_err(
                                    at,
                                    opname,
                                    format!(
                                        "'{}' {} does not match the others {}",
                                        x.text,
                                        shape_str(&s),
                                        shape_str(acc)
                                    ),
                                ));
                            }
                            if let Dim::Fixed(m) = &mut acc[axis_n] {
                                *m += n;
                            }
                        }
                    }
                }
                let Some(s) = shape else {
                    return Err(self.err(at, "Concat needs at least one input".into()));
                };
                (BoundOp::Concat { axis: axis_n }, ids, s, Kind::F32)
            }
            Op::Weight { w } => {
                let wid = self.weight(w, opname, Some(FLOAT))?;
                let s: Vec<Dim> = self.out.weights[wid]
                    .dims
                    .iter()
                    .rev()
                    .map(|&d| Dim::Fixed(d))
                    .collect();
                (BoundOp::Weight { w: wid }, vec![], s, Kind::F32)
            }
        };
        let out = self.value(shape, kind, &name.text);
        self.out.nodes.push(Node {
            op: bop,
            inputs,
            output: out,
            at,
        });
        Ok(out)
    }

    fn norm_weight(
        &mut self,
        w: &Option<WRef>,
        xs: &[Dim],
        at: Option<Pos>,
        op: &str,
        dtypes: &[DType],
    ) -> Result<Option<WeightId>, GraphError> {
        let Some(w) = w else { return Ok(None) };
        let id = self.weight(w, op, Some(dtypes))?;
        let wd = &self.out.weights[id];
        if wd.dims.len() != 1 || xs.last() != Some(&Dim::Fixed(wd.dims[0])) {
            return Err(self.shape_err(
                at,
                op,
                format!(
                    "weight '{}' has dims {:?} but the input {} needs [{}]",
                    wd.name,
                    wd.dims,
                    shape_str(xs),
                    xs.last().map_or("?".into(), |d| d.to_string())
                ),
            ));
        }
        Ok(Some(id))
    }
}
