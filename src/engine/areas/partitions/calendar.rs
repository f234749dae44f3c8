//! The calendar grid (pure): interval starts, names and suffixes of partitions, and the
//! retention cutoff.

use super::*;

/// The interval containing `d` starts here.
pub(crate) fn floor(interval: PartitionInterval, d: NaiveDate) -> NaiveDate {
    let ymd = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).expect("valid date");
    match interval {
        PartitionInterval::Daily => d,
        // ISO weeks start on Monday.
        PartitionInterval::Weekly => {
            d - chrono::Duration::days(d.weekday().num_days_from_monday() as i64)
        }
        PartitionInterval::Monthly => ymd(d.year(), d.month(), 1),
        PartitionInterval::Quarterly => ymd(d.year(), (d.month0() / 3) * 3 + 1, 1),
        PartitionInterval::Yearly => ymd(d.year(), 1, 1),
    }
}

/// The start of the interval after the one starting at `start` (an aligned date).
pub(crate) fn next(interval: PartitionInterval, start: NaiveDate) -> NaiveDate {
    match interval {
        PartitionInterval::Daily => start + chrono::Duration::days(1),
        PartitionInterval::Weekly => start + chrono::Duration::days(7),
        PartitionInterval::Monthly => start + Months::new(1),
        PartitionInterval::Quarterly => start + Months::new(3),
        PartitionInterval::Yearly => start + Months::new(12),
    }
}

/// The name suffix of the interval starting at `start`:
/// daily `2024_01_31`, weekly `2024_w05` (ISO year and week), monthly `2024_01`,
/// quarterly `2024_q1`, yearly `2024`.
pub(crate) fn suffix(interval: PartitionInterval, start: NaiveDate) -> String {
    match interval {
        PartitionInterval::Daily => start.format("%Y_%m_%d").to_string(),
        PartitionInterval::Weekly => {
            let w = start.iso_week();
            format!("{:04}_w{:02}", w.year(), w.week())
        }
        PartitionInterval::Monthly => start.format("%Y_%m").to_string(),
        PartitionInterval::Quarterly => format!("{:04}_q{}", start.year(), start.month0() / 3 + 1),
        PartitionInterval::Yearly => format!("{:04}", start.year()),
    }
}

/// The start of the interval a suffix names, when it is exactly one of ours.
pub(crate) fn parse_suffix(interval: PartitionInterval, s: &str) -> Option<NaiveDate> {
    let num = |t: &str| -> Option<u32> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let parts: Vec<&str> = s.split('_').collect();
    let start = match (interval, parts.as_slice()) {
        (PartitionInterval::Daily, [y, m, d]) => {
            NaiveDate::from_ymd_opt(num(y)? as i32, num(m)?, num(d)?)?
        }
        (PartitionInterval::Weekly, [y, w]) => NaiveDate::from_isoywd_opt(
            num(y)? as i32,
            num(w.strip_prefix('w')?)?,
            chrono::Weekday::Mon,
        )?,
        (PartitionInterval::Monthly, [y, m]) => {
            NaiveDate::from_ymd_opt(num(y)? as i32, num(m)?, 1)?
        }
        (PartitionInterval::Quarterly, [y, q]) => {
            let q = num(q.strip_prefix('q')?)?;
            if !(1..=4).contains(&q) {
                return None;
            }
            NaiveDate::from_ymd_opt(num(y)? as i32, (q - 1) * 3 + 1, 1)?
        }
        (PartitionInterval::Yearly, [y]) => NaiveDate::from_ymd_opt(num(y)? as i32, 1, 1)?,
        _ => return None,
    };
    // Only the canonical spelling is ours (`2024_1` is not `2024_01`).
    (suffix(interval, start) == s).then_some(start)
}

/// `table` cut (on a character boundary) so that `<table>_<suffix>` fits in 63 bytes.
pub(super) fn prefix(table: &str, suffix_len: usize) -> &str {
    let mut end = table.len().min(MAX_IDENT - 1 - suffix_len);
    while !table.is_char_boundary(end) {
        end -= 1;
    }
    &table[..end]
}

/// The name of our partition of `table` for the interval starting at `start`.
pub(crate) fn partition_name(table: &str, interval: PartitionInterval, start: NaiveDate) -> String {
    let s = suffix(interval, start);
    format!("{}_{s}", prefix(table, s.len()))
}

/// The name of the default partition we create: `<table>_default`.
pub(crate) fn default_name(table: &str) -> String {
    format!("{}_default", prefix(table, "default".len()))
}

/// Microseconds since 1970-01-01 00:00 of a date's midnight (UTC for timestamptz,
/// nominal for timestamp and date): how the observer reports bounds.
pub(crate) fn micros(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_micros()
}

/// One interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub start: NaiveDate,
    pub end: NaiveDate,
}

impl Range {
    pub(super) fn lo(&self) -> i64 {
        micros(self.start)
    }
    pub(super) fn hi(&self) -> i64 {
        micros(self.end)
    }
}

/// When a partition ending at `end` is entirely older than the retention.
pub(crate) fn cutoff(now: DateTime<Utc>, retention: Retention) -> NaiveDateTime {
    let now = now.naive_utc();
    let back = |m: u32| {
        now.checked_sub_months(Months::new(m))
            .unwrap_or(NaiveDateTime::MIN)
    };
    match retention {
        Retention::Days(n) => now - chrono::Duration::days(n as i64),
        Retention::Weeks(n) => now - chrono::Duration::weeks(n as i64),
        Retention::Months(n) => back(n),
        Retention::Years(n) => back(n.saturating_mul(12)),
    }
}
