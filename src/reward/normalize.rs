//! The second comparison of the reference grader (PRM800K's `_normalize`):
//! strip `\text{}`, dollars, percent signs, units, degrees, thousands
//! separators; turn LaTeX into plain text; lower-case. Its output is what the
//! symbolic fallback parses.

use super::{latex_text, mathd, pystr};

const UNITS: &[&str] = &[
    "degree",
    "cm",
    "centimeter",
    "meter",
    "mile",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "year",
    "foot",
    "feet",
    "inch",
    "yard",
];

/// `_normalize`.
pub fn normalize(expr: &str) -> String {
    let mut e = match mathd::unwrap_text(expr) {
        Some(inner) => inner.to_string(),
        None => expr.to_string(),
    };
    e = e.replace("\\%", "%").replace("\\$", "$");
    e = e.replace(['$', '%'], "");
    e = e.replace(" or ", " , ").replace(" and ", " , ");
    e = e.replace("million", "*10^6");
    e = e.replace("billion", "*10^9");
    e = e.replace("trillion", "*10^12");
    for unit in UNITS {
        e = remove_unit(&e, unit);
    }
    e = remove_circ(&e);
    if e.starts_with('{') && e.ends_with('}') {
        e = e[1..e.len() - 1].to_string();
    }
    e = remove_comma_bang(&e);
    if let Some(v) = pystr::parse_float(&e) {
        if pystr::is_near_int(v) {
            e = pystr::integral_float_to_string(v.round_ties_even());
        }
    }
    if e.contains('\\') {
        if let Ok(text) = parse_latex(&e) {
            e = text;
        }
    }
    e = minus_spaces(&e);
    e = mixed_numbers(&e);
    e = e.replace(' ', "");
    e = e.replace(['{', '}'], "");
    e = e.to_lowercase();
    if str_is_int(&e) {
        if let Some(v) = pystr::parse_float(&e.replace(',', "")) {
            e = pystr::integral_float_to_string(v.trunc());
        }
    }
    e
}

/// `_parse_latex`: unify the fraction macros (with a space before, so mixed
/// numbers stay apart), convert, and spell the symbols sympy can read.
fn parse_latex(e: &str) -> Result<String, latex_text::ConversionFailed> {
    let e = e
        .replace("\\tfrac", "\\frac")
        .replace("\\dfrac", "\\frac")
        .replace("\\frac", " \\frac");
    let text = latex_text::latex_to_text(&e)?;
    let text = text
        .replace('√', "sqrt")
        .replace('π', "pi")
        .replace('∞', "inf")
        .replace('∪', "U")
        .replace(['·', '×'], "*");
    Ok(pystr::strip(&text).to_string())
}

/// `re.sub(unit + r"(es)?(s)? *(\^[0-9]+)?", "", e)`.
fn remove_unit(e: &str, unit: &str) -> String {
    let mut out = String::with_capacity(e.len());
    let mut rest = e;
    while let Some(at) = rest.find(unit) {
        out.push_str(&rest[..at]);
        let mut tail = &rest[at + unit.len()..];
        tail = tail.strip_prefix("es").unwrap_or(tail);
        tail = tail.strip_prefix('s').unwrap_or(tail);
        tail = tail.trim_start_matches(' ');
        if let Some(power) = tail.strip_prefix('^') {
            let digits = power.len() - power.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits > 0 {
                tail = &power[digits..];
            }
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// `re.sub(r"\^ *\\circ", "", e)`.
fn remove_circ(e: &str) -> String {
    let mut out = String::with_capacity(e.len());
    let mut rest = e;
    while let Some(at) = rest.find('^') {
        let after = rest[at + 1..].trim_start_matches(' ');
        if let Some(tail) = after.strip_prefix("\\circ") {
            out.push_str(&rest[..at]);
            rest = tail;
        } else {
            out.push_str(&rest[..=at]);
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// `re.sub(",\\\\! *", "", e)`: LaTeX's `,\!` thousands separator.
fn remove_comma_bang(e: &str) -> String {
    let mut out = String::with_capacity(e.len());
    let mut rest = e;
    while let Some(at) = rest.find(",\\!") {
        out.push_str(&rest[..at]);
        rest = rest[at + 3..].trim_start_matches(' ');
    }
    out.push_str(rest);
    out
}

/// `re.sub("- *", "-", e)`.
fn minus_spaces(e: &str) -> String {
    let mut out = String::with_capacity(e.len());
    let mut rest = e;
    while let Some(at) = rest.find('-') {
        out.push_str(&rest[..=at]);
        rest = rest[at + 1..].trim_start_matches(' ');
    }
    out.push_str(rest);
    out
}

/// `_inject_implicit_mixed_number`: `7 3/4` -> `7+3/4` (and, as in the
/// reference, `1 000` -> `1+000`).
fn mixed_numbers(e: &str) -> String {
    let c: Vec<char> = e.chars().collect();
    let mut out = String::with_capacity(e.len());
    let mut i = 0;
    while i < c.len() {
        if c[i].is_ascii_digit() {
            let mut j = i + 1;
            while j < c.len() && c[j] == ' ' {
                j += 1;
            }
            if j > i + 1 && j < c.len() && c[j].is_ascii_digit() {
                out.push(c[i]);
                out.push('+');
                out.push(c[j]);
                i = j + 1;
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

/// `_strip_properly_formatted_commas`: `1,234,567` -> `1234567`, repeated
/// until nothing changes, leaving tuple commas alone.
pub fn strip_thousands_commas(e: &str) -> String {
    let mut cur: Vec<char> = e.chars().collect();
    loop {
        let mut out = Vec::with_capacity(cur.len());
        let mut i = 0;
        let mut changed = false;
        while i < cur.len() {
            let d = |k: usize| cur.get(k).is_some_and(|&c| pystr::is_decimal(c));
            if d(i) && cur.get(i + 1) == Some(&',') && d(i + 2) && d(i + 3) && d(i + 4) && !d(i + 5)
            {
                out.push(cur[i]);
                out.extend_from_slice(&cur[i + 2..i + 5]);
                // The character after the group (if any) is consumed too.
                if let Some(&next) = cur.get(i + 5) {
                    out.push(next);
                    i += 6;
                } else {
                    i += 5;
                }
                changed = true;
            } else {
                out.push(cur[i]);
                i += 1;
            }
        }
        if !changed {
            return cur.into_iter().collect();
        }
        cur = out;
    }
}

/// `_str_is_int`: after removing thousands commas, a float within 1e-7 of
/// an integer.
pub fn str_is_int(x: &str) -> bool {
    pystr::parse_float(&strip_thousands_commas(x)).is_some_and(pystr::is_near_int)
}

/// `_is_frac`: `^-?[0-9]+.?/0*[1-9][0-9]*.?$`, where `.` is any character but
/// a newline and `$` may stand before one final newline.
pub fn is_frac(x: &str) -> bool {
    let x = x.strip_suffix('\n').unwrap_or(x);
    let c: Vec<char> = x.chars().collect();
    let mut i = usize::from(c.first() == Some(&'-'));
    let start = i;
    while i < c.len() && c[i].is_ascii_digit() {
        i += 1;
    }
    if i == start {
        return false;
    }
    // `.?` before the slash: the slash comes now, or after one character.
    let slash_now = c.get(i) == Some(&'/') && denominator_matches(&c[i + 1..]);
    let slash_next = c.get(i).is_some_and(|&ch| ch != '\n')
        && c.get(i + 1) == Some(&'/')
        && denominator_matches(&c[i + 2..]);
    slash_now || slash_next
}

/// `0*[1-9][0-9]*.?$` (no backtracking can change the outcome).
fn denominator_matches(c: &[char]) -> bool {
    let mut j = 0;
    while j < c.len() && c[j] == '0' {
        j += 1;
    }
    if j >= c.len() || !('1'..='9').contains(&c[j]) {
        return false;
    }
    j += 1;
    while j < c.len() && c[j].is_ascii_digit() {
        j += 1;
    }
    let rest = &c[j..];
    rest.is_empty() || (rest.len() == 1 && rest[0] != '\n')
}

/// `split_tuple`: the elements of `(a,b)` / `[a,b)` / ..., or the whole.
pub fn split_tuple(e: &str) -> Vec<String> {
    let e = strip_thousands_commas(e);
    if e.is_empty() {
        return Vec::new();
    }
    let c: Vec<char> = e.chars().collect();
    let brackets = "()[]";
    if c.len() > 2
        && brackets.contains(c[0])
        && brackets.contains(c[c.len() - 1])
        && !c[1..c.len() - 1].iter().any(|&ch| brackets.contains(ch))
    {
        let inner: String = c[1..c.len() - 1].iter().collect();
        inner
            .split(',')
            .map(|p| pystr::strip(p).to_string())
            .collect()
    } else {
        vec![e]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_degrees_go() {
        assert_eq!(normalize("5 cm^2"), "5");
        assert_eq!(normalize("90^\\circ"), "90");
        assert_eq!(normalize("3 hours"), "3");
        assert_eq!(normalize("Monday"), "mon");
    }

    #[test]
    fn numbers_settle_to_integers() {
        assert_eq!(normalize("2.0000001"), "2");
        assert_eq!(normalize("1,000"), "1000");
        assert_eq!(normalize("1e3"), "1000");
        assert_eq!(normalize("7 3/4"), "7+3/4");
    }

    #[test]
    fn latex_becomes_text() {
        assert_eq!(normalize("\\frac{1}{2}"), "1/2");
        assert_eq!(normalize("2\\sqrt{2}"), "2sqrt(2)");
        assert_eq!(normalize("\\text{(A)}"), "(a)");
    }

    #[test]
    fn fraction_shape() {
        assert!(is_frac("1/2"));
        assert!(is_frac("-12/04"));
        assert!(is_frac("1x/2y"));
        assert!(!is_frac("1/0"));
        assert!(!is_frac("1/2xy"));
        assert!(!is_frac("a/2"));
        assert!(is_frac("1//2"));
    }

    #[test]
    fn tuples_split_on_commas() {
        assert_eq!(split_tuple("(1,2)"), vec!["1", "2"]);
        assert_eq!(split_tuple("(1,000)"), vec!["1000"]);
        assert_eq!(split_tuple("((1,2))"), vec!["((1,2))"]);
        assert_eq!(split_tuple("1,2"), vec!["1,2"]);
    }
}
