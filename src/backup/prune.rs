//! Retention: which backups to delete. [`select`] is pure (the tests below cover it);
//! [`prune`] applies it to a store.
//!
//! Rules, per database:
//! - only intact backups (a manifest and its dump, of the recorded size) take part; a
//!   broken one is neither counted nor deleted by retention, so that damage stays visible;
//! - the newest intact backup is always kept, whatever the rules say (a schedule that
//!   stopped weeks ago must not leave the database with no backup at all);
//! - `count`: the newest `count` are kept; `days`: those finished within `days` are kept;
//!   with both, a backup is kept while either rule keeps it;
//! - leftovers of interrupted runs (a dump without a manifest, or a manifest whose dump is
//!   gone) are deleted once older than [`LEFTOVER_GRACE`], so a run in progress is never
//!   touched.

use chrono::{DateTime, Duration, Utc};

use super::list::{self, Listing};
use super::store::Store;
use super::BackupError;

/// How old a leftover of an interrupted run must be before `prune` deletes it.
pub const LEFTOVER_GRACE: Duration = Duration::hours(24);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub days: Option<u32>,
    pub count: Option<u32>,
}

impl Retention {
    pub fn validate(&self) -> Result<(), String> {
        match (self.days, self.count) {
            (None, None) => {
                Err("no retention rule: pass --retention-days, --retention-count or both".into())
            }
            (Some(0), _) => Err("--retention-days must be at least 1".into()),
            (_, Some(0)) => Err("--retention-count must be at least 1".into()),
            _ => Ok(()),
        }
    }

    pub fn is_set(&self) -> bool {
        self.days.is_some() || self.count.is_some()
    }
}

/// An intact backup, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub finished_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    KeepNewest,
    KeepWithinCount,
    KeepWithinDays,
    Delete,
}

impl Verdict {
    pub fn keep(self) -> bool {
        self != Verdict::Delete
    }
}

/// The verdict on every candidate, newest first. Ties on `finished_at` are broken by id so
/// that the result does not depend on input order.
pub fn select(
    candidates: &[Candidate],
    retention: Retention,
    now: DateTime<Utc>,
) -> Vec<(Candidate, Verdict)> {
    let mut sorted = candidates.to_vec();
    sorted.sort_by(|a, b| {
        b.finished_at
            .cmp(&a.finished_at)
            .then_with(|| b.id.cmp(&a.id))
    });
    sorted
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let within_count = retention.count.is_some_and(|n| i < n as usize);
            let within_days = retention.days.is_some_and(|d| {
                now.signed_duration_since(c.finished_at) <= Duration::days(i64::from(d))
            });
            let verdict = if i == 0 {
                Verdict::KeepNewest
            } else if within_count {
                Verdict::KeepWithinCount
            } else if within_days {
                Verdict::KeepWithinDays
            } else if !retention.is_set() {
                // No rule: nothing is deleted (callers validate first; this is a backstop).
                Verdict::KeepWithinCount
            } else {
                Verdict::Delete
            };
            (c, verdict)
        })
        .collect()
}

/// What `prune` removed (or, with `dry_run`, would remove).
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    pub deleted: Vec<String>,
    pub kept: Vec<String>,
    pub leftovers_deleted: Vec<String>,
}

/// Applies retention to every database in the store (or one). The manifest goes first,
/// then the dump: a prune interrupted half-way leaves a leftover, never a manifest that
/// points at nothing.
pub async fn prune(
    store: &Store,
    database: Option<&str>,
    retention: Retention,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<PruneReport, BackupError> {
    retention.validate().map_err(BackupError::Usage)?;
    let listing: Listing = list::scan(store, database).await?;
    let mut report = PruneReport::default();
    let mut databases: Vec<&str> = listing
        .backups
        .iter()
        .map(|b| b.database_dir.as_str())
        .collect();
    databases.sort();
    databases.dedup();
    for db in databases {
        let candidates: Vec<Candidate> = listing
            .backups
            .iter()
            .filter(|b| b.database_dir == db && b.is_intact())
            .map(|b| Candidate {
                id: b.id.clone(),
                finished_at: b.manifest.finished_at,
            })
            .collect();
        for (c, verdict) in select(&candidates, retention, now) {
            let name = format!("{db}/{}", c.id);
            if verdict.keep() {
                report.kept.push(name);
                continue;
            }
            if !dry_run {
                eprintln!(
                    "backup: deleting {name} (finished {})",
                    c.finished_at.to_rfc3339()
                );
                store
                    .delete(db, &format!("{}{}", c.id, super::manifest::MANIFEST_SUFFIX))
                    .await?;
                store
                    .delete(db, &format!("{}{}", c.id, super::manifest::DUMP_SUFFIX))
                    .await?;
            }
            report.deleted.push(name);
        }
    }
    for leftover in &listing.leftovers {
        if now.signed_duration_since(leftover.last_modified) < LEFTOVER_GRACE {
            continue;
        }
        let name = format!("{}/{}", leftover.database_dir, leftover.file);
        if !dry_run {
            eprintln!("backup: deleting leftover {name} ({})", leftover.why);
            store.delete(&leftover.database_dir, &leftover.file).await?;
        }
        report.leftovers_deleted.push(name);
    }
    let dir = database.map(Store::database_dir);
    let grace = LEFTOVER_GRACE.to_std().unwrap_or_default();
    for staged in store.stale_staging_files(dir.as_deref(), grace) {
        let name = staged.display().to_string();
        if !dry_run {
            eprintln!(
                "backup: deleting leftover {name} (staging file of an upload that never completed)"
            );
            std::fs::remove_file(&staged)
                .map_err(|e| BackupError::Tool(format!("deleting {name}: {e}")))?;
        }
        report.leftovers_deleted.push(name);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
    }

    /// Backups finished `ages` days before now, named by age.
    fn backups(ages: &[i64]) -> Vec<Candidate> {
        ages.iter()
            .map(|&d| Candidate {
                id: format!("age{d:03}"),
                finished_at: now() - Duration::days(d),
            })
            .collect()
    }

    fn deleted(c: &[Candidate], r: Retention) -> Vec<String> {
        select(c, r, now())
            .into_iter()
            .filter(|(_, v)| !v.keep())
            .map(|(c, _)| c.id)
            .collect()
    }

    fn r(days: Option<u32>, count: Option<u32>) -> Retention {
        Retention { days, count }
    }

    #[test]
    fn nothing_to_do_on_an_empty_store() {
        assert!(select(&[], r(Some(1), Some(1)), now()).is_empty());
    }

    #[test]
    fn count_keeps_the_newest_n() {
        let c = backups(&[0, 1, 2, 3, 4]);
        assert_eq!(
            deleted(&c, r(None, Some(2))),
            ["age002", "age003", "age004"]
        );
        assert_eq!(deleted(&c, r(None, Some(5))), Vec::<String>::new());
        assert_eq!(deleted(&c, r(None, Some(50))), Vec::<String>::new());
        assert_eq!(
            deleted(&c, r(None, Some(1))),
            ["age001", "age002", "age003", "age004"]
        );
    }

    #[test]
    fn days_keeps_the_recent_ones_inclusive() {
        let c = backups(&[0, 10, 30, 31, 90]);
        assert_eq!(deleted(&c, r(Some(30), None)), ["age031", "age090"]);
        assert_eq!(deleted(&c, r(Some(365), None)), Vec::<String>::new());
    }

    #[test]
    fn the_newest_is_kept_even_when_every_rule_would_delete_it() {
        let c = backups(&[40, 50, 60]);
        assert_eq!(deleted(&c, r(Some(30), None)), ["age050", "age060"]);
        let v = select(&c, r(Some(30), None), now());
        assert_eq!(v[0].1, Verdict::KeepNewest);
        assert_eq!(v[0].0.id, "age040");
        // A single old backup survives any rule.
        assert_eq!(
            deleted(&backups(&[400]), r(Some(1), Some(1))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn with_both_rules_either_one_keeps() {
        let c = backups(&[0, 1, 2, 20, 40, 41]);
        // count 2 keeps 0,1; days 30 keeps 0,1,2,20.
        assert_eq!(deleted(&c, r(Some(30), Some(2))), ["age040", "age041"]);
        // count 5 keeps up to 40 even though days says otherwise.
        assert_eq!(deleted(&c, r(Some(30), Some(5))), ["age041"]);
        let v = select(&c, r(Some(30), Some(2)), now());
        let verdicts: Vec<Verdict> = v.iter().map(|(_, v)| *v).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::KeepNewest,
                Verdict::KeepWithinCount,
                Verdict::KeepWithinDays,
                Verdict::KeepWithinDays,
                Verdict::Delete,
                Verdict::Delete
            ]
        );
    }

    #[test]
    fn input_order_does_not_matter_and_ties_break_by_id() {
        let mut c = backups(&[3, 0, 2, 1]);
        let a = deleted(&c, r(None, Some(2)));
        c.reverse();
        assert_eq!(deleted(&c, r(None, Some(2))), a);
        let t = now() - Duration::days(1);
        let tied = vec![
            Candidate {
                id: "b".into(),
                finished_at: t,
            },
            Candidate {
                id: "a".into(),
                finished_at: t,
            },
            Candidate {
                id: "c".into(),
                finished_at: t,
            },
        ];
        assert_eq!(deleted(&tied, r(None, Some(1))), ["b", "a"]);
    }

    #[test]
    fn future_timestamps_count_as_recent() {
        let c = vec![
            Candidate {
                id: "future".into(),
                finished_at: now() + Duration::days(2),
            },
            Candidate {
                id: "old".into(),
                finished_at: now() - Duration::days(9),
            },
            Candidate {
                id: "older".into(),
                finished_at: now() - Duration::days(10),
            },
        ];
        assert_eq!(deleted(&c, r(Some(5), None)), ["old", "older"]);
    }

    #[test]
    fn without_a_rule_nothing_is_deleted() {
        assert_eq!(
            deleted(&backups(&[0, 100, 200]), r(None, None)),
            Vec::<String>::new()
        );
        assert!(r(None, None).validate().is_err());
        assert!(r(Some(0), None).validate().is_err());
        assert!(r(None, Some(0)).validate().is_err());
        assert!(r(Some(1), None).validate().is_ok());
    }

    /// Exhaustive over small inputs: every subset of ages 0..8 and every rule up to 8.
    #[test]
    fn invariants_hold_for_every_small_case() {
        let ages: Vec<i64> = (0..8).map(|i| i * 3).collect();
        for mask in 0u32..(1 << ages.len()) {
            let present: Vec<i64> = ages
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, a)| *a)
                .collect();
            let c = backups(&present);
            for days in [None, Some(1), Some(5), Some(10), Some(30)] {
                for count in [None, Some(1), Some(2), Some(3), Some(8)] {
                    let rule = r(days, count);
                    let v = select(&c, rule, now());
                    assert_eq!(v.len(), c.len());
                    let kept: Vec<&Candidate> =
                        v.iter().filter(|(_, v)| v.keep()).map(|(c, _)| c).collect();
                    if !c.is_empty() {
                        let newest = c.iter().min_by_key(|c| now() - c.finished_at).unwrap();
                        assert!(
                            kept.contains(&newest),
                            "newest deleted: {present:?} {rule:?}"
                        );
                    }
                    if let Some(n) = count {
                        assert!(
                            kept.len() >= (n as usize).min(c.len()),
                            "{present:?} {rule:?}"
                        );
                    }
                    for (cand, verdict) in &v {
                        let age = (now() - cand.finished_at).num_days();
                        if days.is_some_and(|d| age <= i64::from(d)) {
                            assert!(verdict.keep(), "recent deleted: {present:?} {rule:?}");
                        }
                        if *verdict == Verdict::Delete {
                            // Deleted only when every configured rule allows it.
                            assert!(days.is_none_or(|d| age > i64::from(d)));
                            let rank = v.iter().position(|(x, _)| x == cand).unwrap();
                            assert!(count.is_none_or(|n| rank >= n as usize));
                            assert!(rule.is_set());
                        }
                    }
                }
            }
        }
    }
}
