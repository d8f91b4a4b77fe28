//! Numbers as the reference's CAS (sympy) keeps them, closely enough to
//! decide "is this difference zero": exact rationals stay exact; a value
//! that touched a decimal literal (a sympy `Float`) is carried in f64, which
//! rounds like sympy's default 53-bit floats; irrational values (pi, roots,
//! logarithms) are carried in f64 and compared with a tolerance.

use std::cmp::Ordering;

/// Why a value could not be computed; sympy would produce something that is
/// never equal to zero here (infinity, NaN, complex) or raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undefined;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    /// `n / d`, reduced, `d > 0`.
    Rat(i128, i128),
    /// A decimal literal with more than 15 significant digits, kept exactly:
    /// sympy gives such a `Float` more than 53 bits, so f64 would merge
    /// values it keeps apart.
    Dec(i128, i128),
    /// An approximate value. `float`: a decimal literal took part (only an
    /// exact 0.0 is zero, as in sympy's Float arithmetic). `irr`: an
    /// irrational atom (pi, a root, a logarithm) took part, which sympy
    /// keeps symbolic, so it never cancels against a plain Float.
    Real { v: f64, float: bool, irr: bool },
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    a = a.abs();
    b = b.abs();
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Num {
    pub fn int(n: i128) -> Num {
        Num::Rat(n, 1)
    }

    pub fn rat(n: i128, d: i128) -> Result<Num, Undefined> {
        Num::ratio(n, d, false)
    }

    fn ratio(n: i128, d: i128, dec: bool) -> Result<Num, Undefined> {
        if d == 0 {
            return Err(Undefined);
        }
        let g = gcd(n, d).max(1);
        let (mut n, mut d) = (n / g, d / g);
        if d < 0 {
            n = n.checked_neg().ok_or(Undefined)?;
            d = d.checked_neg().ok_or(Undefined)?;
        }
        Ok(if dec { Num::Dec(n, d) } else { Num::Rat(n, d) })
    }

    /// An irrational constant (pi, a root, a logarithm).
    pub fn irrational(v: f64) -> Result<Num, Undefined> {
        Num::real(v, false, true)
    }

    /// A sympy `Float` of the default precision.
    pub fn float(v: f64) -> Result<Num, Undefined> {
        Num::real(v, true, false)
    }

    /// A decimal literal as sympy reads it: 53-bit up to 15 significant
    /// digits, exact (standing in for sympy's wider precision) beyond.
    pub fn decimal(text: &str) -> Result<Num, Undefined> {
        let lower = text.to_ascii_lowercase();
        let (mantissa, exp) = match lower.split_once('e') {
            Some((m, e)) => (m, e.parse::<i32>().map_err(|_| Undefined)?),
            None => (lower.as_str(), 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = format!("{int}{frac}");
        let significant = digits.trim_start_matches('0').len();
        if significant > 15 {
            let scale = exp - frac.len() as i32;
            let exact = (|| {
                let n: i128 = digits.parse().ok()?;
                let p = 10i128.checked_pow(scale.unsigned_abs())?;
                if scale >= 0 {
                    Some((n.checked_mul(p)?, 1))
                } else {
                    Some((n, p))
                }
            })();
            if let Some((n, d)) = exact {
                return Num::ratio(n, d, true);
            }
        }
        Num::float(text.parse::<f64>().map_err(|_| Undefined)?)
    }

    fn real(v: f64, float: bool, irr: bool) -> Result<Num, Undefined> {
        if v.is_finite() {
            Ok(Num::Real { v, float, irr })
        } else {
            Err(Undefined)
        }
    }

    pub fn to_f64(self) -> f64 {
        match self {
            Num::Rat(n, d) | Num::Dec(n, d) => n as f64 / d as f64,
            Num::Real { v, .. } => v,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Num::Dec(..) | Num::Real { float: true, .. })
    }

    pub fn is_irrational(self) -> bool {
        matches!(self, Num::Real { irr: true, .. })
    }

    pub fn as_integer(self) -> Option<i128> {
        match self {
            Num::Rat(n, 1) => Some(n),
            _ => None,
        }
    }

    fn exact(self) -> Option<(i128, i128)> {
        match self {
            Num::Rat(n, d) | Num::Dec(n, d) => Some((n, d)),
            Num::Real { .. } => None,
        }
    }

    /// The result of an approximate operation on `a` and `b`.
    fn approx(a: Num, b: Num, v: f64) -> Result<Num, Undefined> {
        Num::real(
            v,
            a.is_float() || b.is_float(),
            a.is_irrational() || b.is_irrational(),
        )
    }

    pub fn add(self, o: Num) -> Result<Num, Undefined> {
        if let (Some((a, b)), Some((c, d))) = (self.exact(), o.exact()) {
            let exact = (|| {
                let n = a.checked_mul(d)?.checked_add(c.checked_mul(b)?)?;
                Some((n, b.checked_mul(d)?))
            })();
            if let Some((n, d)) = exact {
                return Num::ratio(n, d, self.is_float() || o.is_float());
            }
        }
        Num::approx(self, o, self.to_f64() + o.to_f64())
    }

    pub fn neg(self) -> Result<Num, Undefined> {
        match self {
            Num::Rat(n, d) => Ok(Num::Rat(n.checked_neg().ok_or(Undefined)?, d)),
            Num::Dec(n, d) => Ok(Num::Dec(n.checked_neg().ok_or(Undefined)?, d)),
            Num::Real { v, float, irr } => Ok(Num::Real { v: -v, float, irr }),
        }
    }

    pub fn sub(self, o: Num) -> Result<Num, Undefined> {
        self.add(o.neg()?)
    }

    pub fn mul(self, o: Num) -> Result<Num, Undefined> {
        if let (Some((a, b)), Some((c, d))) = (self.exact(), o.exact()) {
            if let (Some(n), Some(d)) = (a.checked_mul(c), b.checked_mul(d)) {
                return Num::ratio(n, d, self.is_float() || o.is_float());
            }
        }
        Num::approx(self, o, self.to_f64() * o.to_f64())
    }

    pub fn div(self, o: Num) -> Result<Num, Undefined> {
        match o {
            Num::Rat(0, _) | Num::Dec(0, _) => Err(Undefined),
            Num::Rat(c, d) => self.mul(Num::rat(d, c)?),
            Num::Dec(c, d) => self.mul(Num::ratio(d, c, true)?),
            Num::Real { v, .. } => {
                if v == 0.0 {
                    return Err(Undefined);
                }
                Num::approx(self, o, self.to_f64() / v)
            }
        }
    }

    /// Python's `//` (floor division).
    pub fn floor_div(self, o: Num) -> Result<Num, Undefined> {
        let q = self.div(o)?;
        match q {
            Num::Rat(n, d) => Ok(Num::int(n.div_euclid(d))),
            Num::Dec(n, d) => Num::ratio(n.div_euclid(d), 1, true),
            Num::Real { v, float, irr } => Num::real(v.floor(), float, irr),
        }
    }

    /// Python's `%` (the sign of the divisor).
    pub fn rem(self, o: Num) -> Result<Num, Undefined> {
        let q = self.floor_div(o)?;
        self.sub(q.mul(o)?)
    }

    pub fn pow(self, e: Num) -> Result<Num, Undefined> {
        if let (Num::Rat(n, d), Num::Rat(p, q)) = (self, e) {
            if let Some(exact) = exact_pow(n, d, p, q)? {
                return Ok(exact);
            }
        }
        let base = self.to_f64();
        let exp = e.to_f64();
        if base < 0.0 && exp.fract() != 0.0 {
            // A negative base to a fractional power is complex.
            return Err(Undefined);
        }
        if base == 0.0 && exp < 0.0 {
            return Err(Undefined);
        }
        let float = self.is_float() || e.is_float();
        // Numbers to a Float power are evaluated by sympy; an exact base to
        // an exact power that is not rational stays a symbolic root.
        let irr = self.is_irrational() || e.is_irrational() || !float;
        Num::real(base.powf(exp), float, irr)
    }

    pub fn sqrt(self) -> Result<Num, Undefined> {
        self.pow(Num::Rat(1, 2))
    }

    /// A function sympy evaluates numerically on a Float and keeps symbolic
    /// on an exact argument.
    pub fn apply(self, v: f64) -> Result<Num, Undefined> {
        let float = self.is_float();
        Num::real(v, float, self.is_irrational() || !float)
    }
}

/// `(n/d)^(p/q)` when it is rational; `Ok(None)` when it is irrational (or
/// too large for i128), `Err` for a complex or infinite result.
fn exact_pow(n: i128, d: i128, p: i128, q: i128) -> Result<Option<Num>, Undefined> {
    if n == 0 {
        return match p.cmp(&0) {
            Ordering::Less => Err(Undefined),
            Ordering::Equal => Ok(Some(Num::int(1))),
            Ordering::Greater => Ok(Some(Num::int(0))),
        };
    }
    if q != 1 && n < 0 {
        return Err(Undefined);
    }
    let (Some(rn), Some(rd)) = (int_root(n, q), int_root(d, q)) else {
        return Ok(None);
    };
    let (base_n, base_d, p) = if p < 0 { (rd, rn, -p) } else { (rn, rd, p) };
    let Ok(p) = u32::try_from(p) else {
        return Ok(None);
    };
    match (base_n.checked_pow(p), base_d.checked_pow(p)) {
        (Some(a), Some(b)) => Num::rat(a, b).map(Some),
        _ => Ok(None),
    }
}

/// The exact `q`-th root of `x` (>= 0 unless q = 1), if it is an integer.
fn int_root(x: i128, q: i128) -> Option<i128> {
    if q == 1 {
        return Some(x);
    }
    let q = u32::try_from(q).ok()?;
    let guess = (x as f64).powf(1.0 / q as f64).round() as i128;
    (guess.saturating_sub(1)..=guess.saturating_add(1))
        .find(|&r| r >= 0 && r.checked_pow(q) == Some(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rationals_stay_exact() {
        let third = Num::rat(1, 3).unwrap();
        let sum = third.add(third).unwrap().add(third).unwrap();
        assert_eq!(sum, Num::int(1));
        assert_eq!(Num::int(8).pow(Num::Rat(2, 3)).unwrap(), Num::int(4));
        assert_eq!(Num::int(2).pow(Num::int(-2)).unwrap(), Num::Rat(1, 4));
        assert_eq!(Num::Rat(9, 4).sqrt().unwrap(), Num::Rat(3, 2));
        assert!(matches!(
            Num::int(2).sqrt().unwrap(),
            Num::Real { float: false, .. }
        ));
    }

    #[test]
    fn undefined_values() {
        assert_eq!(Num::int(1).div(Num::int(0)), Err(Undefined));
        assert_eq!(Num::int(-4).sqrt(), Err(Undefined));
        assert_eq!(Num::int(0).pow(Num::int(-1)), Err(Undefined));
    }

    #[test]
    fn long_decimals_are_exact() {
        assert_eq!(
            Num::decimal("0.5").unwrap(),
            Num::Real {
                v: 0.5,
                float: true,
                irr: false
            }
        );
        let third = Num::decimal("0.3333333333333333333").unwrap();
        assert_ne!(third.sub(Num::Rat(1, 3)).unwrap(), Num::Dec(0, 1));
        let half = Num::decimal("0.5000000000000000000").unwrap();
        assert_eq!(half.sub(Num::Rat(1, 2)).unwrap(), Num::Dec(0, 1));
    }

    #[test]
    fn floats_round_like_doubles() {
        let f = |v| Num::float(v).unwrap();
        let d = f(0.1).add(f(0.2)).unwrap().sub(f(0.3)).unwrap();
        assert_ne!(d.to_f64(), 0.0);
        assert!(d.is_float());
        assert_eq!(f(0.5).sub(Num::Rat(1, 2)).unwrap().to_f64(), 0.0);
    }
}
