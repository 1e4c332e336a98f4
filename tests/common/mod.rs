//! Shared test helpers: real models and reference fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;

/// SmolLM2-135M (architecture llama).
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Gemma 3 270M (architecture gemma3).
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// Path of a real model; fails the test with the fix when it is missing.
pub fn model_path(file: &str) -> PathBuf {
    let p = kiln::session::models_dir().join(file);
    assert!(
        p.is_file(),
        "{} is missing: run tools/setup.sh (it fetches the models into {})",
        p.display(),
        kiln::session::models_dir().display()
    );
    p
}

#[derive(Deserialize, Debug)]
pub struct Fixture {
    pub cases: Vec<Case>,
}

#[derive(Deserialize, Debug)]
pub struct Case {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub logits: Vec<Row>,
    #[serde(default)]
    pub greedy_ids: Vec<u32>,
    #[serde(default)]
    pub greedy_text: String,
}

#[derive(Deserialize, Debug)]
pub struct Row {
    pub pos: usize,
    pub top: Vec<(u32, f64)>,
    pub mean: f64,
    pub std: f64,
}

/// Load tests/fixtures/<name>.
pub fn fixture(name: &str) -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A small seeded PRNG for test inputs (fresh per test via the seed).
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits (xorshift64*).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` values uniform in [-1, 1).
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// A seed that differs per run (fresh inputs), printed so a failure reproduces.
pub fn fresh_seed() -> u64 {
    let seed = std::env::var("KILN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("seed {seed} (KILN_TEST_SEED={seed} reproduces)");
    seed
}

/// GPU contexts for the four feature sets kiln tests, on the default adapter.
pub fn gpu_contexts() -> Vec<kiln::exec::GpuContext> {
    use kiln::exec::{FeatureRequest, GpuContext};
    [
        FeatureRequest::None,
        FeatureRequest::F16,
        FeatureRequest::Subgroups,
        FeatureRequest::All,
    ]
    .into_iter()
    .map(|r| {
        GpuContext::with_features(r).unwrap_or_else(|e| {
            panic!("no GPU adapter ({e}); run tools/setup.sh, which installs Mesa's lavapipe")
        })
    })
    .collect()
}

// Tiny synthetic models: llama- or gemma3-shaped, random weights in a mix of
// dtypes (sibling matmuls of different dtypes, as in Q4_K_M files).
use kiln::graph::{BoundGraph, Graph};
use kiln::model::gguf::Gguf;
use kiln::model::synth::{self, Spec};
use serde_json::json;
use std::collections::BTreeMap;

pub const D: u64 = 256;
pub const FFN: u64 = 512;
pub const HEADS: u64 = 4;
pub const KV: u64 = 2;
pub const HD: u64 = 64;
pub const VOCAB: u64 = 512;

/// A tiny random model of `arch` ("llama" or "gemma3") with `layers` layers.
pub fn tiny_spec(arch: &str, layers: u64) -> Spec {
    let mut m: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let k = |s: &str| format!("{arch}.{s}");
    m.insert("general.architecture".into(), json!(arch));
    m.insert(k("block_count"), json!({ "u32": layers }));
    m.insert(k("context_length"), json!({ "u32": 128 }));
    m.insert(k("embedding_length"), json!({ "u32": D }));
    m.insert(k("feed_forward_length"), json!({ "u32": FFN }));
    m.insert(k("attention.head_count"), json!({ "u32": HEADS }));
    m.insert(k("attention.head_count_kv"), json!({ "u32": KV }));
    m.insert(k("attention.key_length"), json!({ "u32": HD }));
    m.insert(k("attention.value_length"), json!({ "u32": HD }));
    m.insert(
        k("attention.layer_norm_rms_epsilon"),
        json!({ "f32": 1e-6 }),
    );
    m.insert(k("rope.freq_base"), json!({ "f32": 10000.0 }));
    if arch == "gemma3" {
        m.insert(k("attention.sliding_window"), json!({ "u32": 4 }));
    }
    let mut t: Vec<(String, String, Vec<u64>)> = Vec::new();
    let mut add = |n: String, dt: &str, dims: Vec<u64>| t.push((n, dt.into(), dims));
    add("token_embd.weight".into(), "Q8_0", vec![D, VOCAB]);
    add("output_norm.weight".into(), "F32", vec![D]);
    for i in 0..layers {
        let b = |s: &str| format!("blk.{i}.{s}");
        add(b("attn_norm.weight"), "F32", vec![D]);
        // Siblings of three different dtypes, as in Q4_K_M models.
        add(b("attn_q.weight"), "Q4_K", vec![D, HEADS * HD]);
        add(b("attn_k.weight"), "Q5_0", vec![D, KV * HD]);
        add(b("attn_v.weight"), "Q8_0", vec![D, KV * HD]);
        add(b("attn_output.weight"), "Q4_1", vec![HEADS * HD, D]);
        add(b("ffn_norm.weight"), "F32", vec![D]);
        add(b("ffn_gate.weight"), "Q4_K", vec![D, FFN]);
        add(b("ffn_up.weight"), "Q6_K", vec![D, FFN]);
        add(b("ffn_down.weight"), "Q8_0", vec![FFN, D]);
        if arch == "gemma3" {
            add(b("attn_q_norm.weight"), "F32", vec![HD]);
            add(b("attn_k_norm.weight"), "F32", vec![HD]);
            add(b("post_attention_norm.weight"), "F32", vec![D]);
            add(b("post_ffw_norm.weight"), "F32", vec![D]);
        }
    }
    Spec {
        metadata: m,
        tensors: t,
        mixes: BTreeMap::new(),
    }
}

pub fn tiny_model(arch: &str, layers: u64, seed: u64) -> (Gguf, BoundGraph) {
    let g = Gguf::from_bytes(synth::write(&tiny_spec(arch, layers), seed).expect("synth"))
        .expect("synth GGUF parses");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let b = Graph::load(root.join("graphs").join(format!("{arch}.ron")))
        .expect("graph")
        .bind(&g)
        .unwrap_or_else(|e| panic!("{e}"));
    (g, b)
}

/// Rows of `k` elements (k % 32 == 0) quantized as the quantize_rows kernel
/// does (the layout matmul_vec reads with XQ=1): per row, k/4 words of int8
/// q = floor(0.5 + 127 · clamp(v / max|v|)) over each 32-element block
/// (WGSL's pack4x8snorm), then k/32 f32 scales max|v| / 127 · r, where
/// v = x · w and r = 1 / sqrt(mean(x²) + eps) with `norm = Some((w, eps))`.
pub fn q8_quantize(x: &[f32], k: usize, norm: Option<(&[f32], f32)>) -> Vec<u32> {
    let mut out = Vec::new();
    for row in x.chunks(k) {
        let (v, r): (Vec<f32>, f32) = match norm {
            Some((w, eps)) => {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / k as f32;
                (
                    row.iter().zip(w).map(|(a, b)| a * b).collect(),
                    1.0 / (ms + eps).sqrt(),
                )
            }
            None => (row.to_vec(), 1.0),
        };
        let mut scales = Vec::new();
        for b in v.chunks(32) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = if amax > 0.0 { 1.0 / amax } else { 0.0 };
            for w in b.chunks(4) {
                let mut word = 0u32;
                for (i, e) in w.iter().enumerate() {
                    let q = (0.5 + 127.0 * (e * inv).clamp(-1.0, 1.0)).floor() as i8;
                    word |= (q as u8 as u32) << (8 * i);
                }
                out.push(word);
            }
            scales.push((amax / 127.0 * r).to_bits());
        }
        out.extend(scales);
    }
    out
}

/// The f32 values that [`q8_quantize`]'s rows stand for.
pub fn q8_dequantize(q: &[u32], k: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for row in q.chunks(k / 4 + k / 32) {
        let (words, scales) = row.split_at(k / 4);
        for (i, w) in words.iter().enumerate() {
            let d = f32::from_bits(scales[i / 8]);
            for b in w.to_le_bytes() {
                out.push(b as i8 as f32 * d);
            }
        }
    }
    out
}
