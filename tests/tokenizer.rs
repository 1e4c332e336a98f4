//! The GGUF-metadata tokenizer against llama.cpp's token ids for the two real
//! models (tests/fixtures/*.llamacpp.json).
//!
//! The model files come from tools/setup.sh; a missing file fails the test.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use kiln::model::gguf::Gguf;
use kiln::model::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

struct Model {
    file: &'static str,
    fixture: &'static str,
}

const SMOLLM: Model = Model {
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    fixture: "smollm2-135m-q4_1.llamacpp.json",
};
const GEMMA: Model = Model {
    file: "gemma-3-270m-q4_k_m.gguf",
    fixture: "gemma3-270m-q4_k_m.llamacpp.json",
};

fn models_dir() -> PathBuf {
    match std::env::var_os("KILN_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set; set KILN_MODELS");
            PathBuf::from(home).join(".cache/kiln/models")
        }
    }
}

/// Builds the tokenizer, printing how long that took.
fn build(model: &Model) -> Tokenizer {
    let path = models_dir().join(model.file);
    assert!(
        path.exists(),
        "model file {} is missing: run tools/setup.sh (or point KILN_MODELS at a directory holding it)",
        path.display()
    );
    let gguf = Gguf::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = Instant::now();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{}: {e}", model.file));
    eprintln!(
        "{}: tokenizer built in {:.1} ms ({} tokens)",
        model.file,
        start.elapsed().as_secs_f64() * 1e3,
        tokenizer.vocab_size()
    );
    tokenizer
}

fn smollm() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| build(&SMOLLM))
}

fn gemma() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| build(&GEMMA))
}

struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

fn cases(model: &Model) -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(model.fixture);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("an id array")
            .iter()
            .map(|x| x.as_u64().expect("an id") as u32)
            .collect()
    };
    let cases: Vec<Case> = json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().expect("prompt").to_string(),
            prompt_ids: ids(&c["prompt_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            greedy_text: c["greedy_text"].as_str().expect("greedy_text").to_string(),
        })
        .collect();
    assert_eq!(cases.len(), 4, "{}: expected 4 cases", model.fixture);
    cases
}

fn stream(t: &Tokenizer, ids: &[u32]) -> String {
    let mut decoder = StreamDecoder::new(t);
    let mut out = String::new();
    for &id in ids {
        out.push_str(&decoder.push(id).unwrap());
    }
    out.push_str(&decoder.finish());
    out
}

/// Strips the BOS the tokenizer adds, if it adds one.
fn without_bos<'a>(t: &Tokenizer, ids: &'a [u32]) -> &'a [u32] {
    match (ids.first(), t.bos()) {
        (Some(&first), Some(bos)) if first == bos => &ids[1..],
        _ => ids,
    }
}

fn check_against_llamacpp(t: &Tokenizer, model: &Model) {
    for case in cases(model) {
        let ids = t.encode(&case.prompt).unwrap();
        assert_eq!(
            ids, case.prompt_ids,
            "{}: encode({:?})",
            model.file, case.prompt
        );

        let body = without_bos(t, &case.prompt_ids);
        assert_eq!(
            t.decode(body).unwrap(),
            case.prompt,
            "{}: prompt round trip",
            model.file
        );
        assert_eq!(
            t.decode(&case.greedy_ids).unwrap(),
            case.greedy_text,
            "{}: decode(greedy_ids)",
            model.file
        );
        for seq in [&case.prompt_ids[..], &case.greedy_ids[..]] {
            assert_eq!(
                stream(t, seq),
                t.decode(seq).unwrap(),
                "{}: stream",
                model.file
            );
        }
        // A whole prompt plus continuation, streamed.
        let all: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.greedy_ids)
            .copied()
            .collect();
        assert_eq!(
            stream(t, &all),
            format!("{}{}", case.prompt, case.greedy_text),
            "{}: stream of prompt + continuation",
            model.file
        );
    }
}

#[test]
fn smollm_matches_llamacpp() {
    check_against_llamacpp(smollm(), &SMOLLM);
}

#[test]
fn gemma_matches_llamacpp() {
    check_against_llamacpp(gemma(), &GEMMA);
}

const EXTRA: &[&str] = &[
    "",
    "Hello, world!",
    "héllo wörld, ça va? Größe: straße",
    "日本語のテキストと中文文本。한국어도.",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 ✨",
    "line one\nline two\n\n\nafter blanks\r\nwindows\tand\ttabs\t\t\tend",
    "multiple   spaces    here     and trailing   ",
    "   leading spaces",
    "digits 0123456789 3.14159 1,000,000 2024-06-01 x=42*7",
    "code: fn main() { println!(\"{}\", a[i] + b); } // comment",
    "rare: \u{10FFFD}\u{E000} 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u{0301}combining",
    "it's they're we've I'm you'll he'd",
];

fn check_round_trips(t: &Tokenizer, name: &str) {
    for s in EXTRA {
        let ids = t.encode(s).unwrap();
        let body = without_bos(t, &ids);
        assert_eq!(
            &t.decode(body).unwrap(),
            s,
            "{name}: round trip {s:?} via {ids:?}"
        );
        assert_eq!(&stream(t, body), s, "{name}: stream {s:?}");
        assert_eq!(
            stream(t, &ids),
            t.decode(&ids).unwrap(),
            "{name}: stream with BOS {s:?}"
        );
    }
}

#[test]
fn smollm_round_trips() {
    check_round_trips(smollm(), SMOLLM.file);
}

#[test]
fn gemma_round_trips() {
    check_round_trips(gemma(), GEMMA.file);
}

#[test]
fn bos_follows_metadata() {
    // SmolLM2: add_bos_token = false; Gemma 3: add_bos_token = true.
    let s = smollm();
    assert_eq!(s.bos(), Some(1));
    assert_eq!(s.eos(), Some(2));
    assert_eq!(s.encode("").unwrap(), Vec::<u32>::new());
    let g = gemma();
    assert_eq!(g.bos(), Some(2));
    assert_eq!(g.eos(), Some(1));
    assert_eq!(g.encode("").unwrap(), vec![2]);
    assert_eq!(
        g.encode_with("Hi", false, true).unwrap(),
        g.encode("Hi").unwrap()[1..]
    );
}

#[test]
fn vocab_sizes() {
    assert_eq!(smollm().vocab_size(), 49152);
    assert_eq!(gemma().vocab_size(), 262144);
}

fn check_out_of_range(t: &Tokenizer, name: &str) {
    let n = t.vocab_size() as u32;
    for id in [n, n + 1, u32::MAX] {
        let err = t.decode(&[t.bos().unwrap(), id]).unwrap_err();
        assert!(
            matches!(err, TokenizerError::IdOutOfRange { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&id.to_string()) && msg.contains(&n.to_string()),
            "{name}: message should name the id and the vocab size: {msg}"
        );
        assert!(
            StreamDecoder::new(t).push(id).is_err(),
            "{name}: stream {id}"
        );
    }
    assert!(t.decode(&[n - 1]).is_ok());
}

#[test]
fn out_of_range_ids_are_errors() {
    check_out_of_range(smollm(), SMOLLM.file);
    check_out_of_range(gemma(), GEMMA.file);
}

#[test]
fn special_tokens_are_parsed_and_hidden() {
    let s = smollm();
    let im_start = s.token_id("<|im_start|>").unwrap();
    let im_end = s.token_id("<|im_end|>").unwrap();
    let ids = s.encode("<|im_start|>user\nHi<|im_end|>\n").unwrap();
    assert_eq!(ids.first(), Some(&im_start));
    assert!(ids.contains(&im_end));
    assert_eq!(s.decode(&ids).unwrap(), "user\nHi\n");
    // Not parsed: the text is tokenized as text.
    let plain = s.encode_with("<|im_start|>", false, false).unwrap();
    assert!(!plain.contains(&im_start));
    assert_eq!(s.decode(&plain).unwrap(), "<|im_start|>");
    assert_eq!(s.token_text(im_end), Some("<|im_end|>"));

    let g = gemma();
    let sot = g.token_id("<start_of_turn>").unwrap();
    let eot = g.token_id("<end_of_turn>").unwrap();
    let ids = g.encode("<start_of_turn>user\nHi<end_of_turn>\n").unwrap();
    assert_eq!(&ids[..2], &[2, sot]);
    assert!(ids.contains(&eot));
    assert_eq!(g.decode(&ids).unwrap(), "user\nHi\n");
}

#[test]
fn end_of_generation_follows_metadata() {
    let s = smollm();
    assert!(s.is_eog(2));
    assert!(!s.is_eog(1));
    assert!(!s.is_eog(504));
    // Gemma 3's file names no eot_token_id: only EOS ends generation until the
    // caller adds <end_of_turn>.
    let mut g = build(&GEMMA);
    let eot = g.token_id("<end_of_turn>").unwrap();
    assert!(g.is_eog(1));
    assert!(!g.is_eog(eot));
    g.add_eog(eot).unwrap();
    assert!(g.is_eog(eot));
    assert_eq!(g.eog_ids(), &[1, eot]);
    assert!(g.add_eog(g.vocab_size() as u32).is_err());
}

#[test]
fn byte_fallback_streams_whole_characters() {
    let g = gemma();
    // A private-use character Gemma has no piece for: four byte tokens.
    let text = "\u{10FFFD}";
    let ids = g.encode_with(text, false, true).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    for (&id, byte) in ids.iter().zip(text.bytes()) {
        assert_eq!(g.token_text(id), Some(format!("<0x{byte:02X}>").as_str()));
    }
    let mut decoder = StreamDecoder::new(g);
    let parts: Vec<String> = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
    assert_eq!(parts, ["", "", "", text]);
    assert_eq!(decoder.finish(), "");

    // An incomplete character at the end decodes to U+FFFD, in both paths.
    let cut = &ids[..2];
    assert_eq!(g.decode(cut).unwrap(), "\u{FFFD}");
    assert_eq!(stream(g, cut), "\u{FFFD}");
}

// ---------------------------------------------------------------------------
// Synthetic vocabularies: the pre-tokenizer table, SentencePiece flags and
// metadata errors, without model files.

use kiln::model::gguf::{GgufWriter, MetaValue};

fn strs(items: &[&str]) -> MetaValue {
    MetaValue::Array(
        items
            .iter()
            .map(|s| MetaValue::Str(s.to_string()))
            .collect(),
    )
}

fn gguf(metadata: Vec<(&str, MetaValue)>) -> Gguf {
    let writer = GgufWriter {
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        tensors: Vec::new(),
    };
    Gguf::from_bytes(writer.to_bytes()).expect("a valid GGUF image")
}

/// GPT-2's byte-to-unicode alphabet, in byte order.
fn byte_alphabet() -> Vec<String> {
    let mut map = vec![' '; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        map[b as usize] = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap()
        };
    }
    map.into_iter().map(String::from).collect()
}

/// A byte-level BPE vocabulary: the 256 byte symbols, a few merged tokens and
/// one control token. Merges are ranked so that each pre-tokenizer splits
/// "12345" differently.
fn byte_level_meta(pre: Option<&str>) -> Vec<(&'static str, MetaValue)> {
    let mut tokens = byte_alphabet();
    tokens.extend(["12", "34", "123", "45", "he", "Ġt", "Ġthe", "<|end|>"].map(String::from));
    let mut types = vec![MetaValue::I32(1); tokens.len()];
    *types.last_mut().unwrap() = MetaValue::I32(3);
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut meta = vec![
        ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", strs(&token_refs)),
        ("tokenizer.ggml.token_type", MetaValue::Array(types)),
        (
            "tokenizer.ggml.merges",
            strs(&["3 4", "1 2", "12 3", "4 5", "h e", "Ġ t", "Ġt he"]),
        ),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(263)),
    ];
    if let Some(pre) = pre {
        meta.push(("tokenizer.ggml.pre", MetaValue::Str(pre.into())));
    }
    meta
}

fn texts_of(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| t.token_text(id).unwrap().to_string())
        .collect()
}

#[test]
fn pre_tokenizer_follows_metadata() {
    let split = |pre: Option<&str>| {
        let t = Tokenizer::from_gguf(&gguf(byte_level_meta(pre))).unwrap();
        let ids = t.encode("12345").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "12345");
        texts_of(&t, &ids)
    };
    // GPT-2: one digit run; merges in rank order.
    assert_eq!(split(Some("gpt2")), ["12", "34", "5"]);
    assert_eq!(split(Some("gpt-2")), ["12", "34", "5"]);
    // default: digit runs cut into threes first.
    assert_eq!(split(Some("default")), ["123", "45"]);
    // No pre-tokenizer in the file means default, as in llama.cpp.
    assert_eq!(split(None), ["123", "45"]);
    // smollm: every digit on its own.
    assert_eq!(split(Some("smollm")), ["1", "2", "3", "4", "5"]);
    // llama-bpe: \p{N}{1,3} pieces, and BOS by default (but this file has no
    // BOS id, so asking for BOS is an error naming the key).
    let err = Tokenizer::from_gguf(&gguf(byte_level_meta(Some("llama-bpe")))).unwrap_err();
    assert!(
        err.to_string().contains("tokenizer.ggml.bos_token_id"),
        "{err}"
    );
    let mut meta = byte_level_meta(Some("llama-bpe"));
    meta.push(("tokenizer.ggml.add_bos_token", MetaValue::Bool(false)));
    let t = Tokenizer::from_gguf(&gguf(meta)).unwrap();
    assert_eq!(texts_of(&t, &t.encode("12345").unwrap()), ["123", "45"]);
}

#[test]
fn byte_level_merges_and_specials() {
    let t = Tokenizer::from_gguf(&gguf(byte_level_meta(Some("gpt2")))).unwrap();
    let ids = t.encode("the the<|end|>").unwrap();
    assert_eq!(texts_of(&t, &ids), ["t", "he", "Ġthe", "<|end|>"]);
    assert_eq!(t.decode(&ids).unwrap(), "the the");
    assert!(t.is_eog(263));
    assert_eq!(t.bos(), None);
    // ignore_merges (llama-bpe): a pre-token in the vocabulary is taken whole.
    let mut meta = byte_level_meta(Some("llama-bpe"));
    meta.push(("tokenizer.ggml.add_bos_token", MetaValue::Bool(false)));
    let t = Tokenizer::from_gguf(&gguf(meta)).unwrap();
    assert_eq!(texts_of(&t, &t.encode(" the").unwrap()), ["Ġthe"]);
}

/// A SentencePiece vocabulary with byte fallback.
fn sentencepiece_meta(add_space_prefix: Option<bool>) -> Vec<(&'static str, MetaValue)> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for piece in ["▁", "h", "i", "▁h", "hi", "▁hi"] {
        tokens.push(piece.to_string());
        types.push(1);
    }
    // Scores: "▁h" outranks "hi", so "▁hi" is built as ▁h + i.
    let scores: Vec<MetaValue> = (0..tokens.len())
        .map(|i| match tokens[i].as_str() {
            "▁h" => -1.0,
            "hi" => -2.0,
            "▁hi" => -3.0,
            _ => -10.0,
        })
        .map(MetaValue::F32)
        .collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut meta = vec![
        ("tokenizer.ggml.model", MetaValue::Str("llama".into())),
        ("tokenizer.ggml.tokens", strs(&token_refs)),
        ("tokenizer.ggml.scores", MetaValue::Array(scores)),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", MetaValue::U32(0)),
    ];
    if let Some(p) = add_space_prefix {
        meta.push(("tokenizer.ggml.add_space_prefix", MetaValue::Bool(p)));
    }
    meta
}

#[test]
fn sentencepiece_space_prefix_follows_metadata() {
    // Defaults (llama.cpp): add BOS, add a space prefix.
    let t = Tokenizer::from_gguf(&gguf(sentencepiece_meta(None))).unwrap();
    let ids = t.encode("hi hi").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(texts_of(&t, &ids[1..]), ["▁hi", "▁hi"]);
    // The prefix space is dropped after a leading BOS, kept otherwise.
    assert_eq!(t.decode(&ids).unwrap(), "hi hi");
    assert_eq!(stream(&t, &ids), "hi hi");
    assert_eq!(t.decode(&ids[1..]).unwrap(), " hi hi");
    // Byte fallback for characters without a piece.
    let ids = t.encode_with("é", false, true).unwrap();
    assert_eq!(texts_of(&t, &ids), ["▁", "<0xC3>", "<0xA9>"]);

    let t = Tokenizer::from_gguf(&gguf(sentencepiece_meta(Some(false)))).unwrap();
    let ids = t.encode("hi hi").unwrap();
    assert_eq!(texts_of(&t, &ids[1..]), ["hi", "▁hi"]);
    assert_eq!(t.decode(&ids).unwrap(), "hi hi");
}

fn build_error(meta: Vec<(&str, MetaValue)>) -> String {
    Tokenizer::from_gguf(&gguf(meta)).unwrap_err().to_string()
}

#[test]
fn metadata_errors_name_the_key() {
    let replace =
        |mut meta: Vec<(&'static str, MetaValue)>, key: &'static str, v: Option<MetaValue>| {
            meta.retain(|(k, _)| *k != key);
            if let Some(v) = v {
                meta.push((key, v));
            }
            meta
        };
    let base = || byte_level_meta(Some("gpt2"));

    let msg = build_error(replace(base(), "tokenizer.ggml.model", None));
    assert!(msg.contains("`tokenizer.ggml.model` is missing"), "{msg}");
    let msg = build_error(replace(
        base(),
        "tokenizer.ggml.model",
        Some(MetaValue::Str("bert".into())),
    ));
    assert!(
        msg.contains("tokenizer.ggml.model") && msg.contains("\"bert\""),
        "{msg}"
    );
    let msg = build_error(replace(
        base(),
        "tokenizer.ggml.pre",
        Some(MetaValue::Str("no-such-pre".into())),
    ));
    assert!(
        msg.contains("tokenizer.ggml.pre")
            && msg.contains("no-such-pre")
            && msg.contains("PRE_TOKENIZERS"),
        "{msg}"
    );
    let msg = build_error(replace(base(), "tokenizer.ggml.merges", None));
    assert!(msg.contains("`tokenizer.ggml.merges` is missing"), "{msg}");
    let msg = build_error(replace(base(), "tokenizer.ggml.tokens", None));
    assert!(msg.contains("`tokenizer.ggml.tokens` is missing"), "{msg}");
    let msg = build_error(replace(
        base(),
        "tokenizer.ggml.eos_token_id",
        Some(MetaValue::U32(100_000)),
    ));
    assert!(
        msg.contains("tokenizer.ggml.eos_token_id") && msg.contains("out of range"),
        "{msg}"
    );
    let msg = build_error(replace(
        base(),
        "tokenizer.ggml.merges",
        Some(strs(&["nospace"])),
    ));
    assert!(
        msg.contains("tokenizer.ggml.merges") && msg.contains("nospace"),
        "{msg}"
    );
    let msg = build_error(replace(
        sentencepiece_meta(None),
        "tokenizer.ggml.scores",
        None,
    ));
    assert!(msg.contains("`tokenizer.ggml.scores` is missing"), "{msg}");
    let msg = build_error(replace(
        sentencepiece_meta(None),
        "tokenizer.ggml.add_bos_token",
        Some(MetaValue::U32(1)),
    ));
    assert!(
        msg.contains("tokenizer.ggml.add_bos_token") && msg.contains("bool"),
        "{msg}"
    );
}

/// A graph's `stop_tokens` end generation too: Gemma 3's chat turns end
/// with `<end_of_turn>`, which its metadata names only as a control token.
#[test]
fn graph_stop_tokens_end_generation() {
    let path = models_dir().join("gemma-3-270m-q4_k_m.gguf");
    let plain = gemma();
    let eot = plain
        .token_id("<end_of_turn>")
        .expect("Gemma 3's vocabulary has <end_of_turn>");
    assert!(
        !plain.is_eog(eot),
        "the metadata alone already stops at <end_of_turn>: the graph's stop_tokens test nothing"
    );
    let model = kiln::session::Model::load(&path, None).expect("gemma 3 loads");
    assert_eq!(model.bound.stop_tokens, ["<end_of_turn>"]);
    assert!(
        model.tokenizer.is_eog(eot),
        "<end_of_turn> ({eot}) does not end generation"
    );
    // The metadata's own end tokens still do.
    for &id in plain.eog_ids() {
        assert!(model.tokenizer.is_eog(id), "{id} no longer ends generation");
    }
}
