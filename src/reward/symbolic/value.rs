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
    /// An approximate value; `float` when a decimal literal took part (then
    /// only an exact 0.0 counts as zero, as sympy's Float arithmetic does).
    Real { v: f64, float: bool },
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
        if d == 0 {
            return Err(Undefined);
        }
        let g = gcd(n, d).max(1);
        let (mut n, mut d) = (n / g, d / g);
        if d < 0 {
            n = n.checked_neg().ok_or(Undefined)?;
            d = d.checked_neg().ok_or(Undefined)?;
        }
        Ok(Num::Rat(n, d))
    }

    pub fn irrational(v: f64) -> Result<Num, Undefined> {
        Num::real(v, false)
    }

    pub fn float(v: f64) -> Result<Num, Undefined> {
        Num::real(v, true)
    }

    fn real(v: f64, float: bool) -> Result<Num, Undefined> {
        if v.is_finite() {
            Ok(Num::Real { v, float })
        } else {
            Err(Undefined)
        }
    }

    pub fn to_f64(self) -> f64 {
        match self {
            Num::Rat(n, d) => n as f64 / d as f64,
            Num::Real { v, .. } => v,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Num::Real { float: true, .. })
    }

    pub fn as_integer(self) -> Option<i128> {
        match self {
            Num::Rat(n, 1) => Some(n),
            _ => None,
        }
    }

    /// The result of an approximate operation on `a` and `b`.
    fn approx(a: Num, b: Num, v: f64) -> Result<Num, Undefined> {
        Num::real(v, a.is_float() || b.is_float())
    }

    pub fn add(self, o: Num) -> Result<Num, Undefined> {
        if let (Num::Rat(a, b), Num::Rat(c, d)) = (self, o) {
            let exact = (|| {
                let n = a.checked_mul(d)?.checked_add(c.checked_mul(b)?)?;
                Some((n, b.checked_mul(d)?))
            })();
            if let Some((n, d)) = exact {
                return Num::rat(n, d);
            }
        }
        Num::approx(self, o, self.to_f64() + o.to_f64())
    }

    pub fn neg(self) -> Result<Num, Undefined> {
        match self {
            Num::Rat(n, d) => Ok(Num::Rat(n.checked_neg().ok_or(Undefined)?, d)),
            Num::Real { v, float } => Ok(Num::Real { v: -v, float }),
        }
    }

    pub fn sub(self, o: Num) -> Result<Num, Undefined> {
        self.add(o.neg()?)
    }

    pub fn mul(self, o: Num) -> Result<Num, Undefined> {
        if let (Num::Rat(a, b), Num::Rat(c, d)) = (self, o) {
            if let (Some(n), Some(d)) = (a.checked_mul(c), b.checked_mul(d)) {
                return Num::rat(n, d);
            }
        }
        Num::approx(self, o, self.to_f64() * o.to_f64())
    }

    pub fn div(self, o: Num) -> Result<Num, Undefined> {
        match o {
            Num::Rat(0, _) => Err(Undefined),
            Num::Rat(c, d) => self.mul(Num::rat(d, c)?),
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
            Num::Real { v, float } => Num::real(v.floor(), float),
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
        if base < 0.0 && e.as_integer().is_none() && !e.is_float() {
            // A negative base to a fractional power is complex.
            return Err(Undefined);
        }
        if base < 0.0 && e.as_integer().is_none() && e.to_f64().fract() != 0.0 {
            return Err(Undefined);
        }
        if base == 0.0 && e.to_f64() < 0.0 {
            return Err(Undefined);
        }
        Num::approx(self, e, base.powf(e.to_f64()))
    }

    pub fn sqrt(self) -> Result<Num, Undefined> {
        self.pow(Num::Rat(1, 2))
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
    fn floats_round_like_doubles() {
        let f = |v| Num::float(v).unwrap();
        let d = f(0.1).add(f(0.2)).unwrap().sub(f(0.3)).unwrap();
        assert_ne!(d.to_f64(), 0.0);
        assert!(d.is_float());
        assert_eq!(f(0.5).sub(Num::Rat(1, 2)).unwrap().to_f64(), 0.0);
    }
}
