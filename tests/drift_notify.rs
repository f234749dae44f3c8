//! The drift event trigger (`spec.driftDetection.eventTrigger`) against real PostgreSQL:
//! installed by an apply, a hand change of an RLS policy, a storage parameter or an index
//! notifies `dbpolicy_drift`, the operator's own apply does not, the trigger goes with its
//! last policy (turned off or released), and a role that may not create it gets a clear
//! state while the rest of the policy is applied.

use dbpolicy_test_support as support;

use std::time::Duration;

use dbpolicy::api::{DatabasePolicySpec, Mode};
use dbpolicy::engine::ddl_notify::{self, Payload, TriggerState};
use dbpolicy::engine::{self, PolicyId};
use sqlx::postgres::PgListener;
use support::TestDb;

fn spec(event_trigger: bool) -> DatabasePolicySpec {
    serde_yaml::from_str(&format!(
        "database: {{connectionSecretRef: {{name: x}}}}
driftDetection: {{eventTrigger: {event_trigger}}}
rowLevelSecurity:
  tables:
    - table: t
      enabled: true
      policies:
        - {{name: own, using: \"owner = current_user\"}}
autovacuum:
  tables: [{{table: t, vacuumThreshold: 10}}]
indexes:
  indexes: [{{name: t_owner, table: t, columns: [owner]}}]
"
    ))
    .expect("spec")
}

async fn setup() -> TestDb {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, owner text NOT NULL)")
        .await;
    db
}

async fn run(db_url: &str, spec: &DatabasePolicySpec, id: &str) -> engine::Outcome {
    let mut conn = dbpolicy::pg::connect_one(db_url).await.expect("connect");
    let outcome = engine::run(&mut conn, spec, Mode::Apply, &PolicyId(id.into()))
        .await
        .expect("run");
    let report = outcome.report.as_ref().expect("applied");
    assert!(report.succeeded(), "{report:?}");
    outcome
}

async fn listener(db: &TestDb) -> PgListener {
    let mut l = PgListener::connect(db.url()).await.expect("listener");
    l.listen(ddl_notify::CHANNEL).await.expect("LISTEN");
    l
}

/// The next notification within `wait`, if any.
async fn next(l: &mut PgListener, wait: Duration) -> Option<Payload> {
    match tokio::time::timeout(wait, l.recv()).await {
        Ok(n) => {
            let n = n.expect("recv");
            Some(Payload::parse(n.payload()).unwrap_or_else(|| panic!("payload {}", n.payload())))
        }
        Err(_) => None,
    }
}

async fn triggers(db: &TestDb) -> Vec<String> {
    db.query_column(
        "SELECT evtname::text || ' ' || evtevent FROM pg_event_trigger WHERE evtname LIKE 'dbpolicy%' ORDER BY 1",
    )
    .await
}

#[tokio::test]
async fn a_hand_change_notifies_and_the_operators_own_apply_does_not() {
    let db = setup().await;
    let mut l = listener(&db).await;
    let first = run(db.url(), &spec(true), "tests/a").await;
    assert_eq!(first.drift_trigger, Some(TriggerState::Active));
    assert_eq!(
        triggers(&db).await,
        [
            "dbpolicy_drift_ddl ddl_command_end",
            "dbpolicy_drift_drop sql_drop"
        ]
    );
    // The apply created a policy, set a storage parameter and built an index: none of it
    // is drift (the engine's session sets dbpolicy.applying).
    assert_eq!(next(&mut l, Duration::from_millis(500)).await, None);

    for (hand, tag, kind) in [
        (
            "ALTER POLICY own ON t USING (true)",
            "ALTER POLICY",
            "policy",
        ),
        (
            "ALTER TABLE t SET (autovacuum_vacuum_threshold = 99)",
            "ALTER TABLE",
            "table",
        ),
        (
            "ALTER TABLE t DISABLE ROW LEVEL SECURITY",
            "ALTER TABLE",
            "table",
        ),
        ("DROP INDEX t_owner", "DROP INDEX", "index"),
    ] {
        db.exec(hand).await;
        let p = next(&mut l, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no notification for {hand}"));
        assert_eq!(p.tag, tag, "{hand}");
        assert!(p.objects.iter().any(|(t, _)| t == kind), "{hand}: {p:?}");
        assert!(p.concerns_managed_objects(), "{hand}: {p:?}");
    }
    // Other DDL notifies too, and is told apart by its object types.
    db.exec("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        .await;
    let p = next(&mut l, Duration::from_secs(10))
        .await
        .expect("CREATE FUNCTION");
    assert!(!p.concerns_managed_objects(), "{p:?}");
    // Temporary tables are nobody's drift.
    db.exec("CREATE TEMP TABLE scratch (a int)").await;
    assert_eq!(next(&mut l, Duration::from_millis(300)).await, None);

    // The repair is the operator's own DDL: no notification, and then nothing to do.
    let repair = run(db.url(), &spec(true), "tests/a").await;
    assert!(
        repair.plan.changes().count() >= 4,
        "{}",
        repair.plan.render_sql()
    );
    assert_eq!(next(&mut l, Duration::from_millis(500)).await, None);
    let again = run(db.url(), &spec(true), "tests/a").await;
    assert_eq!(
        again.plan.changes().count(),
        0,
        "{}",
        again.plan.render_sql()
    );
    assert_eq!(again.drift_trigger, Some(TriggerState::Active));
}

#[tokio::test]
async fn a_failing_notification_never_fails_the_users_statement() {
    let db = setup().await;
    run(db.url(), &spec(true), "tests/a").await;
    let role = db.unique_role("app");
    db.exec(&format!("CREATE ROLE {role} LOGIN NOSUPERUSER"))
        .await;
    db.exec("CREATE TABLE mine (id int)").await;
    db.exec(&format!("ALTER TABLE mine OWNER TO {role}")).await;
    // pg_notify refused to the user's role (privileges on functions are per database):
    // the trigger body fails in the user's DDL, and swallows it.
    db.exec("REVOKE EXECUTE ON FUNCTION pg_notify(text, text) FROM PUBLIC")
        .await;
    let mut l = listener(&db).await;
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&db.url_as(&role))
        .await
        .expect("connect");
    sqlx::raw_sql("ALTER TABLE mine SET (fillfactor = 70)")
        .execute(&mut conn)
        .await
        .expect("the user's DDL succeeds");
    assert_eq!(next(&mut l, Duration::from_millis(500)).await, None);
    // The superuser may still notify: the trigger is in place.
    db.exec("ALTER TABLE mine SET (fillfactor = 80)").await;
    assert!(next(&mut l, Duration::from_secs(10)).await.is_some());
}

#[tokio::test]
async fn the_trigger_goes_with_its_last_policy() {
    let db = setup().await;
    db.exec("CREATE TABLE u (id int PRIMARY KEY)").await;
    let other: DatabasePolicySpec = serde_yaml::from_str(
        "database: {connectionSecretRef: {name: x}}
driftDetection: {eventTrigger: true}
autovacuum:
  tables: [{table: u, vacuumThreshold: 5}]
",
    )
    .unwrap();
    run(db.url(), &spec(true), "tests/a").await;
    run(db.url(), &other, "tests/b").await;
    let subscribers = || {
        db.query_column::<String>(
            "SELECT policy FROM dbpolicy.managed WHERE area = 'driftEventTrigger' ORDER BY 1",
        )
    };
    assert_eq!(subscribers().await, ["tests/a", "tests/b"]);

    // Turned off in one: the other still uses it.
    let off = run(db.url(), &spec(false), "tests/a").await;
    assert_eq!(off.drift_trigger, None);
    assert_eq!(subscribers().await, ["tests/b"]);
    assert_eq!(triggers(&db).await.len(), 2);

    // The last one released (what the finalizer runs): the trigger and its function go.
    let out = support::run_dbpolicy(["release", "--policy-id", "tests/b"], Some(db.url()));
    support::expect_code(&out, 0);
    assert!(triggers(&db).await.is_empty());
    let function: Option<String> = db
        .query_scalar("SELECT to_regprocedure('dbpolicy.notify_drift()')::text")
        .await;
    assert_eq!(function, None);
    assert!(subscribers().await.is_empty());

    // Turned off in the last policy: gone as well. (Installed again through the CLI,
    // which says so.)
    let yaml = support::policy(
        "a",
        "  driftDetection: {eventTrigger: true}\n  autovacuum:\n    tables: [{table: u, vacuumThreshold: 5}]\n",
    );
    let out = support::cli("apply", db.url(), &yaml);
    support::expect_code(&out, 0);
    assert!(
        out.stdout
            .contains("# drift event trigger: active (NOTIFY dbpolicy_drift on DDL)"),
        "{}",
        out.stdout
    );
    assert_eq!(triggers(&db).await.len(), 2);
    run(db.url(), &spec(false), "tests/a").await;
    assert!(triggers(&db).await.is_empty());
}

#[tokio::test]
async fn a_role_that_is_not_a_superuser_gets_a_clear_reason_and_the_rest_is_applied() {
    let db = setup().await;
    let role = db.unique_role("owner");
    db.exec(&format!("CREATE ROLE {role} LOGIN NOSUPERUSER"))
        .await;
    db.exec(&format!("ALTER TABLE t OWNER TO {role}")).await;
    db.exec(&format!(
        "GRANT CREATE ON DATABASE \"{}\" TO {role}",
        db.name()
    ))
    .await;
    db.exec(&format!("GRANT CREATE ON SCHEMA public TO {role}"))
        .await;
    let outcome = run(&db.url_as(&role), &spec(true), "tests/a").await;
    match &outcome.drift_trigger {
        Some(TriggerState::NotPermitted { message }) => {
            assert!(message.contains("not a superuser"), "{message}");
            assert!(message.contains(&role), "{message}");
        }
        other => panic!("expected NotPermitted, got {other:?}"),
    }
    assert!(outcome.plan.changes().count() >= 3);
    assert!(triggers(&db).await.is_empty());
    let threshold: Option<String> = db
        .query_scalar("SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = 't'")
        .await;
    assert_eq!(threshold.as_deref(), Some("autovacuum_vacuum_threshold=10"));

    // Once a superuser's policy installed it, the role's policy can use it.
    let admin: DatabasePolicySpec = serde_yaml::from_str(
        "database: {connectionSecretRef: {name: x}}\ndriftDetection: {eventTrigger: true}\n",
    )
    .unwrap();
    run(db.url(), &admin, "tests/admin").await;
    let outcome = run(&db.url_as(&role), &spec(true), "tests/a").await;
    assert_eq!(outcome.drift_trigger, Some(TriggerState::Active));
}

#[test]
fn the_example_asks_for_the_event_trigger_and_is_valid() {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../examples/drift-in-seconds.yaml")).unwrap();
    let spec: DatabasePolicySpec = serde_yaml::from_value(doc["spec"].clone()).unwrap();
    assert!(spec.drift_event_trigger());
    assert_eq!(spec.drift_check_interval.as_deref(), Some("1h"));
    assert!(dbpolicy::api::validate_spec(&spec).is_empty());
}
