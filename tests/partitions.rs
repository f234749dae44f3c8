//! The partitions area against real PostgreSQL through the CLI, with the clock injected
//! (`DBPOLICY_NOW`): create, premake advancing, idempotence, rows moved out of the
//! default partition, detach vs drop, hand-made partitions, bad input, and the certquiz
//! `audit_logs` example.

use dbpolicy_test_support as support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{dbpolicy_cmd, policy, write_policy, PgServer, TestDb};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: not JSON:\n{}\n{}", self.stdout, self.stderr))
    }
}

/// `dbpolicy <verb> -f <policy>` at the instant `now`.
fn dbpolicy(verb: &str, url: &str, now: &str, yaml: &str, json: bool) -> Run {
    let file = write_policy(yaml);
    let mut cmd = dbpolicy_cmd();
    cmd.arg(verb)
        .arg("-f")
        .arg(file.path())
        .env("DATABASE_URL", url)
        .env("DBPOLICY_NOW", now);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().expect("run dbpolicy");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn partitions_policy(tables: &str, allow_destructive: bool) -> String {
    policy(
        "parts",
        &format!("  safety: {{allowDestructive: {allow_destructive}}}\n  partitions:\n    tables:\n{tables}"),
    )
}

/// name → bound of every partition of `table`, sorted by name.
async fn partitions(db: &TestDb, table: &str) -> Vec<(String, String)> {
    let rows = db
        .query_rows(&format!(
            "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = '{table}'::regclass ORDER BY 1"
        ))
        .await;
    use sqlx::Row;
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

async fn names(db: &TestDb, table: &str) -> Vec<String> {
    partitions(db, table)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.query_scalar::<i64>(sql).await
}

const EVENTS: &str = "
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY,
    created_at timestamptz NOT NULL,
    payload text NOT NULL DEFAULT 'x' CHECK (payload <> ''),
    n int GENERATED ALWAYS AS (length(payload)) STORED,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX events_payload_idx ON events (payload);";

#[tokio::test]
async fn creates_partitions_that_follow_the_parent_and_is_idempotent() {
    let db = TestDb::new().await;
    let owner = db.unique_role("events_owner");
    db.exec(&format!(
        "{EVENTS}\nCREATE ROLE {owner}; ALTER TABLE events OWNER TO {owner};"
    ))
    .await;
    let p = partitions_policy(
        "      - {table: events, column: created_at, interval: Monthly, premake: 2}\n",
        false,
    );
    let now = "2024-03-15T10:00:00Z";

    let plan = dbpolicy("plan", db.url(), now, &p, false);
    plan.expect(2);
    assert!(
        plan.stdout
            .contains("create partition events_2024_03 for [2024-03-01, 2024-04-01)"),
        "{}",
        plan.stdout
    );
    assert!(
        names(&db, "events").await.is_empty(),
        "plan changes nothing"
    );

    dbpolicy("apply", db.url(), now, &p, false).expect(0);
    assert_eq!(
        partitions(&db, "events").await,
        vec![
            (
                "events_2024_03".into(),
                "FOR VALUES FROM ('2024-03-01 00:00:00+00') TO ('2024-04-01 00:00:00+00')".into()
            ),
            (
                "events_2024_04".into(),
                "FOR VALUES FROM ('2024-04-01 00:00:00+00') TO ('2024-05-01 00:00:00+00')".into()
            ),
            (
                "events_2024_05".into(),
                "FOR VALUES FROM ('2024-05-01 00:00:00+00') TO ('2024-06-01 00:00:00+00')".into()
            ),
            ("events_default".into(), "DEFAULT".into()),
        ]
    );
    // Indexes (primary key and the plain one) follow the parent, and so do the owner,
    // the CHECK constraint and the generated column.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                    WHERE i.inhparent IN ('events_pkey'::regclass, 'events_payload_idx'::regclass)
                      AND c.relname LIKE 'events_2024_03%'"
        )
        .await,
        2
    );
    let owners: Vec<String> = db
        .query_column("SELECT DISTINCT pg_get_userbyid(c.relowner)::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass")
        .await;
    assert_eq!(owners, vec![owner.clone()]);
    db.exec("INSERT INTO events (created_at, payload) VALUES ('2024-03-20', 'abc')")
        .await;
    assert!(db
        .try_exec("INSERT INTO events (created_at, payload) VALUES ('2024-03-20', '')")
        .await
        .is_err());
    assert_eq!(count(&db, "SELECT n::int8 FROM events_2024_03").await, 3);

    // Idempotent, whatever the session's TimeZone and DateStyle.
    let again = dbpolicy("plan", db.url(), now, &p, false);
    again.expect(0);
    assert!(
        again.stdout.contains("nothing to change"),
        "{}",
        again.stdout
    );
    let odd = format!(
        "{}?options=-c%20TimeZone%3DAsia%2FKolkata%20-c%20DateStyle%3DSQL%2CDMY",
        db.url()
    );
    let again = dbpolicy("plan", &odd, now, &p, false);
    again.expect(0);
}

#[tokio::test]
async fn premake_advances_as_time_passes_for_every_key_type() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE w (at timestamp NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE q (day date NOT NULL) PARTITION BY RANGE (day);
         CREATE TABLE d (at timestamptz NOT NULL) PARTITION BY RANGE (at);",
    )
    .await;
    let p = partitions_policy(
        "      - {table: w, interval: Weekly, premake: 1, defaultPartition: false}
      - {table: q, interval: Quarterly, premake: 1, defaultPartition: false}
      - {table: d, interval: Daily, premake: 2, defaultPartition: false}\n",
        false,
    );
    dbpolicy("apply", db.url(), "2024-12-27T23:00:00Z", &p, false).expect(0);
    assert_eq!(names(&db, "w").await, ["w_2024_w52", "w_2025_w01"]);
    assert_eq!(names(&db, "q").await, ["q_2024_q4", "q_2025_q1"]);
    assert_eq!(
        names(&db, "d").await,
        ["d_2024_12_27", "d_2024_12_28", "d_2024_12_29"]
    );
    assert_eq!(
        partitions(&db, "w").await[1].1,
        "FOR VALUES FROM ('2024-12-30 00:00:00') TO ('2025-01-06 00:00:00')"
    );
    assert_eq!(
        partitions(&db, "q").await[1].1,
        "FOR VALUES FROM ('2025-01-01') TO ('2025-04-01')"
    );
    dbpolicy("plan", db.url(), "2024-12-27T00:00:00Z", &p, false).expect(0);

    // Five days later, a new week, a new quarter and five new days are due.
    dbpolicy("apply", db.url(), "2025-01-01T00:00:00Z", &p, false).expect(0);
    assert_eq!(
        names(&db, "w").await,
        ["w_2024_w52", "w_2025_w01", "w_2025_w02"]
    );
    assert_eq!(
        names(&db, "q").await,
        ["q_2024_q4", "q_2025_q1", "q_2025_q2"]
    );
    assert_eq!(names(&db, "d").await.last().unwrap(), "d_2025_01_03");
    assert_eq!(
        names(&db, "d").await.len(),
        8,
        "the gap since the last run is filled"
    );
    dbpolicy("plan", db.url(), "2025-01-01T00:00:00Z", &p, false).expect(0);
}

#[tokio::test]
async fn rows_in_the_default_partition_are_moved_and_counted() {
    let db = TestDb::new().await;
    db.exec(EVENTS).await;
    let p = partitions_policy(
        "      - {table: events, interval: Monthly, premake: 0}\n",
        false,
    );
    dbpolicy("apply", db.url(), "2024-01-15T00:00:00Z", &p, false).expect(0);
    assert_eq!(
        names(&db, "events").await,
        ["events_2024_01", "events_default"]
    );
    // Rows for February and March land in the default; one from 2023 too.
    db.exec(
        "INSERT INTO events (created_at, payload) SELECT '2024-02-01'::timestamptz + i * interval '1 hour', 'feb' FROM generate_series(0, 2) i;
         INSERT INTO events (created_at, payload) VALUES ('2024-03-31 23:59:59+00', 'mar'), ('2023-06-01', 'old');",
    )
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM events_default").await, 5);

    let p = partitions_policy(
        "      - {table: events, interval: Monthly, premake: 1}\n",
        false,
    );
    let plan = dbpolicy("plan", db.url(), "2024-02-10T00:00:00Z", &p, false);
    plan.expect(2);
    assert!(
        plan.stdout
            .contains("move 3 row(s) from events_default into events_2024_02"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains("move 1 row(s) from events_default into events_2024_03"),
        "{}",
        plan.stdout
    );

    let applied = dbpolicy("apply", db.url(), "2024-02-10T00:00:00Z", &p, true);
    applied.expect(0);
    let report = &applied.json()["outcome"]["report"];
    let moved: Vec<(String, u64)> = report["applied"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| {
            Some((
                c["summary"].as_str()?.to_string(),
                c["rowsAffected"].as_u64()?,
            ))
        })
        .collect();
    assert_eq!(
        moved,
        vec![
            (
                "move 3 row(s) from events_default into events_2024_02".to_string(),
                3
            ),
            (
                "move 1 row(s) from events_default into events_2024_03".to_string(),
                1
            ),
        ]
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM events").await,
        5,
        "no row lost or doubled"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM events_2024_02").await, 3);
    assert_eq!(count(&db, "SELECT count(*) FROM events_2024_03").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM events_default").await, 1);
    // The moved-into partition is a full partition: parent's indexes, generated column.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                    WHERE i.inhparent IN ('events_pkey'::regclass, 'events_payload_idx'::regclass)
                      AND c.relname LIKE 'events_2024_02%'"
        )
        .await,
        2
    );
    assert_eq!(
        count(&db, "SELECT sum(n)::int8 FROM events_2024_02").await,
        9
    );
    db.exec("INSERT INTO events (created_at, payload) VALUES ('2024-02-20', 'new')")
        .await;
    assert_eq!(count(&db, "SELECT count(*) FROM events_2024_02").await, 4);
    dbpolicy("plan", db.url(), "2024-02-10T00:00:00Z", &p, false).expect(0);
}

#[tokio::test]
async fn retention_detaches_by_default_and_drops_only_when_allowed() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE keep (at timestamptz NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE nodef (at timestamptz NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE gone (at date NOT NULL) PARTITION BY RANGE (at);",
    )
    .await;
    let history = |extra: &str| {
        format!(
            "      - {{table: keep, interval: Daily, premake: 1, startDate: '2024-02-20'{extra}}}
      - {{table: nodef, interval: Daily, premake: 1, startDate: '2024-02-20', defaultPartition: false{extra}}}
      - {{table: gone, interval: Daily, premake: 1, startDate: '2024-02-20'{extra}}}\n"
        )
    };
    let now = "2024-03-01T00:00:00Z";
    dbpolicy(
        "apply",
        db.url(),
        now,
        &partitions_policy(&history(""), false),
        false,
    )
    .expect(0);
    assert_eq!(names(&db, "keep").await.len(), 12 + 1);
    // A row inside the window, in the partition right after the cutoff.
    db.exec("INSERT INTO keep VALUES ('2024-02-25 00:00:00+00')")
        .await;

    // cutoff 2024-02-25 00:00: partitions 02-20 … 02-24 end on or before it.
    let p = partitions_policy(&history(", retention: 5d").replace("gone, interval: Daily, premake: 1, startDate: '2024-02-20', retention: 5d", "gone, interval: Daily, premake: 1, startDate: '2024-02-20', retention: 5d, retentionPolicy: Drop"), false);
    let plan = dbpolicy("plan", db.url(), now, &p, false);
    plan.expect(2);
    assert!(
        plan.stdout.contains(
            r#"ALTER TABLE "public"."keep" DETACH PARTITION "public"."keep_2024_02_20";"#
        ),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains(r#"ALTER TABLE "public"."nodef" DETACH PARTITION "public"."nodef_2024_02_20" CONCURRENTLY;"#), "{}", plan.stdout);
    assert!(
        plan.stdout
            .contains(r#"DROP TABLE "public"."gone_2024_02_20";"#),
        "{}",
        plan.stdout
    );

    // Drops are refused without allowDestructive; detaches go ahead.
    let applied = dbpolicy("apply", db.url(), now, &p, false);
    applied.expect(2);
    assert!(
        applied
            .stdout
            .contains("refused [destructive] partitions public.gone: drop gone_2024_02_20"),
        "{}",
        applied.stdout
    );
    for t in ["keep", "nodef"] {
        let left = names(&db, t).await;
        assert!(
            left.iter()
                .all(|n| n.as_str() >= &*format!("{t}_2024_02_25")),
            "{left:?}"
        );
        // Detached, not dropped: a plain table now.
        assert_eq!(
            count(&db, &format!("SELECT count(*) FROM pg_class WHERE relname = '{t}_2024_02_20' AND NOT relispartition")).await,
            1
        );
    }
    assert_eq!(names(&db, "gone").await.len(), 13, "nothing dropped");
    assert_eq!(
        count(&db, "SELECT count(*) FROM keep_2024_02_25").await,
        1,
        "the row inside the window stays"
    );

    let allowed = p.replace("allowDestructive: false", "allowDestructive: true");
    dbpolicy("apply", db.url(), now, &allowed, false).expect(0);
    assert_eq!(names(&db, "gone").await.first().unwrap(), "gone_2024_02_25");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_class WHERE relname = 'gone_2024_02_20'"
        )
        .await,
        0
    );
    dbpolicy("plan", db.url(), now, &allowed, false).expect(0);
}

#[tokio::test]
async fn hand_made_partitions_are_reported_and_never_touched() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (at date NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE t_archive PARTITION OF t FOR VALUES FROM ('2000-01-01') TO ('2024-01-01');
         CREATE TABLE t_2024_01 PARTITION OF t FOR VALUES FROM ('2024-01-01') TO ('2024-01-20');
         CREATE TABLE t_spring PARTITION OF t FOR VALUES FROM ('2024-03-01') TO ('2024-06-01');
         INSERT INTO t VALUES ('2010-01-01'), ('2024-01-02');",
    )
    .await;
    let p = partitions_policy(
        "      - {table: t, interval: Monthly, premake: 3, retention: 1mo, retentionPolicy: Drop}\n",
        true,
    );
    let applied = dbpolicy("apply", db.url(), "2024-03-15T00:00:00Z", &p, false);
    applied.expect(0);
    for hand_made in ["t_archive", "t_2024_01", "t_spring"] {
        assert!(
            applied
                .stdout
                .contains(&format!("partition public.{hand_made} ")),
            "{}",
            applied.stdout
        );
    }
    assert!(applied.stdout.contains("(PartitionNotManaged)"));
    // March to May are covered by t_spring; June is new; nothing hand-made is dropped.
    assert_eq!(
        names(&db, "t").await,
        [
            "t_2024_01",
            "t_2024_06",
            "t_archive",
            "t_default",
            "t_spring"
        ]
    );
    assert_eq!(count(&db, "SELECT count(*) FROM t").await, 2);
    dbpolicy("plan", db.url(), "2024-03-15T00:00:00Z", &p, false).expect(0);
}

#[tokio::test]
async fn bad_input_is_an_error_per_table_and_changes_nothing() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE plain (at date);
         CREATE TABLE listed (at date) PARTITION BY LIST (at);
         CREATE TABLE hashed (id int) PARTITION BY HASH (id);
         CREATE TABLE numbered (n int) PARTITION BY RANGE (n);
         CREATE TABLE other_col (a date, b date) PARTITION BY RANGE (a);
         CREATE TABLE overlapped (at date) PARTITION BY RANGE (at);
         CREATE TABLE overlapped_mid PARTITION OF overlapped FOR VALUES FROM ('2024-03-10') TO ('2024-04-10');
         CREATE TABLE good (at date) PARTITION BY RANGE (at);",
    )
    .await;
    let p = partitions_policy(
        "      - {table: plain, interval: Monthly}
      - {table: listed, interval: Monthly}
      - {table: hashed, interval: Monthly}
      - {table: numbered, interval: Monthly}
      - {table: other_col, column: b, interval: Monthly}
      - {table: overlapped, interval: Monthly}
      - {table: missing, interval: Monthly}
      - {table: good, interval: Monthly}\n",
        false,
    );
    let applied = dbpolicy("apply", db.url(), "2024-03-15T00:00:00Z", &p, false);
    applied.expect(1);
    for (table, reason) in [
        ("plain", "NotPartitioned"),
        ("listed", "UnsupportedPartitionStrategy"),
        ("hashed", "UnsupportedPartitionStrategy"),
        ("numbered", "UnsupportedKeyType"),
        ("other_col", "ColumnMismatch"),
        ("overlapped", "OverlappingPartition"),
        ("missing", "TableNotFound"),
    ] {
        assert!(
            applied
                .stdout
                .contains(&format!("# ERROR partitions: public.{table}: "))
                && applied.stdout.contains(&format!("({reason})")),
            "{table} {reason}\n{}",
            applied.stdout
        );
    }
    assert!(applied.stdout.contains("nothing was applied"));
    assert!(
        names(&db, "good").await.is_empty(),
        "a plan with errors changes nothing"
    );
    assert_eq!(names(&db, "overlapped").await, ["overlapped_mid"]);

    // A bad clock is refused with a clear message.
    let bad_clock = dbpolicy("plan", db.url(), "yesterday", &p, false);
    bad_clock.expect(1);
    assert!(
        bad_clock.stderr.contains("DBPOLICY_NOW"),
        "{}",
        bad_clock.stderr
    );
}

/// The CLI maintains partitioned tables on two connections at once, each table's changes
/// on one; a table that fails stops both, the report tells what ran and what did not,
/// and the next run finishes the work.
#[tokio::test]
async fn tables_are_maintained_on_two_connections_and_a_failure_stops_both() {
    let db = TestDb::new().await;
    let mut ddl = String::from(
        "CREATE TABLE ddl_by (pid int);
         CREATE FUNCTION ddl_by() RETURNS event_trigger LANGUAGE plpgsql AS
           $$BEGIN INSERT INTO ddl_by VALUES (pg_backend_pid()); END$$;\n",
    );
    let mut tables = String::new();
    for i in 1..=6 {
        ddl.push_str(&format!(
            "CREATE TABLE t{i} (at timestamptz NOT NULL) PARTITION BY RANGE (at);\n"
        ));
        tables.push_str(&format!(
            "      - {{table: t{i}, interval: Monthly, premake: 2}}\n"
        ));
    }
    db.exec(&ddl).await;
    // Which backends ran the partitions' DDL (an event trigger of this test's own).
    db.exec("CREATE EVENT TRIGGER ddl_by ON ddl_command_end EXECUTE FUNCTION ddl_by()")
        .await;
    let p = policy(
        "parts",
        &format!("  safety: {{lockTimeout: 3s}}\n  partitions:\n    tables:\n{tables}"),
    );
    let now = "2024-03-15T10:00:00Z";

    // Lanes: t1, t3, t5 on the first, t2, t4, t6 on the second (dealt in turn, equal
    // work). t1 is held by another session for good: the first lane fails on it after
    // `lockTimeout`. t2 is held until the first lane waits on t1 (both lanes busy), and a
    // while more; t4 until the first lane has failed: the second lane finishes t4 (its
    // transaction was under way), then stops instead of going on to t6.
    let lock = |table: &'static str| {
        let url = db.url().to_string();
        async move {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(&format!("BEGIN; LOCK TABLE {table} IN ACCESS SHARE MODE"))
                .execute(&mut c)
                .await
                .unwrap();
            c
        }
    };
    let (t1, t2, t4) = (lock("t1").await, lock("t2").await, lock("t4").await);
    let waiters = |table: &'static str| {
        let db = &db;
        async move {
            count(
                db,
                &format!(
                    "SELECT count(*) FROM pg_locks WHERE relation = '{table}'::regclass AND NOT granted"
                ),
            )
            .await
        }
    };
    let releases = async {
        while waiters("t1").await == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(t2);
        while waiters("t1").await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(t4);
    };
    let (failed, _) = tokio::join!(
        dbpolicy_async("apply", db.url(), now, &p, true),
        tokio::time::timeout(Duration::from_secs(120), releases)
    );
    drop(t1);
    failed.expect(1);
    let report = &failed.json()["outcome"]["report"];
    assert_eq!(report["failure"]["reason"], "LockTimeout", "{report}");
    assert_eq!(report["failure"]["target"], "public.t1", "{report}");
    let targets = |key: &str| -> Vec<String> {
        let mut t: Vec<String> = report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["target"].as_str().unwrap().to_string())
            .collect();
        t.dedup();
        t
    };
    assert_eq!(targets("applied"), ["public.t2", "public.t4"], "{report}");
    assert_eq!(
        targets("notAttempted"),
        ["public.t1", "public.t3", "public.t5", "public.t6"],
        "{report}"
    );
    for (table, made) in [
        ("t1", 0),
        ("t2", 4),
        ("t3", 0),
        ("t4", 4),
        ("t5", 0),
        ("t6", 0),
    ] {
        assert_eq!(
            names(&db, table).await.len(),
            made,
            "{table}: the report is the catalog"
        );
    }

    db.exec("TRUNCATE ddl_by").await;
    dbpolicy("apply", db.url(), now, &p, false).expect(0);
    for i in 1..=6 {
        assert_eq!(names(&db, &format!("t{i}")).await.len(), 4, "t{i}");
    }
    dbpolicy("plan", db.url(), now, &p, false).expect(0);
    assert_eq!(
        count(&db, "SELECT count(DISTINCT pid) FROM ddl_by").await,
        2,
        "the four tables left were maintained on two connections"
    );
    db.exec("DROP EVENT TRIGGER ddl_by").await;
}

/// The certquiz "phase 2" plan for `audit_logs`: the partitions section of
/// examples/certquiz/policy.yaml against examples/certquiz/schema.sql.
#[tokio::test]
async fn certquiz_audit_logs_monthly() {
    let root = env!("CARGO_MANIFEST_DIR");
    let schema = std::fs::read_to_string(format!("{root}/examples/certquiz/schema.sql"))
        .expect("examples/certquiz/schema.sql");
    let full: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{root}/examples/certquiz/policy.yaml"))
            .expect("examples/certquiz/policy.yaml"),
    )
    .unwrap();
    let section = serde_yaml::to_string(&full["spec"]["partitions"]).unwrap();
    let indented: String = section.lines().map(|l| format!("    {l}\n")).collect();
    let p = policy("certquiz", &format!("  partitions:\n{indented}"));

    let db = TestDb::new().await;
    db.exec(&schema).await;
    // Before the policy, audit_logs has no partition: no row can be written.
    assert!(db
        .try_exec("INSERT INTO audit_logs (action) VALUES ('login')")
        .await
        .is_err());

    dbpolicy("apply", db.url(), "2024-03-15T08:00:00Z", &p, false).expect(0);
    assert_eq!(
        names(&db, "audit_logs").await,
        [
            "audit_logs_2024_03",
            "audit_logs_2024_04",
            "audit_logs_2024_05",
            "audit_logs_2024_06",
            "audit_logs_default"
        ]
    );
    db.exec("INSERT INTO audit_logs (created_at, action) VALUES ('2024-03-20', 'login'), ('2024-09-01', 'late')").await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM audit_logs_2024_03").await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM audit_logs_default").await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'audit_logs_2024_04'"
        )
        .await,
        2,
        "primary key and audit_logs_user_id_created_at_idx"
    );
    dbpolicy("plan", db.url(), "2024-03-31T23:59:59Z", &p, false).expect(0);

    // Thirteen months on: the gap since the last run is filled, the stray September row
    // moves into its new partition, and partitions older than twelve months are detached
    // (kept for the archive).
    let later = dbpolicy("apply", db.url(), "2025-04-15T00:00:00Z", &p, false);
    later.expect(0);
    assert!(
        later.stdout.contains(
            "move 1 row(s) from audit_logs_default into audit_logs_2024_09 (1 row(s) affected)"
        ),
        "{}",
        later.stdout
    );
    let left = names(&db, "audit_logs").await;
    assert_eq!(left.first().unwrap(), "audit_logs_2024_04", "{left:?}");
    assert_eq!(left[left.len() - 2], "audit_logs_2025_07");
    assert_eq!(
        count(&db, "SELECT count(*) FROM audit_logs_2024_03").await,
        1,
        "detached, not dropped"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM audit_logs_default").await,
        0
    );
    dbpolicy("plan", db.url(), "2025-04-15T00:00:00Z", &p, false).expect(0);
}

// ---------------------------------------------------------------- row moves (issue 13)

/// `events` with a foreign key to `users`, identity and generated columns, its January
/// partition and default made by the policy at 2024-01-15; then 3,000 February rows (in
/// the default) and 5 January ones, each with one `event_details` row referencing it
/// `ON DELETE <on_delete>`.
async fn events_with_details(db: &TestDb, on_delete: &str) -> String {
    db.exec(
        "CREATE TABLE users (id int PRIMARY KEY);
         INSERT INTO users SELECT generate_series(1, 10);
         CREATE TABLE events (
             id bigint GENERATED ALWAYS AS IDENTITY,
             created_at timestamptz NOT NULL,
             user_id int NOT NULL REFERENCES users,
             payload text NOT NULL DEFAULT 'x',
             n int GENERATED ALWAYS AS (length(payload)) STORED,
             PRIMARY KEY (id, created_at)
         ) PARTITION BY RANGE (created_at);",
    )
    .await;
    let p = partitions_policy(
        "      - {table: events, interval: Monthly, premake: 0}\n",
        false,
    );
    dbpolicy("apply", db.url(), "2024-01-15T00:00:00Z", &p, false).expect(0);
    db.exec(&format!(
        "INSERT INTO events (created_at, user_id, payload)
             SELECT '2024-02-01'::timestamptz + i * interval '13 minutes', 1 + i % 10, 'p' || i
             FROM generate_series(0, 2999) i;
         INSERT INTO events (created_at, user_id) SELECT '2024-01-20', 1 FROM generate_series(1, 5);
         CREATE TABLE event_details (
             id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             event_id bigint,
             event_at timestamptz,
             FOREIGN KEY (event_id, event_at) REFERENCES events ON DELETE {on_delete}
         );
         INSERT INTO event_details (event_id, event_at) SELECT id, created_at FROM events ORDER BY id;"
    ))
    .await;
    assert_eq!(count(db, "SELECT count(*) FROM events_default").await, 3000);
    partitions_policy(
        "      - {table: events, interval: Monthly, premake: 0}\n",
        false,
    )
}

/// Every row of `events` and `event_details` (ids, keys, references, values), and the
/// row counts: what a move must leave identical.
async fn fingerprint(db: &TestDb) -> (i64, i64, String) {
    let events = count(db, "SELECT count(*) FROM events").await;
    let details = count(db, "SELECT count(*) FROM event_details").await;
    let digest = db
        .query_scalar::<String>(
            "SELECT md5((SELECT string_agg(format('%s|%s|%s|%s|%s', id, created_at, user_id, payload, n), ',' ORDER BY id) FROM events)
                     || '/' || (SELECT string_agg(format('%s|%s|%s', id, event_id, event_at), ',' ORDER BY id) FROM event_details))",
        )
        .await;
    (events, details, digest)
}

/// Moves out of the default partition, then checks that nothing but the row's partition
/// changed and that the foreign key still holds and still acts on the moved rows.
async fn move_keeps_references(on_delete: &str) -> TestDb {
    let db = TestDb::new().await;
    let p = events_with_details(&db, on_delete).await;
    let before = fingerprint(&db).await;
    let now = "2024-02-10T00:00:00Z";
    let plan = dbpolicy("plan", db.url(), now, &p, false);
    plan.expect(2);
    assert!(
        plan.stdout
            .contains("move 3000 row(s) from events_default into events_2024_02"),
        "{}",
        plan.stdout
    );
    dbpolicy("apply", db.url(), now, &p, false).expect(0);
    assert_eq!(
        fingerprint(&db).await,
        before,
        "ON DELETE {on_delete}: every event and every detail row is as before the move"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM events_2024_02").await,
        3000
    );
    assert_eq!(count(&db, "SELECT count(*) FROM events_default").await, 0);
    // The foreign key still validates against the partitioned table, and still acts on
    // the rows that moved (its triggers are on the new partition).
    db.exec(
        "ALTER TABLE event_details ADD CONSTRAINT details_recheck
             FOREIGN KEY (event_id, event_at) REFERENCES events NOT VALID;
         ALTER TABLE event_details VALIDATE CONSTRAINT details_recheck;
         ALTER TABLE event_details DROP CONSTRAINT details_recheck;",
    )
    .await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'event_details'::regclass AND NOT convalidated"
        )
        .await,
        0
    );
    dbpolicy("plan", db.url(), now, &p, false).expect(0);
    db
}

#[tokio::test]
async fn moving_rows_fires_no_on_delete_cascade() {
    let db = move_keeps_references("CASCADE").await;
    // The cascade still works for a moved row deleted by the application.
    db.exec("DELETE FROM events WHERE id = 1").await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM event_details WHERE event_id = 1").await,
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM event_details").await, 3004);
}

#[tokio::test]
async fn moving_rows_fires_no_on_delete_set_null() {
    let db = move_keeps_references("SET NULL").await;
    db.exec("DELETE FROM events WHERE id = 1").await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM event_details WHERE event_id IS NULL"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_no_action_foreign_key_does_not_block_moving_rows() {
    let db = move_keeps_references("NO ACTION").await;
    let refused = db.try_exec("DELETE FROM events WHERE id = 1").await;
    assert_eq!(
        refused
            .as_ref()
            .err()
            .and_then(support::sqlstate)
            .as_deref(),
        Some("23503"),
        "the key still guards the moved row: {refused:?}"
    );
}

#[tokio::test]
async fn moving_rows_fires_no_user_trigger_and_refuses_an_always_trigger() {
    let db = TestDb::new().await;
    let p = events_with_details(&db, "CASCADE").await;
    db.exec(
        "CREATE TABLE trigger_log (op text, event_id bigint);
         CREATE FUNCTION log_event() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO trigger_log VALUES (TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
             RETURN NULL;
         END $$;
         CREATE TRIGGER log_rows AFTER INSERT OR UPDATE OR DELETE ON events
             FOR EACH ROW EXECUTE FUNCTION log_event();",
    )
    .await;
    let before = fingerprint(&db).await;
    let now = "2024-02-10T00:00:00Z";

    // A trigger enabled ALWAYS fires whatever session_replication_role says: refused,
    // named, and nothing changes.
    db.exec("ALTER TABLE events ENABLE ALWAYS TRIGGER log_rows")
        .await;
    let refused = dbpolicy("apply", db.url(), now, &p, false);
    refused.expect(1);
    assert!(
        refused.stdout.contains("(TriggerFiresOnMove)")
            && refused.stdout.contains("log_rows")
            && refused.stdout.contains("nothing was applied"),
        "{}",
        refused.stdout
    );
    assert_eq!(
        names(&db, "events").await,
        ["events_2024_01", "events_default"]
    );
    assert_eq!(fingerprint(&db).await, before);
    assert_eq!(count(&db, "SELECT count(*) FROM trigger_log").await, 0);

    // Enabled the ordinary way, it does not fire for the move.
    db.exec("ALTER TABLE events ENABLE TRIGGER log_rows").await;
    dbpolicy("apply", db.url(), now, &p, false).expect(0);
    assert_eq!(fingerprint(&db).await, before);
    assert_eq!(
        count(&db, "SELECT count(*) FROM trigger_log").await,
        0,
        "no trigger fired for the moved rows"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM events_2024_02").await,
        3000
    );
    // And it fires for the application afterwards, on the new partition too.
    db.exec("DELETE FROM event_details WHERE event_id = 1; DELETE FROM events WHERE id = 1")
        .await;
    assert_eq!(count(&db, "SELECT count(*) FROM trigger_log").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_writer_sees_no_error_while_rows_move() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE events (
             id bigint GENERATED ALWAYS AS IDENTITY,
             created_at timestamptz NOT NULL,
             payload text NOT NULL DEFAULT 'x',
             PRIMARY KEY (id, created_at)
         ) PARTITION BY RANGE (created_at);",
    )
    .await;
    let p = partitions_policy(
        "      - {table: events, interval: Monthly, premake: 0}\n",
        false,
    );
    dbpolicy("apply", db.url(), "2024-01-15T00:00:00Z", &p, false).expect(0);
    // Enough February rows in the default that the move takes a while.
    db.exec(
        "INSERT INTO events (created_at) SELECT '2024-02-01'::timestamptz + i * interval '1 second'
         FROM generate_series(0, 199999) i",
    )
    .await;
    let initial = count(&db, "SELECT count(*) FROM events").await;

    // The writer inserts through the parent, one row a statement: February rows (the range
    // being moved), January rows (an existing partition) and 2030 rows (the default).
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for dates in [
        // Only rows of the range being moved: this writer is waiting when the move commits.
        &["2024-02-15 12:00:00+00", "2024-02-29 23:59:59+00"][..],
        // An existing partition and the default, for the rest.
        &["2024-01-20 12:00:00+00", "2030-01-01 00:00:00+00"][..],
    ] {
        let done = done.clone();
        let mut conn = db.connect().await;
        writers.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0i64, Vec::new());
            // Bounded: the apply ends long before; the bound only turns a hang into a failure.
            let deadline = Instant::now() + Duration::from_secs(300);
            for at in dates.iter().cycle() {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                assert!(Instant::now() < deadline, "the apply never ended");
                // Not a cached prepared statement: parsed and planned afresh each time,
                // as psql and many drivers send it.
                let sql = format!("INSERT INTO events (created_at) VALUES ('{at}')");
                match sqlx::query(&sql).persistent(false).execute(&mut conn).await {
                    Ok(_) => ok += 1,
                    Err(e) => errors.push(support::describe(&e)),
                }
            }
            (ok, errors)
        }));
    }
    // Let the writer get going before the apply starts.
    let started = Instant::now();
    while count(&db, "SELECT count(*) FROM events").await < initial + 30 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the writer never wrote"
        );
    }
    let apply = dbpolicy_async("apply", db.url(), "2024-02-10T00:00:00Z", &p, false).await;
    // A few more inserts after the commit, routed by the new partition.
    let after = count(&db, "SELECT count(*) FROM events").await;
    while count(&db, "SELECT count(*) FROM events").await < after + 30 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the writer stopped"
        );
    }
    done.store(true, Ordering::SeqCst);
    let (mut ok, mut errors) = (0, Vec::new());
    for writer in writers {
        let (n, e) = writer.await.expect("writer task");
        ok += n;
        errors.extend(e);
    }
    apply.expect(0);
    assert!(
        errors.is_empty(),
        "{} of {} concurrent inserts failed, e.g. {:?}",
        errors.len(),
        ok + errors.len() as i64,
        errors.first()
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM events").await,
        initial + ok
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM events_default WHERE created_at < '2024-03-01'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&db, "SELECT count(DISTINCT id) FROM events").await,
        initial + ok
    );
    dbpolicy("plan", db.url(), "2024-02-10T00:00:00Z", &p, false).expect(0);
}

/// `dbpolicy apply` as a child process the runtime can await while other tasks run.
async fn dbpolicy_async(verb: &str, url: &str, now: &str, yaml: &str, json: bool) -> Run {
    let file = write_policy(yaml);
    let mut cmd = tokio::process::Command::from(dbpolicy_cmd());
    cmd.arg(verb)
        .arg("-f")
        .arg(file.path())
        .env("DATABASE_URL", url)
        .env("DBPOLICY_NOW", now)
        .kill_on_drop(true);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("dbpolicy finished within 5 minutes")
        .expect("run dbpolicy");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A role that may not set `session_replication_role` is refused before anything runs,
/// with the grant that fixes it; after the grant the same apply moves the rows. On a
/// throwaway server: the grant is server-wide.
#[tokio::test]
async fn a_role_that_may_not_set_session_replication_role_is_refused_and_nothing_changes() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec(
        "CREATE ROLE table_owner LOGIN;
         CREATE TABLE events (created_at date NOT NULL, note text) PARTITION BY RANGE (created_at);
         ALTER TABLE events OWNER TO table_owner;
         GRANT CREATE ON SCHEMA public TO table_owner;",
    )
    .await;
    let url = db.url_as("table_owner");
    let p = partitions_policy(
        "      - {table: events, interval: Monthly, premake: 0}\n",
        false,
    );
    dbpolicy("apply", &url, "2024-01-15T00:00:00Z", &p, false).expect(0);
    db.exec(
        "INSERT INTO events SELECT '2024-02-01'::date + i, 'n' || i FROM generate_series(0, 9) i",
    )
    .await;
    let rows =
        "SELECT string_agg(format('%s %s', created_at, note), ',' ORDER BY note) FROM events";
    let before: String = db.query_scalar(rows).await;

    let now = "2024-02-10T00:00:00Z";
    for verb in ["plan", "apply"] {
        let refused = dbpolicy(verb, &url, now, &p, false);
        refused.expect(1);
        assert!(
            refused.stdout.contains("(InsufficientPrivilege)")
                && refused
                    .stdout
                    .contains("GRANT SET ON PARAMETER session_replication_role TO \"table_owner\""),
            "{verb}: {}",
            refused.stdout
        );
    }
    assert_eq!(
        names(&db, "events").await,
        ["events_2024_01", "events_default"]
    );
    assert_eq!(db.query_scalar::<String>(rows).await, before);

    db.exec("GRANT SET ON PARAMETER session_replication_role TO table_owner")
        .await;
    dbpolicy("apply", &url, now, &p, false).expect(0);
    assert_eq!(count(&db, "SELECT count(*) FROM events_2024_02").await, 10);
    assert_eq!(db.query_scalar::<String>(rows).await, before);
    db.exec("REVOKE SET ON PARAMETER session_replication_role FROM table_owner")
        .await;
}
