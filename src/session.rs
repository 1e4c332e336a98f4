//! Loading a model end to end (GGUF → graph → bound graph → tokenizer) and
//! the generation loop shared by every backend.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::graph::{find_graph, BoundGraph, Graph};
use crate::model::gguf::Gguf;
use crate::model::tokenizer::{StreamDecoder, Tokenizer};
use crate::reference::{Logits, Reference};

/// The models cache folder: `$KILN_MODELS`, else `$XDG_CACHE_HOME/kiln/models`,
/// else `~/.cache/kiln/models` (where tools/setup.sh puts the models).
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_MODELS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("kiln").join("models")
}

/// The default model: `default.gguf` in [`models_dir`], a link tools/setup.sh makes.
pub fn default_model() -> Result<PathBuf> {
    let p = models_dir().join("default.gguf");
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::Input(format!(
            "no default model at {}: run tools/setup.sh (it fetches the models), or pass --model PATH.gguf",
            p.display()
        )))
    }
}

/// A model ready to run: its file, graph, bound graph and tokenizer.
pub struct Model {
    /// The GGUF file.
    pub gguf: Gguf,
    /// The bound graph.
    pub bound: BoundGraph,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
}

impl Model {
    /// Open `path` and bind it to `graph` (default: graphs/<general.architecture>.ron).
    pub fn load(path: &Path, graph: Option<&Path>) -> Result<Model> {
        let (gguf, bound) = bind_model(path, graph)?;
        // A file with no vocabulary at all (a `kiln synth` model) is not a
        // conversion gone wrong: say what it can be used for.
        if !gguf
            .metadata
            .keys()
            .any(|k| k.starts_with("tokenizer.ggml."))
        {
            return Err(Error::Input(format!(
                "{} has no vocabulary (no tokenizer.ggml.* metadata; `kiln synth` writes none): \
                 commands that read or write text need a converted model; `kiln bench`, \
                 `kiln plan`, `kiln kernels`, `kiln eval --tokens` and \
                 `kiln run --tokens --verify-replay` run without one",
                path.display()
            )));
        }
        let mut tokenizer = Tokenizer::from_gguf(&gguf)?;
        for text in &bound.stop_tokens {
            if let Some(id) = tokenizer.token_id(text) {
                tokenizer.add_eog(id)?;
            }
        }
        Ok(Model {
            gguf,
            bound,
            tokenizer,
        })
    }
}

/// Open a GGUF and bind it to its graph, without a tokenizer (enough for
/// benchmarks, and for synthetic models that carry no vocabulary).
pub fn bind_model(path: &Path, graph: Option<&Path>) -> Result<(Gguf, BoundGraph)> {
    let gguf = Gguf::open(path)?;
    let graph_path = match graph {
        Some(g) => g.to_path_buf(),
        None => {
            let arch = gguf.architecture().ok_or_else(|| {
                Error::Input(format!(
                    "{} has no general.architecture; pass --graph FILE.ron",
                    path.display()
                ))
            })?;
            find_graph(arch)?
        }
    };
    let bound = Graph::load(&graph_path)?.bind(&gguf)?;
    Ok((gguf, bound))
}

/// Something that runs a bound graph step by step with a KV cache.
pub trait Backend {
    /// Run tokens at the next positions; logits for all of them, or the last.
    fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Logits>;
    /// Run tokens and return the argmax of the last logits row (greedy
    /// decode); a backend may compute it without reading the logits back.
    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        let l = self.forward(tokens, true)?;
        Ok(crate::reference::ops::argmax(l.row(l.rows() - 1), l.vocab)
            .first()
            .copied()
            .unwrap_or(0) as u32)
    }
    /// Greedy decode after `first` (the token at the next position): each
    /// step's argmax is the next step's token, for at most `n` steps;
    /// `on_token` gets each new token and returns whether to go on. A
    /// backend may compute steps ahead of `on_token` (the GPU runs one
    /// ahead); the position afterwards is that of the last token handed
    /// out.
    fn decode_greedy(
        &mut self,
        first: u32,
        n: usize,
        on_token: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<()> {
        let mut next = first;
        for _ in 0..n {
            next = self.forward_greedy(&[next])?;
            if !on_token(next)? {
                break;
            }
        }
        Ok(())
    }
    /// Forget the KV cache.
    fn reset(&mut self);
    /// Context length in positions.
    fn n_ctx(&self) -> usize;
}

impl Backend for Reference<'_> {
    fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Logits> {
        Reference::forward(self, tokens, last_only)
    }
    fn reset(&mut self) {
        Reference::reset(self)
    }
    fn n_ctx(&self) -> usize {
        Reference::n_ctx(self)
    }
}

/// Sampling settings. `temp == 0` is greedy.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// Temperature; 0 picks the largest logit.
    pub temp: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: all).
    pub top_p: f32,
    state: u64,
}

impl Sampler {
    /// A sampler; `seed` makes sampling reproducible.
    pub fn new(temp: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler {
            temp,
            top_k,
            top_p,
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Uniform in [0, 1) (splitmix64).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Pick the next token from a row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = crate::reference::ops::argmax(logits, logits.len().max(1))
            .first()
            .copied()
            .unwrap_or(0) as u32;
        if self.temp <= 0.0 {
            return argmax;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            idx.truncate(self.top_k);
        }
        let m = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - m) / self.temp as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        let mut keep = probs.len();
        let mut acc = 0.0;
        for (n, p) in probs.iter_mut().enumerate() {
            *p /= total;
            acc += *p;
            if acc >= self.top_p as f64 && n + 1 < keep {
                keep = n + 1;
            }
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut r = self.uniform() * kept;
        for (n, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return idx[n] as u32;
            }
        }
        idx[keep - 1] as u32
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Time to run the prompt.
    pub prompt_time: Duration,
    /// Generated tokens.
    pub gen_tokens: usize,
    /// Time to generate them.
    pub gen_time: Duration,
}

/// Run `prompt` and generate up to `n` tokens, calling `emit` with the text
/// of each new token as it is produced. Stops early at an end-of-generation
/// token or the end of the context.
pub fn generate(
    backend: &mut dyn Backend,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    n: usize,
    sampler: &mut Sampler,
    emit: &mut dyn FnMut(&str),
) -> Result<(Vec<u32>, GenStats)> {
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    if prompt.len() > backend.n_ctx() {
        return Err(Error::Input(format!(
            "the prompt has {} tokens but the context holds {}; shorten it or raise --ctx",
            prompt.len(),
            backend.n_ctx()
        )));
    }
    let n = n.min(backend.n_ctx() - prompt.len());
    let mut out = Vec::new();
    let mut decoder = StreamDecoder::new(tokenizer);
    let t0 = Instant::now();
    // Greedy steps read back one token id, not a row of logits.
    let greedy = sampler.temp <= 0.0;
    let mut logits = None;
    let mut next_greedy = 0;
    if greedy {
        next_greedy = backend.forward_greedy(prompt)?;
    } else {
        logits = Some(backend.forward(prompt, true)?);
    }
    stats.prompt_time = t0.elapsed();
    let t1 = Instant::now();
    if greedy {
        // The first token came with the prompt; the rest from the backend's
        // greedy loop (which may run a step ahead of the text).
        if n > 0 {
            out.push(next_greedy);
            if !tokenizer.is_eog(next_greedy) {
                emit(&decoder.push(next_greedy)?);
                backend.decode_greedy(next_greedy, n - 1, &mut |t| {
                    out.push(t);
                    if tokenizer.is_eog(t) {
                        return Ok(false);
                    }
                    emit(&decoder.push(t)?);
                    Ok(true)
                })?;
            }
        }
    } else {
        for step in 0..n {
            let Some(l) = &logits else { break };
            let next = sampler.sample(l.row(l.rows() - 1));
            out.push(next);
            if tokenizer.is_eog(next) {
                break;
            }
            emit(&decoder.push(next)?);
            if step + 1 < n {
                logits = Some(backend.forward(&[next], true)?);
            }
        }
    }
    stats.gen_tokens = out.len();
    stats.gen_time = t1.elapsed();
    Ok((out, stats))
}

/// Per-position summary of a logits row, as in the reference fixtures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RowSummary {
    /// Position in the prompt.
    pub pos: usize,
    /// Top-k `[token, logit]`, best first.
    pub top: Vec<(u32, f32)>,
    /// Mean of the whole row.
    pub mean: f64,
    /// Standard deviation of the whole row (population).
    pub std: f64,
}

/// Top-k and moments of a row.
pub fn summarize(pos: usize, row: &[f32], k: usize) -> RowSummary {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let n = row.len().max(1) as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    RowSummary {
        pos,
        top: idx.iter().take(k).map(|&i| (i as u32, row[i])).collect(),
        mean,
        std: var.sqrt(),
    }
}
