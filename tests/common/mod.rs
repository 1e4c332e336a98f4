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
