//! The row-level security area against real PostgreSQL through the CLI: create,
//! idempotence, every kind of change, drift, ownership and pruning, bad input that changes
//! nothing, expressions PostgreSQL rewrites, timeouts, rows actually isolated for a
//! non-superuser, and the certquiz example.

use dbpolicy_test_support as support;

use sqlx::{Connection, Row};
use support::{cli, expect_code, policy, RunOutput, TestDb};

const TABLE: &str = "CREATE TABLE notes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL,
    org integer NOT NULL DEFAULT 1,
    body text NOT NULL DEFAULT ''
)";

const U1: &str = "11111111-1111-1111-1111-111111111111";
const U2: &str = "22222222-2222-2222-2222-222222222222";

/// A policy whose spec is `rowLevelSecurity:` followed by `tables` (indented 4 spaces).
fn rls(tables: &str) -> String {
    policy(
        "rls",
        &format!("  rowLevelSecurity:\n    tables:\n{tables}"),
    )
}

fn rls_destructive(tables: &str) -> String {
    policy(
        "rls",
        &format!(
            "  safety: {{allowDestructive: true}}\n  rowLevelSecurity:\n    tables:\n{tables}"
        ),
    )
}

fn apply(db: &TestDb, yaml: &str) -> RunOutput {
    cli("apply", db.url(), yaml)
}

fn plan(db: &TestDb, yaml: &str) -> RunOutput {
    cli("plan", db.url(), yaml)
}

/// Applies and checks that a second plan has nothing to do.
#[track_caller]
fn converge(db: &TestDb, yaml: &str) -> RunOutput {
    let out = apply(db, yaml);
    expect_code(&out, 0);
    let again = plan(db, yaml);
    expect_code(&again, 0);
    assert!(
        again.stdout.contains("# nothing to change"),
        "{}",
        again.stdout
    );
    out
}

/// Every policy of `table` as one comparable line, sorted by name.
async fn policies(db: &TestDb, table: &str) -> Vec<String> {
    db.query_column::<String>(&format!(
        "SELECT format('%s %s %s %s USING %s CHECK %s', polname, polcmd,
                CASE WHEN polpermissive THEN 'permissive' ELSE 'restrictive' END,
                ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END
                      FROM unnest(polroles) r ORDER BY 1),
                coalesce(pg_get_expr(polqual, polrelid), '-'),
                coalesce(pg_get_expr(polwithcheck, polrelid), '-'))
         FROM pg_policy WHERE polrelid = '{table}'::regclass ORDER BY polname"
    ))
    .await
}

async fn policy_oid(db: &TestDb, table: &str, name: &str) -> i64 {
    db.query_scalar::<i64>(&format!(
        "SELECT oid::bigint FROM pg_policy WHERE polrelid = '{table}'::regclass AND polname = '{name}'"
    ))
    .await
}

/// (relrowsecurity, relforcerowsecurity)
async fn rls_flags(db: &TestDb, table: &str) -> (bool, bool) {
    let row = db
        .query_rows(&format!(
            "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = '{table}'::regclass"
        ))
        .await;
    (row[0].get(0), row[0].get(1))
}

const OWN: &str = "user_id = current_setting('app.current_user_id')::uuid";

#[tokio::test]
async fn creates_policies_enables_rls_and_a_second_plan_is_empty() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    let yaml = rls(&format!(
        r#"      - table: notes
        force: true
        policies:
          - name: own_rows
            using: "{OWN}"
            withCheck: "{OWN}"
          - name: read_org
            command: Select
            kind: Restrictive
            using: "org IN (1, 2) AND body <> ''"
"#
    ));
    let first = plan(&db, &yaml);
    expect_code(&first, 2);
    assert!(first
        .stdout
        .contains(r#"CREATE POLICY "own_rows" ON "public"."notes""#));
    assert_eq!(
        policies(&db, "notes").await.len(),
        0,
        "plan changes nothing"
    );

    let out = converge(&db, &yaml);
    assert!(out
        .stdout
        .contains("applied [locking] rowLevelSecurity public.notes: enable row level security"));
    assert_eq!(rls_flags(&db, "notes").await, (true, true));
    assert_eq!(
        policies(&db, "notes").await,
        vec![
            "own_rows * permissive {public} USING (user_id = (current_setting('app.current_user_id'::text))::uuid) CHECK (user_id = (current_setting('app.current_user_id'::text))::uuid)".to_string(),
            "read_org r restrictive {public} USING ((org = ANY (ARRAY[1, 2])) AND (body <> ''::text)) CHECK -".to_string(),
        ]
    );
    // Idempotent however often it runs.
    converge(&db, &yaml);
}

#[tokio::test]
async fn every_kind_of_change_converges() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    let reader = db.unique_role("rls_reader");
    db.exec(&format!("CREATE ROLE {}", support::quote_ident(&reader)))
        .await;
    let step = |command: &str,
                kind: &str,
                roles: &str,
                clauses: &str,
                enabled: bool,
                force: bool| {
        rls(&format!(
            "      - table: notes\n        enabled: {enabled}\n        force: {force}\n        policies:\n          - name: p\n            command: {command}\n            kind: {kind}\n            roles: {roles}\n{clauses}"
        ))
    };
    let using = |e: &str| format!("            using: \"{e}\"\n");
    let check = |e: &str| format!("            withCheck: \"{e}\"\n");

    converge(
        &db,
        &step(
            "All",
            "Permissive",
            "[public]",
            &using("org = 1"),
            true,
            false,
        ),
    );
    let oid = policy_oid(&db, "notes", "p").await;

    // USING changes in place.
    let out = converge(
        &db,
        &step(
            "All",
            "Permissive",
            "[public]",
            &using("org = 2"),
            true,
            false,
        ),
    );
    assert!(
        out.stdout.contains("alter policy p: USING"),
        "{}",
        out.stdout
    );
    // Roles change in place.
    let roles = format!("[\"{reader}\"]");
    let out = converge(
        &db,
        &step("All", "Permissive", &roles, &using("org = 2"), true, false),
    );
    assert!(
        out.stdout.contains("alter policy p: roles to"),
        "{}",
        out.stdout
    );
    // WITH CHECK added in place.
    let both = format!("{}{}", using("org = 2"), check("org > 0"));
    let out = converge(&db, &step("All", "Permissive", &roles, &both, true, false));
    assert!(
        out.stdout.contains("alter policy p: WITH CHECK"),
        "{}",
        out.stdout
    );
    assert_eq!(
        policy_oid(&db, "notes", "p").await,
        oid,
        "ALTER keeps the policy"
    );
    assert_eq!(
        policies(&db, "notes").await,
        vec![format!(
            "p * permissive {{{reader}}} USING (org = 2) CHECK (org > 0)"
        )]
    );

    // The command cannot be altered: dropped and recreated in one transaction.
    let out = converge(
        &db,
        &step("Update", "Permissive", &roles, &both, true, false),
    );
    assert!(
        out.stdout
            .contains("drop policy p to recreate it (command All → Update)"),
        "{}",
        out.stdout
    );
    let oid2 = policy_oid(&db, "notes", "p").await;
    assert_ne!(oid2, oid);
    // Nor the kind.
    let out = converge(
        &db,
        &step("Update", "Restrictive", &roles, &both, true, false),
    );
    assert!(
        out.stdout.contains("Permissive → Restrictive"),
        "{}",
        out.stdout
    );
    // Nor can a clause be removed.
    let out = converge(
        &db,
        &step(
            "Update",
            "Restrictive",
            &roles,
            &using("org = 2"),
            true,
            false,
        ),
    );
    assert!(out.stdout.contains("remove WITH CHECK"), "{}", out.stdout);
    assert_eq!(
        policies(&db, "notes").await,
        vec![format!(
            "p w restrictive {{{reader}}} USING (org = 2) CHECK -"
        )]
    );

    // FORCE, then DISABLE and NO FORCE.
    converge(
        &db,
        &step(
            "Update",
            "Restrictive",
            &roles,
            &using("org = 2"),
            true,
            true,
        ),
    );
    assert_eq!(rls_flags(&db, "notes").await, (true, true));
    converge(
        &db,
        &step(
            "Update",
            "Restrictive",
            &roles,
            &using("org = 2"),
            false,
            false,
        ),
    );
    assert_eq!(rls_flags(&db, "notes").await, (false, false));
    // The role can be dropped once no policy names it.
    converge(
        &db,
        &step(
            "Update",
            "Restrictive",
            "[public]",
            &using("org = 2"),
            false,
            false,
        ),
    );
}

#[tokio::test]
async fn drift_by_hand_is_detected_and_repaired() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    let yaml = rls(&format!(
        "      - table: notes\n        policies:\n          - name: own_rows\n            using: \"{OWN}\"\n          - name: admin\n            command: Select\n            using: \"current_user = 'postgres'\"\n"
    ));
    converge(&db, &yaml);
    let wanted = policies(&db, "notes").await;

    db.exec("ALTER POLICY own_rows ON notes USING (true)").await;
    let out = plan(&db, &yaml);
    expect_code(&out, 2);
    assert!(
        out.stdout.contains("alter policy own_rows: USING"),
        "{}",
        out.stdout
    );

    db.exec("DROP POLICY admin ON notes").await;
    db.exec("ALTER TABLE notes DISABLE ROW LEVEL SECURITY")
        .await;
    let out = plan(&db, &yaml);
    expect_code(&out, 2);
    assert!(out.stdout.contains("create policy admin"), "{}", out.stdout);
    assert!(
        out.stdout.contains("enable row level security"),
        "{}",
        out.stdout
    );

    converge(&db, &yaml);
    assert_eq!(policies(&db, "notes").await, wanted);
    assert_eq!(rls_flags(&db, "notes").await, (true, false));

    // A policy changed to another command by hand is put back.
    db.exec("DROP POLICY admin ON notes; CREATE POLICY admin ON notes FOR DELETE USING (true)")
        .await;
    converge(&db, &yaml);
    assert_eq!(policies(&db, "notes").await, wanted);
}

#[tokio::test]
async fn unlisted_policies_are_dropped_only_when_owned_and_allowed() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    db.exec("CREATE POLICY legacy ON notes USING (org = 9)")
        .await;
    let listed =
        "      - table: notes\n        policies:\n          - {name: mine, using: \"org = 1\"}\n";

    // Not owned: left alone, and the plan is empty once the listed policy exists.
    converge(&db, &rls(listed));
    assert_eq!(policies(&db, "notes").await.len(), 2);

    // Owned but destructive changes not allowed: refused (exit 2), nothing dropped.
    let owned = listed.replace(
        "        policies:",
        "        ownAllPolicies: true\n        policies:",
    );
    let out = plan(&db, &rls(&owned));
    expect_code(&out, 2);
    assert!(
        out.stdout
            .contains("-- [destructive] public.notes: drop policy legacy"),
        "{}",
        out.stdout
    );
    let out = apply(&db, &rls(&owned));
    expect_code(&out, 2);
    assert!(
        out.stdout
            .contains("refused [destructive] rowLevelSecurity public.notes: drop policy legacy"),
        "{}",
        out.stdout
    );
    assert_eq!(policies(&db, "notes").await.len(), 2);

    // Owned and allowed: dropped.
    let out = converge(&db, &rls_destructive(&owned));
    assert!(
        out.stdout.contains("applied [destructive]"),
        "{}",
        out.stdout
    );
    assert_eq!(
        policies(&db, "notes").await,
        vec!["mine * permissive {public} USING (org = 1) CHECK -".to_string()]
    );
}

#[tokio::test]
async fn policy_removed_from_the_spec_is_reported_not_dropped() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    converge(
        &db,
        &rls("      - table: notes\n        policies:\n          - {name: a, using: \"true\"}\n          - {name: b, using: \"true\"}\n"),
    );
    let out = plan(
        &db,
        &rls("      - table: notes\n        policies:\n          - {name: a, using: \"true\"}\n"),
    );
    expect_code(&out, 0);
    assert!(
        out.stdout.contains("# notice rowLevelSecurity: public.notes policy b: created by dbpolicy and no longer listed"),
        "{}",
        out.stdout
    );
    assert_eq!(policies(&db, "notes").await.len(), 2);
}

#[tokio::test]
async fn bad_input_names_table_and_policy_and_changes_nothing() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    db.exec("CREATE TABLE other (id int)").await;
    let good =
        "      - table: notes\n        policies:\n          - {name: keep, using: \"org = 1\"}\n";
    converge(&db, &rls(good));
    let before = policies(&db, "notes").await;

    let cases = [
        ("{name: keep, using: \"org = 2\"}\n          - {name: bad, using: \"nosuch = 1\"}", "public.notes policy bad: column \"nosuch\" does not exist (SQLSTATE 42703) (ColumnNotFound)"),
        ("{name: keep, using: \"org = 2\"}\n          - {name: bad, using: \"org + 1\"}", "public.notes policy bad: argument of POLICY must be type boolean, not type integer (SQLSTATE 42804) (InvalidPolicyExpression)"),
        ("{name: keep, using: \"org = 2\"}\n          - {name: bad, using: \"true\", roles: [no_such_role_dbpolicy]}", "public.notes policy bad: role \"no_such_role_dbpolicy\" does not exist"),
    ];
    for (policies_yaml, error) in cases {
        let yaml = rls(&format!(
            "      - table: notes\n        force: true\n        policies:\n          - {policies_yaml}\n      - table: other\n        policies: [{{name: fine, using: \"true\"}}]\n"
        ));
        let out = apply(&db, &yaml);
        expect_code(&out, 1);
        assert!(
            out.stdout
                .contains(&format!("# ERROR rowLevelSecurity: {error}")),
            "expected {error:?} in\n{}",
            out.stdout
        );
        assert!(out.stdout.contains("nothing was applied"), "{}", out.stdout);
        assert_eq!(policies(&db, "notes").await, before, "{error}");
        assert_eq!(rls_flags(&db, "notes").await, (true, false), "{error}");
        assert!(
            policies(&db, "other").await.is_empty(),
            "{error}: no other table changed either"
        );
    }
    // Text that would close `USING (` or add a statement is refused, whichever check
    // (spec validation or the planner) sees it first.
    for bad in ["true) WITH CHECK (false", "true; DROP TABLE other"] {
        let out = apply(
            &db,
            &rls(&format!(
                "      - table: notes\n        policies:\n          - {{name: keep, using: \"{bad}\"}}\n"
            )),
        );
        expect_code(&out, 1);
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(
            all.contains("policies[0].using") || all.contains("public.notes policy keep: using:"),
            "{all}"
        );
        assert_eq!(policies(&db, "notes").await, before, "{bad}");
    }
    let out = apply(
        &db,
        &rls("      - table: missing\n        policies: [{name: a, using: \"true\"}]\n"),
    );
    expect_code(&out, 1);
    assert!(out.stdout.contains("# ERROR rowLevelSecurity: public.missing: table public.missing does not exist (policies: a) (TableNotFound)"), "{}", out.stdout);
    assert_eq!(
        db.query_scalar::<i64>("SELECT count(*) FROM other").await,
        0,
        "the table survived"
    );
}

#[tokio::test]
async fn expressions_postgres_rewrites_never_show_as_drift() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    db.exec("CREATE SCHEMA app; CREATE TABLE app.notes (LIKE public.notes); CREATE TABLE orgs (id int, member uuid)")
        .await;
    let expressions = [
        OWN,
        "user_id = nullif(current_setting('app.current_user_id', true), '')::uuid",
        "org IN (1, 2, 3)",
        "body LIKE 'a%' OR body ~* '^x\\\\d+'",
        "EXISTS (SELECT 1 FROM orgs o WHERE o.id = notes.org AND o.member = user_id)",
        "org = ANY (SELECT o.id FROM public.orgs o)",
        "EXISTS (SELECT 1 FROM public.notes n2 WHERE n2.org = notes.org)",
        "current_user = 'postgres' OR pg_has_role(current_user, 'pg_read_all_data', 'member')",
        "coalesce(body, '') <> '' AND org BETWEEN 1 AND 10",
        "user_id::text = E'\\\\x' OR body = 'it''s'",
        "org::numeric > 1.5 AND now() > '2020-01-01'::timestamptz",
    ];
    let mut tables = String::new();
    for schema in ["public", "app"] {
        tables.push_str(&format!(
            "      - schema: {schema}\n        table: notes\n        policies:\n"
        ));
        for (i, e) in expressions.iter().enumerate() {
            let e = serde_json::to_string(e).unwrap();
            let e = if schema == "app" {
                e.replace("public.notes", "app.notes")
            } else {
                e
            };
            tables.push_str(&format!(
                "          - name: p{i}\n            using: {e}\n            withCheck: {e}\n"
            ));
        }
    }
    converge(&db, &rls(&tables));
    assert_eq!(policies(&db, "public.notes").await.len(), expressions.len());
    assert_eq!(policies(&db, "app.notes").await.len(), expressions.len());
}

/// Tables alike (one shape, the same policies) are normalised on one twin, except when
/// PostgreSQL's form names the table itself (a column of it used in a subquery comes
/// back qualified, `o.id = t2.org`): then each is its own, with the cache and without.
#[tokio::test]
async fn tables_alike_whose_form_names_the_table_converge() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE orgs (id int PRIMARY KEY);
         CREATE TABLE t1 (id bigint PRIMARY KEY, org int NOT NULL);
         CREATE TABLE t2 (LIKE t1 INCLUDING ALL);
         CREATE TABLE t3 (LIKE t1 INCLUDING ALL);",
    )
    .await;
    let mut tables = String::new();
    for t in ["t1", "t2", "t3"] {
        tables.push_str(&format!(
            "      - table: {t}\n        policies:\n          - {{name: add, command: Insert, withCheck: \"EXISTS (SELECT 1 FROM orgs o WHERE o.id = org)\"}}\n          - {{name: own, using: \"org > 0\"}}\n"
        ));
    }
    let yaml = rls(&tables);
    converge(&db, &yaml);
    for t in ["t2", "t3"] {
        let form: String = db
            .query_scalar(&format!(
                "SELECT pg_get_expr(polwithcheck, polrelid) FROM pg_policy WHERE polrelid = '{t}'::regclass AND polname = 'add'"
            ))
            .await;
        assert!(form.contains(&format!("{t}.org")), "{form}");
    }
    // Without the cache: every table normalised again, nothing to change.
    db.exec("TRUNCATE dbpolicy.normalized").await;
    let again = plan(&db, &yaml);
    expect_code(&again, 0);
    assert!(
        again.stdout.contains("# nothing to change"),
        "{}",
        again.stdout
    );
}

#[tokio::test]
async fn normalisation_leaves_nothing_behind_on_the_session() {
    use dbpolicy::api::{DatabasePolicy, Mode};
    use dbpolicy::engine::{self, PolicyId};

    let db = TestDb::new().await;
    db.exec(TABLE).await;
    let yaml = rls(&format!(
        "      - table: notes\n        policies:\n          - {{name: a, using: \"{OWN}\"}}\n          - {{name: b, using: \"nosuch\"}}\n"
    ));
    let policy: DatabasePolicy = serde_yaml::from_str(&yaml).unwrap();
    let mut conn = db.connect().await;
    let path_before: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    for _ in 0..2 {
        let outcome = engine::run(
            &mut conn,
            &policy.spec,
            Mode::Apply,
            &PolicyId("t/rls".into()),
        )
        .await
        .unwrap();
        assert_eq!(outcome.plan.errors().count(), 1, "{:?}", outcome.plan);
        assert!(
            outcome.report.is_none(),
            "a plan with errors is not applied"
        );
    }
    let (temp_objects, path): (i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())
              + (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()),
                current_setting('search_path')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(temp_objects, 0);
    // SAVEPOINT outside a transaction block fails: the session is not left in one.
    let err = sqlx::raw_sql("SAVEPOINT probe")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("25P01"), "{err}");
    assert_eq!(path, path_before);
    conn.close().await.unwrap();
    assert!(policies(&db, "notes").await.is_empty());
}

#[tokio::test]
async fn observation_respects_the_lock_timeout() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let yaml = policy(
        "rls",
        "  safety: {lockTimeout: 200ms}\n  rowLevelSecurity:\n    tables:\n      - table: notes\n        policies: [{name: a, using: \"true\"}]\n",
    );
    let started = std::time::Instant::now();
    let out = plan(&db, &yaml);
    expect_code(&out, 1);
    // Not blamed on the expression: the observation fails on the lock, and says so.
    assert!(
        out.stderr.contains("observing rowLevelSecurity failed")
            && out.stderr.contains("(SQLSTATE 55P03)"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("InvalidPolicyExpression"),
        "{}",
        out.stdout
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    converge(&db, &yaml);
}

#[tokio::test]
async fn applied_policies_isolate_rows_for_a_non_superuser() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    let app = db.unique_role("rls_app");
    let q = support::quote_ident(&app);
    db.exec(&format!(
        "CREATE ROLE {q} LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {q};
         INSERT INTO notes (user_id, body) VALUES ('{U1}', 'one'), ('{U1}', 'one again'), ('{U2}', 'two')"
    ))
    .await;
    converge(
        &db,
        &rls(&format!(
            "      - table: notes\n        force: true\n        policies:\n          - name: own_rows\n            roles: [\"{app}\"]\n            using: \"user_id = current_setting('app.current_user_id')::uuid\"\n            withCheck: \"user_id = current_setting('app.current_user_id')::uuid\"\n"
        )),
    );

    let mut conn = sqlx::PgConnection::connect(&db.url_as(&app)).await.unwrap();
    sqlx::query(&format!("SET app.current_user_id = '{U1}'"))
        .execute(&mut conn)
        .await
        .unwrap();
    let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM notes ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(bodies, vec!["one", "one again"]);
    // WITH CHECK: no row for someone else.
    let err = sqlx::query(&format!(
        "INSERT INTO notes (user_id, body) VALUES ('{U2}', 'forged')"
    ))
    .execute(&mut conn)
    .await
    .unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("42501"), "{err}");
    // Updating someone else's rows touches nothing.
    let n = sqlx::query("UPDATE notes SET body = 'x' WHERE body = 'two'")
        .execute(&mut conn)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 0);

    sqlx::query(&format!("SET app.current_user_id = '{U2}'"))
        .execute(&mut conn)
        .await
        .unwrap();
    let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM notes")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(bodies, vec!["two"]);
    conn.close().await.unwrap();
}

/// The certquiz schema, and the policy's `rowLevelSecurity` section as written.
fn certquiz() -> (String, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let schema = std::fs::read_to_string(format!("{root}/examples/certquiz/schema.sql")).unwrap();
    let policy_yaml =
        std::fs::read_to_string(format!("{root}/examples/certquiz/policy.yaml")).unwrap();
    let full: serde_yaml::Value = serde_yaml::from_str(&policy_yaml).unwrap();
    let section = full["spec"]["rowLevelSecurity"].clone();
    assert!(
        section.is_mapping(),
        "examples/certquiz/policy.yaml has a rowLevelSecurity section"
    );
    let mut spec = serde_yaml::Mapping::new();
    spec.insert("rowLevelSecurity".into(), section);
    let body = serde_yaml::to_string(&spec).unwrap();
    let body: String = body.lines().map(|l| format!("  {l}\n")).collect();
    (schema, policy("certquiz-rls", &body))
}

#[tokio::test]
async fn certquiz_policies_apply_converge_and_isolate_learners() {
    let db = TestDb::new().await;
    let (schema, yaml) = certquiz();
    db.exec(&schema).await;
    let out = converge(&db, &yaml);
    assert!(
        out.stdout
            .contains("public.user_progress: create policy user_progress_owner"),
        "{}",
        out.stdout
    );
    assert_eq!(rls_flags(&db, "user_progress").await, (true, true));
    assert_eq!(rls_flags(&db, "problem_reports").await, (true, true));
    assert_eq!(policies(&db, "problem_reports").await.len(), 2);

    let app = db.unique_role("certquiz_app");
    let q = support::quote_ident(&app);
    db.exec(&format!(
        "CREATE ROLE {q} LOGIN; GRANT SELECT, INSERT, UPDATE ON user_progress, problem_reports TO {q};
         INSERT INTO users (id, email, display_name) VALUES ('{U1}', 'a@x.io', 'A'), ('{U2}', 'b@x.io', 'B');
         INSERT INTO exams (code, name, vendor, question_count, duration_minutes, passing_score)
              VALUES ('200-301', 'CCNA', 'Cisco', 100, 120, 82);
         INSERT INTO user_progress (user_id, exam_id) SELECT u, id FROM exams, unnest(ARRAY['{U1}', '{U2}']::uuid[]) u;"
    ))
    .await;

    let mut conn = sqlx::PgConnection::connect(&db.url_as(&app)).await.unwrap();
    // No user set: nothing visible (the seed plan's nullif(current_setting(…, true), '')).
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_progress")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL app.current_user_id = '{U1}'"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let users: Vec<String> = sqlx::query_scalar("SELECT user_id::text FROM user_progress")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(users, vec![U1]);
    let err = sqlx::query(&format!(
        "INSERT INTO problem_reports (user_id, question_id, reason) VALUES ('{U2}', 1, 'typo')"
    ))
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("42501"), "{err}");
    tx.rollback().await.unwrap();
    // After SET LOCAL has ended, the setting is '' and again nothing is visible.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_progress")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn an_escape_string_cannot_smuggle_a_statement() {
    let db = TestDb::new().await;
    db.exec(TABLE).await;
    db.exec("CREATE TABLE other (id int)").await;
    // PostgreSQL reads E'\\'' as a string holding one quote: what follows is outside it.
    let yaml = rls(
        "      - table: notes\n        policies:\n          - {name: keep, using: \"body = E'\\\\'' ; DROP TABLE other; SELECT '\"}\n",
    );
    let out = apply(&db, &yaml);
    expect_code(&out, 1);
    assert!(
        out.stderr
            .contains("spec.rowLevelSecurity.tables[0].policies[0].using: is not valid SQL: unterminated quoted string"),
        "{}",
        out.stderr
    );
    assert!(policies(&db, "notes").await.is_empty());
    assert!(
        db.query_scalar::<bool>("SELECT to_regclass('other') IS NOT NULL")
            .await
    );
}
