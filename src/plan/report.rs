//! What `kiln plan` prints: the fused groups in order with their kernels,
//! every stored intermediate with its place in the arena and live range,
//! and the arena's peak beside the naive sum and the lower bound; and the
//! fused graph as Graphviz.

use std::fmt::Write;

use super::fuse;
use super::{Launch, Plan};
use crate::alloc::{self, Interval, Layout};
use crate::error::{Error, Result};
use crate::graph::ir::BoundGraph;

/// Live ranges of the values a plan stores, over its groups (a value is
/// written by one group and last read by a later one; the output lives to
/// the end). Returns (root value ids, intervals) for `t` tokens.
pub fn intervals(g: &BoundGraph, p: &Plan, t: usize) -> (Vec<usize>, Vec<Interval>) {
    let n = p.groups.len();
    let mut first = vec![usize::MAX; g.values.len()];
    let mut last = vec![0usize; g.values.len()];
    for (i, gr) in p.groups.iter().enumerate() {
        let (reads, writes) = fuse::io(g, gr);
        for w in writes {
            let r = p.value_buf[w];
            first[r] = first[r].min(i);
            last[r] = last[r].max(i);
        }
        for r in reads {
            let r = p.value_buf[r];
            last[r] = last[r].max(i);
        }
    }
    let tok = p.value_buf[g.tokens];
    first[tok] = 0;
    last[p.value_buf[g.output]] = n;
    let mut ids = Vec::new();
    let mut iv = Vec::new();
    for v in 0..g.values.len() {
        if first[v] == usize::MAX || p.value_buf[v] != v {
            continue;
        }
        ids.push(v);
        iv.push(Interval {
            size: p.value_bytes(g, v, t),
            first: first[v],
            last: last[v].max(first[v]),
        });
    }
    (ids, iv)
}

/// Place a plan's values for `t` tokens.
pub fn layout(
    g: &BoundGraph,
    p: &Plan,
    t: usize,
    align: u64,
    max_arena: u64,
) -> Result<(Vec<usize>, Vec<Interval>, Layout)> {
    let (ids, iv) = intervals(g, p, t);
    let l = alloc::allocate(&iv, align, max_arena).map_err(|e| Error::Input(e.to_string()))?;
    Ok((ids, iv, l))
}

fn op_name(g: &BoundGraph, n: usize) -> String {
    let s = format!("{:?}", g.nodes[n].op);
    s.split([' ', '{', '(']).next().unwrap_or("").to_string()
}

/// The text `kiln plan` prints for one plan at `t` tokens.
pub fn text(g: &BoundGraph, p: &Plan, t: usize, align: u64, max_arena: u64) -> Result<String> {
    let mut o = String::new();
    let what = if t == 1 { "decode" } else { "prefill" };
    let _ = writeln!(
        o,
        "{what} plan (T = {t}): {} groups, {} dispatches, {} copies",
        p.groups.len(),
        p.dispatches(),
        p.launches.len() - p.dispatches()
    );
    let _ = writeln!(o, "  group  dispatches  kernel  <-  graph ops");
    for (i, gr) in p.groups.iter().enumerate() {
        let nodes = gr.nodes();
        let launches: Vec<&Launch> = p
            .launches
            .iter()
            .filter(|l| match l {
                Launch::Kernel { nodes: ns, .. } => ns.first() == nodes.first(),
                Launch::Copy { .. } => false,
            })
            .collect();
        // Distinct kernels in launch order (an int8-input matmul runs
        // quantize_rows first).
        let mut names: Vec<String> = Vec::new();
        for l in &launches {
            if let Launch::Kernel { kernel, .. } = l {
                let n = p.kernels[*kernel].name();
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        let kernel = if names.is_empty() {
            "(copy / alias)".into()
        } else {
            names.join(" + ")
        };
        let ops: Vec<String> = nodes
            .iter()
            .map(|&n| format!("{} = {}", g.values[g.nodes[n].output].name, op_name(g, n)))
            .collect();
        let _ = writeln!(
            o,
            "  {i:5}  {:10}  {kernel}  <-  {}",
            launches.len(),
            ops.join(", ")
        );
    }
    let (ids, iv, l) = layout(g, p, t, align, max_arena)?;
    let _ = writeln!(
        o,
        "buffers (T = {t}): value, arena, offset, bytes, live groups [first, last]"
    );
    for (j, &v) in ids.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {:24} {:2} {:12} {:12} [{}, {}]",
            g.values[v].name,
            l.placements[j].arena,
            l.placements[j].offset,
            iv[j].size,
            iv[j].first,
            iv[j].last
        );
    }
    let _ = writeln!(
        o,
        "arena peak {} bytes in {} arena(s); naive sum {}; lower bound {} ({:.3}x)",
        l.peak,
        l.arenas.len(),
        l.naive,
        l.lower_bound,
        l.peak as f64 / l.lower_bound.max(1) as f64
    );
    Ok(o)
}

/// The fused graph as Graphviz: one cluster per group, edges along values.
pub fn dot(g: &BoundGraph, p: &Plan) -> String {
    let mut o = String::from("digraph kiln {\n  rankdir=TB;\n  node [shape=box, fontsize=10];\n");
    let mut group_of = vec![0usize; g.nodes.len()];
    for (i, gr) in p.groups.iter().enumerate() {
        let _ = writeln!(o, "  subgraph cluster_{i} {{\n    label=\"group {i}\";");
        for n in gr.nodes() {
            group_of[n] = i;
            let _ = writeln!(
                o,
                "    n{n} [label=\"{} = {}\"];",
                g.values[g.nodes[n].output].name,
                op_name(g, n)
            );
        }
        o.push_str("  }\n");
    }
    let mut producer = vec![None; g.values.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        producer[n.output] = Some(i);
    }
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in &n.inputs {
            if let Some(pn) = producer[v] {
                let style = if group_of[pn] == group_of[i] {
                    " [style=dashed]"
                } else {
                    ""
                };
                let _ = writeln!(o, "  n{pn} -> n{i}{style};");
            }
        }
    }
    o.push_str("}\n");
    o
}

/// Whether every pass name in `names` exists.
pub fn check_passes(names: &[String]) -> Result<()> {
    if let Some(bad) = names.iter().find(|n| !fuse::PASSES.contains(&n.as_str())) {
        return Err(Error::Input(format!(
            "--no-fuse {bad}: no such fusion pass; the passes are {}",
            fuse::PASSES.join(", ")
        )));
    }
    Ok(())
}
