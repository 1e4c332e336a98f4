//! The RON schema of graph files, as deserialized (before binding).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as DeriveDeserialize;

use super::expr::{self, Expr, Template};
use super::span::{Pos, Str};

/// A graph file: hyperparameters, a body of statements and the output.
#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields, rename = "Graph")]
pub struct GraphFile {
    /// Hyperparameters in order; each may use those before it.
    pub params: Params,
    /// Longest context the architecture supports (an expression).
    #[serde(default)]
    pub max_context: Option<Ex>,
    /// Token texts that also end generation where the vocabulary has them
    /// (an end-of-turn marker the GGUF metadata does not name).
    #[serde(default)]
    pub stop_tokens: Vec<Str>,
    /// Statements, run in order.
    pub body: Vec<Stmt>,
    /// The name of the value that holds the logits.
    pub output: Str,
}

/// Hyperparameters: a RON map from name to expression, order kept.
#[derive(Debug, Default)]
pub struct Params(pub Vec<(Str, Ex)>);

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Params, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Params;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of hyperparameter names to expressions")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Params, A::Error> {
                let mut v = Vec::new();
                while let Some((k, e)) = m.next_entry::<Str, Ex>()? {
                    v.push((k, e));
                }
                Ok(Params(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// A statement of a graph body.
#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
pub enum Stmt {
    /// Bind a name to an op's result (names may be rebound, as a residual
    /// stream is across layers).
    Let(Str, Box<Op>),
    /// Run `body` `count` times with `var` = 0, 1, ...
    Repeat {
        /// Loop variable name.
        var: Str,
        /// Iteration count (an expression).
        count: Ex,
        /// Statements.
        body: Vec<Stmt>,
    },
    /// Run `then` if `cond` is non-zero, else `else`.
    If {
        /// Condition.
        cond: Ex,
        /// Statements if true.
        then: Vec<Stmt>,
        /// Statements if false.
        #[serde(default, rename = "else")]
        otherwise: Vec<Stmt>,
    },
}

/// Rotary embedding pairing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, DeriveDeserialize)]
pub enum RopeMode {
    /// Rotate adjacent pairs (x[2i], x[2i+1]).
    Normal,
    /// Rotate halves (x[i], x[i + dims/2]), GPT-NeoX style.
    Neox,
}

/// An op and its arguments. Value arguments are names bound by earlier
/// statements; weight arguments are [`WRef`]s; attributes are expressions.
#[derive(Debug, DeriveDeserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub enum Op {
    /// Rows of `table` gathered by token ids.
    Embed {
        table: WRef,
        ids: Str,
    },
    /// `x · wᵀ`: the weight is GGML [in, out].
    MatMul {
        x: Str,
        w: WRef,
    },
    /// `x / rms(x) * weight` over the last dim.
    RmsNorm {
        x: Str,
        #[serde(default)]
        weight: Option<WRef>,
        eps: Ex,
    },
    /// `(x - mean) / std * weight + bias` over the last dim.
    LayerNorm {
        x: Str,
        #[serde(default)]
        weight: Option<WRef>,
        #[serde(default)]
        bias: Option<WRef>,
        eps: Ex,
    },
    /// Rotary position embedding on [T, heads, head_dim].
    Rope {
        x: Str,
        mode: RopeMode,
        base: Ex,
        /// Rotated dims (default: all).
        #[serde(default)]
        dims: Option<Ex>,
        /// Position scale (linear rope scaling; default 1).
        #[serde(default)]
        scale: Option<Ex>,
    },
    /// Causal attention with a KV cache: q [T, H, D], k [T, Hkv, D],
    /// v [T, Hkv, Dv] → [T, H, Dv].
    Attention {
        q: Str,
        k: Str,
        v: Str,
        scale: Ex,
        /// Sliding window in tokens (0 or absent: none).
        #[serde(default)]
        window: Option<Ex>,
        /// Tanh softcap on scores (0 or absent: none).
        #[serde(default)]
        softcap: Option<Ex>,
    },
    Add {
        a: Str,
        b: Str,
    },
    Mul {
        a: Str,
        b: Str,
    },
    Scale {
        x: Str,
        by: Ex,
    },
    Silu {
        x: Str,
    },
    Gelu {
        x: Str,
    },
    GeluTanh {
        x: Str,
    },
    Tanh {
        x: Str,
    },
    Relu {
        x: Str,
    },
    /// `cap * tanh(x / cap)`.
    Softcap {
        x: Str,
        cap: Ex,
    },
    Softmax {
        x: Str,
    },
    /// New shape; `"T"` stands for the token dim.
    Reshape {
        x: Str,
        shape: Vec<Ex>,
    },
    Slice {
        x: Str,
        axis: Ex,
        start: Ex,
        len: Ex,
    },
    Concat {
        xs: Vec<Str>,
        axis: Ex,
    },
    /// Index of the largest element of the last dim.
    Argmax {
        x: Str,
    },
    /// A weight as a value (dequantized), e.g. a bias for `Add`.
    Weight {
        w: WRef,
    },
}

impl Op {
    /// The op's name as written in RON.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "Embed",
            Op::MatMul { .. } => "MatMul",
            Op::RmsNorm { .. } => "RmsNorm",
            Op::LayerNorm { .. } => "LayerNorm",
            Op::Rope { .. } => "Rope",
            Op::Attention { .. } => "Attention",
            Op::Add { .. } => "Add",
            Op::Mul { .. } => "Mul",
            Op::Scale { .. } => "Scale",
            Op::Silu { .. } => "Silu",
            Op::Gelu { .. } => "Gelu",
            Op::GeluTanh { .. } => "GeluTanh",
            Op::Tanh { .. } => "Tanh",
            Op::Relu { .. } => "Relu",
            Op::Softcap { .. } => "Softcap",
            Op::Softmax { .. } => "Softmax",
            Op::Reshape { .. } => "Reshape",
            Op::Slice { .. } => "Slice",
            Op::Concat { .. } => "Concat",
            Op::Argmax { .. } => "Argmax",
            Op::Weight { .. } => "Weight",
        }
    }
}

fn next_str(v: &str) -> Str {
    // Route through Str's own visitor so the string counter advances.
    struct One<'a>(&'a str);
    impl<'de> Deserializer<'de> for One<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
            v.visit_str(self.0)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct enum identifier ignored_any
        }
    }
    Str::deserialize(One(v)).unwrap_or_default()
}

/// An expression attribute: a number, or a string holding an expression.
#[derive(Debug, Clone)]
pub struct Ex {
    /// The source text (empty position for number literals).
    pub src: Str,
    /// Parsed after loading, when positions are known.
    pub parsed: Option<Expr>,
}

impl Ex {
    /// An expression from text made in code.
    pub fn new(text: &str) -> Ex {
        Ex {
            src: Str::new(text),
            parsed: expr::parse(text).ok(),
        }
    }
}

impl<'de> Deserialize<'de> for Ex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ex, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ex;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or an expression string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ex, E> {
                Ok(Ex {
                    src: next_str(v),
                    parsed: None,
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ex, E> {
                Ok(Ex {
                    src: Str::new(format!("{v:e}")),
                    parsed: Some(Expr::Num(v)),
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ex, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ex, E> {
                self.visit_f64(v as f64)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Ex, E> {
                self.visit_f64(v as u8 as f64)
            }
        }
        d.deserialize_any(V)
    }
}

/// A weight reference: a name template (`"layers.{i}.q.weight"`), or a
/// list of them where the first the model has is used
/// (`["out.weight", "embed.weight"]` falls back to a tied embedding).
#[derive(Debug, Clone)]
pub struct WRef {
    /// Candidate names, in order of preference.
    pub names: Vec<Str>,
    /// Parsed templates, set after loading.
    pub templates: Vec<Template>,
}

impl<'de> Deserialize<'de> for WRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<WRef, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a weight name or a list of weight names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WRef, E> {
                Ok(WRef {
                    names: vec![next_str(v)],
                    templates: vec![],
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<WRef, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = s.next_element::<Str>()? {
                    names.push(n);
                }
                if names.is_empty() {
                    return Err(de::Error::custom("a weight list needs at least one name"));
                }
                Ok(WRef {
                    names,
                    templates: vec![],
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Visit every string-bearing item of a file mutably (to resolve positions
/// and parse expressions).
pub(crate) trait Walk {
    fn walk(&mut self, f: &mut dyn FnMut(Item<'_>));
}

/// One string-bearing item.
pub(crate) enum Item<'a> {
    Name(&'a mut Str),
    Ex(&'a mut Ex),
    W(&'a mut WRef),
}

impl Walk for GraphFile {
    fn walk(&mut self, f: &mut dyn FnMut(Item<'_>)) {
        for (k, e) in &mut self.params.0 {
            f(Item::Name(k));
            f(Item::Ex(e));
        }
        if let Some(e) = &mut self.max_context {
            f(Item::Ex(e));
        }
        for t in &mut self.stop_tokens {
            f(Item::Name(t));
        }
        self.body.walk(f);
        f(Item::Name(&mut self.output));
    }
}

impl Walk for Vec<Stmt> {
    fn walk(&mut self, f: &mut dyn FnMut(Item<'_>)) {
        for s in self {
            match s {
                Stmt::Let(n, op) => {
                    f(Item::Name(n));
                    op.walk(f);
                }
                Stmt::Repeat { var, count, body } => {
                    f(Item::Name(var));
                    f(Item::Ex(count));
                    body.walk(f);
                }
                Stmt::If {
                    cond,
                    then,
                    otherwise,
                } => {
                    f(Item::Ex(cond));
                    then.walk(f);
                    otherwise.walk(f);
                }
            }
        }
    }
}

impl Walk for Op {
    fn walk(&mut self, f: &mut dyn FnMut(Item<'_>)) {
        // Fields in declaration order (the order RON writes them does not
        // matter: positions were assigned when each string was read).
        let opt_w = |w: &mut Option<WRef>, f: &mut dyn FnMut(Item<'_>)| {
            if let Some(w) = w {
                f(Item::W(w))
            }
        };
        let opt_e = |e: &mut Option<Ex>, f: &mut dyn FnMut(Item<'_>)| {
            if let Some(e) = e {
                f(Item::Ex(e))
            }
        };
        match self {
            Op::Embed { table, ids } => {
                f(Item::W(table));
                f(Item::Name(ids));
            }
            Op::MatMul { x, w } => {
                f(Item::Name(x));
                f(Item::W(w));
            }
            Op::RmsNorm { x, weight, eps } => {
                f(Item::Name(x));
                opt_w(weight, f);
                f(Item::Ex(eps));
            }
            Op::LayerNorm {
                x,
                weight,
                bias,
                eps,
            } => {
                f(Item::Name(x));
                opt_w(weight, f);
                opt_w(bias, f);
                f(Item::Ex(eps));
            }
            Op::Rope {
                x,
                base,
                dims,
                scale,
                ..
            } => {
                f(Item::Name(x));
                f(Item::Ex(base));
                opt_e(dims, f);
                opt_e(scale, f);
            }
            Op::Attention {
                q,
                k,
                v,
                scale,
                window,
                softcap,
            } => {
                f(Item::Name(q));
                f(Item::Name(k));
                f(Item::Name(v));
                f(Item::Ex(scale));
                opt_e(window, f);
                opt_e(softcap, f);
            }
            Op::Add { a, b } | Op::Mul { a, b } => {
                f(Item::Name(a));
                f(Item::Name(b));
            }
            Op::Scale { x, by: e } | Op::Softcap { x, cap: e } => {
                f(Item::Name(x));
                f(Item::Ex(e));
            }
            Op::Silu { x }
            | Op::Gelu { x }
            | Op::GeluTanh { x }
            | Op::Tanh { x }
            | Op::Relu { x }
            | Op::Softmax { x }
            | Op::Argmax { x } => f(Item::Name(x)),
            Op::Reshape { x, shape } => {
                f(Item::Name(x));
                for e in shape {
                    f(Item::Ex(e));
                }
            }
            Op::Slice {
                x,
                axis,
                start,
                len,
            } => {
                f(Item::Name(x));
                f(Item::Ex(axis));
                f(Item::Ex(start));
                f(Item::Ex(len));
            }
            Op::Concat { xs, axis } => {
                for x in xs {
                    f(Item::Name(x));
                }
                f(Item::Ex(axis));
            }
            Op::Weight { w } => f(Item::W(w)),
        }
    }
}

/// Resolve positions and parse expressions and templates; the first error
/// is returned with its position.
pub(crate) fn finish(file: &mut GraphFile, table: &[Pos]) -> Result<(), (Option<Pos>, String)> {
    let mut first: Option<(Option<Pos>, String)> = None;
    file.walk(&mut |item| match item {
        Item::Name(s) => s.resolve(table),
        Item::Ex(e) => {
            e.src.resolve(table);
            if e.parsed.is_none() {
                match expr::parse(&e.src) {
                    Ok(p) => e.parsed = Some(p),
                    Err(err) => {
                        first.get_or_insert((
                            e.src.pos_at(err.offset),
                            format!("in expression \"{}\": {}", e.src.text, err.msg),
                        ));
                    }
                }
            }
        }
        Item::W(w) => {
            w.templates.clear();
            for n in &mut w.names {
                n.resolve(table);
                match Template::parse(n, 0) {
                    Ok(t) => w.templates.push(t),
                    Err(err) => {
                        first.get_or_insert((
                            n.pos_at(err.offset),
                            format!("in weight name \"{}\": {}", n.text, err.msg),
                        ));
                    }
                }
            }
        }
    });
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
