//! The row-level security normalisation cache (`dbpolicy.normalized`) against real
//! PostgreSQL: a no-op drift check builds no twin, alike tables are normalised once, Plan
//! mode writes nothing, a stale or tampered cache never hides drift, and neither does a
//! rename of something a policy refers to (which changes how PostgreSQL spells the policy
//! without changing its catalog row).

use dbpolicy_test_support as support;

use dbpolicy::api::{DatabasePolicySpec, Mode};
use dbpolicy::engine::{self, PolicyId};
use support::TestDb;

const OWN: &str = "owner = nullif(current_setting('app.user_id', true), '')::int";

fn spec() -> DatabasePolicySpec {
    let mut y =
        String::from("database: {connectionSecretRef: {name: x}}\nrowLevelSecurity:\n  tables:\n");
    for t in ["a", "b", "c", "other"] {
        y.push_str(&format!(
            "    - table: {t}\n      policies:\n\
             \x20       - {{name: own, using: \"{OWN}\", withCheck: \"{OWN}\"}}\n\
             \x20       - {{name: published, command: Select, using: \"body <> '' AND id > 0\"}}\n"
        ));
    }
    serde_yaml::from_str(&y).expect("spec")
}

async fn setup() -> (TestDb, sqlx::PgConnection) {
    let db = TestDb::new().await;
    for t in ["a", "b", "c"] {
        db.exec(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, owner int NOT NULL, body text NOT NULL DEFAULT '')"
        ))
        .await;
    }
    // Another shape: its own twin.
    db.exec("CREATE TABLE other (id int PRIMARY KEY, owner int, body varchar(20) NOT NULL DEFAULT '', extra int)")
        .await;
    let conn = dbpolicy::pg::connect_one(db.url()).await.expect("connect");
    (db, conn)
}

const ID: &str = "tests/cache";

/// Observes: (twins built, plan SQL).
async fn check(conn: &mut sqlx::PgConnection, spec: &DatabasePolicySpec) -> (usize, Vec<String>) {
    let observed = engine::observe(conn, spec, &PolicyId(ID.into()))
        .await
        .expect("observe");
    let plan = engine::plan(spec, &observed);
    assert!(!plan.has_errors(), "{}", plan.render_sql());
    let sql = plan.changes().map(|c| c.sql.clone()).collect();
    (observed.rls.expect("rls observed").twins, sql)
}

async fn run(
    conn: &mut sqlx::PgConnection,
    spec: &DatabasePolicySpec,
    mode: Mode,
) -> engine::Outcome {
    let outcome = engine::run(conn, spec, mode, &PolicyId(ID.into()))
        .await
        .expect("run");
    if let Some(report) = &outcome.report {
        assert!(report.succeeded(), "{:?}", report.failure);
    }
    outcome
}

async fn cache_rows(db: &TestDb) -> i64 {
    db.query_scalar("SELECT count(*) FROM dbpolicy.normalized")
        .await
}

#[tokio::test]
async fn a_no_op_builds_no_twin_alike_tables_share_one_and_plan_mode_writes_nothing() {
    let (db, mut conn) = setup().await;
    let spec = spec();

    // Plan mode on an untouched database: twins for two shapes, nothing written.
    let (twins, sql) = check(&mut conn, &spec).await;
    assert_eq!(
        twins, 2,
        "three alike tables share one twin, the other has its own"
    );
    assert_eq!(
        sql.len(),
        4 * 3,
        "2 policies and ENABLE per table: {sql:#?}"
    );
    run(&mut conn, &spec, Mode::Plan).await;
    let schema: Option<String> = db
        .query_scalar("SELECT to_regclass('dbpolicy.normalized')::text")
        .await;
    assert_eq!(schema, None, "Plan mode creates nothing");

    // The apply records every policy's form with the change: the no-op needs no twin.
    run(&mut conn, &spec, Mode::Apply).await;
    assert_eq!(cache_rows(&db).await, 8);
    assert_eq!(check(&mut conn, &spec).await, (0, vec![]));

    // An emptied cache: Plan mode still finds nothing to change and writes nothing; the
    // next Apply run (nothing to change either) records the forms again.
    db.exec("DELETE FROM dbpolicy.normalized").await;
    let plan = run(&mut conn, &spec, Mode::Plan).await;
    assert!(plan.plan.is_empty(), "{}", plan.plan.render_sql());
    assert_eq!(cache_rows(&db).await, 0, "Plan mode writes nothing");
    assert_eq!(check(&mut conn, &spec).await, (2, vec![]));
    let apply = run(&mut conn, &spec, Mode::Apply).await;
    assert!(apply.plan.is_empty());
    assert_eq!(cache_rows(&db).await, 8);
    assert_eq!(check(&mut conn, &spec).await, (0, vec![]));

    // Something that could change how a name resolves (a new function) invalidates every
    // row: normalised again, still no drift.
    db.exec("CREATE FUNCTION public.dbpolicy_cache_probe() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        .await;
    assert_eq!(check(&mut conn, &spec).await, (2, vec![]));
}

#[tokio::test]
async fn a_stale_or_tampered_cache_never_hides_drift() {
    let (db, mut conn) = setup().await;
    let spec = spec();
    run(&mut conn, &spec, Mode::Apply).await;
    assert_eq!(check(&mut conn, &spec).await, (0, vec![]));

    // Drift by hand, and the cache rewritten to say the drifted text is what the spec
    // means: the policy's catalog row is not the one the row was recorded against.
    db.exec("ALTER POLICY own ON b USING (owner = 2)").await;
    db.exec(
        "UPDATE dbpolicy.normalized SET using_expr = '(owner = 2)' WHERE using_expr LIKE '%app.user_id%'",
    )
    .await;
    let (twins, sql) = check(&mut conn, &spec).await;
    assert!(twins > 0);
    assert_eq!(
        sql,
        vec![format!(
            "ALTER POLICY \"own\" ON \"public\".\"b\" USING ({OWN})"
        )],
        "the drift is found"
    );

    // A row whose version is not the policy's is not used: normalised again, no drift.
    run(&mut conn, &spec, Mode::Apply).await;
    assert_eq!(check(&mut conn, &spec).await, (0, vec![]));
    db.exec("UPDATE dbpolicy.normalized SET item_version = item_version || '0'")
        .await;
    assert_eq!(
        check(&mut conn, &spec).await,
        (2, vec![]),
        "normalised again, no drift"
    );

    // A version copied from the drifted row does not help a row whose text disagrees.
    run(&mut conn, &spec, Mode::Apply).await;
    db.exec("ALTER POLICY published ON c USING (true)").await;
    let (_, sql) = check(&mut conn, &spec).await;
    assert_eq!(
        sql,
        vec![
            "ALTER POLICY \"published\" ON \"public\".\"c\" USING (body <> '' AND id > 0)"
                .to_string()
        ]
    );
}

/// Observes `spec`: (twins built, plan errors, plan SQL).
async fn check_errors(
    conn: &mut sqlx::PgConnection,
    spec: &DatabasePolicySpec,
) -> (usize, Vec<String>, Vec<String>) {
    let observed = engine::observe(conn, spec, &PolicyId(ID.into()))
        .await
        .expect("observe");
    let plan = engine::plan(spec, &observed);
    let errors = plan
        .areas
        .iter()
        .flat_map(|a| a.errors.iter().map(|e| e.message.clone()))
        .collect();
    let sql = plan.changes().map(|c| c.sql.clone()).collect();
    (observed.rls.expect("rls observed").twins, errors, sql)
}

#[tokio::test]
async fn a_rename_of_what_a_policy_refers_to_is_seen_through_the_cache() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE SCHEMA app;
         CREATE TABLE members (org int NOT NULL, uid int NOT NULL);
         CREATE TABLE docs (id int PRIMARY KEY, org int NOT NULL);
         CREATE FUNCTION app.current_uid() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1'",
    )
    .await;
    let mut conn = dbpolicy::pg::connect_one(db.url()).await.expect("connect");
    let spec: DatabasePolicySpec = serde_yaml::from_str(
        "database: {connectionSecretRef: {name: x}}
rowLevelSecurity:
  tables:
    - table: docs
      policies:
        - {name: member, using: \"org IN (SELECT m.org FROM members m WHERE m.uid = app.current_uid())\"}
",
    )
    .expect("spec");
    run(&mut conn, &spec, Mode::Apply).await;
    assert_eq!(check_errors(&mut conn, &spec).await, (0, vec![], vec![]));

    // Each rename changes how PostgreSQL spells the policy, not its catalog row: the cache
    // does not answer, the spec's text no longer resolves, and the plan says so. Renamed
    // back, the cache answers again.
    for (rename, back, missing) in [
        (
            "ALTER TABLE members RENAME COLUMN uid TO user_id",
            "ALTER TABLE members RENAME COLUMN user_id TO uid",
            "uid",
        ),
        (
            "ALTER TABLE members RENAME TO people",
            "ALTER TABLE people RENAME TO members",
            "members",
        ),
        (
            "ALTER FUNCTION app.current_uid() RENAME TO current_user_id",
            "ALTER FUNCTION app.current_user_id() RENAME TO current_uid",
            "current_uid",
        ),
        (
            "ALTER SCHEMA app RENAME TO application",
            "ALTER SCHEMA application RENAME TO app",
            "app",
        ),
    ] {
        db.exec(rename).await;
        let (twins, errors, sql) = check_errors(&mut conn, &spec).await;
        assert_eq!(twins, 1, "{rename}: normalised again");
        assert!(
            errors.len() == 1 && errors[0].contains(missing),
            "{rename}: {errors:?} {sql:?}"
        );
        db.exec(back).await;
        assert_eq!(
            check_errors(&mut conn, &spec).await,
            (0, vec![], vec![]),
            "{back}"
        );
    }
}
