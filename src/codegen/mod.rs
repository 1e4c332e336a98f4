//! Template instantiation: a kernel template from kernels/ plus knob values
//! becomes WGSL text, validated with naga before wgpu ever sees it.
//!
//! A template is WGSL with a header and a tiny preprocessor:
//! - `//! kiln template: NAME` names it; other `//!` lines document it;
//! - `//! knob NAME: v1 v2 ...` declares a knob and its candidate values;
//!   the knobs `SUBGROUPS` and `F16` (value 1) need the adapter features of
//!   the same name, and `WG` (the workgroup size) must fit the adapter;
//! - `//! wg_storage: EXPR` gives the workgroup memory a variant uses, in
//!   bytes, as an expression over the knobs;
//! - `{{NAME}}` is replaced by the knob's value;
//! - lines `#if EXPR`, `#elif EXPR`, `#else`, `#endif` keep or drop the lines between them
//!   (EXPR is a graph expression over the knobs, see [`crate::graph::expr`];
//!   string knobs compare as `DTYPE == 'Q4_K'`);
//! - a line `#include FILE` splices kernels/lib/FILE (shared WGSL such as
//!   dequantization), preprocessed with the same knobs;
//!   `#include FILE as SFX KNOB=OTHER` splices it again under other names:
//!   every name the file defines at top level (and every name listed on a
//!   `// kiln lib needs: a b` line in it) gets the suffix SFX, and inside it
//!   KNOB takes the value of the knob OTHER (one kernel dequantizing two
//!   weight dtypes includes dequant.wgsl twice);
//! - lines `#hook NAME` .. `#endhook` are a fusion hook: the plan may
//!   replace the lines between with generated WGSL (bindings, prologue,
//!   epilogue; see [`Template::generate_hooked`]); without it they stay;
//! - `//! require: EXPR` keeps only the knob assignments where EXPR holds;
//! - `//! cover: A B` marks knobs whose values are covered one at a time
//!   (each value with the other knobs at their first) rather than
//!   multiplied out, in [`Template::variants`]; plans always pin them.
//!
//! A knob value the adapter or the forced feature set cannot run is never
//! generated ([`Template::variants`]).

use std::collections::BTreeMap;
use std::fmt;

use crate::graph::expr::{self, Env, Value};

/// What the adapter (or the forced feature set) allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// shader-f16 is enabled.
    pub f16: bool,
    /// Subgroup operations are enabled.
    pub subgroups: bool,
    /// max_compute_invocations_per_workgroup.
    pub max_invocations: u32,
    /// max_compute_workgroup_storage_size in bytes.
    pub max_wg_storage: u32,
}

impl Caps {
    /// The four feature sets kiln tests, on an adapter with these limits.
    pub fn feature_sets(max_invocations: u32, max_wg_storage: u32) -> [Caps; 4] {
        let c = |f16, subgroups| Caps {
            f16,
            subgroups,
            max_invocations,
            max_wg_storage,
        };
        [
            c(false, false),
            c(true, false),
            c(false, true),
            c(true, true),
        ]
    }
}

/// A codegen error, naming the template, knobs and line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("kernel template {template} [{knobs}]: {msg}")]
pub struct CodegenError {
    /// Template name.
    pub template: String,
    /// Knob values, as `A=1 B=2`.
    pub knobs: String,
    /// What went wrong (with the generated line for naga errors).
    pub msg: String,
}

/// A knob: name and candidate values.
#[derive(Debug, Clone)]
pub struct Knob {
    /// Name, used as `{{NAME}}` and in `#if`.
    pub name: String,
    /// Candidate values.
    pub values: Vec<String>,
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    /// Name (`//! kiln template: NAME`).
    pub name: String,
    /// What it computes (the other `//!` lines).
    pub doc: String,
    /// Declared knobs.
    pub knobs: Vec<Knob>,
    /// Knobs enumerated one value at a time (`//! cover:`).
    pub cover: Vec<String>,
    require: Option<String>,
    wg_storage: Option<String>,
    body: String,
}

/// Knob values chosen for one variant.
pub type Knobs = BTreeMap<String, String>;

/// Formats knobs as `A=1 B=2`.
pub fn knobs_str(k: &Knobs) -> String {
    k.iter()
        .map(|(a, b)| format!("{a}={b}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A short variant name: `rms_norm.wg128.subgroups1`.
pub fn variant_name(template: &str, k: &Knobs) -> String {
    let mut s = template.to_string();
    for (a, b) in k {
        s.push_str(&format!(".{}{}", a.to_lowercase(), b));
    }
    s
}

/// Hook texts by name, spliced at `{{@NAME}}` lines.
pub type Hooks = BTreeMap<String, String>;

/// Suffix every name `text` defines at top level (`fn`, `const`, `struct`,
/// `var`, `alias` at the start of a line) and every name on a
/// `// kiln lib needs:` line, wherever it occurs as a whole word.
fn rename_defs(text: &str, sfx: &str) -> String {
    let mut names: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("// kiln lib needs:") {
            names.extend(n.split_whitespace().map(String::from));
            continue;
        }
        let mut w =
            line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '<' || c == '>'));
        let kw = w.next().unwrap_or("");
        if matches!(kw, "fn" | "const" | "struct" | "alias" | "override") || kw.starts_with("var") {
            if let Some(name) = w.find(|x| !x.is_empty()) {
                names.push(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(text.len() + 64);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(word);
        if names.iter().any(|n| n == word) {
            out.push_str(sfx);
        }
        word.clear();
    };
    let mut in_comment = false;
    let mut prev = ' ';
    for c in text.chars() {
        if c == '\n' {
            in_comment = false;
        } else if c == '/' && prev == '/' {
            in_comment = true;
        }
        if !in_comment && (c.is_alphanumeric() || c == '_') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
        prev = c;
    }
    flush(&mut word, &mut out);
    out
}

struct KnobEnv<'a>(&'a Knobs);

impl Env for KnobEnv<'_> {
    fn var(&self, name: &str) -> Option<Value> {
        self.0.get(name).map(|v| match v.parse::<f64>() {
            Ok(n) => Value::Num(n),
            Err(_) => Value::Str(v.clone()),
        })
    }
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
    fn meta(&self, _: &str) -> Result<Option<Value>, String> {
        Err("templates cannot read model metadata".into())
    }
    fn has_weight(&self, _: &str) -> bool {
        false
    }
}

/// The templates compiled into kiln, from kernels/.
/// Add new templates here (one line each).
pub const SOURCES: &[(&str, &str)] = &[
    ("rms_norm.wgsl", include_str!("../../kernels/rms_norm.wgsl")),
    (
        "layer_norm.wgsl",
        include_str!("../../kernels/layer_norm.wgsl"),
    ),
    (
        "matmul_vec.wgsl",
        include_str!("../../kernels/matmul_vec.wgsl"),
    ),
    (
        "quantize_rows.wgsl",
        include_str!("../../kernels/quantize_rows.wgsl"),
    ),
    (
        "matmul_tiled.wgsl",
        include_str!("../../kernels/matmul_tiled.wgsl"),
    ),
    ("embed.wgsl", include_str!("../../kernels/embed.wgsl")),
    ("rope.wgsl", include_str!("../../kernels/rope.wgsl")),
    (
        "attention.wgsl",
        include_str!("../../kernels/attention.wgsl"),
    ),
    (
        "attention_merge.wgsl",
        include_str!("../../kernels/attention_merge.wgsl"),
    ),
    ("unary.wgsl", include_str!("../../kernels/unary.wgsl")),
    ("binary.wgsl", include_str!("../../kernels/binary.wgsl")),
    ("softmax.wgsl", include_str!("../../kernels/softmax.wgsl")),
    ("argmax.wgsl", include_str!("../../kernels/argmax.wgsl")),
    (
        "copy_strided.wgsl",
        include_str!("../../kernels/copy_strided.wgsl"),
    ),
];

/// Shared WGSL that templates `#include`, from kernels/lib/.
pub const LIBS: &[(&str, &str)] = &[
    (
        "dequant.wgsl",
        include_str!("../../kernels/lib/dequant.wgsl"),
    ),
    (
        "matvec_rows.wgsl",
        include_str!("../../kernels/lib/matvec_rows.wgsl"),
    ),
    ("act.wgsl", include_str!("../../kernels/lib/act.wgsl")),
    ("merge.wgsl", include_str!("../../kernels/lib/merge.wgsl")),
    ("q8.wgsl", include_str!("../../kernels/lib/q8.wgsl")),
    (
        "rope_angle.wgsl",
        include_str!("../../kernels/lib/rope_angle.wgsl"),
    ),
];

/// A fingerprint of every template and lib compiled into kiln (FNV-1a
/// over names and texts, 16 hex digits): a recorded stream names the
/// kernels it was planned with by it.
pub fn sources_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in SOURCES.iter().chain(LIBS) {
        for b in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// All built-in templates.
pub fn templates() -> Result<Vec<Template>, CodegenError> {
    SOURCES.iter().map(|(f, s)| Template::parse(f, s)).collect()
}

/// A built-in template by name.
pub fn template(name: &str) -> Result<Template, CodegenError> {
    templates()?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| CodegenError {
            template: name.into(),
            knobs: String::new(),
            msg: "no such template in kernels/".into(),
        })
}

impl Template {
    /// Parse a template; `file` names it in errors.
    pub fn parse(file: &str, src: &str) -> Result<Template, CodegenError> {
        let err = |msg: String| CodegenError {
            template: file.into(),
            knobs: String::new(),
            msg,
        };
        let mut name = None;
        let mut doc = Vec::new();
        let mut knobs = Vec::new();
        let mut wg_storage = None;
        let mut cover = Vec::new();
        let mut require = None;
        let mut body = String::new();
        for line in src.lines() {
            if let Some(h) = line.strip_prefix("//!") {
                let h = h.trim();
                if let Some(n) = h.strip_prefix("kiln template:") {
                    name = Some(n.trim().to_string());
                } else if let Some(k) = h.strip_prefix("knob ") {
                    let (kn, vals) = k
                        .split_once(':')
                        .ok_or_else(|| err(format!("bad knob line '{line}' (knob NAME: v1 v2)")))?;
                    let values: Vec<String> = vals.split_whitespace().map(String::from).collect();
                    if values.is_empty() {
                        return Err(err(format!("knob {kn} has no values")));
                    }
                    knobs.push(Knob {
                        name: kn.trim().to_string(),
                        values,
                    });
                } else if let Some(e) = h.strip_prefix("wg_storage:") {
                    wg_storage = Some(e.trim().to_string());
                } else if let Some(e) = h.strip_prefix("require:") {
                    require = Some(e.trim().to_string());
                } else if let Some(c) = h.strip_prefix("cover:") {
                    cover.extend(c.split_whitespace().map(String::from));
                } else {
                    doc.push(h.to_string());
                }
            } else {
                body.push_str(line);
                body.push('\n');
            }
        }
        let name = name.ok_or_else(|| err("missing '//! kiln template: NAME'".into()))?;
        if let Some(c) = cover.iter().find(|c| !knobs.iter().any(|k| &k.name == *c)) {
            return Err(err(format!("cover names {c}, which is not a knob")));
        }
        Ok(Template {
            name,
            doc: doc.join("\n"),
            knobs,
            cover,
            require,
            wg_storage,
            body,
        })
    }

    fn fail(&self, k: &Knobs, msg: String) -> CodegenError {
        CodegenError {
            template: self.name.clone(),
            knobs: knobs_str(k),
            msg,
        }
    }

    /// Whether `caps` can run this knob assignment.
    pub fn legal(&self, k: &Knobs, caps: &Caps) -> Result<bool, CodegenError> {
        let on = |n: &str| k.get(n).is_some_and(|v| v != "0");
        if on("SUBGROUPS") && !caps.subgroups || on("F16") && !caps.f16 {
            return Ok(false);
        }
        if let Some(wg) = k.get("WG") {
            let wg: u32 = wg
                .parse()
                .map_err(|_| self.fail(k, format!("WG must be a number, found {wg}")))?;
            if wg > caps.max_invocations {
                return Ok(false);
            }
        }
        if let Some(e) = &self.require {
            match expr::parse(e).and_then(|p| p.eval(&KnobEnv(k))) {
                Ok(Value::Num(0.0)) => return Ok(false),
                Ok(_) => {}
                Err(x) => return Err(self.fail(k, format!("require \"{e}\": {}", x.msg))),
            }
        }
        if let Some(e) = &self.wg_storage {
            let bytes = match expr::parse(e).and_then(|p| p.eval(&KnobEnv(k))) {
                Ok(Value::Num(n)) => n,
                Ok(v) => return Err(self.fail(k, format!("wg_storage gives {v}"))),
                Err(x) => return Err(self.fail(k, format!("wg_storage \"{e}\": {}", x.msg))),
            };
            if bytes > caps.max_wg_storage as f64 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Every knob assignment `caps` can run: the product of the knobs'
    /// values, except that `//! cover:` knobs take each of their other
    /// values once, with every knob but SUBGROUPS and F16 at its first.
    pub fn variants(&self, caps: &Caps) -> Result<Vec<Knobs>, CodegenError> {
        let mut out = Vec::new();
        let first = |c: &String| {
            self.knobs
                .iter()
                .find(|k| &k.name == c)
                .map(|k| (c.clone(), k.values[0].clone()))
        };
        let base: Knobs = self.cover.iter().filter_map(first).collect();
        let mut pins = vec![base.clone()];
        for c in &self.cover {
            let Some(knob) = self.knobs.iter().find(|k| &k.name == c) else {
                continue;
            };
            for v in &knob.values[1..] {
                // The other knobs at their first value too, except the
                // feature knobs, so each cover value meets every feature set.
                let mut p = base.clone();
                for other in &self.knobs {
                    if !matches!(other.name.as_str(), "SUBGROUPS" | "F16") {
                        p.insert(other.name.clone(), other.values[0].clone());
                    }
                }
                p.insert(c.clone(), v.clone());
                pins.push(p);
            }
        }
        for p in pins {
            for k in self.variants_pinned(&p, caps)? {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        Ok(out)
    }

    /// Every assignment `caps` can run with the knobs in `fixed` pinned; cover
    /// knobs not in `fixed` take their first value.
    pub fn variants_pinned(&self, fixed: &Knobs, caps: &Caps) -> Result<Vec<Knobs>, CodegenError> {
        let mut all = vec![Knobs::new()];
        for knob in &self.knobs {
            let values: Vec<String> = match fixed.get(&knob.name) {
                Some(v) => vec![v.clone()],
                None if self.cover.contains(&knob.name) => vec![knob.values[0].clone()],
                None => knob.values.clone(),
            };
            all = all
                .into_iter()
                .flat_map(|k| {
                    values.iter().map(move |v| {
                        let mut k = k.clone();
                        k.insert(knob.name.clone(), v.clone());
                        k
                    })
                })
                .collect();
        }
        let mut out = Vec::new();
        for k in all {
            if self.legal(&k, caps)? {
                out.push(k);
            }
        }
        Ok(out)
    }

    /// Instantiate with knob values (hooks keep their default text): WGSL
    /// text with a header comment.
    pub fn generate(&self, k: &Knobs) -> Result<String, CodegenError> {
        self.generate_hooked(k, &Hooks::new())
    }

    /// Instantiate with knob values and hook texts: each replaces the lines
    /// of its `#hook NAME` block and is preprocessed with the body.
    pub fn generate_hooked(&self, k: &Knobs, hooks: &Hooks) -> Result<String, CodegenError> {
        for knob in &self.knobs {
            if !k.contains_key(&knob.name) {
                return Err(self.fail(k, format!("knob {} has no value", knob.name)));
            }
        }
        let mut out = format!(
            "// kiln kernel {} — generated from kernels/{}.wgsl\n// knobs: {}\n",
            variant_name(&self.name, k),
            self.name,
            knobs_str(k)
        );
        for d in self.doc.lines() {
            out.push_str(&format!("// {d}\n"));
        }
        // Replace hook blocks the plan gives text for.
        let mut src = String::new();
        let mut skipping = false;
        for line in self.body.lines() {
            let t = line.trim();
            if let Some(h) = t.strip_prefix("#hook ") {
                if let Some(text) = hooks.get(h.trim()) {
                    src.push_str(text);
                    if !text.ends_with('\n') {
                        src.push('\n');
                    }
                    skipping = true;
                }
            } else if t.starts_with("#endhook") {
                skipping = false;
            } else if !skipping {
                src.push_str(line);
                src.push('\n');
            }
        }
        if let Some(h) = hooks
            .keys()
            .find(|h| !self.body.contains(&format!("#hook {h}")))
        {
            return Err(self.fail(k, format!("the template has no hook {h}")));
        }
        self.expand(&src, k, &mut out, 0)?;
        Ok(out)
    }

    /// Preprocess `body` into `out`; `depth` bounds nested includes.
    fn expand(
        &self,
        body: &str,
        k: &Knobs,
        out: &mut String,
        depth: u32,
    ) -> Result<(), CodegenError> {
        // Stack of (this branch is kept, some branch was taken).
        let mut stack: Vec<(bool, bool)> = Vec::new();
        let kept = |s: &Vec<(bool, bool)>| s.iter().all(|e| e.0);
        // The value of an `#if` / `#elif` condition (line n, 0-based).
        let cond = |n: usize, dir: &str, c: &str| -> Result<bool, CodegenError> {
            expr::parse(c)
                .and_then(|p| p.eval(&KnobEnv(k)))
                .map(|v| v != Value::Num(0.0))
                .map_err(|e| self.fail(k, format!("body line {}: {dir} {c}: {}", n + 1, e.msg)))
        };
        for (n, line) in body.lines().enumerate() {
            let t = line.trim_start();
            if let Some(c) = t.strip_prefix("#if ") {
                let on = cond(n, "#if", c)?;
                stack.push((on, on));
            } else if let Some(c) = t.strip_prefix("#elif ") {
                let v = cond(n, "#elif", c)?;
                let top = stack.last_mut().ok_or_else(|| {
                    self.fail(k, format!("body line {}: #elif without #if", n + 1))
                })?;
                let on = !top.1 && v;
                *top = (on, top.1 || on);
            } else if t.starts_with("#else") {
                let top = stack.last_mut().ok_or_else(|| {
                    self.fail(k, format!("body line {}: #else without #if", n + 1))
                })?;
                *top = (!top.1, true);
            } else if t.starts_with("#endif") {
                stack.pop().ok_or_else(|| {
                    self.fail(k, format!("body line {}: #endif without #if", n + 1))
                })?;
            } else if let Some(spec) = t.strip_prefix("#include ") {
                if !kept(&stack) {
                    continue;
                }
                let mut words = spec.split_whitespace();
                let file = words.next().unwrap_or("");
                let lib = LIBS.iter().find(|l| l.0 == file).ok_or_else(|| {
                    self.fail(
                        k,
                        format!(
                            "body line {}: #include {file}: no such file in kernels/lib/",
                            n + 1
                        ),
                    )
                })?;
                if depth > 4 {
                    return Err(self.fail(k, format!("#include {file}: includes nest too deep")));
                }
                // `as SFX KNOB=OTHER ...`
                let mut suffix = None;
                let mut k2 = k.clone();
                while let Some(w) = words.next() {
                    if w == "as" {
                        suffix = words.next();
                    } else if let Some((a, b)) = w.split_once('=') {
                        let v = k.get(b).ok_or_else(|| {
                            self.fail(
                                k,
                                format!("body line {}: #include {file}: no knob {b}", n + 1),
                            )
                        })?;
                        k2.insert(a.to_string(), v.clone());
                    } else {
                        return Err(self.fail(
                            k,
                            format!("body line {}: #include {file}: expected `as SFX` or KNOB=OTHER, found {w}", n + 1),
                        ));
                    }
                }
                let mut text = String::new();
                self.expand(lib.1, &k2, &mut text, depth + 1)?;
                if let Some(sfx) = suffix {
                    text = rename_defs(&text, sfx);
                }
                out.push_str(&format!(
                    "// ---- kernels/lib/{file}{}\n",
                    suffix.map(|s| format!(" as {s}")).unwrap_or_default()
                ));
                out.push_str(&text);
                out.push_str(&format!("// ---- end of kernels/lib/{file}\n"));
            } else if t.starts_with("#hook ") || t.starts_with("#endhook") {
            } else if kept(&stack) {
                let mut l = line.to_string();
                for (a, b) in k {
                    l = l.replace(&format!("{{{{{a}}}}}"), b);
                }
                if let Some(i) = l.find("{{") {
                    return Err(self.fail(
                        k,
                        format!("body line {}: unknown placeholder {}", n + 1, &l[i..]),
                    ));
                }
                out.push_str(&l);
                out.push('\n');
            }
        }
        if !stack.is_empty() {
            return Err(self.fail(k, "#if without #endif".into()));
        }
        Ok(())
    }

    /// Generate and validate with naga.
    pub fn build(&self, k: &Knobs, caps: &Caps) -> Result<String, CodegenError> {
        let wgsl = self.generate(k)?;
        validate(&wgsl, caps).map_err(|msg| self.fail(k, msg))?;
        Ok(wgsl)
    }
}

/// Validate WGSL with naga under the capabilities `caps` enables; the error
/// quotes the offending generated line.
pub fn validate(wgsl: &str, caps: &Caps) -> Result<naga::Module, String> {
    use naga::valid::{
        Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator,
    };
    let module = naga::front::wgsl::parse_str(wgsl).map_err(|e| {
        let loc = e
            .location(wgsl)
            .map(|l| {
                format!(
                    "generated line {}: `{}`: ",
                    l.line_number,
                    wgsl.lines()
                        .nth(l.line_number as usize - 1)
                        .unwrap_or("")
                        .trim()
                )
            })
            .unwrap_or_default();
        format!("{loc}{}", e.emit_to_string(wgsl))
    })?;
    let mut cap = Capabilities::empty();
    if caps.f16 {
        cap |= Capabilities::SHADER_FLOAT16;
    }
    if caps.subgroups {
        cap |= Capabilities::SUBGROUP;
    }
    let mut v = Validator::new(ValidationFlags::all(), cap);
    if caps.subgroups {
        v.subgroup_stages(ShaderStages::COMPUTE);
        v.subgroup_operations(SubgroupOperationSet::all());
    }
    v.validate(&module).map_err(|e| e.emit_to_string(wgsl))?;
    Ok(module)
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)
    }
}
