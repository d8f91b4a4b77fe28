//! Python's string and number semantics, as far as the reference grader
//! leans on them: which characters `str.strip`, `\s`, `\d` and `isalpha`
//! see, what `float()` accepts, and how `str(int(x))` prints a float.
//!
//! The grader is specified by Python code, so "whitespace", "digit" and
//! "letter" mean Python's definitions, which differ from Rust's at the edges
//! (e.g. U+001C..U+001F are Python whitespace, circled letters are Rust
//! alphabetic but not Python letters).

/// `str.isspace()` (and so `\s`, `str.strip()`): Rust's White_Space plus the
/// four ASCII information separators that Python also counts.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip()` with no argument.
pub fn strip(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// The first code point of every run of ten decimal digits (Unicode category
/// Nd). Python's `\d`, `int()` and `float()` accept all of these.
const ND_ZEROS: &[u32] = &[
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
    0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650,
    0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x11F50, 0x16A60, 0x16AC0,
    0x16B50, 0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E4F0, 0x1E950,
    0x1FBF0,
];

/// The value of a decimal digit (category Nd), as Python's `\d` sees it.
pub fn decimal_value(c: char) -> Option<u32> {
    let cp = c as u32;
    ND_ZEROS
        .iter()
        .find(|&&z| (z..z + 10).contains(&cp))
        .map(|&z| cp - z)
}

pub fn is_decimal(c: char) -> bool {
    decimal_value(c).is_some()
}

/// `str.isalpha()` for one character: letters only. Rust's `is_alphabetic`
/// also admits letter numbers and some marks and symbols; the common ones
/// are taken out here.
pub fn is_alpha(c: char) -> bool {
    if !c.is_alphabetic() {
        return false;
    }
    let cp = c as u32;
    let not_letters = [
        (0x0345, 0x0345), // combining iota subscript
        (0x16EE, 0x16F0), // runic letter numbers
        (0x2160, 0x2188), // roman numerals
        (0x24B6, 0x24E9), // circled letters (symbols)
        (0x3007, 0x3007),
        (0x3021, 0x3029),
        (0x3038, 0x303A),
        (0x1F130, 0x1F189), // squared and circled latin capitals
    ];
    !not_letters.iter().any(|&(lo, hi)| (lo..=hi).contains(&cp))
}

/// Python's `float(s)`: surrounding whitespace, a sign, digits (any Nd,
/// underscores only between digits), an optional fraction and exponent, or
/// inf/infinity/nan in any case. Out-of-range values become infinities, as in
/// Python.
pub fn parse_float(s: &str) -> Option<f64> {
    let s = strip(s);
    let mut ascii = String::with_capacity(s.len());
    for c in s.chars() {
        match decimal_value(c) {
            Some(d) => ascii.push(char::from_digit(d, 10)?),
            None if c.is_ascii() => ascii.push(c),
            None => return None,
        }
    }
    let (sign, body) = match ascii.as_bytes().first() {
        Some(b'+') => (1.0, &ascii[1..]),
        Some(b'-') => (-1.0, &ascii[1..]),
        _ => (1.0, &ascii[..]),
    };
    let lower = body.to_ascii_lowercase();
    if lower == "inf" || lower == "infinity" {
        return Some(sign * f64::INFINITY);
    }
    if lower == "nan" {
        return Some(f64::NAN);
    }
    let cleaned = check_decimal_literal(body)?;
    cleaned.parse::<f64>().ok().map(|v| sign * v)
}

/// Validates `digits[.digits][e[+-]digits]` with Python's underscore rule and
/// returns it without underscores.
fn check_decimal_literal(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = String::with_capacity(s.len());
    // Reads digits with single underscores between them; returns the count.
    let digits = |i: &mut usize, out: &mut String| -> Option<usize> {
        let mut n = 0;
        while *i < b.len() {
            if b[*i].is_ascii_digit() {
                out.push(b[*i] as char);
                n += 1;
                *i += 1;
            } else if b[*i] == b'_' && n > 0 && *i + 1 < b.len() && b[*i + 1].is_ascii_digit() {
                *i += 1;
            } else {
                break;
            }
        }
        Some(n)
    };
    let int_digits = digits(&mut i, &mut out)?;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        out.push('.');
        i += 1;
        frac_digits = digits(&mut i, &mut out)?;
    }
    if int_digits + frac_digits == 0 {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        out.push('e');
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            out.push(b[i] as char);
            i += 1;
        }
        if digits(&mut i, &mut out)? == 0 {
            return None;
        }
    }
    (i == b.len()).then_some(out)
}

/// Python's `_is_int`-style test `abs(x - int(round(x))) <= 1e-7`, which
/// raises (and so answers no) for infinities and NaN.
pub fn is_near_int(x: f64) -> bool {
    x.is_finite() && (x - x.round_ties_even()).abs() <= 1e-7
}

/// `str(int(x))` for a finite float that is already integral: the exact
/// decimal digits of the float's value.
pub fn integral_float_to_string(x: f64) -> String {
    debug_assert!(x.is_finite() && x.fract() == 0.0);
    if x.abs() < 1e30 {
        return format!("{}", x as i128);
    }
    // Beyond i128: mantissa * 2^exp, doubled exactly in base 1e9 limbs.
    let bits = x.abs().to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64 - 1075;
    let mantissa = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
    let mut limbs: Vec<u64> = vec![mantissa % 1_000_000_000, mantissa / 1_000_000_000];
    for _ in 0..exp {
        let mut carry = 0;
        for limb in limbs.iter_mut() {
            let v = *limb * 2 + carry;
            *limb = v % 1_000_000_000;
            carry = v / 1_000_000_000;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    while limbs.len() > 1 && limbs.last() == Some(&0) {
        limbs.pop();
    }
    let mut s = String::new();
    if x < 0.0 {
        s.push('-');
    }
    s.push_str(&limbs.last().unwrap_or(&0).to_string());
    for limb in limbs.iter().rev().skip(1) {
        s.push_str(&format!("{limb:09}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_syntax_follows_python() {
        assert_eq!(parse_float(" 1_000 "), Some(1000.0));
        assert_eq!(parse_float("1__0"), None);
        assert_eq!(parse_float("_1"), None);
        assert_eq!(parse_float(".5"), Some(0.5));
        assert_eq!(parse_float("5."), Some(5.0));
        assert_eq!(parse_float("."), None);
        assert_eq!(parse_float("1e3"), Some(1000.0));
        assert_eq!(parse_float("1e"), None);
        assert_eq!(parse_float("-Infinity"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_float("\u{663}"), Some(3.0));
        assert_eq!(parse_float("1,000"), None);
        assert_eq!(parse_float("0x10"), None);
    }

    #[test]
    fn large_integral_floats_print_exactly() {
        assert_eq!(integral_float_to_string(-3.0), "-3");
        assert_eq!(integral_float_to_string(1e20), "100000000000000000000");
        // 2^100 is exactly representable; its digits are known.
        assert_eq!(
            integral_float_to_string(2f64.powi(100)),
            "1267650600228229401496703205376"
        );
    }

    #[test]
    fn python_whitespace_includes_separators() {
        assert!(is_space('\u{1f}'));
        assert!(is_space('\u{3000}'));
        assert!(!is_space('\u{200b}'));
        assert_eq!(strip("\u{a0} x \n"), "x");
    }
}
