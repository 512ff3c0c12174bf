//! What PostgreSQL's `jsonb` refuses in text that is valid JSON: so that a
//! point whose metadata the database would refuse is rejected alone, before
//! it reaches a batch (SQLSTATE 22003 or 22P05 there would fail the COPY of
//! every point with it).
//!
//! jsonb keeps numbers as `numeric`, which holds at most 16,383 digits
//! after the decimal point (its display scale, counted as written: `1.50`
//! has two, `1e-3` three) and a leading digit at most 10^131071; it refuses
//! the `\u0000` escape and a UTF-16 surrogate escape that is not part of a
//! pair. Measured against PostgreSQL 15: `1e-16383` and `9.9e131071` are
//! taken, `1e-16384`, `1.5e-16383`, `0e-16384` and `1e131072` are not;
//! `0e131072` is (zero has no leading digit).

/// Digits after the decimal point `numeric` keeps at most (`NUMERIC_DSCALE_MAX`).
const MAX_SCALE: i64 = 16_383;
/// The largest power of ten of a `numeric`'s leading digit: its weight, in
/// base-10000 digits, is at most `i16::MAX`.
const MAX_EXPONENT: i64 = 4 * (i16::MAX as i64 + 1) - 1;
/// Nesting that metadata may have (serde_json's own limit when it builds a value).
pub const MAX_DEPTH: usize = 128;

/// Why jsonb would not take a JSON text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the number {0} is outside what jsonb holds (numeric: at most 16383 digits after the point, below 1e131072)"
    )]
    NumberOutOfRange(String),
    #[error("\\u0000 (jsonb cannot hold it)")]
    Nul,
    #[error("an unpaired UTF-16 surrogate escape (\\u{0:04x})")]
    LoneSurrogate(u16),
    #[error("nested deeper than {} levels", MAX_DEPTH)]
    TooDeep,
    #[error("not JSON")]
    Malformed,
}

/// Checks `json`, already known to be JSON (its syntax is not checked
/// again), for what jsonb refuses.
pub fn check(json: &str) -> Result<(), Refusal> {
    let b = json.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    while let Some(&c) = b.get(i) {
        match c {
            b'"' => i = string(b, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Refusal::TooDeep);
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = b[i..]
                    .iter()
                    .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .map_or(b.len(), |n| i + n);
                let number = &json[i..end];
                if !numeric_holds(number) {
                    return Err(Refusal::NumberOutOfRange(abbreviated(number)));
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Past the string whose contents start at `i`: the index after its closing quote.
fn string(b: &[u8], mut i: usize) -> Result<usize, Refusal> {
    loop {
        match b.get(i) {
            None => return Err(Refusal::Malformed),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => match b.get(i + 1) {
                Some(b'u') => {
                    let unit = hex4(b, i + 2)?;
                    i += 6;
                    match unit {
                        0 => return Err(Refusal::Nul),
                        0xD800..=0xDBFF => {
                            let low = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u'))
                                .then(|| hex4(b, i + 2))
                                .transpose()?;
                            match low {
                                Some(0xDC00..=0xDFFF) => i += 6,
                                _ => return Err(Refusal::LoneSurrogate(unit)),
                            }
                        }
                        0xDC00..=0xDFFF => return Err(Refusal::LoneSurrogate(unit)),
                        _ => {}
                    }
                }
                Some(_) => i += 2,
                None => return Err(Refusal::Malformed),
            },
            Some(_) => i += 1,
        }
    }
}

fn hex4(b: &[u8], at: usize) -> Result<u16, Refusal> {
    let digits = b.get(at..at + 4).ok_or(Refusal::Malformed)?;
    let text = std::str::from_utf8(digits).map_err(|_| Refusal::Malformed)?;
    u16::from_str_radix(text, 16).map_err(|_| Refusal::Malformed)
}

/// Whether `numeric` takes the JSON number `n`, as PostgreSQL's
/// `numeric_in` reads it (`set_var_from_str`, then `make_result`).
fn numeric_holds(n: &str) -> bool {
    let n = n.strip_prefix('-').unwrap_or(n);
    let (mantissa, exponent) = match n.find(['e', 'E']) {
        Some(at) => (&n[..at], exponent(&n[at + 1..])),
        None => (n, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let scale = (frac.len() as i64).saturating_sub(exponent);
    if scale > MAX_SCALE {
        return false;
    }
    // The power of ten of the first digit that is not zero; zero has none.
    let first = int.bytes().chain(frac.bytes()).position(|d| d != b'0');
    match first {
        None => true,
        Some(k) => {
            let leading = int.len() as i64 - 1 - k as i64;
            leading.saturating_add(exponent) <= MAX_EXPONENT
        }
    }
}

/// A JSON exponent (`+12`, `-3`, `7`), saturating far past any limit.
fn exponent(e: &str) -> i64 {
    let (negative, digits) = match e.as_bytes().first() {
        Some(b'-') => (true, &e[1..]),
        Some(b'+') => (false, &e[1..]),
        _ => (false, e),
    };
    let magnitude = digits.bytes().fold(0i64, |acc, d| {
        acc.saturating_mul(10)
            .saturating_add(i64::from(d.wrapping_sub(b'0')))
    });
    if negative { -magnitude } else { magnitude }
}

fn abbreviated(n: &str) -> String {
    if n.len() <= 40 {
        n.to_string()
    } else {
        format!("{}...", &n[..40])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each against PostgreSQL 15's `'{"a": N}'::jsonb`.
    #[test]
    fn numbers_as_postgresql_takes_them() {
        for taken in [
            "1e-16383",
            "9.9e131071",
            "1e131071",
            "0.1e131072",
            "0e131072",
            "1e400",
            "-1E+2",
            "-0",
            "0.5",
            "123456789012345678901234567890",
        ] {
            assert!(numeric_holds(taken), "{taken}");
        }
        for refused in [
            "1e-16384",
            "1.5e-16383",
            "0e-16384",
            "0.0e-16383",
            "1e131072",
            "10e131071",
            "1e2147483647",
            "1e99999999999999999999999",
            "-1e-99999999999999999999999",
        ] {
            assert!(!numeric_holds(refused), "{refused}");
        }
    }

    #[test]
    fn strings_as_postgresql_takes_them() {
        assert_eq!(check(r#"{"a":"\ud800\udc00 \u00e9"}"#), Ok(()));
        assert_eq!(check(r#"{"a":"\\u0000"}"#), Ok(()));
        assert_eq!(check(r#"{"a":"\u0000"}"#), Err(Refusal::Nul));
        assert_eq!(check(r#"{"\u0000":1}"#), Err(Refusal::Nul));
        assert_eq!(
            check(r#"{"a":"\ud800"}"#),
            Err(Refusal::LoneSurrogate(0xd800))
        );
        assert_eq!(
            check(r#"{"a":"\ud800x"}"#),
            Err(Refusal::LoneSurrogate(0xd800))
        );
        assert_eq!(
            check(r#"{"a":"\udc00"}"#),
            Err(Refusal::LoneSurrogate(0xdc00))
        );
        assert_eq!(
            check(r#"{"a":"\ud800\u0041"}"#),
            Err(Refusal::LoneSurrogate(0xd800))
        );
        // A number inside a string is text.
        assert_eq!(check(r#"{"a":"1e-99999"}"#), Ok(()));
    }

    #[test]
    fn depth() {
        let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert_eq!(check(&nested(MAX_DEPTH)), Ok(()));
        assert_eq!(check(&nested(MAX_DEPTH + 1)), Err(Refusal::TooDeep));
    }
}
