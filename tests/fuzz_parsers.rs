//! Seeded mutation fuzzing of the parsers (DESIGN.md rule 10: bad input gets
//! a clear error, never a panic). No external fuzzer: every case is derived
//! from one 64-bit seed, so any failure replays exactly.
//!
//! - GGUF: mutants of a few small valid images written with `GgufWriter`
//!   (bit flips, interesting bytes, boundary u32/u64 values, truncation,
//!   extension, duplicated/deleted/overwritten ranges) go to
//!   `Gguf::from_bytes`. For each that parses, every tensor's data is read,
//!   every metadata value is printed, and graphs/llama.ron and
//!   graphs/gemma3.ron are bound to it; what binds runs a short forward pass
//!   of the CPU reference.
//! - Graphs: mutants of graphs/llama.ron, graphs/gemma3.ron and a graph
//!   using the other ops (byte level: delete/duplicate/swap chunks, insert
//!   punctuation or odd characters; token level: swap identifiers, change
//!   numbers, rewrite strings and expressions) go to `Graph::parse`; those
//!   that parse are bound to a tiny synthetic llama-shaped model, and those
//!   that bind (and are small) run a short forward pass.
//!
//! Every case runs under `catch_unwind`; a panic fails the test, which
//! prints the case's seed, the panic, and a minimized repro (also written
//! under the cargo target tmpdir).
//!
//! Seeds and knobs (environment variables):
//! - `KILN_FUZZ_SEED`: base seed (default `0x6b696c6e_66757a7a`, "kilnfuzz").
//!   Case `i` of a test uses `case_seed(base, test_salt, i)`.
//! - `KILN_FUZZ_CASES`: cases per test (default 50 000; two tests per
//!   parser, so 100 000 GGUF images and 100 000 graph files in all).
//! - `KILN_FUZZ_REPLAY`: run only this case seed (as printed on failure).
//!
//! The default run (seed 0x6b696c6e66757a7a, 4 × 50 000 cases) takes about
//! 15 s of wall time on 2 cores with `cargo test --release`; the four fuzz
//! tests run in parallel. `harness_reports_and_minimizes_panics` checks the
//! harness itself on a planted bug.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Once, OnceLock};
use std::time::Instant;

use kiln::graph::{BoundGraph, Graph};
use kiln::model::dtype::DType;
use kiln::model::gguf::{Gguf, GgufWriter, MetaValue};
use kiln::reference::Reference;

const LLAMA: &str = include_str!("../graphs/llama.ron");
const GEMMA3: &str = include_str!("../graphs/gemma3.ron");

const DEFAULT_SEED: u64 = 0x6b69_6c6e_6675_7a7a;
const DEFAULT_CASES: usize = 50_000;

// ---------------------------------------------------------------------------
// PRNG and seeds
// ---------------------------------------------------------------------------

/// SplitMix64.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `p` percent.
    fn pct(&mut self, p: u64) -> bool {
        self.next_u64() % 100 < p
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Below `small` with probability `p` percent, else below `big`.
    fn upto(&mut self, p: u64, small: usize, big: usize) -> usize {
        let n = if self.pct(p) { small } else { big };
        self.below(n)
    }

    /// 1 most of the time, sometimes a few, rarely many.
    fn count(&mut self) -> usize {
        match self.below(100) {
            0..=59 => 1,
            60..=84 => 2,
            85..=96 => 3 + self.below(3),
            _ => 6 + self.below(12),
        }
    }
}

fn base_seed() -> u64 {
    match std::env::var("KILN_FUZZ_SEED") {
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("bad KILN_FUZZ_SEED {s:?}")),
        Err(_) => DEFAULT_SEED,
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The seed of case `i` of the test salted `salt`.
fn case_seed(base: u64, salt: u64, i: usize) -> u64 {
    let mut r = Rng(base ^ salt.wrapping_mul(0xd1b5_4a32_d192_ed03) ^ (i as u64).rotate_left(32));
    r.next_u64()
}

fn n_cases() -> usize {
    std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|s| parse_u64(&s))
        .map_or(DEFAULT_CASES, |n| n as usize)
}

// ---------------------------------------------------------------------------
// Panic capture
// ---------------------------------------------------------------------------

thread_local! {
    /// While set, this thread's panics are recorded, not printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    /// The last recorded panic: "file:line:col: message".
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let loc = info.location().map_or("?".to_string(), |l| {
                    format!("{}:{}:{}", l.file(), l.line(), l.column())
                });
                let msg = payload_str(info.payload());
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{loc}: {msg}")));
            } else {
                default(info);
            }
        }));
    });
}

fn payload_str(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Run `f`, returning the panic ("location: message") if it panics.
fn panics<R>(f: impl FnOnce() -> R) -> Option<String> {
    install_hook();
    let was = QUIET.with(|q| q.replace(true));
    LAST_PANIC.with(|p| *p.borrow_mut() = None);
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    match r {
        Ok(_) => None,
        Err(p) => Some(
            LAST_PANIC
                .with(|l| l.borrow_mut().take())
                .unwrap_or_else(|| payload_str(&*p)),
        ),
    }
}

/// The panic's location, to tell one bug from another while minimizing.
fn panic_site(p: &str) -> &str {
    p.split(": ").next().unwrap_or(p)
}

/// Shrink `input` by deleting chunks while `fails` holds (a bounded ddmin).
fn minimize<T: Clone>(input: &[T], fails: impl Fn(&[T]) -> bool) -> Vec<T> {
    let mut cur = input.to_vec();
    let mut chunk = (cur.len() / 2).max(1);
    let mut tries = 0;
    while tries < 20_000 {
        let mut i = 0;
        let mut progress = false;
        while i < cur.len() && tries < 20_000 {
            tries += 1;
            let mut cand = cur.clone();
            cand.drain(i..(i + chunk).min(cur.len()));
            if fails(&cand) {
                cur = cand;
                progress = true;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 && !progress {
            break;
        }
        if !progress {
            chunk = (chunk / 2).max(1);
        }
    }
    cur
}

struct Failure {
    case: usize,
    seed: u64,
    panic: String,
}

/// Drive `n` cases of a test; `run(seed)` builds and checks one mutant and
/// returns it (as bytes) with whether it parsed. On panics, minimize the
/// first with `check` and fail with a report.
fn drive(
    test: &str,
    salt: u64,
    cases: usize,
    make: impl Fn(u64) -> Vec<u8>,
    check: impl Fn(&[u8]) -> Outcome,
    repro_ext: &str,
) {
    let base = base_seed();
    let replay = std::env::var("KILN_FUZZ_REPLAY")
        .ok()
        .map(|s| parse_u64(&s).unwrap_or_else(|| panic!("bad KILN_FUZZ_REPLAY {s:?}")));
    let seeds: Vec<(usize, u64)> = match replay {
        Some(s) => vec![(0, s)],
        None => (0..cases).map(|i| (i, case_seed(base, salt, i))).collect(),
    };
    let t0 = Instant::now();
    let mut stats = [0usize; 4];
    let mut failures: Vec<Failure> = Vec::new();
    for &(case, seed) in &seeds {
        let input = make(seed);
        let mut outcome = Outcome::Rejected;
        if let Some(p) = panics(|| outcome = check(&input)) {
            failures.push(Failure {
                case,
                seed,
                panic: p,
            });
            if failures.len() >= 5 {
                break;
            }
            continue;
        }
        stats[outcome as usize] += 1;
    }
    eprintln!(
        "{test}: {} cases in {:.1?} (base seed {base:#x}): {} rejected, {} parsed, {} bound, {} ran",
        seeds.len(),
        t0.elapsed(),
        stats[0],
        stats[1],
        stats[2],
        stats[3]
    );
    if failures.is_empty() {
        return;
    }
    let mut report = format!(
        "{test}: {} case(s) panicked (base seed {base:#x}); replay one with KILN_FUZZ_REPLAY=<seed> cargo test --release --test fuzz_parsers {test}\n",
        failures.len()
    );
    for f in &failures {
        report.push_str(&format!(
            "  case {} seed {:#x}: panicked at {}\n",
            f.case, f.seed, f.panic
        ));
    }
    let first = &failures[0];
    let input = make(first.seed);
    let site = panic_site(&first.panic).to_string();
    let small = minimize(&input, |cand| {
        panics(|| check(cand)).is_some_and(|p| panic_site(&p) == site)
    });
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let path = dir.join(format!("{test}-{:#x}.{repro_ext}", first.seed));
    let written = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(&path, &small))
        .map_or_else(
            |e| format!("(not written: {e})"),
            |_| path.display().to_string(),
        );
    report.push_str(&format!(
        "minimized repro of case {} ({} bytes, from {}), written to {written}:\n",
        first.case,
        small.len(),
        input.len()
    ));
    match std::str::from_utf8(&small) {
        Ok(s) if repro_ext == "ron" => report.push_str(&format!("{s}\n")),
        _ => {
            for line in small.chunks(32) {
                let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                report.push_str(&format!("  {}\n", hex.join(" ")));
            }
        }
    }
    panic!("{report}");
}

/// How far a case got.
#[derive(Clone, Copy)]
enum Outcome {
    Rejected = 0,
    Parsed = 1,
    Bound = 2,
    Ran = 3,
}

// ---------------------------------------------------------------------------
// Synthetic models
// ---------------------------------------------------------------------------

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn rand_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// A llama-shaped model that both graphs bind to (it carries gemma3's extra
/// norms too). `dtypes` picks the matmul weights' types: all F32, or a mix
/// of F16, BF16 and Q8_0 (whose scales are random, so may be inf or NaN).
struct Shape {
    d: u64,
    heads: u64,
    kv_heads: u64,
    ff: u64,
    vocab: u64,
    layers: u64,
    ctx: u32,
    mixed: bool,
}

fn llama_like(s: &Shape, seed: u64) -> GgufWriter {
    let mut rng = Rng(seed);
    let hd = s.d / s.heads;
    let kv = s.kv_heads * hd;
    let a = "llama";
    let m = |k: &str, v: MetaValue| (format!("{a}.{k}"), v);
    let metadata = vec![
        ("general.architecture".to_string(), MetaValue::Str(a.into())),
        ("general.name".to_string(), MetaValue::Str("tiny".into())),
        m("block_count", MetaValue::U32(s.layers as u32)),
        m("context_length", MetaValue::U32(s.ctx)),
        m("embedding_length", MetaValue::U32(s.d as u32)),
        m("feed_forward_length", MetaValue::U32(s.ff as u32)),
        m("attention.head_count", MetaValue::U32(s.heads as u32)),
        m("attention.head_count_kv", MetaValue::U32(s.kv_heads as u32)),
        m("attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5)),
        m("rope.freq_base", MetaValue::F32(10000.0)),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array(
                (0..s.vocab)
                    .map(|i| MetaValue::Str(format!("t{i}")))
                    .collect(),
            ),
        ),
    ];
    let mut tensor = |name: &str, dims: &[u64], mixed_as: DType| {
        let n: u64 = dims.iter().product();
        let dt = if s.mixed { mixed_as } else { DType::F32 };
        let data = match dt {
            DType::F32 => {
                let norm = dims.len() == 1;
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        if norm {
                            1.0 + 0.1 * rng.unit()
                        } else {
                            0.3 * rng.unit()
                        }
                    })
                    .collect();
                f32_bytes(&v)
            }
            other => {
                let bytes = other.bytes_for(n).expect("whole blocks") as usize;
                rand_bytes(&mut rng, bytes)
            }
        };
        (name.to_string(), dims.to_vec(), dt, data)
    };
    let mut tensors = vec![tensor("token_embd.weight", &[s.d, s.vocab], DType::F16)];
    for i in 0..s.layers {
        let b = |x: &str| format!("blk.{i}.{x}.weight");
        tensors.push(tensor(&b("attn_norm"), &[s.d], DType::F32));
        tensors.push(tensor(&b("attn_q"), &[s.d, s.d], DType::Q8_0));
        tensors.push(tensor(&b("attn_k"), &[s.d, kv], DType::F16));
        tensors.push(tensor(&b("attn_v"), &[s.d, kv], DType::BF16));
        tensors.push(tensor(&b("attn_q_norm"), &[hd], DType::F32));
        tensors.push(tensor(&b("attn_k_norm"), &[hd], DType::F32));
        tensors.push(tensor(&b("attn_output"), &[s.d, s.d], DType::F16));
        tensors.push(tensor(&b("post_attention_norm"), &[s.d], DType::F32));
        tensors.push(tensor(&b("ffn_norm"), &[s.d], DType::F32));
        tensors.push(tensor(&b("ffn_gate"), &[s.d, s.ff], DType::Q8_0));
        tensors.push(tensor(&b("ffn_up"), &[s.d, s.ff], DType::BF16));
        tensors.push(tensor(&b("ffn_down"), &[s.ff, s.d], DType::F32));
        tensors.push(tensor(&b("post_ffw_norm"), &[s.d], DType::F32));
    }
    tensors.push(tensor("output_norm.weight", &[s.d], DType::F32));
    GgufWriter { metadata, tensors }
}

/// The model graphs are bound to in the graph fuzz (as in tests/bad_input.rs:
/// 2 layers, d_model 64, 4 heads, 2 KV heads, FFN 128, vocabulary 100).
fn tiny_model() -> &'static Gguf {
    static M: OnceLock<Gguf> = OnceLock::new();
    M.get_or_init(|| {
        let s = Shape {
            d: 64,
            heads: 4,
            kv_heads: 2,
            ff: 128,
            vocab: 100,
            layers: 2,
            ctx: 64,
            mixed: false,
        };
        Gguf::from_bytes(llama_like(&s, 0x6b69_6c6e).to_bytes()).expect("tiny model parses")
    })
}

/// Every metadata type, arrays of each, and tensors of several dtypes with
/// odd sizes (so padding and alignment show up).
fn all_types_image() -> Vec<u8> {
    let mut rng = Rng(7);
    let arr = |v: Vec<MetaValue>| MetaValue::Array(v);
    let metadata = vec![
        (
            "general.architecture".into(),
            MetaValue::Str("llama".into()),
        ),
        ("u8".into(), MetaValue::U8(200)),
        ("i8".into(), MetaValue::I8(-5)),
        ("u16".into(), MetaValue::U16(65535)),
        ("i16".into(), MetaValue::I16(-300)),
        ("u32".into(), MetaValue::U32(7)),
        ("i32".into(), MetaValue::I32(-7)),
        ("f32".into(), MetaValue::F32(0.5)),
        ("bool".into(), MetaValue::Bool(true)),
        ("str".into(), MetaValue::Str("line one\nline two é".into())),
        ("u64".into(), MetaValue::U64(1 << 40)),
        ("i64".into(), MetaValue::I64(-1)),
        ("f64".into(), MetaValue::F64(1e-300)),
        ("a.u8".into(), arr(vec![MetaValue::U8(1), MetaValue::U8(2)])),
        ("a.i16".into(), arr(vec![MetaValue::I16(-1); 3])),
        (
            "a.f32".into(),
            arr((0..12).map(|i| MetaValue::F32(i as f32)).collect()),
        ),
        (
            "a.bool".into(),
            arr(vec![MetaValue::Bool(false), MetaValue::Bool(true)]),
        ),
        (
            "a.str".into(),
            arr(vec![
                MetaValue::Str("x".into()),
                MetaValue::Str(String::new()),
            ]),
        ),
        ("a.u64".into(), arr(vec![MetaValue::U64(u64::MAX)])),
        ("a.f64".into(), arr(vec![MetaValue::F64(f64::NAN)])),
        ("a.empty".into(), arr(vec![])),
        ("general.alignment".into(), MetaValue::U32(64)),
    ];
    let t = |name: &str, dims: Vec<u64>, dt: DType, rng: &mut Rng| {
        let n: u64 = dims.iter().product();
        let bytes = dt.bytes_for(n).expect("whole blocks") as usize;
        (name.to_string(), dims, dt, rand_bytes(rng, bytes))
    };
    let tensors = vec![
        t("f32", vec![3], DType::F32, &mut rng),
        t("f16", vec![5, 2], DType::F16, &mut rng),
        t("q8_0", vec![32], DType::Q8_0, &mut rng),
        t("q4_k", vec![256], DType::Q4_K, &mut rng),
        t("q6_k", vec![256, 1, 1, 1], DType::Q6_K, &mut rng),
        t("bf16", vec![2, 1, 1], DType::BF16, &mut rng),
        t("i8", vec![7], DType::I8, &mut rng),
        t("empty", vec![0, 4], DType::F32, &mut rng),
    ];
    // GgufWriter aligns to 32; this image declares 64. Re-lay the data at
    // 64-byte boundaries so it is valid.
    let w = GgufWriter { metadata, tensors };
    realign(&w, 64)
}

/// Write `w` with data aligned to `align` (GgufWriter always uses 32): the
/// writer's header with each tensor's offset field (the last 8 bytes of its
/// info) rewritten, then the data at the new offsets.
fn realign(w: &GgufWriter, align: u64) -> Vec<u8> {
    let b = w.to_bytes();
    let end = header_end(&b);
    let mut out = b[..end].to_vec();
    let infos: usize = w
        .tensors
        .iter()
        .map(|(n, d, _, _)| 8 + n.len() + 4 + 8 * d.len() + 4 + 8)
        .sum();
    let mut pos = end - infos;
    let mut off = 0u64;
    let mut offsets = Vec::new();
    for (n, d, _, data) in &w.tensors {
        pos += 8 + n.len() + 4 + 8 * d.len() + 4;
        out[pos..pos + 8].copy_from_slice(&off.to_le_bytes());
        pos += 8;
        offsets.push(off);
        off = (off + data.len() as u64).div_ceil(align) * align;
    }
    let start = (out.len() as u64).div_ceil(align) * align;
    out.resize(start as usize, 0);
    for ((_, _, _, data), o) in w.tensors.iter().zip(offsets) {
        out.resize((start + o) as usize, 0);
        out.extend_from_slice(data);
    }
    out
}

/// Where the header (magic, counts, metadata, tensor infos) of a valid
/// image ends, walking it field by field as the GGUF layout says.
fn header_end(b: &[u8]) -> usize {
    fn u64_at(b: &[u8], p: usize) -> usize {
        u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize
    }
    fn u32_at(b: &[u8], p: usize) -> u32 {
        u32::from_le_bytes(b[p..p + 4].try_into().unwrap())
    }
    fn skip_value(b: &[u8], p: &mut usize, ty: u32) {
        match ty {
            0 | 1 | 7 => *p += 1,
            2 | 3 => *p += 2,
            4..=6 => *p += 4,
            10..=12 => *p += 8,
            8 => *p += 8 + u64_at(b, *p),
            9 => {
                let (et, n) = (u32_at(b, *p), u64_at(b, *p + 4));
                *p += 12;
                for _ in 0..n {
                    skip_value(b, p, et);
                }
            }
            t => panic!("seed image has value type {t}"),
        }
    }
    let (n_t, n_kv) = (u64_at(b, 8), u64_at(b, 16));
    let mut p = 24;
    for _ in 0..n_kv {
        p += 8 + u64_at(b, p);
        let ty = u32_at(b, p);
        p += 4;
        skip_value(b, &mut p, ty);
    }
    for _ in 0..n_t {
        p += 8 + u64_at(b, p);
        let nd = u32_at(b, p) as usize;
        p += 4 + 8 * nd + 4 + 8;
    }
    p
}

/// The GGUF seeds, and where each one's header ends (mutations favour it).
fn gguf_seeds() -> &'static [(Vec<u8>, usize)] {
    static S: OnceLock<Vec<(Vec<u8>, usize)>> = OnceLock::new();
    S.get_or_init(|| {
        let small = GgufWriter {
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
        .to_bytes();
        let micro = |mixed: bool, seed: u64| {
            let s = Shape {
                d: 32,
                heads: 4,
                kv_heads: 2,
                ff: 32,
                vocab: 8,
                layers: 1,
                ctx: 16,
                mixed,
            };
            llama_like(&s, seed).to_bytes()
        };
        let mut v2 = micro(false, 3);
        v2[4] = 2; // version 2: same layout
        let images = vec![
            small,
            all_types_image(),
            micro(false, 1),
            micro(true, 2),
            v2,
        ];
        images
            .into_iter()
            .map(|b| {
                let g = Gguf::from_bytes(b.clone()).expect("seed image parses");
                let header_end = header_end(&b);
                assert!(g.tensors.iter().all(|t| t.offset as usize >= header_end));
                (b, header_end)
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------
// GGUF mutation
// ---------------------------------------------------------------------------

const U32S: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    9,
    12,
    13,
    15,
    16,
    30,
    31,
    32,
    33,
    35,
    36,
    63,
    64,
    99,
    127,
    128,
    255,
    256,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];

fn u64s(len: usize) -> Vec<u64> {
    let l = len as u64;
    vec![
        0,
        1,
        2,
        3,
        4,
        8,
        31,
        32,
        33,
        64,
        255,
        256,
        l.saturating_sub(1),
        l,
        l + 1,
        l.saturating_sub(32),
        l / 2,
        1 << 31,
        1 << 32,
        (1 << 32) + 1,
        1 << 40,
        1 << 62,
        1 << 63,
        i64::MAX as u64,
        u64::MAX - 31,
        u64::MAX - 1,
        u64::MAX,
    ]
}

/// A position, favouring the header (where the structure is).
fn position(rng: &mut Rng, len: usize, header_end: usize) -> usize {
    if len == 0 {
        return 0;
    }
    if rng.pct(80) {
        rng.below(header_end.min(len).max(1))
    } else {
        rng.below(len)
    }
}

fn mutate_gguf(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let seeds = gguf_seeds();
    let (orig, header_end) = rng.pick(seeds);
    let header_end = *header_end;
    let mut b = orig.clone();
    for _ in 0..rng.count() {
        let len = b.len();
        let at = position(&mut rng, len, header_end);
        match rng.below(100) {
            // flip a bit
            0..=19 => {
                if len > 0 {
                    b[at] ^= 1 << rng.below(8);
                }
            }
            // an interesting byte
            20..=34 => {
                if len > 0 {
                    b[at] = *rng.pick(&[0, 0xff, 0x7f, 0x80, 1, 2, 9, 0x20]);
                }
            }
            // a boundary u32, aligned to 4 half of the time (fields are
            // not aligned, but many sit at multiples of 4)
            35..=54 => {
                let at = if rng.pct(50) { at & !3 } else { at };
                let v = rng.pick(U32S).to_le_bytes();
                for (i, x) in v.iter().enumerate() {
                    if let Some(y) = b.get_mut(at + i) {
                        *y = *x;
                    }
                }
            }
            // a boundary u64
            55..=74 => {
                let at = if rng.pct(50) { at & !7 } else { at };
                let v = rng.pick(&u64s(len)).to_le_bytes();
                for (i, x) in v.iter().enumerate() {
                    if let Some(y) = b.get_mut(at + i) {
                        *y = *x;
                    }
                }
            }
            // truncate
            75..=81 => {
                let cut = if rng.pct(50) { at } else { rng.below(len + 1) };
                b.truncate(cut);
            }
            // extend
            82..=85 => {
                let n = 1 + rng.below(64);
                if rng.pct(50) {
                    b.resize(len + n, 0);
                } else {
                    b.extend(rand_bytes(&mut rng, n));
                }
            }
            // duplicate a range in place (inserting a copy)
            86..=90 => {
                if len > 0 {
                    let n = 1 + rng.below(32.min(len - at).max(1));
                    let chunk = b[at..(at + n).min(len)].to_vec();
                    let to = position(&mut rng, len, header_end);
                    b.splice(to..to, chunk);
                }
            }
            // delete a range
            91..=95 => {
                if len > 0 {
                    let n = 1 + rng.below(16);
                    b.drain(at..(at + n).min(len));
                }
            }
            // overwrite a range with a copy of another
            _ => {
                if len > 0 {
                    let from = position(&mut rng, len, header_end);
                    let n = 1 + rng.below(24);
                    let chunk = b[from..(from + n).min(len)].to_vec();
                    for (i, x) in chunk.iter().enumerate() {
                        if let Some(y) = b.get_mut(at + i) {
                            *y = *x;
                        }
                    }
                }
            }
        }
    }
    b
}

fn graphs() -> &'static [Graph; 2] {
    static G: OnceLock<[Graph; 2]> = OnceLock::new();
    G.get_or_init(|| {
        [
            Graph::parse(LLAMA, "llama.ron").expect("llama.ron parses"),
            Graph::parse(GEMMA3, "gemma3.ron").expect("gemma3.ron parses"),
        ]
    })
}

/// A short forward pass; errors are fine, panics are not.
fn run(bound: &BoundGraph, gguf: &Gguf) -> bool {
    if bound.nodes.len() > 400 {
        return false;
    }
    let Ok(mut r) = Reference::new(bound, gguf, 8) else {
        return false;
    };
    let v = bound.vocab.max(1) as u32;
    let ok = r.forward(&[0, v - 1, 1 % v], false).is_ok();
    let _ = r.forward(&[v / 2], true);
    let _ = r.forward(&[v], true);
    ok
}

fn check_gguf(bytes: &[u8]) -> Outcome {
    let g = match Gguf::from_bytes(bytes.to_vec()) {
        Ok(g) => g,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return Outcome::Rejected;
        }
    };
    let mut sink = 0u64;
    for t in &g.tensors {
        let d = g.tensor_data(t);
        assert_eq!(d.len() as u64, t.size, "tensor {} size", t.name);
        assert!(t.offset + t.size <= g.file_size());
        assert!(std::ptr::eq(g.tensor(&t.name).expect("indexed"), t));
        sink = sink.wrapping_add(d.iter().map(|&x| x as u64).sum::<u64>());
        sink = sink.wrapping_add(t.n_elements());
    }
    for (k, v) in &g.metadata {
        let s = format!("{k} = {v} ({}) {v:?}", v.type_name());
        sink = sink.wrapping_add(s.len() as u64);
        let _ = (v.as_f64(), v.as_str());
        if let Some(a) = v.as_array() {
            for x in a {
                sink = sink.wrapping_add(x.to_string().len() as u64);
            }
        }
    }
    sink = sink.wrapping_add(format!("{g:?} {:?}", g.architecture()).len() as u64);
    std::hint::black_box(sink);
    let mut outcome = Outcome::Parsed;
    for graph in graphs() {
        if let Ok(bound) = graph.bind(&g) {
            outcome = Outcome::Bound;
            if run(&bound, &g) {
                outcome = Outcome::Ran;
            }
        }
    }
    outcome
}

#[test]
fn gguf_seed_images_are_valid_and_bind() {
    for (i, (b, _)) in gguf_seeds().iter().enumerate() {
        let g = Gguf::from_bytes(b.clone()).unwrap();
        if i >= 2 {
            for graph in graphs() {
                let bound = graph.bind(&g).unwrap_or_else(|e| panic!("seed {i}: {e}"));
                assert!(run(&bound, &g), "seed {i} runs");
            }
        }
    }
    let g = Gguf::from_bytes(all_types_image()).unwrap();
    assert_eq!(g.alignment, 64);
    assert!(g.tensors.iter().all(|t| t.offset % 64 == 0));
    assert_eq!(g.tensors.len(), 8);
}

#[test]
fn fuzz_gguf_a() {
    drive("fuzz_gguf_a", 1, n_cases(), mutate_gguf, check_gguf, "gguf");
}

#[test]
fn fuzz_gguf_b() {
    drive("fuzz_gguf_b", 2, n_cases(), mutate_gguf, check_gguf, "gguf");
}

// ---------------------------------------------------------------------------
// Graph mutation
// ---------------------------------------------------------------------------

/// A graph that uses the ops and syntax llama.ron and gemma3.ron do not:
/// LayerNorm, Slice, Concat, Gelu, Tanh, Relu, Softcap, Softmax, Weight,
/// Argmax, If/else, weight lists, raw strings, nested comments, numbers.
const OPS: &str = r##"// Exercises the rest of the vocabulary.
Graph(
    params: {
        "d":       "meta('{arch}.embedding_length')",
        "half":    "d / 2",
        "big":     "max(pow(2, 3), floor(9.5)) + ceil(0.5) + abs(-1) + min(1, 2)",
        "has_out": "has_weight('output.weight') || !has_meta('{arch}.block_count')",
        "name":    "'{arch}' + '.x'",
        "odd":     "d % 3 == 1 && d >= 2 ? 1 : 0",
    },
    max_context: 128,
    body: [
        Let("x", Embed(table: ["missing.weight", "token_embd.weight"], ids: "tokens")),
        Let("n", LayerNorm(x: "x", weight: "output_norm.weight", bias: r#"blk.0.attn_norm.weight"#, eps: 1e-5)),
        Let("a", Slice(x: "n", axis: 1, start: 0, len: "half")),
        Let("b", Slice(x: "n", axis: 1, start: "half", len: "half")),
        Let("a", Gelu(x: "a")),
        Let("b", Tanh(x: "b")),
        Let("c", Concat(xs: ["a", "b"], axis: 1)),
        /* a /* nested */ comment */
        If(cond: "has_out", then: [
            Let("c", Relu(x: "c")),
        ], else: [
            Let("c", Softcap(x: "c", cap: 30.0)),
            Let("c", Scale(x: "c", by: "1 / sqrt(d)")),
        ]),
        Let("w", Weight(w: "blk.1.ffn_norm.weight")),
        Let("c", Add(a: "c", b: "w")),
        Let("c", Mul(a: "c", b: "w")),
        Let("r", Reshape(x: "c", shape: ["T", 8, "d / 8"])),
        Let("r", Rope(x: "r", mode: Neox, base: 10000, dims: 4, scale: 0.5)),
        Let("s", Softmax(x: "r")),
        Let("r", Reshape(x: "s", shape: ["T", "d"])),
        Let("r", RmsNorm(x: "r", eps: "1e-6")),
        Repeat(var: "j", count: 2, body: [
            If(cond: "j == 1", then: [Let("r", GeluTanh(x: "r"))]),
        ]),
        Let("logits", MatMul(x: "r", w: "token_embd.weight")),
        Let("ids", Argmax(x: "logits")),
    ],
    output: "logits",
)
"##;

/// A lexed token of RON text; joining all tokens gives the text back.
#[derive(Clone, PartialEq)]
enum Tk {
    Space(String),
    Ident(String),
    Num(String),
    /// A string literal including its quotes.
    Str(String),
    Punct(char),
    Other(String),
}

impl Tk {
    fn text(&self) -> String {
        match self {
            Tk::Space(s) | Tk::Ident(s) | Tk::Num(s) | Tk::Str(s) | Tk::Other(s) => s.clone(),
            Tk::Punct(c) => c.to_string(),
        }
    }
}

fn lex_ron(src: &str) -> Vec<Tk> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let take = |i: &mut usize, j: usize| -> String {
        let s: String = c[*i..j].iter().collect();
        *i = j;
        s
    };
    while i < c.len() {
        let ch = c[i];
        let mut j = i + 1;
        if ch.is_whitespace() {
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            out.push(Tk::Space(take(&mut i, j)));
        } else if ch == '/' && c.get(j) == Some(&'/') {
            while j < c.len() && c[j] != '\n' {
                j += 1;
            }
            out.push(Tk::Space(take(&mut i, j)));
        } else if ch == '/' && c.get(j) == Some(&'*') {
            let mut depth = 1;
            j += 1;
            while j < c.len() && depth > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 1;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 1;
                }
                j += 1;
            }
            out.push(Tk::Space(take(&mut i, j.min(c.len()))));
        } else if ch == '"' {
            while j < c.len() && c[j] != '"' {
                if c[j] == '\\' {
                    j += 1;
                }
                j += 1;
            }
            out.push(Tk::Str(take(&mut i, (j + 1).min(c.len()))));
        } else if ch == 'r' && (c.get(j) == Some(&'#') || c.get(j) == Some(&'"')) {
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) == Some(&'"') {
                j += 1;
                loop {
                    if j >= c.len() {
                        break;
                    }
                    if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push(Tk::Str(take(&mut i, j.min(c.len()))));
            } else {
                let k = i + 1;
                out.push(Tk::Ident(take(&mut i, k)));
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            while j < c.len() && (c[j].is_ascii_alphanumeric() || c[j] == '_') {
                j += 1;
            }
            out.push(Tk::Ident(take(&mut i, j)));
        } else if ch.is_ascii_digit() || (ch == '-' && c.get(j).is_some_and(char::is_ascii_digit)) {
            while j < c.len()
                && (c[j].is_ascii_alphanumeric()
                    || c[j] == '.'
                    || ((c[j] == '-' || c[j] == '+') && matches!(c[j - 1], 'e' | 'E')))
            {
                j += 1;
            }
            out.push(Tk::Num(take(&mut i, j)));
        } else if "()[]{}:,#!".contains(ch) {
            out.push(Tk::Punct(ch));
            i = j;
        } else {
            out.push(Tk::Other(take(&mut i, j)));
        }
    }
    out
}

const IDENTS: &[&str] = &[
    // ops
    "Embed",
    "MatMul",
    "RmsNorm",
    "LayerNorm",
    "Rope",
    "Attention",
    "Add",
    "Mul",
    "Scale",
    "Silu",
    "Gelu",
    "GeluTanh",
    "Tanh",
    "Relu",
    "Softcap",
    "Softmax",
    "Reshape",
    "Slice",
    "Concat",
    "Argmax",
    "Weight",
    // statements and the file
    "Let",
    "Repeat",
    "If",
    "Graph",
    // fields
    "params",
    "max_context",
    "body",
    "output",
    "table",
    "ids",
    "x",
    "w",
    "weight",
    "bias",
    "eps",
    "mode",
    "base",
    "dims",
    "scale",
    "q",
    "k",
    "v",
    "window",
    "softcap",
    "a",
    "b",
    "by",
    "cap",
    "shape",
    "axis",
    "start",
    "len",
    "xs",
    "var",
    "count",
    "cond",
    "then",
    "else",
    // enums and RON words
    "Normal",
    "Neox",
    "Some",
    "None",
    "true",
    "false",
    "inf",
    "NaN",
    "enable",
    "implicit_some",
    "unwrap_newtypes",
    "unwrap_variant_newtypes",
    "explicit_struct_names",
    // junk
    "Frobnicate",
    "_",
    "r",
    "b",
    "x1",
    "tokens",
    "T",
];

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "6",
    "8",
    "16",
    "31",
    "32",
    "33",
    "63",
    "64",
    "65",
    "100",
    "128",
    "255",
    "256",
    "1024",
    "65536",
    "4294967295",
    "4294967296",
    "1099511627776",
    "1099511627777",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "-1e308",
    "1e309",
    "1e-308",
    "5e-324",
    "0.5",
    "-0.0",
    "1.5",
    "1e5",
    "100000",
    "100001",
    "NaN",
    "inf",
    "-inf",
    "0x10",
    "0b101",
    "0o7",
    "1_000",
    "+1",
    ".5",
    "1.",
    "1e",
    "1e+",
    "--1",
    "0xffffffffffffffffff",
    "340282366920938463463374607431768211456",
    "1.7976931348623157e308",
];

const EXPRS: &[&str] = &[
    "",
    " ",
    "T",
    "tokens",
    "x",
    "logits",
    "n_layer",
    "n_head",
    "head_dim",
    "i",
    "arch",
    "{arch}",
    "1/0",
    "0/0",
    "1 % 0",
    "-1",
    "1e300",
    "1e-300",
    "pow(2, 40)",
    "pow(2, 1024)",
    "pow(10, 5)",
    "sqrt(-1)",
    "0 - 1",
    "meta('x')",
    "meta('{arch}.block_count', 'str')",
    "meta('general.name')",
    "meta('tokenizer.ggml.tokens')",
    "meta('{arch}.embedding_length')",
    "meta()",
    "meta(1)",
    "has_weight('blk.{i}.attn_q.weight')",
    "has_meta('')",
    "(",
    ")",
    "((1)",
    "{",
    "}",
    "{i",
    "{}",
    "{{i}}",
    "{i}}",
    "{'{'}",
    "'",
    "''",
    "'a' + 1",
    "'a' == 'a'",
    "a ? b",
    "? :",
    "1 ? 2",
    "n_head * head_dim",
    "d_model / n_head",
    "min(1)",
    "max(1, 2, 3)",
    "floor()",
    "blk.{i}.x",
    "blk.{i + 1}.attn_q.weight",
    "blk.{-1}.attn_q.weight",
    "blk.{1/0}.x",
    "blk.{'{'}.x",
    "token_embd.weight",
    "output.weight",
    "\\\"",
    "\\\\",
    "\\u{41}",
    "\\n",
    "é",
    "\u{0}",
    "\u{feff}",
    "1e",
    "1.2.3",
    ".5",
    "5.",
    "!1",
    "--1",
    "!!0",
    "1 &&",
    "|| 1",
    "1 == == 1",
];

const FRAGMENTS: &[&str] = &[
    "+", "-", "*", "/", "%", "(", ")", "?", ":", ",", "==", "!=", "<", ">=", "&&", "||", "!", "'",
    "{", "}", "i", "0", "1", "1e9", "meta(", "sqrt(", "pow(", " ", ".", "T", "_", "\\", "é", "{i}",
];

const PUNCT: &[char] = &[
    '(', ')', '[', ']', '{', '}', ':', ',', '"', '\'', '#', '!', '/', '*',
];

const ODD: &[&str] = &[
    "\u{0}",
    "é",
    "\u{feff}",
    "\u{2028}",
    "\r",
    "\t",
    "\\",
    "r#\"",
    "\"#",
    "b\"",
    "/*",
    "*/",
    "//",
    "#![enable(unwrap_newtypes)]",
    "#![enable(implicit_some)]",
    "Some(",
    "None",
    "()",
    "[]",
    "{}",
    "\"\"",
    "''",
    "'a'",
    "'\\''",
    "r\"x\"",
];

/// The graph seeds.
fn ron_seeds() -> [&'static str; 3] {
    [LLAMA, GEMMA3, OPS]
}

fn ron_tokens() -> &'static [Vec<Tk>; 3] {
    static T: OnceLock<[Vec<Tk>; 3]> = OnceLock::new();
    T.get_or_init(|| ron_seeds().map(lex_ron))
}

fn string_pool() -> &'static [String] {
    static P: OnceLock<Vec<String>> = OnceLock::new();
    P.get_or_init(|| {
        let mut v: Vec<String> = ron_tokens()
            .iter()
            .flatten()
            .filter_map(|t| match t {
                Tk::Str(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        v.extend(EXPRS.iter().map(|e| format!("\"{e}\"")));
        v.sort();
        v.dedup();
        v
    })
}

/// Index of a random token matching `f`, if any.
fn find_tok(rng: &mut Rng, toks: &[Tk], f: impl Fn(&Tk) -> bool) -> Option<usize> {
    let idx: Vec<usize> = (0..toks.len()).filter(|&i| f(&toks[i])).collect();
    (!idx.is_empty()).then(|| idx[rng.below(idx.len())])
}

fn mutate_tokens(rng: &mut Rng, toks: &mut Vec<Tk>) {
    let len = toks.len();
    if len == 0 {
        toks.push(Tk::Punct(*rng.pick(PUNCT)));
        return;
    }
    let solid = |t: &Tk| !matches!(t, Tk::Space(_));
    match rng.below(100) {
        // replace an identifier
        0..=17 => {
            if let Some(i) = find_tok(rng, toks, |t| matches!(t, Tk::Ident(_))) {
                toks[i] = Tk::Ident(rng.pick(IDENTS).to_string());
            }
        }
        // change a number (or put one where a string was)
        18..=29 => {
            let want_num = rng.pct(70);
            if let Some(i) = find_tok(rng, toks, |t| {
                if want_num {
                    matches!(t, Tk::Num(_))
                } else {
                    matches!(t, Tk::Str(_))
                }
            }) {
                toks[i] = Tk::Num(rng.pick(NUMBERS).to_string());
            }
        }
        // replace a string with another
        30..=44 => {
            if let Some(i) = find_tok(rng, toks, |t| matches!(t, Tk::Str(_))) {
                toks[i] = Tk::Str(rng.pick(string_pool()).clone());
            }
        }
        // edit inside a string (expressions, templates)
        45..=64 => {
            if let Some(i) = find_tok(rng, toks, |t| matches!(t, Tk::Str(s) if s.starts_with('"')))
            {
                let Tk::Str(s) = &toks[i] else { unreachable!() };
                let mut inner: Vec<char> = s.chars().skip(1).collect();
                if inner.last() == Some(&'"') {
                    inner.pop();
                }
                let at = rng.below(inner.len() + 1);
                match rng.below(4) {
                    0 | 1 => {
                        let f: Vec<char> = rng.pick(FRAGMENTS).chars().collect();
                        inner.splice(at..at, f);
                    }
                    2 => {
                        let n = 1 + rng.below(4);
                        inner.drain(at..(at + n).min(inner.len()));
                    }
                    _ => {
                        let e: Vec<char> = rng.pick(EXPRS).chars().collect();
                        let n = rng.below(inner.len() - at + 1);
                        inner.splice(at..at + n, e);
                    }
                }
                let s: String = inner.into_iter().collect();
                toks[i] = Tk::Str(format!("\"{s}\""));
            }
        }
        // delete a run of tokens
        65..=74 => {
            let i = rng.below(len);
            let n = 1 + rng.upto(80, 3, 40);
            toks.drain(i..(i + n).min(len));
        }
        // duplicate a run of tokens (a statement, an argument, ...)
        75..=82 => {
            let i = rng.below(len);
            let n = 1 + rng.upto(70, 6, 60);
            let run: Vec<Tk> = toks[i..(i + n).min(len)].to_vec();
            let to = rng.below(len + 1);
            toks.splice(to..to, run);
        }
        // swap two solid tokens
        83..=89 => {
            if let (Some(i), Some(j)) = (find_tok(rng, toks, solid), find_tok(rng, toks, solid)) {
                toks.swap(i, j);
            }
        }
        // insert punctuation
        _ => {
            let i = rng.below(len + 1);
            toks.insert(i, Tk::Punct(*rng.pick(PUNCT)));
        }
    }
}

fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>) {
    let len = b.len();
    let at = rng.below(len + 1);
    match rng.below(100) {
        // delete a chunk
        0..=24 => {
            let n = 1 + rng.upto(80, 8, 200);
            b.drain(at..(at + n).min(len));
        }
        // duplicate a chunk
        25..=44 => {
            if len > 0 {
                let from = rng.below(len);
                let n = 1 + rng.upto(80, 16, 300);
                let chunk = b[from..(from + n).min(len)].to_vec();
                b.splice(at..at, chunk);
            }
        }
        // swap two chunks
        45..=59 => {
            if len > 2 {
                let n = 1 + rng.below(16.min(len / 2));
                let i = rng.below(len - n + 1);
                let j = rng.below(len - n + 1);
                let (lo, hi) = (i.min(j), i.max(j));
                if lo + n <= hi {
                    let a = b[lo..lo + n].to_vec();
                    let c = b[hi..hi + n].to_vec();
                    b[lo..lo + n].copy_from_slice(&c);
                    b[hi..hi + n].copy_from_slice(&a);
                }
            }
        }
        // insert punctuation
        60..=79 => b.insert(at, *rng.pick(PUNCT) as u8),
        // insert an odd sequence
        80..=89 => {
            let s = rng.pick(ODD).as_bytes().to_vec();
            b.splice(at..at, s);
        }
        // flip a bit or write a random byte
        _ => {
            if len > 0 {
                let i = rng.below(len);
                if rng.pct(50) {
                    b[i] ^= 1 << rng.below(8);
                } else {
                    b[i] = rng.next_u64() as u8;
                }
            }
        }
    }
}

fn mutate_ron(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let which = rng.below(3);
    let mut toks = ron_tokens()[which].clone();
    let n = rng.count();
    let mut bytes: Option<Vec<u8>> = None;
    for _ in 0..n {
        // Token mutations keep most of the structure (so binding gets
        // exercised); byte mutations break it in arbitrary places.
        if rng.pct(70) {
            if let Some(b) = bytes.take() {
                toks = lex_ron(&String::from_utf8_lossy(&b));
            }
            mutate_tokens(&mut rng, &mut toks);
        } else {
            let b = bytes
                .get_or_insert_with(|| toks.iter().map(Tk::text).collect::<String>().into_bytes());
            mutate_bytes(&mut rng, b);
        }
    }
    match bytes {
        Some(b) => String::from_utf8_lossy(&b).into_owned().into_bytes(),
        None => toks.iter().map(Tk::text).collect::<String>().into_bytes(),
    }
}

fn check_ron(bytes: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(bytes);
    let g = match Graph::parse(&text, "fuzz.ron") {
        Ok(g) => g,
        Err(e) => {
            assert!(!e.msg.is_empty(), "empty message");
            assert_eq!(e.file, "fuzz.ron");
            if let Some(p) = e.pos {
                assert!(p.line >= 1 && p.col >= 1, "position {p:?}");
            }
            return Outcome::Rejected;
        }
    };
    let model = tiny_model();
    match g.bind(model) {
        Err(e) => {
            assert!(!e.msg.is_empty(), "empty message");
            let _ = e.to_string();
            Outcome::Parsed
        }
        Ok(bound) => {
            if run(&bound, model) {
                Outcome::Ran
            } else {
                Outcome::Bound
            }
        }
    }
}

#[test]
fn ron_seeds_parse_bind_and_run() {
    for (i, text) in ron_seeds().iter().enumerate() {
        // The lexer round-trips.
        let joined: String = ron_tokens()[i].iter().map(Tk::text).collect();
        assert_eq!(&joined, text);
        let g = Graph::parse(text, "seed.ron").unwrap_or_else(|e| panic!("seed {i}: {e}"));
        let bound = g
            .bind(tiny_model())
            .unwrap_or_else(|e| panic!("seed {i}: {e}"));
        assert!(run(&bound, tiny_model()), "seed {i} runs");
    }
}

#[test]
fn harness_reports_and_minimizes_panics() {
    if std::env::var_os("KILN_FUZZ_REPLAY").is_some() {
        return;
    }
    // A planted bug: any input containing "Embed" panics. (Run quietly: the
    // report is checked, not printed.)
    let report = panics(|| {
        drive(
            "harness_self_test",
            9,
            200,
            mutate_ron,
            |b| {
                assert!(!b.windows(5).any(|w| w == b"Embed"), "planted");
                Outcome::Rejected
            },
            "ron",
        )
    });
    let report = report.expect("the harness must fail");
    for part in [
        "case(s) panicked",
        "seed 0x",
        "planted",
        "KILN_FUZZ_REPLAY",
        "(5 bytes, from",
    ] {
        assert!(report.contains(part), "{part:?} missing from:\n{report}");
    }
    assert!(report.trim_end().ends_with("Embed"), "{report}");
}

#[test]
fn fuzz_ron_a() {
    drive("fuzz_ron_a", 3, n_cases(), mutate_ron, check_ron, "ron");
}

#[test]
fn fuzz_ron_b() {
    drive("fuzz_ron_b", 4, n_cases(), mutate_ron, check_ron, "ron");
}
