//! The reference grader's last resort: is `(ground_truth) - (given)` zero?
//!
//! The reference hands the normalised strings to sympy (`parse_expr` with
//! implicit multiplication, then `simplify`). Here the same token rewrites
//! are applied ([`tokens`]), the expression is evaluated exactly over the
//! rationals where it can be, in f64 where a decimal literal forces sympy
//! into floating point, and approximately (with a tolerance) where roots,
//! pi or logarithms appear. Symbols are sampled at a few exact dyadic
//! values, so an identity holds numerically exactly when it holds.
//!
//! The reference's guards come first: no more than two distinct letters
//! (besides those of `sqrt` and `frac`), and no `^{`, `^(`, multi-digit or
//! chained exponents.

mod eval;
mod tokens;
mod value;

use super::pystr;
use std::collections::BTreeMap;
use value::Num;

/// `are_equal_under_sympy(ground_truth, given)`.
pub fn are_equal(ground_truth: &str, given: &str) -> bool {
    let expr = format!("({ground_truth})-({given})");
    if !allow_eval(&expr) || paren_depth(&expr) > MAX_PAREN_DEPTH {
        return false;
    }
    // The reference parses the whole difference; parse the sides apart (same
    // rewrites, as each side sits in its own parentheses) to compare values.
    let parsed = |s: &str| -> Option<eval::Ast> {
        // `_sympy_parse` writes powers the Python way first.
        let s = s.replace('^', "**");
        let toks = tokens::transform(tokens::tokenize(&s).ok()?).ok()?;
        eval::parse(&toks).ok()
    };
    // The whole must tokenize too (it fails where a side's parentheses do
    // not balance on their own but would together).
    if parsed(&expr).is_none() {
        return false;
    }
    let (Some(a), Some(b)) = (
        parsed(&format!("({ground_truth})")),
        parsed(&format!("({given})")),
    ) else {
        return false;
    };
    zero_difference(&a, &b)
}

/// Parentheses nested deeper than this are not parsed (each level is a
/// pass over the tokens and a stack frame; the input is model output).
const MAX_PAREN_DEPTH: usize = 32;

/// The deepest nesting of `(` in `s`.
fn paren_depth(s: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `should_allow_eval`.
fn allow_eval(expr: &str) -> bool {
    let letters = expr.replace("sqrt", "").replace("frac", "");
    let mut seen: Vec<char> = letters.chars().filter(|&c| pystr::is_alpha(c)).collect();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() > 2 {
        return false;
    }
    if expr.contains("^{") || expr.contains("^(") {
        return false;
    }
    // `\^[0-9]+\^` and `\^[0-9][0-9]+`.
    let b = expr.as_bytes();
    for (i, _) in expr.match_indices('^') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits >= 2 || (digits == 1 && b.get(i + 2) == Some(&b'^')) {
            return false;
        }
    }
    true
}

/// Dyadic sample values: exact in binary, so polynomial arithmetic on them
/// is exact in f64 as well as over the rationals; both signs, so that e.g.
/// `sqrt(x^2)` and `x` differ.
const SAMPLES: &[(i128, i128)] = &[(3, 8), (-5, 4), (43, 16), (7, 2), (-13, 16), (5, 32)];

fn zero_difference(a: &eval::Ast, b: &eval::Ast) -> bool {
    let mut names = Vec::new();
    eval::symbols(a, &mut names);
    eval::symbols(b, &mut names);
    let trials = if names.is_empty() { 1 } else { SAMPLES.len() };
    let mut agreed = 0;
    for t in 0..trials {
        let env: BTreeMap<String, Num> = names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let (n, d) = SAMPLES[(t + 2 * k) % SAMPLES.len()];
                (name.clone(), Num::Rat(n, d))
            })
            .collect();
        let (Ok(x), Ok(y)) = (eval::eval(a, &env), eval::eval(b, &env)) else {
            continue;
        };
        let Ok(d) = x.sub(y) else {
            continue;
        };
        if !is_zero(d, x, y) {
            return false;
        }
        agreed += 1;
    }
    agreed > 0
}

fn is_zero(d: Num, x: Num, y: Num) -> bool {
    match d {
        Num::Rat(n, _) | Num::Dec(n, _) => n == 0,
        // A Float never cancels a symbolic root or pi: sympy keeps both.
        Num::Real { v, float: true, .. } => x.is_irrational() == y.is_irrational() && v == 0.0,
        Num::Real {
            v, float: false, ..
        } => {
            let scale = 1f64.max(x.to_f64().abs()).max(y.to_f64().abs());
            v.abs() <= 1e-10 * scale
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_hold() {
        assert!(are_equal("(x+1)^2", "x^2+2x+1"));
        assert!(are_equal("sqrt(8)", "2sqrt(2)"));
        assert!(are_equal("1/2", "0.5"));
        assert!(are_equal("2pi", "pi*2"));
    }

    #[test]
    fn differences_show() {
        assert!(!are_equal("0.3", "0.1+0.2"));
        assert!(!are_equal("x", "sqrt(x^2)"));
        assert!(!are_equal("pi", "3.14"));
        assert!(!are_equal("1/3", "0.3333333333"));
    }

    #[test]
    fn guards_refuse() {
        assert!(!are_equal("x+y+z", "z+y+x"));
        assert!(!are_equal("2^{10}", "1024"));
        assert!(!are_equal("2^10", "1024"));
        assert!(!are_equal("(1,2)", "(1,2)"));
    }
}
