//! `kubectl dbpolicy`: the same binary installed as `kubectl-dbpolicy` (kubectl runs
//! plugins by that name; `main` turns the name into the `kubectl` subcommand). It reads
//! and annotates `DatabasePolicy` objects only: `status` (a per-area table), `plan` (the
//! pending plan in status, as SQL) and `reconcile` (the force-reconcile annotation). The
//! renderers are pure; only [`run`] talks to the API server.

use std::fmt::Write as _;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};

use crate::api::DatabasePolicy;

/// The annotation whose change wakes the controller (docs/operator.md, "Forcing a check
/// now"); its value is not interpreted.
pub const RECONCILE_ANNOTATION: &str = "dbpolicy.dev/reconcile-at";

#[derive(clap::Args, Debug)]
pub struct PluginArgs {
    #[command(subcommand)]
    pub command: PluginCommand,
    /// Namespace of the policy (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// Conditions per area, pending changes, replicas and backups of a policy.
    Status { name: String },
    /// The pending plan in the policy's status, as SQL (what Plan mode would run).
    Plan { name: String },
    /// Ask the operator to check the policy now (sets dbpolicy.dev/reconcile-at).
    Reconcile { name: String },
}

fn condition<'a>(p: &'a DatabasePolicy, type_: &str) -> Option<&'a Condition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Pads each column to its widest cell, two spaces apart (the last column is not padded).
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One line of a message: status messages are one line, but are written by others too.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `kubectl dbpolicy status NAME`.
pub(crate) fn render_status(p: &DatabasePolicy) -> String {
    let mut out = String::new();
    let status = p.status.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "DatabasePolicy {}/{}",
        p.namespace().unwrap_or_default(),
        p.name_any()
    );
    let generation = p.metadata.generation.map(|g| g.to_string());
    let observed = status.observed_generation.map(|g| g.to_string());
    let mut head = vec![
        vec![
            "Mode:".to_string(),
            status
                .mode
                .map(|m| format!("{m:?}"))
                .unwrap_or_else(|| format!("{:?} (not reconciled yet)", p.spec.effective_mode())),
        ],
        vec![
            "Generation:".into(),
            format!(
                "{} (observed {})",
                generation.as_deref().unwrap_or("-"),
                observed.as_deref().unwrap_or("never")
            ),
        ],
    ];
    for type_ in ["Ready", "Drifted"] {
        let v = match condition(p, type_) {
            Some(c) => format!("{} {}: {}", c.status, c.reason, one_line(&c.message)),
            None => "-".into(),
        };
        head.push(vec![format!("{type_}:"), v]);
    }
    let pending = status.pending_changes.unwrap_or(0);
    head.push(vec![
        "Pending:".into(),
        match &status.pending_plan {
            Some(plan) if pending > 0 => format!(
                "{pending} change(s), {} destructive (kubectl dbpolicy plan {})",
                plan.destructive,
                p.name_any()
            ),
            _ => pending.to_string(),
        },
    ]);
    if p.spec.is_suspended() {
        head.push(vec!["Suspended:".into(), "yes (spec.suspend)".into()]);
    }
    out.push_str(&table(&head));

    let areas: Vec<&Condition> = status
        .conditions
        .iter()
        .filter(|c| c.type_ != "Ready" && c.type_ != "Drifted")
        .collect();
    out.push('\n');
    if areas.is_empty() {
        out.push_str("No area reported yet.\n");
    } else {
        let mut rows = vec![vec![
            "AREA".to_string(),
            "STATUS".into(),
            "REASON".into(),
            "PENDING".into(),
            "MESSAGE".into(),
        ]];
        for c in areas {
            let area = c.type_.strip_suffix("Ready").unwrap_or(&c.type_);
            let mut camel = area.to_string();
            if let Some(first) = camel.get(..1) {
                camel.replace_range(..1, &first.to_lowercase());
            }
            let n = status
                .pending_plan
                .as_ref()
                .and_then(|pp| pp.by_area.get(&camel))
                .copied()
                .unwrap_or(0);
            rows.push(vec![
                camel,
                c.status.clone(),
                c.reason.clone(),
                n.to_string(),
                one_line(&c.message),
            ]);
        }
        out.push_str(&table(&rows));
    }

    if let Some(replicas) = status.replicas.as_ref().filter(|r| !r.is_empty()) {
        out.push_str("\nReplicas\n");
        let mut rows = vec![vec![
            "NAME".to_string(),
            "STATE".into(),
            "LAG".into(),
            "LAG BYTES".into(),
            "SLOT".into(),
            "CHECKED".into(),
        ]];
        for r in replicas {
            rows.push(vec![
                r.name.clone(),
                r.state.clone(),
                r.lag_seconds
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                r.lag_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.slot.clone().unwrap_or_else(|| "-".into()),
                r.last_check_time.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if let Some(b) = &status.backups {
        out.push_str("\nBackups\n");
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let rows = vec![
            vec!["Last scheduled:".to_string(), dash(&b.last_schedule_time)],
            vec![
                "Last success:".to_string(),
                match (&b.last_success_time, b.newest_backup_bytes) {
                    (Some(t), Some(n)) => format!("{t} ({n} bytes)"),
                    (t, _) => dash(t),
                },
            ],
            vec![
                "Last failure:".to_string(),
                match (&b.last_failure_time, &b.last_failure_reason) {
                    (Some(t), Some(r)) => format!("{t} ({r})"),
                    (t, _) => dash(t),
                },
            ],
        ];
        out.push_str(&table(&rows));
    }
    if let Some(views) = status.materialized_views.as_ref().filter(|v| !v.is_empty()) {
        out.push_str("\nMaterialized views\n");
        let mut rows = vec![vec![
            "NAME".to_string(),
            "LAST REFRESH".into(),
            "SECONDS".into(),
        ]];
        for v in views {
            rows.push(vec![
                v.name.clone(),
                v.last_refresh_time.clone().unwrap_or_else(|| "-".into()),
                v.last_refresh_seconds
                    .map(|s| format!("{s:.1}"))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

/// `kubectl dbpolicy plan NAME`: the pending changes as a SQL script, each statement
/// preceded by a comment with its area, target, hazard, summary and lock. Changes to Kubernetes
/// objects and statements too long for status are comments only.
pub(crate) fn render_plan(p: &DatabasePolicy) -> String {
    let status = p.status.clone().unwrap_or_default();
    let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    let Some(plan) = status.pending_plan.filter(|pp| pp.total > 0) else {
        return format!("-- {key}: nothing pending\n");
    };
    let mut out = format!(
        "-- {key}: {} pending change(s), {} destructive (status at generation {})\n",
        plan.total,
        plan.destructive,
        status
            .observed_generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "?".into())
    );
    for c in &plan.changes {
        let lock = c
            .lock
            .as_deref()
            .map(|l| format!(" (lock {})", one_line(l)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "\n-- {} {} [{}]: {}{lock}",
            c.area,
            one_line(&c.target),
            c.hazard,
            one_line(&c.summary)
        );
        match &c.sql {
            Some(sql) => {
                out.push_str(sql.trim_end());
                if !sql.trim_end().ends_with(';') {
                    out.push(';');
                }
                out.push('\n');
            }
            None => out.push_str("-- (no SQL: a Kubernetes object, or a statement too long for status; `dbpolicy plan` prints it)\n"),
        }
    }
    if plan.truncated {
        let _ = writeln!(
            out,
            "\n-- … and {} more change(s) not kept in status: `dbpolicy plan -f POLICY --database-url URL` lists them all",
            plan.total as usize - plan.changes.len()
        );
    }
    out
}

async fn client(args: &PluginArgs) -> anyhow::Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(kc, &options).await?
        }
        None => match Config::from_kubeconfig(&options).await {
            Ok(c) => c,
            // In a pod: the service account.
            Err(_) if args.context.is_none() => Config::infer().await?,
            Err(e) => return Err(e.into()),
        },
    };
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

/// Runs a plugin command: 0 done, 1 on any failure (said on stderr).
pub(crate) async fn run(args: PluginArgs) -> u8 {
    match run_inner(&args).await {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

async fn run_inner(args: &PluginArgs) -> anyhow::Result<String> {
    let (client, ns) = client(args).await?;
    let api: Api<DatabasePolicy> = Api::namespaced(client, &ns);
    let name = match &args.command {
        PluginCommand::Status { name }
        | PluginCommand::Plan { name }
        | PluginCommand::Reconcile { name } => name,
    };
    let get = || async {
        api.get_opt(name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("databasepolicy {ns}/{name} not found"))
    };
    Ok(match &args.command {
        PluginCommand::Status { .. } => render_status(&get().await?),
        PluginCommand::Plan { .. } => render_plan(&get().await?),
        PluginCommand::Reconcile { .. } => {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let patch = serde_json::json!({
                "metadata": {"annotations": {RECONCILE_ANNOTATION: now}}
            });
            // A merge patch of one annotation: the spec and other annotations are untouched,
            // and a missing object is an error rather than a creation.
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            format!(
                "databasepolicy {ns}/{name}: reconcile requested ({RECONCILE_ANNOTATION}={now})\n"
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(status: serde_json::Value) -> DatabasePolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "dbpolicy.dev/v1alpha1",
            "kind": "DatabasePolicy",
            "metadata": {"name": "certquiz", "namespace": "quiz", "generation": 3},
            "spec": {"database": {"connectionSecretRef": {"name": "db"}}, "mode": "Plan"},
            "status": status,
        }))
        .unwrap()
    }

    fn cond(t: &str, s: &str, reason: &str, message: &str) -> serde_json::Value {
        serde_json::json!({"type": t, "status": s, "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-29T10:00:00Z", "observedGeneration": 3})
    }

    fn pending_status() -> serde_json::Value {
        serde_json::json!({
            "observedGeneration": 3,
            "mode": "Plan",
            "pendingChanges": 3,
            "conditions": [
                cond("Ready", "False", "PlanPending", "featureFlags: 2 change(s) pending"),
                cond("RowLevelSecurityReady", "True", "Reconciled", "the database matches the policy"),
                cond("FeatureFlagsReady", "False", "PlanPending", "2 change(s) pending\nsecond line"),
                cond("Drifted", "False", "ChangesPending", "pending, not drift"),
            ],
            "pendingPlan": {"total": 3, "destructive": 1, "byArea": {"featureFlags": 2, "backups": 1},
                "truncated": false, "changes": [
                {"area": "featureFlags", "target": "new_quiz_engine", "hazard": "safe",
                 "summary": "upsert flag new_quiz_engine", "sql": "INSERT INTO public.feature_flags VALUES ('new_quiz_engine')"},
                {"area": "featureFlags", "target": "old", "hazard": "destructive",
                 "lock": "ROW EXCLUSIVE", "summary": "delete flag old", "sql": "DELETE FROM public.feature_flags WHERE name = 'old';"},
                {"area": "backups", "target": "CronJob/certquiz-backup", "hazard": "safe",
                 "summary": "create CronJob certquiz-backup"},
            ]},
            "replicas": [{"name": "r1", "state": "Lagging", "lagSeconds": 42.25, "lagBytes": 1048576,
                          "slot": "r1_slot", "lastCheckTime": "2026-11-29T10:00:00Z"}],
            "backups": {"lastSuccessTime": "2026-11-29T03:00:41Z", "newestBackupBytes": 123456},
        })
    }

    #[test]
    fn status_is_a_header_and_a_table_per_area() {
        let out = render_status(&policy(pending_status()));
        let expected = "\
DatabasePolicy quiz/certquiz
Mode:        Plan
Generation:  3 (observed 3)
Ready:       False PlanPending: featureFlags: 2 change(s) pending
Drifted:     False ChangesPending: pending, not drift
Pending:     3 change(s), 1 destructive (kubectl dbpolicy plan certquiz)

AREA              STATUS  REASON       PENDING  MESSAGE
rowLevelSecurity  True    Reconciled   0        the database matches the policy
featureFlags      False   PlanPending  2        2 change(s) pending second line

Replicas
NAME  STATE    LAG    LAG BYTES  SLOT     CHECKED
r1    Lagging  42.2s  1048576    r1_slot  2026-11-29T10:00:00Z

Backups
Last scheduled:  -
Last success:    2026-11-29T03:00:41Z (123456 bytes)
Last failure:    -
";
        assert_eq!(out, expected, "got:\n{out}");
    }

    #[test]
    fn status_of_a_policy_never_reconciled() {
        let out = render_status(&policy(serde_json::Value::Null));
        assert!(
            out.contains("Mode:        Plan (not reconciled yet)"),
            "{out}"
        );
        assert!(out.contains("Generation:  3 (observed never)"), "{out}");
        assert!(out.contains("Ready:       -"), "{out}");
        assert!(out.contains("No area reported yet."), "{out}");
    }

    #[test]
    fn plan_is_sql_with_a_comment_per_change() {
        let out = render_plan(&policy(pending_status()));
        let expected = "\
-- quiz/certquiz: 3 pending change(s), 1 destructive (status at generation 3)

-- featureFlags new_quiz_engine [safe]: upsert flag new_quiz_engine
INSERT INTO public.feature_flags VALUES ('new_quiz_engine');

-- featureFlags old [destructive]: delete flag old (lock ROW EXCLUSIVE)
DELETE FROM public.feature_flags WHERE name = 'old';

-- backups CronJob/certquiz-backup [safe]: create CronJob certquiz-backup
-- (no SQL: a Kubernetes object, or a statement too long for status; `dbpolicy plan` prints it)
";
        assert_eq!(out, expected, "got:\n{out}");
        assert_eq!(
            render_plan(&policy(serde_json::Value::Null)),
            "-- quiz/certquiz: nothing pending\n"
        );
        // A target or summary cannot end the comment and smuggle a statement in.
        let mut s = pending_status();
        s["pendingPlan"]["changes"][0]["summary"] = "x\nDROP TABLE users; --".into();
        s["pendingPlan"]["truncated"] = true.into();
        s["pendingPlan"]["total"] = 60.into();
        let out = render_plan(&policy(s));
        assert!(!out.lines().any(|l| l.starts_with("DROP")), "{out}");
        assert!(out.contains("-- … and 57 more change(s)"), "{out}");
    }
}
