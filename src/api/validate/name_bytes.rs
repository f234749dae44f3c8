//! The name-length walk: every string the CRD schema marks as a PostgreSQL name
//! (`maxLength: 63`) is checked in bytes. The spec is walked through its own `Serialize`
//! beside the schema, by a [`serde::Serializer`] that looks at each value as it is handed
//! over, instead of first building a `serde_json::Value` of the whole spec (at 5,000 tables,
//! tens of thousands of allocated strings and maps, for a check that almost never fires).
//! The fields seen, their paths and the order of the errors are those of a walk over
//! `serde_json::to_value(spec)`: object keys in byte order, list items in order.

use std::borrow::Cow;

use serde::ser::{self, Serialize};
use serde_json::Value;

use super::{err, ValidationError};
use crate::crd::NAME_BYTES;

/// The errors for every name field of `value` longer than [`NAME_BYTES`], `schema` being its
/// OpenAPI schema.
pub(super) fn check<T: Serialize + ?Sized>(schema: &Value, value: &T) -> Vec<ValidationError> {
    let mut state = State::default();
    if value
        .serialize(Walk {
            schema,
            state: &mut state,
        })
        .is_err()
    {
        // As `serde_json::to_value` would have failed: nothing to walk.
        return Vec::new();
    }
    // The serializer visits struct fields in declaration order; a `serde_json::Value`
    // object (without `preserve_order`) holds its keys sorted.
    state.found.sort_by(|a, b| a.0.cmp(&b.0));
    state
        .found
        .into_iter()
        .map(|(segments, message)| err(path(&segments), message))
        .collect()
}

/// One step of a path: an object key (a field's name, or a map's key) or a list index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    /// A struct field's name is `'static`: only a map's key is copied.
    Key(Cow<'static, str>),
    Index(usize),
}

/// `tables[0].policies[1].name`, as the `serde_json::Value` walk spelled it.
fn path(segments: &[Segment]) -> String {
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => {
                use std::fmt::Write as _;
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

#[derive(Default)]
struct State {
    /// Where the walk is: one buffer, extended and cut back on the way down.
    at: Vec<Segment>,
    found: Vec<(Vec<Segment>, String)>,
}

impl State {
    fn string(&mut self, schema: &Value, s: &str) {
        if s.len() > NAME_BYTES && schema["maxLength"].as_u64() == Some(NAME_BYTES as u64) {
            self.found.push((
                self.at.clone(),
                format!(
                    "{s:?} is {} bytes; PostgreSQL names are at most {NAME_BYTES} bytes (letters outside ASCII take 2 to 4 bytes each)",
                    s.len(),
                ),
            ));
        }
    }

    /// Walks `value` under the object key `key` of a value whose schema is `schema`.
    fn key<T: Serialize + ?Sized>(
        &mut self,
        schema: &Value,
        key: Cow<'static, str>,
        value: &T,
    ) -> Result<(), Error> {
        let sub = match schema["properties"].get(&*key) {
            Some(sub) => sub,
            None => &schema["additionalProperties"],
        };
        // Under no schema, no string can be a name: nothing below needs a look.
        if sub.is_null() {
            return Ok(());
        }
        self.at.push(Segment::Key(key));
        let walked = value.serialize(Walk {
            schema: sub,
            state: self,
        });
        self.at.pop();
        walked
    }

    fn index<T: Serialize + ?Sized>(
        &mut self,
        items: &Value,
        index: usize,
        value: &T,
    ) -> Result<(), Error> {
        if items.is_null() {
            return Ok(());
        }
        self.at.push(Segment::Index(index));
        let walked = value.serialize(Walk {
            schema: items,
            state: self,
        });
        self.at.pop();
        walked
    }
}

/// A value the walk cannot see as JSON (`serde_json::to_value` refuses it too).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Error(String);

impl ser::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// The serializer of one value whose schema is `schema`.
struct Walk<'a> {
    schema: &'a Value,
    state: &'a mut State,
}

/// A list, map or struct being walked. `variant`: the value is `{variant: …}` in JSON (a
/// tuple or struct variant), whose key segment is popped at the end.
struct Compound<'a> {
    schema: &'a Value,
    state: &'a mut State,
    next: usize,
    key: Option<String>,
    variant: bool,
}

impl<'a> Walk<'a> {
    fn compound(self, variant: Option<&'static str>, items: bool) -> Compound<'a> {
        let mut schema = self.schema;
        if let Some(v) = variant {
            schema = match schema["properties"].get(v) {
                Some(sub) => sub,
                None => &schema["additionalProperties"],
            };
            self.state.at.push(Segment::Key(Cow::Borrowed(v)));
        }
        if items {
            schema = &schema["items"];
        }
        Compound {
            schema,
            state: self.state,
            next: 0,
            key: None,
            variant: variant.is_some(),
        }
    }
}

impl Compound<'_> {
    fn end(self) -> Result<(), Error> {
        if self.variant {
            self.state.at.pop();
        }
        Ok(())
    }

    fn item<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let i = self.next;
        self.next += 1;
        self.state.index(self.schema, i, value)
    }
}

impl<'a> ser::Serializer for Walk<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn serialize_bool(self, _: bool) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_f32(self, _: f32) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_f64(self, _: f64) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_char(self, c: char) -> Result<(), Error> {
        self.state.string(self.schema, c.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, s: &str) -> Result<(), Error> {
        self.state.string(self.schema, s);
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        self.state.string(self.schema, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.state.key(self.schema, Cow::Borrowed(variant), value)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a>, Error> {
        Ok(self.compound(None, true))
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound<'a>, Error> {
        Ok(self.compound(None, true))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, Error> {
        Ok(self.compound(None, true))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, Error> {
        Ok(self.compound(Some(variant), true))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'a>, Error> {
        Ok(self.compound(None, false))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>, Error> {
        Ok(self.compound(None, false))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>, Error> {
        Ok(self.compound(Some(variant), false))
    }
}

impl ser::SerializeSeq for Compound<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.item(value)
    }
    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

impl ser::SerializeTuple for Compound<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.item(value)
    }
    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

impl ser::SerializeTupleStruct for Compound<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.item(value)
    }
    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

impl ser::SerializeTupleVariant for Compound<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.item(value)
    }
    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        self.key = Some(key.serialize(KeyName)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self
            .key
            .take()
            .ok_or_else(|| <Error as ser::Error>::custom("a map value without its key"))?;
        self.state.key(self.schema, Cow::Owned(key), value)
    }
    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

impl ser::SerializeStruct for Compound<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.state.key(self.schema, Cow::Borrowed(key), value)
    }
    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

impl ser::SerializeStructVariant for Compound<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.state.key(self.schema, Cow::Borrowed(key), value)
    }
    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

/// A map key as `serde_json::to_value` spells it: strings, and numbers, booleans and
/// characters as their text; anything else is refused.
struct KeyName;

impl ser::Serializer for KeyName {
    type Ok = String;
    type Error = Error;
    type SerializeSeq = ser::Impossible<String, Error>;
    type SerializeTuple = ser::Impossible<String, Error>;
    type SerializeTupleStruct = ser::Impossible<String, Error>;
    type SerializeTupleVariant = ser::Impossible<String, Error>;
    type SerializeMap = ser::Impossible<String, Error>;
    type SerializeStruct = ser::Impossible<String, Error>;
    type SerializeStructVariant = ser::Impossible<String, Error>;

    fn serialize_bool(self, v: bool) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i8(self, v: i8) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i16(self, v: i16) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i32(self, v: i32) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_i64(self, v: i64) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u8(self, v: u8) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u16(self, v: u16) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u32(self, v: u32) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_u64(self, v: u64) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_f32(self, _: f32) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_f64(self, _: f64) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_char(self, v: char) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_str(self, v: &str) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_none(self) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit(self) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<String, Error> {
        Ok(variant.to_string())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<String, Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(key_must_be_a_string())
    }
}

fn key_must_be_a_string() -> Error {
    Error("key must be a string".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The `serde_json::Value` walk this replaces, kept as the reference.
    fn by_value(schema: &Value, value: &Value, path: &mut String, out: &mut Vec<String>) {
        match value {
            Value::String(s)
                if schema["maxLength"].as_u64() == Some(NAME_BYTES as u64)
                    && s.len() > NAME_BYTES =>
            {
                out.push(path.clone());
            }
            Value::Object(map) => {
                for (k, v) in map {
                    let sub = if schema["properties"].get(k).is_some() {
                        &schema["properties"][k]
                    } else {
                        &schema["additionalProperties"]
                    };
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    by_value(sub, v, path, out);
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    by_value(&schema["items"], v, path, out);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }

    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Item {
        zeta_name: String,
        alpha_name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        other: Option<String>,
        tags: std::collections::BTreeMap<String, String>,
        kind: Kind,
    }

    #[derive(serde::Serialize)]
    enum Kind {
        Plain,
        Named(String),
        Pair(String, String),
        Shaped { name: String },
    }

    #[test]
    fn finds_what_the_value_walk_finds_in_the_same_order() {
        let name = json!({"type": "string", "maxLength": 63});
        let schema = json!({
            "properties": {
                "items": {"items": {"properties": {
                    "zetaName": name, "alphaName": name, "other": {"type": "string"},
                    "tags": {"additionalProperties": name},
                    "kind": {"maxLength": 63, "properties": {
                        "Named": name, "Pair": {"items": name},
                        "Shaped": {"properties": {"name": name}},
                    }},
                }}},
            },
        });
        let long = "x".repeat(64);
        let at_limit = "я".repeat(31);
        let item = |kind| Item {
            zeta_name: long.clone(),
            alpha_name: Some(long.clone()),
            other: Some(long.clone()),
            tags: [("b", &long), ("a", &at_limit), ("c", &long)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            kind,
        };
        let mut items: Vec<Item> = vec![
            item(Kind::Plain),
            item(Kind::Named(long.clone())),
            item(Kind::Pair(at_limit.clone(), long.clone())),
            item(Kind::Shaped { name: long.clone() }),
        ];
        items.extend((0..8).map(|_| item(Kind::Plain)));
        let value = json!({"items": serde_json::to_value(&items).unwrap()});
        let mut expected = Vec::new();
        by_value(&schema, &value, &mut String::new(), &mut expected);
        let spec = std::collections::BTreeMap::from([("items", &items)]);
        let found: Vec<String> = check(&schema, &spec).into_iter().map(|e| e.path).collect();
        assert_eq!(found, expected);
        assert!(
            found.contains(&"items[1].kind.Named".to_string()),
            "{found:?}"
        );
        assert!(
            found.contains(&"items[2].kind.Pair[1]".to_string()),
            "{found:?}"
        );
        assert!(
            found.contains(&"items[3].kind.Shaped.name".to_string()),
            "{found:?}"
        );
        assert!(found.contains(&"items[10].tags.c".to_string()), "{found:?}");
        assert!(found
            .iter()
            .all(|p| !p.ends_with("other") && !p.ends_with(".a")));
    }

    #[test]
    fn message_names_the_bytes() {
        let schema = json!({"properties": {"name": {"maxLength": 63}}});
        let long = "я".repeat(40);
        let errors = check(
            &schema,
            &std::collections::BTreeMap::from([("name", &long)]),
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "name");
        assert!(errors[0].message.contains("is 80 bytes"), "{errors:?}");
    }
}
