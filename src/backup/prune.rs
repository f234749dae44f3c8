//! Retention: which backups to delete. [`select`] is pure (the tests below cover it);
//! [`plan`] reads the store and decides, [`execute`] deletes what the plan says.
//!
//! Rules, per database, over the backups' verification states ([`super::state`]):
//! - only good backups (`verified`, `unverified`: the dump is there with the recorded
//!   size, and no verify found it wanting) are counted: a `corrupt`, `failed` or
//!   `incomplete` backup never takes a good one's place, so the verdicts on the good
//!   backups are exactly those they would get without the damaged ones;
//! - the newest good backup and the newest verified backup are always kept, whatever the
//!   rules say (a schedule that stopped weeks ago must not leave the database with no
//!   backup, nor with only unproven ones);
//! - `count`: the newest `count` good backups are kept; `days`: good backups finished
//!   within `days` are kept; with both, a backup is kept while either rule keeps it;
//! - a damaged backup is kept, as evidence, while it is inside the retention window (newer
//!   than the oldest good backup the rules keep, or within `days`) or when there is no
//!   good backup at all; once older than the window it is deleted like the rest;
//! - leftovers of interrupted runs and prunes (a dump or a verification record without a
//!   manifest, a local staging file) are deleted once older than [`LEFTOVER_GRACE`], so a
//!   run in progress is never touched.
//!
//! Deleting a backup removes its manifest first (after which it is no longer a backup),
//! then its dump and its verification record: a prune killed at any point leaves every
//! backup either whole or reduced to leftovers that the next prune removes.

use chrono::{DateTime, Duration, Utc};

use super::list::{self, Listing};
use super::manifest::{DUMP_SUFFIX, MANIFEST_SUFFIX};
use super::state::{State, VERIFY_SUFFIX};
use super::store::Store;
use super::{ArgsError, BackupError};

/// How old a leftover of an interrupted run must be before `prune` deletes it.
pub(crate) const LEFTOVER_GRACE: Duration = Duration::hours(24);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Retention {
    pub days: Option<u32>,
    pub count: Option<u32>,
}

impl Retention {
    pub(crate) fn validate(&self) -> Result<(), ArgsError> {
        match (self.days, self.count) {
            (None, None) => Err(ArgsError::NoRetention),
            (Some(0), _) => Err(ArgsError::ZeroRetentionDays),
            (_, Some(0)) => Err(ArgsError::ZeroRetentionCount),
            _ => Ok(()),
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.days.is_some() || self.count.is_some()
    }

    fn within_days(&self, finished_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.days
            .is_some_and(|d| now.signed_duration_since(finished_at) <= Duration::days(i64::from(d)))
    }

    /// `--retention-count 7 and --retention-days 30`, for messages.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.count {
            parts.push(format!("--retention-count {n}"));
        }
        if let Some(d) = self.days {
            parts.push(format!("--retention-days {d}"));
        }
        parts.join(" and ")
    }
}

/// A backup, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub id: String,
    pub finished_at: DateTime<Utc>,
    pub state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The newest good backup.
    KeepNewest,
    KeepWithinCount,
    KeepWithinDays,
    /// The newest verified backup, kept beyond the rules.
    KeepNewestVerified,
    /// No rule given (callers validate first; a backstop).
    KeepNoRule,
    /// Damaged, not counted, kept as evidence inside the retention window.
    KeepDamagedInWindow,
    /// Damaged, but there is no good backup to fall back on.
    KeepDamagedNoGood,
    /// Good, outside every rule.
    Delete,
    /// Damaged and older than the retention window.
    DeleteDamaged,
}

impl Verdict {
    pub(crate) fn keep(self) -> bool {
        !matches!(self, Verdict::Delete | Verdict::DeleteDamaged)
    }

    /// Why, for people.
    pub(crate) fn why(self, retention: Retention) -> String {
        let rules = retention.describe();
        match self {
            Verdict::KeepNewest => "the newest good backup".into(),
            Verdict::KeepWithinCount => format!("within {rules}"),
            Verdict::KeepWithinDays => format!("within {rules}"),
            Verdict::KeepNewestVerified => "the newest verified backup".into(),
            Verdict::KeepNoRule => "no retention rule".into(),
            Verdict::KeepDamagedInWindow => {
                "not counted; kept as evidence inside the retention window".into()
            }
            Verdict::KeepDamagedNoGood => "not counted; there is no good backup".into(),
            Verdict::Delete => format!("beyond {rules}"),
            Verdict::DeleteDamaged => "not counted, and older than the retention window".into(),
        }
    }
}

/// The verdict on every candidate, newest first. Ties on `finished_at` are broken by id so
/// that the result does not depend on input order.
pub(crate) fn select(
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
    // Good backups first, ranked among themselves only: damaged ones take no place.
    let mut verdicts: Vec<Option<Verdict>> = vec![None; sorted.len()];
    let mut rank = 0usize;
    let mut verified_seen = false;
    for (i, c) in sorted.iter().enumerate() {
        if !c.state.is_good() {
            continue;
        }
        let verdict = if rank == 0 {
            Verdict::KeepNewest
        } else if retention.count.is_some_and(|n| rank < n as usize) {
            Verdict::KeepWithinCount
        } else if retention.within_days(c.finished_at, now) {
            Verdict::KeepWithinDays
        } else if c.state == State::Verified && !verified_seen {
            Verdict::KeepNewestVerified
        } else if !retention.is_set() {
            Verdict::KeepNoRule
        } else {
            Verdict::Delete
        };
        verified_seen |= c.state == State::Verified;
        rank += 1;
        verdicts[i] = Some(verdict);
    }
    // The window: back to the oldest good backup the rules keep (the newest-verified
    // exception does not stretch it, or one old verified backup would keep every damaged
    // one for ever).
    let window_end = verdicts.iter().rposition(|v| {
        matches!(
            v,
            Some(Verdict::KeepNewest | Verdict::KeepWithinCount | Verdict::KeepWithinDays)
        )
    });
    for (i, c) in sorted.iter().enumerate() {
        if verdicts[i].is_some() {
            continue;
        }
        verdicts[i] = Some(match window_end {
            None => Verdict::KeepDamagedNoGood,
            Some(end) if i < end => Verdict::KeepDamagedInWindow,
            _ if retention.within_days(c.finished_at, now) || !retention.is_set() => {
                Verdict::KeepDamagedInWindow
            }
            _ => Verdict::DeleteDamaged,
        });
    }
    sorted
        .into_iter()
        .zip(verdicts)
        .map(|(c, v)| (c, v.expect("every candidate has a verdict")))
        .collect()
}

/// One backup and what prune does with it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Decision {
    pub database_dir: String,
    pub id: String,
    pub state: State,
    pub keep: bool,
    pub why: String,
}

impl Decision {
    pub(crate) fn name(&self) -> String {
        format!("{}/{}", self.database_dir, self.id)
    }
}

/// An object of no backup, old enough to delete.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LeftoverDeletion {
    pub database_dir: String,
    pub file: String,
    pub why: String,
}

/// What prune will do: every backup's verdict, oldest first per database, and the
/// leftovers and local staging files it will remove.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PrunePlan {
    pub decisions: Vec<Decision>,
    pub leftovers: Vec<LeftoverDeletion>,
    pub staging_files: Vec<std::path::PathBuf>,
}

/// What `prune` removed.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PruneReport {
    pub deleted: Vec<String>,
    pub kept: Vec<String>,
    pub leftovers_deleted: Vec<String>,
}

/// Reads the store and decides; changes nothing.
pub(crate) async fn plan(
    store: &Store,
    database: Option<&str>,
    retention: Retention,
    now: DateTime<Utc>,
) -> Result<PrunePlan, BackupError> {
    retention.validate()?;
    let listing: Listing = list::scan(store, database).await?;
    let mut plan = PrunePlan::default();
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
            .filter(|b| b.database_dir == db)
            .map(|b| Candidate {
                id: b.id.clone(),
                finished_at: b.manifest.finished_at,
                state: b.state,
            })
            .collect();
        // Oldest first: a prune killed half-way has deleted the oldest.
        for (c, verdict) in select(&candidates, retention, now).into_iter().rev() {
            plan.decisions.push(Decision {
                database_dir: db.to_string(),
                id: c.id,
                state: c.state,
                keep: verdict.keep(),
                why: verdict.why(retention),
            });
        }
    }
    for leftover in &listing.leftovers {
        if now.signed_duration_since(leftover.last_modified) >= LEFTOVER_GRACE {
            plan.leftovers.push(LeftoverDeletion {
                database_dir: leftover.database_dir.clone(),
                file: leftover.file.clone(),
                why: leftover.why.clone(),
            });
        }
    }
    let dir = database.map(Store::database_dir);
    let grace = LEFTOVER_GRACE.to_std().unwrap_or_default();
    plan.staging_files = store.stale_staging_files(dir.as_deref(), grace);
    Ok(plan)
}

/// Carries out a plan; `done` is told of each deletion as it completes.
pub(crate) async fn execute(
    store: &Store,
    plan: &PrunePlan,
    mut done: impl FnMut(String),
) -> Result<PruneReport, BackupError> {
    let mut report = PruneReport::default();
    for d in &plan.decisions {
        if d.keep {
            report.kept.push(d.name());
            continue;
        }
        // The manifest first: from then on this is not a backup, only leftovers.
        for suffix in [MANIFEST_SUFFIX, DUMP_SUFFIX, VERIFY_SUFFIX] {
            store
                .delete(&d.database_dir, &format!("{}{suffix}", d.id))
                .await?;
        }
        done(format!("deleted {}", d.name()));
        report.deleted.push(d.name());
    }
    for l in &plan.leftovers {
        store.delete(&l.database_dir, &l.file).await?;
        let name = format!("{}/{}", l.database_dir, l.file);
        done(format!("deleted leftover {name}"));
        report.leftovers_deleted.push(name);
    }
    for staged in &plan.staging_files {
        let name = staged.display().to_string();
        match std::fs::remove_file(staged) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackupError::Tool(format!("deleting {name}: {e}"))),
        }
        done(format!("deleted leftover {name}"));
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
                state: State::Unverified,
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
                state: State::Unverified,
            },
            Candidate {
                id: "a".into(),
                finished_at: t,
                state: State::Unverified,
            },
            Candidate {
                id: "c".into(),
                finished_at: t,
                state: State::Unverified,
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
                state: State::Unverified,
            },
            Candidate {
                id: "old".into(),
                finished_at: now() - Duration::days(9),
                state: State::Unverified,
            },
            Candidate {
                id: "older".into(),
                finished_at: now() - Duration::days(10),
                state: State::Unverified,
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

    /// Backups of the given (age in days, state), named by age.
    fn states(list: &[(i64, State)]) -> Vec<Candidate> {
        list.iter()
            .map(|&(d, state)| Candidate {
                id: format!("age{d:03}"),
                finished_at: now() - Duration::days(d),
                state,
            })
            .collect()
    }

    fn verdicts(c: &[Candidate], rule: Retention) -> Vec<(String, Verdict)> {
        select(c, rule, now())
            .into_iter()
            .map(|(c, v)| (c.id, v))
            .collect()
    }

    #[test]
    fn a_corrupt_newest_backup_never_takes_a_good_ones_place() {
        // The case: the newest dump had one byte flipped and verify recorded it.
        let c = states(&[
            (2, State::Verified),
            (1, State::Verified),
            (0, State::Corrupt),
        ]);
        assert_eq!(
            verdicts(&c, r(None, Some(1))),
            [
                ("age000".to_string(), Verdict::KeepDamagedInWindow),
                ("age001".to_string(), Verdict::KeepNewest),
                ("age002".to_string(), Verdict::Delete),
            ]
        );
        // A newer good backup: the corrupt one leaves the window with the older good one.
        let c = states(&[
            (3, State::Verified),
            (2, State::Verified),
            (1, State::Corrupt),
            (0, State::Verified),
        ]);
        assert_eq!(
            deleted(&c, r(None, Some(1))),
            ["age001", "age002", "age003"]
        );
    }

    #[test]
    fn damaged_backups_are_kept_when_nothing_good_is_left() {
        let c = states(&[
            (90, State::Failed),
            (60, State::Incomplete),
            (30, State::Corrupt),
        ]);
        let v = verdicts(&c, r(Some(1), Some(1)));
        assert!(
            v.iter().all(|(_, v)| *v == Verdict::KeepDamagedNoGood),
            "{v:?}"
        );
    }

    #[test]
    fn the_newest_verified_backup_is_kept_beyond_the_rules() {
        let c = states(&[
            (3, State::Verified),
            (2, State::Verified),
            (1, State::Unverified),
            (0, State::Unverified),
        ]);
        assert_eq!(
            verdicts(&c, r(None, Some(1))),
            [
                ("age000".to_string(), Verdict::KeepNewest),
                ("age001".to_string(), Verdict::Delete),
                ("age002".to_string(), Verdict::KeepNewestVerified),
                ("age003".to_string(), Verdict::Delete),
            ]
        );
        // It does not stretch the window for damaged backups.
        let c = states(&[
            (3, State::Verified),
            (2, State::Corrupt),
            (1, State::Unverified),
        ]);
        assert_eq!(deleted(&c, r(None, Some(1))), ["age002"]);
        // Within days, damaged backups stay.
        assert!(deleted(&c, r(Some(5), Some(1))).is_empty());
    }

    /// Exhaustive over small stores: 5 slots, each empty or a backup in one of the five
    /// states, under every rule up to 8.
    #[test]
    fn state_invariants_hold_for_every_small_case() {
        const SLOTS: [Option<State>; 6] = [
            None,
            Some(State::Verified),
            Some(State::Unverified),
            Some(State::Corrupt),
            Some(State::Failed),
            Some(State::Incomplete),
        ];
        let ages: [i64; 5] = [0, 2, 4, 6, 8];
        let mut cases = 0;
        for code in 0..SLOTS.len().pow(ages.len() as u32) {
            let mut rest = code;
            let mut present = Vec::new();
            for age in ages {
                if let Some(state) = SLOTS[rest % SLOTS.len()] {
                    present.push((age, state));
                }
                rest /= SLOTS.len();
            }
            let c = states(&present);
            let good: Vec<Candidate> = c.iter().filter(|c| c.state.is_good()).cloned().collect();
            for days in [None, Some(1), Some(5)] {
                for count in [None, Some(1), Some(2), Some(8)] {
                    let rule = r(days, count);
                    let v = select(&c, rule, now());
                    cases += 1;
                    assert_eq!(v.len(), c.len());
                    let verdict = |id: &str| v.iter().find(|(c, _)| c.id == id).unwrap().1;
                    // Damaged backups take no good one's place: the good ones get exactly
                    // the verdicts they get alone.
                    for (g, alone) in select(&good, rule, now()) {
                        assert_eq!(verdict(&g.id), alone, "{present:?} {rule:?}");
                    }
                    let kept_good = v.iter().filter(|(c, v)| c.state.is_good() && v.keep());
                    if let Some(n) = count {
                        assert!(kept_good.count() >= (n as usize).min(good.len()));
                    }
                    // The newest good and the newest verified backups are kept.
                    let newest = |state: Option<State>| {
                        v.iter()
                            .find(|(c, _)| c.state.is_good() && state.is_none_or(|s| c.state == s))
                    };
                    for (c, verdict) in [newest(None), newest(Some(State::Verified))]
                        .into_iter()
                        .flatten()
                    {
                        assert!(verdict.keep(), "{} deleted: {present:?} {rule:?}", c.id);
                    }
                    for (cand, verdict) in &v {
                        let age = (now() - cand.finished_at).num_days();
                        if days.is_some_and(|d| age <= i64::from(d)) {
                            assert!(verdict.keep(), "recent deleted: {present:?} {rule:?}");
                        }
                        if !cand.state.is_good() && !verdict.keep() {
                            // Deleted only behind a good backup the rules keep.
                            assert!(
                                v.iter().any(|(g, gv)| g.state.is_good()
                                    && g.finished_at > cand.finished_at
                                    && matches!(
                                        gv,
                                        Verdict::KeepNewest
                                            | Verdict::KeepWithinCount
                                            | Verdict::KeepWithinDays
                                    )),
                                "{present:?} {rule:?}"
                            );
                        }
                    }
                    if good.is_empty() {
                        assert!(v.iter().all(|(_, v)| v.keep()), "{present:?} {rule:?}");
                    }
                }
            }
        }
        assert_eq!(cases, 6usize.pow(5) * 12);
    }
}
