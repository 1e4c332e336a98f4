//! Model architectures as RON op-graphs.
//!
//! A graph file declares hyperparameters (expressions over GGUF metadata), a
//! body of ops with repetition and per-layer choices, and the output. Loading
//! parses and checks syntax ([`Graph::parse`]); binding to a model evaluates
//! everything and checks names, shapes and dtypes ([`Graph::bind`]). Errors
//! carry the file, line and column.

pub mod bind;
pub mod expr;
pub mod ir;
pub mod schema;
pub mod span;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::model::gguf::Gguf;
pub use ir::BoundGraph;
use span::Pos;

/// An error in a graph file, with its position when known.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphError {
    /// The graph file.
    pub file: String,
    /// Line and column.
    pub pos: Option<Pos>,
    /// What is wrong and what was expected.
    pub msg: String,
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(f, "{}:{}: {}", self.file, p, self.msg),
            None => write!(f, "{}: {}", self.file, self.msg),
        }
    }
}

impl std::error::Error for GraphError {}

/// A parsed graph file.
#[derive(Debug)]
pub struct Graph {
    /// Where it came from (a path or a label), for messages.
    pub source: String,
    /// The parsed file.
    pub file: schema::GraphFile,
}

impl Graph {
    /// Parse graph RON text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Graph, GraphError> {
        let opts = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        span::reset_counter();
        let mut file: schema::GraphFile = opts.from_str(text).map_err(|e| GraphError {
            file: source.to_string(),
            pos: Some(Pos {
                line: e.position.line as u32,
                col: e.position.col as u32,
            }),
            msg: match e.code {
                ron::Error::ExceededRecursionLimit => {
                    "statements or values nest too deeply (ron's recursion limit is 128 levels); flatten the graph".into()
                }
                code => code.to_string(),
            },
        })?;
        let table = span::string_literal_positions(text);
        schema::finish(&mut file, &table).map_err(|(pos, msg)| GraphError {
            file: source.to_string(),
            pos,
            msg,
        })?;
        Ok(Graph {
            source: source.to_string(),
            file,
        })
    }

    /// Read and parse a graph file.
    pub fn load(path: impl AsRef<Path>) -> Result<Graph, GraphError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| GraphError {
            file: path.display().to_string(),
            pos: None,
            msg: format!("cannot read the graph file: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Bind to a model: evaluate, unroll and check everything.
    pub fn bind(&self, gguf: &Gguf) -> Result<BoundGraph, GraphError> {
        bind::bind(self, gguf)
    }
}

/// Folders searched for `graphs/<arch>.ron`: `$KILN_GRAPHS`, `./graphs`, the
/// folder beside the executable's crate, and the source tree kiln was built from.
pub fn graph_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("KILN_GRAPHS") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("graphs"));
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("graphs"));
    dirs
}

/// Find the graph for an architecture name.
pub fn find_graph(arch: &str) -> Result<PathBuf, GraphError> {
    let file = format!("{arch}.ron");
    for d in graph_dirs() {
        let p = d.join(&file);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(GraphError {
        file,
        pos: None,
        msg: format!(
            "no graph for architecture '{arch}' (searched {}); write graphs/{arch}.ron or pass --graph",
            graph_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}
