//! Human sizes: `2.55G`, `300M`, `4KiB`, `1024`.
//!
//! K, M, G and T (with or without a trailing B) are decimal, as disk vendors and the
//! paper's Table 1 count (2.55 GB = 2,550,000,000 bytes); Ki, Mi, Gi and Ti are binary.

use thiserror::Error;

/// A size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "invalid size {0:?}: expected a number with an optional unit, such as 2.55G, 300M, 4KiB or 1024"
)]
pub struct InvalidSize(pub String);

/// Parses a size in bytes.
pub fn parse_size(s: &str) -> Result<u64, InvalidSize> {
    let bad = || InvalidSize(s.chars().take(40).collect());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num.matches('.').count() > 1 {
        return Err(bad());
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    // Exact decimal arithmetic: split the integer and fractional parts.
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.len() > 12 {
        return Err(bad());
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut bytes = int.checked_mul(mult).ok_or_else(bad)?;
    if !frac.is_empty() {
        let f: u128 = frac.parse().map_err(|_| bad())?;
        let scale = 10u128.pow(frac.len() as u32);
        let extra = f * u128::from(mult) / scale;
        bytes = bytes
            .checked_add(u64::try_from(extra).map_err(|_| bad())?)
            .ok_or_else(bad)?;
    }
    Ok(bytes)
}

/// Formats bytes for humans (decimal units, as parsed).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2.55G"), Ok(2_550_000_000));
        assert_eq!(parse_size("3.72GB"), Ok(3_720_000_000));
        assert_eq!(parse_size("300M"), Ok(300_000_000));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1.5Gi"), Ok(1_610_612_736));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size(" 7 b "), Ok(7));
        for bad in [
            "",
            "G",
            "1.2.3G",
            "12X",
            "-1",
            "99999999999999999999",
            "1e9",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(human(2_550_000_000), "2.55 GB");
    }
}
