//! Bad input gets a clear error, never a panic (DESIGN.md rule 10).
//!
//! Every case feeds kiln something wrong (a malformed graph, a graph that does
//! not fit the model, a truncated or lying GGUF, a token out of range) and
//! checks that the result is an `Err` whose message names the problem, and,
//! for graph files, the line and column it comes from.
//!
//! The models are synthetic, written here with `GgufWriter`: a tiny
//! llama-shaped model (2 layers, d_model 64, 4 heads, 2 KV heads, FFN 128,
//! vocabulary 100, F32 weights from a seeded PRNG) that both graphs/llama.ron
//! and graphs/gemma3.ron bind to, and a hand-laid-out 240-byte image whose
//! byte offsets are documented below so single fields can be patched.

use kiln::graph::span::Pos;
use kiln::graph::{Graph, GraphError};
use kiln::model::dtype::DType;
use kiln::model::gguf::{Gguf, GgufError, GgufWriter, MetaValue};
use kiln::reference::Reference;

const LLAMA: &str = include_str!("../graphs/llama.ron");
const GEMMA3: &str = include_str!("../graphs/gemma3.ron");

// ---------------------------------------------------------------------------
// Synthetic models
// ---------------------------------------------------------------------------

/// SplitMix64: a tiny seeded PRNG, so weights are the same on every run.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

const D_MODEL: u64 = 64;
const N_HEAD: u64 = 4;
const N_KV_HEAD: u64 = 2;
const HEAD_DIM: u64 = D_MODEL / N_HEAD;
const D_FF: u64 = 128;
const VOCAB: u64 = 100;
const N_LAYER: u64 = 2;
const N_CTX: u32 = 64;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A random F32 tensor with GGML dims `dims`; norm weights are near 1.
fn rand_tensor(rng: &mut Rng, name: &str, dims: &[u64]) -> (String, Vec<u64>, DType, Vec<u8>) {
    let n: u64 = dims.iter().product();
    let norm = dims.len() == 1;
    let scale = if norm {
        0.1
    } else {
        1.0 / (dims[0] as f32).sqrt()
    };
    let v: Vec<f32> = (0..n)
        .map(|_| if norm { 1.0 } else { 0.0 } + scale * rng.unit())
        .collect();
    (name.to_string(), dims.to_vec(), DType::F32, f32_bytes(&v))
}

/// The tiny llama-shaped model. It also carries gemma3's extra norms (q/k
/// norms, post-attention and post-FFN norms), so graphs/gemma3.ron binds to
/// it too; llama.ron ignores them. The output is tied to the embedding (no
/// `output.weight`), as in SmolLM2.
fn tiny_llama() -> GgufWriter {
    let mut rng = Rng(0x6b69_6c6e); // "kiln"
    let arch = "llama";
    let k = |s: &str| format!("{arch}.{s}");
    let metadata = vec![
        (
            "general.architecture".to_string(),
            MetaValue::Str(arch.into()),
        ),
        ("general.name".to_string(), MetaValue::Str("tiny".into())),
        (k("block_count"), MetaValue::U32(N_LAYER as u32)),
        (k("context_length"), MetaValue::U32(N_CTX)),
        (k("embedding_length"), MetaValue::U32(D_MODEL as u32)),
        (k("feed_forward_length"), MetaValue::U32(D_FF as u32)),
        (k("attention.head_count"), MetaValue::U32(N_HEAD as u32)),
        (
            k("attention.head_count_kv"),
            MetaValue::U32(N_KV_HEAD as u32),
        ),
        (k("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5)),
        (k("rope.freq_base"), MetaValue::F32(10000.0)),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array(
                (0..VOCAB)
                    .map(|i| MetaValue::Str(format!("t{i}")))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            MetaValue::Array((0..VOCAB).map(|i| MetaValue::F32(-(i as f32))).collect()),
        ),
    ];
    let mut tensors = vec![rand_tensor(
        &mut rng,
        "token_embd.weight",
        &[D_MODEL, VOCAB],
    )];
    let kv = N_KV_HEAD * HEAD_DIM;
    for i in 0..N_LAYER {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        for (name, dims) in [
            (b("attn_norm"), vec![D_MODEL]),
            (b("attn_q"), vec![D_MODEL, D_MODEL]),
            (b("attn_k"), vec![D_MODEL, kv]),
            (b("attn_v"), vec![D_MODEL, kv]),
            (b("attn_q_norm"), vec![HEAD_DIM]),
            (b("attn_k_norm"), vec![HEAD_DIM]),
            (b("attn_output"), vec![D_MODEL, D_MODEL]),
            (b("post_attention_norm"), vec![D_MODEL]),
            (b("ffn_norm"), vec![D_MODEL]),
            (b("ffn_gate"), vec![D_MODEL, D_FF]),
            (b("ffn_up"), vec![D_MODEL, D_FF]),
            (b("ffn_down"), vec![D_FF, D_MODEL]),
            (b("post_ffw_norm"), vec![D_MODEL]),
        ] {
            tensors.push(rand_tensor(&mut rng, &name, &dims));
        }
    }
    tensors.push(rand_tensor(&mut rng, "output_norm.weight", &[D_MODEL]));
    GgufWriter { metadata, tensors }
}

fn load(w: &GgufWriter) -> Gguf {
    Gguf::from_bytes(w.to_bytes()).expect("the synthetic model parses")
}

/// Replace the tensor `name` (which must exist).
fn set_tensor(w: &mut GgufWriter, name: &str, dims: &[u64], dtype: DType, data: Vec<u8>) {
    let t = w
        .tensors
        .iter_mut()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    *t = (name.to_string(), dims.to_vec(), dtype, data);
}

fn remove_tensor(w: &mut GgufWriter, name: &str) {
    let before = w.tensors.len();
    w.tensors.retain(|t| t.0 != name);
    assert_eq!(w.tensors.len() + 1, before, "no tensor {name}");
}

fn remove_meta(w: &mut GgufWriter, key: &str) {
    let before = w.metadata.len();
    w.metadata.retain(|m| m.0 != key);
    assert_eq!(w.metadata.len() + 1, before, "no metadata {key}");
}

/// 1-based (line, column) of the first occurrence of `needle` in `text`
/// (columns count characters, as kiln's positions do).
fn pos_of(text: &str, needle: &str) -> Pos {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    let before = &text[..at];
    let line = before.matches('\n').count() as u32 + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..at].chars().count() as u32 + 1;
    Pos { line, col }
}

/// Parse must fail; returns the error.
fn parse_err(text: &str) -> GraphError {
    match Graph::parse(text, "bad.ron") {
        Ok(_) => panic!("expected a parse error for:\n{text}"),
        Err(e) => e,
    }
}

/// Parse must succeed and bind must fail; returns the error.
fn bind_err(text: &str, gguf: &Gguf) -> GraphError {
    let g = Graph::parse(text, "bad.ron").unwrap_or_else(|e| panic!("parse: {e}"));
    match g.bind(gguf) {
        Ok(_) => panic!("expected a bind error for:\n{text}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
    }
}

#[track_caller]
fn assert_pos(e: &GraphError, line: u32, col: u32) {
    assert_eq!(
        e.pos,
        Some(Pos { line, col }),
        "wrong position for error: {e}"
    );
    // The Display form carries file:line:col.
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{}:{line}:{col}: ", e.file)),
        "{shown}"
    );
}

// ---------------------------------------------------------------------------
// The synthetic model itself works
// ---------------------------------------------------------------------------

#[test]
fn tiny_model_binds_both_graphs_and_runs() {
    let gguf = load(&tiny_llama());
    let gemma = Graph::parse(GEMMA3, "gemma3.ron").expect("gemma3.ron parses");
    let gb = gemma.bind(&gguf).expect("gemma3.ron binds the tiny model");
    assert_eq!(gb.vocab, VOCAB as usize);

    let llama = Graph::parse(LLAMA, "llama.ron").expect("llama.ron parses");
    let bound = llama.bind(&gguf).expect("llama.ron binds the tiny model");
    assert_eq!(bound.vocab, VOCAB as usize);
    assert_eq!(bound.max_context, N_CTX as usize);
    assert_eq!(bound.param("n_kv_head"), Some(N_KV_HEAD as f64));
    assert_eq!(bound.param("head_dim"), Some(HEAD_DIM as f64));

    let mut r = Reference::new(&bound, &gguf, 16).expect("reference");
    let logits = r.forward(&[1, 2, 3, 99], false).expect("prefill");
    assert_eq!(logits.vocab, VOCAB as usize);
    assert_eq!(logits.rows(), 4);
    assert!(
        logits.data.iter().all(|x| x.is_finite()),
        "non-finite logits"
    );
    let spread = logits.row(3).iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 0.0, "all-zero logits");
    let one = r.forward(&[0], true).expect("decode");
    assert_eq!(one.rows(), 1);
    assert!(one.data.iter().all(|x| x.is_finite()));

    let mut r = Reference::new(&gb, &gguf, 16).expect("reference");
    let logits = r.forward(&[5, 6, 7], true).expect("gemma3 graph runs");
    assert!(logits.data.iter().all(|x| x.is_finite()));
}

// ---------------------------------------------------------------------------
// Graph files
// ---------------------------------------------------------------------------

/// A minimal valid graph around `body` lines (each a statement).
fn graph_with(params: &str, body: &[&str], output: &str) -> String {
    let mut s = String::from("Graph(\n");
    s.push_str(&format!("    params: {{{params}}},\n"));
    s.push_str("    body: [\n");
    for b in body {
        s.push_str("        ");
        s.push_str(b);
        s.push('\n');
    }
    s.push_str("    ],\n");
    s.push_str(&format!("    output: \"{output}\",\n)\n"));
    s
}

const EMBED: &str = r#"Let("x", Embed(table: "token_embd.weight", ids: "tokens")),"#;
const LOGITS: &str = r#"Let("logits", MatMul(x: "x", w: "token_embd.weight")),"#;

#[test]
fn minimal_graph_binds() {
    // The skeleton the other graph cases break must itself be fine.
    let gguf = load(&tiny_llama());
    let text = graph_with("", &[EMBED, LOGITS], "logits");
    let g = Graph::parse(&text, "ok.ron").expect("parses");
    g.bind(&gguf).expect("binds");
}

#[test]
fn ron_syntax_error_has_line_and_column() {
    // Line 4: a missing comma between the name and the op.
    let text = "Graph(\n    params: {},\n    body: [\n        Let(\"x\" Embed(table: \"token_embd.weight\", ids: \"tokens\")),\n    ],\n    output: \"x\",\n)\n";
    let e = parse_err(text);
    assert_eq!(e.file, "bad.ron");
    assert_has(&e.msg, &["Expected comma"]);
    // ron reports where it wanted the comma: column 17, just after `Let("x"`.
    assert_pos(&e, 4, 17);
}

#[test]
fn unclosed_bracket_is_a_syntax_error() {
    let text = "Graph(\n    params: {},\n    body: [\n        Let(\"x\", Silu(x: \"tokens\"),\n    output: \"x\",\n)\n";
    let e = parse_err(text);
    assert!(e.pos.is_some(), "{e}");
    assert!(!e.msg.is_empty());
}

#[test]
fn unknown_op_names_the_variant_and_position() {
    let text = graph_with("", &[EMBED, r#"Let("y", Frobnicate(x: "x")),"#], "y");
    let e = parse_err(&text);
    assert_has(&e.msg, &["Frobnicate"]);
    // The message lists what would have been accepted.
    assert_has(&e.msg, &["MatMul", "RmsNorm"]);
    // `Let("y", Frobnicate(` is on line 5; ron points just past the name.
    let at = pos_of(&text, "Frobnicate(");
    assert_eq!(at, Pos { line: 5, col: 18 });
    assert_pos(&e, 5, 18 + "Frobnicate".len() as u32);
}

#[test]
fn unknown_field_names_the_field() {
    let text = graph_with("", &[EMBED, r#"Let("y", Silu(x: "x", gain: 2)),"#], "y");
    let e = parse_err(&text);
    assert_has(&e.msg, &["gain"]);
    assert_eq!(e.pos.map(|p| p.line), Some(pos_of(&text, "gain").line));
}

#[test]
fn undefined_tensor_points_at_the_string() {
    let gguf = load(&tiny_llama());
    let text = graph_with(
        "",
        &[EMBED, r#"Let("y", Add(a: "x", b: "nope")),"#, LOGITS],
        "logits",
    );
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["undefined tensor 'nope'"]);
    // Line 5 is `        Let("y", Add(a: "x", b: "nope")),`; the literal
    // "nope" opens at column 33.
    assert_eq!(pos_of(&text, "\"nope\""), Pos { line: 5, col: 33 });
    assert_pos(&e, 5, 33);
}

#[test]
fn undefined_tensor_suggests_a_close_name() {
    let gguf = load(&tiny_llama());
    let text = graph_with("", &[EMBED, r#"Let("y", Silu(x: "xx")),"#], "y");
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["undefined tensor 'xx'", "did you mean 'x'"]);
    let at = pos_of(&text, "\"xx\"");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn undefined_output_points_at_it() {
    let gguf = load(&tiny_llama());
    let text = graph_with("", &[EMBED, LOGITS], "logitz");
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["undefined tensor 'logitz'", "'logits'"]);
    let at = pos_of(&text, "\"logitz\"");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn weight_missing_from_the_model() {
    let mut w = tiny_llama();
    remove_tensor(&mut w, "blk.1.ffn_up.weight");
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &["weight 'blk.1.ffn_up.weight' is missing from the model"],
    );
    // It points at the template in the graph.
    let at = pos_of(LLAMA, "\"blk.{i}.ffn_up.weight\"");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn weight_name_typo_in_graph_suggests_the_model_name() {
    let gguf = load(&tiny_llama());
    let text = LLAMA.replace("blk.{i}.attn_k.weight", "blk.{i}.attn_kk.weight");
    let e = bind_err(&text, &gguf);
    assert_has(
        &e.msg,
        &[
            "weight 'blk.0.attn_kk.weight' is missing from the model",
            "closest: 'blk.0.attn_k.weight'",
        ],
    );
    let at = pos_of(&text, "\"blk.{i}.attn_kk.weight\"");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn no_candidate_of_a_weight_list() {
    let mut w = tiny_llama();
    remove_tensor(&mut w, "token_embd.weight");
    // Keep an embedding under another name so Embed passes and the tied
    // output (["output.weight", "token_embd.weight"]) finds neither.
    w.tensors.push(rand_tensor(
        &mut Rng(1),
        "tok_embeddings.weight",
        &[D_MODEL, VOCAB],
    ));
    let gguf = load(&w);
    let text = LLAMA.replacen(
        "table: \"token_embd.weight\"",
        "table: \"tok_embeddings.weight\"",
        1,
    );
    let e = bind_err(&text, &gguf);
    assert_has(
        &e.msg,
        &["none of the weights", "output.weight", "token_embd.weight"],
    );
    let at = pos_of(&text, "[\"output.weight\"");
    assert_pos(&e, at.line, at.col + 1);
}

#[test]
fn matmul_weight_of_the_wrong_shape() {
    let mut w = tiny_llama();
    // attn_q takes 32 inputs instead of d_model = 64.
    let data = f32_bytes(&vec![0.01; 32 * 64]);
    set_tensor(&mut w, "blk.0.attn_q.weight", &[32, 64], DType::F32, data);
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &[
            "MatMul",
            "'h' has shape [T, 64]",
            "blk.0.attn_q.weight",
            "takes 32 inputs",
            "[32, 64]",
        ],
    );
    // The op is the one bound to "q".
    let at = pos_of(LLAMA, "Let(\"q\", MatMul");
    assert_pos(&e, at.line, at.col + 4);
}

#[test]
fn norm_weight_of_the_wrong_shape() {
    let mut w = tiny_llama();
    let data = f32_bytes(&[1.0; 32]);
    set_tensor(&mut w, "output_norm.weight", &[32], DType::F32, data);
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &["RmsNorm", "output_norm.weight", "[32]", "[T, 64]", "[64]"],
    );
}

#[test]
fn reshape_to_a_different_element_count() {
    let gguf = load(&tiny_llama());
    let text = LLAMA.replace(
        "shape: [\"T\", \"n_head\", \"head_dim\"]",
        "shape: [\"T\", \"n_head\", \"head_dim + 1\"]",
    );
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["cannot reshape 'q'", "[T, 64]", "[T, 4, 17]"]);
}

#[test]
fn bad_expression_syntax_points_inside_the_string() {
    let text = LLAMA.replace("\"1 / sqrt(head_dim)\"", "\"1 / sqrt(head_dim) *\"");
    let e = parse_err(&text);
    assert_has(
        &e.msg,
        &["1 / sqrt(head_dim) *", "expression ends too early"],
    );
    // The error is at the end of the text: after the 20 characters of
    // `1 / sqrt(head_dim) *`, one past the opening quote.
    let at = pos_of(&text, "\"1 / sqrt(head_dim) *\"");
    assert_pos(&e, at.line, at.col + 1 + 20);
}

#[test]
fn bad_expression_token_points_at_it() {
    let text = graph_with("\"n\": \"2 +* 3\"", &[EMBED, LOGITS], "logits");
    let e = parse_err(&text);
    assert_has(&e.msg, &["2 +* 3", "found '*'"]);
    // `    params: {"n": "2 +* 3"},` is line 2; the expression string opens
    // at column 19 and the `*` is its 4th character (offset 3): column 23.
    assert_eq!(pos_of(&text, "\"2 +* 3\""), Pos { line: 2, col: 19 });
    assert_pos(&e, 2, 23);
}

#[test]
fn bad_weight_template_points_inside_the_string() {
    let text = LLAMA.replace("\"blk.{i}.attn_v.weight\"", "\"blk.{i.attn_v.weight\"");
    let e = parse_err(&text);
    assert_has(&e.msg, &["blk.{i.attn_v.weight", "unclosed '{'"]);
    let at = pos_of(&text, "\"blk.{i.attn_v.weight\"");
    // The `{` is at offset 4 of the text.
    assert_pos(&e, at.line, at.col + 1 + 4);
}

#[test]
fn unknown_function_and_undefined_name() {
    let gguf = load(&tiny_llama());
    let text = graph_with("\"n\": \"sqroot(4)\"", &[EMBED, LOGITS], "logits");
    let e = parse_err(&text);
    assert_has(&e.msg, &["unknown function 'sqroot'", "sqrt"]);
    // The string opens at column 19; `sqroot` is its first character.
    assert_pos(&e, 2, 20);

    let text = graph_with("\"n\": 4, \"m\": \"nn * 2\"", &[EMBED, LOGITS], "logits");
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["undefined name 'nn'", "did you mean 'n'"]);
    let at = pos_of(&text, "\"nn * 2\"");
    assert_pos(&e, at.line, at.col + 1);
}

#[test]
fn division_by_zero_in_a_param() {
    let gguf = load(&tiny_llama());
    let text = graph_with("\"n\": \"4 / (2 - 2)\"", &[EMBED, LOGITS], "logits");
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["division by zero"]);
    let at = pos_of(&text, "\"4 / (2 - 2)\"");
    assert_pos(&e, at.line, at.col + 1 + 2);
}

#[test]
fn unknown_metadata_without_default() {
    let mut w = tiny_llama();
    remove_meta(&mut w, "llama.block_count");
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &[
            "no metadata 'llama.block_count'",
            "give a default",
            "meta('{arch}.block_count')",
        ],
    );
    // The `meta` call is the first character of the expression.
    let at = pos_of(LLAMA, "\"meta('{arch}.block_count')\"");
    assert_pos(&e, at.line, at.col + 1);
}

#[test]
fn metadata_of_the_wrong_type() {
    let mut w = tiny_llama();
    remove_meta(&mut w, "llama.embedding_length");
    w.metadata.push((
        "llama.embedding_length".into(),
        MetaValue::Array(vec![MetaValue::U32(64)]),
    ));
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(&e.msg, &["llama.embedding_length", "array"]);
}

#[test]
fn repeat_count_that_is_not_an_integer() {
    let gguf = load(&tiny_llama());
    let text = LLAMA.replace("count: \"n_layer\"", "count: \"n_layer / 4\"");
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["repeat count", "non-negative integer", "0.5"]);
    let at = pos_of(&text, "\"n_layer / 4\"");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn norm_weight_stored_as_q8_0() {
    let mut w = tiny_llama();
    // 64 elements of Q8_0: two 32-element blocks of 34 bytes.
    set_tensor(
        &mut w,
        "blk.0.attn_norm.weight",
        &[D_MODEL],
        DType::Q8_0,
        vec![0; 2 * 34],
    );
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &[
            "weight 'blk.0.attn_norm.weight' is Q8_0",
            "RmsNorm cannot take",
            "F32, F16, BF16",
        ],
    );
    let at = pos_of(LLAMA, "\"blk.{i}.attn_norm.weight\"");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn matmul_weight_of_an_unsupported_dtype() {
    let mut w = tiny_llama();
    // 64 × 64 = 4096 elements of Q8_K: sixteen 256-element blocks of 292 bytes.
    set_tensor(
        &mut w,
        "blk.1.ffn_gate.weight",
        &[D_MODEL, D_FF],
        DType::Q8_K,
        vec![0; (64 * 128 / 256) * 292],
    );
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &[
            "weight 'blk.1.ffn_gate.weight' is Q8_K",
            "MatMul cannot take",
            "Q4_K",
            "re-quantize",
        ],
    );
    let at = pos_of(LLAMA, "\"blk.{i}.ffn_gate.weight\"");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn embedding_of_an_unsupported_dtype() {
    let mut w = tiny_llama();
    // 6400 elements is not a whole number of 256-element blocks, so use I32
    // (a plain type kiln cannot compute with).
    set_tensor(
        &mut w,
        "token_embd.weight",
        &[D_MODEL, VOCAB],
        DType::I32,
        vec![0; 64 * 100 * 4],
    );
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &["token_embd.weight", "is I32", "Embed cannot take"],
    );
}

#[test]
fn weight_with_a_zero_dimension() {
    // A GGUF may declare an empty tensor; no op can use one (a zero-length
    // row would divide by zero in the reference matmul and norms).
    let mut w = tiny_llama();
    set_tensor(
        &mut w,
        "blk.0.attn_k.weight",
        &[D_MODEL, 0],
        DType::F32,
        vec![],
    );
    let gguf = load(&w);
    let e = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap_err();
    assert_has(
        &e.msg,
        &[
            "weight 'blk.0.attn_k.weight' has a zero dimension",
            "[64, 0]",
            "corrupt",
        ],
    );
    let at = pos_of(LLAMA, "\"blk.{i}.attn_k.weight\"");
    assert_pos(&e, at.line, at.col);

    // Everything zero-sized and consistent: binds no further than the table.
    let w = GgufWriter {
        metadata: vec![("general.architecture".into(), MetaValue::Str("x".into()))],
        tensors: vec![("e".into(), vec![0, 10], DType::F32, vec![])],
    };
    let gguf = load(&w);
    let text = graph_with(
        "",
        &[
            r#"Let("x", Embed(table: "e", ids: "tokens")),"#,
            r#"Let("l", MatMul(x: "x", w: "e")),"#,
        ],
        "l",
    );
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["weight 'e' has a zero dimension"]);
}

#[test]
fn reserved_and_rebound_names() {
    let gguf = load(&tiny_llama());
    let text = graph_with("\"arch\": 1", &[EMBED, LOGITS], "logits");
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["'arch' is reserved"]);
    assert_pos(&e, 2, 14);

    let text = graph_with(
        "",
        &[EMBED, r#"Let("tokens", Silu(x: "x")),"#, LOGITS],
        "logits",
    );
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["'tokens' is the input"]);
    let at = pos_of(&text, "\"tokens\", Silu");
    assert_pos(&e, at.line, at.col);
}

#[test]
fn output_that_is_not_logits() {
    let gguf = load(&tiny_llama());
    let text = graph_with("", &[EMBED, LOGITS], "tokens");
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["output 'tokens' must be logits"]);
}

/// Run `f` on a thread with a 2 MiB stack (what test threads get): a stack
/// overflow aborts the whole process, so deep inputs must be refused first.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .expect("no panic")
}

#[test]
fn deeply_nested_expression_is_an_error_not_a_crash() {
    for (open, close) in [("(", ")"), ("sqrt(", ")"), ("-", ""), ("!", "")] {
        // 200 levels: deeper than the limit, shorter than the token limit.
        let deep = format!("{}1{}", open.repeat(200), close.repeat(200));
        let text = graph_with(&format!("\"n\": \"{deep}\""), &[EMBED, LOGITS], "logits");
        let e = on_small_stack(move || Graph::parse(&text, "deep.ron").map(|_| ()))
            .expect_err("too deep");
        assert_has(&e.msg, &["nested too deeply", "more than 64 levels"]);
        // The error points at the first token past the limit, on line 2.
        assert_eq!(e.pos.map(|p| p.line), Some(2), "{e}");
    }
    // `a ? b : c ? d : ...` nests on the right.
    let chain = vec!["0 ? 1 :"; 200].join(" ") + " 2";
    let text = graph_with(&format!("\"n\": \"{chain}\""), &[EMBED, LOGITS], "logits");
    let e =
        on_small_stack(move || Graph::parse(&text, "deep.ron").map(|_| ())).expect_err("too deep");
    assert_has(&e.msg, &["nested too deeply"]);

    // 64 levels are fine and evaluate.
    let ok = format!("{}7{}", "(".repeat(60), ")".repeat(60));
    let text = graph_with(&format!("\"n\": \"{ok}\""), &[EMBED, LOGITS], "logits");
    let gguf = load(&tiny_llama());
    let g = on_small_stack(move || Graph::parse(&text, "ok.ron").unwrap().bind(&gguf).unwrap());
    assert_eq!(g.param("n"), Some(7.0));
}

#[test]
fn very_long_expression_is_an_error_not_a_crash() {
    // A left-leaning chain nests in the tree, not in the parser, so the
    // bound is on its length: evaluating or dropping 50 000 levels would
    // overflow the stack.
    let long = vec!["1"; 50_000].join(" + ");
    let text = graph_with(&format!("\"n\": \"{long}\""), &[EMBED, LOGITS], "logits");
    let e =
        on_small_stack(move || Graph::parse(&text, "long.ron").map(|_| ())).expect_err("too long");
    assert_has(&e.msg, &["expression too long", "more than 1000 tokens"]);
    assert_eq!(e.pos.map(|p| p.line), Some(2), "{e}");

    // Just under the limit (999 tokens) parses and evaluates on a small stack.
    let long = vec!["1"; 500].join(" + ");
    let text = graph_with(&format!("\"n\": \"{long}\""), &[EMBED, LOGITS], "logits");
    let gguf = load(&tiny_llama());
    let g = on_small_stack(move || {
        Graph::parse(&text, "long.ron")
            .unwrap()
            .bind(&gguf)
            .unwrap()
    });
    assert_eq!(g.param("n"), Some(500.0));
}

#[test]
fn deeply_nested_statements_are_an_error_not_a_crash() {
    let nest = |n: usize| {
        let mut body = LOGITS.trim_end_matches(',').to_string();
        for _ in 0..n {
            body = format!("If(cond: 1, then: [{body}])");
        }
        graph_with("", &[EMBED, &format!("{body},")], "logits")
    };
    // ron refuses deep nesting (its recursion limit is 128).
    let text = nest(1_000);
    let e =
        on_small_stack(move || Graph::parse(&text, "deep.ron").map(|_| ())).expect_err("too deep");
    assert_has(&e.msg, &["nest too deeply", "flatten"]);
    assert!(e.pos.is_some(), "{e}");
    // What it accepts binds (and drops) on a small stack.
    let text = nest(20);
    let gguf = load(&tiny_llama());
    on_small_stack(move || {
        Graph::parse(&text, "ok.ron")
            .unwrap()
            .bind(&gguf)
            .map(|_| ())
    })
    .expect("20 nested Ifs bind");
}

#[test]
fn huge_repeat_count_is_refused_quickly() {
    // A repeat whose body reads no weight would otherwise unroll 2^40 times.
    let gguf = load(&tiny_llama());
    let text = graph_with(
        "",
        &[
            EMBED,
            r#"Repeat(var: "i", count: "pow(2, 40)", body: [Let("x", Silu(x: "x"))]),"#,
            LOGITS,
        ],
        "logits",
    );
    let t0 = std::time::Instant::now();
    let e = bind_err(&text, &gguf);
    assert!(t0.elapsed().as_secs() < 5, "took {:?}", t0.elapsed());
    assert_has(
        &e.msg,
        &[
            "repeat count \"pow(2, 40)\" gives 1099511627776",
            "more than the 100000 statements",
        ],
    );
    let at = pos_of(&text, "\"pow(2, 40)\"");
    assert_pos(&e, at.line, at.col);

    // Nested repeats, each small, that multiply past the limit.
    let text = graph_with(
        "",
        &[
            EMBED,
            r#"Repeat(var: "i", count: 1000, body: [Repeat(var: "j", count: 1000, body: [])]),"#,
            LOGITS,
        ],
        "logits",
    );
    let t0 = std::time::Instant::now();
    let e = bind_err(&text, &gguf);
    assert!(t0.elapsed().as_secs() < 5, "took {:?}", t0.elapsed());
    assert_has(&e.msg, &["unrolls to more than 100000 statements"]);
    assert_eq!(e.pos.map(|p| p.line), Some(5), "{e}");
}

#[test]
fn reshape_with_overflowing_dims() {
    // 2^40 · 2^40 overflows usize; it must be a mismatch, not a panic.
    let gguf = load(&tiny_llama());
    let text = graph_with(
        "",
        &[
            EMBED,
            r#"Let("y", Reshape(x: "x", shape: ["T", "pow(2, 40)", "pow(2, 40)", "pow(2, 40)"])),"#,
            LOGITS,
        ],
        "logits",
    );
    let e = bind_err(&text, &gguf);
    assert_has(&e.msg, &["cannot reshape 'x'", "[T, 64]", "1099511627776"]);
}

#[test]
fn graph_load_of_a_missing_file() {
    let e = Graph::load("/nonexistent/kiln/graph.ron").unwrap_err();
    assert_has(&e.msg, &["cannot read the graph file"]);
    assert_eq!(e.file, "/nonexistent/kiln/graph.ron");
}

// ---------------------------------------------------------------------------
// Running the model
// ---------------------------------------------------------------------------

#[test]
fn token_id_out_of_range() {
    let gguf = load(&tiny_llama());
    let g = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap();
    let mut r = Reference::new(&g, &gguf, 16).unwrap();
    let e = r.forward(&[1, 100, 2], false).unwrap_err().to_string();
    assert_has(&e, &["token id 100 is out of range", "100 tokens"]);
    let e = r.forward(&[u32::MAX], true).unwrap_err().to_string();
    assert_has(&e, &["token id 4294967295 is out of range"]);
    let e = r.forward(&[], true).unwrap_err().to_string();
    assert_has(&e, &["no tokens"]);
    // Nothing ran, so a good call still works from position 0.
    assert_eq!(r.pos(), 0);
    r.forward(&[99], true).expect("id 99 is fine");
}

#[test]
fn context_overflow() {
    let gguf = load(&tiny_llama());
    let g = Graph::parse(LLAMA, "llama.ron")
        .unwrap()
        .bind(&gguf)
        .unwrap();
    let mut r = Reference::new(&g, &gguf, 8).unwrap();
    let e = r.forward(&[1; 9], false).unwrap_err().to_string();
    assert_has(&e, &["9 tokens at position 0 exceed the context of 8"]);
    r.forward(&[1; 6], true).unwrap();
    let e = r.forward(&[1; 3], true).unwrap_err().to_string();
    assert_has(&e, &["3 tokens at position 6 exceed the context of 8"]);
    r.forward(&[1; 2], true).expect("exactly full is fine");
    let e = r.forward(&[1], true).unwrap_err().to_string();
    assert_has(&e, &["exceed the context"]);

    // n_ctx is capped at the model's context_length (64).
    let mut r = Reference::new(&g, &gguf, 1000).unwrap();
    assert_eq!(r.n_ctx(), N_CTX as usize);
    let e = r.forward(&[1; 65], false).unwrap_err().to_string();
    assert_has(&e, &["exceed the context of 64", "the model allows 64"]);
}

// ---------------------------------------------------------------------------
// GGUF files
// ---------------------------------------------------------------------------

/// A small image with a hand-checked layout (all integers little-endian):
///
/// ```text
///   0..4    magic "GGUF"            4..8    version = 3
///   8..16   tensor count = 2        16..24  metadata count = 2
///   kv 0:  24..32  key len = 20     32..52  "general.architecture"
///          52..56  type = 8 (str)   56..64  len = 5     64..69  "llama"
///   kv 1:  69..77  key len = 3      77..80  "tok"
///          80..84  type = 9 (array) 84..88  elem type = 4 (u32)
///          88..96  count = 3        96..108 [1, 2, 3]
///   t 0:  108..116 name len = 1     116     "a"
///         117..121 n_dims = 1       121..129 dims[0] = 4
///         129..133 type = 0 (F32)   133..141 offset = 0
///   t 1:  141..149 name len = 1     149     "b"
///         150..154 n_dims = 2       154..162 dims[0] = 2   162..170 dims[1] = 2
///         170..174 type = 0 (F32)   174..182 offset = 32 (align_up(16, 32))
///   182..192 padding: data starts at align_up(182, 32) = 192
///   192..208 a's data, 208..224 padding, 224..240 b's data
/// ```
fn small_writer() -> GgufWriter {
    GgufWriter {
        metadata: vec![
            (
                "general.architecture".into(),
                MetaValue::Str("llama".into()),
            ),
            (
                "tok".into(),
                MetaValue::Array(vec![
                    MetaValue::U32(1),
                    MetaValue::U32(2),
                    MetaValue::U32(3),
                ]),
            ),
        ],
        tensors: vec![
            (
                "a".into(),
                vec![4],
                DType::F32,
                f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
            ),
            (
                "b".into(),
                vec![2, 2],
                DType::F32,
                f32_bytes(&[5.0, 6.0, 7.0, 8.0]),
            ),
        ],
    }
}

const OFF_VERSION: usize = 4;
const OFF_N_TENSORS: usize = 8;
const OFF_N_KV: usize = 16;
const OFF_KEY0_LEN: usize = 24;
const OFF_KV0_TYPE: usize = 52;
const OFF_KV0_STR_LEN: usize = 56;
const OFF_KV1_ELEM_TYPE: usize = 84;
const OFF_KV1_COUNT: usize = 88;
const OFF_T0_NAME_LEN: usize = 108;
const OFF_T0_N_DIMS: usize = 117;
const OFF_T0_DIM0: usize = 121;
const OFF_T0_TYPE: usize = 129;
const OFF_T1_NAME: usize = 149;
const OFF_T1_DIM0: usize = 154;
const OFF_T1_DIM1: usize = 162;
const OFF_T1_OFFSET: usize = 174;
const HEADER_END: usize = 182;
const DATA_START: usize = 192;
const FILE_LEN: usize = 240;

fn small() -> Vec<u8> {
    small_writer().to_bytes()
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parsing must fail; returns the message.
#[track_caller]
fn gguf_err(bytes: Vec<u8>) -> String {
    match Gguf::from_bytes(bytes) {
        Ok(g) => panic!("expected an error, parsed {g:?}"),
        Err(GgufError::Format(m)) => m,
        Err(e) => panic!("expected a format error, got {e}"),
    }
}

#[test]
fn small_image_layout_is_as_documented() {
    let b = small();
    assert_eq!(b.len(), FILE_LEN);
    assert_eq!(&b[0..4], b"GGUF");
    assert_eq!(get_u32(&b, OFF_VERSION), 3);
    assert_eq!(get_u64(&b, OFF_N_TENSORS), 2);
    assert_eq!(get_u64(&b, OFF_N_KV), 2);
    assert_eq!(get_u64(&b, OFF_KEY0_LEN), 20);
    assert_eq!(&b[32..52], b"general.architecture");
    assert_eq!(get_u32(&b, OFF_KV0_TYPE), 8);
    assert_eq!(get_u64(&b, OFF_KV0_STR_LEN), 5);
    assert_eq!(get_u32(&b, OFF_KV1_ELEM_TYPE), 4);
    assert_eq!(get_u64(&b, OFF_KV1_COUNT), 3);
    assert_eq!(get_u64(&b, OFF_T0_NAME_LEN), 1);
    assert_eq!(b[OFF_T0_NAME_LEN + 8], b'a');
    assert_eq!(get_u32(&b, OFF_T0_N_DIMS), 1);
    assert_eq!(get_u64(&b, OFF_T0_DIM0), 4);
    assert_eq!(get_u32(&b, OFF_T0_TYPE), 0);
    assert_eq!(b[OFF_T1_NAME], b'b');
    assert_eq!(get_u64(&b, OFF_T1_DIM0), 2);
    assert_eq!(get_u64(&b, OFF_T1_DIM1), 2);
    assert_eq!(get_u64(&b, OFF_T1_OFFSET), 32);
    assert!(b[HEADER_END..DATA_START].iter().all(|&x| x == 0));

    let g = Gguf::from_bytes(b).expect("valid");
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture(), Some("llama"));
    let a = g.tensor("a").unwrap();
    assert_eq!(a.offset, DATA_START as u64);
    assert_eq!(g.tensor_data(a), &f32_bytes(&[1.0, 2.0, 3.0, 4.0])[..]);
    let t = g.tensor("b").unwrap();
    assert_eq!(t.offset, DATA_START as u64 + 32);
    assert_eq!(t.offset + t.size, FILE_LEN as u64);
    assert_eq!(g.meta("tok").unwrap().to_string(), "[1, 2, 3]");
}

#[test]
fn bad_magic() {
    let mut b = small();
    b[0..4].copy_from_slice(b"GGML");
    assert_has(&gguf_err(b), &["not a GGUF file", "bad magic"]);
    let mut b = small();
    b[0..4].copy_from_slice(b"FUGG");
    assert_has(&gguf_err(b), &["big-endian"]);
    assert_has(&gguf_err(b"<!DOCTYPE html>".to_vec()), &["not a GGUF file"]);
}

#[test]
fn unknown_version() {
    let mut b = small();
    put_u32(&mut b, OFF_VERSION, 7);
    assert_has(&gguf_err(b), &["unknown GGUF version 7", "2 and 3"]);
    let mut b = small();
    put_u32(&mut b, OFF_VERSION, u32::MAX);
    assert_has(&gguf_err(b), &["unknown GGUF version 4294967295"]);
    let mut b = small();
    put_u32(&mut b, OFF_VERSION, 0);
    assert_has(&gguf_err(b), &["unknown GGUF version 0"]);
}

#[test]
fn version_1() {
    let mut b = small();
    put_u32(&mut b, OFF_VERSION, 1);
    assert_has(&gguf_err(b), &["version 1 is not supported"]);
}

#[test]
fn version_2_reads() {
    // v2 and v3 share the layout kiln reads.
    let mut b = small();
    put_u32(&mut b, OFF_VERSION, 2);
    assert_eq!(Gguf::from_bytes(b).expect("v2").version, 2);
}

#[test]
fn every_prefix_of_a_small_file_is_an_error() {
    let b = small();
    for n in 0..b.len() {
        let m = gguf_err(b[..n].to_vec());
        assert_has(&m, &["truncated"]);
        if n < HEADER_END {
            // Cut inside the header: the message says where.
            assert!(
                m.contains("file truncated: reading")
                    || m.contains("impossible for a file of")
                    || m.contains("cannot fit in the"),
                "prefix {n}: {m}"
            );
        } else {
            assert_has(&m, &["lies past the end of the file"]);
        }
    }
    Gguf::from_bytes(b).expect("the whole file parses");
}

#[test]
fn every_header_prefix_of_the_tiny_model_is_an_error() {
    let b = tiny_llama().to_bytes();
    let g = Gguf::from_bytes(b.clone()).unwrap();
    let data_start = g.tensors.iter().map(|t| t.offset).min().unwrap() as usize;
    // Every cut in the header, and a spread of cuts through the data.
    let cuts = (0..data_start + 64).chain((data_start..b.len()).step_by(997));
    for n in cuts {
        assert_has(&gguf_err(b[..n].to_vec()), &["truncated"]);
    }
}

#[test]
fn truncated_tensor_data() {
    let b = small();
    let m = gguf_err(b[..FILE_LEN - 1].to_vec());
    assert_has(
        &m,
        &[
            "tensor \"b\" (bytes 224..240) lies past the end of the file (239 bytes)",
            "truncated",
        ],
    );
}

#[test]
fn tensor_offset_past_end_of_file() {
    let mut b = small();
    put_u64(&mut b, OFF_T1_OFFSET, 1024);
    assert_has(
        &gguf_err(b),
        &["tensor \"b\" (bytes 1216..1232) lies past the end of the file (240 bytes)"],
    );
    // An offset that overflows u64 when the data start is added.
    let mut b = small();
    put_u64(&mut b, OFF_T1_OFFSET, u64::MAX - 31);
    assert_has(&gguf_err(b), &["tensor \"b\"", "lies past the end"]);
    // Unaligned.
    let mut b = small();
    put_u64(&mut b, OFF_T1_OFFSET, 33);
    assert_has(
        &gguf_err(b),
        &["offset 33 is not a multiple of the alignment 32"],
    );
}

#[test]
fn absurd_dimension_count() {
    for n in [9, 5, u32::MAX] {
        let mut b = small();
        put_u32(&mut b, OFF_T0_N_DIMS, n);
        assert_has(
            &gguf_err(b),
            &[&format!("tensor \"a\" has {n} dimensions"), "1 to 4"],
        );
    }
    let mut b = small();
    put_u32(&mut b, OFF_T0_N_DIMS, 0);
    assert_has(&gguf_err(b), &["has 0 dimensions"]);
    // The writer writes what it is given: 9 dims in a valid layout.
    let mut w = small_writer();
    w.tensors[0].1 = vec![1; 9];
    w.tensors[0].3 = vec![0; 4];
    assert_has(&gguf_err(w.to_bytes()), &["has 9 dimensions"]);
}

#[test]
fn absurd_dimension_sizes() {
    let mut b = small();
    put_u64(&mut b, OFF_T0_DIM0, u64::MAX);
    assert_has(
        &gguf_err(b),
        &["tensor \"a\" has absurd dimensions [18446744073709551615]"],
    );
    // 2^32 × 2^32 overflows u64.
    let mut b = small();
    put_u64(&mut b, OFF_T1_DIM0, 1 << 32);
    put_u64(&mut b, OFF_T1_DIM1, 1 << 32);
    assert_has(&gguf_err(b), &["tensor \"b\" has absurd dimensions"]);
    // Large but not overflowing: the data would lie far past the end.
    let mut b = small();
    put_u64(&mut b, OFF_T1_DIM0, 1 << 20);
    assert_has(&gguf_err(b), &["tensor \"b\"", "absurd dimensions"]);
    let mut b = small();
    put_u64(&mut b, OFF_T1_DIM0, 20);
    assert_has(&gguf_err(b), &["tensor \"b\"", "lies past the end"]);
    // Through the writer, with a data size that the dims contradict.
    let mut w = small_writer();
    w.tensors[1].1 = vec![u64::MAX, u64::MAX, 2, 2];
    assert_has(&gguf_err(w.to_bytes()), &["absurd dimensions"]);
}

#[test]
fn partial_quant_block() {
    let mut w = small_writer();
    // 33 elements of Q8_0 are not a whole number of 32-element blocks.
    w.tensors[0] = ("q".into(), vec![33], DType::Q8_0, vec![0; 68]);
    assert_has(
        &gguf_err(w.to_bytes()),
        &["tensor \"q\"", "33 elements of Q8_0", "32-element blocks"],
    );
}

#[test]
fn unknown_dtype_id() {
    for id in [99, 4, 31, u32::MAX] {
        let mut b = small();
        put_u32(&mut b, OFF_T0_TYPE, id);
        assert_has(
            &gguf_err(b),
            &[&format!("tensor \"a\" has unknown dtype id {id}")],
        );
    }
}

#[test]
fn duplicate_tensor_names() {
    let mut b = small();
    b[OFF_T1_NAME] = b'a';
    assert_has(&gguf_err(b), &["duplicate tensor name \"a\""]);
    let mut w = tiny_llama();
    let t = w.tensors[3].clone();
    w.tensors.push(t);
    assert_has(
        &gguf_err(w.to_bytes()),
        &["duplicate tensor name \"blk.0.attn_k.weight\""],
    );
}

#[test]
fn duplicate_metadata_key() {
    let mut w = small_writer();
    w.metadata.push((
        "general.architecture".into(),
        MetaValue::Str("gemma3".into()),
    ));
    assert_has(
        &gguf_err(w.to_bytes()),
        &["duplicate metadata key \"general.architecture\""],
    );
}

#[test]
fn huge_string_length() {
    for len in [u64::MAX, 1 << 40, 241] {
        let mut b = small();
        put_u64(&mut b, OFF_KEY0_LEN, len);
        assert_has(
            &gguf_err(b),
            &[
                "file truncated: reading metadata key #0",
                &format!("needs {len} bytes"),
            ],
        );
    }
    let mut b = small();
    put_u64(&mut b, OFF_KV0_STR_LEN, u64::MAX);
    assert_has(
        &gguf_err(b),
        &[
            "file truncated: reading general.architecture",
            "18446744073709551615 bytes",
        ],
    );
    let mut b = small();
    put_u64(&mut b, OFF_T0_NAME_LEN, 1 << 62);
    assert_has(&gguf_err(b), &["tensor #0 name"]);
}

#[test]
fn huge_array_count() {
    for count in [u64::MAX, 1 << 32, 100] {
        let mut b = small();
        put_u64(&mut b, OFF_KV1_COUNT, count);
        assert_has(
            &gguf_err(b),
            &[&format!(
                "metadata \"tok\": array of {count} elements cannot fit"
            )],
        );
    }
}

#[test]
fn huge_tensor_and_metadata_counts() {
    let mut b = small();
    put_u64(&mut b, OFF_N_TENSORS, u64::MAX);
    assert_has(
        &gguf_err(b),
        &["tensor count 18446744073709551615 is impossible"],
    );
    let mut b = small();
    put_u64(&mut b, OFF_N_KV, 1 << 40);
    assert_has(
        &gguf_err(b),
        &["metadata count 1099511627776 is impossible"],
    );
    // A count that fits the bytes but is a lie: the reader runs into the
    // tensor infos and then the end.
    let mut b = small();
    put_u64(&mut b, OFF_N_KV, 3);
    assert!(Gguf::from_bytes(b).is_err());
}

#[test]
fn unknown_metadata_types() {
    let mut b = small();
    put_u32(&mut b, OFF_KV0_TYPE, 13);
    assert_has(
        &gguf_err(b),
        &["metadata \"general.architecture\" has unknown value type id 13"],
    );
    let mut b = small();
    put_u32(&mut b, OFF_KV1_ELEM_TYPE, 99);
    assert_has(&gguf_err(b), &["\"tok\": array of unknown type id 99"]);
    // Nested arrays.
    let mut b = small();
    put_u32(&mut b, OFF_KV1_ELEM_TYPE, 9);
    assert_has(&gguf_err(b), &["nested arrays"]);
}

#[test]
fn bool_out_of_range_and_bad_alignment() {
    let mut w = small_writer();
    w.metadata.push(("flag".into(), MetaValue::Bool(true)));
    let mut b = w.to_bytes();
    // The bool is the last byte of the metadata section; it directly precedes
    // the first tensor info, which now starts 4 + 8 + 4 + 1 bytes later.
    let at = 108 + 8 + 4 + 4;
    assert_eq!(b[at], 1);
    assert_eq!(&b[at - 8..at - 4], b"flag");
    b[at] = 2;
    assert_has(&gguf_err(b), &["\"flag\": bool has value 2"]);

    for bad in [
        MetaValue::U32(3),
        MetaValue::U32(0),
        MetaValue::U64(32),
        MetaValue::Str("32".into()),
    ] {
        let mut w = small_writer();
        w.metadata.push(("general.alignment".into(), bad));
        assert_has(
            &gguf_err(w.to_bytes()),
            &["general.alignment must be a power-of-two u32"],
        );
    }
}

#[test]
fn open_names_the_file() {
    let e = Gguf::open("/nonexistent/kiln/model.gguf").unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e}");
    assert_has(&e.to_string(), &["/nonexistent/kiln/model.gguf"]);

    let dir = std::env::temp_dir().join(format!("kiln-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("truncated.gguf");
    std::fs::write(&path, &small()[..100]).unwrap();
    let e = Gguf::open(&path).unwrap_err().to_string();
    std::fs::write(&path, b"").unwrap();
    let empty = Gguf::open(&path).map(|_| ()).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert_has(&e, &[&path.display().to_string(), "truncated"]);
    assert_has(&empty, &["truncated", "magic"]);
}
