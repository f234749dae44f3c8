//! What the Events of a reconcile say: pure builders naming the objects that drifted and
//! what was done about them, within the API's note limit. Drift that weakened row-level
//! security (a policy dropped, altered or added by hand, RLS disabled or unforced) is a
//! Warning: someone may have opened rows to everyone, even if it is repaired now.

use std::collections::BTreeMap;

use kube::runtime::events::EventType;

use crate::engine::areas::rls::repairs_weakened_security;
use crate::engine::{Area, Change};
use crate::reason::Reason;

/// Room for the list of changes in a note (the API caps notes at 1 KiB; the rest of the
/// sentence and a "… and N more" fit in what is left).
const LIST_BUDGET: usize = 760;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    pub type_: EventType,
    pub reason: Reason,
    pub note: String,
}

/// `area target: summary; …`, whole entries only, then `… and N more`.
pub(crate) fn list(changes: &[&Change]) -> String {
    let mut out = String::new();
    for (i, c) in changes.iter().enumerate() {
        let entry = format!("{} {}: {}", c.area, c.target, c.summary);
        let sep = if out.is_empty() { "" } else { "; " };
        if out.len() + sep.len() + entry.len() > LIST_BUDGET {
            if out.is_empty() {
                // One entry longer than the budget: cut it at a character boundary.
                let mut end = LIST_BUDGET;
                while !entry.is_char_boundary(end) {
                    end -= 1;
                }
                out.push_str(&entry[..end]);
                out.push('…');
                if i + 1 < changes.len() {
                    out.push_str(&format!(" and {} more", changes.len() - i - 1));
                }
            } else {
                out.push_str(&format!("; … and {} more", changes.len() - i));
            }
            return out;
        }
        out.push_str(sep);
        out.push_str(&entry);
    }
    out
}

fn counts(changes: &[&Change]) -> String {
    let mut m: BTreeMap<Area, usize> = BTreeMap::new();
    for c in changes {
        *m.entry(c.area).or_insert(0) += 1;
    }
    super::status::counts_note(&m)
}

/// The Event of a check that found drift. `drifted` are the changes that undo it (the
/// plan's changes in the drifted areas); `repaired` says whether they were all applied.
pub(crate) fn drift(drifted: &[&Change], repaired: bool) -> Note {
    let weakened: Vec<&Change> = drifted
        .iter()
        .copied()
        .filter(|c| repairs_weakened_security(c))
        .collect();
    let (type_, reason) = match (weakened.is_empty(), repaired) {
        (true, true) => (EventType::Normal, Reason::DriftRepaired),
        (true, false) => (EventType::Normal, Reason::DriftDetected),
        (false, true) => (EventType::Warning, Reason::SecurityDriftRepaired),
        (false, false) => (EventType::Warning, Reason::SecurityDriftDetected),
    };
    let done = if repaired { "repaired" } else { "not repaired" };
    // The security-relevant changes first, so that the cap never hides them.
    let mut ordered = weakened.clone();
    ordered.extend(
        drifted
            .iter()
            .copied()
            .filter(|c| !repairs_weakened_security(c)),
    );
    let lead = if weakened.is_empty() {
        "the database differed from the policy".to_string()
    } else {
        format!(
            "row-level security was weakened outside the policy ({} change(s) to undo it); the database differed from the policy",
            weakened.len()
        )
    };
    Note {
        type_,
        reason,
        note: format!("{lead} ({}), {done}: {}", counts(drifted), list(&ordered)),
    }
}

/// The Event of a change set applied for other reasons than drift (a spec edit, a first
/// run): counts by area, then what each change was.
pub(crate) fn applied(changes: &[&Change]) -> Note {
    Note {
        type_: EventType::Normal,
        reason: Reason::Applied,
        note: format!(
            "applied {} change(s) ({}): {}",
            changes.len(),
            counts(changes),
            list(changes)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(name: &str) -> Change {
        Change::new(
            Area::FeatureFlags,
            name,
            format!("set {name} enabled=true"),
            "UPDATE …",
        )
    }

    fn rls(sql: &str, summary: &str) -> Change {
        Change::new(Area::RowLevelSecurity, "public.answers", summary, sql)
    }

    #[test]
    fn drift_names_each_object_and_what_was_done() {
        let a = flag("new_quiz_engine");
        let n = drift(&[&a], true);
        assert_eq!(
            (n.type_, n.reason),
            (EventType::Normal, Reason::DriftRepaired)
        );
        assert_eq!(
            n.note,
            "the database differed from the policy (featureFlags 1), repaired: featureFlags new_quiz_engine: set new_quiz_engine enabled=true"
        );
        let n = drift(&[&a], false);
        assert_eq!(n.reason, "DriftDetected");
        assert!(n
            .note
            .contains("not repaired: featureFlags new_quiz_engine"));
    }

    #[test]
    fn weakened_row_level_security_is_a_warning_and_listed_first() {
        let a = flag("f");
        let create = rls(
            "CREATE POLICY own ON public.answers AS PERMISSIVE FOR ALL TO PUBLIC USING (true)",
            "create policy own (All, Permissive, to PUBLIC)",
        );
        let enable = rls(
            "ALTER TABLE public.answers ENABLE ROW LEVEL SECURITY",
            "enable row level security",
        );
        let n = drift(&[&a, &create, &enable], true);
        assert_eq!(
            (n.type_, n.reason),
            (EventType::Warning, Reason::SecurityDriftRepaired)
        );
        assert!(
            n.note.starts_with(
                "row-level security was weakened outside the policy (2 change(s) to undo it)"
            ),
            "{}",
            n.note
        );
        let listed = n.note.split(": ").skip(1).collect::<Vec<_>>().join(": ");
        assert!(
            listed.starts_with("rowLevelSecurity public.answers: create policy own"),
            "{listed}"
        );
        assert!(
            n.note.ends_with("featureFlags f: set f enabled=true"),
            "{}",
            n.note
        );
        assert_eq!(drift(&[&create], false).reason, "SecurityDriftDetected");
        // Turning RLS off, as the spec asks, is ordinary drift.
        let disable = rls(
            "ALTER TABLE public.answers DISABLE ROW LEVEL SECURITY",
            "disable row level security",
        );
        assert_eq!(drift(&[&disable], true).type_, EventType::Normal);
    }

    #[test]
    fn notes_stay_within_the_api_limit_with_whole_entries_and_a_count() {
        let many: Vec<Change> = (0..500).map(|i| flag(&format!("flag_{i:03}"))).collect();
        let refs: Vec<&Change> = many.iter().collect();
        for n in [drift(&refs, true), applied(&refs)] {
            assert!(n.note.len() <= 1000, "{} bytes", n.note.len());
            assert!(n.note.contains("featureFlags 500"), "{}", n.note);
            let more: usize = n
                .note
                .rsplit("… and ")
                .next()
                .and_then(|t| t.strip_suffix(" more"))
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("no count in {}", n.note));
            let shown = n.note.matches("featureFlags flag_").count();
            assert_eq!(shown + more, 500, "{}", n.note);
        }
        // One huge entry (a hostile name) is cut at a character boundary.
        let huge = flag(&"é".repeat(2000));
        let n = applied(&[&huge, &huge]);
        assert!(n.note.len() <= 1000, "{}", n.note.len());
        assert!(n.note.ends_with("… and 1 more"), "{}", n.note);
    }
}
