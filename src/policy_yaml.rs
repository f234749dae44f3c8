//! Reading `DatabasePolicy` documents from a YAML stream (what `dbpolicy plan -f` and the
//! jobs read): every document of the stream, policies kept, other kinds named and skipped.
//!
//! A policy's `spec` is deserialised straight from the parser's events into the typed
//! structs, with no intermediate `serde_yaml::Value`: at thousands of tables the `Value`
//! (a hash map per YAML mapping) cost more than the typed spec itself. The fields that
//! decide whether a document is a policy (`kind`, `apiVersion`) come first in every
//! manifest; a document that puts `spec` before them has its `spec` read as a `Value` and
//! deserialised once its kind is known, with the same errors.

use std::fmt;

use kube::api::ObjectMeta;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_yaml::Value;

use crate::api::{
    DatabasePolicy, DatabasePolicySpec, DatabasePolicyStatus, API_GROUP, API_VERSION,
};
use crate::cli::PolicyFileError;

/// Reads every `DatabasePolicy` document of a YAML stream; other kinds are reported and
/// skipped, never silently. Errors name the document and the field
/// (`document 1: spec.autovacuum.tables[0].vacuumScaleFactor: invalid type: …`).
pub fn parse_policies(text: &str) -> Result<(Vec<DatabasePolicy>, Vec<String>), PolicyFileError> {
    check_flow_depth(text)?;
    let expected = format!("{API_GROUP}/{API_VERSION}");
    let mut policies = Vec::new();
    let mut skipped = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let seed = DocumentSeed {
            expected: &expected,
        };
        // serde_path_to_error names the field (`spec.autovacuum.tables[0].vacuumScaleFactor`).
        let mut track = serde_path_to_error::Track::new();
        let document = seed
            .deserialize(serde_path_to_error::Deserializer::new(doc, &mut track))
            .map_err(|source| at(n, track.path().to_string(), source))?;
        let Document::Map(d) = document else {
            if let Document::Other = document {
                skipped.push(format!(
                    "document {n}: kind \"\" is not a DatabasePolicy, skipped"
                ));
            }
            continue;
        };
        let kind = d.kind.as_ref().and_then(Value::as_str).unwrap_or("");
        if kind != "DatabasePolicy" {
            skipped.push(format!(
                "document {n}: kind {kind:?} is not a DatabasePolicy, skipped"
            ));
            continue;
        }
        let api_version = d.api_version.as_ref().and_then(Value::as_str).unwrap_or("");
        if api_version != expected {
            return Err(PolicyFileError::ApiVersion {
                document: n,
                found: api_version.to_string(),
                expected,
            });
        }
        let spec = match d.spec {
            Some(Spec::Typed(spec)) => *spec,
            Some(Spec::Buffered(v)) => typed(n, "spec", v)?,
            None => {
                let source = <serde_yaml::Error as de::Error>::missing_field("spec");
                return Err(PolicyFileError::Yaml {
                    document: n,
                    source,
                });
            }
        };
        let metadata: ObjectMeta = match d.metadata {
            Some(v) => typed(n, "metadata", v)?,
            None => ObjectMeta::default(),
        };
        let status: Option<DatabasePolicyStatus> = match d.status {
            Some(v) => typed(n, "status", v)?,
            None => None,
        };
        let mut policy = DatabasePolicy::new("", spec);
        policy.metadata = metadata;
        policy.status = status;
        policies.push(policy);
    }
    if policies.is_empty() {
        return Err(PolicyFileError::NoPolicy);
    }
    Ok((policies, skipped))
}

/// serde_yaml starts its messages with the path of the mapping or list it was in
/// (`spec.autovacuum.tables[0]: unknown field …`); the tracked path, which names the field
/// itself, replaces it. Its position (`at line 7 column 5`) is kept.
pub(crate) fn without_yaml_path(message: String, path: &str) -> String {
    match message.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && !head.contains(' ') && path.starts_with(head) => {
            rest.to_string()
        }
        _ => message,
    }
}

/// An error of document `document` at `path` (`.` for the document itself).
fn at(document: usize, path: String, source: serde_yaml::Error) -> PolicyFileError {
    if path == "." {
        PolicyFileError::Yaml { document, source }
    } else {
        PolicyFileError::Field {
            document,
            path,
            source,
        }
    }
}

/// A top-level field read as a `Value`, deserialised with its path (`metadata.name`).
fn typed<T: serde::de::DeserializeOwned>(
    document: usize,
    field: &str,
    value: Value,
) -> Result<T, PolicyFileError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            field.to_string()
        } else {
            format!("{field}.{path}")
        };
        at(document, path, e.into_inner())
    })
}

/// One document of the stream, as far as telling a policy from anything else goes.
enum Document {
    /// An empty document (`---` alone): ignored.
    Empty,
    /// A scalar or a list: not a policy.
    Other,
    Map(Box<Fields>),
}

/// The top-level fields of a mapping document that a policy uses; the rest is skipped.
#[derive(Default)]
struct Fields {
    api_version: Option<Value>,
    kind: Option<Value>,
    metadata: Option<Value>,
    spec: Option<Spec>,
    status: Option<Value>,
}

enum Spec {
    /// Read straight into the typed spec: `kind` and `apiVersion` came first and said
    /// this is a policy.
    Typed(Box<DatabasePolicySpec>),
    /// Read before the document said what it is.
    Buffered(Value),
}

struct DocumentSeed<'a> {
    expected: &'a str,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Document;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Document, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML document")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Document, E> {
        Ok(Document::Empty)
    }

    fn visit_none<E: de::Error>(self) -> Result<Document, E> {
        Ok(Document::Empty)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Document, E> {
        Ok(Document::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Document, E> {
        Ok(Document::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Document, E> {
        Ok(Document::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Document, E> {
        Ok(Document::Other)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Document, E> {
        Ok(Document::Other)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Document, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Document::Other)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Document, A::Error> {
        // A tagged document (`!Thing`): not a policy.
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant::<IgnoredAny>(variant)?;
        Ok(Document::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Value>()? {
            let slot = match key.as_str() {
                Some("apiVersion") => &mut f.api_version,
                Some("kind") => &mut f.kind,
                Some("metadata") => &mut f.metadata,
                Some("status") => &mut f.status,
                Some("spec") => {
                    if f.spec.is_some() {
                        return Err(de::Error::custom("duplicate entry with key \"spec\""));
                    }
                    let is_policy = f.kind.as_ref().and_then(Value::as_str)
                        == Some("DatabasePolicy")
                        && f.api_version.as_ref().and_then(Value::as_str) == Some(self.expected);
                    f.spec = Some(if is_policy {
                        Spec::Typed(Box::new(map.next_value()?))
                    } else {
                        Spec::Buffered(map.next_value()?)
                    });
                    continue;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(de::Error::custom(format_args!(
                    "duplicate entry with key {:?}",
                    key.as_str().unwrap_or_default()
                )));
            }
            *slot = Some(map.next_value()?);
        }
        Ok(Document::Map(Box::new(f)))
    }
}

/// Deeper than this, `[` and `{` never make a policy (serde_yaml stops at 128 levels).
pub(crate) const MAX_FLOW_DEPTH: usize = 1000;

/// libyaml's scanner is quadratic in the nesting depth of flow collections: a few hundred
/// kilobytes of `[` take minutes before serde_yaml's recursion limit refuses them. Counted
/// naively (brackets inside strings count too), in linear time, before parsing.
fn check_flow_depth(text: &str) -> Result<(), PolicyFileError> {
    // Bytes, not chars: the brackets are ASCII, and no byte of a multi-byte UTF-8
    // character is ASCII.
    let (mut depth, mut line) = (0usize, 1usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' => line += 1,
            _ => continue,
        }
        if depth > MAX_FLOW_DEPTH {
            return Err(PolicyFileError::TooDeep { line });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\n";
    const SPEC: &str = "spec:\n  database: {connectionSecretRef: {name: db}}\n  autovacuum: {tables: [{table: t, vacuumScaleFactor: 0.1}]}\n";

    #[test]
    fn spec_before_kind_reads_the_same_policy() {
        let first = format!("{HEADER}metadata: {{name: a, namespace: x}}\n{SPEC}");
        let last = format!("metadata: {{name: a, namespace: x}}\n{SPEC}{HEADER}");
        let (a, _) = parse_policies(&first).unwrap();
        let (b, _) = parse_policies(&last).unwrap();
        assert_eq!(a[0].spec, b[0].spec);
        assert_eq!(a[0].metadata, b[0].metadata);
        assert_eq!(a[0].metadata.name.as_deref(), Some("a"));
        assert_eq!(a[0].spec.autovacuum.as_ref().unwrap().tables.len(), 1);
    }

    #[test]
    fn errors_name_the_field_whichever_the_order() {
        let bad = "spec:\n  database: {connectionSecretRef: {name: db}}\n  autovacuum: {tables: [{table: t, vacuumScaleFactor: lots}]}\n";
        for text in [format!("{HEADER}{bad}"), format!("{bad}{HEADER}")] {
            let e = parse_policies(&text).unwrap_err().to_string();
            assert!(
                e.starts_with("document 1: spec.autovacuum.tables[0].vacuumScaleFactor: "),
                "{e}"
            );
        }
        let unknown = "spec:\n  database: {connectionSecretRef: {name: db}}\n  autovacuum: {tables: [{table: t, vacuumScaleFacter: 0.1}]}\n";
        let e = parse_policies(&format!("{HEADER}{unknown}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("document 1: spec.autovacuum.tables[0].vacuumScaleFacter: unknown field"),
            "{e}"
        );
        assert!(e.contains("at line 5 column"), "{e}");
        let missing = parse_policies(&format!("{HEADER}spec: {{}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("spec: missing field `database`"),
            "{missing}"
        );
        let meta = parse_policies(&format!("{HEADER}metadata: {{name: [a]}}\n{SPEC}"))
            .unwrap_err()
            .to_string();
        assert!(meta.starts_with("document 1: metadata.name: "), "{meta}");
        assert!(parse_policies(HEADER)
            .unwrap_err()
            .to_string()
            .contains("missing field `spec`"));
    }

    #[test]
    fn other_documents_are_skipped_by_name() {
        let text = format!("---\n---\njust text\n---\n[1, 2]\n---\nkind: Secret\nspec: {{x: 1}}\n---\n{HEADER}{SPEC}");
        let (policies, skipped) = parse_policies(&text).unwrap();
        assert_eq!(policies.len(), 1);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[2].contains("kind \"Secret\""), "{skipped:?}");
    }

    #[test]
    fn a_duplicate_top_level_key_is_an_error() {
        let e = parse_policies(&format!("{HEADER}{SPEC}{SPEC}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate"), "{e}");
        let e = parse_policies(&format!("{HEADER}kind: DatabasePolicy\n{SPEC}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate"), "{e}");
    }

    #[test]
    fn deep_flow_nesting_is_refused_with_its_line() {
        let e = check_flow_depth(&format!("a: 1\nb: {}", "[".repeat(MAX_FLOW_DEPTH + 1)))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(check_flow_depth("é: [[[]]]\n").is_ok());
    }
}
