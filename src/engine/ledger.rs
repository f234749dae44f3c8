//! The ownership ledger: which settings, flags and objects this policy has set or created,
//! kept in the database it governs (`dbpolicy.managed`), so removal from the spec resets
//! exactly what the policy owns and leaves what others set alone. It is read once per
//! reconcile and written in the same transaction as the change it records.
//!
//! A change PostgreSQL cannot run in a transaction (`CREATE INDEX CONCURRENTLY`,
//! `ALTER SYSTEM`) cannot be recorded atomically with its effect, and a run can be killed
//! between the two. So its intent is committed first, as a row whose item is
//! `intent:<item>`: the next run finds what a killed run began and can tell it is its own
//! (an index that exists, matches the spec and has an intent is recorded; an invalid one
//! is dropped and rebuilt). Recording or forgetting the item clears the intent.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::PgConnection;

use super::plan::{Area, LedgerOp};

pub(crate) const BOOTSTRAP_SQL: &str = "CREATE SCHEMA IF NOT EXISTS dbpolicy;
CREATE TABLE IF NOT EXISTS dbpolicy.managed (
    area text NOT NULL,
    target text NOT NULL,
    item text NOT NULL,
    policy text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (area, target, item)
);
COMMENT ON TABLE dbpolicy.managed IS 'What dbpolicy owns in this database; do not edit by hand.'";

/// What one policy owns, per area, and who owns everything else in the database (so two
/// policies pointing at one database are told apart and never reset each other's work).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    me: String,
    mine: BTreeMap<String, BTreeSet<(String, String)>>,
    others: BTreeMap<(String, String, String), String>,
    /// (area, target, item) this policy began to build and never recorded.
    intents: BTreeSet<(String, String, String)>,
    /// The policies subscribed to the drift event trigger (see `ddl_notify`).
    drift_subscribers: BTreeSet<String>,
}

/// The ledger item of an intent to build `item`.
pub(crate) const INTENT_PREFIX: &str = "intent:";

fn intent_item(item: &str) -> String {
    format!("{INTENT_PREFIX}{item}")
}

fn key(area: Area, target: &str, item: &str) -> (String, String, String) {
    (
        area.as_str().to_string(),
        target.to_string(),
        item.to_string(),
    )
}

impl Ledger {
    pub fn for_policy(me: &str) -> Self {
        Ledger {
            me: me.to_string(),
            ..Default::default()
        }
    }
    pub fn insert(&mut self, area: Area, target: &str, item: &str, policy: &str) {
        self.insert_owned(area, target.to_string(), item.to_string(), policy);
    }
    /// [`Ledger::insert`] of strings the caller no longer needs: the ledger's rows are read
    /// into the ledger without a copy (tens of thousands at thousands of tables).
    fn insert_owned(&mut self, area: Area, target: String, item: String, policy: &str) {
        if let Some(intended) = item.strip_prefix(INTENT_PREFIX) {
            // Another policy's unfinished work is its own to finish: only ours is kept.
            if policy == self.me {
                self.intents
                    .insert((area.as_str().to_string(), target, intended.to_string()));
            }
            return;
        }
        if policy == self.me {
            if !self.others.is_empty() {
                self.others
                    .remove(&(area.as_str().to_string(), target.clone(), item.clone()));
            }
            match self.mine.get_mut(area.as_str()) {
                Some(items) => {
                    items.insert((target, item));
                }
                None => {
                    self.mine
                        .insert(area.as_str().to_string(), BTreeSet::from([(target, item)]));
                }
            }
        } else {
            if let Some(s) = self.mine.get_mut(area.as_str()) {
                s.remove(&(target.clone(), item.clone()));
            }
            self.others.insert(
                (area.as_str().to_string(), target, item),
                policy.to_string(),
            );
        }
    }
    /// The policies subscribed to the drift event trigger ([`super::ddl_notify`]).
    pub(crate) fn drift_subscribers(&self) -> &BTreeSet<String> {
        &self.drift_subscribers
    }
    /// What this policy owns in `area`.
    pub(crate) fn items(&self, area: Area) -> impl Iterator<Item = (&str, &str)> {
        self.mine
            .get(area.as_str())
            .into_iter()
            .flatten()
            .map(|(t, i)| (t.as_str(), i.as_str()))
    }
    pub(crate) fn contains(&self, area: Area, target: &str, item: &str) -> bool {
        self.mine
            .get(area.as_str())
            .is_some_and(|s| s.contains(&(target.to_string(), item.to_string())))
    }
    /// Whether a run of this policy committed its intent to build this item and never
    /// recorded it: a run killed (or failed) while building it.
    pub(crate) fn intends(&self, area: Area, target: &str, item: &str) -> bool {
        self.intents.contains(&key(area, target, item))
    }
    /// The other policy that owns this item, if any.
    pub fn owned_by_other(&self, area: Area, target: &str, item: &str) -> Option<&str> {
        self.others
            .get(&(
                area.as_str().to_string(),
                target.to_string(),
                item.to_string(),
            ))
            .map(String::as_str)
    }
    /// The ledger as it will be once `ops` are applied (for plan simulation in tests).
    pub(crate) fn apply_ops<'a>(&mut self, ops: impl IntoIterator<Item = &'a LedgerOp>) {
        let me = self.me.clone();
        for op in ops {
            match op {
                LedgerOp::Intend { area, target, item } => {
                    self.intents.insert(key(*area, target, item));
                }
                LedgerOp::Record { area, target, item } => {
                    self.intents.remove(&key(*area, target, item));
                    self.insert(*area, target, item, &me)
                }
                LedgerOp::Forget { area, target, item } => {
                    self.intents.remove(&key(*area, target, item));
                    if let Some(s) = self.mine.get_mut(area.as_str()) {
                        s.remove(&(target.clone(), item.clone()));
                    }
                }
            }
        }
    }
}

/// Reads the whole ledger in one query; an absent ledger is an empty one.
pub(crate) async fn observe(conn: &mut PgConnection, me: &str) -> Result<Ledger, sqlx::Error> {
    let rows: Vec<(String, String, String, String)> =
        sqlx::query_as("SELECT area, target, item, policy FROM dbpolicy.managed")
            .fetch_all(&mut *conn)
            .await
            .or_else(|e| match crate::pg::sqlstate(&e).as_deref() {
                // undefined_table / invalid_schema_name: never bootstrapped
                Some("42P01") | Some("3F000") => Ok(Vec::new()),
                _ => Err(e),
            })?;
    let mut ledger = Ledger::for_policy(me);
    for (area, target, item, policy) in rows {
        if area == super::ddl_notify::LEDGER_AREA {
            ledger.drift_subscribers.insert(policy);
            continue;
        }
        if let Some(a) = Area::ALL.iter().find(|a| a.as_str() == area) {
            ledger.insert_owned(*a, target, item, &policy);
        }
    }
    Ok(ledger)
}

/// Writes one ledger operation (inside the caller's transaction; an intent is committed
/// on its own before the change it announces, see [`crate::engine::apply`]).
pub(crate) async fn write(
    conn: &mut PgConnection,
    op: &LedgerOp,
    policy: &str,
) -> Result<(), sqlx::Error> {
    write_all(conn, std::slice::from_ref(op), policy).await
}

/// What `ops`, applied in order, leave in the ledger table: per row, the last word.
#[derive(Debug, Default, PartialEq, Eq)]
struct NetEffect {
    /// Rows (area, target, item) written as this policy's.
    upsert: BTreeSet<(String, String, String)>,
    /// Rows deleted whoever holds them (an item forgotten).
    delete: BTreeSet<(String, String, String)>,
    /// Intent rows deleted only if they are this policy's: another policy's unfinished
    /// work is not ours to forget.
    delete_mine: BTreeSet<(String, String, String)>,
}

impl NetEffect {
    fn of(ops: &[LedgerOp]) -> Self {
        let mut net = NetEffect::default();
        let mut set = |row: (String, String, String), keep: bool, mine_only: bool| {
            net.upsert.remove(&row);
            net.delete.remove(&row);
            net.delete_mine.remove(&row);
            if keep {
                net.upsert.insert(row);
            } else if mine_only {
                net.delete_mine.insert(row);
            } else {
                net.delete.insert(row);
            }
        };
        for op in ops {
            match op {
                LedgerOp::Intend { area, target, item } => {
                    set(key(*area, target, &intent_item(item)), true, false);
                }
                LedgerOp::Record { area, target, item } => {
                    set(key(*area, target, item), true, false);
                    set(key(*area, target, &intent_item(item)), false, true);
                }
                LedgerOp::Forget { area, target, item } => {
                    set(key(*area, target, item), false, false);
                    set(key(*area, target, &intent_item(item)), false, true);
                }
            }
        }
        net
    }
}

fn columns(rows: &BTreeSet<(String, String, String)>) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
    let mut cols = (Vec::new(), Vec::new(), Vec::new());
    for (a, t, i) in rows {
        cols.0.push(a.as_str());
        cols.1.push(t.as_str());
        cols.2.push(i.as_str());
    }
    cols
}

/// Writes `ops` (inside the caller's transaction) in one statement, whatever their
/// number: a maintenance run creating and detaching thousands of partitions would
/// otherwise spend round trips per change on its bookkeeping, and every transaction of an
/// apply writes the ledger. The rows deleted and the rows written are disjoint
/// ([`NetEffect`] gives each row one last word), so the statement's two parts, which see
/// the same snapshot, never touch the same row.
pub(crate) async fn write_all(
    conn: &mut PgConnection,
    ops: &[LedgerOp],
    policy: &str,
) -> Result<(), sqlx::Error> {
    let net = NetEffect::of(ops);
    if net.upsert.is_empty() && net.delete.is_empty() && net.delete_mine.is_empty() {
        return Ok(());
    }
    let (a, t, i) = columns(&net.delete);
    let (ma, mt, mi) = columns(&net.delete_mine);
    let (ua, ut, ui) = columns(&net.upsert);
    sqlx::query(
        "WITH gone AS (
           DELETE FROM dbpolicy.managed m
           USING (SELECT d.a, d.t, d.i, false AS mine_only FROM unnest($1::text[], $2::text[], $3::text[]) AS d(a, t, i)
                  UNION ALL
                  SELECT d.a, d.t, d.i, true FROM unnest($4::text[], $5::text[], $6::text[]) AS d(a, t, i)) AS d
           WHERE m.area = d.a AND m.target = d.t AND m.item = d.i AND (NOT d.mine_only OR m.policy = $7))
         INSERT INTO dbpolicy.managed (area, target, item, policy)
         SELECT a, t, i, $7 FROM unnest($8::text[], $9::text[], $10::text[]) AS r(a, t, i)
         ON CONFLICT (area, target, item) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()",
    )
    .bind(a)
    .bind(t)
    .bind(i)
    .bind(ma)
    .bind(mt)
    .bind(mi)
    .bind(policy)
    .bind(ua)
    .bind(ut)
    .bind(ui)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_are_kept_apart_from_ownership() {
        let mut l = Ledger::for_policy("me");
        l.insert(Area::Indexes, "public.i", "intent:index", "me");
        l.insert(Area::Indexes, "public.j", "intent:index", "other");
        assert!(l.intends(Area::Indexes, "public.i", "index"));
        assert!(!l.contains(Area::Indexes, "public.i", "index"));
        assert_eq!(l.items(Area::Indexes).count(), 0, "an intent owns nothing");
        assert!(!l.intends(Area::Indexes, "public.j", "index"));
        assert_eq!(l.owned_by_other(Area::Indexes, "public.j", "index"), None);

        l.apply_ops(&[LedgerOp::Record {
            area: Area::Indexes,
            target: "public.i".into(),
            item: "index".into(),
        }]);
        assert!(l.contains(Area::Indexes, "public.i", "index"));
        assert!(
            !l.intends(Area::Indexes, "public.i", "index"),
            "recorded: done"
        );

        l.apply_ops(&[
            LedgerOp::Intend {
                area: Area::Indexes,
                target: "public.t".into(),
                item: "index".into(),
            },
            LedgerOp::Forget {
                area: Area::Indexes,
                target: "public.t".into(),
                item: "index".into(),
            },
        ]);
        assert!(!l.intends(Area::Indexes, "public.t", "index"));
    }

    fn row(item: &str) -> (String, String, String) {
        ("indexes".into(), "public.t".into(), item.into())
    }

    #[test]
    fn the_last_op_on_a_row_decides_what_is_written() {
        let rec = |item: &str| LedgerOp::Record {
            area: Area::Indexes,
            target: "public.t".into(),
            item: item.into(),
        };
        let forget = |item: &str| LedgerOp::Forget {
            area: Area::Indexes,
            target: "public.t".into(),
            item: item.into(),
        };
        let intend = |item: &str| LedgerOp::Intend {
            area: Area::Indexes,
            target: "public.t".into(),
            item: item.into(),
        };
        let net = NetEffect::of(&[intend("a"), rec("a"), rec("b"), forget("b"), forget("c")]);
        assert_eq!(net.upsert, BTreeSet::from([row("a")]));
        assert_eq!(net.delete, BTreeSet::from([row("b"), row("c")]));
        assert_eq!(
            net.delete_mine,
            BTreeSet::from([row("intent:a"), row("intent:b"), row("intent:c")])
        );
        // An intent declared after a forget of the same item stands.
        let net = NetEffect::of(&[forget("a"), intend("a")]);
        assert_eq!(net.upsert, BTreeSet::from([row("intent:a")]));
        assert_eq!(net.delete, BTreeSet::from([row("a")]));
        assert!(net.delete_mine.is_empty());
    }
}
