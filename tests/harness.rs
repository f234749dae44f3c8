//! Self-test of the integration-test harness in `tests/support`: throwaway servers,
//! standbys, per-test databases and the polling helper.

use dbpolicy_test_support as support;

use std::time::Duration;

use sqlx::Connection;
use support::{eventually, pg_bin_chosen, pg_bin_major, PgServer, PgServerOptions, TestDb};

async fn scalar_on<T>(url: &str, sql: &str) -> Result<T, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let value = sqlx::query_scalar::<_, T>(sql).fetch_one(&mut conn).await;
    let _ = conn.close().await;
    value
}

#[tokio::test]
async fn server_starts_accepts_connections_and_restarts() {
    let server = PgServer::start_with(PgServerOptions::new().setting("work_mem", "7MB"));
    let url = server.admin_url();
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/postgres", server.port())
    );
    assert!(server.data_dir().join("PG_VERSION").is_file());

    let one: i32 = scalar_on(&url, "SELECT 1").await.unwrap();
    assert_eq!(one, 1);
    let work_mem: String = scalar_on(&url, "SHOW work_mem").await.unwrap();
    assert_eq!(work_mem, "7MB");
    let fsync: String = scalar_on(&url, "SHOW fsync").await.unwrap();
    assert_eq!(fsync, "off");

    let started = "SELECT pg_postmaster_start_time()::text";
    let before: String = scalar_on(&url, started).await.unwrap();
    server.restart();
    let after: String = scalar_on(&url, started).await.unwrap();
    assert_ne!(
        before, after,
        "restart must start a new postmaster on the same port"
    );
    let work_mem: String = scalar_on(&url, "SHOW work_mem").await.unwrap();
    assert_eq!(work_mem, "7MB", "settings survive a restart");

    server.stop();
    assert!(!server.is_running());
    assert!(scalar_on::<i32>(&url, "SELECT 1").await.is_err());
    server.restart();
    let one: i32 = scalar_on(&url, "SELECT 1").await.unwrap();
    assert_eq!(one, 1);
}

/// The PostgreSQL matrix (hack/test.sh) relies on this: with `DBPOLICY_PG_BIN` set, both
/// throwaway servers and the databases of `TestDb::new` run that version, never the
/// machine's shared server.
#[tokio::test]
async fn servers_run_the_chosen_version() {
    let major = pg_bin_major();
    let server = PgServer::start();
    let on_server: i32 = scalar_on(
        &server.admin_url(),
        "SELECT current_setting('server_version_num')::int / 10000",
    )
    .await
    .unwrap();
    assert_eq!(on_server as u32, major, "PgServer::start");
    if pg_bin_chosen() {
        let db = TestDb::new().await;
        let on_shared: i32 = db
            .query_scalar("SELECT current_setting('server_version_num')::int / 10000")
            .await;
        assert_eq!(
            on_shared as u32, major,
            "TestDb::new with DBPOLICY_PG_BIN set"
        );
    }
}

#[tokio::test]
async fn dropped_server_is_stopped_and_removed() {
    let server = PgServer::start();
    let root = server.data_dir().parent().unwrap().to_owned();
    let url = server.admin_url();
    drop(server);
    if std::env::var_os("DBPOLICY_KEEP_TEST_SERVERS").is_none() {
        assert!(!root.exists(), "{} still exists", root.display());
    }
    assert!(scalar_on::<i32>(&url, "SELECT 1").await.is_err());
}

#[tokio::test]
async fn standby_streams_from_primary() {
    let primary = PgServer::start_with(PgServerOptions::new().replication());
    let db = TestDb::on(&primary).await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await;

    let standby = primary.start_standby();
    assert_ne!(standby.port(), primary.port());
    let standby_url = standby.url(db.name());
    let in_recovery: bool = scalar_on(&standby_url, "SELECT pg_is_in_recovery()")
        .await
        .unwrap();
    assert!(in_recovery);
    let on_primary: bool = db.query_scalar("SELECT pg_is_in_recovery()").await;
    assert!(!on_primary);

    db.exec("INSERT INTO t VALUES (1, 'written on the primary')")
        .await;
    let note: String = eventually(Duration::from_secs(30), || async {
        scalar_on::<String>(&standby_url, "SELECT note FROM t WHERE id = 1").await
    })
    .await;
    assert_eq!(note, "written on the primary");

    let senders: i64 = db
        .query_scalar("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
        .await;
    assert_eq!(senders, 1);

    // A standby is read-only until promoted.
    let mut conn = sqlx::PgConnection::connect(&standby_url).await.unwrap();
    let err = sqlx::raw_sql("CREATE TABLE u (id int)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("25006"), "{err}");
    conn.close().await.unwrap();

    // Drop the test database before the servers: the standby goes first so the primary's
    // DROP DATABASE is not waiting on anything.
    drop(standby);
    drop(db);
}

#[tokio::test]
async fn test_db_is_created_and_dropped() {
    let db = TestDb::new().await;
    let name = db.name().to_owned();
    let admin_url = db.admin_url().to_owned();
    assert!(name.starts_with("dbpolicy_t_"), "{name}");
    assert!(db.url().ends_with(&format!("/{name}")), "{}", db.url());

    let current: String = db.query_scalar("SELECT current_database()").await;
    assert_eq!(current, name);
    db.exec("CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2), (3);")
        .await;
    let ids: Vec<i32> = db.query_column("SELECT id FROM items ORDER BY id").await;
    assert_eq!(ids, [1, 2, 3]);
    let err = db.try_exec("SELECT * FROM missing").await.unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("42P01"));

    // An open pool must not keep the database alive: drop uses WITH (FORCE).
    let pool = db.pool().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 3);

    let exists = format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'");
    assert_eq!(scalar_on::<i64>(&admin_url, &exists).await.unwrap(), 1);
    drop(db);
    assert_eq!(scalar_on::<i64>(&admin_url, &exists).await.unwrap(), 0);
    pool.close().await;
}

#[tokio::test]
async fn test_dbs_are_distinct_and_roles_are_cleaned_up() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name(), b.name());

    let role = a.unique_role("app");
    assert!(role.starts_with("app_"));
    a.exec(&format!(
        "CREATE ROLE {} LOGIN",
        support::quote_ident(&role)
    ))
    .await;
    let who: String = scalar_on(&a.url_as(&role), "SELECT current_user::text")
        .await
        .unwrap();
    assert_eq!(who, role);

    let admin_url = a.admin_url().to_owned();
    let role_exists = format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'");
    drop(a);
    assert_eq!(scalar_on::<i64>(&admin_url, &role_exists).await.unwrap(), 0);
}

#[tokio::test]
async fn test_db_on_a_given_server() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    assert_eq!(db.admin_url(), server.admin_url());
    let port: i32 = db.query_scalar("SELECT current_setting('port')::int").await;
    assert_eq!(port, i32::from(server.port()));
}

#[test]
fn url_helpers_keep_the_rest_of_the_url() {
    assert_eq!(
        support::url_with_database("postgres://u:p@h:5/postgres?sslmode=disable", "db_1"),
        "postgres://u:p@h:5/db_1?sslmode=disable"
    );
    assert_eq!(
        support::url_with_database("postgres://h", "db"),
        "postgres://h/db"
    );
    assert_eq!(
        support::url_with_user("postgres://u:p@h:5/db?x=1", "app role"),
        "postgres://app%20role@h:5/db?x=1"
    );
    assert_eq!(
        support::url_with_user("postgres://h/db", "r"),
        "postgres://r@h/db"
    );
}

#[tokio::test]
async fn eventually_returns_the_first_success() {
    let mut calls = 0;
    let value = eventually(Duration::from_secs(5), || {
        calls += 1;
        let n = calls;
        async move {
            if n >= 3 {
                Ok(n)
            } else {
                Err("not yet")
            }
        }
    })
    .await;
    assert_eq!(value, 3);
}

#[tokio::test]
#[should_panic(expected = "condition not met within")]
async fn eventually_gives_up_at_the_deadline() {
    eventually(Duration::from_millis(100), || async {
        Err::<(), _>("never")
    })
    .await;
}

#[test]
fn policy_files_and_the_binary() {
    let file = support::write_policy("kind: DatabasePolicy\n");
    assert_eq!(
        std::fs::read_to_string(file.path()).unwrap(),
        "kind: DatabasePolicy\n"
    );
    assert!(file.path().extension().is_some_and(|e| e == "yaml"));

    let out = support::run_dbpolicy(["--help"], None);
    assert_eq!(out.code, 0, "{out:?}");
}
