//! The duration strings of the spec (`5s`, `500ms`, `5m`, `1h`, `1d`) and partition
//! retentions (`30d`, `12w`, `6mo`, `2y`).

use std::time::Duration;

/// Parses `<digits><unit>` with unit ms, s, m or min, h, d.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 5s, 5m or 1h"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" | "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => {
            return Err(format!(
                "{s:?} is not a duration such as 500ms, 5s, 5m or 1h"
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

/// A duration as PostgreSQL's `lock_timeout`/`statement_timeout` take it: milliseconds.
pub fn pg_millis(s: &str) -> Result<u64, String> {
    parse_duration(s).map(|d| d.as_millis() as u64)
}

/// A calendar retention: whole days, weeks, months or years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    Days(u32),
    Weeks(u32),
    Months(u32),
    Years(u32),
}

pub fn parse_retention(s: &str) -> Result<Retention, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("{s:?} is not a retention such as 30d, 12w, 6mo or 2y");
    let n: u32 = num.parse().map_err(|_| bad())?;
    match unit {
        "d" => Ok(Retention::Days(n)),
        "w" => Ok(Retention::Weeks(n)),
        "mo" => Ok(Retention::Months(n)),
        "y" => Ok(Retention::Years(n)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(pg_millis("500ms").unwrap(), 500);
        assert_eq!(pg_millis("5s").unwrap(), 5000);
        assert_eq!(pg_millis("2m").unwrap(), 120_000);
        assert_eq!(pg_millis("2min").unwrap(), 120_000);
        assert_eq!(pg_millis("1h").unwrap(), 3_600_000);
        assert_eq!(pg_millis("1d").unwrap(), 86_400_000);
        for bad in ["", "5", "s", "5 s", "-5s", "5sec", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retentions() {
        assert_eq!(parse_retention("30d"), Ok(Retention::Days(30)));
        assert_eq!(parse_retention("6mo"), Ok(Retention::Months(6)));
        assert!(parse_retention("6m").is_err());
    }
}
