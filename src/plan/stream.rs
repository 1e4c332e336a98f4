//! A recorded stream on disk: the decode and prefill plans of one model
//! (every launch with its kernel variant, hooks, bindings, uniform words as
//! functions of T and pos0, and workgroup counts), written by
//! `kiln plan --stream-out FILE` and replayed by `kiln bench --stream FILE`
//! without planning. The file names the weights it was recorded for and
//! the kernel templates it was planned with, and is checked against both.

use serde::{Deserialize, Serialize};

use super::{Buf, Launch, Plan};
use crate::error::{Error, Result};
use crate::graph::ir::BoundGraph;

/// The format tag written into every stream file.
/// Bumped whenever a plan's fields or a template's knobs or uniform words
/// change, so that a stale file is refused by name rather than failing
/// when a kernel is generated.
pub const FORMAT: &str = "kiln-stream-2";

/// What a stream file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamFile {
    /// [`FORMAT`].
    pub format: String,
    /// `general.architecture` of the model.
    pub arch: String,
    /// Weights as (name, dtype, dims), in the bound graph's order.
    pub weights: Vec<(String, String, Vec<usize>)>,
    /// Number of values in the bound graph.
    pub values: usize,
    /// [`crate::codegen::sources_hash`] of the kiln that recorded it: the
    /// plans name template variants, knobs and uniform layouts, which mean
    /// something else once the templates change.
    #[serde(default)]
    pub kernels: String,
    /// The decode and prefill plans.
    pub plans: Vec<Plan>,
}

fn weights_of(g: &BoundGraph) -> Vec<(String, String, Vec<usize>)> {
    g.weights
        .iter()
        .map(|w| (w.name.clone(), w.dtype.to_string(), w.dims.clone()))
        .collect()
}

/// The stream of `plans` for graph `g`, as JSON.
pub fn to_json(g: &BoundGraph, plans: &[Plan]) -> Result<String> {
    let f = StreamFile {
        format: FORMAT.into(),
        arch: g.arch.clone(),
        weights: weights_of(g),
        values: g.values.len(),
        kernels: crate::codegen::sources_hash(),
        plans: plans.to_vec(),
    };
    serde_json::to_string(&f).map_err(|e| Error::Input(format!("cannot encode the stream: {e}")))
}

/// Read a stream recorded for `g`; every index in it is checked, so a
/// damaged or foreign file is an error, never a panic.
pub fn from_json(g: &BoundGraph, text: &str) -> Result<Vec<Plan>> {
    let f: StreamFile = serde_json::from_str(text).map_err(|e| {
        Error::Input(format!(
            "not a kiln stream file ({e}); write one with `kiln plan --stream-out FILE`"
        ))
    })?;
    let again = "record it again with `kiln plan --model M --stream-out FILE`";
    if f.format != FORMAT {
        return Err(Error::Input(format!(
            "stream format '{}' is not '{FORMAT}'; {again}",
            f.format
        )));
    }
    if f.arch != g.arch || f.weights != weights_of(g) || f.values != g.values.len() {
        return Err(Error::Input(format!(
            "the stream was recorded for another model or graph (architecture '{}', {} weights); {again}",
            f.arch,
            f.weights.len()
        )));
    }
    if f.kernels != crate::codegen::sources_hash() {
        return Err(Error::Input(format!(
            "the stream was recorded by a kiln built from other kernel templates ({}, this one {}); {again}",
            if f.kernels.is_empty() { "unnamed" } else { f.kernels.as_str() },
            crate::codegen::sources_hash()
        )));
    }
    if f.plans.len() != 2 {
        return Err(Error::Input(format!(
            "a stream holds a decode and a prefill plan, this one {}; {again}",
            f.plans.len()
        )));
    }
    for p in &f.plans {
        check(g, p).map_err(|m| Error::Input(format!("damaged stream: {m}; {again}")))?;
    }
    Ok(f.plans)
}

/// Every index a plan holds is in range for `g`.
fn check(g: &BoundGraph, p: &Plan) -> std::result::Result<(), String> {
    if p.value_buf.len() != g.values.len() || p.made.len() != g.values.len() {
        return Err("value tables do not match the graph".into());
    }
    if p.weights.len() != g.weights.len() {
        return Err("weight table does not match the graph".into());
    }
    if p.value_buf.iter().any(|&v| v >= g.values.len()) {
        return Err("a value alias is out of range".into());
    }
    if p.extra.iter().any(|&(v, _)| v >= g.values.len()) {
        return Err("a buffer size names a value out of range".into());
    }
    let buf_ok = |b: &Buf| match b {
        Buf::Value(v) => *v < g.values.len(),
        Buf::Raw { weight, chunk } => p
            .weights
            .get(*weight)
            .is_some_and(|w| *chunk < w.chunks.len()),
        Buf::F32(w) => *w < g.weights.len(),
        Buf::KCache(c) | Buf::VCache(c) => *c < g.caches.len(),
        Buf::Dummy | Buf::Counters | Buf::Unbound => true,
    };
    for l in &p.launches {
        match l {
            Launch::Kernel { kernel, binds, .. } => {
                if *kernel >= p.kernels.len() {
                    return Err(format!(
                        "launch names kernel {kernel} of {}",
                        p.kernels.len()
                    ));
                }
                if !binds.iter().all(buf_ok) {
                    return Err("a launch binds a buffer out of range".into());
                }
            }
            Launch::Copy { src, dst, .. } => {
                if !buf_ok(src) || !buf_ok(dst) {
                    return Err("a copy names a buffer out of range".into());
                }
            }
        }
    }
    Ok(())
}
