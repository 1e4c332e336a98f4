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
