//! Python tokens and the token rewrites the reference applies before
//! evaluating an answer with sympy: unknown names become `Symbol('x')` (or
//! `Function('f')` before a parenthesis), numbers become `Integer(..)` /
//! `Float('..')`, `!` becomes `factorial(..)`, multi-letter names are split
//! into letters (`xy` -> `x*y`, `x2` -> `x*2`), and multiplication and
//! function application are made implicit (`2x`, `(a)(b)`, `2sqrt(2)`).
//!
//! The rewrites follow sympy's `parse_expr` with `standard_transformations`
//! plus `implicit_multiplication_application`, token for token, because
//! their quirks decide answers (`x1` is `x*1`, `012` is `0*12`).

use crate::reward::pystr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Name,
    Number,
    Op,
    /// A character Python cannot tokenize (`!`, `√`, `$`, ...).
    Error,
    Newline,
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tok {
    pub kind: Kind,
    pub text: String,
}

impl Tok {
    fn new(kind: Kind, text: impl Into<String>) -> Tok {
        Tok {
            kind,
            text: text.into(),
        }
    }

    fn is_op(&self, text: &str) -> bool {
        self.kind == Kind::Op && self.text == text
    }
}

/// The tokenizer or a rewrite failed, as the reference's would raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError;

/// Operators Python knows, longest first (the tokenizer prefers them so).
const OPERATORS: &[&str] = &[
    "**=", "//=", ">>=", "<<=", "...", "!=", "%=", "&=", "**", "*=", "+=", "-=", "->", "//", "/=",
    ":=", "<<", "<=", "==", ">=", ">>", "@=", "^=", "|=", "%", "&", "(", ")", "*", "+", ",", "-",
    ".", "/", ":", ";", "<", "=", ">", "@", "[", "]", "^", "{", "|", "}", "~",
];

/// Names the reference's evaluation namespace defines (sympy's `*` plus
/// Python's builtin functions) that an answer of at most two distinct
/// letters can spell, and the names the rewrites themselves introduce.
/// `true` = callable.
fn known_name(name: &str) -> Option<bool> {
    Some(match name {
        "nan" | "oo" | "pi" | "zoo" | "I" => false,
        "gff" | "rf" | "ff" | "sqrt" | "re" | "im" | "csc" | "ln" | "frac" | "li" | "jn" | "yn"
        | "hn1" | "hn2" | "fft" | "ntt" | "fu" | "eye" | "all" | "id" | "Symbol" | "Function"
        | "Integer" | "Float" | "Number" | "Rational" | "factorial" | "factorial2" => true,
        _ => return None,
    })
}

fn is_callable(t: &Tok) -> bool {
    t.kind == Kind::Name && known_name(&t.text) == Some(true)
}

const KEYWORDS: &[&str] = &[
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue",
    "def", "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import",
    "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while",
    "with", "yield",
];

/// Python's tokenizer on one line of source (after `str.strip()`), ending
/// with NEWLINE and ENDMARKER.
pub fn tokenize(src: &str) -> Result<Vec<Tok>, TokenError> {
    let c: Vec<char> = pystr::strip(src).chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut depth = 0i32;
    while i < c.len() {
        let ch = c[i];
        if ch == ' ' || ch == '\t' || ch == '\u{c}' {
            i += 1;
            continue;
        }
        if ch == '\n' || ch == '\r' || ch == '#' || ch == '\\' || ch == '\'' || ch == '"' {
            // Multi-line input, comments, continuations and strings never
            // make a number here.
            return Err(TokenError);
        }
        if let Some(len) = number_len(&c[i..]) {
            out.push(Tok::new(
                Kind::Number,
                c[i..i + len].iter().collect::<String>(),
            ));
            i += len;
            continue;
        }
        if let Some(op) = OPERATORS.iter().find(|op| starts_with(&c[i..], op)) {
            match *op {
                "(" | "[" | "{" => depth += 1,
                ")" | "]" | "}" => depth -= 1,
                _ => {}
            }
            out.push(Tok::new(Kind::Op, *op));
            i += op.chars().count();
            continue;
        }
        if is_word(ch) {
            let start = i;
            while i < c.len() && is_word(c[i]) {
                i += 1;
            }
            out.push(Tok::new(Kind::Name, c[start..i].iter().collect::<String>()));
            continue;
        }
        out.push(Tok::new(Kind::Error, ch.to_string()));
        i += 1;
    }
    if depth > 0 {
        // "EOF in multi-line statement".
        return Err(TokenError);
    }
    out.push(Tok::new(Kind::Newline, ""));
    out.push(Tok::new(Kind::End, ""));
    Ok(out)
}

fn is_word(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

fn starts_with(c: &[char], pat: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    c.len() >= p.len() && c[..p.len()] == p[..]
}

/// Length of the number Python's tokenizer reads at the start of `c`, if
/// any. The alternatives are tried in the tokenizer's order (imaginary,
/// float, integer), each greedy: so `012` reads `0` and then `12`.
fn number_len(c: &[char]) -> Option<usize> {
    // [0-9](?:_?[0-9])*
    let digits = |from: usize| -> usize {
        if from >= c.len() || !c[from].is_ascii_digit() {
            return 0;
        }
        let mut k = from + 1;
        loop {
            if k < c.len() && c[k].is_ascii_digit() {
                k += 1;
            } else if k + 1 < c.len() && c[k] == '_' && c[k + 1].is_ascii_digit() {
                k += 2;
            } else {
                return k - from;
            }
        }
    };
    let exponent = |from: usize| -> usize {
        if from < c.len() && (c[from] == 'e' || c[from] == 'E') {
            let mut k = from + 1;
            if k < c.len() && (c[k] == '+' || c[k] == '-') {
                k += 1;
            }
            let d = digits(k);
            if d > 0 {
                return k + d - from;
            }
        }
        0
    };
    let float = || -> Option<usize> {
        let int = digits(0);
        // Pointfloat: digits '.' [digits] | '.' digits; then [exponent].
        let point = if int > 0 && c.get(int) == Some(&'.') {
            Some(int + 1 + digits(int + 1))
        } else if int == 0 && c.first() == Some(&'.') && digits(1) > 0 {
            Some(1 + digits(1))
        } else {
            None
        };
        if let Some(p) = point {
            return Some(p + exponent(p));
        }
        // Expfloat: digits exponent.
        let e = exponent(int);
        (int > 0 && e > 0).then_some(int + e)
    };
    let is_j = |k: usize| c.get(k).is_some_and(|&ch| ch == 'j' || ch == 'J');
    let int = digits(0);
    if int > 0 && is_j(int) {
        return Some(int + 1);
    }
    if let Some(f) = float() {
        if is_j(f) {
            return Some(f + 1);
        }
        return Some(f);
    }
    if int == 0 {
        return None;
    }
    if c[0] == '0' && c.len() > 1 {
        let radix_ok = |ch: char, r: char| match r {
            'x' | 'X' => ch.is_ascii_hexdigit(),
            'b' | 'B' => ch == '0' || ch == '1',
            _ => ('0'..='7').contains(&ch),
        };
        if "xXbBoO".contains(c[1]) {
            let mut k = 2;
            let r = c[1];
            loop {
                if k < c.len() && radix_ok(c[k], r) {
                    k += 1;
                } else if k + 1 < c.len() && c[k] == '_' && radix_ok(c[k + 1], r) {
                    k += 2;
                } else {
                    break;
                }
            }
            if k > 2 {
                return Some(k);
            }
        }
        // Decimal integers with a leading zero are only zeros.
        let mut k = 1;
        loop {
            if k < c.len() && c[k] == '0' {
                k += 1;
            } else if k + 1 < c.len() && c[k] == '_' && c[k + 1] == '0' {
                k += 2;
            } else {
                return Some(k);
            }
        }
    }
    Some(int)
}

/// All of the reference's rewrites, in its order.
pub fn transform(tokens: Vec<Tok>) -> Result<Vec<Tok>, TokenError> {
    let t = auto_symbol(tokens);
    let t = auto_number(t);
    let t = factorial_notation(t)?;
    let t = split_symbols(t);
    let t = implicit_multiplication(t)?;
    let t = implicit_application(t)?;
    Ok(function_exponentiation(t))
}

fn quoted(name: &str) -> String {
    format!("'{name}'")
}

fn auto_symbol(tokens: Vec<Tok>) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut prev: Option<Tok> = None;
    for (k, tok) in tokens.iter().enumerate() {
        let next = tokens.get(k + 1);
        if tok.kind == Kind::Name {
            let name = &tok.text;
            let after_dot = prev.as_ref().is_some_and(|p| p.is_op("."));
            let keyword_arg = prev.as_ref().is_some_and(|p| p.is_op("(") || p.is_op(","))
                && next.is_some_and(|n| n.is_op("="));
            if KEYWORDS.contains(&name.as_str()) || after_dot || keyword_arg {
                out.push(tok.clone());
                continue;
            }
            if known_name(name).is_some() {
                out.push(tok.clone());
                continue;
            }
            let ctor = if next.is_some_and(|n| n.is_op("(")) {
                "Function"
            } else {
                "Symbol"
            };
            out.push(Tok::new(Kind::Name, ctor));
            out.push(Tok::new(Kind::Op, "("));
            out.push(Tok::new(Kind::Name, quoted(name)));
            out.push(Tok::new(Kind::Op, ")"));
        } else {
            out.push(tok.clone());
        }
        prev = Some(tok.clone());
    }
    out
}

fn auto_number(tokens: Vec<Tok>) -> Vec<Tok> {
    let mut out = Vec::new();
    for tok in tokens {
        if tok.kind != Kind::Number {
            out.push(tok);
            continue;
        }
        let mut number = tok.text.clone();
        let mut postfix = Vec::new();
        if number.ends_with(['j', 'J']) {
            number.pop();
            postfix = vec![Tok::new(Kind::Op, "*"), Tok::new(Kind::Name, "I")];
        }
        let lower = number.to_ascii_lowercase();
        let is_float = number.contains('.') || (lower.contains('e') && !lower.starts_with("0x"));
        if is_float {
            out.push(Tok::new(Kind::Name, "Float"));
            out.push(Tok::new(Kind::Op, "("));
            out.push(Tok::new(Kind::Number, quoted(&number)));
        } else {
            out.push(Tok::new(Kind::Name, "Integer"));
            out.push(Tok::new(Kind::Op, "("));
            out.push(Tok::new(Kind::Number, number));
        }
        out.push(Tok::new(Kind::Op, ")"));
        out.extend(postfix);
    }
    out
}

fn factorial_notation(tokens: Vec<Tok>) -> Result<Vec<Tok>, TokenError> {
    let mut out: Vec<Tok> = Vec::new();
    let mut bangs = 0;
    for tok in tokens {
        if tok.kind == Kind::Error {
            if tok.text == "!" {
                bangs += 1;
            } else {
                bangs = 0;
                out.push(Tok::new(Kind::Op, tok.text));
            }
            continue;
        }
        match bangs {
            0 => {}
            1 => out = wrap_previous("factorial", out)?,
            2 => out = wrap_previous("factorial2", out)?,
            _ => return Err(TokenError),
        }
        bangs = 0;
        out.push(tok);
    }
    Ok(out)
}

/// Wraps the last operand (a parenthesised group with its function name, or
/// one token) in `name(...)`.
fn wrap_previous(name: &str, result: Vec<Tok>) -> Result<Vec<Tok>, TokenError> {
    if result.is_empty() || result.last().is_some_and(|t| t.text == "(") {
        return Err(TokenError);
    }
    let mut diff = 0;
    for i in (0..result.len()).rev() {
        match result[i].text.as_str() {
            ")" => diff += 1,
            "(" => diff -= 1,
            _ => {}
        }
        if diff == 0 {
            let at = if i >= 1 && result[i - 1].kind == Kind::Name {
                i - 1
            } else {
                i
            };
            let mut out = result[..at].to_vec();
            out.push(Tok::new(Kind::Name, name));
            out.push(Tok::new(Kind::Op, "("));
            out.extend_from_slice(&result[at..]);
            out.push(Tok::new(Kind::Op, ")"));
            return Ok(out);
        }
    }
    Ok(result)
}

/// Greek letter names Python's `unicodedata.lookup` knows as
/// "GREEK SMALL LETTER <name>"; sympy keeps such symbol names whole.
fn is_greek_name(name: &str) -> bool {
    const GREEK: &[&str] = &[
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
        "lamda", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon",
        "phi", "chi", "psi", "omega", "digamma", "koppa", "sampi", "stigma", "heta", "san", "sho",
        "yot",
    ];
    GREEK.contains(&name.to_lowercase().as_str())
}

fn splittable(name: &str) -> bool {
    !name.contains('_') && !is_greek_name(name) && name.chars().count() > 1
}

fn split_symbols(tokens: Vec<Tok>) -> Vec<Tok> {
    let mut out: Vec<Tok> = Vec::new();
    let mut split = false;
    let mut skip_close = false;
    for tok in tokens {
        if skip_close {
            skip_close = false;
            continue;
        }
        if tok.kind == Kind::Name && (tok.text == "Symbol" || tok.text == "Function") {
            split = true;
        } else if split && tok.kind == Kind::Name {
            let symbol: String = {
                let t: Vec<char> = tok.text.chars().collect();
                t[1..t.len().saturating_sub(1).max(1)].iter().collect()
            };
            if splittable(&symbol) {
                out.truncate(out.len().saturating_sub(2));
                let chars: Vec<char> = symbol.chars().collect();
                let mut i = 0;
                while i < chars.len() {
                    let ch = chars[i];
                    if known_name(&ch.to_string()).is_some() {
                        out.push(Tok::new(Kind::Name, ch.to_string()));
                    } else if is_digit(ch) {
                        let mut run = String::from(ch);
                        while i + 1 < chars.len() && is_digit(chars[i + 1]) {
                            i += 1;
                            run.push(chars[i]);
                        }
                        push_call(&mut out, "Number", &run);
                    } else {
                        push_call(&mut out, "Symbol", &ch.to_string());
                    }
                    i += 1;
                }
                split = false;
                skip_close = true;
                continue;
            }
            split = false;
        }
        out.push(tok);
    }
    out
}

/// Python's `str.isdigit` for the characters a name can hold.
fn is_digit(c: char) -> bool {
    pystr::is_decimal(c) || "¹²³⁰⁴⁵⁶⁷⁸⁹".contains(c)
}

fn push_call(out: &mut Vec<Tok>, ctor: &str, arg: &str) {
    out.push(Tok::new(Kind::Name, ctor));
    out.push(Tok::new(Kind::Op, "("));
    out.push(Tok::new(Kind::Name, quoted(arg)));
    out.push(Tok::new(Kind::Op, ")"));
}

/// A token, a parenthesised group, or a function applied to a group.
#[derive(Debug, Clone)]
enum Item {
    T(Tok),
    Group(Vec<Tok>),
    Applied { func: Tok, args: Vec<Tok> },
}

impl Item {
    fn tok(&self) -> Option<&Tok> {
        match self {
            Item::T(t) => Some(t),
            _ => None,
        }
    }

    fn is_name(&self) -> bool {
        self.tok().is_some_and(|t| t.kind == Kind::Name)
    }

    fn is_op(&self, s: &str) -> bool {
        self.tok().is_some_and(|t| t.is_op(s))
    }

    fn is_applied(&self) -> bool {
        matches!(self, Item::Applied { .. })
    }
}

type Pass = fn(Vec<Tok>) -> Result<Vec<Tok>, TokenError>;

/// Groups top-level parentheses, running `inner` over each group's content.
fn group_parentheses(tokens: Vec<Tok>, inner: Pass) -> Result<Vec<Item>, TokenError> {
    let mut out = Vec::new();
    let mut stacks: Vec<Vec<Tok>> = Vec::new();
    for tok in tokens {
        if tok.is_op("(") {
            stacks.push(vec![tok]);
            continue;
        }
        if tok.is_op(")") {
            let mut stack = stacks.pop().ok_or(TokenError)?;
            stack.push(tok);
            if let Some(top) = stacks.last_mut() {
                top.extend(stack);
            } else {
                let open = stack.remove(0);
                let close = stack.pop().ok_or(TokenError)?;
                let mut group = vec![open];
                group.extend(inner(stack)?);
                group.push(close);
                out.push(Item::Group(group));
            }
            continue;
        }
        match stacks.last_mut() {
            Some(top) => top.push(tok),
            None => out.push(Item::T(tok)),
        }
    }
    if !stacks.is_empty() {
        return Err(TokenError);
    }
    Ok(out)
}

fn apply_functions(items: Vec<Item>) -> Vec<Item> {
    let mut out: Vec<Item> = Vec::new();
    let mut symbol: Option<Tok> = None;
    for item in items {
        match item {
            Item::Group(g) => match symbol.take() {
                Some(func) if is_callable(&func) => {
                    out.pop();
                    out.push(Item::Applied { func, args: g });
                }
                _ => out.extend(g.into_iter().map(Item::T)),
            },
            Item::T(t) if t.kind == Kind::Name => {
                symbol = Some(t.clone());
                out.push(Item::T(t));
            }
            other => {
                symbol = None;
                out.push(other);
            }
        }
    }
    out
}

fn flatten(items: Vec<Item>) -> Vec<Tok> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::T(t) => out.push(t),
            Item::Group(g) => out.extend(g),
            Item::Applied { func, args } => {
                out.push(func);
                out.extend(args);
            }
        }
    }
    out
}

fn star() -> Item {
    Item::T(Tok::new(Kind::Op, "*"))
}

fn implicit_multiplication(tokens: Vec<Tok>) -> Result<Vec<Tok>, TokenError> {
    let mut items = apply_functions(group_parentheses(tokens, implicit_multiplication)?);
    let mut out: Vec<Item> = Vec::new();
    let mut skip = false;
    let n = items.len();
    for k in 0..n.saturating_sub(1) {
        let next_is_open = items[k + 1].is_op("(");
        let next_applied = items[k + 1].is_applied();
        let next_name = items[k + 1].is_name();
        let tok_item = &mut items[k];
        // The function of an applied `Function('f')(..)` followed by `(`
        // turns into a symbol: `f(x)(y)` is `f*x*y`-like.
        if let Item::Applied { func, .. } = tok_item {
            if next_is_open && func.text == "Function" && !skip {
                func.text = "Symbol".into();
            }
        }
        let tok = items[k].clone();
        out.push(tok.clone());
        if skip {
            skip = false;
            continue;
        }
        if tok.is_op(".") && next_name {
            skip = true;
            continue;
        }
        let insert = if tok.is_applied() {
            next_applied || next_is_open || next_name
        } else if tok.is_op(")") {
            next_applied || next_name || next_is_open
        } else if tok.is_name() && !tok.tok().is_some_and(is_callable) {
            // (The reference also tests "a callable name follows", which
            // the plain "a name follows" already covers.)
            next_applied || next_is_open || next_name
        } else {
            false
        };
        if insert {
            out.push(star());
        }
    }
    if let Some(last) = items.last() {
        out.push(last.clone());
    }
    Ok(flatten(out))
}

fn implicit_application(tokens: Vec<Tok>) -> Result<Vec<Tok>, TokenError> {
    let items = apply_functions(group_parentheses(tokens, implicit_application)?);
    let mut out: Vec<Item> = Vec::new();
    let mut append_paren = 0;
    let mut skip = 0;
    let mut exponent_skip = false;
    let open = || Item::T(Tok::new(Kind::Op, "("));
    let close = || Item::T(Tok::new(Kind::Op, ")"));
    for k in 0..items.len().saturating_sub(1) {
        let tok = &items[k];
        let next = &items[k + 1];
        out.push(tok.clone());
        let next_kind_plain = match next {
            Item::T(t) => !matches!(t.kind, Kind::Op | Kind::End | Kind::Newline),
            // An applied function is not a plain token: the reference's
            // kind test sees a tuple there and lets it through.
            _ => true,
        };
        if tok.is_name() && next_kind_plain {
            if tok.tok().is_some_and(is_callable) {
                out.push(open());
                append_paren += 1;
            }
        } else if tok.is_name() && next.is_op("**") {
            if tok.tok().is_some_and(is_callable) {
                exponent_skip = true;
            }
        } else if exponent_skip {
            if (tok.is_applied() || tok.is_op("*")) && !next.is_op("*") {
                if !next.is_op("(") {
                    out.push(open());
                    append_paren += 1;
                }
                exponent_skip = false;
            }
        } else if append_paren > 0 {
            if next.is_op("^") || next.is_op("**") || next.is_op("*") {
                skip = 1;
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            out.push(close());
            append_paren -= 1;
        }
    }
    if let Some(last) = items.last() {
        out.push(last.clone());
    }
    for _ in 0..append_paren {
        out.push(close());
    }
    Ok(flatten(out))
}

fn function_exponentiation(tokens: Vec<Tok>) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut exponent: Vec<Tok> = Vec::new();
    let mut consuming = false;
    let mut level = 0;
    for k in 0..tokens.len().saturating_sub(1) {
        let mut tok = tokens[k].clone();
        let next = &tokens[k + 1];
        if tok.kind == Kind::Name && next.is_op("**") {
            if is_callable(&tok) {
                consuming = true;
            }
        } else if consuming {
            if tok.kind == Kind::Name && tok.text == "Function" {
                tok.text = "Symbol".into();
            }
            exponent.push(tok.clone());
            if tok.is_op(")") && next.is_op("(") {
                consuming = false;
            }
            if tok.is_op("*") && next.is_op("(") {
                consuming = false;
                exponent.pop();
            }
            continue;
        } else if !exponent.is_empty() && !consuming {
            if tok.kind == Kind::Op {
                if tok.text == "(" {
                    level += 1;
                } else if tok.text == ")" {
                    level -= 1;
                }
            }
            if level == 0 {
                out.push(tok);
                out.append(&mut exponent);
                continue;
            }
        }
        out.push(tok);
    }
    if let Some(last) = tokens.last() {
        out.push(last.clone());
    }
    out.append(&mut exponent);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(src: &str) -> String {
        let toks = transform(tokenize(src).unwrap()).unwrap();
        toks.iter().map(|t| t.text.as_str()).collect()
    }

    #[test]
    fn numbers_split_like_python() {
        let texts =
            |s: &str| -> Vec<String> { tokenize(s).unwrap().into_iter().map(|t| t.text).collect() };
        assert_eq!(texts("012"), vec!["0", "12", "", ""]);
        assert_eq!(texts("1.5e3x"), vec!["1.5e3", "x", "", ""]);
        assert_eq!(texts("1e"), vec!["1", "e", "", ""]);
        assert_eq!(texts("2**-1"), vec!["2", "**", "-", "1", "", ""]);
    }

    #[test]
    fn implicit_products_and_symbols() {
        assert_eq!(code("2x"), "Integer(2)*Symbol('x')");
        assert_eq!(code("xy"), "Symbol('x')*Symbol('y')");
        assert_eq!(code("x1"), "Symbol('x')*Number('1')");
        assert_eq!(code("2sqrt(2)"), "Integer(2)*sqrt(Integer(2))");
        assert_eq!(code("(1)(2)"), "(Integer(1))*(Integer(2))");
        assert_eq!(code("x(x+1)"), "Symbol('x')*(Symbol('x')+Integer(1))");
        assert_eq!(code("5!"), "factorial(Integer(5))");
        assert_eq!(code("mu"), "Symbol('mu')");
    }

    #[test]
    fn unbalanced_parentheses_fail() {
        assert!(tokenize("(1").is_err());
        assert!(transform(tokenize("1)").unwrap()).is_err());
    }
}
