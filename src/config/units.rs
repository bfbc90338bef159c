//! Human units in settings: `500ms`, `10s`, `2m`; `64KiB`, `16MiB`, `1GiB`, or plain bytes.

use std::time::Duration;

/// Parses a duration such as `500ms`, `10s` or `1m 30s` (humantime syntax).
pub(crate) fn parse_duration(value: &str) -> Option<Duration> {
    let v = value.trim();
    if v == "0" {
        return Some(Duration::ZERO);
    }
    humantime::parse_duration(v).ok()
}

/// Parses a size: a plain number of bytes, or a number with `KiB`, `MiB`, `GiB` (or `KB`, `MB`,
/// `GB`, also powers of 1024: operators mean memory and disk sizes here).
pub(crate) fn parse_bytes(value: &str) -> Option<u64> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("16MiB"), Some(16 << 20));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("1.5GiB"), None);
        assert_eq!(parse_bytes("99999999999999GiB"), None);
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("ten"), None);
    }
}
