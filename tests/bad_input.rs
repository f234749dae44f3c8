//! A table of bad inputs through the CLI: malformed YAML, unknown fields, wrong types, the
//! CEL rules the CLI mirrors, invalid SQL, injection attempts, enormous specs, unreachable
//! hosts, wrong passwords, TLS required but absent. Each gets exit 1, an error naming what
//! is wrong, an unchanged database, and no password in any output.

use dbpolicy_test_support as support;

use std::sync::OnceLock;

use support::{
    cli, expect_code, policy, run_dbpolicy, write_policy, PgServer, PgServerOptions, RunOutput,
    TestDb,
};

/// In every URL given to the CLI; must never come back in its output.
const SECRET: &str = "s3cret-pw-4711";

/// A throwaway server that asks for passwords (and serves no TLS), shared by the tests of
/// this binary; its own watchdog removes it when the tests are done.
fn password_server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(|| PgServer::start_with(PgServerOptions::new().password_auth()))
}

/// `postgres://postgres:<SECRET>@host/db`: the test servers trust the superuser on
/// 127.0.0.1, so the password is sent and ignored, and must still never be printed.
fn with_secret(url: &str) -> String {
    url.replacen("://postgres@", &format!("://postgres:{SECRET}@"), 1)
}

#[track_caller]
fn assert_no_secret(out: &RunOutput, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !out.stdout.contains(s) && !out.stderr.contains(s),
            "a password appears in the output\n--- stdout\n{}\n--- stderr\n{}",
            out.stdout,
            out.stderr
        );
    }
}

/// Relations with their options and RLS flags, policies, indexes, functions, schemas,
/// flags and the ledger: what a policy could change, as one comparable value.
async fn fingerprint(db: &TestDb) -> String {
    db.query_scalar::<String>(
        "SELECT md5(coalesce(string_agg(x, '|' ORDER BY x), '')) FROM (
           SELECT format('rel %s.%s %s %s %s %s', n.nspname, c.relname, c.relkind, c.reloptions,
                         c.relrowsecurity, c.relforcerowsecurity) AS x
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
              AND n.nspname NOT LIKE 'pg\\_%temp%'
           UNION ALL SELECT format('policy %s %s %s', polrelid::regclass, polname, pg_get_expr(polqual, polrelid)) FROM pg_policy
           UNION ALL SELECT format('index %s', pg_get_indexdef(indexrelid)) FROM pg_index WHERE indrelid >= 16384
           UNION ALL SELECT format('proc %s.%s', pronamespace::regnamespace, proname) FROM pg_proc
            WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
           UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%temp%'
           UNION ALL SELECT 'flag ' || name || enabled FROM feature_flags
         ) s",
    )
    .await
}

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, owner int NOT NULL);
CREATE TABLE victim (id int);
CREATE TABLE feature_flags (name text PRIMARY KEY, enabled boolean NOT NULL DEFAULT false,
    rollout_percentage integer NOT NULL DEFAULT 100 CHECK (rollout_percentage BETWEEN 0 AND 100),
    description text, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO feature_flags (name, enabled) VALUES ('existing', true)";

const HEADER: &str = "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {name: bad, namespace: tests}\n";

/// (what, policy YAML, what the error must say). Every one: exit 1, database unchanged.
fn cases() -> Vec<(&'static str, String, &'static str)> {
    let p = |body: &str| policy("bad", body);
    vec![
        // The YAML itself.
        ("malformed YAML", format!("{HEADER}spec: [unclosed\n"), "document 1"),
        ("tab indentation", format!("{HEADER}spec:\n\tdatabase: x\n"), "document 1"),
        ("not a policy at all", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n".into(), "no DatabasePolicy document found"),
        ("wrong apiVersion", "apiVersion: dbpolicy.dev/v1\nkind: DatabasePolicy\nmetadata: {name: x}\nspec: {}\n".into(), "apiVersion"),
        ("missing database", format!("{HEADER}spec:\n  mode: Apply\n"), "missing field `database`"),
        // Unknown fields, at the top and deep down.
        ("unknown area", p("  autovaccum:\n    tables: []\n"), "unknown field `autovaccum`"),
        ("unknown nested field", p("  autovacuum:\n    tables: [{table: t, vacuumScaleFacter: 0.1}]\n"), "spec.autovacuum.tables[0].vacuumScaleFacter: unknown field"),
        // Wrong types.
        ("string for a number", p("  autovacuum:\n    tables: [{table: t, vacuumThreshold: lots}]\n"), "spec.autovacuum.tables[0].vacuumThreshold"),
        ("string for a boolean", p("  featureFlags:\n    flags: [{name: a, enabled: yes please}]\n"), "spec.featureFlags.flags[0].enabled"),
        ("percentage out of its type", p("  featureFlags:\n    flags: [{name: a, enabled: true, rolloutPercentage: 300}]\n"), "rolloutPercentage"),
        ("negative premake", p("  partitions:\n    tables: [{table: t, interval: Monthly, premake: -1}]\n"), "premake"),
        ("unknown enum value", p("  partitions:\n    tables: [{table: t, interval: Hourly}]\n"), "spec.partitions.tables[0].interval"),
        ("list for a map", p("  serverSettings:\n    parameters: [work_mem]\n"), "spec.serverSettings.parameters"),
        // The CEL rules (and the other checks the CLI makes without an API server).
        ("Insert policy with using", p("  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: a, command: Insert, using: \"true\"}]}]\n"), "an Insert policy takes only withCheck"),
        ("policy without expressions", p("  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: a}]}]\n"), "a policy needs using, withCheck or both"),
        ("bad duration", p("  safety: {lockTimeout: soon}\n"), "spec.safety.lockTimeout"),
        ("bad retention", p("  partitions:\n    tables: [{table: t, interval: Daily, retention: 3 days}]\n"), "spec.partitions.tables[0].retention"),
        ("bad start date", p("  partitions:\n    tables: [{table: t, interval: Daily, startDate: '2024-13-45'}]\n"), "startDate"),
        ("rollout above 100", p("  featureFlags:\n    flags: [{name: a, enabled: true, rolloutPercentage: 150}]\n"), "must be between 0 and 100"),
        ("duplicate flags", p("  featureFlags:\n    flags: [{name: a, enabled: true}, {name: a, enabled: false}]\n"), "a is listed more than once"),
        ("two storages", p("  backups:\n    schedule: '0 3 * * *'\n    storage: {pvc: {claimName: x}, s3: {bucket: b, credentialsSecretRef: {name: s}}}\n"), "exactly one of pvc or s3"),
        // Invalid SQL: refused by the fragment check, or by PostgreSQL, before anything runs.
        ("syntax error in using", p("  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: a, using: \"owner = = 1\"}]}]\n"), "spec.rowLevelSecurity.tables[0].policies[0].using: is not valid SQL: syntax error"),
        ("unknown column in using", p("  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: a, using: \"nope = 1\"}]}]\n"), "42703"),
        ("non-boolean using", p("  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: a, using: \"owner + 1\"}]}]\n"), "42804"),
        ("statement injected into using", p("  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: a, using: \"true); DROP TABLE victim; --\"}]}]\n"), "spec.rowLevelSecurity.tables[0].policies[0].using"),
        ("clause injected into an index predicate", p("  indexes:\n    indexes: [{name: ix, table: t, columns: [id], where: \"id > 0) WHERE (true\"}]\n"), "spec.indexes.indexes[0].where"),
        ("statement injected into a view", p("  materializedViews:\n    views: [{name: v, definition: \"SELECT 1; DROP TABLE victim\"}]\n"), "spec.materializedViews.views[0].definition"),
        ("unknown column in an index", p("  indexes:\n    indexes: [{name: ix, table: t, columns: [nope]}]\n"), "ColumnNotFound"),
        // Injection attempts in names: quoted as identifiers, so they name nothing that exists.
        ("quotes in a table name", p("  autovacuum:\n    tables: [{table: 't\"; DROP TABLE victim; --', vacuumThreshold: 1}]\n"), "TableNotFound"),
        ("quotes in an RLS table name", p("  rowLevelSecurity:\n    tables: [{table: \"victim'; --\", policies: [{name: a, using: \"true\"}]}]\n"), "TableNotFound"),
        ("quotes in a role name", p("  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: a, roles: ['x\"; DROP TABLE victim; --'], using: \"true\"}]}]\n"), "RoleNotFound"),
        ("quotes in a flag name", p("  featureFlags:\n    flags: [{name: \"a'); DROP TABLE victim; --\", enabled: true}]\n"), "spec.featureFlags.flags[0].name"),
        ("injection in a parameter name", p("  serverSettings:\n    parameters: {\"work_mem = 1; DROP TABLE victim\": 1}\n"), "parameter names are letters"),
        ("quotes in a schema name", p("  featureFlags:\n    schema: \"public\\\"; DROP TABLE victim; --\"\n    flags: [{name: a, enabled: true}]\n"), "SchemaNotFound"),
    ]
}

#[tokio::test]
async fn bad_policies_fail_clearly_and_change_nothing() {
    let db = TestDb::new().await;
    db.exec(SETUP).await;
    let url = with_secret(db.url());
    let before = fingerprint(&db).await;
    let mut failures = Vec::new();
    for (what, yaml, needle) in cases() {
        for verb in ["plan", "apply"] {
            let out = cli(verb, &url, &yaml);
            assert_no_secret(&out, &[SECRET]);
            let text = format!("{}\n{}", out.stdout, out.stderr);
            if out.code != 1 || !text.contains(needle) {
                failures.push(format!(
                    "{what} ({verb}): exit {}, expected {needle:?} in:\n{text}",
                    out.code
                ));
            }
        }
        assert_eq!(
            fingerprint(&db).await,
            before,
            "{what}: the database changed"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn injection_attempts_in_values_are_stored_as_data() {
    let db = TestDb::new().await;
    db.exec(SETUP).await;
    let description = "it's \"quoted\"'); DROP TABLE victim; -- \\' $$ $x$";
    let yaml = policy(
        "values",
        &format!(
            "  featureFlags:\n    table: \"ff\\\"; DROP TABLE victim; --\"\n    flags:\n      - name: a\n        enabled: true\n        description: {}\n",
            serde_json::to_string(description).unwrap()
        ),
    );
    let out = cli("apply", &with_secret(db.url()), &yaml);
    expect_code(&out, 0);
    assert_no_secret(&out, &[SECRET]);
    let stored = db
        .query_scalar::<String>("SELECT description FROM \"ff\"\"; DROP TABLE victim; --\"")
        .await;
    assert_eq!(stored, description, "the description is stored verbatim");
    assert!(
        db.query_scalar::<bool>("SELECT to_regclass('victim') IS NOT NULL")
            .await
    );
    expect_code(&cli("plan", db.url(), &yaml), 0);
}

#[tokio::test]
async fn an_enormous_spec_of_5000_flags_applies_and_converges() {
    let db = TestDb::new().await;
    let mut body = String::from("  featureFlags:\n    flags:\n");
    for i in 0..5000 {
        body.push_str(&format!(
            "      - {{name: flag_{i:04}, enabled: {}, rolloutPercentage: {}, description: 'flag number {i}'}}\n",
            i % 2 == 0,
            i % 101
        ));
    }
    let yaml = policy("huge", &body);
    let out = cli("apply", db.url(), &yaml);
    expect_code(&out, 0);
    assert!(
        out.stdout.contains("applied 5002 change(s)"),
        "{}",
        &out.stdout[out.stdout.len().saturating_sub(500)..]
    );
    assert_eq!(
        db.query_scalar::<i64>("SELECT count(*) FROM feature_flags")
            .await,
        5000
    );
    expect_code(&cli("plan", db.url(), &yaml), 0);
}

#[tokio::test]
async fn setting_values_with_injections_are_refused_by_postgresql() {
    // serverSettings changes the whole server: the throwaway one.
    let server = password_server();
    let db = TestDb::on(server).await;
    let settings = "SELECT coalesce(string_agg(name || '=' || setting, ','), '') FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf'";
    let before = db.query_scalar::<String>(settings).await;
    db.exec("CREATE TABLE victim (id int)").await;
    for value in [
        "1MB'; DROP TABLE victim; --",
        "'; DROP TABLE victim; --",
        "1MB\nlisten_addresses = '*'",
    ] {
        let yaml = policy(
            "settings",
            &format!(
                "  serverSettings:\n    parameters:\n      work_mem: {}\n",
                serde_json::to_string(value).unwrap()
            ),
        );
        let out = cli("apply", &with_secret(db.url()), &yaml);
        expect_code(&out, 1);
        assert_no_secret(&out, &[SECRET]);
        assert!(
            out.stdout.contains("work_mem") || out.stderr.contains("parameters.work_mem"),
            "{value:?}: the error names the parameter:\n{}\n{}",
            out.stdout,
            out.stderr
        );
        assert_eq!(
            db.query_scalar::<String>(settings).await,
            before,
            "{value:?}: postgresql.auto.conf unchanged"
        );
        assert!(
            db.query_scalar::<bool>("SELECT to_regclass('victim') IS NOT NULL")
                .await
        );
    }
}

#[tokio::test]
async fn wrong_password_fails_clearly_without_any_password_in_the_output() {
    let server = password_server();
    let db = TestDb::on(server).await;
    let role = db.unique_role("app");
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'right-pw-0815'"
    ))
    .await;
    let yaml = policy(
        "pw",
        "  featureFlags:\n    flags: [{name: a, enabled: true}]\n",
    );
    let url = |pw: &str| {
        db.url_as(&role)
            .replacen(&format!("{role}@"), &format!("{role}:{pw}@"), 1)
    };
    let before = fingerprint_or_empty(&db).await;

    for output in ["text", "json"] {
        let file = write_policy(&yaml);
        let path = file.path().to_str().unwrap();
        let out = run_dbpolicy(
            ["apply", "-f", path, "--output", output],
            Some(&url(SECRET)),
        );
        expect_code(&out, 1);
        assert_no_secret(&out, &[SECRET, "right-pw-0815"]);
        assert!(
            out.stderr.contains("password authentication failed") && out.stderr.contains("28P01"),
            "{output}: {}",
            out.stderr
        );
        assert!(
            out.stderr
                .contains(&format!("127.0.0.1:{}/{}", server.port(), db.name())),
            "names the target: {}",
            out.stderr
        );
    }
    assert_eq!(fingerprint_or_empty(&db).await, before);
    // The right password gets in (and the plan has something to do).
    let out = cli("plan", &url("right-pw-0815"), &yaml);
    assert_no_secret(&out, &["right-pw-0815"]);
    expect_code(&out, 2);
}

async fn fingerprint_or_empty(db: &TestDb) -> String {
    db.query_scalar::<String>(
        "SELECT coalesce(string_agg(relname, ',' ORDER BY relname), '') FROM pg_class WHERE relnamespace = 'public'::regnamespace",
    )
    .await
}

#[tokio::test]
async fn tls_required_but_not_offered_fails_clearly() {
    let server = password_server();
    let db = TestDb::on(server).await;
    let url = format!("{}?sslmode=require", with_secret(db.url()));
    let out = cli(
        "apply",
        &url,
        &policy(
            "tls",
            "  featureFlags:\n    flags: [{name: a, enabled: true}]\n",
        ),
    );
    expect_code(&out, 1);
    assert_no_secret(&out, &[SECRET]);
    assert!(
        out.stderr.contains("TLS") || out.stderr.contains("SSL"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("cannot connect to 127.0.0.1:{}", server.port())),
        "{}",
        out.stderr
    );
    assert_eq!(fingerprint_or_empty(&db).await, "");
}

#[test]
fn unreachable_hosts_fail_clearly() {
    let yaml = policy("gone", "  featureFlags:\n    flags: []\n");
    for (url, needle) in [
        (
            format!("postgres://app:{SECRET}@127.0.0.1:1/db"),
            "cannot connect to 127.0.0.1:1/db",
        ),
        (
            format!("postgres://app:{SECRET}@db.nonexistent.invalid:5432/db"),
            "cannot connect to db.nonexistent.invalid:5432/db",
        ),
        (
            format!("postgres://app:{SECRET}@127.0.0.1:notaport/db"),
            "not a valid postgres:// URI",
        ),
    ] {
        let out = cli("plan", &url, &yaml);
        expect_code(&out, 1);
        assert_no_secret(&out, &[SECRET]);
        assert!(out.stderr.contains(needle), "{url}: {}", out.stderr);
    }
}
