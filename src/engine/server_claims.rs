//! Server-scope ownership: settings (`ALTER SYSTEM`) and physical replication slots belong
//! to the whole PostgreSQL server, while the ownership ledger (`dbpolicy.managed`) lives in
//! one database. Without a server-wide record, two policies on two databases of one
//! server that set `log_statement` differently flip it back and forth on every run.
//!
//! So every server-wide item a policy declares is claimed in one well-known database of
//! the server (the maintenance database `postgres`), in `dbpolicy.server_claims`: one
//! claimant per item, a (database, policy id) pair. The rules:
//!
//! - A policy claims every server-wide item it declares, at every Apply run whose plan is
//!   valid, before the first change runs (first come, first served; a claim of a database
//!   that no longer exists is void and taken over).
//! - An item claimed by another (database, policy) is an `OwnershipConflict` in the plan,
//!   whatever the value: one owner decides the value and resets it when it stops declaring
//!   it (or is deleted with `deletionPolicy: Reset`); a second declarer would lose it then,
//!   or flip it back on its next run. The same policy id on another database is another
//!   claimant for the same reason.
//! - Two runs that start at once both see the item free; the claims are written in one
//!   transaction under an advisory lock of the claims database, and only where the item is
//!   free or already the run's (`INSERT … ON CONFLICT … WHERE`): the loser's apply fails
//!   with `OwnershipConflict` before it changes anything.
//! - A claim is released once the policy neither declares nor owns the item (after its
//!   reset or drop ran), and by `dbpolicy release` / the operator's deletion.
//! - When the claims database cannot be read, every server-wide item of the policy is a
//!   plan error (`ServerClaimsUnavailable`): never changed unchecked.
//!
//! Planning is pure ([`refuse`], [`to_take`], [`to_release`]); the I/O is [`observe`],
//! [`take`], [`settle`] and [`release_all`], on a connection of its own to the claims
//! database.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Connection, PgConnection};

use super::areas::replicas::OWNED_SLOT;
use super::ledger::Ledger;
use super::plan::{Area, AreaPlan, Change, LedgerOp, Plan};
use crate::api::DatabasePolicySpec;
use crate::pg::error_summary;
use crate::reason::Reason;

/// The database holding the claims unless the caller names another: every PostgreSQL
/// server has it, and every role may connect to it by default.
pub(crate) const DEFAULT_CLAIMS_DATABASE: &str = "postgres";
pub(crate) const CLAIMS_TABLE: &str = "dbpolicy.server_claims";
/// Advisory lock taken (per transaction) by every claim write in the claims database:
/// serialises the bootstrap and the claims of runs on different databases. "dbpclaim".
pub(crate) const CLAIMS_LOCK_KEY: i64 = 0x6462_7063_6c61_696d;

pub(crate) const BOOTSTRAP_SQL: &str = "CREATE SCHEMA IF NOT EXISTS dbpolicy;
CREATE TABLE IF NOT EXISTS dbpolicy.server_claims (
    kind text NOT NULL CHECK (kind IN ('setting', 'slot')),
    name text NOT NULL,
    database text NOT NULL,
    policy text NOT NULL,
    value text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, name)
);
COMMENT ON TABLE dbpolicy.server_claims IS 'Which database''s dbpolicy policy owns each server-wide setting and replication slot; release with dbpolicy release, do not edit by hand.'";

/// What kind of server-wide item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A parameter set with `ALTER SYSTEM` (name in lower case).
    Setting,
    /// A physical replication slot.
    Slot,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Setting => "setting",
            Kind::Slot => "slot",
        }
    }
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "setting" => Some(Kind::Setting),
            "slot" => Some(Kind::Slot),
            _ => None,
        }
    }
    /// The area whose plan and condition report the item.
    pub(crate) fn area(self) -> Area {
        match self {
            Kind::Setting => Area::ServerSettings,
            Kind::Slot => Area::Replicas,
        }
    }
    /// For messages.
    fn noun(self) -> &'static str {
        match self {
            Kind::Setting => "server setting",
            Kind::Slot => "replication slot",
        }
    }
}

/// A server-wide item: its kind and name (lower case for settings, as PostgreSQL matches
/// them).
pub(crate) type Item = (Kind, String);

/// Who claims an item: the database a policy governs and the policy's id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claimant {
    pub database: String,
    pub policy: String,
}

impl std::fmt::Display for Claimant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "policy {} on database {}", self.policy, self.database)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub by: Claimant,
    /// The value the claimant declared (settings).
    pub value: Option<String>,
}

/// A server-wide item the spec declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Declared {
    /// As the spec spells it (the target of plan errors).
    pub spelled: String,
    pub value: Option<String>,
}

/// The server-wide items a policy touches: what it declares and what the database's
/// ledger says it set or created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Touched {
    pub declared: BTreeMap<Item, Declared>,
    pub owned: BTreeSet<Item>,
}

impl Touched {
    pub(crate) fn is_empty(&self) -> bool {
        self.declared.is_empty() && self.owned.is_empty()
    }
    fn items(&self) -> BTreeSet<&Item> {
        self.declared.keys().chain(self.owned.iter()).collect()
    }
}

/// The server-wide item a ledger operation is about, if any.
fn item_of(area: Area, target: &str, item: &str) -> Option<Item> {
    match area {
        Area::ServerSettings => Some((Kind::Setting, item.to_lowercase())),
        Area::Replicas if item == OWNED_SLOT => Some((Kind::Slot, target.to_string())),
        _ => None,
    }
}

fn op_item(op: &LedgerOp) -> Option<Item> {
    match op {
        LedgerOp::Intend { area, target, item }
        | LedgerOp::Record { area, target, item }
        | LedgerOp::Forget { area, target, item } => item_of(*area, target, item),
    }
}

/// The server-wide items of `spec` and of what `ledger` says this policy owns.
pub(crate) fn touched(spec: &DatabasePolicySpec, ledger: &Ledger) -> Touched {
    let mut t = Touched::default();
    if let Some(s) = &spec.server_settings {
        for (key, value) in &s.parameters {
            t.declared
                .entry((Kind::Setting, key.to_lowercase()))
                .or_insert_with(|| Declared {
                    spelled: key.clone(),
                    value: Some(value.clone()),
                });
        }
    }
    if let Some(r) = &spec.replicas {
        for slot in r.replicas.iter().filter_map(|r| r.slot.as_deref()) {
            t.declared
                .entry((Kind::Slot, slot.to_string()))
                .or_insert_with(|| Declared {
                    spelled: slot.to_string(),
                    value: None,
                });
        }
    }
    for area in [Area::ServerSettings, Area::Replicas] {
        t.owned.extend(
            ledger
                .items(area)
                .filter_map(|(target, item)| item_of(area, target, item)),
        );
    }
    t
}

/// What was read from the claims database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// This run: the policy's database and id.
    pub me: Claimant,
    /// The database holding the claims (for messages).
    pub claims_database: String,
    /// The live claims of the touched items, and every claim of `me`. A claim of a
    /// database that no longer exists is void and not here.
    pub claims: BTreeMap<Item, Claim>,
    /// Why the claims could not be read; every server-wide item is then refused.
    pub unavailable: Option<String>,
}

impl Observed {
    /// The claimant of `item` when it is not this run.
    fn other(&self, item: &Item) -> Option<&Claim> {
        self.claims.get(item).filter(|c| c.by != self.me)
    }
}

// ------------------------------------------------------------------ plan (pure)

/// The plan's area for `area`, created when the spec has none (a slot owned but no
/// longer declared still belongs to it).
fn area_plan(plan: &mut Plan, area: Area) -> &mut AreaPlan {
    if let Some(i) = plan.areas.iter().position(|a| a.area == area) {
        return &mut plan.areas[i];
    }
    plan.areas.push(AreaPlan::new(area));
    plan.areas.last_mut().expect("just pushed")
}

/// Refuses, as plan errors, every server-wide item the policy declares or would change
/// that another (database, policy) claims (`OwnershipConflict`), or all of them when the
/// claims could not be read (`ServerClaimsUnavailable`).
pub(crate) fn refuse(plan: &mut Plan, touched: &Touched, observed: &Observed) {
    // Target of each item: the change's when there is one (PostgreSQL's spelling), else
    // the spec's.
    let mut items: BTreeMap<Item, String> = touched
        .declared
        .iter()
        .map(|(item, d)| (item.clone(), d.spelled.clone()))
        .collect();
    for change in plan.changes() {
        for item in change.ledger.iter().filter_map(op_item) {
            items.insert(item, change.target.clone());
        }
    }
    let mut errors = Vec::new();
    for (item, target) in items {
        let (kind, name) = &item;
        if let Some(why) = &observed.unavailable {
            errors.push((
                kind.area(),
                target,
                Reason::ServerClaimsUnavailable,
                format!(
                    "{} {name} belongs to the whole server, and which policy owns it is recorded in database {}, which could not be read: {why}; nothing server-wide is changed until it can be (the role needs CONNECT on {} and, for the first claim, CREATE there)",
                    kind.noun(),
                    observed.claims_database,
                    observed.claims_database,
                ),
            ));
            continue;
        }
        let Some(claim) = observed.other(&item) else {
            continue;
        };
        let value = match (&claim.value, touched.declared.get(&item)) {
            (
                Some(theirs),
                Some(Declared {
                    value: Some(ours), ..
                }),
            ) => {
                format!(" (it wants {theirs:?}, this policy {ours:?})")
            }
            (Some(theirs), _) => format!(" (it wants {theirs:?})"),
            _ => String::new(),
        };
        errors.push((
            kind.area(),
            target,
            Reason::OwnershipConflict,
            format!(
                "{} {name} is claimed server-wide by {}{value}: a server-wide item has one owner; declare it in one policy only (a deleted policy's claims are freed by `dbpolicy release`)",
                kind.noun(),
                claim.by,
            ),
        ));
    }
    for (area, target, reason, message) in errors {
        area_plan(plan, area).error(target, reason, message);
    }
}

/// The claims an Apply run writes before its first change: each declared item not
/// already claimed by this run with the same value.
pub(crate) fn to_take(touched: &Touched, observed: &Observed) -> Vec<(Item, Option<String>)> {
    touched
        .declared
        .iter()
        .filter(|(item, d)| match observed.claims.get(*item) {
            Some(c) => c.by != observed.me || c.value != d.value,
            None => true,
        })
        .map(|(item, d)| (item.clone(), d.value.clone()))
        .collect()
}

/// The claims of this run to release once its changes ran: those whose item it neither
/// declares nor owns any more (`after`: the items touched once the applied ledger
/// operations are counted).
pub(crate) fn to_release(after: &Touched, observed: &Observed) -> Vec<Item> {
    let keep = after.items();
    observed
        .claims
        .iter()
        .filter(|(item, c)| c.by == observed.me && !keep.contains(item))
        .map(|(item, _)| item.clone())
        .collect()
}

/// The items touched once `applied` changes ran: the ledger with their operations.
pub(crate) fn touched_after(
    spec: &DatabasePolicySpec,
    ledger: &Ledger,
    applied: &[Change],
) -> Touched {
    let mut ledger = ledger.clone();
    ledger.apply_ops(applied.iter().flat_map(|c| c.ledger.iter()));
    touched(spec, &ledger)
}

// ------------------------------------------------------------------ where the claims are

/// Why the claims database cannot be used: every server-wide item is then refused
/// (`ServerClaimsUnavailable`). No message shows the URL (it holds a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unavailable {
    #[error("no claims database was given to the engine")]
    NotGiven,
    #[error("the policy's connection URI cannot be parsed ({0}), so the claims database cannot be derived from it")]
    UnparsableUrl(url::ParseError),
    #[error(
        "the policy's connection URI has no path, so the claims database cannot be derived from it"
    )]
    NoPath,
    /// [`crate::pg::ConnectError`]'s message: host, port and database, never the password.
    #[error("{0}")]
    Connect(String),
    /// Setting the connection's timeouts failed.
    #[error("{0}")]
    Session(String),
}

/// How to reach the claims database. Its `Debug` never shows the URL (it holds a password).
#[derive(Clone)]
pub(crate) struct ClaimsTarget {
    database: String,
    url: Result<String, Unavailable>,
}

impl std::fmt::Debug for ClaimsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimsTarget")
            .field("database", &self.database)
            .field("configured", &self.url.is_ok())
            .finish()
    }
}

impl Default for ClaimsTarget {
    /// None: every server-wide item is refused (`ServerClaimsUnavailable`).
    fn default() -> Self {
        ClaimsTarget {
            database: DEFAULT_CLAIMS_DATABASE.into(),
            url: Err(Unavailable::NotGiven),
        }
    }
}

impl ClaimsTarget {
    /// The default claims database (`postgres`) of the server `policy_url` points at.
    pub(crate) fn for_policy_url(policy_url: &str) -> Self {
        Self::on_database(policy_url, DEFAULT_CLAIMS_DATABASE)
    }
    /// Database `database` of the server `policy_url` points at, with the same role,
    /// password and connection parameters.
    pub(crate) fn on_database(policy_url: &str, database: &str) -> Self {
        ClaimsTarget {
            database: database.to_string(),
            url: claims_url(policy_url, database),
        }
    }
    pub(crate) fn database(&self) -> &str {
        &self.database
    }
}

/// `url` with its database replaced by `database` (the path, and any `dbname` query
/// parameter, which libpq-style URLs may use instead).
pub(crate) fn claims_url(url: &str, database: &str) -> Result<String, Unavailable> {
    let mut parsed = url::Url::parse(url).map_err(Unavailable::UnparsableUrl)?;
    if parsed.cannot_be_a_base() {
        return Err(Unavailable::NoPath);
    }
    parsed.set_path("");
    parsed
        .path_segments_mut()
        .map_err(|_| Unavailable::NoPath)?
        .push(database);
    // The query is rewritten only when it names a database itself: everything else in
    // it (sslmode, host=/socket/dir, …) stays byte for byte.
    if parsed.query_pairs().any(|(k, _)| k == "dbname") {
        let query: Vec<(String, String)> = parsed
            .query_pairs()
            .filter(|(k, _)| k != "dbname")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if query.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(query);
        }
    }
    Ok(parsed.into())
}

/// A connection to the claims database, with the run's timeouts.
pub(crate) async fn connect(
    target: &ClaimsTarget,
    statement_ms: u64,
) -> Result<PgConnection, Unavailable> {
    let url = target.url.as_ref().map_err(Clone::clone)?;
    let mut conn = crate::pg::connect_one(url)
        .await
        .map_err(|e| Unavailable::Connect(e.to_string()))?;
    sqlx::Executor::execute(
        &mut conn,
        format!("SET statement_timeout = {statement_ms}; SET lock_timeout = {statement_ms}")
            .as_str(),
    )
    .await
    .map_err(|e| Unavailable::Session(error_summary(&e)))?;
    Ok(conn)
}

// ------------------------------------------------------------------ I/O

type ClaimRow = (String, String, String, String, Option<String>);

/// Reads, in one query, the live claims of the touched items and every claim of `me`.
/// `conn` is the claims database, or why it could not be reached.
pub(crate) async fn observe(
    conn: Result<&mut PgConnection, Unavailable>,
    target: &ClaimsTarget,
    me: Claimant,
    touched: &Touched,
) -> Observed {
    let mut observed = Observed {
        me,
        claims_database: target.database().to_string(),
        claims: BTreeMap::new(),
        unavailable: None,
    };
    let conn = match conn {
        Ok(c) => c,
        Err(why) => {
            observed.unavailable = Some(why.to_string());
            return observed;
        }
    };
    let (kinds, names): (Vec<&str>, Vec<&str>) = touched
        .items()
        .into_iter()
        .map(|(k, n)| (k.as_str(), n.as_str()))
        .unzip();
    let rows: Result<Vec<ClaimRow>, sqlx::Error> = sqlx::query_as(
        "SELECT c.kind, c.name, c.database, c.policy, c.value FROM dbpolicy.server_claims c
         WHERE ((c.kind, c.name) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                OR (c.database = $3 AND c.policy = $4))
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_database d WHERE d.datname = c.database)",
    )
    .bind(&kinds)
    .bind(&names)
    .bind(&observed.me.database)
    .bind(&observed.me.policy)
    .fetch_all(&mut *conn)
    .await;
    match rows {
        Ok(rows) => {
            for (kind, name, database, policy, value) in rows {
                if let Some(kind) = Kind::parse(&kind) {
                    observed.claims.insert(
                        (kind, name),
                        Claim {
                            by: Claimant { database, policy },
                            value,
                        },
                    );
                }
            }
        }
        // Never bootstrapped: nothing is claimed yet.
        Err(e) if matches!(crate::pg::sqlstate(&e).as_deref(), Some("42P01" | "3F000")) => {}
        Err(e) => observed.unavailable = Some(error_summary(&e)),
    }
    observed
}

/// Why claims could not be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TakeError {
    /// Claimed by others in the meantime (a run on another database that started at
    /// the same time): item and its claim.
    Conflict(Vec<(Item, Claim)>),
    Database(String),
}

impl TakeError {
    pub(crate) fn reason(&self) -> Reason {
        match self {
            TakeError::Conflict(_) => Reason::OwnershipConflict,
            TakeError::Database(_) => Reason::ServerClaimsUnavailable,
        }
    }
    /// The first line stands alone.
    pub(crate) fn message(&self, claims_database: &str) -> String {
        match self {
            TakeError::Conflict(lost) => lost
                .iter()
                .map(|((kind, name), c)| {
                    format!(
                        "{} {name} was claimed server-wide by {} while this run planned: nothing was changed",
                        kind.noun(),
                        c.by
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            TakeError::Database(why) => format!(
                "claiming server-wide items in database {claims_database} failed: {why}; nothing was changed"
            ),
        }
    }
}

/// Claims `items` for `me`, all or none, in one transaction of the claims database: an
/// item is taken only when it is free, already `me`'s, or claimed by a database that no
/// longer exists.
pub(crate) async fn take(
    conn: &mut PgConnection,
    me: &Claimant,
    items: &[(Item, Option<String>)],
) -> Result<(), TakeError> {
    if items.is_empty() {
        return Ok(());
    }
    let db = |e: sqlx::Error| TakeError::Database(error_summary(&e));
    let mut tx = conn.begin().await.map_err(db)?;
    // Concurrent `CREATE TABLE IF NOT EXISTS` can fail on the catalog's unique index:
    // the lock makes the bootstrap, and every claim, one at a time on the server.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CLAIMS_LOCK_KEY)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    sqlx::Executor::execute(&mut *tx, BOOTSTRAP_SQL)
        .await
        .map_err(db)?;
    let kinds: Vec<&str> = items.iter().map(|((k, _), _)| k.as_str()).collect();
    let names: Vec<&str> = items.iter().map(|((_, n), _)| n.as_str()).collect();
    let values: Vec<Option<&str>> = items.iter().map(|(_, v)| v.as_deref()).collect();
    let taken: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO dbpolicy.server_claims AS c (kind, name, database, policy, value)
         SELECT k, n, $4, $5, v FROM unnest($1::text[], $2::text[], $3::text[]) AS t(k, n, v)
         ON CONFLICT (kind, name) DO UPDATE
            SET database = EXCLUDED.database, policy = EXCLUDED.policy,
                value = EXCLUDED.value, updated_at = now()
          WHERE (c.database = EXCLUDED.database AND c.policy = EXCLUDED.policy)
             OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database d WHERE d.datname = c.database)
         RETURNING c.kind, c.name",
    )
    .bind(&kinds)
    .bind(&names)
    .bind(&values)
    .bind(&me.database)
    .bind(&me.policy)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    let taken: BTreeSet<(String, String)> = taken.into_iter().collect();
    let lost: Vec<&str> = items
        .iter()
        .filter(|((k, n), _)| !taken.contains(&(k.as_str().to_string(), n.clone())))
        .map(|((_, n), _)| n.as_str())
        .collect();
    if lost.is_empty() {
        return tx.commit().await.map_err(db);
    }
    let lost_kinds: Vec<&str> = items
        .iter()
        .filter(|((k, n), _)| !taken.contains(&(k.as_str().to_string(), n.clone())))
        .map(|((k, _), _)| k.as_str())
        .collect();
    let holders: Vec<ClaimRow> = sqlx::query_as(
        "SELECT kind, name, database, policy, value FROM dbpolicy.server_claims
         WHERE (kind, name) IN (SELECT * FROM unnest($1::text[], $2::text[])) ORDER BY 1, 2",
    )
    .bind(&lost_kinds)
    .bind(&lost)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    // Dropping `tx` rolls back: all or none.
    Err(TakeError::Conflict(
        holders
            .into_iter()
            .filter_map(|(kind, name, database, policy, value)| {
                Some((
                    (Kind::parse(&kind)?, name),
                    Claim {
                        by: Claimant { database, policy },
                        value,
                    },
                ))
            })
            .collect(),
    ))
}

/// Deletes `me`'s claims on `items`.
pub(crate) async fn release(
    conn: &mut PgConnection,
    me: &Claimant,
    items: &[Item],
) -> Result<(), sqlx::Error> {
    if items.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
    let names: Vec<&str> = items.iter().map(|(_, n)| n.as_str()).collect();
    sqlx::query(
        "DELETE FROM dbpolicy.server_claims
         WHERE database = $3 AND policy = $4
           AND (kind, name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(&kinds)
    .bind(&names)
    .bind(&me.database)
    .bind(&me.policy)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// After an apply: releases the claims of items the policy neither declares nor owns any
/// more. A failure only leaves a claim of ours behind, which the next run releases.
pub(crate) async fn settle(
    conn: &mut PgConnection,
    spec: &DatabasePolicySpec,
    ledger: &Ledger,
    observed: &Observed,
    applied: &[Change],
) {
    let items = to_release(&touched_after(spec, ledger, applied), observed);
    if let Err(e) = release(conn, &observed.me, &items).await {
        tracing::warn!(
            error = %error_summary(&e),
            "could not release server-wide claims in {CLAIMS_TABLE}; the next run releases them"
        );
    }
}

/// Every claim of `me` (a policy released or deleted): the items released.
pub(crate) async fn release_all(
    conn: &mut PgConnection,
    me: &Claimant,
) -> Result<Vec<Item>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "DELETE FROM dbpolicy.server_claims WHERE database = $1 AND policy = $2
         RETURNING kind, name",
    )
    .bind(&me.database)
    .bind(&me.policy)
    .fetch_all(&mut *conn)
    .await
    .or_else(|e| match crate::pg::sqlstate(&e).as_deref() {
        Some("42P01" | "3F000") => Ok(Vec::new()),
        _ => Err(e),
    })?;
    let mut items: Vec<Item> = rows
        .into_iter()
        .filter_map(|(k, n)| Some((Kind::parse(&k)?, n)))
        .collect();
    items.sort();
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::Change;

    fn me() -> Claimant {
        Claimant {
            database: "app_a".into(),
            policy: "ns/a".into(),
        }
    }
    fn other() -> Claimant {
        Claimant {
            database: "app_b".into(),
            policy: "ns/b".into(),
        }
    }
    fn observed(claims: &[(Kind, &str, Claimant, Option<&str>)]) -> Observed {
        Observed {
            me: me(),
            claims_database: "postgres".into(),
            claims: claims
                .iter()
                .map(|(k, n, by, v)| {
                    (
                        (*k, n.to_string()),
                        Claim {
                            by: by.clone(),
                            value: v.map(String::from),
                        },
                    )
                })
                .collect(),
            unavailable: None,
        }
    }
    fn spec(yaml: &str) -> DatabasePolicySpec {
        serde_yaml::from_str(&format!(
            "database: {{connectionSecretRef: {{name: db}}}}\n{yaml}"
        ))
        .unwrap()
    }
    fn settings_plan(targets: &[&str]) -> Plan {
        let mut a = AreaPlan::new(Area::ServerSettings);
        for t in targets {
            a.changes.push(
                Change::new(Area::ServerSettings, *t, "set", "ALTER SYSTEM …")
                    .record_under("server", t.to_lowercase()),
            );
        }
        Plan { areas: vec![a] }
    }
    fn reasons(p: &Plan) -> Vec<(Area, String, Reason)> {
        p.errors()
            .map(|e| (e.area, e.target.clone(), e.reason))
            .collect()
    }

    #[test]
    fn touched_items_are_declared_settings_and_slots_and_owned_ones() {
        let s = spec(
            "serverSettings: {parameters: {Log_Statement: ddl}}\nreplicas: {replicas: [{name: r1, connectionSecretRef: {name: r}, slot: r1_slot}, {name: r2, connectionSecretRef: {name: r}}]}\n",
        );
        let mut ledger = Ledger::for_policy("ns/a");
        ledger.insert(Area::ServerSettings, "server", "work_mem", "ns/a");
        ledger.insert(Area::Replicas, "old_slot", OWNED_SLOT, "ns/a");
        ledger.insert(Area::Replicas, "theirs", OWNED_SLOT, "ns/other");
        ledger.insert(Area::Indexes, "public.i", "index", "ns/a");
        let t = touched(&s, &ledger);
        assert_eq!(
            t.declared.keys().cloned().collect::<Vec<_>>(),
            [
                (Kind::Setting, "log_statement".to_string()),
                (Kind::Slot, "r1_slot".to_string())
            ]
        );
        assert_eq!(
            t.declared[&(Kind::Setting, "log_statement".into())],
            Declared {
                spelled: "Log_Statement".into(),
                value: Some("ddl".into())
            }
        );
        assert_eq!(
            t.owned.into_iter().collect::<Vec<_>>(),
            [
                (Kind::Setting, "work_mem".to_string()),
                (Kind::Slot, "old_slot".to_string())
            ]
        );
        assert!(touched(&spec(""), &Ledger::for_policy("x")).is_empty());
    }

    #[test]
    fn a_setting_claimed_by_another_database_is_an_ownership_conflict_naming_it() {
        let s = spec("serverSettings: {parameters: {log_statement: all}}\n");
        let t = touched(&s, &Ledger::for_policy("ns/a"));
        let mut p = settings_plan(&["log_statement"]);
        refuse(
            &mut p,
            &t,
            &observed(&[(Kind::Setting, "log_statement", other(), Some("ddl"))]),
        );
        assert_eq!(
            reasons(&p),
            [(
                Area::ServerSettings,
                "log_statement".into(),
                Reason::OwnershipConflict
            )]
        );
        let msg = &p.errors().next().unwrap().message;
        assert!(
            msg.starts_with("server setting log_statement is claimed server-wide by policy ns/b on database app_b (it wants \"ddl\", this policy \"all\")"),
            "{msg}"
        );
    }

    #[test]
    fn the_same_value_claimed_by_another_is_still_a_conflict_even_without_a_change() {
        // Nothing would change now, but the owner resets it when it stops declaring it.
        let s = spec("serverSettings: {parameters: {log_statement: ddl}}\n");
        let t = touched(&s, &Ledger::for_policy("ns/a"));
        let mut p = settings_plan(&[]);
        refuse(
            &mut p,
            &t,
            &observed(&[(Kind::Setting, "log_statement", other(), Some("ddl"))]),
        );
        assert_eq!(reasons(&p).len(), 1);
    }

    #[test]
    fn the_same_policy_on_the_same_database_does_not_conflict_with_itself() {
        let s = spec("serverSettings: {parameters: {log_statement: ddl}}\n");
        let t = touched(&s, &Ledger::for_policy("ns/a"));
        let mut p = settings_plan(&["log_statement"]);
        let o = observed(&[(Kind::Setting, "log_statement", me(), Some("all"))]);
        refuse(&mut p, &t, &o);
        assert!(!p.has_errors());
        // A new value is written to the claim; the same value needs no write.
        assert_eq!(
            to_take(&t, &o),
            [((Kind::Setting, "log_statement".into()), Some("ddl".into()))]
        );
        let o = observed(&[(Kind::Setting, "log_statement", me(), Some("ddl"))]);
        assert!(to_take(&t, &o).is_empty());
    }

    #[test]
    fn the_same_policy_id_on_another_database_is_another_claimant() {
        let s = spec("serverSettings: {parameters: {log_statement: ddl}}\n");
        let t = touched(&s, &Ledger::for_policy("ns/a"));
        let mut p = settings_plan(&[]);
        let twin = Claimant {
            database: "app_b".into(),
            policy: "ns/a".into(),
        };
        refuse(
            &mut p,
            &t,
            &observed(&[(Kind::Setting, "log_statement", twin, None)]),
        );
        assert_eq!(reasons(&p).len(), 1);
    }

    #[test]
    fn a_slot_claimed_by_another_is_refused_in_the_replicas_area() {
        let s = spec(
            "replicas: {replicas: [{name: r1, connectionSecretRef: {name: r}, slot: r1_slot}]}\n",
        );
        let t = touched(&s, &Ledger::for_policy("ns/a"));
        let mut p = Plan::default();
        refuse(
            &mut p,
            &t,
            &observed(&[(Kind::Slot, "r1_slot", other(), None)]),
        );
        assert_eq!(
            reasons(&p),
            [(Area::Replicas, "r1_slot".into(), Reason::OwnershipConflict)]
        );
        assert!(p.errors().next().unwrap().message.starts_with(
            "replication slot r1_slot is claimed server-wide by policy ns/b on database app_b:"
        ));
    }

    #[test]
    fn a_reset_of_what_another_now_claims_is_refused() {
        // The ledger says this policy set work_mem (before claims existed); another
        // policy claimed it since: resetting it would undo the other's value.
        let mut ledger = Ledger::for_policy("ns/a");
        ledger.insert(Area::ServerSettings, "server", "work_mem", "ns/a");
        let t = touched(&spec(""), &ledger);
        let mut a = AreaPlan::new(Area::ServerSettings);
        a.changes.push(
            Change::new(
                Area::ServerSettings,
                "work_mem",
                "reset",
                "ALTER SYSTEM RESET",
            )
            .forget_under("server", "work_mem"),
        );
        let mut p = Plan { areas: vec![a] };
        refuse(
            &mut p,
            &t,
            &observed(&[(Kind::Setting, "work_mem", other(), Some("8MB"))]),
        );
        assert_eq!(
            reasons(&p),
            [(
                Area::ServerSettings,
                "work_mem".into(),
                Reason::OwnershipConflict
            )]
        );
    }

    #[test]
    fn unreadable_claims_refuse_every_server_wide_item_with_a_specific_reason() {
        let s = spec(
            "serverSettings: {parameters: {log_statement: ddl}}\nreplicas: {replicas: [{name: r1, connectionSecretRef: {name: r}, slot: s1}]}\n",
        );
        let t = touched(&s, &Ledger::for_policy("ns/a"));
        let mut p = settings_plan(&["log_statement"]);
        let mut o = observed(&[]);
        o.unavailable = Some("permission denied for database \"postgres\"".into());
        refuse(&mut p, &t, &o);
        assert_eq!(
            reasons(&p),
            [
                (
                    Area::ServerSettings,
                    "log_statement".into(),
                    Reason::ServerClaimsUnavailable
                ),
                (Area::Replicas, "s1".into(), Reason::ServerClaimsUnavailable)
            ]
        );
        let msg = &p.errors().next().unwrap().message;
        assert!(msg.contains("database postgres"), "{msg}");
        assert!(msg.contains("permission denied"), "{msg}");
    }

    #[test]
    fn claims_are_released_once_neither_declared_nor_owned() {
        let mut ledger = Ledger::for_policy("ns/a");
        ledger.insert(Area::ServerSettings, "server", "work_mem", "ns/a");
        ledger.insert(Area::ServerSettings, "server", "log_statement", "ns/a");
        let s = spec("serverSettings: {parameters: {log_statement: ddl}}\n");
        let o = observed(&[
            (Kind::Setting, "log_statement", me(), Some("ddl")),
            (Kind::Setting, "work_mem", me(), Some("8MB")),
            (Kind::Setting, "maintenance_work_mem", me(), Some("1GB")),
            (Kind::Setting, "shared_buffers", other(), Some("1GB")),
        ]);
        // work_mem is still owned until its reset ran.
        assert_eq!(
            to_release(&touched(&s, &ledger), &o),
            [(Kind::Setting, "maintenance_work_mem".to_string())]
        );
        let reset = Change::new(
            Area::ServerSettings,
            "work_mem",
            "reset",
            "ALTER SYSTEM RESET",
        )
        .forget_under("server", "work_mem");
        assert_eq!(
            to_release(&touched_after(&s, &ledger, &[reset]), &o),
            [
                (Kind::Setting, "maintenance_work_mem".to_string()),
                (Kind::Setting, "work_mem".to_string())
            ]
        );
    }

    #[test]
    fn the_claims_url_swaps_the_database_and_keeps_the_rest() {
        assert_eq!(
            claims_url(
                "postgres://u:p%40ss@db.example:5433/app?sslmode=require",
                "postgres"
            )
            .unwrap(),
            "postgres://u:p%40ss@db.example:5433/postgres?sslmode=require"
        );
        assert_eq!(
            claims_url(
                "postgresql://u@h/app?dbname=app&application_name=x",
                "postgres"
            )
            .unwrap(),
            "postgresql://u@h/postgres?application_name=x"
        );
        assert_eq!(
            claims_url("postgres://u@h", "postgres").unwrap(),
            "postgres://u@h/postgres"
        );
        assert_eq!(
            claims_url("postgres:///app?host=/var/run/postgresql", "postgres").unwrap(),
            "postgres:///postgres?host=/var/run/postgresql"
        );
        assert_eq!(
            claims_url("postgres://u@h/app", "my db").unwrap(),
            "postgres://u@h/my%20db"
        );
        assert!(claims_url("not a url", "postgres").is_err());
        assert!(!format!(
            "{:?}",
            ClaimsTarget::for_policy_url("postgres://u:secret@h/a")
        )
        .contains("secret"));
    }
}
