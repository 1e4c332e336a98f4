//! The expression language of graph files.
//!
//! Hyperparameters, attributes, repeat counts and conditions are expressions:
//! numbers, names (hyperparameters, the loop variable, `arch`), `'strings'`,
//! `+ - * / %`, comparisons, `&& || !`, `c ? a : b`, and the functions
//! `meta('key')`, `meta('key', default)`, `has_meta('key')`,
//! `has_weight('name')`, `sqrt`, `floor`, `ceil`, `abs`, `min`, `max`, `pow`.
//! Strings may hold `{expr}` templates, as weight names do: `'layers.{i}.w'`.
//! Numbers are f64; comparisons and logic give 1 or 0.

use std::fmt;

/// A value: a number or a string.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number (integers are exact up to 2^53).
    Num(f64),
    /// A string.
    Str(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Num(n) => write!(f, "{n}"),
            Value::Str(s) => write!(f, "'{s}'"),
        }
    }
}

/// A parse or evaluation error, with the byte offset in the expression text.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    /// What went wrong.
    pub msg: String,
    /// Byte offset in the expression.
    pub offset: usize,
}

/// What names and functions resolve to while evaluating.
pub trait Env {
    /// The value of a name, or `None` if undefined.
    fn var(&self, name: &str) -> Option<Value>;
    /// Names defined here, for "did you mean" messages.
    fn names(&self) -> Vec<String>;
    /// A metadata value by key.
    fn meta(&self, key: &str) -> Result<Option<Value>, String>;
    /// Whether the model has a weight with this name.
    fn has_weight(&self, name: &str) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Bin {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Number literal.
    Num(f64),
    /// String literal, itself a template.
    Str(Template),
    /// A name, at a byte offset.
    Var(String, usize),
    /// Unary minus.
    Neg(Box<Expr>),
    /// Logical not.
    Not(Box<Expr>),
    #[allow(private_interfaces)]
    /// Binary operation.
    Bin(Bin, Box<Expr>, Box<Expr>, usize),
    /// `c ? a : b`.
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Function call at a byte offset.
    Call(String, Vec<Expr>, usize),
}

/// A string with `{expr}` holes.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Hole(Expr),
}

impl Template {
    /// Parse `text`, whose first byte is at `base` in the enclosing source.
    pub fn parse(text: &str, base: usize) -> Result<Template, ExprError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        let mut off = base;
        while let Some(open) = rest.find('{') {
            lit.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(ExprError {
                msg: "unclosed '{' in template".into(),
                offset: off + open,
            })?;
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
            }
            let inner = &after[..close];
            parts.push(Part::Hole(parse_at(inner, off + open + 1)?));
            let consumed = open + 1 + close + 1;
            rest = &rest[consumed..];
            off += consumed;
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    /// Whether the template has no holes.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// Expand the holes.
    pub fn eval(&self, env: &dyn Env) -> Result<String, ExprError> {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => s.push_str(l),
                Part::Hole(e) => match e.eval(env)? {
                    Value::Str(v) => s.push_str(&v),
                    Value::Num(n) if n.fract() == 0.0 && n.abs() < 9e15 => {
                        s.push_str(&format!("{}", n as i64))
                    }
                    Value::Num(n) => s.push_str(&format!("{n}")),
                },
            }
        }
        Ok(s)
    }
}

/// Parse an expression.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    parse_at(src, 0)
}

/// Most tokens one expression may have, and deepest nesting of parentheses,
/// calls, `?:` and prefix operators: parsing, evaluating and dropping recurse
/// over the tree, so without bounds a hostile graph file overflows the stack.
const MAX_TOKENS: usize = 1000;
const MAX_DEPTH: u32 = 64;

fn parse_at(src: &str, base: usize) -> Result<Expr, ExprError> {
    let toks = lex(src, base)?;
    if let Some(t) = toks.get(MAX_TOKENS) {
        return Err(ExprError {
            msg: format!(
                "expression too long (more than {MAX_TOKENS} tokens); split it into several params"
            ),
            offset: t.off,
        });
    }
    let mut p = Parser {
        toks,
        i: 0,
        end: base + src.len(),
        depth: 0,
    };
    let e = p.cond()?;
    if let Some(t) = p.toks.get(p.i) {
        return Err(ExprError {
            msg: format!("unexpected {} after the end of the expression", t.tok),
            offset: t.off,
        });
    }
    Ok(e)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    Str(String),
    Op(&'static str),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Ident(s) => write!(f, "name '{s}'"),
            Tok::Str(s) => write!(f, "string '{s}'"),
            Tok::Op(o) => write!(f, "'{o}'"),
        }
    }
}

struct Token {
    tok: Tok,
    off: usize,
}

const OPS: &[&str] = &[
    "==", "!=", "<=", ">=", "&&", "||", "+", "-", "*", "/", "%", "(", ")", ",", "?", ":", "<", ">",
    "!",
];

fn lex(src: &str, base: usize) -> Result<Vec<Token>, ExprError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let off = base + i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                i += 1;
                if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
                    i += 1;
                }
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let text = &src[start..i];
            let n = text.parse::<f64>().map_err(|_| ExprError {
                msg: format!("bad number '{text}'"),
                offset: off,
            })?;
            out.push(Token {
                tok: Tok::Num(n),
                off,
            });
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(src[start..i].to_string()),
                off,
            });
        } else if c == b'\'' {
            let start = i + 1;
            let end = src[start..].find('\'').ok_or(ExprError {
                msg: "unclosed string (strings in expressions use single quotes)".into(),
                offset: off,
            })?;
            out.push(Token {
                tok: Tok::Str(src[start..start + end].to_string()),
                off,
            });
            i = start + end + 1;
        } else if let Some(op) = OPS.iter().find(|o| src[i..].starts_with(**o)) {
            out.push(Token {
                tok: Tok::Op(op),
                off,
            });
            i += op.len();
        } else {
            let ch = src[i..].chars().next().unwrap_or('?');
            return Err(ExprError {
                msg: format!("unexpected character '{ch}'"),
                offset: off,
            });
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    end: usize,
    /// Current nesting, at most [`MAX_DEPTH`].
    depth: u32,
}

impl Parser {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.toks.get(self.i), Some(Token { tok: Tok::Op(o), .. }) if *o == op)
    }

    fn off(&self) -> usize {
        self.toks.get(self.i).map_or(self.end, |t| t.off)
    }

    fn expect(&mut self, op: &str) -> Result<(), ExprError> {
        if self.peek_op(op) {
            self.i += 1;
            Ok(())
        } else {
            let found = self
                .toks
                .get(self.i)
                .map_or("the end".to_string(), |t| t.tok.to_string());
            Err(ExprError {
                msg: format!("expected '{op}', found {found}"),
                offset: self.off(),
            })
        }
    }

    /// Enter one level of nesting; [`Parser::leave`] undoes it.
    fn enter(&mut self) -> Result<(), ExprError> {
        if self.depth >= MAX_DEPTH {
            return Err(ExprError {
                msg: format!("expression nested too deeply (more than {MAX_DEPTH} levels)"),
                offset: self.off(),
            });
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn cond(&mut self) -> Result<Expr, ExprError> {
        self.enter()?;
        let e = self.cond_inner();
        self.leave();
        e
    }

    fn cond_inner(&mut self) -> Result<Expr, ExprError> {
        let c = self.binary(0)?;
        if self.peek_op("?") {
            self.i += 1;
            let a = self.cond()?;
            self.expect(":")?;
            let b = self.cond()?;
            return Ok(Expr::Cond(Box::new(c), Box::new(a), Box::new(b)));
        }
        Ok(c)
    }

    fn binary(&mut self, level: usize) -> Result<Expr, ExprError> {
        const LEVELS: &[&[(&str, Bin)]] = &[
            &[("||", Bin::Or)],
            &[("&&", Bin::And)],
            &[("==", Bin::Eq), ("!=", Bin::Ne)],
            &[
                ("<=", Bin::Le),
                (">=", Bin::Ge),
                ("<", Bin::Lt),
                (">", Bin::Gt),
            ],
            &[("+", Bin::Add), ("-", Bin::Sub)],
            &[("*", Bin::Mul), ("/", Bin::Div), ("%", Bin::Rem)],
        ];
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut lhs = self.binary(level + 1)?;
        'outer: loop {
            for (op, bin) in LEVELS[level] {
                if self.peek_op(op) {
                    let off = self.off();
                    self.i += 1;
                    let rhs = self.binary(level + 1)?;
                    lhs = Expr::Bin(*bin, Box::new(lhs), Box::new(rhs), off);
                    continue 'outer;
                }
            }
            return Ok(lhs);
        }
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.peek_op("-") || self.peek_op("!") {
            let neg = self.peek_op("-");
            self.i += 1;
            self.enter()?;
            let e = Box::new(self.unary()?);
            self.leave();
            return Ok(if neg { Expr::Neg(e) } else { Expr::Not(e) });
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        let off = self.off();
        let Some(t) = self.toks.get(self.i) else {
            return Err(ExprError {
                msg: "expression ends too early".into(),
                offset: off,
            });
        };
        let tok = t.tok.clone();
        self.i += 1;
        match tok {
            Tok::Num(n) => Ok(Expr::Num(n)),
            Tok::Str(s) => Ok(Expr::Str(Template::parse(&s, off + 1)?)),
            Tok::Ident(name) => {
                if self.peek_op("(") {
                    self.i += 1;
                    let mut args = Vec::new();
                    if !self.peek_op(")") {
                        loop {
                            args.push(self.cond()?);
                            if self.peek_op(",") {
                                self.i += 1;
                            } else {
                                break;
                            }
                        }
                    }
                    self.expect(")")?;
                    check_arity(&name, args.len(), off)?;
                    Ok(Expr::Call(name, args, off))
                } else {
                    Ok(Expr::Var(name, off))
                }
            }
            Tok::Op("(") => {
                let e = self.cond()?;
                self.expect(")")?;
                Ok(e)
            }
            other => Err(ExprError {
                msg: format!("expected a number, name or '(', found {other}"),
                offset: off,
            }),
        }
    }
}

const FUNCS: &[(&str, usize, usize)] = &[
    ("meta", 1, 2),
    ("has_meta", 1, 1),
    ("has_weight", 1, 1),
    ("sqrt", 1, 1),
    ("floor", 1, 1),
    ("ceil", 1, 1),
    ("abs", 1, 1),
    ("min", 2, 2),
    ("max", 2, 2),
    ("pow", 2, 2),
];

fn check_arity(name: &str, n: usize, off: usize) -> Result<(), ExprError> {
    match FUNCS.iter().find(|f| f.0 == name) {
        None => Err(ExprError {
            msg: format!(
                "unknown function '{name}' (known: {})",
                FUNCS.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
            ),
            offset: off,
        }),
        Some(&(_, lo, hi)) if n < lo || n > hi => Err(ExprError {
            msg: if lo == hi {
                format!("'{name}' takes {lo} argument(s), found {n}")
            } else {
                format!("'{name}' takes {lo} to {hi} arguments, found {n}")
            },
            offset: off,
        }),
        _ => Ok(()),
    }
}

fn num(v: Value, off: usize, what: &str) -> Result<f64, ExprError> {
    match v {
        Value::Num(n) => Ok(n),
        Value::Str(s) => Err(ExprError {
            msg: format!("{what} needs a number, found string '{s}'"),
            offset: off,
        }),
    }
}

fn string(v: Value, off: usize, what: &str) -> Result<String, ExprError> {
    match v {
        Value::Str(s) => Ok(s),
        Value::Num(n) => Err(ExprError {
            msg: format!("{what} needs a string, found number {n}"),
            offset: off,
        }),
    }
}

fn truth(b: bool) -> Value {
    Value::Num(if b { 1.0 } else { 0.0 })
}

impl Expr {
    /// Evaluate in an environment.
    pub fn eval(&self, env: &dyn Env) -> Result<Value, ExprError> {
        Ok(match self {
            Expr::Num(n) => Value::Num(*n),
            Expr::Str(t) => Value::Str(t.eval(env)?),
            Expr::Var(name, off) => env.var(name).ok_or_else(|| ExprError {
                msg: undefined_name(name, &env.names()),
                offset: *off,
            })?,
            Expr::Neg(e) => Value::Num(-num(e.eval(env)?, 0, "'-'")?),
            Expr::Not(e) => truth(num(e.eval(env)?, 0, "'!'")? == 0.0),
            Expr::Cond(c, a, b) => {
                if num(c.eval(env)?, 0, "a condition")? != 0.0 {
                    a.eval(env)?
                } else {
                    b.eval(env)?
                }
            }
            Expr::Bin(op, a, b, off) => {
                let off = *off;
                // Short-circuit logic.
                if *op == Bin::And || *op == Bin::Or {
                    let l = num(a.eval(env)?, off, "'&&'/'||'")? != 0.0;
                    if (*op == Bin::And) != l {
                        return Ok(truth(l));
                    }
                    return Ok(truth(num(b.eval(env)?, off, "'&&'/'||'")? != 0.0));
                }
                let (l, r) = (a.eval(env)?, b.eval(env)?);
                if let (Value::Str(x), Value::Str(y)) = (&l, &r) {
                    match op {
                        Bin::Add => return Ok(Value::Str(format!("{x}{y}"))),
                        Bin::Eq => return Ok(truth(x == y)),
                        Bin::Ne => return Ok(truth(x != y)),
                        _ => {}
                    }
                }
                let (l, r) = (num(l, off, "this operator")?, num(r, off, "this operator")?);
                match op {
                    Bin::Add => Value::Num(l + r),
                    Bin::Sub => Value::Num(l - r),
                    Bin::Mul => Value::Num(l * r),
                    Bin::Div | Bin::Rem if r == 0.0 => {
                        return Err(ExprError {
                            msg: "division by zero".into(),
                            offset: off,
                        })
                    }
                    Bin::Div => Value::Num(l / r),
                    Bin::Rem => Value::Num(l.rem_euclid(r)),
                    Bin::Eq => truth(l == r),
                    Bin::Ne => truth(l != r),
                    Bin::Lt => truth(l < r),
                    Bin::Le => truth(l <= r),
                    Bin::Gt => truth(l > r),
                    Bin::Ge => truth(l >= r),
                    Bin::And | Bin::Or => unreachable!("handled above"),
                }
            }
            Expr::Call(name, args, off) => {
                let off = *off;
                let arg = |i: usize| args[i].eval(env);
                match name.as_str() {
                    "meta" => {
                        let key = string(arg(0)?, off, "meta")?;
                        match env.meta(&key) {
                            Err(msg) => return Err(ExprError { msg, offset: off }),
                            Ok(Some(v)) => v,
                            Ok(None) if args.len() == 2 => arg(1)?,
                            Ok(None) => {
                                return Err(ExprError {
                                    msg: format!(
                                        "the model has no metadata '{key}' (give a default: meta('{key}', value))"
                                    ),
                                    offset: off,
                                })
                            }
                        }
                    }
                    "has_meta" => {
                        let key = string(arg(0)?, off, "has_meta")?;
                        truth(matches!(env.meta(&key), Ok(Some(_))))
                    }
                    "has_weight" => truth(env.has_weight(&string(arg(0)?, off, "has_weight")?)),
                    f => {
                        let x = num(arg(0)?, off, f)?;
                        let y = if args.len() > 1 {
                            num(arg(1)?, off, f)?
                        } else {
                            0.0
                        };
                        Value::Num(match f {
                            "sqrt" => x.sqrt(),
                            "floor" => x.floor(),
                            "ceil" => x.ceil(),
                            "abs" => x.abs(),
                            "min" => x.min(y),
                            "max" => x.max(y),
                            "pow" => x.powf(y),
                            _ => {
                                return Err(ExprError {
                                    msg: format!("unknown function '{f}'"),
                                    offset: off,
                                })
                            }
                        })
                    }
                }
            }
        })
    }
}

/// "undefined name 'x'" with the closest defined name, if any is close.
pub fn undefined_name(name: &str, known: &[String]) -> String {
    let mut msg = format!("undefined name '{name}'");
    if let Some(best) = closest(name, known) {
        msg.push_str(&format!(" (did you mean '{best}'?)"));
    }
    msg
}

/// The candidate closest to `name` by edit distance, if it is close.
pub fn closest<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct E(HashMap<&'static str, Value>);
    impl Env for E {
        fn var(&self, n: &str) -> Option<Value> {
            self.0.get(n).cloned()
        }
        fn names(&self) -> Vec<String> {
            self.0.keys().map(|k| k.to_string()).collect()
        }
        fn meta(&self, key: &str) -> Result<Option<Value>, String> {
            Ok((key == "a.b").then_some(Value::Num(7.0)))
        }
        fn has_weight(&self, n: &str) -> bool {
            n == "w.3"
        }
    }

    fn ev(s: &str) -> Result<Value, ExprError> {
        let env = E(HashMap::from([
            ("i", Value::Num(5.0)),
            ("n", Value::Num(9.0)),
            ("arch", Value::Str("a".into())),
        ]));
        parse(s)?.eval(&env)
    }

    #[test]
    fn arithmetic_logic_and_calls() {
        assert_eq!(ev("576 / n").unwrap(), Value::Num(64.0));
        assert_eq!(
            ev("(i + 1) % 6 == 0 ? 1e6 : 10000").unwrap(),
            Value::Num(1e6)
        );
        assert_eq!(ev("1 + 2 * 3 - -1").unwrap(), Value::Num(8.0));
        assert_eq!(ev("meta('{arch}.b')").unwrap(), Value::Num(7.0));
        assert_eq!(ev("meta('x.y', n * 2)").unwrap(), Value::Num(18.0));
        assert_eq!(
            ev("has_weight('w.{i - 2}') && !has_meta('q')").unwrap(),
            Value::Num(1.0)
        );
        assert_eq!(ev("sqrt(n) + max(1, 2)").unwrap(), Value::Num(5.0));
        assert_eq!(ev("i > 3 || 1 / 0").unwrap(), Value::Num(1.0));
    }

    #[test]
    fn errors_name_the_place() {
        let e = ev("n + nn").unwrap_err();
        assert_eq!(e.offset, 4);
        assert!(
            e.msg.contains("undefined name 'nn'") && e.msg.contains("'n'"),
            "{}",
            e.msg
        );
        assert_eq!(ev("1 +").unwrap_err().msg, "expression ends too early");
        assert!(ev("foo(1)")
            .unwrap_err()
            .msg
            .contains("unknown function 'foo'"));
        assert!(ev("meta('zz')")
            .unwrap_err()
            .msg
            .contains("no metadata 'zz'"));
        assert!(ev("1 / 0").unwrap_err().msg.contains("division by zero"));
        assert!(ev("1 2").unwrap_err().msg.contains("unexpected number"));
        assert_eq!(ev("(1 + 2").unwrap_err().offset, 6);
    }
}
