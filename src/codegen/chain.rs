//! Dependent kernels as the stages of one dispatch.
//!
//! A decode step is a chain of kernels, each reading what the one before
//! wrote. As separate dispatches each pays a barrier and a launch, and its
//! first loads start only once the previous kernel's last workgroup is
//! done. [`chain`] joins the generated WGSL of several kernels with the
//! same workgroup size into one module:
//! - every module-scope name of stage i gets the prefix `s{i}_`, and its
//!   bindings move up by the bindings of the stages before it (so the
//!   chained bind group is the stages' bind groups one after another);
//! - each stage's entry point becomes a plain function that takes its
//!   builtins as arguments; it sees the workgroup id and count its own
//!   dispatch would have had;
//! - a new entry point gives every workgroup a ticket (an atomic counter, so
//!   tickets follow the order in which workgroups start, whatever order the
//!   GPU launches them in). Tickets below `end[0]` run stage 0, the next up
//!   to `end[1]` stage 1, and so on. A workgroup of stage i > 0 first waits
//!   until every workgroup of stage i - 1 has counted itself done, then
//!   runs, then counts itself done. A workgroup only ever waits on
//!   workgroups with smaller tickets, which have all started, so the chain
//!   cannot deadlock while started workgroups make progress (true of
//!   desktop GPUs and of lavapipe; WebGPU does not promise it).
//!   `storageBarrier` orders the stage's writes before its count and the
//!   next stage's reads after its wait (device-scope acquire/release in
//!   naga's SPIR-V, so Vulkan only: Metal's device barrier does not order
//!   memory between workgroups). The last workgroup of the last stage
//!   zeroes the counters for the next dispatch.
//!
//! Waiting on the counter of stage i - 1 alone is enough for any earlier
//! stage too: stage i - 1 started its work only once stage i - 2 was done.
//!
//! The uniform `chain_p.s[i]` holds stage i's workgroup grid (x, y, z) and
//! `end` (its tickets end there): the executor writes it per step, as a
//! dispatch's workgroup count may change with the position.

use std::collections::{BTreeSet, HashSet};

/// One stage: a kernel's generated WGSL and how many bindings its launch
/// binds (its bindings are 0 .. `bindings`).
#[derive(Debug, Clone, Copy)]
pub struct Stage<'a> {
    /// The kernel's WGSL (one compute entry point).
    pub wgsl: &'a str,
    /// Bindings the launch binds, the uniform parameters included.
    pub bindings: u32,
}

/// A chained kernel.
#[derive(Debug, Clone)]
pub struct Chained {
    /// The joined WGSL.
    pub wgsl: String,
    /// Binding of the counters (`array<atomic<u32>>`, stages + 1 words,
    /// zero before the first dispatch; the chain leaves them zero).
    pub sync_binding: u32,
    /// Binding of the stage grids (`array<vec4<u32>, stages>` uniform).
    pub params_binding: u32,
}

/// What a kernel needs from a chain: its workgroup size and workgroup
/// memory (bytes), from naga's reading of the WGSL.
pub fn stage_shape(module: &naga::Module) -> Result<([u32; 3], u32), String> {
    let ep = match module.entry_points.as_slice() {
        [ep] if ep.stage == naga::ShaderStage::Compute => ep,
        _ => return Err("a chain stage needs exactly one compute entry point".into()),
    };
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| format!("layout: {e}"))?;
    let bytes: u32 = module
        .global_variables
        .iter()
        .filter(|(_, v)| v.space == naga::AddressSpace::WorkGroup)
        .map(|(_, v)| layouter[v.ty].size.next_multiple_of(16))
        .sum();
    Ok((ep.workgroup_size, bytes))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    Ident,
    Number,
    Punct,
    Trivia,
}

/// WGSL split into tokens (comments and whitespace kept as trivia), as
/// byte ranges of `src`.
fn tokens(src: &str) -> Vec<(Tok, usize, usize)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let kind = if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            Tok::Trivia
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            Tok::Trivia
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            Tok::Trivia
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            Tok::Ident
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let hex = b[i..].starts_with(b"0x") || b[i..].starts_with(b"0X");
            while i < b.len() {
                let d = b[i];
                // An exponent's sign belongs to the number (1e-5, 0x1p+3).
                let sign = (d == b'+' || d == b'-')
                    && matches!(b[i - 1], b'e' | b'E' | b'p' | b'P')
                    && (!hex || matches!(b[i - 1], b'p' | b'P'));
                if !(d.is_ascii_alphanumeric() || d == b'_' || d == b'.' || sign) {
                    break;
                }
                i += 1;
            }
            Tok::Number
        } else {
            // One character (multi-byte UTF-8 only in comments).
            i += src[i..].chars().next().map_or(1, char::len_utf8);
            Tok::Punct
        };
        out.push((kind, start, i));
    }
    out
}

/// A stage's WGSL rewritten for a chain.
struct Rewritten {
    /// The module's declarations, renamed, the entry point a plain function.
    body: String,
    /// `enable`/`requires`/`diagnostic` directives it had.
    directives: Vec<String>,
    /// The entry function's parameters: (name, builtin).
    params: Vec<(String, String)>,
}

/// Rename stage `src`'s module-scope names with `prefix`, move its bindings
/// up by `base` and make its entry point a plain function.
fn rewrite(src: &str, prefix: &str, base: u32) -> Result<Rewritten, String> {
    let toks = tokens(src);
    let text = |j: usize| &src[toks[j].1..toks[j].2];
    // Indices of the significant tokens.
    let sig: Vec<usize> = (0..toks.len())
        .filter(|&j| toks[j].0 != Tok::Trivia)
        .collect();
    // Module-scope names, and which significant tokens sit in a struct body.
    let mut names = HashSet::new();
    let mut in_struct = vec![false; sig.len()];
    let mut depth = 0i32;
    let mut struct_depth: Option<i32> = None;
    let mut pending_struct = false;
    for (s, &j) in sig.iter().enumerate() {
        let t = text(j);
        in_struct[s] = struct_depth.is_some();
        match t {
            "{" => {
                depth += 1;
                if pending_struct {
                    struct_depth = Some(depth);
                    pending_struct = false;
                }
            }
            "}" => {
                if struct_depth == Some(depth) {
                    struct_depth = None;
                }
                depth -= 1;
            }
            _ => {}
        }
        if depth != 0 || toks[j].0 != Tok::Ident {
            continue;
        }
        let decl = match t {
            "fn" | "struct" | "alias" | "const" | "override" => sig.get(s + 1),
            "var" => {
                // var<space, access> name
                let mut k = s + 1;
                if sig.get(k).map(|&j| text(j)) == Some("<") {
                    while k < sig.len() && text(sig[k]) != ">" {
                        k += 1;
                    }
                    k += 1;
                }
                sig.get(k)
            }
            _ => None,
        };
        if t == "struct" {
            pending_struct = true;
        }
        if let Some(&d) = decl {
            if toks[d].0 == Tok::Ident {
                names.insert(text(d).to_string());
            }
        }
    }
    // The entry point: `@compute`, `@workgroup_size(..)` and the parameters'
    // `@builtin(..)` go; the parameters are remembered.
    let mut drop = vec![false; toks.len()];
    let mut directives = Vec::new();
    let mut params = Vec::new();
    let mut s = 0;
    let mut depth = 0i32;
    while s < sig.len() {
        let t = text(sig[s]);
        match t {
            "{" => depth += 1,
            "}" => depth -= 1,
            _ => {}
        }
        let at_statement = s == 0 || matches!(text(sig[s - 1]), ";" | "}");
        if depth == 0 && at_statement && matches!(t, "enable" | "requires" | "diagnostic") {
            // A directive: up to its `;`.
            let mut e = s;
            while e < sig.len() && text(sig[e]) != ";" {
                e += 1;
            }
            // (Without its `;`: the chain writes one after each.)
            let (a, z) = (toks[sig[s]].1, toks[sig[e.saturating_sub(1).max(s)]].2);
            directives.push(src[a..z].to_string());
            drop_span(&mut drop, &sig, s, e);
            s = e + 1;
            continue;
        }
        if t == "@" && s + 1 < sig.len() {
            let attr = text(sig[s + 1]);
            if attr == "compute" {
                drop[sig[s]] = true;
                drop[sig[s + 1]] = true;
                s += 2;
                continue;
            }
            if attr == "workgroup_size" || attr == "builtin" {
                // @name( ... )
                let mut e = s + 2;
                let mut paren = 0;
                while e < sig.len() {
                    match text(sig[e]) {
                        "(" => paren += 1,
                        ")" => {
                            paren -= 1;
                            if paren == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    e += 1;
                }
                if attr == "builtin" {
                    let which = sig.get(s + 3).map(|&j| text(j)).unwrap_or("");
                    let name = sig.get(e + 1).map(|&j| text(j)).unwrap_or("");
                    params.push((name.to_string(), which.to_string()));
                }
                drop_span(&mut drop, &sig, s, e);
                s = e + 1;
                continue;
            }
        }
        s += 1;
    }
    // Emit, renaming and rebinding.
    let mut body = String::with_capacity(src.len() + 1024);
    let mut prev_sig: Option<&str> = None;
    let mut s = 0usize;
    for (j, &(kind, a, z)) in toks.iter().enumerate() {
        let t = &src[a..z];
        if kind == Tok::Trivia {
            if !drop[j] {
                body.push_str(t);
            }
            continue;
        }
        let next = sig.get(s + 1).map(|&k| text(k));
        let is_struct_member = in_struct[s] && next == Some(":");
        s += 1;
        if drop[j] {
            prev_sig = Some(t);
            continue;
        }
        // (Not a member access, a member declaration or an attribute name.)
        if kind == Tok::Ident
            && names.contains(t)
            && !matches!(prev_sig, Some(".") | Some("@"))
            && !is_struct_member
        {
            body.push_str(prefix);
            body.push_str(t);
        } else if kind == Tok::Number && prev_sig == Some("(") && binding_attr(&body) {
            let n: u32 = t
                .trim_end_matches(['u', 'i'])
                .parse()
                .map_err(|_| format!("binding number `{t}` is not a plain integer"))?;
            body.push_str(&(n + base).to_string());
        } else {
            body.push_str(t);
        }
        prev_sig = Some(t);
    }
    if params.is_empty() && !names.contains("main") {
        return Err("no entry point `main` found".into());
    }
    Ok(Rewritten {
        body,
        directives,
        params,
    })
}

/// Mark every token from significant token `s` to significant token `e`
/// (the last one where `e` runs past the end) dropped, trivia between
/// included.
fn drop_span(drop: &mut [bool], sig: &[usize], s: usize, e: usize) {
    let last = sig[e.min(sig.len() - 1)];
    for d in drop.iter_mut().take(last + 1).skip(sig[s]) {
        *d = true;
    }
}

/// Whether `out` ends in `@binding(` (whitespace aside).
fn binding_attr(out: &str) -> bool {
    let t: String = out
        .chars()
        .rev()
        .filter(|c| !c.is_whitespace())
        .take(9)
        .collect();
    t == "(gnidnib@"
}

/// The expression a stage's builtin parameter becomes in the chained entry
/// point (`wid`/`nwid`: the stage's own workgroup id and count; `lid`: the
/// local invocation index; 1-D workgroups of `wg`).
fn builtin_arg(which: &str, wg: u32) -> Result<String, String> {
    Ok(match which {
        "workgroup_id" => "wid".into(),
        "num_workgroups" => "nwid".into(),
        "local_invocation_index" => "lid".into(),
        "local_invocation_id" => "vec3<u32>(lid, 0u, 0u)".into(),
        "global_invocation_id" => format!("vec3<u32>(wid.x * {wg}u + lid, wid.y, wid.z)"),
        // The same in every stage: the chained entry point's own.
        "subgroup_invocation_id" | "subgroup_size" | "subgroup_id" | "num_subgroups" => {
            format!("chain_{which}")
        }
        other => {
            return Err(format!(
                "builtin `{other}` is not supported in a chain stage"
            ))
        }
    })
}

/// Join `stages` (each validated WGSL with one compute entry point `main`
/// of 1-D workgroup size `wg`) into one kernel whose dispatch runs them in
/// order (see the module docs).
pub fn chain(stages: &[Stage], wg: u32) -> Result<Chained, String> {
    if stages.is_empty() {
        return Err("a chain needs at least one stage".into());
    }
    let n = stages.len();
    let mut directives = BTreeSet::new();
    let mut bodies = String::new();
    let mut calls = String::new();
    let mut base = 0u32;
    // Subgroup builtins some stage takes, passed through.
    let mut passed = BTreeSet::new();
    for (i, st) in stages.iter().enumerate() {
        let r = rewrite(st.wgsl, &format!("s{i}_"), base)?;
        directives.extend(r.directives);
        bodies.push_str(&format!("// ---- stage {i}\n{}\n", r.body));
        let mut args = Vec::new();
        for (_, which) in &r.params {
            let arg = builtin_arg(which, wg)?;
            if arg.starts_with("chain_") {
                passed.insert(which.clone());
            }
            args.push(arg);
        }
        let wait = if i == 0 {
            String::new()
        } else {
            format!("        chain_wait({i}u, lid);\n")
        };
        let first = if i == 0 {
            "0u".to_string()
        } else {
            format!("chain_p.s[{}u].w", i - 1)
        };
        calls.push_str(&format!(
            "    if t < chain_p.s[{i}u].w {{\n{wait}        let g = t - {first};\n        let grid = chain_p.s[{i}u].xyz;\n        let wid = vec3<u32>(g % grid.x, (g / grid.x) % grid.y, g / (grid.x * grid.y));\n        let nwid = grid;\n        s{i}_main({});\n        chain_done({i}u, lid);\n        return;\n    }}\n",
            args.join(", ")
        ));
        base += st.bindings;
    }
    let sg_params: String = passed
        .iter()
        .map(|w| format!(",\n    @builtin({w}) chain_{w}: u32"))
        .collect();
    let mut wgsl = String::new();
    for d in &directives {
        wgsl.push_str(d);
        wgsl.push_str(";\n");
    }
    wgsl.push_str(&format!(
        "// kiln chain: {n} dependent kernels as the stages of one dispatch\n\
         // (codegen/chain.rs). Stage i's tickets end at chain_p.s[i].w; its\n\
         // workgroup grid is chain_p.s[i].xyz.\n\
         struct ChainParams {{\n    s: array<vec4<u32>, {n}>,\n}}\n\
         @group(0) @binding({base}) var<storage, read_write> chain_sync: array<atomic<u32>>;\n\
         @group(0) @binding({}) var<uniform> chain_p: ChainParams;\n\
         var<workgroup> chain_ticket: u32;\n\n\
         // Wait until every workgroup of stage i - 1 has counted itself done.\n\
         fn chain_wait(i: u32, lid: u32) {{\n\
         \x20   if lid == 0u {{\n\
         \x20       let want = chain_p.s[i - 1u].x * chain_p.s[i - 1u].y * chain_p.s[i - 1u].z;\n\
         \x20       loop {{\n\
         \x20           if atomicLoad(&chain_sync[i]) >= want {{\n\
         \x20               break;\n\
         \x20           }}\n\
         \x20       }}\n\
         \x20   }}\n\
         \x20   storageBarrier();\n\
         }}\n\n\
         // Count this workgroup of stage i done (after its writes); the last\n\
         // one of the last stage zeroes the counters for the next dispatch.\n\
         fn chain_done(i: u32, lid: u32) {{\n\
         \x20   storageBarrier();\n\
         \x20   if lid == 0u {{\n\
         \x20       let done = atomicAdd(&chain_sync[i + 1u], 1u) + 1u;\n\
         \x20       let s = chain_p.s[i];\n\
         \x20       if i == {last}u && done == s.x * s.y * s.z {{\n\
         \x20           for (var j = 0u; j <= {n}u; j++) {{\n\
         \x20               atomicStore(&chain_sync[j], 0u);\n\
         \x20           }}\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n\n",
        base + 1,
        last = n - 1,
    ));
    wgsl.push_str(&bodies);
    wgsl.push_str(&format!(
        "@compute @workgroup_size({wg})\n\
         fn main(\n\
         \x20   @builtin(workgroup_id) chain_wg: vec3<u32>,\n\
         \x20   @builtin(num_workgroups) chain_nwg: vec3<u32>,\n\
         \x20   @builtin(local_invocation_index) lid: u32{sg_params}\n\
         ) {{\n\
         \x20   // Workgroups past the chain's (the dispatch is spread over x and y) take no ticket.\n\
         \x20   if chain_wg.x + chain_wg.y * chain_nwg.x >= chain_p.s[{last}u].w {{\n\
         \x20       return;\n\
         \x20   }}\n\
         \x20   if lid == 0u {{\n\
         \x20       chain_ticket = atomicAdd(&chain_sync[0], 1u);\n\
         \x20   }}\n\
         \x20   let t = workgroupUniformLoad(&chain_ticket);\n\
         {calls}}}\n",
        last = n - 1,
    ));
    Ok(Chained {
        wgsl,
        sync_binding: base,
        params_binding: base + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "enable f16;\n\
        struct Params { n: u32, k: u32 }\n\
        const WG: u32 = 64u;\n\
        @group(0) @binding(0) var<storage, read_write> x: array<f32>;\n\
        @group(0) @binding(1) var<uniform> p: Params;\n\
        var<workgroup> red: array<f32, WG>;\n\
        fn n(i: u32) -> u32 { return i * p.n; }\n\
        @compute @workgroup_size(WG)\n\
        fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n\
        \x20   red[lid] = f32(n(wg.x)) + 1e-5 + f32(p.k);\n\
        \x20   workgroupBarrier();\n\
        \x20   x[wg.x] = red[0];\n\
        }\n";

    /// Two copies of one kernel chain into a module naga accepts, with
    /// every top-level name prefixed per stage, struct members and member
    /// accesses untouched, bindings moved up, and the entry points plain
    /// functions called with their builtins.
    #[test]
    fn chains_rename_rebind_and_validate() {
        let c = chain(
            &[
                Stage {
                    wgsl: A,
                    bindings: 2,
                },
                Stage {
                    wgsl: A,
                    bindings: 2,
                },
            ],
            64,
        )
        .unwrap();
        assert_eq!((c.sync_binding, c.params_binding), (4, 5));
        let w = &c.wgsl;
        assert_eq!(w.matches("enable f16;").count(), 1, "{w}");
        assert!(
            w.contains("fn s1_n(i: u32) -> u32 { return i * s1_p.n; }"),
            "{w}"
        );
        assert!(w.contains("struct s0_Params { n: u32, k: u32 }"), "{w}");
        assert!(
            w.contains("@binding(3) var<uniform> s1_p: s1_Params"),
            "{w}"
        );
        assert!(w.contains("fn s0_main( wg: vec3<u32>,  lid: u32)"), "{w}");
        assert!(w.contains("s1_main(wid, lid);"), "{w}");
        assert!(w.contains("1e-5"), "{w}");
        assert_eq!(w.matches("@compute").count(), 1, "{w}");
        let caps = crate::codegen::Caps {
            f16: true,
            subgroups: true,
            max_invocations: 1024,
            max_wg_storage: 1 << 16,
        };
        let m = crate::codegen::validate(w, &caps).unwrap_or_else(|e| panic!("{e}\n{w}"));
        let (size, bytes) = stage_shape(&m).unwrap();
        assert_eq!(size, [64, 1, 1]);
        // Two stages' `red` and the ticket.
        assert_eq!(bytes, 2 * 256 + 16);
    }

    /// Several directives (each kept once, each with one `;`) and a module
    /// name that is also an attribute's (not renamed after `@`).
    #[test]
    fn directives_and_attribute_names_survive() {
        let src = A
            .replace(
                "enable f16;\n",
                "enable f16;\ndiagnostic(off, derivative_uniformity);\n",
            )
            .replace(
                "const WG: u32 = 64u;",
                "const WG: u32 = 64u;\nconst size: u32 = 4u;",
            );
        let st = Stage {
            wgsl: &src,
            bindings: 2,
        };
        let c = chain(&[st, st], 64).unwrap();
        let w = &c.wgsl;
        assert_eq!(
            w.matches("diagnostic(off, derivative_uniformity);").count(),
            1,
            "{w}"
        );
        assert!(w.contains("const s1_size: u32 = 4u;"), "{w}");
        let caps = crate::codegen::Caps {
            f16: true,
            subgroups: true,
            max_invocations: 1024,
            max_wg_storage: 1 << 16,
        };
        crate::codegen::validate(w, &caps).unwrap_or_else(|e| panic!("{e}\n{w}"));
    }

    /// A builtin the chain cannot provide is refused by name.
    #[test]
    fn unknown_builtins_are_refused() {
        let src = A.replace("local_invocation_index", "sample_index");
        let e = chain(
            &[Stage {
                wgsl: &src,
                bindings: 2,
            }],
            64,
        )
        .unwrap_err();
        assert!(e.contains("sample_index"), "{e}");
    }
}
