//! Source positions for RON strings.
//!
//! serde does not hand positions to `Deserialize` impls, so kiln recovers them:
//! every string in the graph schema is a [`Str`], which takes the next number
//! from a per-parse counter as it is deserialized. Strings are deserialized in
//! source order, so the n-th [`Str`] is the n-th string literal in the file,
//! whose line and column [`string_literal_positions`] finds with a small lexer.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A 1-based line and column in a graph file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column in characters, from 1.
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

thread_local! {
    static COUNTER: Cell<u32> = const { Cell::new(0) };
}

/// Reset the string counter before deserializing a file.
pub(crate) fn reset_counter() {
    COUNTER.with(|c| c.set(0));
}

/// A string from a graph file, with the position of its opening quote.
#[derive(Debug, Clone, Default)]
pub struct Str {
    /// The text.
    pub text: String,
    /// Ordinal among the file's strings, replaced by `pos` after parsing.
    seq: u32,
    /// Where the literal starts (set after parsing; `None` for strings made in code).
    pub pos: Option<Pos>,
}

impl Str {
    /// A string not from a file (no position).
    pub fn new(text: impl Into<String>) -> Str {
        Str {
            text: text.into(),
            seq: u32::MAX,
            pos: None,
        }
    }

    pub(crate) fn resolve(&mut self, table: &[Pos]) {
        self.pos = table.get(self.seq as usize).copied();
    }

    /// The position of the character at byte `offset` inside the literal
    /// (assumes no escapes before it, which holds for expressions).
    pub fn pos_at(&self, offset: usize) -> Option<Pos> {
        let chars = self.text.get(..offset).map_or(0, |s| s.chars().count()) as u32;
        self.pos.map(|p| Pos {
            line: p.line,
            col: p.col + 1 + chars,
        })
    }
}

impl PartialEq for Str {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl std::ops::Deref for Str {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

struct StrVisitor;

impl Visitor<'_> for StrVisitor {
    type Value = Str;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
        let seq = COUNTER.with(|c| {
            let n = c.get();
            c.set(n.saturating_add(1));
            n
        });
        Ok(Str {
            text: v.to_string(),
            seq,
            pos: None,
        })
    }
}

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Str, D::Error> {
        d.deserialize_str(StrVisitor)
    }
}

/// Positions of the string literals of a RON text, in order: `"..."` with
/// escapes and raw strings `r#"..."#`, skipping comments (`//`, nested
/// `/* */`) and char literals.
pub fn string_literal_positions(src: &str) -> Vec<Pos> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1u32, 1u32);
    // Advance one char, tracking line and column.
    let step = |i: &mut usize, line: &mut u32, col: &mut u32| {
        if chars.get(*i) == Some(&'\n') {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                step(&mut i, &mut line, &mut col);
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    step(&mut i, &mut line, &mut col);
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    step(&mut i, &mut line, &mut col);
                    if depth == 0 {
                        step(&mut i, &mut line, &mut col);
                        break;
                    }
                }
                step(&mut i, &mut line, &mut col);
            }
        } else if c == '"' {
            out.push(Pos { line, col });
            step(&mut i, &mut line, &mut col);
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    step(&mut i, &mut line, &mut col);
                }
                step(&mut i, &mut line, &mut col);
            }
            step(&mut i, &mut line, &mut col);
        } else if c == 'r'
            && matches!(next, Some('"') | Some('#'))
            && (i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_'))
        {
            let start = Pos { line, col };
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                step(&mut i, &mut line, &mut col);
                continue;
            }
            out.push(start);
            while i <= j {
                step(&mut i, &mut line, &mut col);
            }
            // Find `"` followed by `hashes` hashes.
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        step(&mut i, &mut line, &mut col);
                    }
                    break;
                }
                step(&mut i, &mut line, &mut col);
            }
        } else if c == '\'' {
            // char literal: 'x' or '\x'
            step(&mut i, &mut line, &mut col);
            if chars.get(i) == Some(&'\\') {
                step(&mut i, &mut line, &mut col);
            }
            step(&mut i, &mut line, &mut col);
            step(&mut i, &mut line, &mut col);
        } else {
            step(&mut i, &mut line, &mut col);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_literals_and_skips_comments() {
        let src = "A(\n  x: \"a\", // \"no\"\n  /* \"no\" /* \"no\" */ */ y: r#\"b\"#, z: '\"', w: \"c\\\"d\")";
        let p = string_literal_positions(src);
        assert_eq!(
            p,
            vec![
                Pos { line: 2, col: 6 },
                Pos { line: 3, col: 28 },
                Pos { line: 3, col: 47 }
            ]
        );
    }
}
