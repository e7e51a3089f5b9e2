//! The change stream: opening it at a start position, and a task that reads it into a bounded
//! channel so the pipeline can batch, retry and checkpoint without ever holding a getMore.
//! Before it hands an event on, the reader takes the event's size from the watcher's and the
//! process's byte budgets (`flow::Reservation`), so reading pauses while either is spent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{Bson, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::FullDocumentType;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{is_history_lost, WatcherError};
use crate::flow::{ByteBudget, Reservation};
use crate::spec::{FullDocument, WatcherSpec};

/// Where to open a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StartPosition {
    /// Now (a first start at `latest`).
    Latest,
    /// After this opaque resume token (opened with `startAfter`, which also accepts the token
    /// of an invalidate event).
    After(Bson),
    /// At this cluster time, inclusive (`startAtOperationTime`).
    At(Timestamp),
}

/// What the reader task hands the pipeline.
#[derive(Debug)]
pub enum ReaderMsg {
    /// An event, with the bytes it holds in the budgets until it is acknowledged.
    Event(Document, Reservation, Decoded),
    /// An event that does not decode even leniently; the watcher's `on_undeliverable` decides.
    Undecodable(Box<Undecodable>),
    /// A read came back empty; the stream's resume token at that point, if any.
    Idle(Option<Bson>),
}

/// How an event's bytes became a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    Exact,
    /// Some strings were not valid UTF-8 (MongoDB can hold such data); each invalid sequence
    /// was replaced with U+FFFD so the event can still be delivered.
    Utf8Repaired,
}

/// An event that cannot be turned into a document at all, described by what can be read of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    /// The event's resume token, when its `_id` is readable: where to skip past it.
    pub token: Option<Bson>,
    /// `documentKey` as relaxed Extended JSON, or a note that it is unreadable.
    pub document_key: String,
    pub error: String,
}

/// Decodes an event strictly, then with invalid UTF-8 replaced; an event that fails both is
/// described for the `on_undeliverable` policy instead of failing the stream, so one bad
/// document can never block a watcher for good.
pub fn decode(raw: &RawDocumentBuf) -> Result<(Document, Decoded), Box<Undecodable>> {
    let strict = match Document::try_from(raw) {
        Ok(event) => return Ok((event, Decoded::Exact)),
        Err(e) => e,
    };
    if let Ok(lossy) = bson::Utf8Lossy::<Document>::try_from(raw.clone()) {
        return Ok((lossy.0, Decoded::Utf8Repaired));
    }
    let token = raw
        .get("_id")
        .ok()
        .flatten()
        .and_then(|t| Bson::try_from(t).ok());
    let document_key = raw
        .get_document("documentKey")
        .ok()
        .and_then(|k| bson::Utf8Lossy::<Document>::try_from(k).ok())
        .map(|k| Bson::Document(k.0).into_relaxed_extjson().to_string())
        .unwrap_or_else(|| "(unreadable)".to_owned());
    Err(Box::new(Undecodable {
        token,
        document_key,
        error: strict.to_string(),
    }))
}

/// How long one empty read (getMore) may wait on the server for new events.
pub const MAX_AWAIT: Duration = Duration::from_millis(500);

pub async fn open(
    client: &mongodb::Client,
    spec: &WatcherSpec,
    start: &StartPosition,
) -> Result<ChangeStream<RawDocumentBuf>, WatcherError> {
    let coll = client
        .database(&spec.database)
        .collection::<Document>(&spec.collection);
    let full_document = match spec.full_document {
        FullDocument::Off => None,
        FullDocument::UpdateLookup => Some(FullDocumentType::UpdateLookup),
        FullDocument::WhenAvailable => Some(FullDocumentType::WhenAvailable),
        FullDocument::Required => Some(FullDocumentType::Required),
    };
    let mut watch = coll
        .watch()
        .pipeline(spec.pipeline.clone())
        .max_await_time(MAX_AWAIT);
    if let Some(full_document) = full_document {
        watch = watch.full_document(full_document);
    }
    match start {
        StartPosition::Latest => {}
        StartPosition::After(token) => watch = watch.start_after(to_resume_token(token)?),
        StartPosition::At(ts) => watch = watch.start_at_operation_time(*ts),
    }
    let stream = watch.await.map_err(classify)?;
    Ok(stream.with_type::<RawDocumentBuf>())
}

/// The stream's current resume token as plain BSON.
pub fn current_token(stream: &ChangeStream<RawDocumentBuf>) -> Option<Bson> {
    stream
        .resume_token()
        .and_then(|t| from_resume_token(&t).ok())
}

/// Reads until cancelled or the stream fails; an invalidate event is the last one sent.
pub async fn run(
    mut stream: ChangeStream<RawDocumentBuf>,
    tx: mpsc::Sender<Result<ReaderMsg, WatcherError>>,
    budgets: [Arc<ByteBudget>; 2],
    cancel: CancellationToken,
) {
    let [watcher_budget, process_budget] = budgets;
    loop {
        let started = Instant::now();
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            next = stream.next_if_any() => next,
        };
        let msg = match next {
            Ok(Some(raw)) => {
                let last = raw.get_str("operationType").ok() == Some("invalidate");
                let bytes = raw.as_bytes().len();
                let reservation = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = Reservation::take(&watcher_budget, &process_budget, bytes) => r,
                };
                let msg = match decode(&raw) {
                    Ok((event, decoded)) => ReaderMsg::Event(event, reservation, decoded),
                    Err(undecodable) => ReaderMsg::Undecodable(undecodable),
                };
                if !send(&tx, &cancel, Ok(msg)).await || last {
                    return;
                }
                continue;
            }
            Ok(None) => Ok(ReaderMsg::Idle(current_token(&stream))),
            Err(e) => Err(classify(e)),
        };
        let failed = msg.is_err();
        if !send(&tx, &cancel, msg).await || failed {
            return;
        }
        // A server that answers empty reads at once would make this loop spin.
        let elapsed = started.elapsed();
        if elapsed < Duration::from_millis(20) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

async fn send(
    tx: &mpsc::Sender<Result<ReaderMsg, WatcherError>>,
    cancel: &CancellationToken,
    msg: Result<ReaderMsg, WatcherError>,
) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        sent = tx.send(msg) => sent.is_ok(),
    }
}

fn classify(error: mongodb::error::Error) -> WatcherError {
    if is_history_lost(&error) {
        WatcherError::HistoryLost {
            message: crate::error::summary(&error),
        }
    } else {
        WatcherError::Mongo(error)
    }
}

#[derive(Serialize, Deserialize)]
struct TokenBox<T> {
    t: T,
}

/// `ResumeToken` wraps raw BSON; a round trip through bytes converts it without relying on
/// how its serde impl meets a non-raw (de)serializer.
pub fn to_resume_token(token: &Bson) -> Result<ResumeToken, WatcherError> {
    let bytes = bson::serialize_to_vec(&TokenBox { t: token }).map_err(bad_token)?;
    let boxed: TokenBox<ResumeToken> = bson::deserialize_from_slice(&bytes).map_err(bad_token)?;
    Ok(boxed.t)
}

pub fn from_resume_token(token: &ResumeToken) -> Result<Bson, WatcherError> {
    let bytes = bson::serialize_to_vec(&TokenBox { t: token }).map_err(bad_token)?;
    let boxed: TokenBox<Bson> = bson::deserialize_from_slice(&bytes).map_err(bad_token)?;
    Ok(boxed.t)
}

fn bad_token(e: bson::error::Error) -> WatcherError {
    WatcherError::CorruptCheckpoint {
        watcher: String::new(),
        message: format!("resume token does not convert: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn invalid_utf8_is_repaired_not_fatal() {
        let good = RawDocumentBuf::try_from(&doc! {
            "_id": {"_data": "82AB"},
            "documentKey": {"_id": 7},
            "fullDocument": {"_id": 7, "s": "POISON-AB"},
        })
        .unwrap();
        let (event, decoded) = decode(&good).unwrap();
        assert_eq!(decoded, Decoded::Exact);
        assert_eq!(
            event
                .get_document("fullDocument")
                .unwrap()
                .get_str("s")
                .unwrap(),
            "POISON-AB"
        );
        // The same bytes with "AB" replaced by 0xC3 0x28, an invalid UTF-8 sequence.
        let mut bytes = good.as_bytes().to_vec();
        let at = bytes.windows(9).position(|w| w == b"POISON-AB").unwrap() + 7;
        bytes[at] = 0xC3;
        bytes[at + 1] = 0x28;
        let bad = RawDocumentBuf::from_bytes(bytes).unwrap();
        assert!(
            Document::try_from(&bad).is_err(),
            "strict decoding refuses it"
        );
        let (event, decoded) = decode(&bad).unwrap();
        assert_eq!(decoded, Decoded::Utf8Repaired);
        assert_eq!(
            event
                .get_document("fullDocument")
                .unwrap()
                .get_str("s")
                .unwrap(),
            "POISON-\u{FFFD}("
        );
        assert_eq!(
            event.get("_id"),
            Some(&Bson::Document(doc! {"_data": "82AB"}))
        );
    }

    #[test]
    fn tokens_convert_both_ways() {
        let token = Bson::Document(doc! {"_data": "826A0B", "x": 1_i64});
        let rt = to_resume_token(&token).unwrap();
        assert_eq!(from_resume_token(&rt).unwrap(), token);
    }
}
