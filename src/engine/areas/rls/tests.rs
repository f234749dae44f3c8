use super::*;
use proptest::prelude::*;

fn plan(spec: &RowLevelSecuritySpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
    let whole = crate::api::DatabasePolicySpec::default();
    RowLevelSecurity::plan(spec, observed, &mut PlanContext::new(&whole, ledger))
}

const OWN: &str = "user_id = current_setting('app.current_user_id')::uuid";
const OWN_PG: &str = "(user_id = (current_setting('app.current_user_id'::text))::uuid)";

fn t(name: &str) -> QualifiedName {
    QualifiedName::new("public", name)
}

fn policy(name: &str, command: Option<PolicyCommand>, using: Option<&str>) -> RlsPolicy {
    RlsPolicy {
        name: name.into(),
        command,
        using: using.map(String::from),
        ..Default::default()
    }
}

fn table(name: &str, policies: Vec<RlsPolicy>) -> RlsTable {
    RlsTable {
        table: name.into(),
        policies,
        ..Default::default()
    }
}

fn spec(tables: Vec<RlsTable>) -> RowLevelSecuritySpec {
    RowLevelSecuritySpec { tables }
}

fn state(using: Option<&str>, with_check: Option<&str>) -> PolicyState {
    PolicyState {
        command: PolicyCommand::All,
        kind: PolicyKind::Permissive,
        roles: BTreeSet::from([PUBLIC.to_string()]),
        using: using.map(String::from),
        with_check: with_check.map(String::from),
    }
}

/// Tables that exist with RLS enabled (not forced) and the given policies; every
/// desired expression normalises to `OWN_PG` when it is `OWN`.
fn observed(tables: &[(&str, Vec<(&str, PolicyState)>)]) -> Observed {
    Observed {
        tables: tables
            .iter()
            .map(|(n, ps)| {
                (
                    t(n),
                    TableState {
                        relkind: "r".into(),
                        enabled: true,
                        force: false,
                        not_owned: false,
                        policies: ps.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                    },
                )
            })
            .collect(),
        roles: BTreeSet::from(["app".to_string(), "Admin Role".to_string()]),
        normalized: BTreeMap::new(),
        ..Default::default()
    }
}

fn with_normalized(mut o: Observed, table: &str, name: &str, n: Normalized) -> Observed {
    o.normalized.insert((t(table), name.into()), Ok(n));
    o
}

fn run(spec: &RowLevelSecuritySpec, o: &Observed) -> AreaPlan {
    plan(spec, o, &Ledger::for_policy("p"))
}

fn sqls(p: &AreaPlan) -> Vec<&str> {
    p.changes.iter().map(|c| c.sql.as_str()).collect()
}

#[test]
fn repairs_of_weakened_protection_are_told_apart() {
    // Hand changes that weaken: dropped, altered, added, RLS disabled and unforced.
    let mut tbl = table("up", vec![policy("own", None, Some(OWN))]);
    tbl.force = Some(true);
    let mut o = observed(&[("up", vec![("extra", state(Some("true"), None))])]);
    o.tables.get_mut(&t("up")).unwrap().enabled = false;
    let mut s = spec(vec![tbl]);
    s.tables[0].own_all_policies = Some(true);
    let p = run(&s, &o);
    assert!(p.changes.len() >= 4, "{:?}", sqls(&p));
    for c in &p.changes {
        assert!(repairs_weakened_security(c), "{}", c.sql);
    }
    let altered = with_normalized(
        observed(&[("up", vec![("own", state(Some("true"), None))])]),
        "up",
        "own",
        Normalized {
            using: Some(OWN_PG.into()),
            with_check: None,
        },
    );
    let p = run(
        &spec(vec![table("up", vec![policy("own", None, Some(OWN))])]),
        &altered,
    );
    assert!(!p.changes.is_empty());
    assert!(
        p.changes.iter().all(repairs_weakened_security),
        "{:?}",
        sqls(&p)
    );

    // The spec turning protection off: not a weakening repaired.
    let mut off = table("up", vec![]);
    off.enabled = Some(false);
    let mut o = observed(&[("up", vec![])]);
    o.tables.get_mut(&t("up")).unwrap().force = true;
    let p = run(&spec(vec![off]), &o);
    assert_eq!(p.changes.len(), 2, "{:?}", sqls(&p));
    assert!(
        !p.changes.iter().any(repairs_weakened_security),
        "{:?}",
        sqls(&p)
    );
    let other = Change::new(Area::FeatureFlags, "f", "set", "CREATE POLICY x ON y");
    assert!(!repairs_weakened_security(&other));
}

#[test]
fn creates_policy_then_enables_and_forces() {
    let mut tbl = table("up", vec![policy("own", None, Some(OWN))]);
    tbl.force = Some(true);
    let mut o = observed(&[("up", vec![])]);
    o.tables.get_mut(&t("up")).unwrap().enabled = false;
    let p = run(&spec(vec![tbl]), &o);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(
        sqls(&p),
        vec![
            format!(r#"CREATE POLICY "own" ON "public"."up" AS PERMISSIVE FOR ALL TO PUBLIC USING ({OWN})"#).as_str(),
            r#"ALTER TABLE "public"."up" ENABLE ROW LEVEL SECURITY"#,
            r#"ALTER TABLE "public"."up" FORCE ROW LEVEL SECURITY"#,
        ]
    );
    assert!(p
        .changes
        .iter()
        .all(|c| c.hazard == Hazard::Locking && c.transactional));
    // CREATE POLICY and ENABLE/FORCE ROW LEVEL SECURITY: ACCESS EXCLUSIVE on the table.
    assert!(p
        .changes
        .iter()
        .all(|c| c.lock == LockLevel::AccessExclusive && c.timeout.is_none()));
    assert_eq!(p.changes[0].ledger.len(), 1, "a created policy is recorded");
}

#[test]
fn every_part_of_create_is_rendered_and_quoted() {
    let mut pol = policy("we\"ird", Some(PolicyCommand::Update), Some("a = 1"));
    pol.kind = Some(PolicyKind::Restrictive);
    pol.roles = Some(vec!["Admin Role".into(), "app".into(), "PUBLIC".into()]);
    pol.with_check = Some("b = 2".into());
    let mut tbl = table("T x", vec![pol]);
    tbl.schema = Some("s".into());
    let mut o = observed(&[]);
    o.tables.insert(
        QualifiedName::new("s", "T x"),
        TableState {
            relkind: "p".into(),
            enabled: true,
            ..Default::default()
        },
    );
    let p = run(&spec(vec![tbl]), &o);
    assert_eq!(
        sqls(&p),
        vec![
            r#"CREATE POLICY "we""ird" ON "s"."T x" AS RESTRICTIVE FOR UPDATE TO "Admin Role", "app", PUBLIC USING (a = 1) WITH CHECK (b = 2)"#
        ]
    );
}

#[test]
fn a_table_mentioned_in_its_expression_is_told_apart() {
    assert!(mentions("id IN (SELECT id FROM a)", "a"));
    assert!(mentions("EXISTS (SELECT 1 FROM public.\"Notes\")", "notes"));
    assert!(!mentions("current_setting('app.user_id') AND x", "a"));
    assert!(!mentions("table_a = 1", "a"));
    assert!(mentions("ÉTÉ = 1 AND x = 1", "x"));
    assert!(mentions("été = 1", "ÉTÉ"));
}

/// The ASCII path of `mentions` answers as lower-casing copies and `match_indices` did,
/// on every text and name of up to 5 and 2 letters from an alphabet with word and non-word
/// characters of both cases (non-overlapping matches included).
#[test]
fn mentions_without_copies_answers_as_before() {
    fn reference(text: &str, name: &str) -> bool {
        let (text, name) = (text.to_lowercase(), name.to_lowercase());
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
        text.match_indices(&name).any(|(i, m)| {
            !word(text[..i].chars().next_back()) && !word(text[i + m.len()..].chars().next())
        })
    }
    fn all(alphabet: &[char], up_to: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..up_to {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            out.extend(last.iter().cloned());
        }
        out
    }
    let texts = all(&['a', 'A', '_', ' ', '.', '$'], 5);
    let names = all(&['a', 'A', '_'], 2);
    for text in &texts {
        for name in &names {
            assert_eq!(
                mentions(text, name),
                reference(text, name),
                "{text:?} {name:?}"
            );
        }
    }
}

#[test]
fn the_cache_answers_only_a_policy_at_the_recorded_version() {
    let item = (t("up"), "own".to_string());
    let other = (t("up"), "other".to_string());
    let keys = BTreeMap::from([
        (item.clone(), "k".to_string()),
        (other.clone(), "k2".to_string()),
    ]);
    let row = |using: &str, version: Option<&str>| {
        std::collections::HashMap::from([(
            "k".to_string(),
            normcache::Cached {
                using: Some(using.into()),
                with_check: None,
                version: version.map(String::from),
            },
        )])
    };
    let versions = Versions::from([(item.clone(), (1, "1:100".to_string()))]);
    let (hits, misses) = use_cache(&keys, &row(OWN_PG, Some("1:100")), &versions);
    // The recorded form is both the desired one and what the catalog shows.
    assert_eq!(
        hits,
        BTreeMap::from([(
            item.clone(),
            Normalized {
                using: Some(OWN_PG.into()),
                with_check: None
            }
        )])
    );
    assert_eq!(misses, BTreeSet::from([other.clone()]), "no row, no policy");
    for (cached, versions, why) in [
        (
            row(OWN_PG, Some("1:101")),
            &versions,
            "the policy changed since",
        ),
        (
            row(OWN_PG, Some("1:100")),
            &Versions::from([(item.clone(), (1, "1:100:2200.\"m\".\"uid\"".to_string()))]),
            "a name it refers to changed since",
        ),
        (row(OWN_PG, None), &versions, "no version"),
        (
            row(OWN_PG, Some("1:100")),
            &Versions::new(),
            "no such policy",
        ),
        (Default::default(), &versions, "no row"),
    ] {
        let (hits, misses) = use_cache(&keys, &cached, versions);
        assert!(hits.is_empty(), "{why}");
        assert!(misses.contains(&item), "{why}");
    }
}

#[test]
fn policies_the_cache_does_not_answer_are_read_at_the_version_the_catalog_showed() {
    use super::observe::{fill_answered, place_expressions};
    let mut o = observed(&[(
        "up",
        vec![("own", state(None, None)), ("extra", state(None, None))],
    )]);
    let own = (t("up"), "own".to_string());
    let extra = (t("up"), "extra".to_string());
    let versions = Versions::from([
        (own.clone(), (1, "1:100".to_string())),
        (extra.clone(), (2, "2:100".to_string())),
    ]);
    let hits = Answered::from([(
        own.clone(),
        Normalized {
            using: Some(OWN_PG.into()),
            with_check: None,
        },
    )]);
    // The cache's form for the policy it answers; the other is to be read, by OID.
    let unread = fill_answered(&mut o.tables, &hits, &versions);
    assert_eq!(unread, vec![(2, extra.clone())]);
    assert_eq!(
        o.tables[&t("up")].policies["own"].using.as_deref(),
        Some(OWN_PG)
    );

    let mut read = o.clone();
    place_expressions(
        &mut read.tables,
        &versions,
        unread.clone(),
        vec![(2, "2:100".into(), Some("true".into()), None)],
    )
    .expect("read at the version seen");
    assert_eq!(
        read.tables[&t("up")].policies["extra"].using.as_deref(),
        Some("true")
    );

    // Altered, or dropped, between the catalog query and this read: an error that names it.
    for (rows, why) in [
        (
            vec![(2, "2:101".to_string(), Some("false".to_string()), None)],
            "altered since",
        ),
        (vec![], "dropped since"),
    ] {
        let e = place_expressions(&mut o.clone().tables, &versions, unread.clone(), rows)
            .expect_err(why);
        assert!(
            e.to_string()
                .contains("policy \"extra\" on \"public\".\"up\" changed while it was being read"),
            "{why}: {e}"
        );
    }
}

#[test]
fn normalised_expression_is_not_drift() {
    let s = spec(vec![table("up", vec![policy("own", None, Some(OWN))])]);
    let o = observed(&[("up", vec![("own", state(Some(OWN_PG), None))])]);
    // Without normalisation, the text PostgreSQL shows differs from the spec's…
    assert_eq!(run(&s, &o).changes.len(), 1);
    // …with it, nothing to do.
    let o = with_normalized(
        o,
        "up",
        "own",
        Normalized {
            using: Some(OWN_PG.into()),
            with_check: None,
        },
    );
    let p = run(&s, &o);
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert!(p.errors.is_empty());
}

#[test]
fn changed_expression_or_roles_is_altered_in_place() {
    let mut pol = policy("own", None, Some("a = 2"));
    pol.roles = Some(vec!["app".into()]);
    pol.with_check = Some("b = 1".into());
    let s = spec(vec![table("up", vec![pol])]);
    let o = observed(&[("up", vec![("own", state(Some("a = 1"), Some("b = 1")))])]);
    let p = run(&s, &o);
    assert_eq!(
        sqls(&p),
        vec![r#"ALTER POLICY "own" ON "public"."up" TO "app" USING (a = 2)"#]
    );
    assert_eq!(
        p.changes[0].summary,
        r#"alter policy own: roles to "app", USING"#
    );
    assert_eq!(p.changes[0].hazard, Hazard::Locking);
}

#[test]
fn added_with_check_is_altered_in_place() {
    let mut pol = policy("own", None, Some("a = 1"));
    pol.with_check = Some("b = 1".into());
    let s = spec(vec![table("up", vec![pol])]);
    let o = observed(&[("up", vec![("own", state(Some("a = 1"), None))])]);
    assert_eq!(
        sqls(&run(&s, &o)),
        vec![r#"ALTER POLICY "own" ON "public"."up" WITH CHECK (b = 1)"#]
    );
}

#[test]
fn command_kind_or_removed_clause_is_dropped_and_recreated_in_one_group() {
    let cases: Vec<(RlsPolicy, &str)> = vec![
        (
            policy("own", Some(PolicyCommand::Select), Some("a = 1")),
            "command All → Select",
        ),
        (
            RlsPolicy {
                kind: Some(PolicyKind::Restrictive),
                ..policy("own", None, Some("a = 1"))
            },
            "Permissive → Restrictive",
        ),
        (policy("own", None, Some("a = 1")), "remove WITH CHECK"),
    ];
    for (pol, why) in cases {
        let s = spec(vec![table("up", vec![pol])]);
        let o = observed(&[("up", vec![("own", state(Some("a = 1"), Some("b = 1")))])]);
        let p = run(&s, &o);
        assert_eq!(p.changes.len(), 2, "{why}: {:?}", p.changes);
        assert_eq!(p.changes[0].sql, r#"DROP POLICY "own" ON "public"."up""#);
        assert!(
            p.changes[0].summary.contains(why),
            "{}",
            p.changes[0].summary
        );
        assert!(p.changes[1]
            .sql
            .starts_with(r#"CREATE POLICY "own" ON "public"."up""#));
        // Not destructive (the executor would refuse the DROP and keep the CREATE),
        // transactional and of one area: the executor runs both in one transaction.
        for c in &p.changes {
            assert_eq!(c.hazard, Hazard::Locking);
            assert_eq!(c.lock, LockLevel::AccessExclusive);
            assert!(c.transactional);
            assert_eq!(c.area, AREA);
        }
    }
}

#[test]
fn unlisted_policies_are_left_alone_unless_owned_all() {
    let s = spec(vec![table("up", vec![policy("own", None, Some("a = 1"))])]);
    let o = observed(&[(
        "up",
        vec![
            ("own", state(Some("a = 1"), None)),
            ("theirs", state(Some("true"), None)),
        ],
    )]);
    assert!(run(&s, &o).changes.is_empty());

    let mut s = s;
    s.tables[0].own_all_policies = Some(true);
    let p = run(&s, &o);
    assert_eq!(sqls(&p), vec![r#"DROP POLICY "theirs" ON "public"."up""#]);
    assert_eq!(p.changes[0].hazard, Hazard::Destructive);
    assert_eq!(p.changes[0].lock, LockLevel::AccessExclusive);
    assert_eq!(
        p.changes[0].ledger.len(),
        1,
        "a dropped policy is forgotten"
    );
}

#[test]
fn policy_created_by_dbpolicy_and_unlisted_is_a_notice() {
    let s = spec(vec![table("up", vec![])]);
    let o = observed(&[("up", vec![("old", state(Some("true"), None))])]);
    let mut ledger = Ledger::for_policy("p");
    ledger.insert(AREA, "public.up", "old", "p");
    let p = plan(&s, &o, &ledger);
    assert!(p.changes.is_empty());
    assert_eq!(p.notices.len(), 1);
    assert_eq!(p.notices[0].reason, Reason::PolicyNoLongerListed);
    assert_eq!(p.notices[0].target, "public.up policy old");
}

#[test]
fn disable_and_no_force() {
    let mut tbl = table("up", vec![]);
    tbl.enabled = Some(false);
    let mut o = observed(&[("up", vec![])]);
    o.tables.get_mut(&t("up")).unwrap().force = true;
    assert_eq!(
        sqls(&run(&spec(vec![tbl]), &o)),
        vec![
            r#"ALTER TABLE "public"."up" DISABLE ROW LEVEL SECURITY"#,
            r#"ALTER TABLE "public"."up" NO FORCE ROW LEVEL SECURITY"#,
        ]
    );
}

#[test]
fn missing_table_view_and_role_are_errors_naming_table_and_policy() {
    let mut pol = policy("own", None, Some("true"));
    pol.roles = Some(vec!["ghost".into(), "app".into()]);
    let s = spec(vec![
        table("nope", vec![policy("a", None, Some("true"))]),
        table("v", vec![]),
        table("up", vec![pol]),
    ]);
    let mut o = observed(&[("up", vec![]), ("v", vec![])]);
    o.tables.get_mut(&t("v")).unwrap().relkind = "v".into();
    let p = run(&s, &o);
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    let got: Vec<(Reason, &str)> = p
        .errors
        .iter()
        .map(|e| (e.reason, e.target.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (Reason::TableNotFound, "public.nope"),
            (Reason::NotATable, "public.v"),
            (Reason::RoleNotFound, "public.up policy own"),
        ]
    );
    assert!(p.errors[2].message.contains("\"ghost\""));
    assert!(p.errors[2].message.contains("does not create roles"));
}

#[test]
fn empty_roles_list_is_an_error() {
    let mut pol = policy("own", None, Some("true"));
    pol.roles = Some(vec![]);
    let p = run(
        &spec(vec![table("up", vec![pol])]),
        &observed(&[("up", vec![])]),
    );
    assert_eq!(p.errors[0].reason, Reason::InvalidRoles);
}

#[test]
fn public_in_any_case_is_public() {
    let mut pol = policy("own", None, Some("true"));
    pol.roles = Some(vec!["Public".into()]);
    let s = spec(vec![table("up", vec![pol])]);
    let o = observed(&[("up", vec![("own", state(Some("true"), None))])]);
    let p = run(&s, &o);
    assert!(p.errors.is_empty() && p.changes.is_empty(), "{p:?}");
}

#[test]
fn postgres_refusals_become_errors_with_its_message() {
    let s = spec(vec![
        table(
            "up",
            vec![
                policy("col", None, Some("nosuch = 1")),
                policy("typ", None, Some("1")),
                policy("fine", None, Some("true")),
            ],
        ),
        table("other", vec![policy("x", None, Some("true"))]),
    ]);
    let mut o = observed(&[("up", vec![]), ("other", vec![])]);
    o.normalized.insert(
        (t("up"), "col".into()),
        Err(ExpressionError {
            sqlstate: Some("42703".into()),
            message: "column \"nosuch\" does not exist".into(),
        }),
    );
    o.normalized.insert(
        (t("up"), "typ".into()),
        Err(ExpressionError {
            sqlstate: Some("42804".into()),
            message: "argument of USING must be type boolean, not type integer".into(),
        }),
    );
    let p = run(&s, &o);
    assert_eq!(p.errors.len(), 2);
    assert_eq!(p.errors[0].reason, Reason::ColumnNotFound);
    assert_eq!(p.errors[0].target, "public.up policy col");
    assert_eq!(
        p.errors[0].message,
        "column \"nosuch\" does not exist (SQLSTATE 42703)"
    );
    assert_eq!(p.errors[1].reason, Reason::InvalidPolicyExpression);
    // No change for the table in error, not even for its valid policy; other tables
    // are planned (but a plan with errors is not applied).
    assert!(p.changes.iter().all(|c| c.target == "public.other"));
    assert_eq!(p.changes.len(), 1);
}

#[test]
fn clauses_read_back_differently_are_an_error() {
    let s = spec(vec![table("up", vec![policy("own", None, Some("a = 1"))])]);
    let o = with_normalized(
        observed(&[("up", vec![])]),
        "up",
        "own",
        Normalized {
            using: Some("(a = 1)".into()),
            with_check: Some("false".into()),
        },
    );
    assert_eq!(
        run(&s, &o).errors[0].reason,
        Reason::InvalidPolicyExpression
    );
}

#[test]
fn text_that_is_not_one_expression_is_refused_before_postgres_sees_it() {
    for bad in [
        "true) WITH CHECK (false",
        "true; DROP TABLE up",
        "(true",
        "true -- x\r); DROP TABLE up; --",
        "'unterminated",
        // Without E, a backslash does not escape: the quote ends the literal.
        "'\\') ; DROP TABLE up; --'",
        "xe'\\') ; DROP TABLE up; --'",
        "/* open",
        "   ",
    ] {
        let s = spec(vec![table("up", vec![policy("own", None, Some(bad))])]);
        let p = run(&s, &observed(&[("up", vec![])]));
        assert!(p.changes.is_empty(), "{bad:?} was accepted");
        assert_eq!(
            p.errors[0].reason,
            Reason::InvalidPolicyExpression,
            "{bad:?}"
        );
        assert!(p.errors[0].message.starts_with("using: "), "{bad:?}");
    }
}

#[test]
fn comments_are_refused() {
    let s = spec(vec![table(
        "up",
        vec![policy("own", None, Some("true -- all"))],
    )]);
    let p = run(&s, &observed(&[("up", vec![])]));
    assert!(p.changes.is_empty());
    assert_eq!(p.errors[0].reason, Reason::InvalidPolicyExpression);
}

/// The controller's executor needs the engine's future to be `Send` for every
/// lifetime; `raw_sql` (an `async fn` generic over the executor) would break that.
#[allow(dead_code)]
fn observe_is_send(url: String, spec: RowLevelSecuritySpec) {
    fn is_send<T: Send>(_: T) {}
    is_send(async move {
        let mut conn = crate::pg::connect_one(&url).await.unwrap();
        let _ = observe(&mut conn, &spec).await;
    });
}

// ---------------------------------------------------------------- convergence

const NAMES: [&str; 3] = ["p", "q", "r"];
const ROLES: [&str; 3] = [PUBLIC, "app", "Admin Role"];
const EXPRS: [&str; 3] = ["a = 1", "b = 2", OWN];

/// What PostgreSQL would store for an expression of `EXPRS`.
fn pg_form(e: &str) -> String {
    format!("({e})")
}

fn arb_command() -> impl Strategy<Value = PolicyCommand> {
    prop::sample::select(vec![
        PolicyCommand::All,
        PolicyCommand::Select,
        PolicyCommand::Insert,
        PolicyCommand::Update,
        PolicyCommand::Delete,
    ])
}

fn arb_kind() -> impl Strategy<Value = PolicyKind> {
    prop::sample::select(vec![PolicyKind::Permissive, PolicyKind::Restrictive])
}

fn arb_roles() -> impl Strategy<Value = BTreeSet<String>> {
    prop::collection::btree_set(prop::sample::select(ROLES.to_vec()), 1..3)
        .prop_map(|s| s.into_iter().map(String::from).collect())
}

fn arb_expr() -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(prop::sample::select(EXPRS.to_vec()))
}

/// A valid spec policy: the clauses its command accepts, at least one.
fn arb_policy() -> impl Strategy<Value = RlsPolicy> {
    (
        prop::sample::select(NAMES.to_vec()),
        prop::option::of(arb_command()),
        prop::option::of(arb_kind()),
        prop::option::of(arb_roles()),
        arb_expr(),
        arb_expr(),
    )
        .prop_map(|(name, command, kind, roles, using, check)| {
            let cmd = command.unwrap_or_default();
            let (using, check) = match cmd {
                PolicyCommand::Insert => (None, Some(check.or(using).unwrap_or("true"))),
                PolicyCommand::Select | PolicyCommand::Delete => {
                    (Some(using.or(check).unwrap_or("true")), None)
                }
                _ if using.is_none() && check.is_none() => (Some("true"), None),
                _ => (using, check),
            };
            RlsPolicy {
                name: name.into(),
                command,
                kind,
                roles: roles.map(|r| r.into_iter().collect()),
                using: using.map(String::from),
                with_check: check.map(String::from),
            }
        })
}

fn arb_table() -> impl Strategy<Value = RlsTable> {
    (
        prop::sample::select(vec!["a", "b"]),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::collection::vec(arb_policy(), 0..4),
    )
        .prop_map(|(name, enabled, force, own_all, policies)| {
            let mut seen = BTreeSet::new();
            RlsTable {
                schema: None,
                table: name.into(),
                enabled,
                force,
                own_all_policies: own_all,
                policies: policies
                    .into_iter()
                    .filter(|p| seen.insert(p.name.clone()))
                    .collect(),
            }
        })
}

fn arb_state() -> impl Strategy<Value = PolicyState> {
    (
        arb_command(),
        arb_kind(),
        arb_roles(),
        prop::option::of(prop::sample::select(EXPRS.to_vec())),
        prop::option::of(prop::sample::select(EXPRS.to_vec())),
    )
        .prop_map(|(command, kind, roles, using, check)| PolicyState {
            command,
            kind,
            roles,
            using: using.map(pg_form),
            with_check: check.map(pg_form),
        })
}

fn arb_observed() -> impl Strategy<Value = Observed> {
    let table = (
        any::<bool>(),
        any::<bool>(),
        prop::collection::btree_map(
            prop::sample::select(vec!["p", "q", "r", "s"]).prop_map(String::from),
            arb_state(),
            0..4,
        ),
    )
        .prop_map(|(enabled, force, policies)| TableState {
            relkind: "r".into(),
            enabled,
            force,
            not_owned: false,
            policies,
        });
    prop::collection::btree_map(prop::sample::select(vec!["a", "b"]), table, 0..3).prop_map(|m| {
        Observed {
            tables: m.into_iter().map(|(n, s)| (t(n), s)).collect(),
            roles: ROLES.iter().map(|r| r.to_string()).collect(),
            normalized: BTreeMap::new(),
            ..Default::default()
        }
    })
}

/// What the observer reads back for the spec: each expression in PostgreSQL's form.
fn normalise_all(spec: &RowLevelSecuritySpec, o: &mut Observed) {
    for tbl in &spec.tables {
        for p in &tbl.policies {
            o.normalized.insert(
                (tbl.qualified(), p.name.clone()),
                Ok(Normalized {
                    using: p.using.as_deref().map(pg_form),
                    with_check: p.with_check.as_deref().map(pg_form),
                }),
            );
        }
    }
}

proptest! {
    /// Convergence: after applying a plan, planning again yields nothing to do, and
    /// the catalog holds exactly the spec's policies (and, when owning all, no other).
    #[test]
    fn applying_a_plan_converges(tables in prop::collection::vec(arb_table(), 0..3), obs in arb_observed()) {
        let mut seen = BTreeSet::new();
        let tables: Vec<_> = tables.into_iter().filter(|t| seen.insert(t.table.clone())).collect();
        let spec = RowLevelSecuritySpec { tables };
        let mut obs = obs;
        normalise_all(&spec, &mut obs);
        let ledger = Ledger::for_policy("p");
        let after = crate::engine::areas::convergence::converges::<RowLevelSecurity>(&spec, &obs, &ledger, |_, _| Ok(()))?;
        for tbl in &spec.tables {
            let Some(state) = after.tables.get(&tbl.qualified()) else { continue };
            prop_assert_eq!(state.enabled, tbl.enabled.unwrap_or(true));
            prop_assert_eq!(state.force, tbl.force.unwrap_or(false));
            for p in &tbl.policies {
                let have = &state.policies[&p.name];
                prop_assert_eq!(have.command, p.command.unwrap_or_default());
                prop_assert_eq!(have.kind, p.kind.unwrap_or_default());
                prop_assert_eq!(&have.using, &p.using.as_deref().map(pg_form));
                prop_assert_eq!(&have.with_check, &p.with_check.as_deref().map(pg_form));
            }
            if tbl.own_all_policies == Some(true) {
                prop_assert_eq!(state.policies.len(), tbl.policies.len());
            }
        }
    }

    /// Destructive changes are only ever drops of unlisted policies of owned tables;
    /// drop-and-recreate pairs are adjacent.
    #[test]
    fn only_pruning_is_destructive(tables in prop::collection::vec(arb_table(), 0..3), obs in arb_observed()) {
        let mut seen = BTreeSet::new();
        let tables: Vec<_> = tables.into_iter().filter(|t| seen.insert(t.table.clone())).collect();
        let spec = RowLevelSecuritySpec { tables };
        let mut obs = obs;
        normalise_all(&spec, &mut obs);
        let p = plan(&spec, &obs, &Ledger::for_policy("p"));
        for (i, c) in p.changes.iter().enumerate() {
            if c.hazard == Hazard::Destructive {
                prop_assert!(c.summary.contains("ownAllPolicies"));
            }
            if c.summary.contains("to recreate it") {
                prop_assert!(p.changes[i + 1].sql.starts_with("CREATE POLICY"));
            }
        }
    }
}
