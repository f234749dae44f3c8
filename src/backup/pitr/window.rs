//! The pure middle of point-in-time recovery: from what the store lists (base backups and
//! archived WAL segments) to the recoverable window, the base backup a restore starts
//! from, and what retention may delete. No I/O here.
//!
//! A base backup is recoverable from the moment it finished up to the end of the unbroken
//! run of archived segments that starts at its first WAL segment (its own timeline only).
//! The window is the union of those intervals.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::wal::{Lsn, SegmentName};

/// A committed base backup, as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BaseInfo {
    pub id: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub wal_segment_size: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A committed (checksummed) archived segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentInfo {
    pub name: SegmentName,
    pub archived_at: DateTime<Utc>,
}

/// How far one base backup can be recovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Reach {
    pub base: String,
    /// Earliest recoverable time: when the backup finished (it is consistent by then).
    pub from: DateTime<Utc>,
    /// Latest recoverable time: when the last segment of the unbroken run after the base
    /// was archived (every commit in it happened before); `from` when none is archived.
    pub to: DateTime<Utc>,
    /// End of the last archived segment of the run: `--target-lsn` up to here.
    pub to_lsn: Lsn,
    /// Archived segments in the run.
    pub segments: usize,
    /// The first segment missing after the run, when a later segment exists (a gap).
    pub gap_at: Option<String>,
}

/// The recoverable window of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Window {
    pub earliest: Option<DateTime<Utc>>,
    pub latest: Option<DateTime<Utc>>,
    /// One entry per base backup, oldest first.
    pub bases: Vec<Reach>,
}

/// When a segment listed at `listed` was archived by, at the latest. S3 lists objects
/// to the second (`LastModified` has no fraction), truncated: a segment uploaded at
/// 12:00:00.7 lists as 12:00:00, before commits it holds, and a target in that second
/// would look unrecoverable. A time with no fraction is read as the end of its second,
/// which keeps `Reach::to` after every commit in the run (a store that lists to the
/// nanosecond is left as it is).
pub(crate) fn archived_by(listed: DateTime<Utc>) -> DateTime<Utc> {
    if listed.timestamp_subsec_nanos() == 0 {
        listed + Duration::seconds(1)
    } else {
        listed
    }
}

type Index = BTreeMap<(u32, u64), DateTime<Utc>>;

fn index(segments: &[SegmentInfo]) -> Index {
    segments
        .iter()
        .map(|s| ((s.name.timeline, s.name.segno), s.archived_at))
        .collect()
}

fn reach_in(base: &BaseInfo, idx: &Index) -> Reach {
    let size = base.wal_segment_size;
    let first = base.start_lsn.segno(size);
    let mut next = first;
    let mut to = base.finished_at;
    while let Some(at) = idx.get(&(base.timeline, next)) {
        to = to.max(*at);
        next += 1;
    }
    let segments = (next - first) as usize;
    let later = idx
        .range((base.timeline, next)..(base.timeline, u64::MAX))
        .next();
    let gap_at = later.map(|_| SegmentName::new(base.timeline, next, size).to_string());
    Reach {
        base: base.id.clone(),
        from: base.finished_at,
        to,
        to_lsn: if segments == 0 {
            base.end_lsn
        } else {
            Lsn(next * size)
        },
        segments,
        gap_at,
    }
}

pub(crate) fn window(bases: &[BaseInfo], segments: &[SegmentInfo]) -> Window {
    let idx = index(segments);
    let mut sorted: Vec<&BaseInfo> = bases.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let reaches: Vec<Reach> = sorted.iter().map(|b| reach_in(b, &idx)).collect();
    Window {
        earliest: reaches.iter().map(|r| r.from).min(),
        latest: reaches.iter().map(|r| r.to).max(),
        bases: reaches,
    }
}

/// What a restore recovers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Time(DateTime<Utc>),
    Lsn(Lsn),
    Latest,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Latest => f.write_str("the latest archived WAL"),
        }
    }
}

/// The base backup to restore for `target`: the newest one that finished before it and
/// whose archived WAL reaches it (the least WAL to replay). Errors say why none fits and
/// what the window is.
pub(crate) fn choose<'a>(
    bases: &'a [BaseInfo],
    segments: &[SegmentInfo],
    target: &Target,
) -> Result<&'a BaseInfo, NotRecoverable> {
    let idx = index(segments);
    let mut sorted: Vec<&BaseInfo> = bases.iter().collect();
    sorted.sort_by(|a, b| b.id.cmp(&a.id));
    if sorted.is_empty() {
        return Err(NotRecoverable::NoBase);
    }
    let fits = |b: &BaseInfo| {
        let r = reach_in(b, &idx);
        match target {
            Target::Time(t) => b.finished_at <= *t && *t <= r.to,
            Target::Lsn(l) => b.end_lsn <= *l && *l <= r.to_lsn,
            Target::Latest => true,
        }
    };
    if let Some(b) = sorted.iter().find(|b| fits(b)) {
        return Ok(b);
    }
    let w = window(bases, segments);
    Err(NotRecoverable::OutsideWindow {
        target: target.to_string(),
        earliest: w.earliest,
        latest: w.latest,
    })
}

/// Why no base backup can be restored to a target; says what the window is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotRecoverable {
    #[error("the store holds no base backup: run `dbpolicy backup base` first")]
    NoBase,
    #[error(
        "no base backup can be recovered to {target}: the recoverable window is {} to {} \
         (`dbpolicy backup list --pitr` shows each base backup's reach)",
        show(*earliest),
        show(*latest)
    )]
    OutsideWindow {
        target: String,
        earliest: Option<DateTime<Utc>>,
        latest: Option<DateTime<Utc>>,
    },
}

fn show(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".into(), |t| t.to_rfc3339())
}

/// Retention for base backups (and the WAL that goes with them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PitrRetention {
    /// Keep every base backup that finished within this many days (and the WAL after it).
    pub days: Option<u32>,
    /// Keep this many newest base backups.
    pub count: Option<u32>,
}

/// What a prune deletes: whole base backups and the segments older than the oldest kept
/// base backup's first segment. Never the newest base backup; never a segment a kept base
/// backup needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PrunePlan {
    pub delete_bases: Vec<String>,
    pub keep_bases: Vec<String>,
    pub delete_segments: Vec<SegmentName>,
}

pub(crate) fn plan_prune(
    bases: &[BaseInfo],
    segments: &[SegmentInfo],
    retention: PitrRetention,
    now: DateTime<Utc>,
) -> PrunePlan {
    let mut sorted: Vec<&BaseInfo> = bases.iter().collect();
    sorted.sort_by(|a, b| b.id.cmp(&a.id)); // newest first
    let mut plan = PrunePlan::default();
    if sorted.is_empty() {
        // WAL without any base backup before it is useless, but it may be the start of
        // the first base backup being taken right now: leave it.
        return plan;
    }
    for (i, b) in sorted.iter().enumerate() {
        let by_count = retention.count.is_some_and(|c| (i as u64) < u64::from(c));
        let by_days = retention
            .days
            .is_some_and(|d| now.signed_duration_since(b.finished_at) <= Duration::days(d.into()));
        let unset = retention.count.is_none() && retention.days.is_none();
        if i == 0 || by_count || by_days || unset {
            plan.keep_bases.push(b.id.clone());
        } else {
            plan.delete_bases.push(b.id.clone());
        }
    }
    // The oldest kept base backup's first segment bounds the WAL that must stay. A
    // segment of another timeline is kept when it is at or after that position (a
    // restored and promoted server continues on a new timeline).
    let oldest = sorted[plan.keep_bases.len() - 1];
    let first = oldest.start_lsn.segno(oldest.wal_segment_size);
    for s in segments {
        if s.name.segno < first && s.name.timeline <= oldest.timeline {
            plan.delete_segments.push(s.name.clone());
        }
    }
    plan.delete_segments.sort();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const MB: u64 = 1024 * 1024;

    #[test]
    fn a_time_listed_to_the_second_is_read_as_the_end_of_that_second() {
        let s3 = Utc.with_ymd_and_hms(2026, 11, 29, 16, 2, 27).unwrap();
        assert_eq!(archived_by(s3), s3 + Duration::seconds(1));
        let fine = s3 + Duration::nanoseconds(1_868_951);
        assert_eq!(archived_by(fine), fine);
    }

    fn at(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::minutes(min)
    }

    fn base(id: &str, seg: u64, finished: i64) -> BaseInfo {
        BaseInfo {
            id: id.into(),
            timeline: 1,
            start_lsn: Lsn(seg * MB + 40),
            end_lsn: Lsn(seg * MB + 400),
            wal_segment_size: MB,
            started_at: at(finished - 1),
            finished_at: at(finished),
        }
    }

    fn seg(n: u64, archived: i64) -> SegmentInfo {
        SegmentInfo {
            name: SegmentName::new(1, n, MB),
            archived_at: at(archived),
        }
    }

    #[test]
    fn window_spans_unbroken_runs() {
        let bases = [base("b1", 2, 10), base("b2", 6, 50)];
        let segs = [seg(2, 11), seg(3, 20), seg(4, 30), seg(6, 51), seg(7, 60)];
        let w = window(&bases, &segs);
        assert_eq!(w.earliest, Some(at(10)));
        assert_eq!(w.latest, Some(at(60)));
        assert_eq!(w.bases[0].to, at(30));
        assert_eq!(w.bases[0].segments, 3);
        assert_eq!(w.bases[0].to_lsn, Lsn(5 * MB));
        // Segment 5 is missing: b1's run stops there.
        assert_eq!(
            w.bases[0].gap_at.as_deref(),
            Some("000000010000000000000005")
        );
        assert_eq!(w.bases[1].gap_at, None);
    }

    #[test]
    fn chooses_the_newest_base_that_reaches_the_target() {
        let bases = [base("b1", 2, 10), base("b2", 6, 50)];
        let segs = [seg(2, 11), seg(3, 20), seg(4, 30), seg(6, 51), seg(7, 60)];
        let pick = |t: Target| choose(&bases, &segs, &t).map(|b| b.id.clone());
        assert_eq!(pick(Target::Time(at(25))).unwrap(), "b1");
        assert_eq!(pick(Target::Time(at(55))).unwrap(), "b2");
        assert_eq!(pick(Target::Latest).unwrap(), "b2");
        // In the gap between b1's reach and b2's start, and before everything.
        assert!(pick(Target::Time(at(40)))
            .unwrap_err()
            .to_string()
            .contains("window"));
        assert!(pick(Target::Time(at(5))).is_err());
        assert!(pick(Target::Time(at(61))).is_err());
        assert_eq!(pick(Target::Lsn(Lsn(3 * MB + 5))).unwrap(), "b1");
        assert_eq!(pick(Target::Lsn(Lsn(7 * MB))).unwrap(), "b2");
        assert!(choose(&[], &segs, &Target::Latest)
            .unwrap_err()
            .to_string()
            .contains("no base backup"));
    }

    #[test]
    fn prune_removes_bases_and_their_wal_together() {
        let bases = [base("b1", 2, 10), base("b2", 6, 50), base("b3", 9, 100)];
        let segs: Vec<_> = (1..=10).map(|n| seg(n, n as i64 * 10)).collect();
        let p = plan_prune(
            &bases,
            &segs,
            PitrRetention {
                count: Some(2),
                days: None,
            },
            at(200),
        );
        assert_eq!(p.delete_bases, ["b1"]);
        assert_eq!(p.keep_bases, ["b3", "b2"]);
        let deleted: Vec<u64> = p.delete_segments.iter().map(|s| s.segno).collect();
        assert_eq!(deleted, [1, 2, 3, 4, 5]);
        // What stays is still recoverable from the oldest kept base backup on.
        let kept: Vec<_> = segs
            .iter()
            .filter(|s| !p.delete_segments.contains(&s.name))
            .cloned()
            .collect();
        let kept_bases: Vec<_> = bases.iter().filter(|b| b.id != "b1").cloned().collect();
        let w = window(&kept_bases, &kept);
        assert_eq!(w.earliest, Some(at(50)));
        assert_eq!(w.latest, Some(at(100)));
    }

    #[test]
    fn prune_never_deletes_the_newest_base_nor_wal_without_bases() {
        let bases = [base("b1", 2, 10)];
        let segs = [seg(1, 5), seg(2, 11)];
        let p = plan_prune(
            &bases,
            &segs,
            PitrRetention {
                count: None,
                days: Some(1),
            },
            at(100_000),
        );
        assert!(p.delete_bases.is_empty());
        assert_eq!(p.delete_segments, [SegmentName::new(1, 1, MB)]);
        let p = plan_prune(&[], &segs, PitrRetention::default(), at(0));
        assert!(p.delete_segments.is_empty());
        // Within the days, everything stays.
        let bases = [base("b1", 2, 10), base("b2", 3, 20)];
        let p = plan_prune(
            &bases,
            &segs,
            PitrRetention {
                count: Some(1),
                days: Some(1),
            },
            at(30),
        );
        assert!(p.delete_bases.is_empty());
    }
}
