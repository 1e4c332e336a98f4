//! One plain f32 implementation per op. Row-major buffers; `t` is the
//! number of token rows. These are the definitions every GPU kernel is
//! compared against, so they favour clarity over speed (matmul is the one
//! exception: it is parallel over output columns, still a plain dot product).

use rayon::prelude::*;

use crate::graph::ir::{RopeMode, Unary};

/// Dot product with eight independent f32 accumulators (vectorizes, and is
/// more accurate than one running sum).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `y[r, j] = Σ_k x[r, k] · w[j, k]`: x is [rows, k], w is [n, k] (a GGML
/// [k, n] weight), y is [rows, n].
pub fn matmul(x: &[f32], rows: usize, w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let cols: Vec<f32> = (0..n)
        .into_par_iter()
        .flat_map_iter(|j| {
            let wj = &w[j * k..(j + 1) * k];
            (0..rows).map(move |r| dot(&x[r * k..(r + 1) * k], wj))
        })
        .collect();
    let mut y = vec![0f32; rows * n];
    for j in 0..n {
        for r in 0..rows {
            y[r * n + j] = cols[j * rows + r];
        }
    }
    y
}

/// RMS norm over rows of length `d`: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], d: usize, w: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut y = x.to_vec();
    for row in y.chunks_mut(d) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let s = (1.0 / (ms + eps).sqrt()) as f32;
        for (i, v) in row.iter_mut().enumerate() {
            *v *= s;
            if let Some(w) = w {
                *v *= w[i];
            }
        }
    }
    y
}

/// Layer norm over rows of length `d`: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], d: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut y = x.to_vec();
    for row in y.chunks_mut(d) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let s = 1.0 / (var + eps).sqrt();
        for (i, v) in row.iter_mut().enumerate() {
            let mut o = ((*v as f64 - mean) * s) as f32;
            if let Some(w) = w {
                o *= w[i];
            }
            if let Some(b) = b {
                o += b[i];
            }
            *v = o;
        }
    }
    y
}

/// Rotary embedding on x [t, heads, head_dim]; token r is at position
/// `pos0 + r`. Pair i (< dims/2) rotates by `pos · scale · base^(-2i/dims)`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    pos0: usize,
    mode: RopeMode,
    base: f64,
    dims: usize,
    scale: f64,
) {
    let half = dims / 2;
    for (r, tok) in x.chunks_mut(heads * head_dim).enumerate() {
        let pos = (pos0 + r) as f64 * scale;
        for head in tok.chunks_mut(head_dim) {
            for i in 0..half {
                let theta = pos * base.powf(-2.0 * i as f64 / dims as f64);
                let (sin, cos) = theta.sin_cos();
                let (a, b) = match mode {
                    RopeMode::Normal => (2 * i, 2 * i + 1),
                    RopeMode::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a] as f64, head[b] as f64);
                head[a] = (x0 * cos - x1 * sin) as f32;
                head[b] = (x0 * sin + x1 * cos) as f32;
            }
        }
    }
}

/// Causal attention of `t` queries at positions `pos0..pos0+t` over a cache
/// holding positions `0..pos0+t`. q is [t, heads, d]; caches are
/// [positions, kv_heads, d] and [positions, kv_heads, dv]. A query at p sees
/// keys at j with `j <= p` and, with a window, `p - j < window`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    dv: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    pos0: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let mut out = vec![0f32; t * heads * dv];
    for r in 0..t {
        let p = pos0 + r;
        let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
        for h in 0..heads {
            let kh = h / group;
            let qv = &q[(r * heads + h) * d..(r * heads + h + 1) * d];
            let mut scores: Vec<f64> = (first..=p)
                .map(|j| {
                    let kv = &k_cache[(j * kv_heads + kh) * d..(j * kv_heads + kh + 1) * d];
                    let mut s = dot(qv, kv) as f64 * scale;
                    if let Some(c) = softcap {
                        s = c * (s / c).tanh();
                    }
                    s
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for s in &mut scores {
                *s = (*s - m).exp();
                sum += *s;
            }
            let o = &mut out[(r * heads + h) * dv..(r * heads + h + 1) * dv];
            for (idx, j) in (first..=p).enumerate() {
                let w = (scores[idx] / sum) as f32;
                let vv = &v_cache[(j * kv_heads + kh) * dv..(j * kv_heads + kh + 1) * dv];
                for (oi, vi) in o.iter_mut().zip(vv) {
                    *oi += w * vi;
                }
            }
        }
    }
    out
}

/// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26), in f64.
pub fn erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-x * x).exp();
    s * y
}

/// An elementwise function.
pub fn unary(f: Unary, x: f32) -> f32 {
    let v = x as f64;
    (match f {
        Unary::Silu => v / (1.0 + (-v).exp()),
        Unary::Gelu => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
        Unary::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
        }
        Unary::Tanh => v.tanh(),
        Unary::Relu => v.max(0.0),
    }) as f32
}

/// Softmax over rows of length `d`.
pub fn softmax(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    for row in y.chunks_mut(d) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        for v in row.iter_mut() {
            *v = (((*v - m) as f64).exp() / sum) as f32;
        }
    }
    y
}

/// Index of the largest value of each row (the first on ties).
pub fn argmax(x: &[f32], d: usize) -> Vec<usize> {
    x.chunks(d)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// Slice `len` entries from `start` along `axis` of a tensor with `dims`.
pub fn slice(x: &[f32], dims: &[usize], axis: usize, start: usize, len: usize) -> Vec<f32> {
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let mut y = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = o * dims[axis] * inner;
        y.extend_from_slice(&x[base + start * inner..base + (start + len) * inner]);
    }
    y
}

/// Concatenate tensors along `axis`; `dims[i]` are the shapes.
pub fn concat(xs: &[&[f32]], dims: &[Vec<usize>], axis: usize) -> Vec<f32> {
    let outer: usize = dims[0][..axis].iter().product();
    let mut y = Vec::new();
    for o in 0..outer {
        for (x, d) in xs.iter().zip(dims) {
            let chunk = d[axis..].iter().product::<usize>();
            y.extend_from_slice(&x[o * chunk..(o + 1) * chunk]);
        }
    }
    y
}
