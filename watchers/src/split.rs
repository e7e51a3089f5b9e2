//! Reassembly of change events that `$changeStreamSplitLargeEvent` delivered as fragments.
//!
//! MongoDB (7.0, 6.0.9) fails a change stream at an event over 16 MiB unless the pipeline ends
//! with that stage, which splits such an event into fragments of at most 16 MiB, each carrying
//! `splitEvent: {fragment: n, of: N}` and its own resume token. This module owns turning them
//! back into one event, byte for byte the event as it would have been, before anything encodes
//! it: [`Reassembly`] takes every document the stream yields in order and hands back whole
//! events only. Resuming after a middle fragment's token would start mid-event, so the reader
//! never lets one out (only the last fragment's token, the reassembled event's `_id`, resumes
//! after the whole event).
//!
//! The result is raw BSON built by hand (`RawDocumentBuf` holds any size; nothing here parses a
//! value), so it may exceed 16 MiB: it is never sent back to a server, only encoded.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::LazyLock;

use bson::{RawBsonRef, RawDocument, RawDocumentBuf};

/// The field the stage adds to each fragment.
const SPLIT_EVENT: &str = "splitEvent";
/// [`SPLIT_EVENT`] as it is stored as a key: its bytes and the NUL that ends them.
const SPLIT_EVENT_KEY: &[u8] = b"splitEvent\0";
/// The resume token.
const ID: &str = "_id";

/// A whole change event: one document the stream yielded, or fragments joined.
#[derive(Debug, Clone, PartialEq)]
pub struct Whole {
    pub event: RawDocumentBuf,
    /// How many fragments it arrived in (1 for an event that was not split).
    pub fragments: u32,
}

/// The fragments of one split event did not arrive as `1..=N` in sequence (or cannot be
/// joined): the event cannot be rebuilt from what was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BrokenSequence(String);

/// Joins fragments into events; holds at most one event in progress.
#[derive(Debug, Default)]
pub struct Reassembly {
    partial: Option<Partial>,
}

/// The event being joined: its bytes so far (length prefix included, no terminator yet).
#[derive(Debug)]
struct Partial {
    bytes: Vec<u8>,
    /// Where each top-level field's element (type, key, value) lies in `bytes`.
    fields: HashMap<String, Range<usize>>,
    /// The fragment expected next, and how many there are.
    next: u32,
    of: u32,
}

impl Reassembly {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether fragments of an event have been taken and its last one has not: the stream's
    /// resume token now points inside an event and must not be checkpointed.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }

    /// The fragments taken of the event in progress, and how many it has.
    pub fn progress(&self) -> Option<(u32, u32)> {
        self.partial.as_ref().map(|p| (p.next - 1, p.of))
    }

    /// Takes the next document read from the change stream. Returns the whole event when
    /// `doc` completes one (an event that was not split completes itself), `None` while
    /// fragments are still to come.
    pub fn push(&mut self, doc: RawDocumentBuf) -> Result<Option<Whole>, BrokenSequence> {
        let Some(Mark {
            fragment,
            of,
            range: mark,
        }) = split_event(&doc)?
        else {
            return match &self.partial {
                Some(p) => Err(broken(format!(
                    "fragment {} of {} expected, an event that was not split arrived",
                    p.next, p.of
                ))),
                None => Ok(Some(Whole {
                    event: doc,
                    fragments: 1,
                })),
            };
        };
        let Some(mut partial) = self.partial.take() else {
            if fragment != 1 {
                return Err(broken(format!(
                    "fragment {fragment} of {of} arrived without the fragments before it (the \
                     stream resumed inside a split event?)"
                )));
            }
            if of == 1 {
                // Some servers mark every event; one fragment is the event as it is.
                return Ok(Some(Whole {
                    event: without(doc, mark)?,
                    fragments: 1,
                }));
            }
            let mut partial = Partial {
                bytes: Vec::with_capacity(doc.as_bytes().len() * of as usize),
                fields: HashMap::new(),
                next: 2,
                of,
            };
            partial.bytes.extend_from_slice(&[0; 4]);
            partial.take(&doc, 1)?;
            self.partial = Some(partial);
            return Ok(None);
        };
        if fragment != partial.next || of != partial.of {
            return Err(broken(format!(
                "fragment {} of {} expected, fragment {fragment} of {of} arrived",
                partial.next, partial.of
            )));
        }
        partial.take(&doc, fragment)?;
        if fragment < of {
            partial.next += 1;
            self.partial = Some(partial);
            return Ok(None);
        }
        // The last fragment's token resumes after the whole event: it becomes the event's
        // `_id`, in the place the first fragment's had.
        let token = element(&doc, ID)?
            .ok_or_else(|| broken(format!("fragment {of} of {of} has no resume token (`_id`)")))?;
        let Partial {
            mut bytes, fields, ..
        } = partial;
        if let Some(at) = fields.get(ID) {
            if bytes[at.clone()] != *token {
                bytes.splice(at.clone(), token.iter().copied());
            }
        } else {
            // The first fragment had no token: it goes last (the pipeline needs one).
            bytes.extend_from_slice(token);
        }
        bytes.push(0);
        Ok(Some(Whole {
            event: finish(bytes)?,
            fragments: of,
        }))
    }
}

impl Partial {
    /// Appends the fragment's fields, except `splitEvent` and (after the first) `_id`. A field
    /// that an earlier fragment already carried is taken once when both are the same bytes
    /// (some servers repeat the small fields in every fragment) and refused when they differ.
    fn take(&mut self, doc: &RawDocument, fragment: u32) -> Result<(), BrokenSequence> {
        for (key, range) in elements(doc)? {
            if key == SPLIT_EVENT || (key == ID && fragment > 1) {
                continue;
            }
            let element = &doc.as_bytes()[range];
            if let Some(seen) = self.fields.get(key) {
                if self.bytes[seen.clone()] != *element {
                    return Err(broken(format!(
                        "fragment {fragment} of {} repeats field `{key}` with another value",
                        self.of
                    )));
                }
                continue;
            }
            let start = self.bytes.len();
            self.bytes.extend_from_slice(element);
            self.fields.insert(key.to_owned(), start..self.bytes.len());
        }
        Ok(())
    }
}

/// `splitEvent`'s fragment number and count, when the document is a fragment.
fn split_event(doc: &RawDocument) -> Result<Option<Mark>, BrokenSequence> {
    // Nearly every event is whole (MongoDB marks only the fragments of a split one; SecantusDB
    // marks every event "1 of 1"): where the field's name (a key is followed by its NUL)
    // appears nowhere in the bytes, no element is named so, and walking the top level to
    // look is skipped (a tenth of the cost of turning the event into a record).
    static FINDER: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(SPLIT_EVENT_KEY));
    if FINDER.find(doc.as_bytes()).is_none() {
        return Ok(None);
    }
    // One walk finds the element and where it lies (to take it out of a 1-of-1 event): the
    // quick walk where it reads the document and finds a document there, else bson's, which
    // names what is wrong.
    let quick = crate::bson_walk::walk(doc.as_bytes())
        .ok()
        .and_then(|walk| {
            for element in walk {
                let element = element.ok()?;
                if element.key == SPLIT_EVENT {
                    let value = RawDocument::from_bytes(element.value).ok();
                    return value
                        .filter(|_| element.kind == 0x03)
                        .map(|d| Some((RawBsonRef::Document(d), element.range)));
                }
            }
            Some(None)
        });
    let found = match quick {
        Some(found) => found,
        None => bson_split_event(doc)?,
    };
    let Some((value, range)) = found else {
        return Ok(None);
    };
    let split = match value {
        RawBsonRef::Document(d) => d,
        other => {
            return Err(broken(format!(
                "`splitEvent` is a {:?}, not a document",
                other.element_type()
            )))
        }
    };
    let number = |name: &str| -> Result<u32, BrokenSequence> {
        let n = match split.get(name) {
            Ok(Some(RawBsonRef::Int32(n))) => i64::from(n),
            Ok(Some(RawBsonRef::Int64(n))) => n,
            Ok(Some(RawBsonRef::Double(n))) if n.fract() == 0.0 => n as i64,
            _ => -1,
        };
        u32::try_from(n)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| broken(format!("`splitEvent.{name}` is not a positive integer")))
    };
    let (fragment, of) = (number("fragment")?, number("of")?);
    if fragment > of {
        return Err(broken(format!("fragment {fragment} of {of}")));
    }
    Ok(Some(Mark {
        fragment,
        of,
        range,
    }))
}

/// The `splitEvent` element and its bytes' range, found by bson's iterator.
fn bson_split_event(
    doc: &RawDocument,
) -> Result<Option<(RawBsonRef<'_>, Range<usize>)>, BrokenSequence> {
    let mut at = 4;
    let mut found = None;
    for element in doc.iter_elements() {
        let element = element.map_err(|e| broken(format!("`splitEvent` is unreadable: {e}")))?;
        let key = element.key().as_str();
        let len = 1 + key.len() + 1 + element.size();
        if key == SPLIT_EVENT {
            let value = element
                .value()
                .map_err(|e| broken(format!("`splitEvent` is unreadable: {e}")))?;
            found = Some((value, at..at + len));
            break;
        }
        at += len;
    }
    Ok(found)
}

/// A `splitEvent` element: which fragment of how many, and its bytes in the document.
struct Mark {
    fragment: u32,
    of: u32,
    range: Range<usize>,
}

/// Each top-level element's key and the byte range of the whole element (type byte, key,
/// value) in the document, found from the sizes alone: no value is parsed or validated, so a
/// value the strict decoder would refuse (invalid UTF-8) passes through to the pipeline's
/// lenient path as it is.
fn elements(doc: &RawDocument) -> Result<Vec<(&str, Range<usize>)>, BrokenSequence> {
    let mut at = 4;
    let mut out = Vec::new();
    for element in doc.iter_elements() {
        let element = element.map_err(|e| broken(format!("a fragment is malformed: {e}")))?;
        let key = element.key().as_str();
        let len = 1 + key.len() + 1 + element.size();
        out.push((key, at..at + len));
        at += len;
    }
    Ok(out)
}

/// The bytes of the element `key`, if the document has it.
fn element<'a>(doc: &'a RawDocument, key: &str) -> Result<Option<&'a [u8]>, BrokenSequence> {
    Ok(elements(doc)?
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, range)| &doc.as_bytes()[range]))
}

/// The document without the element at `range` (its `splitEvent`), edited in place.
fn without(doc: RawDocumentBuf, range: Range<usize>) -> Result<RawDocumentBuf, BrokenSequence> {
    let mut bytes = doc.into_bytes();
    bytes.drain(range);
    finish(bytes)
}

/// Writes the length prefix of a document whose bytes (terminator included) are complete.
fn finish(mut bytes: Vec<u8>) -> Result<RawDocumentBuf, BrokenSequence> {
    let len = i32::try_from(bytes.len()).map_err(|_| {
        broken(format!(
            "the joined event is {} bytes, over 2 GiB",
            bytes.len()
        ))
    })?;
    bytes[..4].copy_from_slice(&len.to_le_bytes());
    RawDocumentBuf::from_bytes(bytes).map_err(|e| broken(format!("joined event: {e}")))
}

fn broken(message: String) -> BrokenSequence {
    BrokenSequence(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Bson, Document};

    fn raw(d: Document) -> RawDocumentBuf {
        RawDocumentBuf::try_from(&d).unwrap()
    }

    fn keys(d: &RawDocumentBuf) -> Vec<String> {
        d.iter().map(|e| e.unwrap().0.as_str().to_owned()).collect()
    }

    /// An update split as MongoDB splits it: disjoint fields apart from `_id` and `splitEvent`,
    /// each fragment with its own token.
    fn fragments() -> Vec<RawDocumentBuf> {
        vec![
            raw(doc! {
                "_id": {"_data": "T1"},
                "splitEvent": {"fragment": 1, "of": 3},
                "operationType": "update",
                "clusterTime": bson::Timestamp { time: 7, increment: 1 },
                "documentKey": {"_id": 1},
                "updateDescription": {"updatedFields": {"v": 2}},
            }),
            raw(doc! {
                "_id": {"_data": "T2"},
                "splitEvent": {"fragment": 2, "of": 3},
                "fullDocument": {"_id": 1, "v": 2, "blob": "after"},
            }),
            raw(doc! {
                "_id": {"_data": "T3-longer"},
                "splitEvent": {"fragment": 3, "of": 3},
                "fullDocumentBeforeChange": {"_id": 1, "v": 1, "blob": "before"},
            }),
        ]
    }

    /// What each push returned, and whether an event was in progress after it.
    fn push_all(r: &mut Reassembly, docs: Vec<RawDocumentBuf>) -> Vec<(Option<Whole>, bool)> {
        docs.into_iter()
            .map(|d| (r.push(d).unwrap(), r.in_progress()))
            .collect()
    }

    #[test]
    fn fragments_join_into_one_event_with_the_last_token() {
        let mut r = Reassembly::new();
        let out = push_all(&mut r, fragments());
        assert_eq!(out[0], (None, true));
        assert_eq!(out[1], (None, true));
        assert_eq!(r.progress(), None);
        let whole = out[2]
            .0
            .clone()
            .expect("the last fragment completes the event");
        assert!(!out[2].1, "nothing in progress after the last fragment");
        assert_eq!(whole.fragments, 3);
        assert_eq!(
            keys(&whole.event),
            [
                "_id",
                "operationType",
                "clusterTime",
                "documentKey",
                "updateDescription",
                "fullDocument",
                "fullDocumentBeforeChange"
            ],
            "the first fragment's order, then the later fragments' fields"
        );
        let event = Document::try_from(&whole.event).unwrap();
        assert_eq!(
            event,
            doc! {
                "_id": {"_data": "T3-longer"},
                "operationType": "update",
                "clusterTime": bson::Timestamp { time: 7, increment: 1 },
                "documentKey": {"_id": 1},
                "updateDescription": {"updatedFields": {"v": 2}},
                "fullDocument": {"_id": 1, "v": 2, "blob": "after"},
                "fullDocumentBeforeChange": {"_id": 1, "v": 1, "blob": "before"},
            }
        );
        // The next event is read normally.
        let next = raw(doc! {"_id": {"_data": "T4"}, "operationType": "insert"});
        let whole = r.push(next.clone()).unwrap().unwrap();
        assert_eq!((whole.event, whole.fragments), (next, 1));
    }

    #[test]
    fn an_event_that_was_not_split_passes_untouched_and_a_lone_fragment_loses_its_mark() {
        let mut r = Reassembly::new();
        let plain = raw(doc! {"_id": {"_data": "A"}, "operationType": "insert", "x": 1});
        assert_eq!(
            r.push(plain.clone()).unwrap(),
            Some(Whole {
                event: plain.clone(),
                fragments: 1
            })
        );
        // SecantusDB marks every event `{fragment: 1, of: 1}` under the stage.
        let marked = raw(doc! {
            "_id": {"_data": "A"}, "operationType": "insert",
            "splitEvent": {"fragment": 1, "of": 1}, "x": 1,
        });
        let whole = r.push(marked).unwrap().unwrap();
        assert_eq!(whole.fragments, 1);
        assert_eq!(whole.event, plain, "byte-equal to the unmarked event");
    }

    #[test]
    fn repeated_fields_are_taken_once_when_equal_and_refused_when_not() {
        // SecantusDB repeats the small fields in every fragment.
        let mut r = Reassembly::new();
        let f1 = raw(doc! {
            "_id": {"_data": "T"}, "operationType": "update", "documentKey": {"_id": 1},
            "fullDocument": {"a": 1}, "splitEvent": {"fragment": 1, "of": 2},
        });
        let f2 = raw(doc! {
            "_id": {"_data": "T"}, "operationType": "update", "documentKey": {"_id": 1},
            "fullDocumentBeforeChange": {"a": 0}, "splitEvent": {"fragment": 2, "of": 2},
        });
        assert_eq!(r.push(f1.clone()).unwrap(), None);
        let whole = r.push(f2).unwrap().unwrap();
        assert_eq!(
            Document::try_from(&whole.event).unwrap(),
            doc! {
                "_id": {"_data": "T"}, "operationType": "update", "documentKey": {"_id": 1},
                "fullDocument": {"a": 1}, "fullDocumentBeforeChange": {"a": 0},
            }
        );
        let mut r = Reassembly::new();
        r.push(f1).unwrap();
        let other = raw(doc! {
            "_id": {"_data": "T"}, "documentKey": {"_id": 2},
            "splitEvent": {"fragment": 2, "of": 2},
        });
        let e = r.push(other).unwrap_err();
        assert!(e.to_string().contains("`documentKey`"), "{e}");
    }

    #[test]
    fn a_broken_sequence_is_an_error_naming_the_fragments() {
        let [f1, f2, f3]: [RawDocumentBuf; 3] = fragments().try_into().unwrap();
        let err = |docs: Vec<RawDocumentBuf>| {
            let mut r = Reassembly::new();
            let mut last = None;
            for d in docs {
                if let Err(e) = r.push(d) {
                    last = Some(e.to_string());
                    break;
                }
            }
            last.expect("an error")
        };
        // A resume that lands after fragment 1: fragment 2 first.
        let e = err(vec![f2.clone(), f3.clone()]);
        assert!(
            e.contains("fragment 2 of 3 arrived without the fragments before it"),
            "{e}"
        );
        // A fragment missing in the middle.
        let e = err(vec![f1.clone(), f3.clone()]);
        assert!(
            e.contains("fragment 2 of 3 expected, fragment 3 of 3 arrived"),
            "{e}"
        );
        // The stream went on with another event before the last fragment.
        let next = raw(doc! {"_id": {"_data": "T4"}, "operationType": "insert"});
        let e = err(vec![f1.clone(), f2.clone(), next]);
        assert!(
            e.contains("fragment 3 of 3 expected, an event that was not split arrived"),
            "{e}"
        );
        // A fragment repeated.
        let e = err(vec![f1.clone(), f1.clone()]);
        assert!(
            e.contains("fragment 2 of 3 expected, fragment 1 of 3 arrived"),
            "{e}"
        );
        // Nonsense counts.
        let bad = raw(doc! {"_id": 1, "splitEvent": {"fragment": 4, "of": 3}});
        assert!(err(vec![bad]).contains("fragment 4 of 3"));
        let bad = raw(doc! {"_id": 1, "splitEvent": {"fragment": 0, "of": 3}});
        assert!(err(vec![bad]).contains("`splitEvent.fragment` is not a positive integer"));
    }

    #[test]
    fn a_joined_event_may_exceed_16_mib() {
        let blob = "x".repeat(9 * 1024 * 1024);
        let f1 = raw(doc! {
            "_id": {"_data": "T1"}, "splitEvent": {"fragment": 1, "of": 2},
            "operationType": "update", "fullDocument": {"blob": &blob},
        });
        let f2 = raw(doc! {
            "_id": {"_data": "T2"}, "splitEvent": {"fragment": 2, "of": 2},
            "fullDocumentBeforeChange": {"blob": &blob},
        });
        let mut r = Reassembly::new();
        assert_eq!(r.push(f1).unwrap(), None);
        let whole = r.push(f2).unwrap().unwrap();
        assert!(whole.event.as_bytes().len() > 18 * 1024 * 1024);
        assert_eq!(
            whole
                .event
                .get("_id")
                .unwrap()
                .map(Bson::try_from)
                .unwrap()
                .unwrap(),
            Bson::Document(doc! {"_data": "T2"})
        );
        // The encoder reads it as any other event.
        let record = crate::record::EventRecord::from_raw(
            &whole.event,
            &crate::record::FieldPath::parse("documentKey").unwrap(),
            crate::record::RecordFormat::default(),
        )
        .unwrap();
        assert!(record.data.len() > 18 * 1024 * 1024);
    }

    #[test]
    fn values_are_copied_without_being_parsed() {
        // Invalid UTF-8 inside a value reaches the pipeline's lenient decoder as it was read.
        let f1 = raw(doc! {
            "_id": {"_data": "T1"}, "splitEvent": {"fragment": 1, "of": 2},
            "fullDocument": {"s": "POISON-AB"},
        });
        let mut bytes = f1.as_bytes().to_vec();
        let at = bytes.windows(9).position(|w| w == b"POISON-AB").unwrap() + 7;
        bytes[at] = 0xC3;
        bytes[at + 1] = 0x28;
        let f1 = RawDocumentBuf::from_bytes(bytes).unwrap();
        let f2 = raw(doc! {
            "_id": {"_data": "T2"}, "splitEvent": {"fragment": 2, "of": 2}, "x": 1,
        });
        let mut r = Reassembly::new();
        r.push(f1).unwrap();
        let whole = r.push(f2).unwrap().unwrap();
        let (event, decoded) = crate::reader::decode(&whole.event).unwrap();
        assert_eq!(decoded, crate::reader::Decoded::Utf8Repaired);
        assert_eq!(event.get_i32("x").unwrap(), 1);
    }
}
