//! Drift in seconds (`spec.driftDetection.eventTrigger`): the event trigger that tells the
//! operator over LISTEN/NOTIFY when a table, index, policy or materialized view of the
//! database changes by hand, its installation and removal, and the notifications' payload.
//!
//! One trigger pair serves every policy on a database (event triggers are per database);
//! each policy that wants it holds a row in the ledger (`dbpolicy.managed`, area
//! [`LEDGER_AREA`]), and the trigger goes when the last row does: turned off, or the policy
//! released. The engine's own session sets [`APPLYING_GUC`], which the trigger reads so
//! that an apply never notifies — and so never re-triggers — itself.
//!
//! The trigger is a hint, never a gate: its body runs in the user's DDL, so every error
//! in it is swallowed (`EXCEPTION WHEN OTHERS`), and the poll of `driftCheckInterval`
//! stays as the fallback (it alone sees `ALTER SYSTEM` and data changes, which fire no
//! event trigger). Creating an event trigger needs a superuser in every PostgreSQL
//! version (16–18 included); a role that is not one gets [`TriggerState::NotPermitted`],
//! never a failed policy.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};

use crate::api::{DatabasePolicySpec, Mode};
use crate::reason::Reason;

/// The NOTIFY channel.
pub const CHANNEL: &str = "dbpolicy_drift";
/// The session setting by which the engine's own DDL is not reported.
pub(crate) const APPLYING_GUC: &str = "dbpolicy.applying";
/// The ledger area of a policy's subscription (target: the policy, item [`LEDGER_ITEM`]).
/// Not an `Area`: nothing is planned for it, and `ledger::observe` keeps it apart.
pub(crate) const LEDGER_AREA: &str = "driftEventTrigger";
pub(crate) const LEDGER_ITEM: &str = "subscription";
/// The function and the two event triggers, all in the `dbpolicy` schema's database.
pub(crate) const FUNCTION: &str = "dbpolicy.notify_drift()";
pub(crate) const TRIGGERS: [(&str, &str); 2] = [
    ("dbpolicy_drift_ddl", "ddl_command_end"),
    ("dbpolicy_drift_drop", "sql_drop"),
];
/// The function's comment names its version: a function of another version is replaced.
const VERSION_COMMENT: &str =
    "dbpolicy drift notifier v1: NOTIFY dbpolicy_drift on DDL; do not edit by hand.";
/// Objects listed per notification (the `8` of [`FUNCTION_SQL`], checked by a test); the
/// rest is counted in `more`. 8 identities of at most 200 characters keep the payload far
/// below NOTIFY's 8000 bytes.
#[cfg(test)]
const MAX_OBJECTS: usize = 8;

/// Runs in the user's DDL as the user (no SECURITY DEFINER), with a fixed search_path so
/// that no object of the user's stands in for a catalog function. Temporary objects and
/// `REFRESH MATERIALIZED VIEW` (the refresh CronJobs) never drift anything managed.
pub(crate) const FUNCTION_SQL: &str = r#"CREATE OR REPLACE FUNCTION dbpolicy.notify_drift() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $dbpolicy$
DECLARE
    objects jsonb;
    total integer;
BEGIN
    IF current_setting('dbpolicy.applying', true) = 'on' OR TG_TAG = 'REFRESH MATERIALIZED VIEW' THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'sql_drop' THEN
        SELECT count(*)::integer,
               jsonb_agg(jsonb_build_array(o.object_type, left(o.object_identity, 200))) FILTER (WHERE o.n <= 8)
          INTO total, objects
          FROM (SELECT coalesce(object_type, '') AS object_type, coalesce(object_identity, '') AS object_identity,
                       row_number() OVER () AS n
                  FROM pg_event_trigger_dropped_objects()
                 WHERE NOT is_temporary) o;
    ELSE
        SELECT count(*)::integer,
               jsonb_agg(jsonb_build_array(o.object_type, left(o.object_identity, 200))) FILTER (WHERE o.n <= 8)
          INTO total, objects
          FROM (SELECT coalesce(object_type, '') AS object_type, coalesce(object_identity, '') AS object_identity,
                       row_number() OVER () AS n
                  FROM pg_event_trigger_ddl_commands()
                 WHERE schema_name IS NULL OR schema_name NOT LIKE 'pg\_temp%') o;
    END IF;
    IF total > 0 THEN
        PERFORM pg_notify('dbpolicy_drift',
            jsonb_build_object('tag', TG_TAG, 'objects', objects, 'more', total - least(total, 8))::text);
    END IF;
EXCEPTION WHEN OTHERS THEN
    -- A notification is a hint: the user's statement must never fail for it.
    RAISE DEBUG 'dbpolicy.notify_drift: %', SQLERRM;
END
$dbpolicy$"#;

/// Whether the event trigger serves the policy after a run, for the `DriftEventTrigger`
/// condition and for the operator to listen or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum TriggerState {
    /// Installed and enabled: notifications come.
    Active,
    /// Plan mode, and not installed: Plan mode changes nothing.
    NotInstalled,
    /// The role may not create event triggers (not a superuser).
    NotPermitted { message: String },
    /// Installing failed otherwise (a timeout, a trigger of that name not ours, …).
    Failed { reason: Reason, message: String },
}

impl TriggerState {
    pub(crate) fn is_active(&self) -> bool {
        matches!(self, TriggerState::Active)
    }
    /// One line for the CLI.
    pub(crate) fn describe(&self) -> String {
        match self {
            TriggerState::Active => format!("active (NOTIFY {CHANNEL} on DDL)"),
            TriggerState::NotInstalled => "not installed (Plan mode changes nothing)".into(),
            TriggerState::NotPermitted { message } => format!("not permitted: {message}"),
            TriggerState::Failed { reason, message } => format!("failed: {message} ({reason})"),
        }
    }
}

/// What one query says about the trigger in the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Installed {
    /// The function exists with this version's comment.
    function_current: bool,
    /// The event triggers with one of our names.
    triggers: Vec<EventTrigger>,
    superuser: bool,
    role: String,
}

/// An event trigger of the database with one of our names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EventTrigger {
    name: String,
    event: String,
    /// It calls [`FUNCTION`].
    ours: bool,
    enabled: bool,
}

impl Installed {
    /// The trigger `name` is in place: on `event`, calling our function, enabled.
    fn serves(&self, name: &str, event: &str) -> bool {
        self.triggers
            .iter()
            .any(|t| t.name == name && t.event == event && t.ours && t.enabled)
    }
    /// Both triggers in place, calling the current function.
    fn complete(&self) -> bool {
        self.function_current && TRIGGERS.iter().all(|(n, e)| self.serves(n, e))
    }
    /// A trigger with one of our names that calls another function: not ours to replace.
    fn foreign(&self) -> Option<&str> {
        self.triggers
            .iter()
            .find(|t| !t.ours)
            .map(|t| t.name.as_str())
    }
    fn any(&self) -> bool {
        !self.triggers.is_empty()
    }
}

const OBSERVE_SQL: &str = "SELECT
    coalesce(obj_description(to_regprocedure('dbpolicy.notify_drift()'), 'pg_proc') = $1, false),
    coalesce((SELECT array_agg(evtname::text ORDER BY evtname) FROM pg_event_trigger WHERE evtname = ANY($2)), '{}'),
    coalesce((SELECT array_agg(evtevent::text ORDER BY evtname) FROM pg_event_trigger WHERE evtname = ANY($2)), '{}'),
    coalesce((SELECT array_agg(evtfoid = coalesce(to_regprocedure('dbpolicy.notify_drift()')::oid, 0) ORDER BY evtname) FROM pg_event_trigger WHERE evtname = ANY($2)), '{}'),
    coalesce((SELECT array_agg(evtenabled <> 'D' ORDER BY evtname) FROM pg_event_trigger WHERE evtname = ANY($2)), '{}'),
    coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false),
    current_user::text";

async fn observe(conn: &mut PgConnection) -> Result<Installed, sqlx::Error> {
    let names: Vec<&str> = TRIGGERS.iter().map(|(n, _)| *n).collect();
    type Row = (
        bool,
        Vec<String>,
        Vec<String>,
        Vec<bool>,
        Vec<bool>,
        bool,
        String,
    );
    let (function_current, names, events, ours, enabled, superuser, role): Row =
        sqlx::query_as(OBSERVE_SQL)
            .bind(VERSION_COMMENT)
            .bind(&names)
            .fetch_one(&mut *conn)
            .await?;
    let triggers = names
        .into_iter()
        .zip(events)
        .zip(ours.into_iter().zip(enabled))
        .map(|((name, event), (ours, enabled))| EventTrigger {
            name,
            event,
            ours,
            enabled,
        })
        .collect();
    Ok(Installed {
        function_current,
        triggers,
        superuser,
        role,
    })
}

/// Brings the event trigger in line with the spec, under the run's advisory lock, after
/// the plan was applied: installs it (Apply mode) and records the policy's subscription
/// when the spec asks for it; removes the subscription, and the trigger with the last one,
/// when it no longer does. None when the spec does not ask for it.
///
/// Never an error: what went wrong is the state (and the poll goes on).
pub(crate) async fn sync(
    conn: &mut PgConnection,
    spec: &DatabasePolicySpec,
    mode: Mode,
    policy: &str,
    subscribers: &BTreeSet<String>,
    timeout_ms: u64,
) -> Option<TriggerState> {
    let wanted = spec.drift_event_trigger();
    if !wanted {
        if mode == Mode::Apply && subscribers.contains(policy) {
            if let Err(e) = unsubscribe(conn, policy, timeout_ms).await {
                tracing::warn!(
                    error = %crate::pg::error_summary(&e),
                    "could not remove the drift event trigger (spec.driftDetection.eventTrigger turned off); the next run tries again"
                );
            }
        }
        return None;
    }
    let installed = match observe(conn).await {
        Ok(i) => i,
        Err(e) => return Some(failed(&e)),
    };
    if mode == Mode::Plan {
        return Some(if installed.complete() {
            TriggerState::Active
        } else {
            TriggerState::NotInstalled
        });
    }
    if installed.complete() && subscribers.contains(policy) {
        return Some(TriggerState::Active);
    }
    if let Some(name) = installed.foreign() {
        return Some(TriggerState::Failed {
            reason: Reason::NameTaken,
            message: format!(
                "an event trigger named {name} exists and calls another function than {FUNCTION}: it is not dbpolicy's to replace"
            ),
        });
    }
    if !installed.complete() && !installed.superuser {
        return Some(not_permitted(&installed.role));
    }
    match install(conn, &installed, policy, timeout_ms).await {
        Ok(()) => Some(TriggerState::Active),
        Err(e) if !installed.complete() && crate::pg::sqlstate(&e).as_deref() == Some("42501") => {
            Some(not_permitted(&installed.role))
        }
        Err(e) => Some(failed(&e)),
    }
}

fn not_permitted(role: &str) -> TriggerState {
    TriggerState::NotPermitted {
        message: format!(
            "role {role} is not a superuser, and PostgreSQL lets only superusers create event triggers: drift is found by the poll of driftCheckInterval only"
        ),
    }
}

fn failed(e: &sqlx::Error) -> TriggerState {
    TriggerState::Failed {
        reason: Reason::of_error(e, Reason::ApplyFailed),
        message: format!(
            "installing the drift event trigger: {}; drift is found by the poll of driftCheckInterval meanwhile",
            crate::pg::error_summary(e)
        ),
    }
}

async fn begin_bounded(
    conn: &mut PgConnection,
    timeout_ms: u64,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::Executor::execute(
        &mut *tx,
        format!(
            "SET LOCAL statement_timeout = {timeout_ms}; SET LOCAL lock_timeout = {timeout_ms}"
        )
        .as_str(),
    )
    .await?;
    Ok(tx)
}

/// One transaction: the ledger, the function (when not current), the missing triggers
/// (a disabled or stale one of ours is dropped first), the subscription.
async fn install(
    conn: &mut PgConnection,
    installed: &Installed,
    policy: &str,
    timeout_ms: u64,
) -> Result<(), sqlx::Error> {
    let mut tx = begin_bounded(conn, timeout_ms).await?;
    if !installed.complete() {
        sqlx::Executor::execute(&mut *tx, super::ledger::BOOTSTRAP_SQL).await?;
        if !installed.function_current {
            sqlx::Executor::execute(&mut *tx, FUNCTION_SQL).await?;
            sqlx::Executor::execute(
                &mut *tx,
                format!(
                    "COMMENT ON FUNCTION {FUNCTION} IS {}",
                    crate::pg::quote_literal(VERSION_COMMENT)
                )
                .as_str(),
            )
            .await?;
        }
        for (name, event) in TRIGGERS {
            if installed.serves(name, event) {
                continue;
            }
            let name = crate::pg::quote_ident(name);
            sqlx::Executor::execute(
                &mut *tx,
                format!("DROP EVENT TRIGGER IF EXISTS {name}").as_str(),
            )
            .await?;
            sqlx::Executor::execute(
                &mut *tx,
                format!("CREATE EVENT TRIGGER {name} ON {event} EXECUTE FUNCTION {FUNCTION}")
                    .as_str(),
            )
            .await?;
        }
    }
    sqlx::query(
        "INSERT INTO dbpolicy.managed (area, target, item, policy) VALUES ($1, $2, $3, $2)
         ON CONFLICT (area, target, item) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()",
    )
    .bind(LEDGER_AREA)
    .bind(policy)
    .bind(LEDGER_ITEM)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Removes the policy's subscription, and the trigger when it was the last.
async fn unsubscribe(
    conn: &mut PgConnection,
    policy: &str,
    timeout_ms: u64,
) -> Result<(), sqlx::Error> {
    let mut tx = begin_bounded(conn, timeout_ms).await?;
    sqlx::query("DELETE FROM dbpolicy.managed WHERE area = $1 AND target = $2")
        .bind(LEDGER_AREA)
        .bind(policy)
        .execute(&mut *tx)
        .await?;
    drop_unless_subscribed(&mut tx).await?;
    tx.commit().await
}

/// Drops the triggers and the function when no policy subscribes any more (inside the
/// caller's transaction). A trigger of ours is told by the function it calls.
async fn drop_unless_subscribed(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let left: bool = sqlx::query_scalar(
        "SELECT to_regclass('dbpolicy.managed') IS NOT NULL AND EXISTS (SELECT 1 FROM dbpolicy.managed WHERE area = $1)",
    )
    .bind(LEDGER_AREA)
    .fetch_one(&mut *conn)
    .await
    .or_else(|e| match crate::pg::sqlstate(&e).as_deref() {
        Some("42P01") | Some("3F000") => Ok(false),
        _ => Err(e),
    })?;
    if left {
        return Ok(false);
    }
    let installed = observe(&mut *conn).await?;
    if !installed.any() && !installed.function_current {
        return Ok(false);
    }
    for t in installed.triggers.iter().filter(|t| t.ours) {
        sqlx::Executor::execute(
            &mut *conn,
            format!(
                "DROP EVENT TRIGGER IF EXISTS {}",
                crate::pg::quote_ident(&t.name)
            )
            .as_str(),
        )
        .await?;
    }
    if installed.foreign().is_none() {
        sqlx::Executor::execute(
            &mut *conn,
            format!("DROP FUNCTION IF EXISTS {FUNCTION}").as_str(),
        )
        .await?;
    }
    Ok(true)
}

/// After a release deleted the policy's ledger rows: drops the trigger if no policy
/// subscribes any more. Whether it dropped it.
pub(crate) async fn release(conn: &mut PgConnection, timeout_ms: u64) -> Result<bool, sqlx::Error> {
    let mut tx = begin_bounded(conn, timeout_ms).await?;
    let dropped = drop_unless_subscribed(&mut tx).await?;
    tx.commit().await?;
    Ok(dropped)
}

// ------------------------------------------------------------------ notifications

/// A notification's payload as the trigger writes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Payload {
    /// The command tag (`ALTER TABLE`, `DROP INDEX`, …).
    pub tag: String,
    /// (object type, object identity) of the first [`MAX_OBJECTS`] objects.
    #[serde(default)]
    pub objects: Vec<(String, String)>,
    /// How many more objects the command touched.
    #[serde(default)]
    pub more: u64,
}

/// The object types a policy manages or depends on: tables (RLS switches, storage
/// parameters, partitions), their indexes, policies, materialized views, and schemas
/// (renamed or dropped under them).
pub(crate) const MANAGED_TYPES: &[&str] =
    &["table", "index", "policy", "materialized view", "schema"];

impl Payload {
    pub fn parse(text: &str) -> Option<Payload> {
        serde_json::from_str(text).ok()
    }

    /// Whether the command may have changed something a policy manages. Objects left
    /// out of the payload (`more`) might be: they count as such.
    pub fn concerns_managed_objects(&self) -> bool {
        if self.tag == "REFRESH MATERIALIZED VIEW" {
            return false;
        }
        self.more > 0
            || self
                .objects
                .iter()
                .any(|(t, _)| MANAGED_TYPES.contains(&t.as_str()))
    }

    /// One line for logs: the tag and the objects (no data, only names).
    pub(crate) fn summary(&self) -> String {
        let mut s = self.tag.clone();
        for (t, id) in &self.objects {
            s.push_str(&format!(" {t} {id};"));
        }
        if self.more > 0 {
            s.push_str(&format!(" and {} more", self.more));
        }
        s
    }
}

/// Whether a notification's payload asks for a check. One that cannot be read (a trigger
/// of another version) does: a needless check costs little, a missed repair much.
pub(crate) fn wants_check(payload: &str) -> bool {
    Payload::parse(payload).is_none_or(|p| p.concerns_managed_objects())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_of_managed_objects_want_a_check() {
        for p in [
            r#"{"tag":"ALTER POLICY","objects":[["policy","own_rows on public.user_progress"]],"more":0}"#,
            r#"{"tag":"ALTER TABLE","objects":[["table","public.quiz_sessions"]],"more":0}"#,
            r#"{"tag":"DROP INDEX","objects":[["index","public.idx_active"]],"more":0}"#,
            r#"{"tag":"DROP SCHEMA","objects":[["type","s.t"],["table","s.t"]],"more":0}"#,
            r#"{"tag":"CREATE FUNCTION","objects":[["function","public.f()"]],"more":3}"#,
            "not json at all",
        ] {
            assert!(wants_check(p), "{p}");
        }
        // The object types decide: a command that named none concerns nothing.
        assert!(!Payload::parse(r#"{"tag":"ALTER TABLE"}"#)
            .unwrap()
            .concerns_managed_objects());
    }

    #[test]
    fn payloads_of_other_objects_and_refreshes_do_not() {
        for p in [
            r#"{"tag":"CREATE FUNCTION","objects":[["function","public.f()"]],"more":0}"#,
            r#"{"tag":"CREATE TYPE","objects":[["type","public.mood"]],"more":0}"#,
            r#"{"tag":"REFRESH MATERIALIZED VIEW","objects":[["materialized view","public.v"]],"more":0}"#,
        ] {
            assert!(!wants_check(p), "{p}");
        }
    }

    #[test]
    fn a_summary_names_the_command_and_its_objects() {
        let p = Payload::parse(
            r#"{"tag":"DROP TABLE","objects":[["table","public.t"],["type","public.t"]],"more":2}"#,
        )
        .unwrap();
        assert_eq!(
            p.summary(),
            "DROP TABLE table public.t; type public.t; and 2 more"
        );
    }

    #[test]
    fn the_function_skips_the_operator_and_never_fails_the_users_statement() {
        crate::pg::grammar::check_one_statement(FUNCTION_SQL).unwrap();
        assert!(FUNCTION_SQL.contains("current_setting('dbpolicy.applying', true) = 'on'"));
        assert!(FUNCTION_SQL.contains("EXCEPTION WHEN OTHERS"));
        assert!(!FUNCTION_SQL.to_uppercase().contains("SECURITY DEFINER"));
        assert!(FUNCTION_SQL.contains(&format!("'{CHANNEL}'")));
        assert!(FUNCTION_SQL.contains(&format!("o.n <= {MAX_OBJECTS}")));
        assert_eq!(APPLYING_GUC, "dbpolicy.applying");
    }

    #[test]
    fn installed_state_is_read_by_name_event_and_function() {
        let t = |n: &str, e: &str, ours, enabled| EventTrigger {
            name: n.to_string(),
            event: e.to_string(),
            ours,
            enabled,
        };
        let mut i = Installed {
            function_current: true,
            triggers: vec![
                t("dbpolicy_drift_ddl", "ddl_command_end", true, true),
                t("dbpolicy_drift_drop", "sql_drop", true, true),
            ],
            superuser: false,
            role: "app".into(),
        };
        assert!(i.complete() && i.foreign().is_none());
        i.triggers[1].enabled = false;
        assert!(!i.complete(), "a disabled trigger is not in place");
        i.triggers[1] = t("dbpolicy_drift_drop", "sql_drop", false, true);
        assert_eq!(i.foreign(), Some("dbpolicy_drift_drop"));
        i.triggers.clear();
        assert!(!i.complete() && !i.any());
    }
}
