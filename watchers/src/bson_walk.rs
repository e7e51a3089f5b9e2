//! A strict walk over the elements of a raw BSON document, for the per-event hot path.
//!
//! bson's own `RawIter` costs ~90 ns per element here (it checks and converts each value as
//! it goes; `cargo run --release -p watchers --example record_cost`), which made walking an
//! event a fifth of the watcher's CPU. This walk reads only what it needs: each element's
//! type byte, its key (checked to be UTF-8, as bson does) and the bytes of its value, found
//! from the sizes. Values are checked where they are read (strings for UTF-8 by the caller).
//!
//! Anything it cannot read is [`Malformed`], with no detail: callers then read the document
//! again with bson's iterator, which names the problem or decodes what this walk refuses.
//! (This walk refuses no document that bson reads: `damaged_documents_...` below.)

use std::ops::Range;

/// The walk could not read the document; bson's iterator is the judge of why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the quick BSON walk cannot read this document (bson's own reader says why)")]
pub struct Malformed;

/// One element of a document: its type byte, key and value bytes.
#[derive(Debug, Clone)]
pub struct Element<'a> {
    /// The BSON element type (0x02 string, 0x03 document, ...).
    pub kind: u8,
    pub key: &'a str,
    /// The value's bytes, as the type lays them out (a string's with its length and NUL).
    pub value: &'a [u8],
    /// Where the whole element (type, key, value) lies in the document's bytes.
    pub range: Range<usize>,
}

/// The elements of a document, in order; the first error ends the walk.
#[derive(Debug, Clone)]
pub struct Walk<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// Walks `doc`, the bytes of one whole document (length prefix to terminator).
pub fn walk(doc: &[u8]) -> Result<Walk<'_>, Malformed> {
    let len = read_len(doc)?;
    if len < 5 || len != doc.len() || doc[len - 1] != 0 {
        return Err(Malformed);
    }
    Ok(Walk { bytes: doc, at: 4 })
}

impl<'a> Iterator for Walk<'a> {
    type Item = Result<Element<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = self.bytes.len() - 1;
        if self.at >= end {
            return None;
        }
        let element = self.element(end);
        if element.is_err() {
            self.at = end;
        }
        Some(element)
    }
}

impl<'a> Walk<'a> {
    fn element(&mut self, end: usize) -> Result<Element<'a>, Malformed> {
        let start = self.at;
        let kind = self.bytes[start];
        let rest = &self.bytes[start + 1..end];
        let nul = memchr::memchr(0, rest).ok_or(Malformed)?;
        let key = std::str::from_utf8(&rest[..nul]).map_err(|_| Malformed)?;
        let value_at = start + 1 + nul + 1;
        let available = &self.bytes[value_at..end];
        let len = value_len(kind, available)?;
        self.at = value_at + len;
        Ok(Element {
            kind,
            key,
            value: &available[..len],
            range: start..self.at,
        })
    }
}

/// The size of a value of type `kind` at the start of `v`, which holds at least it.
fn value_len(kind: u8, v: &[u8]) -> Result<usize, Malformed> {
    let len = match kind {
        // double, datetime, timestamp, int64
        0x01 | 0x09 | 0x11 | 0x12 => 8,
        0x10 => 4,
        0x13 => 16,
        0x07 => 12,
        0x08 => match v.first() {
            Some(0 | 1) => 1,
            _ => return Err(Malformed),
        },
        // undefined, null, max key, min key
        0x06 | 0x0A | 0x7F | 0xFF => 0,
        // string, JavaScript code, symbol
        0x02 | 0x0D | 0x0E => string_len(v)?,
        0x03 | 0x04 => {
            let n = read_len(v)?;
            if n < 5 || v.get(n - 1) != Some(&0) {
                return Err(Malformed);
            }
            n
        }
        // binary: length, subtype, bytes
        0x05 => read_len(v)?.checked_add(5).ok_or(Malformed)?,
        // regex: two C strings
        0x0B => {
            let pattern = memchr::memchr(0, v).ok_or(Malformed)? + 1;
            pattern + memchr::memchr(0, &v[pattern..]).ok_or(Malformed)? + 1
        }
        // DBPointer: a string and an ObjectId
        0x0C => string_len(v)? + 12,
        // code with scope: its own total length
        0x0F => {
            let n = read_len(v)?;
            if n < 14 {
                return Err(Malformed);
            }
            n
        }
        _ => return Err(Malformed),
    };
    if len > v.len() {
        return Err(Malformed);
    }
    Ok(len)
}

/// A string value's size: length prefix, bytes, NUL.
fn string_len(v: &[u8]) -> Result<usize, Malformed> {
    let n = read_len(v)?;
    if n < 1 || v.get(4 + n - 1) != Some(&0) {
        return Err(Malformed);
    }
    Ok(4 + n)
}

/// A non-negative little-endian i32 at the start of `v`.
fn read_len(v: &[u8]) -> Result<usize, Malformed> {
    let bytes: [u8; 4] = v
        .get(..4)
        .ok_or(Malformed)?
        .try_into()
        .map_err(|_| Malformed)?;
    usize::try_from(i32::from_le_bytes(bytes)).map_err(|_| Malformed)
}

/// The text of a string value (0x02, 0x0D, 0x0E), checked to be UTF-8.
pub fn str_value(v: &[u8]) -> Result<&str, Malformed> {
    std::str::from_utf8(string_bytes(v)?).map_err(|_| Malformed)
}

/// The bytes of a string value's text, not checked (the caller checks them for UTF-8).
pub fn string_bytes(v: &[u8]) -> Result<&[u8], Malformed> {
    v.get(4..v.len().saturating_sub(1)).ok_or(Malformed)
}

/// The 8 little-endian bytes of a fixed-size value.
pub fn le8(v: &[u8]) -> Result<[u8; 8], Malformed> {
    v.get(..8)
        .ok_or(Malformed)?
        .try_into()
        .map_err(|_| Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Bson, RawDocument, RawDocumentBuf};

    fn every_kind() -> RawDocumentBuf {
        let d = doc! {
            "d": 1.5, "s": "é", "doc": {"a": 1}, "arr": [1, "x"],
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] },
            "und": Bson::Undefined, "oid": bson::oid::ObjectId::new(), "t": true,
            "dt": bson::DateTime::from_millis(5), "n": Bson::Null,
            "re": bson::Regex { pattern: "a".try_into().unwrap(), options: "i".try_into().unwrap() },
            "code": Bson::JavaScriptCode("f".into()), "sym": Bson::Symbol("y".into()),
            "cws": bson::JavaScriptCodeWithScope { code: "g".into(), scope: doc! {"z": 1} },
            "i32": 7, "ts": bson::Timestamp { time: 1, increment: 2 }, "i64": 8_i64,
            "dec": "1.5".parse::<bson::Decimal128>().unwrap(),
            "min": Bson::MinKey, "max": Bson::MaxKey,
        };
        RawDocumentBuf::try_from(&d).unwrap()
    }

    /// Keys, types and element ranges as bson's own iterator finds them.
    fn reference(doc: &RawDocument) -> Result<Vec<(String, u8, Range<usize>)>, ()> {
        let mut at = 4;
        let mut out = Vec::new();
        for element in doc.iter_elements() {
            let element = element.map_err(|_| ())?;
            let key = element.key().as_str().to_owned();
            element.value().map_err(|_| ())?;
            let len = 1 + key.len() + 1 + element.size();
            out.push((key, element.element_type() as u8, at..at + len));
            at += len;
        }
        Ok(out)
    }

    fn walked(bytes: &[u8]) -> Result<Vec<(String, u8, Range<usize>)>, Malformed> {
        walk(bytes)?
            .map(|e| e.map(|e| (e.key.to_owned(), e.kind, e.range)))
            .collect()
    }

    #[test]
    fn finds_what_bson_finds_for_every_type() {
        let doc = every_kind();
        assert_eq!(walked(doc.as_bytes()).unwrap(), reference(&doc).unwrap());
    }

    /// A damaged document never makes the walk panic, and where both read it the walk finds
    /// what bson finds. (The walk leaves values' contents, such as a string's UTF-8, to the
    /// reader of the value, so it may read an element that bson refuses at once; the record
    /// writer's own test checks that it then refuses it too.)
    #[test]
    fn damaged_documents_are_refused_or_read_as_bson_reads_them() {
        let good = every_kind().into_bytes();
        let mut compared = 0;
        for at in 0..good.len() {
            for byte in [0x00, 0x01, 0x05, 0x7f, 0x80, 0xff] {
                let mut damaged = good.clone();
                damaged[at] = byte;
                for cut in [damaged.len(), at + 1] {
                    let mut bytes = damaged[..cut].to_vec();
                    if cut != good.len() && bytes.len() >= 4 {
                        let len = bytes.len() as i32;
                        bytes[..4].copy_from_slice(&len.to_le_bytes());
                    }
                    let ours = walked(&bytes);
                    let theirs = RawDocument::from_bytes(&bytes)
                        .map_err(|_| ())
                        .and_then(reference);
                    match (ours, theirs) {
                        (Ok(ours), Ok(theirs)) => {
                            compared += 1;
                            assert_eq!(ours, theirs, "byte {at} = {byte}, cut {cut}");
                        }
                        (Err(Malformed), Ok(theirs)) => {
                            panic!("byte {at} = {byte}, cut {cut}: bson reads {theirs:?}")
                        }
                        _ => {}
                    }
                }
            }
        }
        assert!(compared > 100, "{compared} compared");
    }
}
