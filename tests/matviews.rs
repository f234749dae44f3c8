//! The materializedViews area and `dbpolicy refresh` against real PostgreSQL.

use dbpolicy_test_support as support;

use support::{cli, expect_code, policy, run_dbpolicy, write_policy, TestDb};

const SCHEMA: &str = "
CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE user_progress (user_id int, category_id int REFERENCES categories, correct int, answered int);
INSERT INTO categories VALUES (1, 'ospf'), (2, 'bgp');
INSERT INTO user_progress VALUES (1, 1, 8, 10), (2, 1, 5, 10), (1, 2, 1, 4);";

const VIEW: &str = "  materializedViews:
    views:
      - name: category_statistics
        definition: |
          select c.id as category_id, c.name, sum(p.correct)::numeric / nullif(sum(p.answered), 0) as accuracy
          from categories c left join user_progress p on p.category_id = c.id
          group by c.id, c.name
        schedule: \"*/15 * * * *\"
        concurrently: true
        timeout: 5m
";
const UNIQUE: &str = "  indexes:
    indexes:
      - {name: category_statistics_category_id, table: category_statistics, columns: [category_id], unique: true}
";

#[tokio::test]
async fn view_and_its_unique_index_are_created_and_refresh_concurrently() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let p = policy("mv", &format!("{VIEW}{UNIQUE}"));
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    expect_code(&cli("apply", db.url(), &p), 0);
    let rows = db
        .query_scalar::<i64>("SELECT count(*) FROM category_statistics")
        .await;
    assert_eq!(rows, 2);
    // pg_get_viewdef rewrote the lower-case query; the comparison is in its form.
    expect_code(&cli("plan", db.url(), &p), 0);

    db.exec("INSERT INTO categories VALUES (3, 'mpls')").await;
    let file = write_policy(&p);
    let out = run_dbpolicy(
        ["refresh", "-f", file.path().to_str().unwrap()],
        Some(db.url()),
    );
    expect_code(&out, 0);
    assert!(
        out.stdout
            .contains("refreshed public.category_statistics concurrently"),
        "{}",
        out.stdout
    );
    assert_eq!(
        db.query_scalar::<i64>("SELECT count(*) FROM category_statistics")
            .await,
        3
    );
    let recorded = db.query_scalar::<bool>("SELECT was_concurrent FROM dbpolicy.refreshes WHERE view = 'public.category_statistics'").await;
    assert!(recorded);
}

#[tokio::test]
async fn concurrently_without_a_unique_index_is_said() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let out = cli("plan", db.url(), &policy("mv", VIEW));
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("RequiresUniqueIndex")
            && out.stdout.contains("public.category_statistics"),
        "{}",
        out.stdout
    );

    db.exec("CREATE MATERIALIZED VIEW plain AS SELECT 1 AS k")
        .await;
    let out = run_dbpolicy(
        ["refresh", "--view", "plain", "--concurrently"],
        Some(db.url()),
    );
    expect_code(&out, 1);
    assert!(
        out.stderr.contains("needs a unique index"),
        "{}",
        out.stderr
    );
    let out = run_dbpolicy(["refresh", "--view", "plain"], Some(db.url()));
    expect_code(&out, 0);
}

#[tokio::test]
async fn a_changed_definition_is_a_gated_replace_that_keeps_its_indexes() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    expect_code(
        &cli("apply", db.url(), &policy("mv", &format!("{VIEW}{UNIQUE}"))),
        0,
    );

    let changed = VIEW.replace(
        "c.id, c.name\n",
        "c.id, c.name\n          having count(p.user_id) > 0\n",
    );
    let out = cli(
        "apply",
        db.url(),
        &policy("mv", &format!("{changed}{UNIQUE}")),
    );
    expect_code(&out, 2);
    assert!(
        out.stdout
            .contains("refused [destructive] materializedViews public.category_statistics"),
        "{}",
        out.stdout
    );
    assert_eq!(
        db.query_scalar::<i64>("SELECT count(*) FROM category_statistics")
            .await,
        2
    );

    let allowed = policy(
        "mv",
        &format!("  safety: {{allowDestructive: true}}\n{changed}{UNIQUE}"),
    );
    expect_code(&cli("apply", db.url(), &allowed), 0);
    let def = db
        .query_scalar::<String>(
            "SELECT definition FROM pg_matviews WHERE matviewname = 'category_statistics'",
        )
        .await;
    assert!(def.contains("HAVING"), "{def}");
    // The unique index went with the old view and was rebuilt in the same run.
    expect_code(&cli("plan", db.url(), &allowed), 0);
}

#[tokio::test]
async fn bad_definitions_and_missing_views_change_nothing() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let bad = "  materializedViews:\n    views:\n      - {name: ok, definition: select 1 as k}\n      - {name: bad, definition: select nope from categories}\n      - {name: missing}\n";
    let out = cli("apply", db.url(), &policy("mv", bad));
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("ColumnNotFound") && out.stdout.contains("public.bad"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("MaterializedViewNotFound") && out.stdout.contains("public.missing"),
        "{}",
        out.stdout
    );
    assert!(
        !db.query_scalar::<bool>("SELECT to_regclass('ok') IS NOT NULL")
            .await
    );
}

/// A view with an `owner` is created empty, handed over and filled by a refresh that runs
/// with the owner's rights: a query over a table the owner may not read fails, and nothing
/// is left; over one it may read, it succeeds and the view belongs to the owner.
#[tokio::test]
async fn an_owned_view_query_runs_with_its_owner_rights_never_the_operators() {
    let db = TestDb::new().await;
    let owner = db.unique_role("reporting");
    db.exec(&format!(
        "CREATE TABLE secrets (x int); INSERT INTO secrets VALUES (1);
         CREATE TABLE stats (x int); INSERT INTO stats VALUES (7);
         CREATE ROLE {owner} NOLOGIN; GRANT SELECT ON stats TO {owner}"
    ))
    .await;
    let view = |name: &str, from: &str| {
        policy(
            "mv",
            &format!(
                "  materializedViews:\n    views:\n      - {{name: {name}, owner: {owner}, definition: \"SELECT x FROM {from}\"}}\n"
            ),
        )
    };
    // Not readable by the owner: the refresh fails with PostgreSQL's privilege error and
    // the whole transaction (create, hand over, refresh) is rolled back.
    let out = cli("apply", db.url(), &view("leak", "secrets"));
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("InsufficientPrivilege")
            || out.stderr.contains("InsufficientPrivilege"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        db.query_scalar::<i64>("SELECT count(*) FROM pg_matviews WHERE matviewname = 'leak'")
            .await,
        0
    );
    // Readable: created, owned by the role, filled, and converged.
    let ok = view("fine", "stats");
    expect_code(&cli("apply", db.url(), &ok), 0);
    assert_eq!(
        db.query_scalar::<String>(
            "SELECT matviewowner::text FROM pg_matviews WHERE matviewname = 'fine'"
        )
        .await,
        owner
    );
    assert_eq!(db.query_scalar::<i32>("SELECT x FROM fine").await, 7);
    expect_code(&cli("plan", db.url(), &ok), 0);
    // A hand-made change of owner is drift, handed back.
    db.exec("ALTER MATERIALIZED VIEW fine OWNER TO postgres")
        .await;
    expect_code(&cli("plan", db.url(), &ok), 2);
    expect_code(&cli("apply", db.url(), &ok), 0);
    expect_code(&cli("plan", db.url(), &ok), 0);
}
