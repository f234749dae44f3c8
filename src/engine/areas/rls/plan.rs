//! The planner (pure): desired policies resolved against the catalog, the operations that
//! close the difference, and their statements.

use super::*;

/// `(expr)`: [`check_expression`] has made sure the expression cannot leave it.
pub(super) fn parenthesized(expr: &str) -> String {
    format!("({})", expr.trim())
}

/// ` USING (…) WITH CHECK (…)`, as both the policy and its normalisation are written.
pub(super) fn clauses_sql(using: Option<&str>, with_check: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(u) = using {
        s.push_str(" USING ");
        s.push_str(&parenthesized(u));
    }
    if let Some(c) = with_check {
        s.push_str(" WITH CHECK ");
        s.push_str(&parenthesized(c));
    }
    s
}

/// The policy's expressions after [`check_expression`], or which one is not an expression.
pub(super) fn expressions(p: &RlsPolicy) -> Result<(), (&'static str, String)> {
    if let Some(u) = &p.using {
        check_expression(u).map_err(|e| ("using", e.to_string()))?;
    }
    if let Some(c) = &p.with_check {
        check_expression(c).map_err(|e| ("withCheck", e.to_string()))?;
    }
    Ok(())
}

pub(super) fn command_sql(c: PolicyCommand) -> &'static str {
    match c {
        PolicyCommand::All => "ALL",
        PolicyCommand::Select => "SELECT",
        PolicyCommand::Insert => "INSERT",
        PolicyCommand::Update => "UPDATE",
        PolicyCommand::Delete => "DELETE",
    }
}

pub(super) fn kind_sql(k: PolicyKind) -> &'static str {
    match k {
        PolicyKind::Permissive => "PERMISSIVE",
        PolicyKind::Restrictive => "RESTRICTIVE",
    }
}

/// The spec's roles as a set: PUBLIC when omitted, `public` in any case is PUBLIC, other
/// names are exact role names. None for an empty list (an error: no one would match).
pub(crate) fn desired_roles(p: &RlsPolicy) -> Option<BTreeSet<String>> {
    match &p.roles {
        None => Some(BTreeSet::from([PUBLIC.to_string()])),
        Some(r) if r.is_empty() => None,
        Some(r) => Some(
            r.iter()
                .map(|r| {
                    if r.eq_ignore_ascii_case(PUBLIC) {
                        PUBLIC.to_string()
                    } else {
                        r.clone()
                    }
                })
                .collect(),
        ),
    }
}

pub(super) fn roles_sql(roles: &BTreeSet<String>) -> String {
    roles
        .iter()
        .map(|r| {
            if r == PUBLIC {
                "PUBLIC".to_string()
            } else {
                quote_ident(r)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------------------- planner

/// An expression as written (for SQL) and as PostgreSQL stores it (for comparison).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    pub sql: String,
    pub normalized: String,
}

/// A policy as the spec wants it, resolved against the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPolicy {
    pub name: String,
    pub command: PolicyCommand,
    pub kind: PolicyKind,
    pub roles: BTreeSet<String>,
    pub using: Option<Expr>,
    pub with_check: Option<Expr>,
    /// Its normalisation cache row, when PostgreSQL normalised it (written with the change).
    pub cache: Option<normcache::Record>,
}

impl DesiredPolicy {
    fn state(&self) -> PolicyState {
        PolicyState {
            command: self.command,
            kind: self.kind,
            roles: self.roles.clone(),
            using: self.using.as_ref().map(|e| e.normalized.clone()),
            with_check: self.with_check.as_ref().map(|e| e.normalized.clone()),
        }
    }
}

/// A difference to close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create {
        table: QualifiedName,
        policy: DesiredPolicy,
    },
    /// Command, kind, or a clause to remove: `ALTER POLICY` cannot, so DROP and CREATE,
    /// consecutive changes of the area, run in one transaction by the executor.
    Replace {
        table: QualifiedName,
        policy: DesiredPolicy,
        why: String,
    },
    /// Only the parts that differ are set.
    Alter {
        table: QualifiedName,
        name: String,
        roles: Option<BTreeSet<String>>,
        using: Option<Expr>,
        with_check: Option<Expr>,
        /// The policy's normalisation cache row, written with the change.
        cache: Option<normcache::Record>,
    },
    /// A policy the spec does not list, on a table whose policies it owns.
    Drop {
        table: QualifiedName,
        name: String,
    },
    Enable {
        table: QualifiedName,
        on: bool,
    },
    Force {
        table: QualifiedName,
        on: bool,
    },
}

pub(super) fn policy_target(table: &QualifiedName, policy: &str) -> String {
    format!("{table} policy {policy}")
}

/// A spec policy that resolved without errors, borrowed from the spec and the observation:
/// a drift check with nothing to change compares it with the catalog without copying a
/// string; [`Resolved::owned`] makes the [`DesiredPolicy`] an operation carries.
pub(super) struct Resolved<'a> {
    p: &'a RlsPolicy,
    /// The roles as a set; None when omitted (PUBLIC), the common case, which needs no set.
    roles: Option<BTreeSet<String>>,
    /// PostgreSQL's form of its expressions, when it normalised them.
    normalized: Option<&'a Normalized>,
    /// Its normalisation cache key, when it was normalised.
    cache_key: Option<&'a String>,
}

impl Resolved<'_> {
    fn name(&self) -> &str {
        &self.p.name
    }

    fn command(&self) -> PolicyCommand {
        self.p.command.unwrap_or_default()
    }

    fn kind(&self) -> PolicyKind {
        self.p.kind.unwrap_or_default()
    }

    fn roles_are(&self, have: &BTreeSet<String>) -> bool {
        match &self.roles {
            Some(roles) => roles == have,
            None => have.len() == 1 && have.contains(PUBLIC),
        }
    }

    /// The `USING` expression as PostgreSQL stores it (as written when not normalised).
    fn using(&self) -> Option<&str> {
        let n = self.normalized.and_then(|n| n.using.as_deref());
        self.p.using.as_deref().map(|s| n.unwrap_or(s.trim()))
    }

    fn with_check(&self) -> Option<&str> {
        let n = self.normalized.and_then(|n| n.with_check.as_deref());
        self.p.with_check.as_deref().map(|s| n.unwrap_or(s.trim()))
    }

    fn owned(&self, table: &QualifiedName) -> DesiredPolicy {
        let normalized = self.normalized.cloned().unwrap_or_default();
        let expr = |sql: &Option<String>, norm: &Option<String>| {
            sql.as_ref().map(|s| Expr {
                sql: s.trim().to_string(),
                normalized: norm.clone().unwrap_or_else(|| s.trim().to_string()),
            })
        };
        DesiredPolicy {
            name: self.p.name.clone(),
            command: self.command(),
            kind: self.kind(),
            roles: self
                .roles
                .clone()
                .unwrap_or_else(|| BTreeSet::from([PUBLIC.to_string()])),
            using: expr(&self.p.using, &normalized.using),
            with_check: expr(&self.p.with_check, &normalized.with_check),
            cache: self
                .normalized
                .zip(self.cache_key)
                .map(|(_, key)| normcache::Record {
                    key: key.clone(),
                    table: table.clone(),
                    name: self.p.name.clone(),
                    using: normalized.using.clone(),
                    with_check: normalized.with_check.clone(),
                }),
        }
    }
}

/// Resolves one spec policy, or reports on `plan` why it cannot be carried out.
pub(super) fn resolve<'a>(
    table: &QualifiedName,
    p: &'a RlsPolicy,
    observed: &'a Observed,
    plan: &mut AreaPlan,
) -> Option<Resolved<'a>> {
    let target = || policy_target(table, &p.name);
    let mut ok = true;
    // Roles omitted are PUBLIC, which always exists: no set to build or check.
    let roles = match p.roles.is_some().then(|| desired_roles(p)) {
        None => None,
        Some(None) => {
            plan.error(
                target(),
                Reason::InvalidRoles,
                "roles is an empty list: omit it for PUBLIC, or name at least one role",
            );
            ok = false;
            None
        }
        Some(Some(roles)) => {
            for r in roles
                .iter()
                .filter(|r| *r != PUBLIC && !observed.roles.contains(*r))
            {
                plan.error(
                    target(),
                    Reason::RoleNotFound,
                    format!("role {r:?} does not exist; dbpolicy does not create roles: create it first (CREATE ROLE), then reconcile again"),
                );
                ok = false;
            }
            Some(roles)
        }
    };
    if let Err((field, e)) = expressions(p) {
        plan.error(
            target(),
            Reason::InvalidPolicyExpression,
            format!("{field}: {e}"),
        );
        return None;
    }
    let item = (table.clone(), p.name.clone());
    let normalized = match observed.normalized.get(&item) {
        Some(Err(e)) => {
            let code = e
                .sqlstate
                .as_deref()
                .map(|c| format!(" (SQLSTATE {c})"))
                .unwrap_or_default();
            plan.error(
                target(),
                Reason::from_sqlstate(e.sqlstate.as_deref())
                    .unwrap_or(Reason::InvalidPolicyExpression),
                format!("{}{code}", e.message),
            );
            return None;
        }
        Some(Ok(n)) => {
            if n.using.is_some() != p.using.is_some()
                || n.with_check.is_some() != p.with_check.is_some()
            {
                plan.error(
                    target(),
                    Reason::InvalidPolicyExpression,
                    "PostgreSQL read the policy with different clauses than written: each of using and withCheck must be one expression",
                );
                return None;
            }
            Some(n)
        }
        None => None,
    };
    if !ok {
        return None;
    }
    Some(Resolved {
        p,
        roles,
        normalized,
        cache_key: observed.cache_keys.get(&item),
    })
}

/// The policy changes of one table whose spec resolved without errors.
pub(super) fn diff_policies(
    table: &QualifiedName,
    t: &RlsTable,
    desired: Vec<Resolved<'_>>,
    state: &TableState,
    ledger: &Ledger,
    plan: &mut AreaPlan,
    ops: &mut Vec<Op>,
) {
    for want in desired {
        let Some(have) = state.policies.get(want.name()) else {
            ops.push(Op::Create {
                table: table.clone(),
                policy: want.owned(table),
            });
            continue;
        };
        let mut why = Vec::new();
        if have.command != want.command() {
            why.push(format!("command {:?} → {:?}", have.command, want.command()));
        }
        if have.kind != want.kind() {
            why.push(format!("{:?} → {:?}", have.kind, want.kind()));
        }
        if have.using.is_some() && want.p.using.is_none() {
            why.push("remove USING".into());
        }
        if have.with_check.is_some() && want.p.with_check.is_none() {
            why.push("remove WITH CHECK".into());
        }
        if !why.is_empty() {
            ops.push(Op::Replace {
                table: table.clone(),
                policy: want.owned(table),
                why: why.join(", "),
            });
            continue;
        }
        let differs = |have: &Option<String>, want: Option<&str>| {
            want.is_some_and(|w| have.as_deref() != Some(w))
        };
        let roles = !want.roles_are(&have.roles);
        let using = differs(&have.using, want.using());
        let with_check = differs(&have.with_check, want.with_check());
        if roles || using || with_check {
            let want = want.owned(table);
            ops.push(Op::Alter {
                table: table.clone(),
                name: want.name,
                roles: roles.then_some(want.roles),
                using: want.using.filter(|_| using),
                with_check: want.with_check.filter(|_| with_check),
                cache: want.cache,
            });
        }
    }
    // A table has a handful of policies: a scan, not a set per table.
    let listed = |n: &str| t.policies.iter().any(|p| p.name == n);
    for name in state.policies.keys().filter(|n| !listed(n)) {
        if t.own_all_policies.unwrap_or(false) {
            ops.push(Op::Drop {
                table: table.clone(),
                name: name.clone(),
            });
        } else if ledger.contains(AREA, &table.to_string(), name) {
            plan.notice(
                policy_target(table, name),
                Reason::PolicyNoLongerListed,
                "created by dbpolicy and no longer listed; left in place (ownAllPolicies: true and safety.allowDestructive: true drop it)",
            );
        }
    }
}

/// The differences between spec and catalog, and the problems that block them. A table
/// with any problem gets no change at all (and a plan with errors is not applied).
pub(crate) fn diff(
    spec: &RowLevelSecuritySpec,
    observed: &Observed,
    ledger: &Ledger,
    plan: &mut AreaPlan,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for t in &spec.tables {
        let table = t.qualified();
        let Some(state) = observed.tables.get(&table) else {
            plan.error(
                table.to_string(),
                Reason::TableNotFound,
                format!(
                    "table {table} does not exist (policies: {})",
                    t.policies
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        };
        if !matches!(state.relkind.as_str(), "r" | "p") {
            plan.error(
                table.to_string(),
                Reason::NotATable,
                format!("{table} is not a table: row-level security applies to tables and partitioned tables"),
            );
            continue;
        }
        let errors_before = plan.errors.len();
        let desired: Vec<Resolved> = t
            .policies
            .iter()
            .filter_map(|p| resolve(&table, p, observed, plan))
            .collect();
        if plan.errors.len() > errors_before {
            continue;
        }
        diff_policies(&table, t, desired, state, ledger, plan, &mut ops);
        let enabled = t.enabled.unwrap_or(true);
        if state.enabled != enabled {
            ops.push(Op::Enable {
                table: table.clone(),
                on: enabled,
            });
        }
        let force = t.force.unwrap_or(false);
        if state.force != force {
            ops.push(Op::Force { table, on: force });
        }
    }
    ops
}

pub(super) fn create_sql(table: &QualifiedName, p: &DesiredPolicy) -> String {
    format!(
        "CREATE POLICY {} ON {} AS {} FOR {} TO {}{}",
        quote_ident(&p.name),
        table.quoted(),
        kind_sql(p.kind),
        command_sql(p.command),
        roles_sql(&p.roles),
        clauses_sql(
            p.using.as_ref().map(|e| e.sql.as_str()),
            p.with_check.as_ref().map(|e| e.sql.as_str())
        )
    )
}

pub(super) fn create_summary(p: &DesiredPolicy) -> String {
    format!(
        "create policy {} ({:?}, {:?}, to {})",
        p.name,
        p.command,
        p.kind,
        roles_sql(&p.roles)
    )
}

/// Every statement here takes ACCESS EXCLUSIVE on the table (bounded by lock_timeout):
/// `policy.c` opens it in `AccessExclusiveLock` for CREATE, ALTER and DROP POLICY, and
/// ALTER TABLE … ENABLE/DISABLE/FORCE/NO FORCE ROW LEVEL SECURITY is an ALTER TABLE form
/// the documentation lists under no weaker lock.
pub(crate) fn render(op: &Op) -> Vec<Change> {
    render_op(op)
        .into_iter()
        .map(|c| c.lock(LockLevel::AccessExclusive))
        .collect()
}

fn render_op(op: &Op) -> Vec<Change> {
    match op {
        Op::Create { table, policy } => vec![Change::new(
            AREA,
            table.to_string(),
            create_summary(policy),
            create_sql(table, policy),
        )
        .hazard(Hazard::Locking)
        .record(&policy.name)
        .cache(policy.cache.clone())],
        Op::Replace { table, policy, why } => vec![
            // Not destructive: the policy is recreated in the same transaction.
            Change::new(
                AREA,
                table.to_string(),
                format!("drop policy {} to recreate it ({why})", policy.name),
                format!(
                    "DROP POLICY {} ON {}",
                    quote_ident(&policy.name),
                    table.quoted()
                ),
            )
            .hazard(Hazard::Locking),
            Change::new(
                AREA,
                table.to_string(),
                create_summary(policy),
                create_sql(table, policy),
            )
            .hazard(Hazard::Locking)
            .record(&policy.name)
            .cache(policy.cache.clone()),
        ],
        Op::Alter {
            table,
            name,
            roles,
            using,
            with_check,
            cache,
        } => {
            let mut sql = format!("ALTER POLICY {} ON {}", quote_ident(name), table.quoted());
            let mut what = Vec::new();
            if let Some(r) = roles {
                sql.push_str(&format!(" TO {}", roles_sql(r)));
                what.push(format!("roles to {}", roles_sql(r)));
            }
            sql.push_str(&clauses_sql(
                using.as_ref().map(|e| e.sql.as_str()),
                with_check.as_ref().map(|e| e.sql.as_str()),
            ));
            if using.is_some() {
                what.push("USING".into());
            }
            if with_check.is_some() {
                what.push("WITH CHECK".into());
            }
            vec![Change::new(
                AREA,
                table.to_string(),
                format!("alter policy {name}: {}", what.join(", ")),
                sql,
            )
            .hazard(Hazard::Locking)
            // Claims the policy, so a second policy altering it is refused as a conflict.
            .record(name.as_str())
            .cache(cache.clone())]
        }
        Op::Drop { table, name } => vec![Change::new(
            AREA,
            table.to_string(),
            format!("drop policy {name} (not listed; ownAllPolicies)"),
            format!("DROP POLICY {} ON {}", quote_ident(name), table.quoted()),
        )
        .hazard(Hazard::Destructive)
        .forget(name)],
        Op::Enable { table, on } => {
            let verb = if *on { "ENABLE" } else { "DISABLE" };
            vec![Change::new(
                AREA,
                table.to_string(),
                format!("{} row level security", verb.to_lowercase()),
                format!("ALTER TABLE {} {verb} ROW LEVEL SECURITY", table.quoted()),
            )
            .hazard(Hazard::Locking)]
        }
        Op::Force { table, on } => {
            let verb = if *on { "FORCE" } else { "NO FORCE" };
            vec![Change::new(
                AREA,
                table.to_string(),
                format!("{} row level security", verb.to_lowercase()),
                format!("ALTER TABLE {} {verb} ROW LEVEL SECURITY", table.quoted()),
            )
            .hazard(Hazard::Locking)]
        }
    }
}

/// Whether `change` (one [`render`] made) undoes a change that weakened the table's
/// protection, when it repairs drift: a policy dropped or altered by hand (recreated,
/// altered back), one added by hand (dropped: an extra permissive policy opens rows), or
/// RLS disabled or unforced by hand (enabled, forced again). Turning RLS off or unforcing
/// it, as the spec asks, repairs the opposite and is not one.
pub(crate) fn repairs_weakened_security(change: &Change) -> bool {
    if change.area != AREA {
        return false;
    }
    let sql = change.sql.as_str();
    sql.starts_with("CREATE POLICY ")
        || sql.starts_with("ALTER POLICY ")
        || sql.starts_with("DROP POLICY ")
        || sql.ends_with(" ENABLE ROW LEVEL SECURITY")
        || (sql.ends_with(" FORCE ROW LEVEL SECURITY")
            && !sql.ends_with(" NO FORCE ROW LEVEL SECURITY"))
}

/// The catalog as it will be after `ops` (for tests of convergence).
pub(crate) fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::Create { table, policy } | Op::Replace { table, policy, .. } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.policies.insert(policy.name.clone(), policy.state());
                }
            }
            Op::Alter {
                table,
                name,
                roles,
                using,
                with_check,
                cache: _,
            } => {
                if let Some(p) = next
                    .tables
                    .get_mut(table)
                    .and_then(|t| t.policies.get_mut(name))
                {
                    if let Some(r) = roles {
                        p.roles = r.clone();
                    }
                    if let Some(u) = using {
                        p.using = Some(u.normalized.clone());
                    }
                    if let Some(c) = with_check {
                        p.with_check = Some(c.normalized.clone());
                    }
                }
            }
            Op::Drop { table, name } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.policies.remove(name);
                }
            }
            Op::Enable { table, on } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.enabled = *on;
                }
            }
            Op::Force { table, on } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.force = *on;
                }
            }
        }
    }
    next
}
