//! The duration strings of the spec (`5s`, `500ms`, `5m`, `1h`, `1d`) and partition
//! retentions (`30d`, `12w`, `6mo`, `2y`).

use std::time::Duration;

/// The longest duration any field takes: 10 years. Far beyond every bound a field sets,
/// and small enough that no arithmetic on it (timers, `Instant + d`) can overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 86_400);

/// A duration or retention string that does not say one; the message quotes it and shows
/// the accepted spelling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DurationError {
    #[error("{0:?} is not a duration such as 500ms, 5s, 5m or 1h")]
    NotADuration(String),
    #[error("{0:?} is too long: at most 10 years")]
    TooLong(String),
    #[error(
        "{text:?} is out of range: between {} and {}",
        crate::units::duration(*min),
        crate::units::duration(*max)
    )]
    OutOfRange {
        text: String,
        min: Duration,
        max: Duration,
    },
    #[error("{0:?} is not a retention such as 30d, 12w, 6mo or 2y")]
    NotARetention(String),
}

/// For the callers that gather problems as text (`validate_spec`'s messages, the engine's
/// session errors).
impl From<DurationError> for String {
    fn from(e: DurationError) -> String {
        e.to_string()
    }
}

/// Parses `<digits><unit>` with unit ms, s, m or min, h, d. Overflow-safe: a value past
/// [`MAX_DURATION`] is an error, never a panic or a wrapped number.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError::NotADuration(s.to_string());
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let too_long = || DurationError::TooLong(s.to_string());
    // All digits, so a parse error can only be an overflow of u64.
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let ms = n.checked_mul(unit_ms).ok_or_else(too_long)?;
    let d = Duration::from_millis(ms);
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// Parses a duration and checks it lies in `min..=max`.
pub(crate) fn parse_bounded(
    s: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, DurationError> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(DurationError::OutOfRange {
            text: s.to_string(),
            min,
            max,
        });
    }
    Ok(d)
}

/// A duration as PostgreSQL's `lock_timeout`/`statement_timeout` take it: milliseconds.
pub(crate) fn pg_millis(s: &str) -> Result<u64, DurationError> {
    parse_duration(s).map(|d| d.as_millis() as u64)
}

/// A calendar retention: whole days, weeks, months or years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retention {
    Days(u32),
    Weeks(u32),
    Months(u32),
    Years(u32),
}

pub(crate) fn parse_retention(s: &str) -> Result<Retention, DurationError> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || DurationError::NotARetention(s.to_string());
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
        for bad in ["", "5", "s", "5 s", "-5s", "5sec", "1.5s", "+5s", "５s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        for huge in [
            "999999999999999d",
            "18446744073709551615ms",
            "18446744073709551616ms",
            "99999999999999999999999999h",
            "3661d",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert_eq!(e, DurationError::TooLong(huge.to_string()));
            assert!(e.to_string().contains("too long"), "{huge}: {e}");
        }
        assert_eq!(
            parse_duration("3660d").unwrap(),
            Duration::from_secs(3660 * 86_400)
        );
    }

    #[test]
    fn bounds() {
        let (min, max) = (Duration::from_secs(10), Duration::from_secs(86_400));
        assert!(parse_bounded("10s", min, max).is_ok());
        assert!(parse_bounded("24h", min, max).is_ok());
        assert!(parse_bounded("1d", min, max).is_ok());
        let e = parse_bounded("0s", min, max).unwrap_err();
        assert_eq!(e.to_string(), "\"0s\" is out of range: between 10s and 1d");
        assert!(parse_bounded("9999ms", min, max).is_err());
        assert!(parse_bounded("1441m", min, max).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_string_parses_or_errs_without_panicking(s in "\\PC{0,24}", n in proptest::num::u64::ANY, unit in "(ms|s|m|min|h|d)") {
            let _ = parse_duration(&s);
            let _ = parse_duration(&format!("{n}{unit}"));
        }
    }

    #[test]
    fn retentions() {
        assert_eq!(parse_retention("30d"), Ok(Retention::Days(30)));
        assert_eq!(parse_retention("6mo"), Ok(Retention::Months(6)));
        assert!(parse_retention("6m").is_err());
    }
}
