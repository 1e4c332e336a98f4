//! The `kiln` command line: a thin layer over the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use kiln::error::{Error, Result};
use kiln::exec::context::device_type_name;
use kiln::exec::gpu::GpuBackend;
use kiln::exec::{choose_adapter, list_adapters, FeatureRequest, GpuContext, GpuOptions};
use kiln::model::gguf::Gguf;
use kiln::reference::Reference;
use kiln::session::Backend;
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
    #[command(flatten)]
    gpu: GpuArgs,
}

/// GPU choice, accepted by every subcommand.
#[derive(clap::Args)]
struct GpuArgs {
    /// GPU adapter: a case-insensitive substring of its name (see `kiln devices`).
    /// Default: $KILN_ADAPTER, else a discrete GPU, then integrated, then CPU (lavapipe).
    #[arg(long, global = true, value_name = "NAME")]
    adapter: Option<String>,
    /// Optional GPU features kiln may use: none|f16|subgroups|all.
    /// Default: $KILN_FEATURES, else all that the adapter offers.
    #[arg(long, global = true, value_name = "SET")]
    features: Option<FeatureRequest>,
}

impl GpuArgs {
    /// The options for the executor; unset ones fall back to the environment.
    fn options(&self) -> Result<GpuOptions> {
        GpuOptions {
            adapter: self.adapter.clone(),
            features: self.features,
        }
        .or_env()
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    /// The f32 CPU reference interpreter (the oracle).
    Cpu,
    /// WGSL kernels on the GPU adapter (see `kiln devices`).
    Gpu,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// GGUF model (default: default.gguf in the models folder, made by tools/setup.sh).
    #[arg(long, short)]
    model: Option<PathBuf>,
    /// Graph file (default: graphs/<general.architecture>.ron).
    #[arg(long)]
    graph: Option<PathBuf>,
    /// Executor: the GPU (default), or the f32 CPU reference (the oracle).
    #[arg(long, value_enum, default_value = "gpu")]
    backend: BackendKind,
    /// Context length in tokens (capped by the model's).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Turn a fusion pass off (repeatable), to bisect a wrong result:
    /// siblings, gated, epilogue, prologue, attention, split, quantize.
    #[arg(long = "no-fuse", value_name = "PASS")]
    no_fuse: Vec<String>,
    /// Keep matmul inputs in f32. By default decode matmuls with rows over
    /// 2048 elements and Q4_0/Q4_1/Q8_0/Q4_K/Q6_K weights read their input
    /// quantized to int8 per 32 elements (integer dot products), as
    /// llama.cpp does.
    #[arg(long)]
    f32_activations: bool,
}

impl ModelArgs {
    fn fusion(&self) -> Result<kiln::plan::FuseOptions> {
        kiln::plan::report::check_passes(&self.no_fuse)?;
        Ok(kiln::plan::FuseOptions {
            disabled: self.no_fuse.clone(),
            f32_activations: self.f32_activations,
            ..Default::default()
        })
    }
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
        /// Instead of generating: run the prompt and N greedy decode steps
        /// twice, with the fused recorded plan and a fresh unfused one, and
        /// name the first tensor whose values differ beyond tolerance.
        #[arg(long, value_name = "N")]
        verify_replay: Option<usize>,
        /// Token ids, comma-separated, as the prompt of --verify-replay
        /// (needs no vocabulary: a `kiln synth` model has none).
        #[arg(
            long,
            value_delimiter = ',',
            requires = "verify_replay",
            conflicts_with = "prompt"
        )]
        tokens: Option<Vec<u32>>,
        /// With --verify-replay: print every compared tensor's relative L2
        /// error in graph order (all N steps, past a mismatch too), to see
        /// where a difference starts and how it grows with depth.
        #[arg(long, requires = "verify_replay")]
        print_errors: bool,
        /// The prompt.
        #[arg(required_unless_present = "tokens")]
        prompt: Option<String>,
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
    /// List GPU adapters, their features and limits; mark the one kiln would use.
    Devices,
    /// Measure decode and prefill speed on the GPU, beside the read roof.
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        /// Decode steps to time.
        #[arg(long, default_value_t = 64)]
        decode: usize,
        /// Prompt length for the prefill timing.
        #[arg(long, default_value_t = 512)]
        prefill: usize,
        /// Prompt length before the decode timing (at least 1): the decode
        /// steps attend to this many positions and more.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
        decode_after: u32,
        /// Replay a recorded stream (`kiln plan --stream-out FILE`) instead
        /// of planning.
        #[arg(long, conflicts_with = "tries")]
        stream: Option<PathBuf>,
        /// Also time the decode with these knob pins (`KILN_KNOBS` syntax,
        /// e.g. `matmul_vec.WG=64,ROWS=2`; `splits=N` for N splits of
        /// every decode attention, `qlast=1` for matmuls quantizing their
        /// output by the last workgroup of each block, `qevery=1` for every
        /// int8 producer quantizing its own output, pairs of any dtype
        /// included; repeatable): each
        /// is planned and loaded beside the default, and the decode timings of all run
        /// interleaved, --rounds times, in this one process.
        #[arg(long = "try", value_name = "PINS")]
        tries: Vec<String>,
        /// Interleaved decode timing rounds with --try.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
    },
    /// Tune the decode kernels' workgroup shapes on this GPU: for each
    /// kernel role of the decode plan in turn, time the decode with each
    /// other legal WG and ROWS value pinned to that role, interleaved with
    /// the best so far, and keep a value that is faster by more than
    /// --margin; print the winning knob pins (`KILN_KNOBS` syntax).
    Tune {
        #[command(flatten)]
        m: ModelArgs,
        /// Decode steps per timing.
        #[arg(long, default_value_t = 64)]
        decode: usize,
        /// Interleaved timing rounds per candidate (the best round counts).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Percent a candidate must gain to be kept.
        #[arg(long, default_value_t = 1.0)]
        margin: f64,
        /// Also write the winning pins to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a synthetic model: `--like M.gguf --spec-out S.json` extracts a
    /// model's shape; `--spec S.json --out X.gguf` writes random valid weights
    /// in that shape (for benchmarks where real weights cannot be fetched).
    Synth {
        /// A real model whose shape to extract.
        #[arg(long)]
        like: Option<PathBuf>,
        /// Where to write the extracted spec (JSON).
        #[arg(long)]
        spec_out: Option<PathBuf>,
        /// A spec to generate from.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// The GGUF to write.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Dtype mix applied before writing: as-is (the spec's dtypes), q4_0,
        /// q8_0, f16 (every weight of 2+ dims in that dtype), or a mix the
        /// spec defines in its "mixes" rules (e.g. q4_k_m).
        #[arg(long, default_value = "as-is")]
        mix: String,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Show how a model will run: fused groups in order with their kernels,
    /// dispatches per step, every intermediate buffer with its arena, offset,
    /// size and live range, and the arena's peak beside the naive sum and the
    /// lower bound.
    Plan {
        #[command(flatten)]
        m: ModelArgs,
        /// Tokens of the prefill plan to show.
        #[arg(long, default_value_t = 512)]
        prefill: usize,
        /// Also write the fused decode graph as Graphviz (groups as clusters).
        #[arg(long)]
        dot: Option<PathBuf>,
        /// Also write the recorded stream (both plans) for `kiln bench --stream`.
        #[arg(long)]
        stream_out: Option<PathBuf>,
    },
    /// Write every WGSL kernel the model's plans use (decode and prefill).
    Kernels {
        #[command(flatten)]
        m: ModelArgs,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `writeln!` into a String (cannot fail).
macro_rules! outln {
    ($o:expr, $($t:tt)*) => {{
        let _ = writeln!($o, $($t)*);
    }};
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

/// The model file `m` names, else the default one.
fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    match &m.model {
        Some(p) => Ok(p.clone()),
        None => default_model(),
    }
}

fn load(m: &ModelArgs) -> Result<Model> {
    Model::load(&model_path(m)?, m.graph.as_deref())
}

/// The model's file and bound graph without its tokenizer: enough for
/// commands that never see text (plan, kernels, bench, eval --tokens), so
/// they also work on `kiln synth` models, which carry no vocabulary.
fn bind(m: &ModelArgs) -> Result<(Gguf, kiln::graph::BoundGraph)> {
    kiln::session::bind_model(&model_path(m)?, m.graph.as_deref())
}

/// Run `f` with the backend `m` asks for.
fn with_backend<R>(
    m: &ModelArgs,
    gpu: &GpuArgs,
    (gguf, bound): (&Gguf, &kiln::graph::BoundGraph),
    n_ctx: usize,
    f: &mut dyn FnMut(&mut dyn Backend) -> Result<R>,
) -> Result<R> {
    match m.backend {
        BackendKind::Cpu => f(&mut Reference::new(bound, gguf, n_ctx)?),
        BackendKind::Gpu => {
            let ctx = GpuContext::new(&gpu.options()?)?;
            let progress = std::io::stderr().is_terminal();
            eprintln!(
                "kiln: GPU {} ({:?}), features: {}",
                ctx.adapter_info.name, ctx.adapter_info.backend, ctx.features
            );
            f(&mut GpuBackend::with_fusion(
                &ctx,
                bound,
                gguf,
                n_ctx,
                progress,
                &m.fusion()?,
            )?)
        }
    }
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
            verify_replay,
            tokens,
            print_errors,
            prompt,
        } => {
            if let Some(steps) = verify_replay {
                // Token ids need no vocabulary (a `kiln synth` model has none).
                let (gguf, bound, ids) = match (tokens, &prompt) {
                    (Some(t), _) => {
                        let (gguf, bound) = bind(&m)?;
                        (gguf, bound, t)
                    }
                    (None, Some(text)) => {
                        let model = load(&m)?;
                        let ids = model.tokenizer.encode(text)?;
                        (model.gguf, model.bound, ids)
                    }
                    (None, None) => {
                        return Err(Error::Input("give a prompt or --tokens 1,2,3".into()));
                    }
                };
                let ctx = GpuContext::new(&cli.gpu.options()?)?;
                let r = kiln::exec::verify::verify_replay(
                    &ctx,
                    &bound,
                    &gguf,
                    &ids,
                    steps,
                    &m.fusion()?,
                    print_errors,
                )?;
                if print_errors {
                    println!("step  tensor  relative L2 error (fused against unfused)");
                    for (step, name, e) in &r.errors {
                        let flag = if *e > r.tol { "  > tolerance" } else { "" };
                        println!("{step:4}  {name}  {e:.3e}{flag}");
                    }
                }
                return match r.first {
                    None => {
                        let worst = if r.worst.0 > 0.0 {
                            format!("worst {:.3e} at '{}'", r.worst.0, r.worst.1)
                        } else {
                            "all bitwise equal".to_string()
                        };
                        println!(
                            "replay verified: {} decode steps, {} tensors compared, fused equals unfused within {:e} ({worst})",
                            r.steps, r.compared, r.tol
                        );
                        Ok(())
                    }
                    Some(x) => Err(Error::Gpu(format!(
                        "replay differs at decode step {}: tensor '{}' has relative L2 error {:.3e} > {:e} against the unfused plan; bisect with --no-fuse PASS",
                        x.step, x.value, x.err, r.tol
                    ))),
                };
            }
            let prompt = prompt.ok_or_else(|| Error::Input("give a prompt".into()))?;
            let model = load(&m)?;
            let ids = model.tokenizer.encode(&prompt)?;
            let mut sampler = Sampler::new(temp, top_k, top_p, seed);
            let mut stdout = std::io::stdout();
            let model_ref = (&model.gguf, &model.bound);
            let (_, stats) = with_backend(&m, &cli.gpu, model_ref, m.ctx, &mut |backend| {
                print!("{prompt}");
                generate(backend, &model.tokenizer, &ids, n, &mut sampler, &mut |s| {
                    print!("{s}");
                    let _ = stdout.flush();
                })
            })?;
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
            // Token ids need no vocabulary (a `kiln synth` model has none).
            let (gguf, bound, ids, prompt) = match (tokens, text) {
                (Some(t), _) => {
                    let (gguf, bound) = bind(&m)?;
                    (gguf, bound, t, None)
                }
                (None, Some(text)) => {
                    let model = load(&m)?;
                    let ids = model.tokenizer.encode(&text)?;
                    (model.gguf, model.bound, ids, Some(text))
                }
                (None, None) => return Err(Error::Input("give text or --tokens 1,2,3".into())),
            };
            let logits = with_backend(
                &m,
                &cli.gpu,
                (&gguf, &bound),
                m.ctx.max(ids.len()),
                &mut |b| b.forward(&ids, false),
            )?;
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
        Cmd::Synth {
            like,
            spec_out,
            spec,
            out,
            mix,
            seed,
        } => synth(like, spec_out, spec, out, &mix, seed),
        Cmd::Bench {
            m,
            decode,
            prefill,
            decode_after,
            stream,
            tries,
            rounds,
        } => bench(
            &m,
            &cli.gpu,
            decode,
            [prefill, decode_after as usize],
            stream.as_deref(),
            (&tries, rounds as usize),
        ),
        Cmd::Tune {
            m,
            decode,
            rounds,
            margin,
            out,
        } => tune(
            &m,
            &cli.gpu,
            decode,
            rounds as usize,
            margin,
            out.as_deref(),
        ),
        Cmd::Plan {
            m,
            prefill,
            dot,
            stream_out,
        } => {
            let (_gguf, bound) = bind(&m)?;
            let opts = m.fusion()?;
            let ctx = GpuContext::new(&cli.gpu.options()?)?;
            let caps = kiln::exec::kernel::caps(&ctx);
            let max = ctx
                .limits
                .max_storage_buffer_binding_size
                .min(ctx.limits.max_buffer_size);
            let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
            use kiln::plan::{self, report, Bucket};
            let decode = plan::plan_with(&bound, Bucket::One, caps, max, &opts)?;
            let pre = plan::plan_with(&bound, Bucket::Many, caps, max, &opts)?;
            println!("{}", report::text(&bound, &decode, 1, align, max)?);
            println!(
                "{}",
                report::text(&bound, &pre, prefill.max(2), align, max)?
            );
            if let Some(p) = dot {
                std::fs::write(&p, report::dot(&bound, &decode))
                    .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
                eprintln!("wrote {}", p.display());
            }
            if let Some(p) = stream_out {
                let text = kiln::plan::stream::to_json(&bound, &[decode, pre])?;
                std::fs::write(&p, text)
                    .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Kernels { m, out } => {
            let (_gguf, bound) = bind(&m)?;
            let ctx = GpuContext::new(&cli.gpu.options()?)?;
            let caps = kiln::exec::kernel::caps(&ctx);
            let files = kiln::plan::write_kernels(
                &bound,
                caps,
                ctx.limits.max_storage_buffer_binding_size,
                &out,
            )?;
            for f in &files {
                println!("{}", f.display());
            }
            eprintln!(
                "{} kernels written to {} for {}",
                files.len(),
                out.display(),
                ctx.adapter_info.name
            );
            Ok(())
        }
        Cmd::Devices => devices(&cli.gpu),
    }
}

fn devices(gpu: &GpuArgs) -> Result<()> {
    let opts = gpu.options()?;
    let adapters = list_adapters();
    let chosen = choose_adapter(&adapters, opts.adapter.as_deref())?;
    let request = opts.feature_request();
    let bytes = |b: u64| match b {
        _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        _ if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        _ if b >= 1 << 30 => format!("{b} B (~{:.1} GiB)", b as f64 / (1u64 << 30) as f64),
        _ if b >= 1 << 20 => format!("{b} B (~{:.1} MiB)", b as f64 / (1u64 << 20) as f64),
        _ => format!("{b} B"),
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    for (i, a) in adapters.iter().enumerate() {
        let info = &a.info;
        let mark = if i == chosen { "*" } else { " " };
        println!("{mark} [{i}] {}", info.name);
        println!(
            "      backend {}, {}, vendor {:#06x} device {:#06x}",
            info.backend,
            device_type_name(info.device_type),
            info.vendor,
            info.device
        );
        match (info.driver.is_empty(), info.driver_info.is_empty()) {
            (false, false) => println!("      driver {} ({})", info.driver, info.driver_info),
            (false, true) => println!("      driver {}", info.driver),
            (true, false) => println!("      driver {}", info.driver_info),
            (true, true) => {}
        }
        let o = &a.offered;
        let sg = if o.subgroups {
            format!("yes (size {}..{})", o.subgroup_min, o.subgroup_max)
        } else {
            "no".into()
        };
        println!(
            "      features: shader-f16 {}, subgroups {sg}, timestamp queries {}",
            yes(o.f16),
            yes(o.timestamps)
        );
        let l = &a.limits;
        println!(
            "      limits: storage binding {}, buffer {}, workgroup storage {}, \
             invocations/workgroup {}, storage buffers/stage {}, storage offset alignment {}",
            bytes(l.max_storage_buffer_binding_size),
            bytes(l.max_buffer_size),
            bytes(l.max_compute_workgroup_storage_size as u64),
            l.max_compute_invocations_per_workgroup,
            l.max_storage_buffers_per_shader_stage,
            l.min_storage_buffer_offset_alignment
        );
        if i == chosen {
            println!(
                "      kiln would use this adapter with --features {request}: {}",
                o.restrict(request)
            );
        }
    }
    Ok(())
}

fn inspect(path: &Path) -> Result<()> {
    use std::fmt::Write as _;
    let mut o = String::new();
    let g = Gguf::open(path)?;
    outln!(
        o,
        "{}: GGUF v{}, {} bytes, alignment {}",
        path.display(),
        g.version,
        g.file_size(),
        g.alignment
    );
    outln!(o, "\nmetadata ({} keys)", g.metadata.len());
    let kw = g.metadata.keys().map(|k| k.len()).max().unwrap_or(0);
    for (k, v) in &g.metadata {
        outln!(o, "  {k:<kw$}  {:<6}  {v}", v.type_name());
    }
    outln!(o, "\ntensors ({})", g.tensors.len());
    let nw = g.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    outln!(
        o,
        "  {:<nw$}  {:<7}  {:<22}  {:>12}",
        "name",
        "dtype",
        "shape (ggml)",
        "bytes"
    );
    let mut total = 0u64;
    for t in &g.tensors {
        let shape = format!("{:?}", t.dims);
        outln!(
            o,
            "  {:<nw$}  {:<7}  {:<22}  {:>12}",
            t.name,
            t.dtype.to_string(),
            shape,
            t.size
        );
        total += t.size;
    }
    let params: u64 = g.tensors.iter().map(|t| t.n_elements()).sum();
    outln!(
        o,
        "\n  {} parameters, {} bytes of tensor data",
        params,
        total
    );
    // A closed pipe (`kiln inspect M | head`) is not an error.
    let _ = std::io::stdout().write_all(o.as_bytes());
    Ok(())
}

/// The plan options of a `--try`: knob pins, where an item `splits=N`
/// sets every decode attention's split count, `qlast=1`
/// [`kiln::plan::FuseOptions::qout_last`] and `qevery=1`
/// [`kiln::plan::FuseOptions::quantize_every_dtype`] instead
/// (`matmul_vec.WG=256,splits=4`).
fn try_options(m: &ModelArgs, spec: &str) -> Result<kiln::plan::FuseOptions> {
    let mut opts = m.fusion()?;
    let mut pins = Vec::new();
    let number = |n: &str, what: &str| {
        n.parse::<usize>()
            .map_err(|_| Error::Input(format!("--try {spec}: {n} is not a number of {what}")))
    };
    let flag = |v: &str, what: &str| match v {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(Error::Input(format!("--try {spec}: {what} is 0 or 1"))),
    };
    for item in spec.split(',') {
        let item = item.trim();
        if let Some(v) = item.strip_prefix("qlast=") {
            opts.qout_last = Some(flag(v, "qlast")?);
        } else if let Some(v) = item.strip_prefix("qevery=") {
            opts.quantize_every_dtype = flag(v, "qevery")?;
        } else if let Some(n) = item.strip_prefix("splits=") {
            let n = number(n, "splits")?;
            if !n.is_power_of_two() || n > 32 {
                return Err(Error::Input(format!(
                    "--try {spec}: splits must be 1, 2, 4, 8, 16 or 32"
                )));
            }
            opts.splits = Some(n);
        } else {
            pins.push(item);
        }
    }
    if !pins.is_empty() {
        let pins = pins.join(",");
        kiln::plan::check_pins(&pins)?;
        opts.knob_pins = Some(pins);
    }
    Ok(opts)
}

fn bench(
    m: &ModelArgs,
    gpu: &GpuArgs,
    decode: usize,
    [prefill, decode_after]: [usize; 2],
    stream: Option<&Path>,
    (tries, rounds): (&[String], usize),
) -> Result<()> {
    use std::time::Instant;
    // Refused before the roof and the model load, not at planning.
    for pins in tries {
        try_options(m, pins)?;
    }
    let (gguf, bound) = bind(m)?;
    let ctx = GpuContext::new(&gpu.options()?)?;
    let (roof_bytes, roof) = kiln::exec::bench::read_roof(&ctx, 5)?;
    let chain = [(1u32, true), (1024, true), (1024, false)]
        .map(|(g, dep)| kiln::exec::bench::dispatch_cost(&ctx, g, 3, dep));
    let n_ctx = decode_after
        .checked_add(decode)
        .map(|n| n.max(prefill).saturating_add(2))
        .ok_or_else(|| Error::Input("--decode-after plus --decode is too large".into()))?;
    let mut b = match stream {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
            let plans = kiln::plan::stream::from_json(&bound, &text)?;
            eprintln!("replaying the stream {}", p.display());
            GpuBackend::with_plans(&ctx, &bound, &gguf, n_ctx, false, plans)?
        }
        None => GpuBackend::with_fusion(&ctx, &bound, &gguf, n_ctx, false, &m.fusion()?)?,
    };
    let ids = prompt_ids(prefill.max(decode_after), bound.vocab);
    // Prefill: one warm-up, then timed.
    b.forward(&ids[..prefill], true)?;
    b.reset();
    let t = Instant::now();
    let logits = b.forward(&ids[..prefill], true)?;
    let prefill_s = t.elapsed().as_secs_f64();
    // Decode: greedy steps after a --decode-after prompt, as `kiln run` decodes
    // (the argmax runs on the GPU, each step reads back one token id and
    // the next step is queued before it is read).
    let (decode_s, next) = time_decode(&mut b, &ids[..decode_after], decode)?;
    let times = b.take_step_times();
    // The roof once more, with the GPU's clocks up from the timing: one
    // measurement alone came out 10-15% low now and then on the H200. With
    // the model loaded its 1 GiB buffer may not fit: then the first stands.
    let roof = match kiln::exec::bench::read_roof(&ctx, 3) {
        Ok((_, again)) => roof.max(again),
        Err(e) => {
            eprintln!("kiln bench: the read roof is measured once only ({e})");
            roof
        }
    };
    let _ = logits;
    let weight_bytes: u64 = bound
        .weights
        .iter()
        .filter_map(|w| gguf.tensor(&w.name))
        .map(|t| t.size)
        .sum();
    let per_tok = decode_s / decode.max(1) as f64;
    println!(
        "adapter            {} ({:?})",
        ctx.adapter_info.name, ctx.features
    );
    println!(
        "read roof          {:.1} GB/s (vec4<f32> sum over {} MiB; best before and after the timing)",
        roof / 1e9,
        roof_bytes >> 20
    );
    println!("weights            {:.1} MB", weight_bytes as f64 / 1e6);
    println!(
        "decode             {:.1} tok/s ({:.3} ms/token, {} steps after a {}-token prompt)",
        1.0 / per_tok,
        per_tok * 1e3,
        decode,
        decode_after
    );
    println!(
        "decode floor       {:.3} ms/token (weights / roof)",
        weight_bytes as f64 / roof * 1e3
    );
    println!(
        "achieved           {:.1} GB/s of weights per token ({:.1}% of roof)",
        weight_bytes as f64 / per_tok / 1e9,
        weight_bytes as f64 / per_tok / roof * 100.0
    );
    println!(
        "prefill            {:.1} tok/s ({} tokens in {:.3} s)",
        prefill as f64 / prefill_s,
        prefill,
        prefill_s
    );
    let [d, p] = b.plans();
    println!(
        "dispatches/step    decode {} (+1 greedy argmax), prefill {}",
        d.dispatches(),
        p.dispatches()
    );
    // The other roof: what a step's chain of dependent dispatches costs
    // even when the kernels do nothing, beside the same dispatches without
    // a barrier between them (the barrier's share).
    if let [Ok(one), Ok(wide), Ok(free)] = chain {
        println!(
            "dispatch cost      {:.2} µs (1 workgroup), {:.2} µs (1024 workgroups) per dependent dispatch ({:.2} µs without the barrier); decode step chain {:.3} ms",
            one * 1e6,
            wide * 1e6,
            free * 1e6,
            (d.dispatches() + 1) as f64 * wide * 1e3
        );
    }
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / times.steps.max(1) as f64;
    println!(
        "decode step host   encode (+ early chunks submitted) {:.0} µs + submit last {:.0} µs + wait for GPU and read back {:.0} µs",
        us(times.encode),
        us(times.submit),
        us(times.wait)
    );
    // Where a decode step's GPU time goes, by kernel (timestamps).
    if ctx.features.timestamps {
        let prof = b.profile_decode_step(next)?;
        let total: f64 = prof.iter().map(|p| p.1).sum();
        let mut by: Vec<(String, f64, usize, u64)> = Vec::new();
        for (name, us, bytes) in prof {
            // Group layers' copies of one variant: drop the fusion hash.
            let key = match name.rfind('-') {
                Some(i) if name.contains(".fused-") => name[..i].to_string(),
                _ => name,
            };
            match by.iter_mut().find(|e| e.0 == key) {
                Some(e) => {
                    e.1 += us;
                    e.2 += 1;
                    e.3 += bytes
                }
                None => by.push((key, us, 1, bytes)),
            }
        }
        by.sort_by(|a, b| b.1.total_cmp(&a.1));
        let how = if ctx.timestamps_in_passes {
            "timestamps between the dispatches, barriers included"
        } else {
            "timestamps, one pass each"
        };
        println!("decode step GPU    {total:.0} µs in dispatches ({how}; GB/s of the weights each kernel reads):");
        for (name, us, n, bytes) in by.iter().take(10) {
            let rate = if *bytes > 0 && *us > 0.0 {
                format!("{:6.0} GB/s", *bytes as f64 / us / 1e3)
            } else {
                " ".repeat(11)
            };
            println!("  {us:8.0} µs  {n:4}x  {rate}  {name}");
        }
    }
    let mem = b.memory();
    println!(
        "GPU memory         {:.1} MB = weights {:.1} + KV cache {:.1} ({} positions) + arena {:.1} (decode {:.3} + prefill {:.1}; naive sum {:.1}, lower bound {:.1})",
        mem.total() as f64 / 1e6,
        mem.weights as f64 / 1e6,
        mem.kv as f64 / 1e6,
        n_ctx,
        (mem.arena[0] + mem.arena[1]) as f64 / 1e6,
        mem.arena[0] as f64 / 1e6,
        mem.arena[1] as f64 / 1e6,
        (mem.naive[0] + mem.naive[1]) as f64 / 1e6,
        (mem.lower[0] + mem.lower[1]) as f64 / 1e6,
    );
    if tries.is_empty() {
        return Ok(());
    }
    // The variants beside the default, timed in turns so that a drift of
    // the GPU's clocks reaches all alike.
    let mut variants = vec![(String::from("(default)"), b)];
    for pins in tries {
        let opts = try_options(m, pins)?;
        let v = GpuBackend::with_fusion(&ctx, &bound, &gguf, n_ctx, false, &opts)?;
        variants.push((pins.clone(), v));
    }
    let mut rates = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (v, r) in variants.iter_mut().zip(&mut rates) {
            let (s, _) = time_decode(&mut v.1, &ids[..decode_after], decode)?;
            r.push(decode as f64 / s);
        }
    }
    println!(
        "decode with --try  tok/s in {rounds} interleaved rounds of {decode} steps; best, % of roof, dispatches/step, decode kernel variants not in the default's:"
    );
    let default = decode_variants(&variants[0].1);
    for ((name, v), r) in variants.iter().zip(&rates) {
        let best = r.iter().cloned().fold(0.0, f64::max);
        let each: Vec<String> = r.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "  {:<40} {}  best {best:.1}  {:.1}%  {}  {} new",
            name,
            each.join(" "),
            weight_bytes as f64 * best / roof * 100.0,
            v.plans()[0].dispatches(),
            decode_variants(v).difference(&default).count()
        );
    }
    Ok(())
}

/// `kiln tune`: coordinate descent over the tuning knobs (WG, ROWS) of
/// each kernel role of the decode plan, largest role first (by the weight
/// bytes its kernels read, then plan order). Each candidate is planned and
/// loaded beside the best so far (two copies of the weights at most) and
/// both decodes are timed in turns; a candidate that plans no new kernel
/// or that the template cannot run is skipped.
fn tune(
    m: &ModelArgs,
    gpu: &GpuArgs,
    decode: usize,
    rounds: usize,
    margin: f64,
    out: Option<&Path>,
) -> Result<()> {
    if !(margin.is_finite() && margin >= 0.0) {
        return Err(Error::Input(format!(
            "--margin {margin}: give a percentage of 0 or more"
        )));
    }
    let start = kiln::plan::resolve_pins(None)?.unwrap_or_default();
    let (gguf, bound) = bind(m)?;
    let ctx = GpuContext::new(&gpu.options()?)?;
    let n_ctx = decode + 16;
    let prompt = prompt_ids(8, bound.vocab);
    let load = |pins: &str| {
        let opts = kiln::plan::FuseOptions {
            knob_pins: Some(pins.to_string()),
            ..m.fusion()?
        };
        GpuBackend::with_fusion(&ctx, &bound, &gguf, n_ctx, false, &opts)
    };
    // Best-of-rounds tok/s of a and b, timed in turns.
    let race = |a: &mut GpuBackend, b: &mut GpuBackend| -> Result<(f64, f64)> {
        let (mut ra, mut rb) = (0.0f64, 0.0f64);
        for _ in 0..rounds {
            ra = ra.max(decode as f64 / time_decode(a, &prompt, decode)?.0);
            rb = rb.max(decode as f64 / time_decode(b, &prompt, decode)?.0);
        }
        Ok((ra, rb))
    };
    let mut pins = start.clone();
    let mut best = load(&pins)?;
    // The roles, largest first: (template, role, weight bytes its kernels read).
    let plan = best.plans()[0];
    let templates = kiln::codegen::templates().map_err(|e| Error::Gpu(e.to_string()))?;
    let mut roles: Vec<(String, String, u64)> = Vec::new();
    for l in &plan.launches {
        let kiln::plan::Launch::Kernel { kernel, binds, .. } = l else {
            continue;
        };
        let k = &plan.kernels[*kernel];
        if k.fused.is_empty() {
            continue;
        }
        let bytes = plan.weight_bytes(binds);
        match roles
            .iter_mut()
            .find(|r| r.0 == k.template && r.1 == k.fused)
        {
            Some(r) => r.2 += bytes,
            None => roles.push((k.template.clone(), k.fused.clone(), bytes)),
        }
    }
    roles.sort_by_key(|r| std::cmp::Reverse(r.2));
    println!(
        "tuning {} kernel roles of the decode plan on {} ({} decode steps, best of {rounds} rounds, keep at +{margin}%)",
        roles.len(),
        ctx.adapter_info.name,
        decode
    );
    for (template, role, _) in &roles {
        let Some(t) = templates.iter().find(|t| &t.name == template) else {
            continue;
        };
        for knob in kiln::plan::TUNING_KNOBS {
            let Some(values) = t.knobs.iter().find(|k| k.name == knob).map(|k| &k.values) else {
                continue;
            };
            for v in values {
                let scope = format!("{template}@{role}.{knob}=");
                let pin = format!("{scope}{v}");
                // The pins so far without this role's earlier value of the knob.
                let cand_pins = pins
                    .split(',')
                    .filter(|p| !p.is_empty() && !p.trim().starts_with(&scope))
                    .chain([pin.as_str()])
                    .collect::<Vec<_>>()
                    .join(",");
                let mut cand = match load(&cand_pins) {
                    Ok(c) => c,
                    // Said, not swallowed: mostly no variant of the template
                    // with this value here, but it could be the GPU's memory.
                    Err(e) => {
                        println!("  {pin:<60} skipped: {e}");
                        continue;
                    }
                };
                if decode_variants(&cand) == decode_variants(&best) {
                    continue;
                }
                let (rb, rc) = race(&mut best, &mut cand)?;
                let gain = (rc / rb - 1.0) * 100.0;
                let keep = gain > margin;
                println!(
                    "  {pin:<60} {rc:8.1} tok/s against {rb:8.1} ({gain:+.1}%){}",
                    if keep { "  kept" } else { "" }
                );
                if keep {
                    pins = cand_pins;
                    best = cand;
                }
            }
        }
    }
    // The start and the result once more, in turns.
    let mut base = load(&start)?;
    let (r0, r1) = race(&mut base, &mut best)?;
    println!(
        "decode {r0:.1} tok/s with the starting pins ({}), {r1:.1} tuned ({:+.1}%)",
        if start.is_empty() { "none" } else { &start },
        (r1 / r0 - 1.0) * 100.0
    );
    println!("tuned pins: KILN_KNOBS={pins}");
    if let Some(p) = out {
        std::fs::write(p, format!("{pins}\n"))
            .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `n` deterministic pseudo-random token ids below `vocab`: a benchmark's
/// prompt.
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i.wrapping_mul(2654435761) >> 7) % vocab as u64) as u32)
        .collect()
}

/// The kernel variants (template and knobs) of `b`'s decode plan.
fn decode_variants(b: &GpuBackend) -> std::collections::BTreeSet<String> {
    b.plans()[0]
        .kernels
        .iter()
        .map(|k| format!("{}{:?}", k.template, k.knobs))
        .collect()
}

/// Greedy decode of `decode` steps after `prompt` (and one warm-up step of
/// the decode bucket), as `kiln run` decodes: the argmax runs on the GPU,
/// each step reads back one token id and the next is queued before it is
/// read. Returns the seconds the timed steps took and the last token.
fn time_decode(b: &mut GpuBackend, prompt: &[u32], decode: usize) -> Result<(f64, u32)> {
    use std::time::Instant;
    b.reset();
    let mut next = b.forward_greedy(prompt)?;
    next = b.forward_greedy(&[next])?; // warm-up of the decode bucket
    b.take_step_times();
    let t = Instant::now();
    b.decode_greedy(next, decode, &mut |t| {
        next = t;
        Ok(true)
    })?;
    Ok((t.elapsed().as_secs_f64(), next))
}

fn synth(
    like: Option<PathBuf>,
    spec_out: Option<PathBuf>,
    spec: Option<PathBuf>,
    out: Option<PathBuf>,
    mix: &str,
    seed: u64,
) -> Result<()> {
    use kiln::model::synth;
    let io = |p: &Path, e: std::io::Error| Error::Input(format!("{}: {e}", p.display()));
    if spec_out.is_none() && out.is_none() {
        return Err(Error::Input("give --spec-out and/or --out".into()));
    }
    let s: synth::Spec = match (&like, &spec) {
        (Some(l), _) => synth::spec_of(&Gguf::open(l)?),
        (None, Some(p)) => {
            let text = std::fs::read_to_string(p).map_err(|e| io(p, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::Input(format!("{}: not a synth spec: {e}", p.display())))?
        }
        (None, None) => return Err(Error::Input("give --like M.gguf or --spec S.json".into())),
    };
    let s = s.with_mix(mix)?;
    if let Some(p) = &spec_out {
        let text = serde_json::to_string_pretty(&s).map_err(|e| Error::Input(e.to_string()))?;
        std::fs::write(p, text).map_err(|e| io(p, e))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &out {
        let t = std::time::Instant::now();
        let file = std::fs::File::create(p).map_err(|e| io(p, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let bytes = synth::write_to(&s, seed, &mut w).inspect_err(|_| {
            let _ = std::fs::remove_file(p);
        })?;
        eprintln!(
            "wrote {} ({} bytes, {} tensors, mix {mix}) in {:.1} s",
            p.display(),
            bytes,
            s.tensors.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
