//! Reads the rewritten tokens as the Python expression the reference would
//! `eval`, and evaluates it at given values of its symbols.
//!
//! Only what answers need is supported: `Integer`, `Float`, `Number`,
//! `Symbol`, `pi`, `sqrt`, `ln`, `factorial`, `+ - * / // % **`. Anything
//! else (tuples, comparisons, undefined functions, complex numbers,
//! infinities) is an error, which the caller counts as "not equal", as the
//! reference's `except` or its non-zero difference does.

use super::tokens::{Kind, Tok};
use super::value::{Num, Undefined};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub enum Ast {
    Num(Num),
    Sym(String),
    Neg(Box<Ast>),
    Bin(BinOp, Box<Ast>, Box<Ast>),
    Call(Func, Box<Ast>),
}

#[derive(Debug, Clone, Copy)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
    Pow,
}

#[derive(Debug, Clone, Copy)]
pub enum Func {
    Sqrt,
    Ln,
    Factorial,
}

/// The expression is outside what this evaluator reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported;

/// Nesting (parentheses, unary signs, powers) past which an expression is
/// not read: each level is a stack frame, and the input is model output.
const MAX_DEPTH: usize = 64;

pub fn parse(tokens: &[Tok]) -> Result<Ast, Unsupported> {
    let mut p = P {
        t: tokens,
        i: 0,
        depth: 0,
    };
    let e = p.expr()?;
    while p
        .peek()
        .is_some_and(|t| matches!(t.kind, Kind::Newline | Kind::End))
    {
        p.i += 1;
    }
    if p.i != tokens.len() {
        return Err(Unsupported);
    }
    Ok(e)
}

struct P<'a> {
    t: &'a [Tok],
    i: usize,
    /// Open calls of [`P::expr`] and [`P::factor`], which every recursion
    /// of the grammar passes through.
    depth: usize,
}

impl P<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }

    fn peek_op(&self, op: &str) -> bool {
        self.peek()
            .is_some_and(|t| t.kind == Kind::Op && t.text == op)
    }

    fn eat_op(&mut self, op: &str) -> bool {
        let hit = self.peek_op(op);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn expect_op(&mut self, op: &str) -> Result<(), Unsupported> {
        if self.eat_op(op) {
            Ok(())
        } else {
            Err(Unsupported)
        }
    }

    /// Runs `f` one level deeper; `Unsupported` past [`MAX_DEPTH`].
    fn nested(&mut self, f: fn(&mut Self) -> Result<Ast, Unsupported>) -> Result<Ast, Unsupported> {
        if self.depth >= MAX_DEPTH {
            return Err(Unsupported);
        }
        self.depth += 1;
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn expr(&mut self) -> Result<Ast, Unsupported> {
        self.nested(Self::sum)
    }

    fn sum(&mut self) -> Result<Ast, Unsupported> {
        let mut lhs = self.term()?;
        loop {
            let op = if self.eat_op("+") {
                BinOp::Add
            } else if self.eat_op("-") {
                BinOp::Sub
            } else {
                return Ok(lhs);
            };
            let rhs = self.term()?;
            lhs = Ast::Bin(op, Box::new(lhs), Box::new(rhs));
        }
    }

    fn term(&mut self) -> Result<Ast, Unsupported> {
        let mut lhs = self.factor()?;
        loop {
            let op = if self.eat_op("*") {
                BinOp::Mul
            } else if self.eat_op("/") {
                BinOp::Div
            } else if self.eat_op("//") {
                BinOp::FloorDiv
            } else if self.eat_op("%") {
                BinOp::Rem
            } else {
                return Ok(lhs);
            };
            let rhs = self.factor()?;
            lhs = Ast::Bin(op, Box::new(lhs), Box::new(rhs));
        }
    }

    fn factor(&mut self) -> Result<Ast, Unsupported> {
        self.nested(Self::signed)
    }

    fn signed(&mut self) -> Result<Ast, Unsupported> {
        if self.eat_op("-") {
            return Ok(Ast::Neg(Box::new(self.factor()?)));
        }
        if self.eat_op("+") {
            return self.factor();
        }
        self.power()
    }

    fn power(&mut self) -> Result<Ast, Unsupported> {
        let base = self.atom()?;
        if self.eat_op("**") {
            // Right-associative, and binds tighter than a unary minus on
            // its left but not on its right: -2**2 = -4, 2**-1 = 1/2.
            let exp = self.factor()?;
            return Ok(Ast::Bin(BinOp::Pow, Box::new(base), Box::new(exp)));
        }
        Ok(base)
    }

    fn atom(&mut self) -> Result<Ast, Unsupported> {
        let tok = self.peek().ok_or(Unsupported)?.clone();
        self.i += 1;
        match tok.kind {
            Kind::Op if tok.text == "(" => {
                let e = self.expr()?;
                self.expect_op(")")?;
                Ok(e)
            }
            Kind::Name => self.name(&tok.text),
            _ => Err(Unsupported),
        }
    }

    /// A single argument in parentheses, as a raw token.
    fn literal_arg(&mut self) -> Result<String, Unsupported> {
        self.expect_op("(")?;
        let tok = self.peek().ok_or(Unsupported)?.clone();
        self.i += 1;
        self.expect_op(")")?;
        Ok(tok.text)
    }

    fn name(&mut self, name: &str) -> Result<Ast, Unsupported> {
        match name {
            "pi" => Ok(Ast::Num(
                Num::irrational(std::f64::consts::PI).map_err(|_| Unsupported)?,
            )),
            "Integer" => {
                let lit = self.literal_arg()?;
                Ok(Ast::Num(python_int(&lit)?))
            }
            "Number" => {
                let lit = self.literal_arg()?;
                Ok(Ast::Num(python_int(unquote(&lit)?)?))
            }
            "Float" => {
                let lit = self.literal_arg()?;
                let text = unquote(&lit)?.replace('_', "");
                Ok(Ast::Num(Num::decimal(&text).map_err(|_| Unsupported)?))
            }
            "Symbol" => {
                let lit = self.literal_arg()?;
                if self.peek_op("(") {
                    // Calling a symbol makes an undefined function.
                    return Err(Unsupported);
                }
                Ok(Ast::Sym(unquote(&lit)?.to_string()))
            }
            "sqrt" | "ln" | "factorial" => {
                self.expect_op("(")?;
                let arg = self.expr()?;
                self.expect_op(")")?;
                let f = match name {
                    "sqrt" => Func::Sqrt,
                    "ln" => Func::Ln,
                    _ => Func::Factorial,
                };
                Ok(Ast::Call(f, Box::new(arg)))
            }
            _ => Err(Unsupported),
        }
    }
}

fn unquote(s: &str) -> Result<&str, Unsupported> {
    s.strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .ok_or(Unsupported)
}

/// A Python integer literal (decimal with underscores, or 0x / 0o / 0b).
fn python_int(lit: &str) -> Result<Num, Unsupported> {
    let clean = lit.replace('_', "");
    let lower = clean.to_ascii_lowercase();
    let (digits, radix) = match lower.get(..2) {
        Some("0x") => (&lower[2..], 16),
        Some("0o") => (&lower[2..], 8),
        Some("0b") => (&lower[2..], 2),
        _ => (lower.as_str(), 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(Unsupported);
    }
    match i128::from_str_radix(digits, radix) {
        Ok(v) => Ok(Num::int(v)),
        // Too large for exact arithmetic here; keep it approximately.
        Err(_) => {
            let v: f64 = digits.parse().map_err(|_| Unsupported)?;
            Num::irrational(v).map_err(|_| Unsupported)
        }
    }
}

pub fn symbols(ast: &Ast, out: &mut Vec<String>) {
    match ast {
        Ast::Num(_) => {}
        Ast::Sym(s) => {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        Ast::Neg(a) | Ast::Call(_, a) => symbols(a, out),
        Ast::Bin(_, a, b) => {
            symbols(a, out);
            symbols(b, out);
        }
    }
}

pub fn eval(ast: &Ast, env: &BTreeMap<String, Num>) -> Result<Num, Undefined> {
    match ast {
        Ast::Num(n) => Ok(*n),
        Ast::Sym(s) => env.get(s).copied().ok_or(Undefined),
        Ast::Neg(a) => eval(a, env)?.neg(),
        Ast::Bin(op, a, b) => {
            let (a, b) = (eval(a, env)?, eval(b, env)?);
            match op {
                BinOp::Add => a.add(b),
                BinOp::Sub => a.sub(b),
                BinOp::Mul => a.mul(b),
                BinOp::Div => a.div(b),
                BinOp::FloorDiv => a.floor_div(b),
                BinOp::Rem => a.rem(b),
                BinOp::Pow => a.pow(b),
            }
        }
        Ast::Call(f, a) => {
            let x = eval(a, env)?;
            match f {
                Func::Sqrt => x.sqrt(),
                Func::Ln => ln(x),
                Func::Factorial => factorial(x),
            }
        }
    }
}

fn ln(x: Num) -> Result<Num, Undefined> {
    if x == Num::int(1) {
        return Ok(Num::int(0));
    }
    if x.to_f64() <= 0.0 {
        return Err(Undefined);
    }
    x.apply(x.to_f64().ln())
}

fn factorial(x: Num) -> Result<Num, Undefined> {
    if let Some(n) = x.as_integer() {
        if n < 0 {
            return Err(Undefined);
        }
        let mut acc: i128 = 1;
        for k in 2..=n {
            match acc.checked_mul(k) {
                Some(v) => acc = v,
                None => return x.apply(libm::tgamma(n as f64 + 1.0)),
            }
        }
        return Ok(Num::int(acc));
    }
    x.apply(libm::tgamma(x.to_f64() + 1.0))
}
