//! Turning one change event into one Kinesis record: the Extended JSON payload and the
//! partition key. Pure code, no I/O.

use std::io;

use bson::{Bson, Document};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Kinesis rejects a record whose data plus partition key exceeds 1 MiB.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Kinesis partition keys are 1 to 256 Unicode code units; we keep them to 256 bytes.
pub const MAX_PARTITION_KEY_BYTES: usize = 256;

/// How an event is written as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordFormat {
    /// Relaxed Extended JSON v2, as `bson.json_util.dumps` of pymongo 4 writes it.
    #[default]
    Relaxed,
    /// Canonical Extended JSON v2 (every number typed).
    Canonical,
}

/// A dotted path into the event, such as `documentKey._id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parses `a.b.c`; empty segments are rejected.
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<String> = s.split('.').map(str::to_owned).collect();
        if parts.iter().any(String::is_empty) {
            return None;
        }
        Some(Self(parts))
    }

    /// The value at this path, if every segment exists and leads through documents.
    pub fn lookup<'a>(&self, doc: &'a Document) -> Option<&'a Bson> {
        let (first, rest) = self.0.split_first()?;
        let mut value = doc.get(first)?;
        for part in rest {
            value = match value {
                Bson::Document(d) => d.get(part)?,
                _ => return None,
            };
        }
        Some(value)
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// The partition key for an event: the value at `path` rendered as a string. ObjectIds give
/// their 24 hex characters, strings themselves, anything else its relaxed Extended JSON.
/// Keys over 256 bytes become the hex SHA-256 of the rendering, which is stable across
/// processes and versions. Events without a value at `path` (drop, rename, invalidate, ...)
/// are keyed by their namespace so that collection-level events stay in order with each other.
pub fn partition_key(event: &Document, path: &FieldPath) -> String {
    let rendered = match path.lookup(event) {
        Some(Bson::ObjectId(oid)) => oid.to_hex(),
        Some(Bson::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => other.clone().into_relaxed_extjson().to_string(),
        None => namespace(event).unwrap_or_else(|| "(no-key)".to_owned()),
    };
    if rendered.len() > MAX_PARTITION_KEY_BYTES {
        hex(&Sha256::digest(rendered.as_bytes()))
    } else {
        rendered
    }
}

fn namespace(event: &Document) -> Option<String> {
    let ns = event.get_document("ns").ok()?;
    let db = ns.get_str("db").ok()?;
    Some(match ns.get_str("coll") {
        Ok(coll) => format!("{db}.{coll}"),
        Err(_) => db.to_owned(),
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Serializes an event the way Python's `json.dumps` does (`", "` and `": "` separators,
/// non-ASCII escaped as `\uXXXX`), so that consumers of the old tool see the same bytes.
pub fn encode(event: &Document, format: RecordFormat) -> Vec<u8> {
    let value = match format {
        RecordFormat::Relaxed => Bson::Document(event.clone()).into_relaxed_extjson(),
        RecordFormat::Canonical => Bson::Document(event.clone()).into_canonical_extjson(),
    };
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    // Serializing a serde_json::Value into a Vec cannot fail.
    let _ = value.serialize(&mut ser);
    out
}

/// `serde_json` formatter reproducing Python's default `json.dumps` layout.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        let mut buf = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut buf) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId};

    fn path(s: &str) -> FieldPath {
        FieldPath::parse(s).expect("valid path")
    }

    #[test]
    fn object_id_key_is_hex() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let ev = doc! {"documentKey": {"_id": oid}};
        assert_eq!(
            partition_key(&ev, &path("documentKey._id")),
            "65a1b2c3d4e5f60718293a4b"
        );
    }

    #[test]
    fn string_int_and_compound_keys() {
        let ev = doc! {"documentKey": {"_id": "abc"}};
        assert_eq!(partition_key(&ev, &path("documentKey._id")), "abc");
        let ev = doc! {"documentKey": {"_id": 42_i64}};
        assert_eq!(partition_key(&ev, &path("documentKey._id")), "42");
        let ev = doc! {"documentKey": {"_id": {"a": 1, "b": "x"}}};
        assert_eq!(
            partition_key(&ev, &path("documentKey._id")),
            r#"{"a":1,"b":"x"}"#
        );
    }

    #[test]
    fn missing_key_falls_back_to_namespace() {
        let ev = doc! {"operationType": "drop", "ns": {"db": "shop", "coll": "orders"}};
        assert_eq!(partition_key(&ev, &path("documentKey._id")), "shop.orders");
        let ev = doc! {"operationType": "dropDatabase", "ns": {"db": "shop"}};
        assert_eq!(partition_key(&ev, &path("documentKey._id")), "shop");
    }

    #[test]
    fn long_keys_are_hashed_stably() {
        let long = "k".repeat(300);
        let ev = doc! {"documentKey": {"_id": long.clone()}};
        let key = partition_key(&ev, &path("documentKey._id"));
        assert_eq!(key.len(), 64);
        assert_eq!(key, hex(&Sha256::digest(long.as_bytes())));
        let exact = "k".repeat(256);
        let ev = doc! {"documentKey": {"_id": exact.clone()}};
        assert_eq!(partition_key(&ev, &path("documentKey._id")), exact);
    }

    #[test]
    fn bad_paths_are_rejected() {
        assert!(FieldPath::parse("a..b").is_none());
        assert!(FieldPath::parse("").is_none());
        assert_eq!(path("a.b").to_string(), "a.b");
    }

    #[test]
    fn encoding_matches_python_json_dumps_layout() {
        let ev = doc! {"a": 1, "b": [1, 2_i64], "s": "é😀", "n": {"x": 1.5}};
        let out = String::from_utf8(encode(&ev, RecordFormat::Relaxed)).unwrap();
        assert_eq!(
            out,
            r#"{"a": 1, "b": [1, 2], "s": "\u00e9\ud83d\ude00", "n": {"x": 1.5}}"#
        );
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back["s"], "é😀");
    }

    #[test]
    fn canonical_types_every_number() {
        let ev = doc! {"a": 1, "b": 2_i64};
        let out = String::from_utf8(encode(&ev, RecordFormat::Canonical)).unwrap();
        assert_eq!(
            out,
            r#"{"a": {"$numberInt": "1"}, "b": {"$numberLong": "2"}}"#
        );
    }

    #[test]
    fn field_order_is_preserved() {
        let ev = doc! {"z": 1, "a": 2, "m": 3};
        let out = String::from_utf8(encode(&ev, RecordFormat::Relaxed)).unwrap();
        assert_eq!(out, r#"{"z": 1, "a": 2, "m": 3}"#);
    }
}
