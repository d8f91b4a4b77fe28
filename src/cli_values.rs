//! Parsers for the command line's numeric options: each value is checked
//! once, as the arguments are parsed, and a bad one is refused with the
//! allowed range in the message.

/// A count that must be at least 1 (samples, tokens, batch sizes).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number (it must be at least 1)"))?;
    if v == 0 {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

fn finite(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// Sampling temperature: 0 (greedy) to 100.
pub fn temperature(s: &str) -> Result<f32, String> {
    let v = finite(s).map_err(|e| format!("{e}; the temperature must be in [0, 100]"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{v} is out of range: it must be in [0, 100]"));
    }
    Ok(v)
}

/// Nucleus sampling mass, in (0, 1].
pub fn top_p(s: &str) -> Result<f32, String> {
    let v = finite(s).map_err(|e| format!("{e}; top-p must be in (0, 1]"))?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("{v} is out of range: it must be in (0, 1]"));
    }
    Ok(v)
}

/// A fraction of memory, in [0, 1] (0: unset).
pub fn fraction(s: &str) -> Result<f64, String> {
    let v = finite(s).map_err(|e| format!("{e}; the fraction must be in [0, 1]"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is out of range: it must be in [0, 1]"));
    }
    Ok(v as f64)
}

/// Largest safetensors shard in MiB: 1 MiB to 1 TiB.
pub fn shard_mib(s: &str) -> Result<usize, String> {
    let v = at_least_one(s)?;
    if v > 1 << 20 {
        return Err(format!("{v} is out of range: it must be in [1, 1048576]"));
    }
    Ok(v)
}

/// GPU memory in GiB: more than 0, at most 64 TiB.
pub fn gib(s: &str) -> Result<f64, String> {
    let v = f64::from(finite(s).map_err(|e| format!("{e}; GiB must be in (0, 65536]"))?);
    if !(v > 0.0 && v <= 65536.0) {
        return Err(format!("{v} is out of range: it must be in (0, 65536]"));
    }
    Ok(v)
}

/// A device's peak in TFLOP/s: more than 0, at most 1e6.
pub fn tflops(s: &str) -> Result<f64, String> {
    let v = f64::from(finite(s).map_err(|e| format!("{e}; TFLOP/s must be in (0, 1e6]"))?);
    if !(v > 0.0 && v <= 1e6) {
        return Err(format!("{v} is out of range: it must be in (0, 1e6]"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_enforced_with_the_range_in_the_message() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(at_least_one("-1").is_err());
        assert_eq!(temperature("0"), Ok(0.0));
        assert_eq!(temperature("1.5"), Ok(1.5));
        for bad in ["nan", "inf", "-inf", "-0.1", "101", "hot"] {
            let e = temperature(bad).unwrap_err();
            assert!(e.contains("[0, 100]"), "{bad}: {e}");
        }
        assert_eq!(top_p("1"), Ok(1.0));
        for bad in ["0", "1.01", "nan", "-1"] {
            let e = top_p(bad).unwrap_err();
            assert!(e.contains("(0, 1]"), "{bad}: {e}");
        }
        assert_eq!(shard_mib("4096"), Ok(4096));
        assert!(shard_mib("0").is_err());
        assert!(shard_mib("18446744073709551615").is_err());
    }
}
