//! The tokenizer, built from GGUF metadata alone and backed by the
//! `tokenizers` crate.
//!
//! Two GGUF tokenizer kinds (`tokenizer.ggml.model`) are supported:
//!
//! - `"gpt2"`: byte-level BPE. The vocabulary is `tokenizer.ggml.tokens`, the
//!   merge ranks are `tokenizer.ggml.merges`, and the pre-tokenizer (a list of
//!   regexes, each splitting the pieces of the one before) is looked up from
//!   `tokenizer.ggml.pre` in [`PRE_TOKENIZERS`], the same table llama.cpp
//!   keeps.
//! - `"llama"`: SentencePiece BPE. The vocabulary is `tokenizer.ggml.tokens`
//!   with `tokenizer.ggml.scores`; there are no merges in the file, so they are
//!   derived the way Hugging Face's `SentencePieceExtractor` does: every split
//!   of a piece into two pieces that are both in the vocabulary is a merge, and
//!   merges are ranked by the merged piece's score, highest first. A BPE model
//!   with byte fallback (`<0x0A>` byte tokens) over those merges gives the same
//!   ids as llama.cpp's SPM tokenizer, which merges the adjacent pair whose
//!   concatenation has the highest score.
//!
//! Special tokens are handled the way llama.cpp handles them, not through the
//! `tokenizers` added vocabulary: tokens whose `tokenizer.ggml.token_type` is
//! CONTROL, USER_DEFINED or UNKNOWN are cut out of the raw text first, longest
//! token first, and only the text between them goes to the BPE model. (The
//! `tokenizers` added vocabulary matches leftmost-longest instead, which can
//! give different ids when two such tokens overlap.)
//!
//! Decoding renders each token the way llama.cpp's `token_to_piece` does with
//! `special = false`: NORMAL tokens are un-escaped (`▁` to space for
//! SentencePiece, the GPT-2 byte-to-unicode mapping reversed for byte-level
//! BPE), BYTE tokens give their byte, USER_DEFINED tokens their text verbatim,
//! and CONTROL, UNKNOWN and UNUSED tokens nothing. The bytes are joined and
//! then read as UTF-8, so a character split over several byte tokens comes out
//! whole; [`StreamDecoder`] does the same one token at a time.

use std::fmt;

use rayon::prelude::*;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::gguf::{Gguf, MetaValue};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// SentencePiece's escaped space, U+2581.
const SPM_SPACE: &str = "\u{2581}";

/// What the fix usually is when the tokenizer metadata is wrong or missing.
const RECONVERT: &str = "re-convert the model with a current llama.cpp convert_hf_to_gguf.py";

/// What went wrong building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key the tokenizer needs is absent.
    #[error("GGUF metadata key `{key}` is missing ({why}); {RECONVERT}")]
    MissingKey {
        /// The metadata key.
        key: &'static str,
        /// What it is needed for.
        why: &'static str,
    },
    /// A metadata value has the wrong type or an impossible value.
    #[error("GGUF metadata key `{key}`: {problem}; {RECONVERT}")]
    BadMetadata {
        /// The metadata key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer kiln does not implement.
    #[error(
        "GGUF metadata key `tokenizer.ggml.model` is \"{0}\", which kiln does not support; \
         supported: \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece BPE)"
    )]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer missing from [`PRE_TOKENIZERS`].
    #[error(
        "GGUF metadata key `tokenizer.ggml.pre` is \"{name}\", which kiln does not know; \
         known: {known}. To support it, add its regexes (llama.cpp's llm_tokenizer_bpe \
         constructor in src/llama-vocab.cpp lists them) to PRE_TOKENIZERS in \
         src/model/tokenizer.rs"
    )]
    UnsupportedPreTokenizer {
        /// The value found in the file.
        name: String,
        /// The values kiln knows, comma separated.
        known: String,
    },
    /// A token id at or past the end of the vocabulary.
    #[error(
        "token id {id} is out of range: the vocabulary has {vocab_size} tokens \
         (valid ids are 0..={max})",
        max = vocab_size.saturating_sub(1)
    )]
    IdOutOfRange {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The `tokenizers` crate refused the vocabulary, merges or regexes.
    #[error("building the BPE tokenizer from GGUF metadata failed: {0}")]
    Build(String),
    /// The `tokenizers` crate failed while encoding.
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// A pre-tokenizer for byte-level BPE, selected by `tokenizer.ggml.pre`.
///
/// The regexes run in order, each splitting every piece the previous one made
/// into matches and the text between them (both kept), as llama.cpp's
/// `unicode_regex_split` does; the pieces are then byte-level encoded.
#[derive(Debug)]
pub struct PreTokenizerSpec {
    /// The `tokenizer.ggml.pre` values this entry serves.
    pub names: &'static [&'static str],
    /// The splitting regexes, in order.
    pub regexes: &'static [&'static str],
    /// Look a whole pre-token up in the vocabulary before merging
    /// (llama.cpp's `ignore_merges`).
    pub ignore_merges: bool,
    /// Default for `tokenizer.ggml.add_bos_token` when the file has no value.
    pub add_bos: bool,
}

/// The GPT-2 pre-tokenizer regex, as llama.cpp writes it.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// The `llama-bpe` pre-tokenizer regex (digits in runs of up to three), as
/// llama.cpp adapts it: case-insensitive contractions spelled out.
const DIGITS3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Known byte-level BPE pre-tokenizers, keyed by `tokenizer.ggml.pre`, with
/// the regexes llama.cpp uses for them. A missing `tokenizer.ggml.pre` means
/// `"default"`, as in llama.cpp; an unknown value is an error.
pub const PRE_TOKENIZERS: &[PreTokenizerSpec] = &[
    PreTokenizerSpec {
        names: &["default"],
        regexes: &[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_REGEX,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["gpt2", "gpt-2"],
        regexes: &[GPT2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        // Individual digits, then GPT-2.
        names: &["smollm"],
        regexes: &[r"\p{N}", GPT2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["llama-bpe", "llama3", "llama-v3"],
        regexes: &[DIGITS3_REGEX],
        ignore_merges: true,
        add_bos: true,
    },
];

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// Cut out of raw text before BPE (with `parse_special`, for all three).
    fn is_special(self) -> bool {
        matches!(
            self,
            TokenType::Control | TokenType::UserDefined | TokenType::Unknown
        )
    }
}

/// Which BPE flavour the file describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `tokenizer.ggml.model = "llama"`: SentencePiece BPE.
    SentencePiece,
    /// `tokenizer.ggml.model = "gpt2"`: byte-level BPE.
    ByteLevel,
}

/// A tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.
///
/// Encoding and decoding follow llama.cpp (see the module docs), so ids match
/// what llama.cpp gives for the same file.
pub struct Tokenizer {
    kind: Kind,
    /// The BPE model with its normalizer and pre-tokenizer; no added tokens.
    bpe: tokenizers::Tokenizer,
    /// Token texts, as stored in the file.
    texts: Vec<String>,
    types: Vec<TokenType>,
    /// Decoded bytes of every token, concatenated; token `i` is
    /// `piece_bytes[piece_ends[i - 1]..piece_ends[i]]`.
    piece_bytes: Vec<u8>,
    piece_ends: Vec<u32>,
    specials: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    /// End-of-generation ids, sorted.
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.texts.len())
            .field("special_tokens", &self.specials.order.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    ///
    /// Reads the tokenizer kind, tokens, token types, scores (SentencePiece),
    /// merges and pre-tokenizer (byte-level BPE), the BOS/EOS/EOT/EOM ids and
    /// the `add_bos_token` / `add_eos_token` / `add_space_prefix` flags, with
    /// llama.cpp's defaults where a flag is absent (SentencePiece: add BOS and
    /// a space prefix; byte-level BPE: neither, unless the pre-tokenizer entry
    /// says to add BOS).
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let model = meta_str(g, KEY_MODEL)?.ok_or(TokenizerError::MissingKey {
            key: KEY_MODEL,
            why: "it says which tokenizer the model uses",
        })?;
        let kind = match model {
            "llama" => Kind::SentencePiece,
            "gpt2" => Kind::ByteLevel,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        let texts = read_tokens(g)?;
        let n = texts.len();
        let types = read_token_types(g, n)?;

        let bos = meta_id(g, KEY_BOS, n)?;
        let eos = meta_id(g, KEY_EOS, n)?;
        let eot = meta_id(g, KEY_EOT, n)?;
        let eom = meta_id(g, KEY_EOM, n)?;
        let unk = meta_id(g, KEY_UNK, n)?;

        let (bpe, default_add_bos, default_space_prefix) = match kind {
            Kind::SentencePiece => {
                let scores = read_scores(g, n)?;
                let add_space_prefix = meta_bool(g, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
                let bpe = build_sentencepiece(&texts, &scores, unk, add_space_prefix)?;
                (bpe, true, true)
            }
            Kind::ByteLevel => {
                let spec = pre_tokenizer_spec(meta_str(g, KEY_PRE)?)?;
                let merges = read_merges(g)?;
                let bpe = build_byte_level(&texts, merges, spec)?;
                (bpe, spec.add_bos, false)
            }
        };
        let add_bos = meta_bool(g, KEY_ADD_BOS)?.unwrap_or(default_add_bos);
        let add_eos = meta_bool(g, KEY_ADD_EOS)?.unwrap_or(false);
        let add_space_prefix = meta_bool(g, KEY_ADD_SPACE_PREFIX)?.unwrap_or(default_space_prefix);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingKey {
                key: KEY_BOS,
                why: "tokenizer.ggml.add_bos_token is true",
            });
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::MissingKey {
                key: KEY_EOS,
                why: "tokenizer.ggml.add_eos_token is true",
            });
        }

        let (piece_bytes, piece_ends) = build_pieces(kind, &texts, &types)?;
        let specials = SpecialMatcher::new(&texts, &types);
        let mut eog: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        eog.sort_unstable();
        eog.dedup();

        Ok(Tokenizer {
            kind,
            bpe,
            texts,
            types,
            piece_bytes,
            piece_ends,
            specials,
            bos,
            eos,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
        })
    }

    /// Encodes `text` as a prompt: BOS (and EOS) added as the metadata says,
    /// and special-token text such as `<|im_start|>` or `<start_of_turn>`
    /// parsed into its token, as llama.cpp does for chat-templated prompts.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true, true)
    }

    /// Encodes `text` with explicit choices, like llama.cpp's `llama_tokenize`:
    /// `add_special` adds BOS/EOS as the metadata says; `parse_special` lets
    /// CONTROL (and UNKNOWN) token text in `text` become those tokens. Without
    /// it, such text is tokenized as ordinary text (USER_DEFINED tokens are
    /// matched either way).
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        for fragment in self
            .specials
            .partition(text, &self.texts, &self.types, parse_special)
        {
            match fragment {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(start, end) => {
                    let encoding = self
                        .bpe
                        .encode_fast(&text[start..end], false)
                        .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                    ids.extend_from_slice(encoding.get_ids());
                }
            }
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Decodes ids to text. CONTROL, UNKNOWN and UNUSED tokens (BOS, EOS,
    /// `<end_of_turn>`, ...) render as nothing; bytes that are not valid UTF-8
    /// become U+FFFD. When the metadata adds a space prefix and `ids` start
    /// with BOS, the space the encoder added before the first word is removed.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut cursor = PieceCursor::default();
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(cursor.next(self, id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The beginning-of-sequence id (`tokenizer.ggml.bos_token_id`).
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence id (`tokenizer.ggml.eos_token_id`).
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `id` ends generation: the EOS id, or the end-of-turn /
    /// end-of-message id when the metadata names one
    /// (`tokenizer.ggml.eot_token_id`, `tokenizer.ggml.eom_token_id`), or an id
    /// added with [`Tokenizer::add_eog`].
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Marks `id` as ending generation too, for stop tokens the metadata does
    /// not name (llama.cpp finds some, such as an end-of-turn token, by their
    /// text). Fails if `id` is out of range.
    pub fn add_eog(&mut self, id: u32) -> Result<(), TokenizerError> {
        self.check(id)?;
        if let Err(at) = self.eog.binary_search(&id) {
            self.eog.insert(at, id);
        }
        Ok(())
    }

    /// The ids that end generation, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// The token's text exactly as the file stores it (`Ġthe`, `▁the`,
    /// `<0x0A>`, `<|im_end|>`), or `None` if `id` is out of range.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The id whose stored text is exactly `text`, if any (a linear scan; for
    /// setup, not per token).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.texts.iter().rposition(|t| t == text).map(|i| i as u32)
    }

    fn check(&self, id: u32) -> Result<(), TokenizerError> {
        if (id as usize) < self.texts.len() {
            Ok(())
        } else {
            Err(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.texts.len(),
            })
        }
    }

    /// The bytes token `id` decodes to.
    fn piece(&self, id: u32) -> Result<&[u8], TokenizerError> {
        self.check(id)?;
        let i = id as usize;
        let start = if i == 0 {
            0
        } else {
            self.piece_ends[i - 1] as usize
        };
        Ok(&self.piece_bytes[start..self.piece_ends[i] as usize])
    }
}

/// Walks a sequence of ids and yields each one's bytes, dropping the leading
/// space of the token right after a leading BOS when the metadata adds a space
/// prefix. Shared by [`Tokenizer::decode`] and [`StreamDecoder`] so the two
/// always agree.
#[derive(Debug, Default, Clone)]
struct PieceCursor {
    index: usize,
    after_leading_bos: bool,
}

impl PieceCursor {
    fn next<'t>(&mut self, t: &'t Tokenizer, id: u32) -> Result<&'t [u8], TokenizerError> {
        let mut piece = t.piece(id)?;
        if self.index == 1 && self.after_leading_bos && piece.first() == Some(&b' ') {
            piece = &piece[1..];
        }
        if self.index == 0 {
            self.after_leading_bos = t.add_space_prefix && Some(id) == t.bos;
        }
        self.index += 1;
        Ok(piece)
    }
}

/// Incremental decoder for streaming output: feed ids one at a time, get the
/// new text (holds back incomplete UTF-8 from byte tokens).
///
/// The concatenation of everything [`StreamDecoder::push`] returns, followed
/// by [`StreamDecoder::finish`], equals [`Tokenizer::decode`] of the same ids.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    cursor: PieceCursor,
    /// Bytes of a UTF-8 sequence that is not complete yet.
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder at the start of a sequence.
    pub fn new(t: &'a Tokenizer) -> Self {
        StreamDecoder {
            tokenizer: t,
            cursor: PieceCursor::default(),
            pending: Vec::new(),
        }
    }

    /// Adds one id; returns the text that is now complete (possibly empty,
    /// when the id is a control token or an incomplete piece of a character).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let piece = self.cursor.next(self.tokenizer, id)?;
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just checked to be valid UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // Invalid bytes: one U+FFFD, as from_utf8_lossy does.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + len);
                        }
                        // An incomplete character at the end: wait for more.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Ends the sequence: returns U+FFFD if an incomplete character is still
    /// held back (as [`Tokenizer::decode`] would render it), else nothing.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

// ---------------------------------------------------------------------------
// Special tokens: llama.cpp's tokenizer_st_partition.

/// A piece of the input after special tokens are cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    /// Raw text, as a byte range of the input.
    Text(usize, usize),
    /// A special token.
    Token(u32),
}

/// Finds CONTROL / USER_DEFINED / UNKNOWN token text in raw input.
#[derive(Debug)]
struct SpecialMatcher {
    /// Special ids in matching order: longest text first, then lowest id.
    order: Vec<u32>,
    /// Their texts; a key's value is its position in `order`.
    trie: Trie,
}

/// A byte trie over the special tokens' texts; finds which of them occur in
/// a text without scanning the text once per special token.
#[derive(Debug, Default)]
struct Trie {
    /// Children of each node as (byte, node), sorted by byte.
    edges: Vec<Vec<(u8, u32)>>,
    /// The special token (as an index into `SpecialMatcher::order`) ending at
    /// each node.
    terminal: Vec<Option<u32>>,
}

impl Trie {
    fn insert(&mut self, key: &[u8], value: u32) {
        if self.edges.is_empty() {
            self.edges.push(Vec::new());
            self.terminal.push(None);
        }
        let mut node = 0usize;
        for &b in key {
            node = match self.edges[node].binary_search_by_key(&b, |e| e.0) {
                Ok(k) => self.edges[node][k].1 as usize,
                Err(k) => {
                    let child = self.edges.len();
                    self.edges.push(Vec::new());
                    self.terminal.push(None);
                    self.edges[node].insert(k, (b, child as u32));
                    child
                }
            };
        }
        self.terminal[node] = Some(value);
    }

    /// Calls `found` with the value of every key that occurs in `text`.
    fn find_all(&self, text: &[u8], mut found: impl FnMut(u32)) {
        if self.edges.is_empty() {
            return;
        }
        for start in 0..text.len() {
            let mut node = 0usize;
            for &b in &text[start..] {
                match self.edges[node].binary_search_by_key(&b, |e| e.0) {
                    Ok(k) => node = self.edges[node][k].1 as usize,
                    Err(_) => break,
                }
                if let Some(v) = self.terminal[node] {
                    found(v);
                }
            }
        }
    }
}

impl SpecialMatcher {
    fn new(texts: &[String], types: &[TokenType]) -> SpecialMatcher {
        let mut order: Vec<u32> = (0..texts.len() as u32)
            .filter(|&id| types[id as usize].is_special() && !texts[id as usize].is_empty())
            .collect();
        // llama.cpp sorts by length only (unstable); ties go to the lower id.
        order.sort_by(|&a, &b| {
            texts[b as usize]
                .len()
                .cmp(&texts[a as usize].len())
                .then(a.cmp(&b))
        });
        let mut trie = Trie::default();
        for (rank, &id) in order.iter().enumerate() {
            trie.insert(texts[id as usize].as_bytes(), rank as u32);
        }
        SpecialMatcher { order, trie }
    }

    /// Splits `text` into raw text and special tokens exactly as llama.cpp
    /// does: for each special token, longest first, every occurrence in every
    /// remaining raw fragment (left to right, non-overlapping) is cut out.
    fn partition(
        &self,
        text: &str,
        texts: &[String],
        types: &[TokenType],
        parse_special: bool,
    ) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        // Only specials that occur in the whole text can occur in a fragment.
        let mut present = Vec::new();
        self.trie
            .find_all(text.as_bytes(), |rank| present.push(rank));
        present.sort_unstable();
        present.dedup();

        let mut fragments = vec![Fragment::Text(0, text.len())];
        for rank in present {
            let id = self.order[rank as usize];
            if !parse_special && types[id as usize] != TokenType::UserDefined {
                continue;
            }
            let needle = texts[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut start, end) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = text[start..end].find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(start, start + at));
                    }
                    next.push(Fragment::Token(id));
                    start += at + needle.len();
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            fragments = next;
        }
        fragments
    }
}

// ---------------------------------------------------------------------------
// Building the BPE models.

fn build_error(e: impl fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

fn pre_tokenizer_spec(pre: Option<&str>) -> Result<&'static PreTokenizerSpec, TokenizerError> {
    // llama.cpp: a missing pre-tokenizer means "default" (with a warning).
    let name = pre.unwrap_or("default");
    PRE_TOKENIZERS
        .iter()
        .find(|spec| spec.names.contains(&name))
        .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer {
            name: name.to_string(),
            known: PRE_TOKENIZERS
                .iter()
                .flat_map(|s| s.names.iter().map(|n| format!("\"{n}\"")))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The vocabulary as a map, as llama.cpp builds it (a later duplicate wins).
fn vocab_map(texts: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(texts.len());
    for (id, text) in texts.iter().enumerate() {
        vocab.insert(text.clone(), id as u32);
    }
    vocab
}

fn build_byte_level(
    texts: &[String],
    merges: Vec<(String, String)>,
    spec: &PreTokenizerSpec,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab = vocab_map(texts);
    // The tokenizers crate rejects merges that name tokens outside the
    // vocabulary; such a merge could only produce an unknown token, so it is
    // dropped.
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .filter(|(a, b)| {
            vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        })
        .collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(build_error)?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for regex in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(build_error)?;
        steps.push(split.into());
    }
    // Regexes already split; ByteLevel only maps bytes to its unicode alphabet.
    steps.push(ByteLevel::new(false, false, false).into());

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    Ok(tokenizer)
}

/// Merges for a SentencePiece vocabulary, as Hugging Face's
/// `SentencePieceExtractor` derives them: for each piece (in id order), each
/// split into two pieces that are both in the vocabulary, ordered by the
/// halves' ids; then all merges stably sorted by the piece's score, highest
/// first.
fn sentencepiece_merges(texts: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32)> = texts
        .par_iter()
        .enumerate()
        .flat_map_iter(|(id, piece)| {
            let mut local: Vec<(f32, u32, u32)> = Vec::new();
            // A duplicate text is one vocabulary entry, scored by the id it
            // maps to.
            if vocab.get(piece) == Some(&(id as u32)) {
                for (at, _) in piece.char_indices().skip(1) {
                    let (left, right) = piece.split_at(at);
                    if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                        local.push((scores[id], l, r));
                    }
                }
                local.sort_unstable_by_key(|&(_, l, r)| (l, r));
            }
            local
        })
        .collect();
    // Stable: equal scores keep id order, as Python's sorted() does.
    merges.par_sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .par_iter()
        .map(|&(_, l, r)| (texts[l as usize].clone(), texts[r as usize].clone()))
        .collect()
}

fn build_sentencepiece(
    texts: &[String],
    scores: &[f32],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab = vocab_map(texts);
    let merges = sentencepiece_merges(texts, scores, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(texts[unk as usize].clone());
    }
    let model = builder.build().map_err(build_error)?;

    let mut steps: Vec<NormalizerWrapper> = Vec::with_capacity(2);
    if add_space_prefix {
        steps.push(Prepend::new(SPM_SPACE.to_string()).into());
    }
    steps.push(Replace::new(" ", SPM_SPACE).map_err(build_error)?.into());

    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(steps)));
    Ok(tokenizer)
}

/// The GPT-2 byte-to-unicode table reversed: `table[c]` is the byte that the
/// char with code point `c` stands for (all such chars are below U+0144).
fn byte_level_table() -> [Option<u8>; 0x144] {
    let mut table = [None; 0x144];
    let mut next = 256usize;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable {
            table[b as usize] = Some(b);
        } else {
            table[next] = Some(b);
            next += 1;
        }
    }
    table
}

/// The bytes every token decodes to (llama.cpp's `token_to_piece` with
/// `special = false`), packed into one buffer with end offsets.
fn build_pieces(
    kind: Kind,
    texts: &[String],
    types: &[TokenType],
) -> Result<(Vec<u8>, Vec<u32>), TokenizerError> {
    let table = byte_level_table();
    let mut bytes = Vec::with_capacity(texts.iter().map(String::len).sum());
    let mut ends = Vec::with_capacity(texts.len());
    for (id, (text, &ty)) in texts.iter().zip(types).enumerate() {
        match ty {
            TokenType::Normal => match kind {
                Kind::SentencePiece => {
                    let mut rest = text.as_str();
                    while let Some(at) = rest.find(SPM_SPACE) {
                        bytes.extend_from_slice(&rest.as_bytes()[..at]);
                        bytes.push(b' ');
                        rest = &rest[at + SPM_SPACE.len()..];
                    }
                    bytes.extend_from_slice(rest.as_bytes());
                }
                Kind::ByteLevel => {
                    for c in text.chars() {
                        match table.get(c as usize).copied().flatten() {
                            Some(b) => bytes.push(b),
                            // Not in the byte alphabet: keep the character
                            // (llama.cpp writes an [UNK_BYTE_..] marker).
                            None => {
                                let mut buf = [0u8; 4];
                                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            }
                        }
                    }
                }
            },
            TokenType::Byte => {
                bytes.push(
                    parse_byte_token(text).ok_or_else(|| TokenizerError::BadMetadata {
                        key: KEY_TOKEN_TYPE,
                        problem: format!(
                            "token {id} has type BYTE but its text {text:?} is not <0xHH>"
                        ),
                    })?,
                )
            }
            TokenType::UserDefined => bytes.extend_from_slice(text.as_bytes()),
            TokenType::Control | TokenType::Unknown | TokenType::Unused | TokenType::Undefined => {}
        }
        let end = u32::try_from(bytes.len())
            .map_err(|_| build_error("the decoded vocabulary is larger than 4 GiB"))?;
        ends.push(end);
    }
    Ok((bytes, ends))
}

/// `<0xHH>` to its byte.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

// ---------------------------------------------------------------------------
// Metadata access.

fn meta_str<'g>(g: &'g Gguf, key: &'static str) -> Result<Option<&'g str>, TokenizerError> {
    match g.meta(key) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| TokenizerError::BadMetadata {
                key,
                problem: format!("expected a string, found {}", v.type_name()),
            }),
    }
}

fn meta_bool(g: &Gguf, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match g.meta(key) {
        None => Ok(None),
        Some(MetaValue::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(TokenizerError::BadMetadata {
            key,
            problem: format!("expected a bool, found {}", v.type_name()),
        }),
    }
}

/// A token id from metadata, checked against the vocabulary size.
fn meta_id(g: &Gguf, key: &'static str, n_tokens: usize) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = g.meta(key) else {
        return Ok(None);
    };
    let bad = |problem: String| TokenizerError::BadMetadata { key, problem };
    let x = v
        .as_f64()
        .filter(|_| !matches!(v, MetaValue::Bool(_)))
        .ok_or_else(|| bad(format!("expected a token id, found {}", v.type_name())))?;
    if x.fract() != 0.0 || x < 0.0 {
        return Err(bad(format!("{x} is not a token id")));
    }
    if x >= n_tokens as f64 {
        return Err(bad(format!(
            "token id {x} is out of range for a vocabulary of {n_tokens} tokens"
        )));
    }
    Ok(Some(x as u32))
}

fn meta_array<'g>(
    g: &'g Gguf,
    key: &'static str,
) -> Result<Option<&'g [MetaValue]>, TokenizerError> {
    match g.meta(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| TokenizerError::BadMetadata {
                key,
                problem: format!("expected an array, found {}", v.type_name()),
            }),
    }
}

fn read_tokens(g: &Gguf) -> Result<Vec<String>, TokenizerError> {
    let items = meta_array(g, KEY_TOKENS)?.ok_or(TokenizerError::MissingKey {
        key: KEY_TOKENS,
        why: "it is the vocabulary",
    })?;
    if items.is_empty() || items.len() > u32::MAX as usize {
        return Err(TokenizerError::BadMetadata {
            key: KEY_TOKENS,
            problem: format!("{} tokens is not a usable vocabulary", items.len()),
        });
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            // llama.cpp renames empty tokens so they stay distinct.
            Some("") => Ok(format!("[EMPTY_{i}]")),
            Some(s) => Ok(s.to_string()),
            None => Err(TokenizerError::BadMetadata {
                key: KEY_TOKENS,
                problem: format!("element {i} is a {}, expected a string", v.type_name()),
            }),
        })
        .collect()
}

fn read_token_types(g: &Gguf, n: usize) -> Result<Vec<TokenType>, TokenizerError> {
    // llama.cpp: without token types, every token is NORMAL.
    let Some(items) = meta_array(g, KEY_TOKEN_TYPE)? else {
        return Ok(vec![TokenType::Normal; n]);
    };
    if items.len() < n {
        return Err(TokenizerError::BadMetadata {
            key: KEY_TOKEN_TYPE,
            problem: format!("{} entries for {n} tokens", items.len()),
        });
    }
    items[..n]
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_f64() {
            Some(x) => Ok(TokenType::from_gguf(x as i64)),
            None => Err(TokenizerError::BadMetadata {
                key: KEY_TOKEN_TYPE,
                problem: format!("element {i} is a {}, expected an integer", v.type_name()),
            }),
        })
        .collect()
}

fn read_scores(g: &Gguf, n: usize) -> Result<Vec<f32>, TokenizerError> {
    let items = meta_array(g, KEY_SCORES)?.ok_or(TokenizerError::MissingKey {
        key: KEY_SCORES,
        why: "a SentencePiece tokenizer ranks its merges by piece score",
    })?;
    if items.len() < n {
        return Err(TokenizerError::BadMetadata {
            key: KEY_SCORES,
            problem: format!("{} scores for {n} tokens", items.len()),
        });
    }
    items[..n]
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_f64() {
            Some(x) => Ok(x as f32),
            None => Err(TokenizerError::BadMetadata {
                key: KEY_SCORES,
                problem: format!("element {i} is a {}, expected a number", v.type_name()),
            }),
        })
        .collect()
}

/// `tokenizer.ggml.merges`: `"left right"`, split at the first space after the
/// first byte, as llama.cpp does.
fn read_merges(g: &Gguf) -> Result<Vec<(String, String)>, TokenizerError> {
    let items = meta_array(g, KEY_MERGES)?.ok_or(TokenizerError::MissingKey {
        key: KEY_MERGES,
        why: "a byte-level BPE tokenizer needs its merge ranks",
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let bad = |problem: String| TokenizerError::BadMetadata {
                key: KEY_MERGES,
                problem,
            };
            let s = v.as_str().ok_or_else(|| {
                bad(format!(
                    "element {i} is a {}, expected a string",
                    v.type_name()
                ))
            })?;
            let at = s
                .bytes()
                .skip(1)
                .position(|b| b == b' ')
                .map(|p| p + 1)
                .ok_or_else(|| bad(format!("element {i} ({s:?}) is not \"left right\"")))?;
            Ok((s[..at].to_string(), s[at + 1..].to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_a_bijection() {
        let table = byte_level_table();
        let mut seen = [false; 256];
        for b in table.iter().flatten() {
            assert!(!seen[*b as usize], "byte {b} twice");
            seen[*b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(table['Ġ' as usize], Some(b' '));
        assert_eq!(table['Ċ' as usize], Some(b'\n'));
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(parse_byte_token("<0xFF>"), Some(0xFF));
        assert_eq!(parse_byte_token("<0x0A"), None);
        assert_eq!(parse_byte_token("<0x0AB>"), None);
    }

    #[test]
    fn partition_takes_longest_special_first() {
        let texts: Vec<String> = ["a", "ab", "bcd", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let types = vec![
            TokenType::Normal,
            TokenType::Control,
            TokenType::Control,
            TokenType::UserDefined,
        ];
        let m = SpecialMatcher::new(&texts, &types);
        // llama.cpp cuts "bcd" first although "ab" starts earlier.
        assert_eq!(
            m.partition("abcdxab", &texts, &types, true),
            vec![
                Fragment::Text(0, 1),
                Fragment::Token(2),
                Fragment::Token(3),
                Fragment::Token(1),
            ]
        );
        // Without parse_special only USER_DEFINED tokens are cut.
        assert_eq!(
            m.partition("abcdxab", &texts, &types, false),
            vec![
                Fragment::Text(0, 4),
                Fragment::Token(3),
                Fragment::Text(5, 7),
            ]
        );
    }
}
