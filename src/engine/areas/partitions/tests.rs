use super::*;
use crate::engine::areas::convergence::converges;
use crate::reason::Reason;
use proptest::prelude::*;

fn date(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn qn(name: &str) -> QualifiedName {
    QualifiedName::new("public", name)
}

fn state(key_type: &str) -> TableState {
    TableState {
        relkind: "p".into(),
        strategy: Some("r".into()),
        key_columns: 1,
        key_column: Some("created_at".into()),
        key_type: Some(key_type.into()),
        owner: "postgres".into(),
        columns: vec!["id".into(), "created_at".into()],
        ..Default::default()
    }
}

fn child(name: &str, from: NaiveDate, to: NaiveDate) -> Child {
    Child {
        name: qn(name),
        bound: Bound::Range {
            from: micros(from),
            to: micros(to),
        },
        detach_pending: false,
    }
}

fn ours(table: &str, interval: PartitionInterval, start: &str) -> Child {
    let s = date(start);
    child(&partition_name(table, interval, s), s, next(interval, s))
}

fn default_child(table: &str) -> Child {
    Child {
        name: qn(&default_name(table)),
        bound: Bound::Default,
        detach_pending: false,
    }
}

fn spec_table(table: &str, interval: PartitionInterval) -> PartitionedTable {
    PartitionedTable {
        table: table.into(),
        interval,
        premake: Some(2),
        ..Default::default()
    }
}

fn observed(now: &str, tables: Vec<(&str, TableState)>) -> Observed {
    let mut o = Observed::new(at(now));
    for (n, s) in tables {
        o.tables.insert(qn(n), s);
    }
    o
}

fn spec(tables: Vec<PartitionedTable>) -> PartitionsSpec {
    PartitionsSpec { tables }
}

fn sqls(p: &AreaPlan) -> Vec<&str> {
    p.changes.iter().map(|c| c.sql.as_str()).collect()
}

// ------------------------------------------------------------ naming and bounds

#[test]
fn names_per_interval() {
    use PartitionInterval::*;
    let d = date("2024-01-31");
    assert_eq!(partition_name("t", Daily, d), "t_2024_01_31");
    assert_eq!(partition_name("t", Weekly, floor(Weekly, d)), "t_2024_w05");
    assert_eq!(
        partition_name("audit_logs", Monthly, floor(Monthly, d)),
        "audit_logs_2024_01"
    );
    assert_eq!(
        partition_name("t", Quarterly, floor(Quarterly, d)),
        "t_2024_q1"
    );
    assert_eq!(partition_name("t", Yearly, floor(Yearly, d)), "t_2024");
    assert_eq!(default_name("audit_logs"), "audit_logs_default");
}

#[test]
fn suffixes_round_trip_and_only_canonical_spellings_parse() {
    use PartitionInterval::*;
    let mut d = date("2019-12-20");
    while d < date("2025-02-01") {
        for i in [Daily, Weekly, Monthly, Quarterly, Yearly] {
            let start = floor(i, d);
            assert_eq!(parse_suffix(i, &suffix(i, start)), Some(start), "{i:?} {d}");
        }
        d += chrono::Duration::days(1);
    }
    assert_eq!(parse_suffix(Monthly, "2024_1"), None);
    assert_eq!(parse_suffix(Monthly, "2024_13"), None);
    assert_eq!(parse_suffix(Daily, "2023_02_29"), None);
    assert_eq!(parse_suffix(Quarterly, "2024_q5"), None);
    assert_eq!(
        parse_suffix(Weekly, "2021_w53"),
        None,
        "2021 has 52 ISO weeks"
    );
    assert_eq!(parse_suffix(Weekly, "2020_w53"), Some(date("2020-12-28")));
    assert_eq!(parse_suffix(Yearly, "old"), None);
    assert_eq!(parse_suffix(Monthly, "2024_01_x"), None);
}

#[test]
fn bounds_are_aligned_for_every_interval() {
    use PartitionInterval::*;
    // Daily across a leap day.
    assert_eq!(floor(Daily, date("2024-02-29")), date("2024-02-29"));
    assert_eq!(next(Daily, date("2024-02-28")), date("2024-02-29"));
    assert_eq!(next(Daily, date("2024-02-29")), date("2024-03-01"));
    // ISO weeks start on Monday; 2021-01-01 (a Friday) is in week 53 of ISO year 2020.
    assert_eq!(floor(Weekly, date("2021-01-01")), date("2020-12-28"));
    assert_eq!(suffix(Weekly, date("2020-12-28")), "2020_w53");
    assert_eq!(floor(Weekly, date("2024-12-31")), date("2024-12-30"));
    assert_eq!(suffix(Weekly, date("2024-12-30")), "2025_w01");
    assert_eq!(next(Weekly, date("2020-12-28")), date("2021-01-04"));
    assert_eq!(floor(Weekly, date("2024-01-01")), date("2024-01-01"));
    // Months of every length, February of a leap year.
    assert_eq!(floor(Monthly, date("2024-02-29")), date("2024-02-01"));
    assert_eq!(next(Monthly, date("2024-02-01")), date("2024-03-01"));
    assert_eq!(next(Monthly, date("2024-12-01")), date("2025-01-01"));
    // Quarters.
    assert_eq!(floor(Quarterly, date("2024-03-31")), date("2024-01-01"));
    assert_eq!(floor(Quarterly, date("2024-04-01")), date("2024-04-01"));
    assert_eq!(floor(Quarterly, date("2024-12-31")), date("2024-10-01"));
    assert_eq!(suffix(Quarterly, date("2024-10-01")), "2024_q4");
    assert_eq!(next(Quarterly, date("2024-10-01")), date("2025-01-01"));
    // Years, leap or not.
    assert_eq!(floor(Yearly, date("2024-02-29")), date("2024-01-01"));
    assert_eq!(next(Yearly, date("2024-01-01")), date("2025-01-01"));
}

#[test]
fn literals_per_key_type_are_utc_midnights() {
    let d = date("2024-03-01");
    assert_eq!(KeyType::Date.literal(d), "'2024-03-01'");
    assert_eq!(KeyType::Timestamp.literal(d), "'2024-03-01 00:00:00'");
    assert_eq!(KeyType::Timestamptz.literal(d), "'2024-03-01 00:00:00+00'");
}

#[test]
fn long_table_names_are_cut_to_fit_63_bytes() {
    let long = "a".repeat(63);
    let name = partition_name(&long, PartitionInterval::Daily, date("2024-01-31"));
    assert_eq!(name.len(), 63);
    assert!(name.ends_with("_2024_01_31"));
    assert_eq!(default_name(&long).len(), 63);
    // …and are still recognised as ours.
    assert_eq!(
        ours_start(&long, PartitionInterval::Daily, &name),
        Some(date("2024-01-31"))
    );
    // Multi-byte characters are never split.
    let accents = "é".repeat(31);
    let name = partition_name(&accents, PartitionInterval::Monthly, date("2024-01-01"));
    assert!(name.len() <= 63 && name.ends_with("_2024_01"));
}

// ------------------------------------------------------------ creating

#[test]
fn creates_current_and_premade_partitions_and_a_default() {
    let s = spec(vec![spec_table("audit_logs", PartitionInterval::Monthly)]);
    let o = observed(
        "2024-03-15T10:00:00Z",
        vec![("audit_logs", state("timestamp with time zone"))],
    );
    let p = plan(&s, &o);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(
        sqls(&p),
        vec![
            r#"CREATE TABLE "public"."audit_logs_2024_03" PARTITION OF "public"."audit_logs" FOR VALUES FROM ('2024-03-01 00:00:00+00') TO ('2024-04-01 00:00:00+00')"#,
            r#"CREATE TABLE "public"."audit_logs_2024_04" PARTITION OF "public"."audit_logs" FOR VALUES FROM ('2024-04-01 00:00:00+00') TO ('2024-05-01 00:00:00+00')"#,
            r#"CREATE TABLE "public"."audit_logs_2024_05" PARTITION OF "public"."audit_logs" FOR VALUES FROM ('2024-05-01 00:00:00+00') TO ('2024-06-01 00:00:00+00')"#,
            r#"CREATE TABLE "public"."audit_logs_default" PARTITION OF "public"."audit_logs" DEFAULT"#,
        ]
    );
    assert!(p.changes.iter().all(|c| c.transactional));
    assert!(p.changes.iter().all(|c| c.hazard == Hazard::Locking));
    // CREATE TABLE … PARTITION OF: ACCESS EXCLUSIVE on the parent.
    assert!(p
        .changes
        .iter()
        .all(|c| c.lock == LockLevel::AccessExclusive && c.timeout.is_none()));
}

#[test]
fn start_date_creates_the_past_too() {
    let mut t = spec_table("t", PartitionInterval::Quarterly);
    t.start_date = Some("2023-08-20".into());
    t.premake = Some(1);
    t.default_partition = Some(false);
    let o = observed("2024-01-10T00:00:00Z", vec![("t", state("date"))]);
    let p = plan(&spec(vec![t]), &o);
    let names: Vec<&str> = p
        .changes
        .iter()
        .map(|c| c.summary.split(' ').nth(2).unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["t_2023_q3", "t_2023_q4", "t_2024_q1", "t_2024_q2"]
    );
    assert!(p.changes[0]
        .sql
        .ends_with("FROM ('2023-07-01') TO ('2023-10-01')"));
}

#[test]
fn premake_advances_with_the_clock() {
    use PartitionInterval::Weekly;
    let mut t = spec_table("t", Weekly);
    t.default_partition = Some(false);
    let s = spec(vec![t]);
    let mut o = observed(
        "2024-12-25T00:00:00Z",
        vec![("t", state("timestamp without time zone"))],
    );
    let mut ops = diff(&s, &o, &mut AreaPlan::new(AREA));
    assert_eq!(ops.len(), 3);
    o = simulate(&o, &ops);
    assert!(diff(&s, &o, &mut AreaPlan::new(AREA)).is_empty());
    // A week later exactly one more partition is due: 2025-W03.
    o.now = at("2025-01-01T00:00:00Z");
    ops = diff(&s, &o, &mut AreaPlan::new(AREA));
    assert_eq!(ops.len(), 1);
    assert!(
        matches!(&ops[0], Op::Create { partition, range, .. } if partition == "t_2025_w03" && range.start == date("2025-01-13"))
    );
    // Still within the week: nothing.
    o = simulate(&o, &ops);
    o.now = at("2025-01-05T23:59:59Z");
    assert!(diff(&s, &o, &mut AreaPlan::new(AREA)).is_empty());
}

#[test]
fn owner_of_new_partitions_follows_the_parent() {
    let mut st = state("date");
    st.owner = "app".into();
    let mut t = spec_table("t", PartitionInterval::Yearly);
    t.premake = Some(0);
    let p = plan(
        &spec(vec![t]),
        &observed("2024-06-01T00:00:00Z", vec![("t", st)]),
    );
    assert_eq!(
        sqls(&p),
        vec![
            r#"CREATE TABLE "public"."t_2024" PARTITION OF "public"."t" FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"#,
            r#"ALTER TABLE "public"."t_2024" OWNER TO "app""#,
            r#"CREATE TABLE "public"."t_default" PARTITION OF "public"."t" DEFAULT"#,
            r#"ALTER TABLE "public"."t_default" OWNER TO "app""#,
        ]
    );
}

#[test]
fn identifiers_are_quoted() {
    let mut t = spec_table("we\"ird", PartitionInterval::Yearly);
    t.premake = Some(0);
    t.default_partition = Some(false);
    let p = plan(
        &spec(vec![t]),
        &observed("2024-06-01T00:00:00Z", vec![("we\"ird", state("date"))]),
    );
    assert!(p.changes[0]
        .sql
        .starts_with(r#"CREATE TABLE "public"."we""ird_2024" PARTITION OF "public"."we""ird""#));
}

// ------------------------------------------------------------ default partition rows

fn with_rows_in_default(key_type: &str, rows: &[(&str, i64)]) -> TableState {
    let mut st = state(key_type);
    st.children.push(default_child("t"));
    st.children
        .push(ours("t", PartitionInterval::Monthly, "2024-03-01"));
    st.default_rows = Some(DefaultRows {
        total: 10,
        in_range: rows.iter().map(|(d, n)| (micros(date(d)), *n)).collect(),
    });
    st
}

const MOVE_APRIL: [&str; 8] = [
    r#"LOCK TABLE ONLY "public"."t" IN SHARE ROW EXCLUSIVE MODE"#,
    r#"LOCK TABLE "public"."t_default" IN ACCESS EXCLUSIVE MODE"#,
    r#"CREATE TABLE "public"."t_2024_04" (LIKE "public"."t" INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION)"#,
    "SET LOCAL session_replication_role = replica",
    r#"WITH moved AS (DELETE FROM "public"."t_default" WHERE "created_at" >= '2024-04-01 00:00:00+00' AND "created_at" < '2024-05-01 00:00:00+00' RETURNING "id", "created_at") INSERT INTO "public"."t_2024_04" ("id", "created_at") SELECT "id", "created_at" FROM moved"#,
    "SET LOCAL session_replication_role = DEFAULT",
    r#"ALTER TABLE "public"."t" ATTACH PARTITION "public"."t_2024_04" FOR VALUES FROM ('2024-04-01 00:00:00+00') TO ('2024-05-01 00:00:00+00')"#,
    r#"CREATE TABLE "public"."t_2024_05" PARTITION OF "public"."t" FOR VALUES FROM ('2024-05-01 00:00:00+00') TO ('2024-06-01 00:00:00+00')"#,
];

#[test]
fn rows_in_the_default_are_moved_in_one_transaction() {
    let st = with_rows_in_default("timestamp with time zone", &[("2024-04-01", 7)]);
    let s = spec(vec![spec_table("t", PartitionInterval::Monthly)]);
    let o = observed("2024-03-15T00:00:00Z", vec![("t", st)]);
    let p = plan(&s, &o);
    // The move shares its transaction with a CREATE … PARTITION OF (ACCESS EXCLUSIVE on
    // the parent): that lock comes first, so no lock is upgraded in the middle.
    let mut want = vec![r#"LOCK TABLE ONLY "public"."t" IN ACCESS EXCLUSIVE MODE"#];
    want.extend(MOVE_APRIL);
    assert_eq!(sqls(&p), want);
    assert_eq!(
        p.changes[5].summary,
        "move 7 row(s) from t_default into t_2024_04"
    );
    assert!(p.changes[5].reports_rows);
    // All in the table's one transaction: SET LOCAL never outlives it.
    assert!(p.changes.iter().all(|c| c.transactional));
    assert!(p.changes.iter().all(|c| c.group == p.changes[0].group));
    let after = simulate(&o, &diff(&s, &o, &mut AreaPlan::new(AREA)));
    assert_eq!(
        after.tables[&qn("t")].default_rows.as_ref().unwrap().total,
        3
    );
    assert!(plan(&s, &after).changes.is_empty());
}

#[test]
fn a_move_alone_locks_the_parent_share_row_exclusive_first_and_fires_nothing() {
    let st = with_rows_in_default("timestamp with time zone", &[("2024-04-01", 7)]);
    let mut t = spec_table("t", PartitionInterval::Monthly);
    t.premake = Some(1);
    let o = observed("2024-03-15T00:00:00Z", vec![("t", st)]);
    let p = plan(&spec(vec![t]), &o);
    assert_eq!(sqls(&p), MOVE_APRIL[..7].to_vec());
    // Writers wait on the parent, readers do not; the default (and the table attached)
    // are ACCESS EXCLUSIVE; the copy reads the parent's definition; rows move under
    // ROW EXCLUSIVE.
    let locks: Vec<LockLevel> = p.changes.iter().map(|c| c.lock).collect();
    assert_eq!(
        locks,
        [
            LockLevel::ShareRowExclusive,
            LockLevel::AccessExclusive,
            LockLevel::AccessShare,
            LockLevel::None,
            LockLevel::RowExclusive,
            LockLevel::None,
            LockLevel::AccessExclusive,
        ]
    );
    // The replica role covers exactly the move: set right before, reset right after.
    let sql = sqls(&p);
    let at = sql
        .iter()
        .position(|s| s.starts_with("WITH moved"))
        .unwrap();
    assert_eq!(sql[at - 1], "SET LOCAL session_replication_role = replica");
    assert_eq!(sql[at + 1], "SET LOCAL session_replication_role = DEFAULT");
    // The executor sends each change alone: each is exactly one statement.
    for c in &p.changes {
        crate::pg::grammar::check_one_statement(&c.sql)
            .unwrap_or_else(|e| panic!("{}: {e}", c.sql));
        assert!(c.transactional);
    }
}

#[test]
fn a_role_that_may_not_set_the_replication_role_is_refused_with_the_grant_that_fixes_it() {
    let st = with_rows_in_default("date", &[("2024-04-01", 7)]);
    let s = spec(vec![spec_table("t", PartitionInterval::Monthly)]);
    let mut o = observed("2024-03-15T00:00:00Z", vec![("t", st)]);
    o.can_set_replication_role = false;
    o.current_user = "app\"owner".into();
    let p = plan(&s, &o);
    assert!(p.changes.is_empty(), "{:?}", sqls(&p));
    assert_eq!(p.errors.len(), 1);
    let e = &p.errors[0];
    assert_eq!(e.reason, Reason::InsufficientPrivilege);
    assert!(
        e.message
            .contains(r#"GRANT SET ON PARAMETER session_replication_role TO "app""owner""#),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("7 row(s) of public.t_default"),
        "{}",
        e.message
    );
    // Before PostgreSQL 15 there is no such grant: a superuser is needed.
    o.server_version = 140_000;
    let p = plan(&s, &o);
    assert!(p.errors[0].message.contains("apply as a superuser"));
    assert!(!p.errors[0].message.contains("GRANT"));
    // Without rows to move the privilege is not needed.
    let mut o = observed(
        "2024-03-15T00:00:00Z",
        vec![("t", with_rows_in_default("date", &[]))],
    );
    o.can_set_replication_role = false;
    let p = plan(&s, &o);
    assert!(p.errors.is_empty());
    assert!(!p.changes.is_empty());
}

#[test]
fn a_trigger_that_fires_even_for_replicas_refuses_the_move() {
    let mut st = with_rows_in_default("date", &[("2024-05-01", 2)]);
    st.default_fires_on_delete = vec![r#"trigger "audit" (ENABLE ALWAYS)"#.into()];
    let s = spec(vec![spec_table("t", PartitionInterval::Monthly)]);
    let p = plan(
        &s,
        &observed("2024-03-15T00:00:00Z", vec![("t", st.clone())]),
    );
    assert!(p.changes.is_empty());
    assert_eq!(p.errors[0].reason, Reason::TriggerFiresOnMove);
    assert!(p.errors[0]
        .message
        .contains(r#"trigger "audit" (ENABLE ALWAYS)"#));
    assert!(p.errors[0].message.contains("[2024-05-01, 2024-06-01)"));
    // Such a trigger does not matter when nothing moves.
    st.default_rows = Some(DefaultRows::default());
    let p = plan(&s, &observed("2024-03-15T00:00:00Z", vec![("t", st)]));
    assert!(p.errors.is_empty());
}

// ------------------------------------------------------------ retention

fn daily_with_history(default: bool) -> (PartitionsSpec, Observed) {
    use PartitionInterval::Daily;
    let mut st = state("timestamp with time zone");
    let mut d = date("2024-02-01");
    while d <= date("2024-03-22") {
        st.children.push(ours("t", Daily, &d.to_string()));
        d = next(Daily, d);
    }
    if default {
        st.children.push(default_child("t"));
        st.default_rows = Some(DefaultRows::default());
    }
    let mut t = spec_table("t", Daily);
    t.premake = Some(7);
    t.retention = Some("30d".into());
    t.default_partition = Some(default);
    (
        spec(vec![t]),
        observed("2024-03-15T12:00:00Z", vec![("t", st)]),
    )
}

#[test]
fn retention_detaches_only_partitions_entirely_older_than_the_window() {
    let (s, o) = daily_with_history(true);
    let p = plan(&s, &o);
    // cutoff 2024-02-14 12:00: partitions ending on or before it go, i.e. 02-01 … 02-13.
    let detached: Vec<&str> = p.changes.iter().map(|c| c.summary.as_str()).collect();
    assert_eq!(detached.len(), 13, "{detached:#?}");
    assert!(detached[0].starts_with("detach t_2024_02_01 [2024-02-01, 2024-02-02)"));
    assert!(detached[12].starts_with("detach t_2024_02_13 "));
    // With a default partition, CONCURRENTLY is refused by PostgreSQL: plain, in the transaction.
    assert!(p
        .changes
        .iter()
        .all(|c| c.transactional && !c.sql.contains("CONCURRENTLY")));
    assert_eq!(
        p.changes[0].sql,
        r#"ALTER TABLE "public"."t" DETACH PARTITION "public"."t_2024_02_01""#
    );
    assert!(p
        .changes
        .iter()
        .all(|c| c.lock == LockLevel::AccessExclusive));
}

#[test]
fn without_a_default_detach_is_concurrent_and_runs_alone() {
    let (s, o) = daily_with_history(false);
    let p = plan(&s, &o);
    assert_eq!(p.changes.len(), 13);
    assert!(p
        .changes
        .iter()
        .all(|c| !c.transactional && c.sql.ends_with(" CONCURRENTLY")));
    // SHARE UPDATE EXCLUSIVE on the parent, but ACCESS EXCLUSIVE on the partition in the
    // second internal transaction: the level says the strongest. It waits for every
    // transaction using the table: the long-operation timeout, not the policy's.
    assert!(p
        .changes
        .iter()
        .all(|c| c.lock == LockLevel::AccessExclusive
            && c.timeout == Some(crate::engine::plan::OwnTimeout::LongOperation)));
    // Before PostgreSQL 14 there is no CONCURRENTLY.
    let mut old = o.clone();
    old.server_version = 130_010;
    assert!(plan(&s, &old).changes.iter().all(|c| c.transactional));
}

#[test]
fn drop_policy_drops_and_is_destructive() {
    let (mut s, o) = daily_with_history(true);
    s.tables[0].retention_policy = Some(RetentionPolicy::Drop);
    let p = plan(&s, &o);
    assert_eq!(p.changes.len(), 13);
    assert!(p.changes.iter().all(|c| c.hazard == Hazard::Destructive));
    assert!(p
        .changes
        .iter()
        .all(|c| c.lock == LockLevel::AccessExclusive));
    assert_eq!(p.changes[0].sql, r#"DROP TABLE "public"."t_2024_02_01""#);
}

#[test]
fn nothing_is_created_that_retention_would_retire() {
    let mut t = spec_table("t", PartitionInterval::Monthly);
    t.start_date = Some("2020-01-01".into());
    t.retention = Some("2mo".into());
    t.premake = Some(0);
    t.default_partition = Some(false);
    let o = observed("2024-03-15T00:00:00Z", vec![("t", state("date"))]);
    let p = plan(&spec(vec![t]), &o);
    // cutoff 2024-01-15: January still has rows inside the window.
    let names: Vec<&str> = p
        .changes
        .iter()
        .map(|c| c.summary.split(' ').nth(2).unwrap())
        .collect();
    assert_eq!(names, vec!["t_2024_01", "t_2024_02", "t_2024_03"]);
}

#[test]
fn interrupted_concurrent_detach_is_finalized() {
    let mut st = state("date");
    let mut c = ours("t", PartitionInterval::Yearly, "2024-01-01");
    c.detach_pending = true;
    st.children.push(c);
    st.children
        .push(ours("t", PartitionInterval::Yearly, "2025-01-01"));
    let mut t = spec_table("t", PartitionInterval::Yearly);
    t.premake = Some(0);
    t.default_partition = Some(false);
    let p = plan(
        &spec(vec![t]),
        &observed("2025-03-01T00:00:00Z", vec![("t", st)]),
    );
    assert_eq!(
        sqls(&p),
        vec![r#"ALTER TABLE "public"."t" DETACH PARTITION "public"."t_2024" FINALIZE"#]
    );
    assert!(!p.changes[0].transactional);
}

// ------------------------------------------------------------ partitions we did not name

#[test]
fn hand_made_partitions_are_reported_and_left_alone() {
    let mut st = state("date");
    st.children.push(default_child("t"));
    // Old, hand-made, outside the grid the policy needs: left alone, even past retention.
    st.children
        .push(child("t_archive", date("2000-01-01"), date("2020-01-01")));
    // Named like ours but with other bounds: not ours.
    st.children
        .push(child("t_2024_01", date("2024-01-01"), date("2024-01-16")));
    // Covers the whole of March (and more) under another name: March is not created.
    st.children
        .push(child("t_spring", date("2024-03-01"), date("2024-06-01")));
    let mut t = spec_table("t", PartitionInterval::Monthly);
    t.premake = Some(1);
    t.retention = Some("1mo".into());
    t.retention_policy = Some(RetentionPolicy::Drop);
    let p = plan(
        &spec(vec![t]),
        &observed("2024-03-15T00:00:00Z", vec![("t", st)]),
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(p.changes.is_empty(), "{:?}", sqls(&p));
    assert_eq!(p.notices.len(), 3);
    assert!(p
        .notices
        .iter()
        .all(|n| n.reason == Reason::PartitionNotManaged));
    assert!(p
        .notices
        .iter()
        .any(|n| n.message.contains("t_2024_01 [2024-01-01, 2024-01-16)")));
}

#[test]
fn a_hand_made_partition_overlapping_a_needed_range_is_an_error() {
    let mut st = state("date");
    st.children
        .push(child("t_mid", date("2024-03-10"), date("2024-04-10")));
    let p = plan(
        &spec(vec![spec_table("t", PartitionInterval::Monthly)]),
        &observed("2024-03-15T00:00:00Z", vec![("t", st)]),
    );
    assert!(p.changes.is_empty());
    assert_eq!(p.errors.len(), 1);
    assert_eq!(p.errors[0].reason, Reason::OverlappingPartition);
    assert_eq!(p.errors[0].target, "public.t");
    assert!(
        p.errors[0].message.contains("public.t_mid"),
        "{}",
        p.errors[0].message
    );
}

#[test]
fn minvalue_partitions_overlap_everything_before_them() {
    let mut st = state("date");
    st.children.push(Child {
        name: qn("t_before"),
        bound: Bound::Range {
            from: i64::MIN,
            to: micros(date("2024-03-20")),
        },
        detach_pending: false,
    });
    let p = plan(
        &spec(vec![spec_table("t", PartitionInterval::Monthly)]),
        &observed("2024-03-15T00:00:00Z", vec![("t", st)]),
    );
    assert_eq!(p.errors[0].reason, Reason::OverlappingPartition);
    assert!(p.errors[0].message.contains("[MINVALUE, 2024-03-20)"));
}

#[test]
fn a_detached_partition_in_the_way_of_a_current_range_is_an_error() {
    let mut st = state("date");
    st.other_relations.insert("t_2024_03".into());
    st.other_relations.insert("t_2024_01".into());
    let mut t = spec_table("t", PartitionInterval::Monthly);
    t.start_date = Some("2024-01-01".into());
    let p = plan(
        &spec(vec![t.clone()]),
        &observed("2024-03-15T00:00:00Z", vec![("t", st.clone())]),
    );
    assert_eq!(p.errors[0].reason, Reason::NameTaken);
    // A past range only: reported, skipped, the rest goes on.
    st.other_relations.remove("t_2024_03");
    let p = plan(
        &spec(vec![t]),
        &observed("2024-03-15T00:00:00Z", vec![("t", st)]),
    );
    assert!(p.errors.is_empty());
    assert_eq!(p.notices[0].reason, Reason::NameTaken);
    assert!(!sqls(&p).iter().any(|s| s.contains("t_2024_01")));
}

// ------------------------------------------------------------ bad input

#[test]
fn bad_tables_are_errors_naming_the_table_and_change_nothing_for_them() {
    let mut plain = state("date");
    plain.relkind = "r".into();
    plain.strategy = None;
    let mut list = state("date");
    list.strategy = Some("l".into());
    let mut hash = state("date");
    hash.strategy = Some("h".into());
    let text = state("text");
    let mut expr = state("date");
    expr.key_column = None;
    let mut mismatch_t = spec_table("mismatch", PartitionInterval::Monthly);
    mismatch_t.column = Some("other".into());
    let s = spec(vec![
        spec_table("missing", PartitionInterval::Monthly),
        spec_table("plain", PartitionInterval::Monthly),
        spec_table("list", PartitionInterval::Monthly),
        spec_table("hash", PartitionInterval::Monthly),
        spec_table("text", PartitionInterval::Monthly),
        spec_table("expr", PartitionInterval::Monthly),
        mismatch_t,
        spec_table("good", PartitionInterval::Monthly),
    ]);
    let o = observed(
        "2024-03-15T00:00:00Z",
        vec![
            ("plain", plain),
            ("list", list),
            ("hash", hash),
            ("text", text),
            ("expr", expr),
            ("mismatch", state("date")),
            ("good", state("date")),
        ],
    );
    let p = plan(&s, &o);
    let reasons: Vec<(&str, Reason)> = p
        .errors
        .iter()
        .map(|e| (e.target.as_str(), e.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("public.missing", Reason::TableNotFound),
            ("public.plain", Reason::NotPartitioned),
            ("public.list", Reason::UnsupportedPartitionStrategy),
            ("public.hash", Reason::UnsupportedPartitionStrategy),
            ("public.text", Reason::UnsupportedKeyType),
            ("public.expr", Reason::UnsupportedPartitionKey),
            ("public.mismatch", Reason::ColumnMismatch),
        ]
    );
    assert!(p.errors[2].message.contains("LIST"));
    assert!(p.changes.iter().all(|c| c.target == "public.good"));
}

#[test]
fn a_far_start_date_is_refused() {
    let mut t = spec_table("t", PartitionInterval::Daily);
    t.start_date = Some("1900-01-01".into());
    let p = plan(
        &spec(vec![t]),
        &observed("2024-03-15T00:00:00Z", vec![("t", state("date"))]),
    );
    assert_eq!(p.errors[0].reason, Reason::TooManyPartitions);
}

// ------------------------------------------------------------ status

#[test]
fn status_reports_partitions_bounds_default_rows_and_next_maintenance() {
    let (s, o) = daily_with_history(true);
    let st = status(&s, &o);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].table, "public.t");
    assert_eq!(st[0].partitions, 51);
    assert_eq!(st[0].oldest_bound.as_deref(), Some("2024-02-01"));
    assert_eq!(st[0].newest_bound.as_deref(), Some("2024-03-23"));
    assert_eq!(st[0].rows_in_default, Some(0));
    // The oldest partition is overdue: maintenance is due now.
    assert_eq!(
        st[0].next_maintenance.as_deref(),
        Some("2024-03-15T12:00:00Z")
    );
    let after = simulate(&o, &diff(&s, &o, &mut AreaPlan::new(AREA)));
    // Next: midnight, when premake moves on (02-14 ages out at 03-16 00:00 too).
    assert_eq!(
        status(&s, &after)[0].next_maintenance.as_deref(),
        Some("2024-03-16T00:00:00Z")
    );
}

// ------------------------------------------------------------ convergence

fn arb_interval() -> impl Strategy<Value = PartitionInterval> {
    prop::sample::select(vec![
        PartitionInterval::Daily,
        PartitionInterval::Weekly,
        PartitionInterval::Monthly,
        PartitionInterval::Quarterly,
        PartitionInterval::Yearly,
    ])
}

fn arb_case() -> impl Strategy<Value = (PartitionsSpec, Observed, i64)> {
    (
        arb_interval(),
        0u32..5,
        prop::option::of(0i64..800),
        prop::option::of(prop::sample::select(vec!["10d", "3w", "2mo", "1y"])),
        prop::bool::ANY,
        prop::bool::ANY,
        prop::bool::ANY,
        0i64..2000,
        prop::collection::vec((0i64..900, 0i64..5), 0..12),
        1i64..400,
    )
        .prop_map(
            |(
                interval,
                premake,
                start_back,
                retention,
                drop,
                want_default,
                has_default,
                now_days,
                existing,
                advance,
            )| {
                let now = at("2022-01-01T00:00:00Z")
                    + chrono::Duration::days(now_days)
                    + chrono::Duration::hours(now_days % 24);
                let t = PartitionedTable {
                    table: "t".into(),
                    interval,
                    premake: Some(premake),
                    start_date: start_back
                        .map(|b| (now.date_naive() - chrono::Duration::days(b)).to_string()),
                    default_partition: Some(want_default),
                    retention: retention.map(String::from),
                    retention_policy: Some(if drop {
                        RetentionPolicy::Drop
                    } else {
                        RetentionPolicy::Detach
                    }),
                    ..Default::default()
                };
                let mut st = state("timestamp with time zone");
                let mut rows = DefaultRows::default();
                for (back, n) in existing {
                    let start = floor(
                        interval,
                        now.date_naive() - chrono::Duration::days(back - 300),
                    );
                    let c = ours("t", interval, &start.to_string());
                    if st.children.iter().any(|x| x.name == c.name) {
                        continue;
                    }
                    if n > 0 && has_default && back % 2 == 0 {
                        // Rows in the default for a range that has no partition yet.
                        rows.in_range.insert(micros(start), n);
                        rows.total += n;
                    } else {
                        st.children.push(c);
                    }
                }
                if has_default {
                    st.children.push(default_child("t"));
                    st.default_rows = Some(rows);
                }
                let mut o = Observed::new(now);
                o.tables.insert(qn("t"), st);
                (spec(vec![t]), o, advance)
            },
        )
}

proptest! {
    /// Convergence: after applying a plan, planning again yields nothing to do; and so
    /// again after time passes and one more maintenance runs.
    #[test]
    fn applying_a_plan_converges((s, o, advance) in arb_case()) {
        let ledger = crate::engine::ledger::Ledger::default();
        let after = converges::<Partitions>(&s, &o, &ledger, |_, first| {
            prop_assert!(first.errors.is_empty(), "{:?}", first.errors);
            Ok(())
        })?;
        let mut later = after.clone();
        later.now = o.now + chrono::Duration::days(advance);
        converges::<Partitions>(&s, &later, &ledger, |_, _| Ok(()))?;
    }

    /// Safety: nothing retired holds rows inside the window, the default is never
    /// touched by retention, and every new partition is named by the grid.
    #[test]
    fn retention_never_reaches_into_the_window((s, o, _a) in arb_case()) {
        let t = &s.tables[0];
        let ops = diff(&s, &o, &mut AreaPlan::new(AREA));
        for op in &ops {
            match op {
                Op::Detach { range, partition, .. } | Op::Drop { range, partition, .. } => {
                    let r = parse_retention(t.retention.as_deref().unwrap()).unwrap();
                    prop_assert!(range.end.and_hms_opt(0, 0, 0).unwrap() <= cutoff(o.now, r));
                    prop_assert!(partition.name != default_name("t"));
                }
                Op::Create { partition, range, .. } | Op::CreateMovingRows { partition, range, .. } => {
                    prop_assert_eq!(partition, &partition_name("t", t.interval, range.start));
                    prop_assert_eq!(range.start, floor(t.interval, range.start));
                }
                _ => {}
            }
        }
        if t.retention_policy == Some(RetentionPolicy::Detach) {
            let drops = ops.iter().filter(|op| matches!(op, Op::Drop { .. })).count();
            prop_assert_eq!(drops, 0);
        }
    }
}

#[test]
fn one_transaction_per_table_and_never_too_many_locks_in_one() {
    let mut a = spec_table("a", PartitionInterval::Daily);
    a.start_date = Some("2024-01-01".into());
    a.premake = Some(0);
    let b = spec_table("b", PartitionInterval::Monthly);
    let o = observed(
        "2024-04-30T00:00:00Z",
        vec![("a", state("date")), ("b", state("date"))],
    );
    let p = plan(&spec(vec![a, b]), &o);
    let mut groups: Vec<(&str, &str, usize)> = Vec::new();
    for c in &p.changes {
        let g = c.group.as_deref().unwrap();
        match groups.last_mut() {
            Some((t, last, n)) if *last == g && *t == c.target => *n += 1,
            _ => groups.push((&c.target, g, 1)),
        }
    }
    // 121 days + a default for a: 50 + 50 + 22; 3 months + a default for b.
    let sizes: Vec<(&str, usize)> = groups.iter().map(|(t, _, n)| (*t, *n)).collect();
    assert_eq!(
        sizes,
        vec![
            ("public.a", 50),
            ("public.a", 50),
            ("public.a", 22),
            ("public.b", 4)
        ]
    );
    let distinct: BTreeSet<&str> = groups.iter().map(|(_, g, _)| *g).collect();
    assert_eq!(distinct.len(), 4);
}

#[test]
fn concurrent_detaches_come_after_every_tables_transaction() {
    let (s1, o1) = daily_with_history(false);
    let (s2, _) = daily_with_history(true);
    let mut s = s1.clone();
    let mut with_default = s2.tables[0].clone();
    with_default.table = "u".into();
    s.tables.push(with_default);
    let mut o = o1.clone();
    let mut u = o1.tables[&qn("t")].clone();
    for c in &mut u.children {
        c.name.name = c.name.name.replacen("t_", "u_", 1);
    }
    u.children.push(default_child("u"));
    u.default_rows = Some(DefaultRows::default());
    o.tables.insert(qn("u"), u);
    let p = plan(&s, &o);
    let first_autonomous = p.changes.iter().position(|c| !c.transactional).unwrap();
    assert!(p.changes[first_autonomous..]
        .iter()
        .all(|c| !c.transactional));
    assert!(p.changes[..first_autonomous]
        .iter()
        .all(|c| c.target == "public.u"));
}
