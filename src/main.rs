//! The `kiln` command line: a thin layer over the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use kiln::error::{Error, Result};
use kiln::model::gguf::Gguf;
use kiln::reference::Reference;
use kiln::session::{default_model, generate, summarize, Model, Sampler};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A graph-compiled kernel runtime for LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    /// The f32 CPU reference interpreter.
    Cpu,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// GGUF model (default: default.gguf in the models folder, made by tools/setup.sh).
    #[arg(long, short)]
    model: Option<PathBuf>,
    /// Graph file (default: graphs/<general.architecture>.ron).
    #[arg(long)]
    graph: Option<PathBuf>,
    /// Executor.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Context length in tokens (capped by the model's).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a continuation of a prompt, streaming it to stdout.
    Run {
        #[command(flatten)]
        m: ModelArgs,
        /// Tokens to generate.
        #[arg(short = 'n', long, default_value_t = 64)]
        n: usize,
        /// Temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temp: f32,
        /// Sample among the k most likely tokens (0: all).
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        /// Random seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The prompt.
        prompt: String,
    },
    /// Print the top logits at every prompt position (JSON as in the reference fixtures).
    Eval {
        #[command(flatten)]
        m: ModelArgs,
        /// Token ids, comma-separated, instead of text.
        #[arg(long, value_delimiter = ',')]
        tokens: Option<Vec<u32>>,
        /// How many top logits per position.
        #[arg(long, default_value_t = 16)]
        top: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Text to tokenize (when --tokens is not given).
        text: Option<String>,
    },
    /// List a GGUF file's metadata and tensors.
    Inspect {
        /// The GGUF file.
        model: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(m: &ModelArgs) -> Result<Model> {
    let path = match &m.model {
        Some(p) => p.clone(),
        None => default_model()?,
    };
    Model::load(&path, m.graph.as_deref())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            m,
            n,
            temp,
            top_k,
            top_p,
            seed,
            prompt,
        } => {
            let model = load(&m)?;
            let ids = model.tokenizer.encode(&prompt)?;
            let BackendKind::Cpu = m.backend;
            let mut backend = Reference::new(&model.bound, &model.gguf, m.ctx)?;
            let mut sampler = Sampler::new(temp, top_k, top_p, seed);
            let mut stdout = std::io::stdout();
            print!("{prompt}");
            let (_, stats) = generate(
                &mut backend,
                &model.tokenizer,
                &ids,
                n,
                &mut sampler,
                &mut |s| {
                    print!("{s}");
                    let _ = stdout.flush();
                },
            )?;
            println!();
            let rate = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
            eprintln!(
                "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s",
                stats.prompt_tokens,
                rate(stats.prompt_tokens, stats.prompt_time),
                stats.gen_tokens,
                rate(stats.gen_tokens, stats.gen_time)
            );
            Ok(())
        }
        Cmd::Eval {
            m,
            tokens,
            top,
            json,
            text,
        } => {
            let model = load(&m)?;
            let (ids, prompt) = match (tokens, text) {
                (Some(t), _) => (t, None),
                (None, Some(text)) => (model.tokenizer.encode(&text)?, Some(text)),
                (None, None) => return Err(Error::Input("give text or --tokens 1,2,3".into())),
            };
            let BackendKind::Cpu = m.backend;
            let mut backend = Reference::new(&model.bound, &model.gguf, m.ctx.max(ids.len()))?;
            let logits = backend.forward(&ids, false)?;
            let rows: Vec<_> = (0..logits.rows())
                .map(|r| summarize(r, logits.row(r), top))
                .collect();
            if json {
                let model_name = m
                    .model
                    .as_deref()
                    .and_then(Path::file_stem)
                    .map(|s| s.to_string_lossy().into_owned());
                let out = serde_json::json!({
                    "model": model_name.unwrap_or_else(|| "default".into()),
                    "reference": "kiln",
                    "cases": [{ "prompt": prompt, "prompt_ids": ids, "logits": rows }],
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                for r in rows {
                    let top: Vec<String> =
                        r.top.iter().map(|(t, l)| format!("{t}:{l:.3}")).collect();
                    println!(
                        "pos {:>4}  mean {:>8.3}  std {:>7.3}  {}",
                        r.pos,
                        r.mean,
                        r.std,
                        top.join(" ")
                    );
                }
            }
            Ok(())
        }
        Cmd::Inspect { model } => inspect(&model),
    }
}

fn inspect(path: &Path) -> Result<()> {
    let g = Gguf::open(path)?;
    println!(
        "{}: GGUF v{}, {} bytes, alignment {}",
        path.display(),
        g.version,
        g.file_size(),
        g.alignment
    );
    println!("\nmetadata ({} keys)", g.metadata.len());
    let kw = g.metadata.keys().map(|k| k.len()).max().unwrap_or(0);
    for (k, v) in &g.metadata {
        println!("  {k:<kw$}  {:<6}  {v}", v.type_name());
    }
    println!("\ntensors ({})", g.tensors.len());
    let nw = g.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    println!(
        "  {:<nw$}  {:<7}  {:<22}  {:>12}",
        "name", "dtype", "shape (ggml)", "bytes"
    );
    let mut total = 0u64;
    for t in &g.tensors {
        let shape = format!("{:?}", t.dims);
        println!(
            "  {:<nw$}  {:<7}  {:<22}  {:>12}",
            t.name,
            t.dtype.to_string(),
            shape,
            t.size
        );
        total += t.size;
    }
    let params: u64 = g.tensors.iter().map(|t| t.n_elements()).sum();
    println!("\n  {} parameters, {} bytes of tensor data", params, total);
    Ok(())
}
