//! Property tests for panics, through the public API: the policy parser on arbitrary and
//! mutated YAML, and the pure planners on arbitrary specs against arbitrary observations.
//! Neither may panic; what the planners return must stay well formed. No database.
//!
//! `PROPTEST_CASES=5000 cargo test --test fuzz` searches longer than CI does.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};

use dbpolicy::api::{validate_spec, DatabasePolicySpec, PolicyCommand, PolicyKind};
use dbpolicy::cli::parse_policies;
use dbpolicy::engine::areas::{
    autovacuum, feature_flags, indexes, matviews, partitions, rls, server_settings,
};
use dbpolicy::engine::{self, Area, Ledger, Observed};
use dbpolicy::pg::QualifiedName;

const CERTQUIZ: &str = include_str!("../examples/certquiz/policy.yaml");
const HEADER: &str =
    "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {name: fuzz}\n";

/// `PROPTEST_CASES` when set (an explicit `cases` would otherwise override it), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------------------------- parser

/// Parsing returns Ok or Err; an Ok policy can be validated and its spec planned against
/// an empty database.
fn parse_never_panics(text: &str) {
    if let Ok((policies, _)) = parse_policies(text) {
        for p in policies {
            if validate_spec(&p.spec).is_empty() {
                let _ = engine::plan(&p.spec, &Observed::default());
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    DuplicateLine { at: usize },
    SwapLines { a: usize, b: usize },
    Reindent { at: usize, by: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let fragment = prop_oneof![
        Just(":".to_string()),
        Just("- ".to_string()),
        Just("\n".to_string()),
        Just("\t".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("{".to_string()),
        Just("]".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("!!binary ".to_string()),
        Just("---\n".to_string()),
        Just("~".to_string()),
        Just("1e999".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("\u{feff}".to_string()),
        Just("ä€😀".to_string()),
        "[ -~]{1,8}",
    ];
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), fragment).prop_map(|(at, text)| Mutation::Insert { at, text }),
        any::<usize>().prop_map(|at| Mutation::DuplicateLine { at }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
        (any::<usize>(), 0usize..6).prop_map(|(at, by)| Mutation::Reindent { at, by }),
    ]
}

fn char_boundary(s: &str, at: usize) -> usize {
    let mut i = at % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut s = text.to_string();
    for m in mutations {
        match m {
            Mutation::Delete { at, len } => {
                let from = char_boundary(&s, *at);
                let to = char_boundary(&s, (from + len).min(s.len()));
                s.replace_range(from..to.max(from), "");
            }
            Mutation::Insert { at, text } => {
                let at = char_boundary(&s, *at);
                s.insert_str(at, text);
            }
            Mutation::DuplicateLine { at } | Mutation::Reindent { at, .. } => {
                let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
                if lines.is_empty() {
                    continue;
                }
                let i = at % lines.len();
                match m {
                    Mutation::Reindent { by, .. } => {
                        let line = lines[i].trim_start().to_string();
                        lines[i] = format!("{}{line}", " ".repeat(*by));
                    }
                    _ => {
                        let line = lines[i].clone();
                        lines.insert(i, line);
                    }
                }
                s = lines.join("\n");
            }
            Mutation::SwapLines { a, b } => {
                let mut lines: Vec<&str> = s.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let n = lines.len();
                lines.swap(a % n, b % n);
                s = lines.join("\n");
            }
        }
    }
    s
}

/// Arbitrary YAML values, to put under `spec` where typed fields are expected.
fn yaml_value() -> impl Strategy<Value = serde_yaml::Value> {
    let leaf = prop_oneof![
        Just(serde_yaml::Value::Null),
        any::<bool>().prop_map(serde_yaml::Value::from),
        any::<i64>().prop_map(serde_yaml::Value::from),
        any::<f64>().prop_map(serde_yaml::Value::from),
        "[a-zA-Z]{0,12}".prop_map(serde_yaml::Value::from),
        prop::sample::select(vec![
            "database",
            "connectionSecretRef",
            "name",
            "tables",
            "table",
            "policies",
            "flags",
            "parameters",
            "autovacuum",
            "rowLevelSecurity",
            "featureFlags",
            "partitions",
            "indexes",
            "Apply",
            "Plan",
            "Monthly",
            "Insert",
            "5s",
            "30d",
            "enabled",
            "using",
        ])
        .prop_map(serde_yaml::Value::from),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_yaml::Value::Sequence),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "database",
                        "connectionSecretRef",
                        "name",
                        "key",
                        "mode",
                        "safety",
                        "lockTimeout",
                        "autovacuum",
                        "tables",
                        "table",
                        "schema",
                        "vacuumThreshold",
                        "rowLevelSecurity",
                        "policies",
                        "using",
                        "withCheck",
                        "command",
                        "featureFlags",
                        "flags",
                        "enabled",
                        "rolloutPercentage",
                        "partitions",
                        "interval",
                        "premake",
                        "retention",
                        "serverSettings",
                        "parameters",
                        "indexes",
                        "columns",
                        "where",
                        "materializedViews",
                        "views",
                        "definition",
                        "backups",
                        "storage",
                        "replicas",
                        "unknown",
                    ]),
                    inner,
                ),
                0..6,
            )
            .prop_map(|entries| {
                let mut map = serde_yaml::Mapping::new();
                for (k, v) in entries {
                    map.insert(serde_yaml::Value::from(k), v);
                }
                serde_yaml::Value::Mapping(map)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn the_parser_never_panics_on_arbitrary_text(text in "(?s).{0,400}") {
        parse_never_panics(&text);
        parse_never_panics(&format!("{HEADER}spec:\n{text}"));
    }

    #[test]
    fn the_parser_never_panics_on_mutated_policies(mutations in prop::collection::vec(mutation(), 1..8)) {
        parse_never_panics(&mutate(CERTQUIZ, &mutations));
    }

    #[test]
    fn the_parser_never_panics_on_arbitrary_yaml_structure(spec in yaml_value(), extra in yaml_value()) {
        let mut doc = serde_yaml::to_string(&serde_yaml::Value::from(
            serde_yaml::Mapping::from_iter([("spec".into(), spec)]),
        )).unwrap();
        doc.insert_str(0, HEADER);
        parse_never_panics(&doc);
        let mut doc = format!("{HEADER}spec:\n  database: {{connectionSecretRef: {{name: db}}}}\n");
        if let serde_yaml::Value::Mapping(m) = extra {
            for (k, v) in m {
                let one = serde_yaml::to_string(&serde_yaml::Value::Mapping(serde_yaml::Mapping::from_iter([(k, v)]))).unwrap();
                for line in one.lines() {
                    doc.push_str(&format!("  {line}\n"));
                }
            }
        }
        parse_never_panics(&doc);
    }
}

#[test]
fn deep_nesting_is_refused_quickly() {
    // A recursion limit, not a stack overflow; and refused before libyaml's scanner, which
    // is quadratic in the depth of flow collections (100,000 levels took 17 s in release).
    let started = std::time::Instant::now();
    for depth in [200, 100_000, 1_000_000] {
        let deep = format!("{HEADER}spec: {}{}\n", "[".repeat(depth), "]".repeat(depth));
        assert!(parse_policies(&deep).is_err(), "{depth}");
        let mixed = format!(
            "{HEADER}spec: {}1{}\n",
            "{a: [".repeat(depth / 2),
            "]}".repeat(depth / 2)
        );
        assert!(parse_policies(&mixed).is_err(), "{depth}");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Brackets in an ordinary policy are no problem.
    assert!(parse_policies(CERTQUIZ).is_ok());
}

#[test]
fn alias_bombs_are_refused_quickly() {
    // "Billion laughs": aliases expanding exponentially.
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (i, name) in "bcdefghi".chars().enumerate() {
        let prev = (b'a' + i as u8) as char;
        laughs.push_str(&format!("{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
    }
    let started = std::time::Instant::now();
    let doc = format!("{HEADER}{laughs}spec:\n  database: {{connectionSecretRef: {{name: db}}}}\n  featureFlags:\n    flags: *i\n");
    assert!(parse_policies(&doc).is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Not UTF-8 cannot reach the parser (the CLI reads a String); NUL and control characters can.
    parse_never_panics(&format!(
        "{HEADER}spec:\n  database: {{connectionSecretRef: {{name: \"\0\u{7}\"}}}}\n"
    ));
}

// ------------------------------------------------------------------------------- planners

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "t",
        "u",
        "Odd\"Name",
        "semi;colon",
        "ünï",
        "feature_flags",
    ])
    .prop_map(str::to_string)
}

fn schema() -> impl Strategy<Value = Option<String>> {
    prop::sample::select(vec![None, Some("public"), Some("s")]).prop_map(|s| s.map(str::to_string))
}

fn qualified() -> impl Strategy<Value = QualifiedName> {
    (schema(), name())
        .prop_map(|(s, n)| QualifiedName::new(s.unwrap_or_else(|| "public".into()), n))
}

fn expr() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "true",
        "owner = 1",
        "(owner = 1)",
        "owner = current_user",
        "x'",
    ])
    .prop_map(str::to_string)
}

fn maybe<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    prop::option::of(s)
}

/// Inserts `key: value` when the value is present.
fn put(obj: &mut Value, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        obj[key] = v;
    }
}

fn spec() -> impl Strategy<Value = DatabasePolicySpec> {
    let autovacuum = prop::collection::vec(
        (
            schema(),
            name(),
            maybe(0i64..1000),
            maybe(0.0f64..1.0),
            maybe(any::<bool>()),
        ),
        0..4,
    )
    .prop_map(|tables| {
        let tables: Vec<Value> = tables
            .into_iter()
            .map(|(s, t, threshold, scale, enabled)| {
                let mut o = json!({ "table": t });
                put(&mut o, "schema", s.map(Value::from));
                put(&mut o, "vacuumThreshold", threshold.map(Value::from));
                put(&mut o, "vacuumScaleFactor", scale.map(Value::from));
                put(&mut o, "enabled", enabled.map(Value::from));
                o
            })
            .collect();
        json!({ "tables": tables })
    });
    let policy = (
        prop::sample::select(vec!["p", "q", "Odd\"P"]),
        maybe(prop::sample::select(vec![
            "All", "Select", "Insert", "Update", "Delete",
        ])),
        maybe(prop::sample::select(vec!["Permissive", "Restrictive"])),
        maybe(prop::collection::vec(
            prop::sample::select(vec!["app", "public", "Odd\"Role"]),
            0..3,
        )),
        maybe(expr()),
        maybe(expr()),
    )
        .prop_map(|(n, command, kind, roles, using, check)| {
            let mut o = json!({ "name": n });
            put(&mut o, "command", command.map(Value::from));
            put(&mut o, "kind", kind.map(Value::from));
            put(&mut o, "roles", roles.map(|r| json!(r)));
            put(&mut o, "using", using.map(Value::from));
            put(&mut o, "withCheck", check.map(Value::from));
            o
        });
    let rls = prop::collection::vec(
        (
            schema(),
            name(),
            maybe(any::<bool>()),
            maybe(any::<bool>()),
            maybe(any::<bool>()),
            prop::collection::vec(policy, 0..3),
        ),
        0..3,
    )
    .prop_map(|tables| {
        let tables: Vec<Value> = tables
            .into_iter()
            .map(|(s, t, enabled, force, own_all, policies)| {
                let mut o = json!({ "table": t, "policies": policies });
                put(&mut o, "schema", s.map(Value::from));
                put(&mut o, "enabled", enabled.map(Value::from));
                put(&mut o, "force", force.map(Value::from));
                put(&mut o, "ownAllPolicies", own_all.map(Value::from));
                o
            })
            .collect();
        json!({ "tables": tables })
    });
    let flags = (
        schema(),
        maybe(name()),
        prop::collection::vec(
            (
                prop::sample::select(vec!["a", "b", "new_quiz", "x.y:z-1"]),
                any::<bool>(),
                maybe(0u8..=100),
                maybe("[ -~]{0,12}"),
            ),
            0..4,
        ),
    )
        .prop_map(|(s, table, flags)| {
            let flags: Vec<Value> = flags
                .into_iter()
                .map(|(n, enabled, pct, description)| {
                    let mut o = json!({ "name": n, "enabled": enabled });
                    put(&mut o, "rolloutPercentage", pct.map(Value::from));
                    put(&mut o, "description", description.map(Value::from));
                    o
                })
                .collect();
            let mut o = json!({ "flags": flags });
            put(&mut o, "schema", s.map(Value::from));
            put(&mut o, "table", table.map(Value::from));
            o
        });
    let settings = prop::collection::btree_map(
        prop::sample::select(vec![
            "work_mem",
            "log_min_duration_statement",
            "shared_buffers",
            "max_connections",
            "custom.thing",
        ]),
        prop::sample::select(vec![
            "4MB", "500ms", "-1", "on", "100", "", "'; DROP", "1e99",
        ]),
        0..4,
    )
    .prop_map(|p| json!({ "parameters": p }));
    let index = (
        prop::sample::select(vec!["ix", "iy", "Odd\"Ix"]),
        schema(),
        name(),
        prop::collection::vec(
            prop::sample::select(vec!["id", "owner", "(lower(name))"]),
            1..3,
        ),
        maybe(prop::sample::select(vec!["id > 0", "owner IS NOT NULL"])),
        maybe(any::<bool>()),
    )
        .prop_map(|(n, s, t, columns, predicate, unique)| {
            let mut o = json!({ "name": n, "table": t, "columns": columns });
            put(&mut o, "schema", s.map(Value::from));
            put(&mut o, "where", predicate.map(Value::from));
            put(&mut o, "unique", unique.map(Value::from));
            o
        });
    let indexes =
        (prop::collection::vec(index, 0..3), maybe(any::<bool>())).prop_map(|(ix, prune)| {
            let mut o = json!({ "indexes": ix });
            put(&mut o, "prune", prune.map(Value::from));
            o
        });
    let views = prop::collection::vec(
        (
            name(),
            maybe(prop::sample::select(vec![
                "SELECT 1 AS one",
                "SELECT id FROM t",
            ])),
            maybe(any::<bool>()),
        ),
        0..3,
    )
    .prop_map(|views| {
        let views: Vec<Value> = views
            .into_iter()
            .map(|(n, definition, concurrently)| {
                let mut o = json!({ "name": n });
                put(&mut o, "definition", definition.map(Value::from));
                put(&mut o, "concurrently", concurrently.map(Value::from));
                o
            })
            .collect();
        json!({ "views": views })
    });
    let partition_tables = prop::collection::vec(
        (
            schema(),
            name(),
            prop::sample::select(vec!["Daily", "Weekly", "Monthly", "Quarterly", "Yearly"]),
            maybe(0u32..40),
            maybe(prop::sample::select(vec![
                "1d", "30d", "12w", "6mo", "2y", "0d",
            ])),
            maybe(prop::sample::select(vec!["Detach", "Drop"])),
            maybe(any::<bool>()),
            maybe(prop::sample::select(vec![
                "1970-01-01",
                "2024-02-29",
                "2099-12-31",
                "2026-01-31",
            ])),
        ),
        0..3,
    )
    .prop_map(|tables| {
        let tables: Vec<Value> = tables
            .into_iter()
            .map(
                |(s, t, interval, premake, retention, policy, default, start)| {
                    let mut o = json!({ "table": t, "interval": interval });
                    put(&mut o, "schema", s.map(Value::from));
                    put(&mut o, "premake", premake.map(Value::from));
                    put(&mut o, "retention", retention.map(Value::from));
                    put(&mut o, "retentionPolicy", policy.map(Value::from));
                    put(&mut o, "defaultPartition", default.map(Value::from));
                    put(&mut o, "startDate", start.map(Value::from));
                    o
                },
            )
            .collect();
        json!({ "tables": tables })
    });
    (
        maybe(autovacuum),
        maybe(rls),
        maybe(flags),
        maybe(settings),
        maybe(indexes),
        maybe(views),
        maybe(partition_tables),
        maybe(any::<bool>()),
    )
        .prop_map(|(av, rls, ff, ss, ix, mv, parts, destructive)| {
            let mut spec = json!({ "database": { "connectionSecretRef": { "name": "db" } } });
            put(&mut spec, "autovacuum", av);
            put(&mut spec, "rowLevelSecurity", rls);
            put(&mut spec, "featureFlags", ff);
            put(&mut spec, "serverSettings", ss);
            put(&mut spec, "indexes", ix);
            put(&mut spec, "materializedViews", mv);
            put(&mut spec, "partitions", parts);
            put(
                &mut spec,
                "safety",
                destructive.map(|d| json!({ "allowDestructive": d })),
            );
            serde_json::from_value(spec).expect("the generator writes well-typed specs")
        })
}

fn relkind() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["r", "p", "v", "m", "i"]).prop_map(str::to_string)
}

fn observed_autovacuum() -> impl Strategy<Value = autovacuum::Observed> {
    prop::collection::btree_map(
        qualified(),
        (
            relkind(),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "autovacuum_vacuum_threshold",
                    "autovacuum_vacuum_scale_factor",
                    "autovacuum_enabled",
                    "fillfactor",
                ])
                .prop_map(str::to_string),
                prop::sample::select(vec!["10", "0.2", "true", "false", "junk", ""])
                    .prop_map(str::to_string),
                0..3,
            ),
        ),
        0..4,
    )
    .prop_map(|tables| autovacuum::Observed {
        tables: tables
            .into_iter()
            .map(|(q, (relkind, options))| {
                (
                    q,
                    autovacuum::TableState {
                        relkind,
                        options,
                        not_owned: false,
                    },
                )
            })
            .collect(),
    })
}

fn observed_rls() -> impl Strategy<Value = rls::Observed> {
    let command = prop::sample::select(vec![
        PolicyCommand::All,
        PolicyCommand::Select,
        PolicyCommand::Insert,
        PolicyCommand::Update,
        PolicyCommand::Delete,
    ]);
    let kind = prop::sample::select(vec![PolicyKind::Permissive, PolicyKind::Restrictive]);
    let state = (
        command,
        kind,
        prop::collection::btree_set(
            prop::sample::select(vec!["public", "app", "Odd\"Role"]).prop_map(str::to_string),
            0..3,
        ),
        maybe(expr()),
        maybe(expr()),
    )
        .prop_map(
            |(command, kind, roles, using, with_check)| rls::PolicyState {
                command,
                kind,
                roles,
                using,
                with_check,
            },
        );
    let table = (
        relkind(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::btree_map(
            prop::sample::select(vec!["p", "q", "other"]).prop_map(str::to_string),
            state,
            0..3,
        ),
    )
        .prop_map(|(relkind, enabled, force, policies)| rls::TableState {
            relkind,
            enabled,
            force,
            not_owned: false,
            policies,
        });
    let normalized = prop_oneof![
        (maybe(expr()), maybe(expr()))
            .prop_map(|(using, with_check)| Ok(rls::Normalized { using, with_check })),
        (
            maybe(prop::sample::select(vec!["42601", "42703"]).prop_map(str::to_string)),
            "[a-z ]{0,20}"
        )
            .prop_map(|(sqlstate, message)| Err(rls::ExpressionError { sqlstate, message })),
    ];
    (
        prop::collection::btree_map(qualified(), table, 0..4),
        prop::collection::btree_set(
            prop::sample::select(vec!["app", "public"]).prop_map(str::to_string),
            0..2,
        ),
        prop::collection::btree_map(
            (
                qualified(),
                prop::sample::select(vec!["p", "q"]).prop_map(str::to_string),
            ),
            normalized,
            0..4,
        ),
    )
        .prop_map(|(tables, roles, normalized)| rls::Observed {
            tables,
            roles,
            normalized,
            ..Default::default()
        })
}

fn observed_flags() -> impl Strategy<Value = feature_flags::Observed> {
    (
        any::<bool>(),
        any::<bool>(),
        maybe(prop::sample::select(vec!["SELECT true", ""]).prop_map(str::to_string)),
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "stale"]).prop_map(str::to_string),
            (any::<bool>(), -5i32..120, maybe("[ -~]{0,8}")),
            0..3,
        ),
        maybe("[a-z ]{0,12}"),
    )
        .prop_map(
            |(schema_exists, table_exists, function_body, rows, incompatible)| {
                feature_flags::Observed {
                    schema_exists,
                    table_exists,
                    function_body,
                    table_owner: None,
                    function_owner: None,
                    owner_exists: false,
                    rows: rows
                        .into_iter()
                        .map(|(name, (enabled, rollout_percentage, description))| {
                            let row = feature_flags::FlagRow {
                                name: name.clone(),
                                enabled,
                                rollout_percentage,
                                description,
                            };
                            (name, row)
                        })
                        .collect(),
                    incompatible,
                }
            },
        )
}

fn observed_settings() -> impl Strategy<Value = server_settings::Observed> {
    let meta = (
        maybe(prop::sample::select(vec!["4096", "500", "-1", "on"]).prop_map(str::to_string)),
        maybe(prop::sample::select(vec!["kB", "ms", "8kB", "s"]).prop_map(str::to_string)),
        prop::sample::select(vec!["integer", "bool", "string", "enum", "real"])
            .prop_map(str::to_string),
        prop::sample::select(vec![
            "user",
            "sighup",
            "postmaster",
            "internal",
            "superuser",
        ])
        .prop_map(str::to_string),
        maybe(prop::sample::select(vec!["-1", "0", "64"]).prop_map(str::to_string)),
        maybe(prop::sample::select(vec!["2147483647", "100"]).prop_map(str::to_string)),
        maybe(prop::collection::vec(
            prop::sample::select(vec!["on", "off", "debug"]).prop_map(str::to_string),
            0..3,
        )),
        any::<bool>(),
    );
    (
        prop::collection::btree_map(
            prop::sample::select(vec![
                "work_mem",
                "log_min_duration_statement",
                "shared_buffers",
                "max_connections",
            ])
            .prop_map(str::to_string),
            meta,
            0..4,
        ),
        prop::collection::btree_map(
            prop::sample::select(vec!["work_mem", "shared_buffers"]).prop_map(str::to_string),
            prop::sample::select(vec!["4MB", "128MB", "junk"]).prop_map(str::to_string),
            0..2,
        ),
        prop::collection::btree_map(
            prop::sample::select(vec!["work_mem"]).prop_map(str::to_string),
            "[a-z ]{0,12}",
            0..2,
        ),
    )
        .prop_map(|(meta, auto_conf, file_errors)| server_settings::Observed {
            meta: meta
                .into_iter()
                .map(
                    |(
                        name,
                        (
                            setting,
                            unit,
                            vartype,
                            context,
                            min_val,
                            max_val,
                            enumvals,
                            pending_restart,
                        ),
                    )| {
                        let m = server_settings::SettingMeta {
                            name: name.clone(),
                            setting,
                            unit,
                            vartype,
                            context,
                            min_val,
                            max_val,
                            enumvals,
                            pending_restart,
                            ..Default::default()
                        };
                        (name, m)
                    },
                )
                .collect(),
            auto_conf,
            file_errors,
            can_reload: true,
            ..Default::default()
        })
}

fn definition() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "CREATE INDEX ix ON public.t USING btree (id)",
        "CREATE UNIQUE INDEX ix ON public.t USING btree (owner) WHERE (id > 0)",
        " SELECT 1 AS one;",
        "",
    ])
    .prop_map(str::to_string)
}

fn normalized() -> impl Strategy<Value = Result<String, (Option<String>, String)>> {
    prop_oneof![
        definition().prop_map(Ok),
        (maybe(Just("42703".to_string())), "[a-z ]{0,12}").prop_map(Err),
    ]
}

fn observed_indexes() -> impl Strategy<Value = indexes::Observed> {
    (
        prop::collection::btree_map(qualified(), relkind(), 0..4),
        prop::collection::btree_map(
            qualified(),
            (qualified(), definition(), any::<bool>()).prop_map(|(table, definition, valid)| {
                indexes::IndexState {
                    table,
                    definition,
                    valid,
                }
            }),
            0..3,
        ),
        prop::collection::btree_map(qualified(), normalized(), 0..3),
    )
        .prop_map(|(relkinds, indexes, normalized)| indexes::Observed {
            relkinds,
            indexes,
            normalized,
        })
}

fn observed_views() -> impl Strategy<Value = matviews::Observed> {
    (
        prop::collection::btree_map(
            qualified(),
            (relkind(), maybe(definition()), any::<bool>(), any::<bool>()).prop_map(
                |(relkind, definition, populated, has_unique_index)| matviews::ViewState {
                    relkind,
                    definition,
                    populated,
                    has_unique_index,
                    owner: "postgres".into(),
                },
            ),
            0..3,
        ),
        prop::collection::btree_map(qualified(), normalized(), 0..3),
    )
        .prop_map(|(views, normalized)| matviews::Observed {
            views,
            normalized,
            refreshes: BTreeMap::new(),
            roles: Default::default(),
        })
}

/// Microseconds that PostgreSQL can report as a bound: ordinary dates, and the extremes
/// that stand for MINVALUE/MAXVALUE and ±infinity.
fn micros() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => -2_000_000_000_000_000i64..4_000_000_000_000_000i64,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(0i64),
    ]
}

fn observed_partitions() -> impl Strategy<Value = partitions::Observed> {
    let bound = prop_oneof![
        Just(partitions::Bound::Default),
        (micros(), micros()).prop_map(|(from, to)| partitions::Bound::Range { from, to }),
        "[a-z ]{0,12}".prop_map(partitions::Bound::Other),
    ];
    let child = (qualified(), bound, any::<bool>()).prop_map(|(name, bound, detach_pending)| {
        partitions::Child {
            name,
            bound,
            detach_pending,
        }
    });
    let table = (
        relkind(),
        maybe(prop::sample::select(vec!["r", "l", "h"]).prop_map(str::to_string)),
        0i32..3,
        maybe(prop::sample::select(vec!["at", "created_at"]).prop_map(str::to_string)),
        maybe(
            prop::sample::select(vec![
                "date",
                "timestamp without time zone",
                "timestamp with time zone",
                "integer",
            ])
            .prop_map(str::to_string),
        ),
        prop::collection::vec(child, 0..6),
        prop::collection::btree_set("t_p[0-9]{4}".prop_map(|s: String| s), 0..2),
        maybe((
            0i64..1000,
            prop::collection::btree_map(micros(), 0i64..100, 0..3),
        )),
    )
        .prop_map(
            |(
                relkind,
                strategy,
                key_columns,
                key_column,
                key_type,
                children,
                other_relations,
                default_rows,
            )| {
                partitions::TableState {
                    relkind,
                    strategy,
                    key_columns,
                    key_column,
                    key_type,
                    owner: "postgres".into(),
                    columns: vec!["id".into(), "at".into()],
                    children,
                    other_relations: other_relations.into_iter().collect::<BTreeSet<_>>(),
                    default_rows: default_rows
                        .map(|(total, in_range)| partitions::DefaultRows { total, in_range }),
                    default_fires_on_delete: Vec::new(),
                }
            },
        );
    (
        // 1970 to 2100.
        0i64..4_102_444_800,
        prop::sample::select(vec![120_000, 150_000, 170_000]),
        prop::collection::btree_map(qualified(), table, 0..4),
    )
        .prop_map(|(now, server_version, tables)| partitions::Observed {
            now: Utc.timestamp_opt(now, 0).single().expect("in range"),
            server_version,
            current_user: "postgres".into(),
            can_set_replication_role: true,
            tables,
            queries: 1,
        })
}

fn ledger() -> impl Strategy<Value = Ledger> {
    let area = prop::sample::select(vec![
        Area::Autovacuum,
        Area::RowLevelSecurity,
        Area::Indexes,
        Area::ServerSettings,
        Area::FeatureFlags,
    ]);
    prop::collection::vec(
        (
            area,
            prop::sample::select(vec![
                "public.t",
                "public.u",
                "public.ix",
                "public.feature_flags",
                "server",
            ]),
            prop::sample::select(vec![
                "p",
                "index",
                "table",
                "work_mem",
                "autovacuum_vacuum_threshold",
            ]),
            prop::sample::select(vec!["me", "someone/else"]),
        ),
        0..6,
    )
    .prop_map(|entries| {
        let mut ledger = Ledger::for_policy("me");
        for (area, target, item, owner) in entries {
            ledger.insert(area, target, item, owner);
        }
        ledger
    })
}

fn observed() -> impl Strategy<Value = Observed> {
    (
        ledger(),
        maybe(observed_autovacuum()),
        maybe(observed_settings()),
        maybe(observed_flags()),
        maybe(observed_partitions()),
        maybe(observed_rls()),
        maybe(observed_views()),
        maybe(observed_indexes()),
    )
        .prop_map(
            |(
                ledger,
                autovacuum,
                server_settings,
                feature_flags,
                partitions,
                rls,
                materialized_views,
                indexes,
            )| Observed {
                ledger,
                autovacuum,
                server_settings,
                feature_flags,
                partitions,
                rls,
                materialized_views,
                indexes,
                ..Observed::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(512), max_global_rejects: 100_000, ..ProptestConfig::default() })]

    #[test]
    fn the_planners_never_panic_and_plans_stay_well_formed(spec in spec(), observed in observed()) {
        prop_assume!(validate_spec(&spec).is_empty());
        let plan = engine::plan(&spec, &observed);
        for area in &plan.areas {
            for change in &area.changes {
                prop_assert_eq!(change.area, area.area);
                prop_assert!(!change.sql.trim().is_empty(), "a change without SQL: {:?}", change);
                prop_assert!(!change.summary.is_empty());
            }
        }
        // Everything a front does with a plan.
        let _ = plan.render_sql();
        let _ = plan.summary();
        let _ = serde_json::to_string(&plan).expect("a plan serialises");
        let _ = engine::facts(&spec, &observed);
        // Conflicts are errors, and a plan with errors is never applied: nothing may be
        // recorded for a target another policy owns in a plan without errors.
        if !plan.has_errors() {
            for change in plan.changes() {
                for op in &change.ledger {
                    if let engine::plan::LedgerOp::Record { area, target, item } = op {
                        prop_assert!(observed.ledger.owned_by_other(*area, target, item).is_none(), "takes over {target} {item}");
                    }
                }
            }
        }
    }
}
