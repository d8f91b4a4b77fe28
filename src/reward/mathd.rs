//! The first, string-only comparison of the reference grader: the answer
//! normalisation of the MATH data set (as shipped in PRM800K and mathruler).
//!
//! It rewrites LaTeX spellings into one form (`\dfrac` -> `\frac`, `\frac12`
//! -> `\frac{1}{2}`, `a/b` -> `\frac{a}{b}`, `0.5` -> `\frac{1}{2}`), drops
//! degrees, dollars, percent signs, units after `\text{ ` and short `x=`
//! prefixes. Where the reference code would raise (an empty `\sqrt` or
//! `\frac` tail, two unit markers), it returns the input unchanged, as the
//! reference's `except` does.

use super::pystr;

/// `normalize_answer`: strip, unwrap a whole-answer `\text{...}`, then
/// normalise; on a would-be exception, the unwrapped answer as it was.
pub fn normalize_answer(answer: &str) -> String {
    let answer = pystr::strip(answer);
    let answer = match unwrap_text(answer) {
        Some(inner) => pystr::strip(inner),
        None => answer,
    };
    strip_string(answer).unwrap_or_else(|| answer.to_string())
}

/// The reference's `^\\text\{(?P<text>.+?)\}$`: the whole string is one
/// `\text{...}` whose content has no newline. Python's `$` also matches
/// before a final newline.
pub fn unwrap_text(s: &str) -> Option<&str> {
    let rest = s.strip_prefix("\\text{")?;
    let inner = rest
        .strip_suffix("}\n")
        .or_else(|| rest.strip_suffix('}'))?;
    (!inner.is_empty() && !inner.contains('\n')).then_some(inner)
}

/// `_strip_string`; `None` where the reference raises.
fn strip_string(s: &str) -> Option<String> {
    let mut s = s.replace('\n', "");
    s = s.replace("\\!", "");
    s = s.replace("\\\\", "\\");
    s = s.replace("tfrac", "frac").replace("dfrac", "frac");
    s = s.replace("\\left", "").replace("\\right", "");
    s = s.replace("^{\\circ}", "").replace("^\\circ", "");
    s = s.replace("\\$", "");
    s = remove_right_units(&s)?;
    s = s.replace("\\%", "").replace('%', "");
    s = s.replace(" .", " 0.").replace("{.", "{0.");
    if s.is_empty() {
        return Some(s);
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    // A short left-hand side ("x = ", "k=") is dropped.
    let parts: Vec<&str> = s.split('=').collect();
    if parts.len() == 2 && parts[0].chars().count() <= 2 {
        s = parts[1].to_string();
    }
    s = fix_sqrt(&s)?;
    s = s.replace(' ', "");
    s = fix_fracs(&s)?;
    if s == "0.5" {
        s = "\\frac{1}{2}".to_string();
    }
    Some(fix_a_slash_b(&s))
}

/// Units are written `\text{ unit}` in MATH; everything from there on goes.
/// Two such markers make the reference's assertion fail.
fn remove_right_units(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split("\\text{ ").collect();
    match parts.len() {
        1 => Some(s.to_string()),
        2 => Some(parts[0].to_string()),
        _ => None,
    }
}

/// `\sqrt3` -> `\sqrt{3}` (one character); an empty tail raises.
fn fix_sqrt(s: &str) -> Option<String> {
    if !s.contains("\\sqrt") {
        return Some(s.to_string());
    }
    let mut parts = s.split("\\sqrt");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts {
        let first = part.chars().next()?;
        if first == '{' {
            out.push_str("\\sqrt");
            out.push_str(part);
        } else {
            out.push_str("\\sqrt{");
            out.push(first);
            out.push('}');
            out.push_str(&part[first.len_utf8()..]);
        }
    }
    Some(out)
}

/// `\frac12` -> `\frac{1}{2}`, `\frac1{72}` -> `\frac{1}{72}`; a one-char
/// tail gives up (returns the input), an empty tail raises.
fn fix_fracs(s: &str) -> Option<String> {
    let mut parts = s.split("\\frac");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts {
        out.push_str("\\frac");
        let mut chars = part.chars();
        let a = chars.next()?;
        if a == '{' {
            out.push_str(part);
            continue;
        }
        let Some(b) = chars.next() else {
            return Some(s.to_string());
        };
        let tail = chars.as_str();
        if b != '{' {
            out.push_str(&format!("{{{a}}}{{{b}}}{tail}"));
        } else {
            out.push_str(&format!("{{{a}}}{b}{tail}"));
        }
    }
    Some(out)
}

/// `a/b` with two integers printed canonically -> `\frac{a}{b}`.
fn fix_a_slash_b(s: &str) -> String {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() == 2 && is_canonical_int(parts[0]) && is_canonical_int(parts[1]) {
        format!("\\frac{{{}}}{{{}}}", parts[0], parts[1])
    } else {
        s.to_string()
    }
}

/// True where `str(int(x)) == x`: ASCII digits, no leading zeros, an
/// optional minus, and not "-0".
fn is_canonical_int(x: &str) -> bool {
    let digits = x.strip_prefix('-').unwrap_or(x);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && x != "-0"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_take_one_form() {
        assert_eq!(normalize_answer("\\dfrac12"), "\\frac{1}{2}");
        assert_eq!(normalize_answer("3/4"), "\\frac{3}{4}");
        assert_eq!(normalize_answer("0.5"), "\\frac{1}{2}");
        assert_eq!(normalize_answer("03/4"), "03/4");
    }

    #[test]
    fn raising_inputs_come_back_unchanged() {
        assert_eq!(normalize_answer("2\\sqrt"), "2\\sqrt");
        assert_eq!(
            normalize_answer("a\\text{ b}\\text{ c}"),
            "a\\text{ b}\\text{ c}"
        );
        assert_eq!(normalize_answer("\\frac"), "\\frac");
    }

    #[test]
    fn short_left_hand_sides_go() {
        assert_eq!(normalize_answer("x = 3"), "3");
        assert_eq!(normalize_answer("abc=3"), "abc=3");
    }
}
