//! Turning one change event into one Kinesis record: the Extended JSON payload and the
//! partition key. Pure code, no I/O.

use std::io;

use bson::raw::{RawBsonRef, RawDocument};
use bson::RawBson;
use bson::{Bson, Document};
use serde::Serialize;

use crate::bson_walk::{self, Malformed};
use sha2::{Digest, Sha256};

/// Kinesis rejects a record whose data plus partition key exceeds 1 MiB on a stream at the
/// default; a stream can be raised to 10 MiB ([`crate::stream_limits`]). A record over this
/// keeps its `documentKey`, so that it can be named should it exceed its stream's limit.
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
    /// Byte for byte what the old Python tool wrote: `bson.json_util.dumps` of pymongo 3
    /// (3.13) with its default options (`LEGACY_JSON_OPTIONS`), applied to an event that pymongo
    /// 3 decoded with its default codec options. Kept for consumers that parse those records
    /// and must not see a change when the tool is replaced.
    ///
    /// Not Extended JSON v2 and not always strict JSON: dates are `{"$date": <millis>}`
    /// (negative before 1970), 64-bit integers plain numbers, doubles Python's `repr` (`1.0`,
    /// `1e+16`, `1e-07`, and the bare tokens `NaN`, `Infinity`, `-Infinity`), binaries
    /// `{"$binary": <base64>, "$type": "<2 hex digits>"}` except UUIDs (subtypes 3 and 4,
    /// 16 bytes), which pymongo 3 decoded to `uuid.UUID` and wrote as `{"$uuid": <32 hex>}`,
    /// regexes `{"$regex", "$options"}` with options reordered to `ilmsux` and others dropped,
    /// symbols plain strings, undefined `null`, DBPointers `{"$ref", "$id"}`, and any embedded
    /// document with a `$ref` key rewritten as a DBRef (`$ref`, `$id` (null if absent), `$db`
    /// if set, then the other keys).
    ///
    /// Some values could not be decoded by pymongo 3 at all, so the old tool had no output to
    /// match; they are written in the nearest form: dates outside years 1 to 9999 (still
    /// `{"$date": <millis>}`), UUID-subtype binaries that are not 16 bytes (written as
    /// `$binary`), and `$ref` documents whose `$ref` is not a string or `$db` neither a string
    /// nor null (written as plain documents).
    Legacy,
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

    /// The rest of the path below `root`, the value of its first segment.
    fn descend<'a>(
        &self,
        root: Option<RawBsonRef<'a>>,
    ) -> bson::error::Result<Option<RawBsonRef<'a>>> {
        let Some(mut value) = root else {
            return Ok(None);
        };
        for part in self.0.iter().skip(1) {
            value = match value {
                RawBsonRef::Document(d) => match d.get(part)? {
                    Some(v) => v,
                    None => return Ok(None),
                },
                _ => return Ok(None),
            };
        }
        Ok(Some(value))
    }

    /// Whether a path into `fullDocument`, which has a twin in the pre-image.
    fn in_full_document(&self) -> bool {
        self.0.first().is_some_and(|f| f == "fullDocument")
    }
}

impl FieldPath {
    /// The same path in the pre-image (`fullDocument.x` -> `fullDocumentBeforeChange.x`),
    /// where an event without a current document (a delete; an update whose document was
    /// deleted before the lookup) may still carry the field its key is read from.
    pub fn pre_image(&self) -> Option<FieldPath> {
        let (first, rest) = self.0.split_first()?;
        (first == "fullDocument").then(|| {
            let mut parts = vec!["fullDocumentBeforeChange".to_owned()];
            parts.extend(rest.iter().cloned());
            FieldPath(parts)
        })
    }

    /// Whether every event of a document carries this path: `documentKey` (its `_id`, and a
    /// sharded collection's shard key fields) is in every change event of the document.
    pub fn in_document_key(&self) -> bool {
        self.0.first().is_some_and(|f| f == "documentKey")
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// A BSON value as relaxed Extended JSON text, for keys, logs and messages.
pub fn to_text(value: &Bson) -> String {
    value.clone().into_relaxed_extjson().to_string()
}

/// The partition key for an event: the value at `path` rendered as a string. ObjectIds give
/// their 24 hex characters, strings themselves, anything else its relaxed Extended JSON.
/// Keys over 256 bytes become the hex SHA-256 of the rendering, which is stable across
/// processes and versions. Events without a value at `path` (drop, rename, invalidate, ...)
/// are keyed by their namespace so that collection-level events stay in order with each other.
/// A path into `fullDocument` is looked up in `fullDocumentBeforeChange` where the event has no
/// current document (a delete carries the pre-image when `full_document_before_change` is on).
pub fn partition_key(event: &Document, path: &FieldPath) -> String {
    let value = path
        .lookup(event)
        .or_else(|| path.pre_image().and_then(|p| p.lookup(event)));
    let rendered = match value {
        Some(Bson::ObjectId(oid)) => oid.to_hex(),
        Some(Bson::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => to_text(other),
        None => namespace(event).unwrap_or_else(|| "(no-key)".to_owned()),
    };
    bounded_key(rendered)
}

/// [`partition_key`] read from the raw event (as [`EventRecord::from_raw`] reads it).
pub fn partition_key_raw(event: &RawDocument, path: &FieldPath) -> bson::error::Result<String> {
    let mut top = Top::new(path);
    top.scan(event)?;
    top.partition_key()
}

/// A partition key from the value found at the key's path, or else the namespace.
fn render_key_raw(
    value: Option<RawBsonRef<'_>>,
    ns: Option<&RawDocument>,
) -> bson::error::Result<String> {
    let rendered = match value {
        Some(RawBsonRef::ObjectId(oid)) => oid.to_hex(),
        Some(RawBsonRef::String(s)) if !s.is_empty() => s.to_owned(),
        // What `to_text` writes for them, without building a JSON value.
        Some(RawBsonRef::Int32(n)) => itoa::Buffer::new().format(n).to_owned(),
        Some(RawBsonRef::Int64(n)) => itoa::Buffer::new().format(n).to_owned(),
        Some(other) => to_text(&Bson::try_from(RawBson::from(other))?),
        None => ns
            .and_then(namespace_raw)
            .unwrap_or_else(|| "(no-key)".to_owned()),
    };
    Ok(bounded_key(rendered))
}

fn bounded_key(rendered: String) -> String {
    if rendered.len() > MAX_PARTITION_KEY_BYTES {
        hex(&Sha256::digest(rendered.as_bytes()))
    } else {
        rendered
    }
}

/// What the pipeline takes from one change event: its position, its operation and its
/// Kinesis record.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// The resume token (`_id`); an event without one cannot be checkpointed.
    pub token: Option<crate::ack::Token>,
    pub cluster_time: Option<bson::Timestamp>,
    pub operation: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// `documentKey`, kept only for a record over [`MAX_RECORD_BYTES`] (to name it if it is over
    /// its stream's limit, which is never lower).
    pub document_key: Option<Bson>,
}

/// The top-level fields of a raw event that [`EventRecord::from_raw`] reads, each the first
/// element of its name (as `RawDocument::get` finds it).
struct Top<'a, 'k> {
    key: &'k FieldPath,
    id: Option<RawBsonRef<'a>>,
    cluster_time: Option<RawBsonRef<'a>>,
    operation: Option<RawBsonRef<'a>>,
    document_key: Option<RawBsonRef<'a>>,
    ns: Option<RawBsonRef<'a>>,
    /// The value of the partition key path's first segment.
    key_root: Option<RawBsonRef<'a>>,
    /// `fullDocumentBeforeChange`, where the key's path has a twin there.
    pre_image_root: Option<RawBsonRef<'a>>,
    /// A field read here had a type [`walked_ref`] does not take: read the event with bson.
    unread: bool,
}

impl<'a, 'k> Top<'a, 'k> {
    fn new(key: &'k FieldPath) -> Self {
        Self {
            key,
            id: None,
            cluster_time: None,
            operation: None,
            document_key: None,
            ns: None,
            key_root: None,
            pre_image_root: None,
            unread: false,
        }
    }

    /// [`Self::see`] of a walked element, reading the value only when its name is wanted.
    fn see_walked(&mut self, name: &'a str, kind: u8, value: &'a [u8]) {
        let wanted = matches!(
            name,
            "_id" | "clusterTime" | "operationType" | "documentKey" | "ns"
        ) || (name == "fullDocumentBeforeChange" && self.key.in_full_document())
            || self.key.0.first().is_some_and(|first| first == name);
        if wanted {
            match walked_ref(kind, value) {
                Some(value) => self.see(name, value),
                None => self.unread = true,
            }
        }
    }

    fn see(&mut self, name: &str, value: RawBsonRef<'a>) {
        let slot = match name {
            "_id" => &mut self.id,
            "clusterTime" => &mut self.cluster_time,
            "operationType" => &mut self.operation,
            "documentKey" => &mut self.document_key,
            "ns" => &mut self.ns,
            "fullDocumentBeforeChange" if self.key.in_full_document() => &mut self.pre_image_root,
            _ => &mut None,
        };
        slot.get_or_insert(value);
        if self.key.0.first().is_some_and(|first| first == name) {
            self.key_root.get_or_insert(value);
        }
    }

    /// Notes the fields of `event` without writing anything.
    fn scan(&mut self, event: &'a RawDocument) -> bson::error::Result<()> {
        for element in event {
            let (name, value) = element?;
            self.see(name.as_str(), value);
        }
        Ok(())
    }

    /// The value at the key's path, in the pre-image where the event has none and the path
    /// has a twin there, rendered; else the namespace.
    fn partition_key(&self) -> bson::error::Result<String> {
        let mut value = self.key.descend(self.key_root)?;
        if value.is_none() && self.key.in_full_document() {
            value = self.key.descend(self.pre_image_root)?;
        }
        let ns = match self.ns {
            Some(RawBsonRef::Document(ns)) => Some(ns),
            _ => None,
        };
        render_key_raw(value, ns)
    }
}

impl EventRecord {
    /// Reads the event straight from its raw BSON (the hot path). An error means the event
    /// is malformed or holds invalid UTF-8: decode it leniently and use [`Self::from_document`].
    pub fn from_raw(
        event: &RawDocument,
        key: &FieldPath,
        format: RecordFormat,
    ) -> bson::error::Result<Self> {
        // One pass over the event's top level writes the record and finds the fields read
        // below (each `RawDocument::get` would walk the elements again).
        let mut top = Top::new(key);
        let data = match format {
            RecordFormat::Legacy => {
                top.scan(event)?;
                encode_legacy(&Document::try_from(event)?)
            }
            RecordFormat::Relaxed | RecordFormat::Canonical => {
                let canonical = format == RecordFormat::Canonical;
                let mut out = Vec::with_capacity(encoded_capacity(event));
                let walked = walk_fields(&mut out, event.as_bytes(), canonical, |n, k, v| {
                    top.see_walked(n, k, v)
                });
                if walked.is_err() || top.unread {
                    out.clear();
                    top = Top::new(key);
                    write_raw_fields(&mut out, event, canonical, |name, value| {
                        top.see(name, value)
                    })?;
                }
                out
            }
        };
        let partition_key = top.partition_key()?;
        let owned =
            |v: Option<RawBsonRef<'_>>| v.map(|v| Bson::try_from(RawBson::from(v))).transpose();
        let document_key = if data.len() + partition_key.len() > MAX_RECORD_BYTES {
            owned(top.document_key)?
        } else {
            None
        };
        Ok(Self {
            token: top.id.map(crate::ack::Token::from_raw).transpose()?,
            cluster_time: match top.cluster_time {
                Some(RawBsonRef::Timestamp(t)) => Some(t),
                _ => None,
            },
            operation: match top.operation {
                Some(RawBsonRef::String(op)) => op,
                _ => "unknown",
            }
            .to_owned(),
            partition_key,
            data,
            document_key,
        })
    }

    /// The same from a decoded event.
    pub fn from_document(event: Document, key: &FieldPath, format: RecordFormat) -> Self {
        let partition_key = partition_key(&event, key);
        let token = event.get("_id").cloned().map(crate::ack::Token::from);
        let cluster_time = event.get_timestamp("clusterTime").ok();
        let operation = event
            .get_str("operationType")
            .unwrap_or("unknown")
            .to_owned();
        let document_key = event.get("documentKey").cloned();
        let data = encode_owned(event, format);
        let document_key =
            document_key.filter(|_| data.len() + partition_key.len() > MAX_RECORD_BYTES);
        Self {
            token,
            cluster_time,
            operation,
            partition_key,
            data,
            document_key,
        }
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

fn namespace_raw(ns: &RawDocument) -> Option<String> {
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
    match format {
        RecordFormat::Legacy => encode_legacy(event),
        _ => encode_owned(event.clone(), format),
    }
}

/// [`encode`] for a caller that no longer needs the event: the Extended JSON formats consume
/// the document, so taking it saves a deep copy of every event on the hot path.
pub fn encode_owned(event: Document, format: RecordFormat) -> Vec<u8> {
    let value = match format {
        RecordFormat::Relaxed => unclamped_dates(Bson::Document(event)).into_relaxed_extjson(),
        RecordFormat::Canonical => Bson::Document(event).into_canonical_extjson(),
        RecordFormat::Legacy => return encode_legacy(&event),
    };
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    // Serializing a serde_json::Value into a Vec cannot fail.
    let _ = value.serialize(&mut ser);
    out
}

/// Relaxed Extended JSON writes a date from 1970 to year 9999 as text and any other in its
/// canonical form (`{"$date": {"$numberLong": "<ms>"}}`). bson 3.1 writes a date after 9999
/// as the text of the latest date it can format (`9999-12-31T23:59:59.999999999Z`), which
/// loses the value: such dates are replaced by their canonical form before it sees them.
fn unclamped_dates(value: Bson) -> Bson {
    match value {
        Bson::DateTime(dt) if dt.timestamp_millis() > MAX_RFC3339_MILLIS => {
            Bson::Document(bson::doc! {
                "$date": {"$numberLong": dt.timestamp_millis().to_string()}
            })
        }
        Bson::Document(doc) => Bson::Document(unclamped_document(doc)),
        Bson::Array(items) => Bson::Array(items.into_iter().map(unclamped_dates).collect()),
        Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope { code, scope }) => {
            Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope {
                code,
                scope: unclamped_document(scope),
            })
        }
        other => other,
    }
}

fn unclamped_document(doc: Document) -> Document {
    doc.into_iter()
        .map(|(k, v)| (k, unclamped_dates(v)))
        .collect()
}

/// [`encode`] straight from an event's raw BSON, without building a `Document` or a
/// `serde_json::Value` (two thirds of the CPU the old path spent per event went to those
/// allocations). The bytes are the same as [`encode`]'s for the decoded event, which the
/// tests check value type by value type; the types that are rare in change events take the
/// decoded path one value at a time. An error means the BSON is malformed or holds invalid
/// UTF-8: the caller decodes the event leniently and uses [`encode_owned`].
pub fn encode_raw(event: &RawDocument, format: RecordFormat) -> bson::error::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded_capacity(event));
    match format {
        RecordFormat::Legacy => return Ok(encode_legacy(&Document::try_from(event)?)),
        RecordFormat::Relaxed | RecordFormat::Canonical => {
            let canonical = format == RecordFormat::Canonical;
            if walk_fields(&mut out, event.as_bytes(), canonical, |_, _, _| {}).is_err() {
                out.clear();
                write_raw_document(&mut out, event, canonical)?;
            }
        }
    }
    Ok(out)
}

/// Room for an event's JSON: the BSON's size and a quarter (escapes and layout), so that the
/// usual record is written without growing its buffer.
fn encoded_capacity(event: &RawDocument) -> usize {
    event.as_bytes().len() + event.as_bytes().len() / 4
}

fn write_raw_document(
    out: &mut Vec<u8>,
    doc: &RawDocument,
    canonical: bool,
) -> bson::error::Result<()> {
    write_raw_fields(out, doc, canonical, |_, _| {})
}

/// [`write_raw_document`], showing each top-level element to `see` as it is written.
fn write_raw_fields<'a>(
    out: &mut Vec<u8>,
    doc: &'a RawDocument,
    canonical: bool,
    mut see: impl FnMut(&str, RawBsonRef<'a>),
) -> bson::error::Result<()> {
    let mut object = PyObject::begin(out);
    for element in doc {
        let (key, value) = element?;
        see(key.as_str(), value);
        write_raw_value(object.key(key.as_str()), value, canonical)?;
    }
    object.end();
    Ok(())
}

fn write_raw_value(
    out: &mut Vec<u8>,
    value: RawBsonRef<'_>,
    canonical: bool,
) -> bson::error::Result<()> {
    match value {
        RawBsonRef::String(s) => write_py_str(out, s),
        RawBsonRef::Document(d) => write_raw_document(out, d, canonical)?,
        RawBsonRef::Array(a) => {
            out.push(b'[');
            for (i, item) in a.into_iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_raw_value(out, item?, canonical)?;
            }
            out.push(b']');
        }
        RawBsonRef::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        RawBsonRef::Null => out.extend_from_slice(b"null"),
        RawBsonRef::ObjectId(oid) => {
            let mut object = PyObject::begin(out);
            write_py_str(object.key("$oid"), &oid.to_hex());
            object.end();
        }
        RawBsonRef::Timestamp(ts) => write_timestamp(out, ts),
        RawBsonRef::DateTime(dt) => write_date(out, dt, canonical),
        RawBsonRef::Int32(v) if !canonical => write_int(out, i64::from(v)),
        RawBsonRef::Int64(v) if !canonical => write_int(out, v),
        RawBsonRef::Double(v) if !canonical && v.is_finite() => write_py_float(out, v),
        other => write_extjson(out, other, canonical)?,
    }
    Ok(())
}

fn write_timestamp(out: &mut Vec<u8>, ts: bson::Timestamp) {
    let mut outer = PyObject::begin(out);
    let mut inner = PyObject::begin(outer.key("$timestamp"));
    write_int(inner.key("t"), i64::from(ts.time));
    write_int(inner.key("i"), i64::from(ts.increment));
    inner.end();
    outer.end();
}

/// Every change event has one (`wallTime`): written here without building a
/// `serde_json::Value` (the tests compare this with the decoded path).
fn write_date(out: &mut Vec<u8>, dt: bson::DateTime, canonical: bool) {
    let ms = dt.timestamp_millis();
    let mut object = PyObject::begin(out);
    let inner = object.key("$date");
    match (!canonical && (0..=MAX_RFC3339_MILLIS).contains(&ms))
        .then(|| dt.try_to_rfc3339_string().ok())
        .flatten()
    {
        Some(text) => write_py_str(inner, &text),
        None => {
            let mut long = PyObject::begin(inner);
            write_py_str(long.key("$numberLong"), itoa::Buffer::new().format(ms));
            long.end();
        }
    }
    object.end();
}

/// Binaries, decimals, regexes, the deprecated types and numbers in canonical form: through
/// the decoded value's own Extended JSON, so their layout has one definition.
fn write_extjson(
    out: &mut Vec<u8>,
    value: RawBsonRef<'_>,
    canonical: bool,
) -> bson::error::Result<()> {
    let value = Bson::try_from(bson::RawBson::from(value))?;
    let json = if canonical {
        value.into_canonical_extjson()
    } else {
        value.into_relaxed_extjson()
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut *out, PythonFormatter);
    // Serializing a serde_json::Value into a Vec cannot fail.
    let _ = json.serialize(&mut ser);
    Ok(())
}

/// [`write_raw_fields`] over [`bson_walk`] (the hot path: a few times faster than bson's
/// iterator), showing each top-level element to `see`. [`Malformed`] means only that this
/// walk could not write it: the caller writes the document again with bson's iterator,
/// which decides (and names the error).
fn walk_fields<'a>(
    out: &mut Vec<u8>,
    doc: &'a [u8],
    canonical: bool,
    mut see: impl FnMut(&'a str, u8, &'a [u8]),
) -> Result<(), Malformed> {
    let mut object = PyObject::begin(out);
    for element in bson_walk::walk(doc)? {
        let element = element?;
        see(element.key, element.kind, element.value);
        walk_value(
            object.key(element.key),
            element.kind,
            element.value,
            canonical,
        )?;
    }
    object.end();
    Ok(())
}

/// [`write_raw_value`] of a walked value: type byte and value bytes.
fn walk_value(out: &mut Vec<u8>, kind: u8, v: &[u8], canonical: bool) -> Result<(), Malformed> {
    match kind {
        0x02 => write_py_text(out, bson_walk::string_bytes(v)?, false)?,
        0x03 => walk_fields(out, v, canonical, |_, _, _| {})?,
        0x04 => {
            out.push(b'[');
            for (i, element) in bson_walk::walk(v)?.enumerate() {
                let element = element?;
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                walk_value(out, element.kind, element.value, canonical)?;
            }
            out.push(b']');
        }
        0x08 => out.extend_from_slice(if v.first() == Some(&1) {
            b"true"
        } else {
            b"false"
        }),
        0x0A => out.extend_from_slice(b"null"),
        0x07 | 0x09 | 0x11 | 0x10 | 0x12 | 0x01 => match walked_ref(kind, v) {
            Some(RawBsonRef::ObjectId(oid)) => {
                let mut object = PyObject::begin(out);
                write_py_str(object.key("$oid"), &oid.to_hex());
                object.end();
            }
            Some(RawBsonRef::Timestamp(ts)) => write_timestamp(out, ts),
            Some(RawBsonRef::DateTime(dt)) => write_date(out, dt, canonical),
            Some(RawBsonRef::Int32(n)) if !canonical => write_int(out, i64::from(n)),
            Some(RawBsonRef::Int64(n)) if !canonical => write_int(out, n),
            Some(RawBsonRef::Double(f)) if !canonical && f.is_finite() => write_py_float(out, f),
            _ => walk_extjson(out, kind, v, canonical)?,
        },
        _ => walk_extjson(out, kind, v, canonical)?,
    }
    Ok(())
}

/// [`write_extjson`] of a walked value, read by bson from a one-element copy (rare types).
fn walk_extjson(out: &mut Vec<u8>, kind: u8, v: &[u8], canonical: bool) -> Result<(), Malformed> {
    let total = i32::try_from(v.len() + 7).map_err(|_| Malformed)?;
    let mut bytes = Vec::with_capacity(v.len() + 7);
    bytes.extend_from_slice(&total.to_le_bytes());
    bytes.extend_from_slice(&[kind, 0]);
    bytes.extend_from_slice(v);
    bytes.push(0);
    let doc = RawDocument::from_bytes(&bytes).map_err(|_| Malformed)?;
    let (_, value) = doc.iter().next().ok_or(Malformed)?.map_err(|_| Malformed)?;
    write_extjson(out, value, canonical).map_err(|_| Malformed)
}

/// A walked value of a common type as bson's reference to it; `None` for the rare types.
fn walked_ref(kind: u8, v: &[u8]) -> Option<RawBsonRef<'_>> {
    let le4 = |v: &[u8]| -> Option<[u8; 4]> { v.get(..4)?.try_into().ok() };
    Some(match kind {
        0x02 => RawBsonRef::String(bson_walk::str_value(v).ok()?),
        0x03 => RawBsonRef::Document(RawDocument::from_bytes(v).ok()?),
        0x07 => RawBsonRef::ObjectId(bson::oid::ObjectId::from_bytes(v.try_into().ok()?)),
        0x08 => RawBsonRef::Boolean(v.first() == Some(&1)),
        0x09 => RawBsonRef::DateTime(bson::DateTime::from_millis(i64::from_le_bytes(
            bson_walk::le8(v).ok()?,
        ))),
        0x0A => RawBsonRef::Null,
        0x10 => RawBsonRef::Int32(i32::from_le_bytes(le4(v)?)),
        0x11 => RawBsonRef::Timestamp(bson::Timestamp {
            increment: u32::from_le_bytes(le4(v)?),
            time: u32::from_le_bytes(le4(v.get(4..)?)?),
        }),
        0x12 => RawBsonRef::Int64(i64::from_le_bytes(bson_walk::le8(v).ok()?)),
        0x01 => RawBsonRef::Double(f64::from_le_bytes(bson_walk::le8(v).ok()?)),
        _ => return None,
    })
}

/// 9999-12-31T23:59:59.999Z: relaxed Extended JSON writes dates from 1970 to here as text.
const MAX_RFC3339_MILLIS: i64 = 253_402_300_799_999;

fn write_int(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
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

    /// Finite doubles as Python's `float.__repr__` (`1e-07`, not serde_json's `1e-7`);
    /// non-finite ones never get here (Extended JSON writes them as `$numberDouble`).
    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        let mut out = Vec::with_capacity(24);
        write_py_float(&mut out, value);
        writer.write_all(&out)
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut buf = [0u16; 2];
        for c in fragment.chars() {
            // Python escapes DEL too; serde_json has already escaped the other controls.
            if c.is_ascii() && c != '\u{7f}' {
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

/// [`RecordFormat::Legacy`]: pymongo 3's `json_util.dumps` in `json.dumps` layout. Written
/// straight to bytes rather than through a `serde_json::Value` and [`PythonFormatter`]: a
/// `Value` cannot hold NaN or the infinities, and serde_json writes non-finite floats as `null`
/// without asking the formatter, while Python writes the bare tokens `NaN` and `Infinity`.
fn encode_legacy(event: &Document) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    // pymongo turns only embedded documents into DBRefs, never the top-level one.
    legacy_document(&mut out, event, false);
    out
}

/// Writes a document; `embedded` documents with a `$ref` key are written as pymongo 3's
/// DBRef (see [`dbref_fields`]).
fn legacy_document(out: &mut Vec<u8>, doc: &Document, embedded: bool) {
    let mut obj = PyObject::begin(out);
    match embedded.then(|| dbref_fields(doc)).flatten() {
        Some(fields) => {
            for (key, value) in fields {
                legacy_value(obj.key(key), value);
            }
        }
        None => {
            for (key, value) in doc {
                legacy_value(obj.key(key), value);
            }
        }
    }
    obj.end();
}

/// pymongo 3 decodes an embedded document with a `$ref` key into a `bson.dbref.DBRef`, which
/// `json_util` writes back as `$ref`, `$id` (`null` when absent), `$db` (only when set), then
/// the other keys in their order. `None` where pymongo 3 would have refused the document
/// (a `$ref` that is not a string, a `$db` neither string nor null): it is then written as is.
fn dbref_fields(doc: &Document) -> Option<Vec<(&str, &Bson)>> {
    const NULL: &Bson = &Bson::Null;
    let collection = doc.get("$ref")?;
    if !matches!(collection, Bson::String(_) | Bson::Symbol(_)) {
        return None;
    }
    let database = match doc.get("$db") {
        None | Some(Bson::Null | Bson::Undefined) => None,
        Some(db @ (Bson::String(_) | Bson::Symbol(_))) => Some(db),
        Some(_) => return None,
    };
    let mut fields = vec![
        ("$ref", collection),
        ("$id", doc.get("$id").unwrap_or(NULL)),
    ];
    if let Some(db) = database {
        fields.push(("$db", db));
    }
    fields.extend(
        doc.iter()
            .filter(|(key, _)| !matches!(key.as_str(), "$ref" | "$id" | "$db"))
            .map(|(key, value)| (key.as_str(), value)),
    );
    Some(fields)
}

/// One value as pymongo 3 decodes it (default `CodecOptions`: `dict`, naive datetimes,
/// `PYTHON_LEGACY` UUIDs) and `json_util.default` with `LEGACY_JSON_OPTIONS` writes it.
fn legacy_value(out: &mut Vec<u8>, value: &Bson) {
    match value {
        Bson::Double(v) => write_py_float(out, *v),
        // Python 3 decodes the deprecated symbol type to `str`.
        Bson::String(s) | Bson::Symbol(s) => write_py_str(out, s),
        Bson::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                legacy_value(out, item);
            }
            out.push(b']');
        }
        Bson::Document(doc) => legacy_document(out, doc, true),
        Bson::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        // Undefined decodes to `None`.
        Bson::Null | Bson::Undefined => out.extend_from_slice(b"null"),
        Bson::RegularExpression(re) => {
            // Decoding keeps the options as `re` flag bits; dumps lists them in this order.
            let options: String = "ilmsux"
                .chars()
                .filter(|c| re.options.as_str().contains(*c))
                .collect();
            let mut obj = PyObject::begin(out);
            write_py_str(obj.key("$regex"), re.pattern.as_str());
            write_py_str(obj.key("$options"), &options);
            obj.end();
        }
        Bson::JavaScriptCode(code) => {
            let mut obj = PyObject::begin(out);
            write_py_str(obj.key("$code"), code);
            obj.end();
        }
        Bson::JavaScriptCodeWithScope(cws) => {
            let mut obj = PyObject::begin(out);
            write_py_str(obj.key("$code"), &cws.code);
            // The scope is decoded as a plain dict (the C decoder never makes it a DBRef).
            legacy_document(obj.key("$scope"), &cws.scope, false);
            obj.end();
        }
        Bson::Int32(v) => out.extend_from_slice(v.to_string().as_bytes()),
        // `Int64` is an `int` subclass and legacy mode does not wrap it in `$numberLong`.
        Bson::Int64(v) => out.extend_from_slice(v.to_string().as_bytes()),
        Bson::Timestamp(ts) => {
            let mut obj = PyObject::begin(out);
            let mut inner = PyObject::begin(obj.key("$timestamp"));
            inner
                .key("t")
                .extend_from_slice(ts.time.to_string().as_bytes());
            inner
                .key("i")
                .extend_from_slice(ts.increment.to_string().as_bytes());
            inner.end();
            obj.end();
        }
        Bson::Binary(bin) => {
            let subtype = u8::from(bin.subtype);
            let mut obj = PyObject::begin(out);
            if matches!(subtype, 3 | 4) && bin.bytes.len() == 16 {
                // Both UUID subtypes decode to `uuid.UUID` (subtype 3 in PYTHON_LEGACY byte
                // order, which is the stored order), and legacy dumps writes its hex.
                write_py_str(obj.key("$uuid"), &hex(&bin.bytes));
            } else {
                write_py_str(obj.key("$binary"), &base64(&bin.bytes));
                write_py_str(obj.key("$type"), &format!("{subtype:02x}"));
            }
            obj.end();
        }
        Bson::ObjectId(oid) => {
            let mut obj = PyObject::begin(out);
            write_py_str(obj.key("$oid"), &oid.to_hex());
            obj.end();
        }
        Bson::DateTime(dt) => {
            // Millisecond precision survives the trip through `datetime` exactly.
            let mut obj = PyObject::begin(out);
            obj.key("$date")
                .extend_from_slice(dt.timestamp_millis().to_string().as_bytes());
            obj.end();
        }
        // Both write the General Decimal Arithmetic scientific string (`1E+3`, `-0.00`, `NaN`).
        Bson::Decimal128(d) => {
            let mut obj = PyObject::begin(out);
            write_py_str(obj.key("$numberDecimal"), &d.to_string());
            obj.end();
        }
        Bson::MaxKey | Bson::MinKey => {
            let key = if matches!(value, Bson::MaxKey) {
                "$maxKey"
            } else {
                "$minKey"
            };
            let mut obj = PyObject::begin(out);
            obj.key(key).push(b'1');
            obj.end();
        }
        // Decoded as `DBRef(namespace, id)`. The bson crate keeps the fields private; its
        // Extended JSON form is the way to read them.
        Bson::DbPointer(ptr) => {
            let json = Bson::DbPointer(ptr.clone()).into_relaxed_extjson();
            let ptr = &json["$dbPointer"];
            let mut obj = PyObject::begin(out);
            write_py_str(obj.key("$ref"), ptr["$ref"].as_str().unwrap_or_default());
            let mut id = PyObject::begin(obj.key("$id"));
            write_py_str(
                id.key("$oid"),
                ptr["$id"]["$oid"].as_str().unwrap_or_default(),
            );
            id.end();
            obj.end();
        }
    }
}

/// Writes a JSON object in Python layout: `{` on creation, `, ` between members, `": "`
/// after each key, `}` on [`PyObject::end`].
struct PyObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> PyObject<'a> {
    fn begin(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// Writes the key and separator; the caller writes the value into the returned buffer.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !std::mem::take(&mut self.first) {
            self.out.extend_from_slice(b", ");
        }
        write_py_str(self.out, key);
        self.out.extend_from_slice(b": ");
        self.out
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// A string as `json.dumps` (`ensure_ascii=True`) writes it: the two-character escapes for
/// `"`, `\`, `\n`, `\r`, `\t`, `\b`, `\f`, printable ASCII as is, and everything else,
/// including DEL (0x7f), as lowercase `\uXXXX` UTF-16 units (surrogate pairs above U+FFFF).
/// The two-character JSON escape of `b` (`\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`), which
/// JSON writers, Python's included, use before `\uXXXX`.
pub(crate) fn short_escape(b: u8) -> Option<&'static [u8]> {
    Some(match b {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        0x08 => b"\\b",
        0x0c => b"\\f",
        _ => return None,
    })
}

fn write_py_str(out: &mut Vec<u8>, s: &str) {
    // Known UTF-8: nothing to refuse.
    let _ = write_py_text(out, s.as_bytes(), true);
}

/// [`write_py_str`] of a BSON string's bytes, refusing them if they are not UTF-8. `checked`
/// says they are known to be; otherwise they are checked from the first non-ASCII byte on,
/// once (a run of ASCII is UTF-8 as it is, and most strings are nothing else).
fn write_py_text(out: &mut Vec<u8>, bytes: &[u8], mut checked: bool) -> Result<(), Malformed> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // Runs of printable ASCII are copied whole: most keys and values are nothing else.
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        i += plain_prefix(&bytes[i..]);
        if i == bytes.len() {
            break;
        }
        let b = bytes[i];
        out.extend_from_slice(&bytes[run..i]);
        if let Some(escape) = short_escape(b) {
            out.extend_from_slice(escape);
            i += 1;
        } else {
            // A control character, DEL or the first byte of a multi-byte character: `i` is
            // on a char boundary, since every byte before it in this loop was ASCII or a
            // whole character.
            if b >= 0x80 && !checked {
                std::str::from_utf8(&bytes[i..]).map_err(|_| Malformed)?;
                checked = true;
            }
            let width = match b {
                0xf0.. => 4,
                0xe0.. => 3,
                0xc0.. => 2,
                _ => 1,
            };
            let c = bytes
                .get(i..i + width)
                .and_then(|char| std::str::from_utf8(char).ok())
                .and_then(|char| char.chars().next())
                .ok_or(Malformed)?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let u = *unit;
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    HEX[usize::from(u >> 12)],
                    HEX[usize::from((u >> 8) & 0xf)],
                    HEX[usize::from((u >> 4) & 0xf)],
                    HEX[usize::from(u & 0xf)],
                ]);
            }
            i += width;
        }
        run = i;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
    Ok(())
}

/// How many leading bytes `json.dumps` writes as they are (printable ASCII but `"` and `\`),
/// eight at a time while none of the eight needs escaping (the usual bit tricks: a byte below
/// 0x20, a byte equal to `"`, `\` or DEL, or a high bit).
fn plain_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let mut i = 0;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_ne_bytes(word);
        let special = w & HIGH != 0
            || w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0
            || has_zero(w ^ (ONES * u64::from(b'"')))
            || has_zero(w ^ (ONES * u64::from(b'\\')))
            || has_zero(w ^ (ONES * 0x7f));
        if special {
            break;
        }
        i += 8;
    }
    while i < bytes.len()
        && (b' '..=b'~').contains(&bytes[i])
        && bytes[i] != b'"'
        && bytes[i] != b'\\'
    {
        i += 1;
    }
    i
}

/// A double as `json.dumps` writes it, which is `float.__repr__` plus bare `NaN`,
/// `Infinity` and `-Infinity`. `repr` takes the shortest digits that read back to the same
/// double (as Rust's `{:e}` does) and writes them positionally when the decimal exponent is
/// -4 to 15 (`0.0001`, `1000000000000000.0`, always with a fraction), otherwise as
/// `d.ddde±XX` with at least two exponent digits (`1e-05`, `1e+16`, `5e-324`). serde_json
/// differs there (`1e16`, `0.00001`, `1e-7`).
fn write_py_float(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        return out.extend_from_slice(b"NaN");
    }
    if v.is_infinite() {
        return out.extend_from_slice(if v > 0.0 { b"Infinity" } else { b"-Infinity" });
    }
    let sci = format!("{v:e}");
    let parsed = sci
        .split_once('e')
        .and_then(|(mantissa, exp)| Some((mantissa, exp.parse::<i32>().ok()?)));
    let Some((mantissa, exp)) = parsed else {
        // `{:e}` of a finite double always has an exponent; keep some number regardless.
        return out.extend_from_slice(format!("{v:?}").as_bytes());
    };
    if mantissa.starts_with('-') {
        out.push(b'-');
    }
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    if (-4..=15).contains(&exp) {
        if exp >= 0 {
            let int_len = exp.unsigned_abs() as usize + 1;
            if digits.len() <= int_len {
                out.extend_from_slice(&digits);
                out.resize(out.len() + int_len - digits.len(), b'0');
                out.extend_from_slice(b".0");
            } else {
                out.extend_from_slice(&digits[..int_len]);
                out.push(b'.');
                out.extend_from_slice(&digits[int_len..]);
            }
        } else {
            out.extend_from_slice(b"0.");
            out.resize(out.len() + exp.unsigned_abs() as usize - 1, b'0');
            out.extend_from_slice(&digits);
        }
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        out.extend_from_slice(first);
        if !rest.is_empty() {
            out.push(b'.');
            out.extend_from_slice(rest);
        }
        let sign = if exp < 0 { '-' } else { '+' };
        out.extend_from_slice(format!("e{sign}{:02}", exp.unsigned_abs()).as_bytes());
    }
}

/// Standard base64 with padding, as Python's `base64.b64encode`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, RawDocumentBuf};

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
    fn a_delete_keys_by_its_pre_image_where_the_path_is_in_full_document() {
        let key = path("fullDocument.email");
        let delete = doc! {
            "operationType": "delete",
            "ns": {"db": "shop", "coll": "users"},
            "documentKey": {"_id": 7},
            "fullDocumentBeforeChange": {"_id": 7, "email": "a@example.com"},
        };
        assert_eq!(partition_key(&delete, &key), "a@example.com");
        let raw = RawDocumentBuf::try_from(&delete).unwrap();
        assert_eq!(partition_key_raw(&raw, &key).unwrap(), "a@example.com");
        // Without a pre-image: the namespace, as before.
        let bare = doc! {"operationType": "delete", "ns": {"db": "shop", "coll": "users"},
        "documentKey": {"_id": 7}};
        assert_eq!(partition_key(&bare, &key), "shop.users");
        // A path outside fullDocument has no pre-image twin.
        assert_eq!(path("documentKey._id").pre_image(), None);
        assert!(path("documentKey._id").in_document_key());
        assert!(!key.in_document_key());
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

    /// The examples in the README's "Record formats" section.
    #[test]
    fn readme_examples() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let ev = doc! {
            "_id": oid,
            "at": bson::DateTime::from_millis(1_700_000_000_123),
            "qty": 3,
            "big": 9_007_199_254_740_993_i64,
            "price": "9.99".parse::<bson::Decimal128>().unwrap(),
            "name": "café",
        };
        let show = |f| String::from_utf8(encode(&ev, f)).unwrap();
        assert_eq!(
            show(RecordFormat::Relaxed),
            r#"{"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "at": {"$date": "2023-11-14T22:13:20.123Z"}, "qty": 3, "big": 9007199254740993, "price": {"$numberDecimal": "9.99"}, "name": "caf\u00e9"}"#
        );
        assert_eq!(
            show(RecordFormat::Canonical),
            r#"{"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "at": {"$date": {"$numberLong": "1700000000123"}}, "qty": {"$numberInt": "3"}, "big": {"$numberLong": "9007199254740993"}, "price": {"$numberDecimal": "9.99"}, "name": "caf\u00e9"}"#
        );
        assert_eq!(
            show(RecordFormat::Legacy),
            r#"{"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "at": {"$date": 1700000000123}, "qty": 3, "big": 9007199254740993, "price": {"$numberDecimal": "9.99"}, "name": "caf\u00e9"}"#
        );
    }

    #[test]
    fn relaxed_floats_and_del_follow_python() {
        let ev = doc! {"a": 1e-7, "b": 0.00001, "c": 1e16, "d": 1.5, "e": "x\u{7f}"};
        let out = String::from_utf8(encode(&ev, RecordFormat::Relaxed)).unwrap();
        assert_eq!(
            out,
            r#"{"a": 1e-07, "b": 1e-05, "c": 1e+16, "d": 1.5, "e": "x\u007f"}"#
        );
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

    fn legacy(ev: &Document) -> String {
        String::from_utf8(encode(ev, RecordFormat::Legacy)).expect("legacy output is ASCII")
    }

    fn py_float(v: f64) -> String {
        let mut out = Vec::new();
        write_py_float(&mut out, v);
        String::from_utf8(out).unwrap()
    }

    fn regex(pattern: &str, options: &str) -> bson::Regex {
        bson::Regex {
            pattern: pattern.try_into().unwrap(),
            options: options.try_into().unwrap(),
        }
    }

    // Expected strings in the legacy tests were printed by pymongo 3.13 on Python 3.11.
    #[test]
    fn legacy_floats_are_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (1.5, "1.5"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1234567890123456.7, "1234567890123456.8"),
            (1e-7, "1e-07"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.1 + 0.2, "0.30000000000000004"),
            (123456789.125, "123456789.125"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (-2.5e100, "-2.5e+100"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (v, want) in cases {
            assert_eq!(py_float(v), want, "{v:e}");
        }
    }

    #[test]
    fn legacy_strings_escape_like_json_dumps() {
        let ev = doc! {"s": "é日本😀\u{7f}\u{1f}\"\\\n\t\u{8}\u{c}\r/"};
        assert_eq!(
            legacy(&ev),
            r#"{"s": "\u00e9\u65e5\u672c\ud83d\ude00\u007f\u001f\"\\\n\t\b\f\r/"}"#
        );
    }

    #[test]
    fn legacy_scalars() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let ev = doc! {
            "oid": oid,
            "epoch": bson::DateTime::from_millis(0),
            "before": bson::DateTime::from_millis(-1),
            "after": bson::DateTime::from_millis(1_704_164_645_678),
            "i": 5,
            "l": 4_611_686_018_427_387_904_i64,
            "f": 1.0,
            "nan": f64::NAN,
            "ts": bson::Timestamp { time: 1_700_000_000, increment: 7 },
            "re": regex("^a.b$", "xmisu"),
            "re2": regex("a", "zmxia"),
            "min": Bson::MinKey,
            "max": Bson::MaxKey,
            "code": Bson::JavaScriptCode("function(){}".into()),
            "cws": bson::JavaScriptCodeWithScope { code: "f".into(), scope: doc! {"a": 1} },
            "d": "1.50".parse::<bson::Decimal128>().unwrap(),
            "sym": Bson::Symbol("abc".into()),
            "und": Bson::Undefined,
            "n": Bson::Null,
            "t": true,
        };
        assert_eq!(
            legacy(&ev),
            concat!(
                r#"{"oid": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "epoch": {"$date": 0}, "#,
                r#""before": {"$date": -1}, "after": {"$date": 1704164645678}, "i": 5, "#,
                r#""l": 4611686018427387904, "f": 1.0, "nan": NaN, "#,
                r#""ts": {"$timestamp": {"t": 1700000000, "i": 7}}, "#,
                r#""re": {"$regex": "^a.b$", "$options": "imsux"}, "#,
                r#""re2": {"$regex": "a", "$options": "imx"}, "#,
                r#""min": {"$minKey": 1}, "max": {"$maxKey": 1}, "#,
                r#""code": {"$code": "function(){}"}, "cws": {"$code": "f", "$scope": {"a": 1}}, "#,
                r#""d": {"$numberDecimal": "1.50"}, "sym": "abc", "und": null, "n": null, "t": true}"#,
            )
        );
    }

    #[test]
    fn legacy_binaries_and_uuids() {
        use bson::{spec::BinarySubtype, Binary};
        let bin = |subtype, bytes: &[u8]| {
            Bson::Binary(Binary {
                subtype,
                bytes: bytes.to_vec(),
            })
        };
        let ev = doc! {
            "b0": bin(BinarySubtype::Generic, b"\x00\x01hi"),
            "b4": bin(BinarySubtype::Uuid, b"0123456789abcdef"),
            "b3": bin(BinarySubtype::UuidOld, b"0123456789abcdef"),
            "b80": bin(BinarySubtype::UserDefined(0x80), b"x"),
            "b2": bin(BinarySubtype::BinaryOld, b"old"),
            "b5": bin(BinarySubtype::Md5, b"md5"),
        };
        assert_eq!(
            legacy(&ev),
            concat!(
                r#"{"b0": {"$binary": "AAFoaQ==", "$type": "00"}, "#,
                r#""b4": {"$uuid": "30313233343536373839616263646566"}, "#,
                r#""b3": {"$uuid": "30313233343536373839616263646566"}, "#,
                r#""b80": {"$binary": "eA==", "$type": "80"}, "#,
                r#""b2": {"$binary": "b2xk", "$type": "02"}, "#,
                r#""b5": {"$binary": "bWQ1", "$type": "05"}}"#,
            )
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn legacy_embedded_ref_documents_become_dbrefs() {
        let ev = doc! {
            "$ref": "top",
            "$id": 3,
            "r1": {"$id": 1, "x": 2, "$ref": "c"},
            "r2": {"x": 2, "$ref": "c", "$db": "d"},
            "r3": [{"$db": Bson::Null, "$ref": "c"}],
            "bad": {"$id": 1, "$ref": 5},
            "cws": bson::JavaScriptCodeWithScope { code: "f".into(), scope: doc! {"$id": 1, "$ref": "c"} },
        };
        assert_eq!(
            legacy(&ev),
            concat!(
                r#"{"$ref": "top", "$id": 3, "r1": {"$ref": "c", "$id": 1, "x": 2}, "#,
                r#""r2": {"$ref": "c", "$id": null, "$db": "d", "x": 2}, "#,
                r#""r3": [{"$ref": "c", "$id": null}], "bad": {"$id": 1, "$ref": 5}, "#,
                r#""cws": {"$code": "f", "$scope": {"$id": 1, "$ref": "c"}}}"#,
            )
        );
    }

    /// Every BSON type, at the top level and nested in documents and arrays, with the
    /// strings and numbers whose escaping and layout differ between encoders.
    fn every_type() -> Document {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let strings = doc! {
            "plain": "abc",
            "quotes": "a\"b\\c/d",
            "controls": "\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}",
            "latin": "café",
            "astral": "emoji \u{1F600} end",
            "empty": "",
            "k\u{e9}y \"quoted\"": 1,
        };
        let numbers = doc! {
            "i32": -7, "i32max": i32::MAX, "i64": 9_007_199_254_740_993_i64, "i64min": i64::MIN,
            "one": 1.0, "half": 0.5, "big": 1e16, "small": 1e-7, "tiny": 5e-324,
            "negzero": -0.0, "pi": std::f64::consts::PI, "thousand": 1000.0,
            "nan": f64::NAN, "inf": f64::INFINITY, "ninf": f64::NEG_INFINITY,
        };
        let mut d = doc! {
            "_id": {"_data": "8265A1B2C3000000012B022C0100296E5A1004"},
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: 1_700_000_000, increment: 7 },
            "wallTime": bson::DateTime::from_millis(1_700_000_000_123),
            "oid": oid,
            "dates": [
                bson::DateTime::from_millis(0),
                bson::DateTime::from_millis(-1),
                bson::DateTime::from_millis(253_402_300_800_000),
                bson::DateTime::from_millis(253_402_300_799_999),
                bson::DateTime::from_millis(1_700_000_000_000),
                bson::DateTime::from_millis(i64::MIN),
            ],
            "strings": strings,
            "numbers": numbers.clone(),
            "array": [1, "two", 3.5, {"four": [5, [6]]}, [], {}, Bson::Null, true, false],
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![0, 1, 254, 255] },
            "uuid": bson::Binary { subtype: bson::spec::BinarySubtype::Uuid, bytes: vec![7; 16] },
            "user_bin": bson::Binary { subtype: bson::spec::BinarySubtype::UserDefined(0x80), bytes: b"x".to_vec() },
            "re": regex("^a.b$", "xmisu"),
            "code": Bson::JavaScriptCode("function(){ return \"x\"; }".into()),
            "cws": bson::JavaScriptCodeWithScope { code: "f".into(), scope: doc! {"a": 1, "b": 1.5} },
            "d": "1.50".parse::<bson::Decimal128>().unwrap(),
            "sym": Bson::Symbol("abc".into()),
            "und": Bson::Undefined,
            "min": Bson::MinKey,
            "max": Bson::MaxKey,
            "n": Bson::Null,
            "t": true,
        };
        d.insert("nested", doc! {"deeper": d.clone(), "list": [numbers]});
        d
    }

    #[test]
    fn raw_encoding_equals_the_decoded_encoding() {
        let ev = every_type();
        let raw = RawDocumentBuf::try_from(&ev).unwrap();
        for format in [
            RecordFormat::Relaxed,
            RecordFormat::Canonical,
            RecordFormat::Legacy,
        ] {
            let decoded = String::from_utf8(encode(&ev, format)).unwrap();
            let direct = String::from_utf8(encode_raw(&raw, format).unwrap()).unwrap();
            assert_eq!(direct, decoded, "{format:?}");
            if format == RecordFormat::Relaxed {
                // The first date after 9999 keeps its value (bson alone clamps it).
                assert!(
                    direct.contains(r#"{"$date": {"$numberLong": "253402300800000"}}"#)
                        && !direct.contains("9999-12-31T23:59:59.999999999Z"),
                    "{direct}"
                );
                assert!(direct.contains(r#"{"$date": "9999-12-31T23:59:59.999Z"}"#));
            }
        }
    }

    /// The one-pass raw reading gives the record the decoded event gives: token, time,
    /// operation, partition key (found, in the pre-image, the namespace, hashed) and bytes.
    #[test]
    fn records_from_raw_equal_records_from_the_decoded_event() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let ns = doc! {"db": "shop", "coll": "users"};
        let big = "b".repeat(MAX_RECORD_BYTES);
        let cases = [
            (every_type(), "documentKey._id"),
            (every_type(), "strings.latin"),
            (every_type(), "numbers.i32"),
            (every_type(), "numbers.half"),
            (every_type(), "nested.deeper.oid"),
            (every_type(), "wallTime"),
            (
                doc! {"_id": 1, "operationType": "update", "documentKey": {"_id": oid}},
                "documentKey._id",
            ),
            (
                doc! {"_id": 1, "documentKey": {"_id": "k".repeat(300)}},
                "documentKey._id",
            ),
            (
                doc! {"_id": 1, "documentKey": {"_id": ""}},
                "documentKey._id",
            ),
            (
                doc! {"_id": 1, "documentKey": {"_id": {"a": 1, "b": "x"}}},
                "documentKey._id",
            ),
            (
                doc! {"_id": 1, "documentKey": {"_id": 7_i64}, "fullDocument": {"big": &big}},
                "documentKey._id",
            ),
            (
                doc! {"_id": 1, "operationType": "delete", "ns": ns.clone(), "documentKey": {"_id": 7},
                "fullDocumentBeforeChange": {"_id": 7, "email": "a@example.com"}},
                "fullDocument.email",
            ),
            (
                doc! {"_id": 1, "operationType": "delete", "ns": ns.clone(), "documentKey": {"_id": 7}},
                "fullDocument.email",
            ),
            (
                doc! {"_id": 1, "operationType": "drop", "ns": ns},
                "documentKey._id",
            ),
            (
                doc! {"_id": 1, "operationType": "dropDatabase", "ns": {"db": "shop"}},
                "documentKey._id",
            ),
            (
                doc! {"_id": 1, "ns": "not a document", "clusterTime": 5, "operationType": 3},
                "documentKey._id",
            ),
            (doc! {"operationType": "insert", "_id": 2, "_id": 3}, "_id"),
            (doc! {}, "documentKey._id"),
        ];
        for (event, key) in cases {
            let raw = RawDocumentBuf::try_from(&event).unwrap();
            for format in [
                RecordFormat::Relaxed,
                RecordFormat::Canonical,
                RecordFormat::Legacy,
            ] {
                let direct = EventRecord::from_raw(&raw, &path(key), format).unwrap();
                let decoded = EventRecord::from_document(event.clone(), &path(key), format);
                assert_eq!(direct, decoded, "{key} {format:?}");
            }
        }
    }

    /// The char-by-char `json.dumps` escaping that `write_py_str` must equal.
    fn py_str_reference(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                ' '..='~' => out.push(c),
                _ => {
                    for unit in c.encode_utf16(&mut [0u16; 2]) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        }
        out.push('"');
        out
    }

    #[test]
    fn string_escaping_equals_the_reference_at_every_position() {
        let specials = [
            '"',
            '\\',
            '\n',
            '\u{0}',
            '\u{1f}',
            '\u{7f}',
            'é',
            '€',
            '\u{1F600}',
            ' ',
            '~',
        ];
        for len in 0..20 {
            for at in 0..=len {
                for &c in &specials {
                    let mut text: String = "abcdefghijklmnopqrstuvwxyz".chars().take(len).collect();
                    text.insert(at.min(text.len()), c);
                    let mut out = Vec::new();
                    write_py_str(&mut out, &text);
                    assert_eq!(
                        String::from_utf8(out).unwrap(),
                        py_str_reference(&text),
                        "{text:?}"
                    );
                }
            }
        }
    }

    /// The walked writer and bson's iterator write a damaged event the same where both can,
    /// and the walk never writes one that bson refuses (it would then skip the lenient path).
    #[test]
    fn walked_and_bson_writers_agree_on_damaged_events() {
        let good = RawDocumentBuf::try_from(&every_type())
            .unwrap()
            .into_bytes();
        let mut compared = 0;
        for at in (0..good.len()).step_by(3) {
            for byte in [0x00, 0x05, 0x80, 0xff] {
                let mut bytes = good.clone();
                bytes[at] = byte;
                for canonical in [false, true] {
                    let mut walked = Vec::new();
                    let walked =
                        walk_fields(&mut walked, &bytes, canonical, |_, _, _| {}).map(|()| walked);
                    let bson = RawDocument::from_bytes(&bytes).ok().and_then(|doc| {
                        let mut out = Vec::new();
                        write_raw_document(&mut out, doc, canonical)
                            .ok()
                            .map(|()| out)
                    });
                    match (walked, bson) {
                        (Ok(walked), Some(bson)) => {
                            compared += 1;
                            assert_eq!(walked, bson, "byte {at} = {byte}");
                        }
                        (Ok(walked), None) => panic!(
                            "byte {at} = {byte}: the walk wrote {} but bson refuses",
                            String::from_utf8_lossy(&walked)
                        ),
                        (Err(Malformed), _) => {}
                    }
                }
            }
        }
        assert!(compared > 1000, "{compared} compared");
    }

    #[test]
    fn raw_encoding_refuses_invalid_utf8() {
        let mut bytes = RawDocumentBuf::try_from(&doc! {"s": "abc"})
            .unwrap()
            .into_bytes();
        let at = bytes.windows(3).position(|w| w == b"abc").unwrap();
        bytes[at + 1] = 0xff;
        let raw = RawDocumentBuf::from_bytes(bytes).unwrap();
        assert!(encode_raw(&raw, RecordFormat::Relaxed).is_err());
        let mut keyed = RawDocumentBuf::try_from(&doc! {"kéy": 1})
            .unwrap()
            .into_bytes();
        let at = keyed.iter().position(|&b| b == 0xc3).unwrap();
        keyed[at] = 0xff;
        let raw = RawDocumentBuf::from_bytes(keyed).unwrap();
        assert!(encode_raw(&raw, RecordFormat::Relaxed).is_err());
    }

    #[test]
    fn field_order_is_preserved() {
        let ev = doc! {"z": 1, "a": 2, "m": 3};
        let out = String::from_utf8(encode(&ev, RecordFormat::Relaxed)).unwrap();
        assert_eq!(out, r#"{"z": 1, "a": 2, "m": 3}"#);
    }
}
