//! The bound graph: a flat, fully unrolled op list with concrete attributes,
//! resolved weights and shapes. Executors (the CPU reference, the GPU
//! planner) consume this; it holds no RON and no expressions.

use std::fmt;

pub use super::schema::RopeMode;
use super::span::Pos;
use crate::model::dtype::DType;

/// Index of a value (an intermediate tensor) in [`BoundGraph::values`].
pub type ValueId = usize;
/// Index of a weight in [`BoundGraph::weights`].
pub type WeightId = usize;

/// A dimension: the step's token count or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// The number of tokens in this step (T).
    Tokens,
    /// A fixed size.
    Fixed(usize),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Tokens => f.write_str("T"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Formats a shape as `[T, 9, 64]`.
pub fn shape_str(s: &[Dim]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// What a value's elements are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 32-bit floats.
    F32,
    /// Token ids.
    Ids,
}

/// A value's description.
#[derive(Debug, Clone)]
pub struct ValueDesc {
    /// Shape, row-major (last dim contiguous).
    pub shape: Vec<Dim>,
    /// Element kind.
    pub kind: Kind,
    /// The RON name it was bound to, with the loop index (`x@3`), for messages.
    pub name: String,
}

impl ValueDesc {
    /// Number of elements for a step of `t` tokens.
    pub fn numel(&self, t: usize) -> usize {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Tokens => t,
                Dim::Fixed(n) => *n,
            })
            .product()
    }

    /// The size of the last dim (1 for a scalar).
    pub fn last(&self, t: usize) -> usize {
        match self.shape.last() {
            Some(Dim::Tokens) => t,
            Some(Dim::Fixed(n)) => *n,
            None => 1,
        }
    }
}

/// A weight the graph reads.
#[derive(Debug, Clone)]
pub struct WeightDesc {
    /// GGUF tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: DType,
    /// GGML dims (`dims[0]` contiguous).
    pub dims: Vec<usize>,
}

impl WeightDesc {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// Elementwise unary functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Unary {
    Silu,
    Gelu,
    GeluTanh,
    Tanh,
    Relu,
}

/// A bound op with concrete attributes.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum BoundOp {
    /// inputs: [ids]
    Embed { table: WeightId },
    /// inputs: [x]
    MatMul { w: WeightId },
    /// inputs: [x]
    RmsNorm { weight: Option<WeightId>, eps: f64 },
    /// inputs: [x]
    LayerNorm {
        weight: Option<WeightId>,
        bias: Option<WeightId>,
        eps: f64,
    },
    /// inputs: [x]; positions are the step's.
    Rope {
        mode: RopeMode,
        base: f64,
        dims: usize,
        scale: f64,
    },
    /// inputs: [q, k, v]; `cache` indexes [`BoundGraph::caches`].
    Attention {
        scale: f64,
        window: Option<usize>,
        softcap: Option<f64>,
        cache: usize,
    },
    /// inputs: [a, b]; b may broadcast over a's leading dims.
    Add,
    /// inputs: [a, b]; b may broadcast over a's leading dims.
    Mul,
    /// inputs: [x]
    Scale { by: f64 },
    /// inputs: [x]
    Unary(Unary),
    /// inputs: [x]
    Softcap { cap: f64 },
    /// inputs: [x]
    Softmax,
    /// inputs: [x]; the output shape is the value's.
    Reshape,
    /// inputs: [x]
    Slice {
        axis: usize,
        start: usize,
        len: usize,
    },
    /// inputs: xs
    Concat { axis: usize },
    /// inputs: [x]
    Argmax,
    /// inputs: []
    Weight { w: WeightId },
}

/// One op instance.
#[derive(Debug, Clone)]
pub struct Node {
    /// The op.
    pub op: BoundOp,
    /// Input values.
    pub inputs: Vec<ValueId>,
    /// Output value.
    pub output: ValueId,
    /// Where the op is written in the graph file.
    pub at: Option<Pos>,
}

/// A KV cache slot, one per Attention node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheDesc {
    /// KV heads.
    pub kv_heads: usize,
    /// Key head dim.
    pub k_dim: usize,
    /// Value head dim.
    pub v_dim: usize,
    /// Sliding window, if any (a cache may keep only this many positions).
    pub window: Option<usize>,
}

/// A graph bound to a model: every op concrete, every weight resolved.
#[derive(Debug, Clone)]
pub struct BoundGraph {
    /// The graph file it came from.
    pub source: String,
    /// `general.architecture` of the model.
    pub arch: String,
    /// Evaluated hyperparameters, in file order.
    pub params: Vec<(String, f64)>,
    /// Values; `values[tokens]` is the input token ids.
    pub values: Vec<ValueDesc>,
    /// Weights, each once.
    pub weights: Vec<WeightDesc>,
    /// Ops in execution order.
    pub nodes: Vec<Node>,
    /// KV caches.
    pub caches: Vec<CacheDesc>,
    /// The token-id input value.
    pub tokens: ValueId,
    /// The output (logits) value, shape [T, vocab].
    pub output: ValueId,
    /// Number of token ids the embedding accepts.
    pub vocab: usize,
    /// Longest context the architecture supports.
    pub max_context: usize,
    /// Token texts that also end generation, where the vocabulary has them.
    pub stop_tokens: Vec<String>,
}

impl BoundGraph {
    /// A hyperparameter by name.
    pub fn param(&self, name: &str) -> Option<f64> {
        self.params.iter().find(|p| p.0 == name).map(|p| p.1)
    }
}
