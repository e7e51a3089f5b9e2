//! The change stream: opening it at a start position, and a task that reads it into a bounded
//! channel so the pipeline can batch, retry and checkpoint without ever holding a getMore.
//! Before it hands an event on, the reader takes the event's size from the watcher's and the
//! process's byte budgets (`flow::Reservation`), so reading pauses while either is spent.
//! Events over 16 MiB arrive split into fragments (`split_large_events`); the reader joins them
//! (`split`) and hands on whole events only, reserving each one's full size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{Bson, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{is_history_lost, WatcherError};
use crate::flow::{ByteBudget, Reservation};
use crate::spec::{FullDocument, FullDocumentBeforeChange, SplitLargeEvents, WatcherSpec};
use crate::split::Reassembly;

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

/// The cluster time a stream started at `time` opens at: its whole second, increment 0 (the
/// inverse of `status::wall_time`); times before 1970 are 1970.
pub fn cluster_time_at(time: bson::DateTime) -> Timestamp {
    Timestamp {
        time: (time.timestamp_millis().max(0) / 1000) as u32,
        increment: 0,
    }
}

/// What the reader task hands the pipeline.
#[derive(Debug)]
pub enum ReaderMsg {
    /// An event as the server sent it, with the bytes it holds in the budgets until it is
    /// acknowledged. The pipeline reads it without decoding it (`record::EventRecord`), and
    /// decodes it with [`decode`] only when that fails.
    Event(RawDocumentBuf, Reservation),
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

/// How long one empty read (getMore) may wait on the server for new events. A server answers
/// as soon as an event comes (SecantusDB too: an insert 0.3 s into a 5 s wait arrived at
/// 0.305 s), so this is not latency; it is how often an idle stream asks. Every idle watcher
/// sends one getMore per wait: at 0.5 s, 1,000 idle watchers kept SecantusDB busy with 2,000
/// a second and their start took 4.8-5.4 s; at 2 s, 2.9-5.2 s (scenario 6, same hour). The
/// MongoDB Kafka connector waits 5 s (`poll.await.time.ms`); an idle stream's checkpoint
/// moves as often as this answers.
pub const MAX_AWAIT: Duration = Duration::from_millis(2000);

/// The stage that splits an event over 16 MiB into fragments ([`crate::split`] joins them).
pub const SPLIT_STAGE: &str = "$changeStreamSplitLargeEvent";

/// Opens the watcher's change stream at `start`.
///
/// With `split_large_events` `on` or `auto` the pipeline ends with [`SPLIT_STAGE`]. Whether the
/// server has the stage is asked of the server itself, by opening with it: `auto` opens again
/// without it when the server refuses it as unknown ([`refuses_split_stage`]), `on` fails
/// naming the setting. A version check (`buildInfo` at 7.0, or 6.0.9 and later) was the
/// alternative, but it guesses: a 6.0 before 6.0.9 and 6.0.9 differ in a patch number,
/// compatible servers report versions of their own (SecantusDB 0.7.0b3 reports 8.2.11, and
/// has the stage), and only the server knows whether it has the stage. The refusal costs one
/// extra `aggregate` per life, on servers without the stage only.
pub async fn open(
    client: &mongodb::Client,
    spec: &WatcherSpec,
    start: &StartPosition,
) -> Result<ChangeStream<RawDocumentBuf>, WatcherError> {
    match spec.split_large_events {
        SplitLargeEvents::Off => open_with(client, spec, start, false).await,
        SplitLargeEvents::On => open_with(client, spec, start, true)
            .await
            .map_err(|e| match e {
                WatcherError::Mongo(e) if refuses_split_stage(&e) => {
                    WatcherError::SplitLargeEventsUnsupported {
                        server: crate::error::summary(&e),
                    }
                }
                e => e,
            }),
        SplitLargeEvents::Auto => match open_with(client, spec, start, true).await {
            Err(WatcherError::Mongo(e)) if refuses_split_stage(&e) => {
                tracing::info!(
                    server = %crate::error::summary(&e),
                    "the server has no $changeStreamSplitLargeEvent; change stream opened \
                     without it (split_large_events: auto): an event over 16 MiB fails it"
                );
                open_with(client, spec, start, false).await
            }
            opened => opened,
        },
    }
}

/// Whether the server refused [`SPLIT_STAGE`] itself as a stage it does not know: MongoDB
/// before 7.0 (and 6.0.9) answers 40324 "Unrecognized pipeline stage name" naming it; other
/// servers may word it otherwise but name the stage. A stage of the watcher's own `pipeline`
/// that the server does not know is named in the refusal instead, and is not taken for this.
pub fn refuses_split_stage(error: &mongodb::error::Error) -> bool {
    const UNRECOGNIZED_STAGE: i32 = 40324;
    let mongodb::error::ErrorKind::Command(c) = error.kind.as_ref() else {
        return false;
    };
    if !c.message.contains(SPLIT_STAGE) {
        return false;
    }
    let message = c.message.to_ascii_lowercase();
    c.code == UNRECOGNIZED_STAGE
        || ["unrecognized", "unknown", "not supported", "unsupported"]
            .iter()
            .any(|w| message.contains(w))
}

async fn open_with(
    client: &mongodb::Client,
    spec: &WatcherSpec,
    start: &StartPosition,
    split: bool,
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
    let before_change = match spec.full_document_before_change {
        FullDocumentBeforeChange::Off => None,
        FullDocumentBeforeChange::WhenAvailable => {
            Some(FullDocumentBeforeChangeType::WhenAvailable)
        }
        FullDocumentBeforeChange::Required => Some(FullDocumentBeforeChangeType::Required),
    };
    let mut pipeline = spec.pipeline.clone();
    // Last, as the server requires; once, should the watcher's own pipeline end with it.
    if split && !pipeline.last().is_some_and(|s| s.contains_key(SPLIT_STAGE)) {
        pipeline.push(bson::doc! {SPLIT_STAGE: {}});
    }
    let mut watch = coll.watch().pipeline(pipeline).max_await_time(MAX_AWAIT);
    if let Some(full_document) = full_document {
        watch = watch.full_document(full_document);
    }
    if let Some(before_change) = before_change {
        watch = watch.full_document_before_change(before_change);
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
///
/// Fragments of a split event are joined here ([`Reassembly`]) and only the whole event is
/// handed on, so no fragment's token reaches the ack tracker: while an event is half read, an
/// idle notice carries no token (the stream's token then points inside the event, and a
/// checkpoint there would resume mid-event). A new life therefore reads a split event whole
/// again. `reassembled` counts the events joined from two or more fragments.
pub async fn run(
    mut stream: ChangeStream<RawDocumentBuf>,
    tx: mpsc::Sender<Result<ReaderMsg, WatcherError>>,
    budgets: [Arc<ByteBudget>; 2],
    reassembled: IntCounter,
    cancel: CancellationToken,
) {
    let [watcher_budget, process_budget] = budgets;
    let mut split = Reassembly::new();
    loop {
        let started = Instant::now();
        // `biased`, work first: an event already in the batch is taken without registering
        // with the cancellation token (its mutex, twice per event otherwise); a stopped
        // watcher is still seen at once whenever the work has to wait.
        let next = tokio::select! {
            biased;
            next = stream.next_if_any() => next,
            _ = cancel.cancelled() => return,
        };
        let msg = match next {
            Ok(Some(read)) => {
                let raw = match split.push(read) {
                    Ok(Some(whole)) if whole.fragments > 1 => {
                        reassembled.inc();
                        tracing::info!(
                            fragments = whole.fragments,
                            bytes = whole.event.as_bytes().len(),
                            document_key = %document_key(&whole.event),
                            "change event reassembled from fragments"
                        );
                        whole.event
                    }
                    Ok(Some(whole)) => whole.event,
                    // More fragments of this event to come.
                    Ok(None) => {
                        if let Some((fragment, of)) = split.progress() {
                            tracing::debug!(fragment, of, "change event fragment read");
                        }
                        continue;
                    }
                    Err(broken) => {
                        let e = WatcherError::SplitEvent {
                            message: broken.to_string(),
                        };
                        let _ = send(&tx, &cancel, Err(e)).await;
                        return;
                    }
                };
                let last = is_invalidate(&raw);
                let bytes = raw.as_bytes().len();
                let reservation = tokio::select! {
                    biased;
                    r = Reservation::take(&watcher_budget, &process_budget, bytes) => r,
                    _ = cancel.cancelled() => return,
                };
                let msg = ReaderMsg::Event(raw, reservation);
                if !send(&tx, &cancel, Ok(msg)).await || last {
                    return;
                }
                continue;
            }
            Ok(None) if split.in_progress() => Ok(ReaderMsg::Idle(None)),
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

/// `documentKey` as relaxed Extended JSON, for logs.
fn document_key(event: &RawDocumentBuf) -> String {
    event
        .get("documentKey")
        .ok()
        .flatten()
        .and_then(|k| Bson::try_from(k).ok())
        .map(|k| k.into_relaxed_extjson().to_string())
        .unwrap_or_else(|| "(none)".to_owned())
}

async fn send(
    tx: &mpsc::Sender<Result<ReaderMsg, WatcherError>>,
    cancel: &CancellationToken,
    msg: Result<ReaderMsg, WatcherError>,
) -> bool {
    tokio::select! {
        biased;
        sent = tx.send(msg) => sent.is_ok(),
        _ = cancel.cancelled() => false,
    }
}

/// Whether the event is an `invalidate` (the stream's last), read with the quick walk.
fn is_invalidate(event: &RawDocumentBuf) -> bool {
    crate::bson_walk::walk(event.as_bytes())
        .into_iter()
        .flatten()
        .map_while(Result::ok)
        .find(|element| element.key == "operationType")
        .is_some_and(|element| {
            element.kind == 0x02 && crate::bson_walk::str_value(element.value) == Ok("invalidate")
        })
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
    fn only_an_invalidate_ends_the_stream() {
        let raw = |d: bson::Document| RawDocumentBuf::try_from(&d).unwrap();
        assert!(is_invalidate(&raw(
            doc! {"_id": {"_data": "82"}, "operationType": "invalidate"}
        )));
        for other in [
            doc! {"_id": {"_data": "82"}, "operationType": "insert"},
            doc! {"operationType": 1},
            doc! {"fullDocument": {"operationType": "invalidate"}},
            doc! {},
        ] {
            assert!(!is_invalidate(&raw(other.clone())), "{other}");
        }
    }

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

    fn command_error(code: i32, message: &str) -> mongodb::error::Error {
        let command: mongodb::error::CommandError = bson::deserialize_from_document(
            doc! {"code": code, "codeName": "Location", "errmsg": message},
        )
        .expect("a command error");
        mongodb::error::ErrorKind::Command(command).into()
    }

    #[test]
    fn only_a_refusal_of_the_split_stage_itself_counts_as_no_support() {
        // MongoDB 6.0 before 6.0.9 (and SecantusDB for any unknown stage).
        let refused = command_error(
            40324,
            "Unrecognized pipeline stage name: '$changeStreamSplitLargeEvent'",
        );
        assert!(refuses_split_stage(&refused));
        assert!(refuses_split_stage(&command_error(
            1,
            "Unsupported stage $changeStreamSplitLargeEvent"
        )));
        // The watcher's own pipeline has a stage the server does not know: not ours.
        let theirs = command_error(40324, "Unrecognized pipeline stage name: '$frobnicate'");
        assert!(!refuses_split_stage(&theirs));
        // Another complaint about the stage (misplaced) is not a lack of support.
        let misplaced = command_error(
            7182802,
            "$changeStreamSplitLargeEvent can only appear as the final stage",
        );
        assert!(!refuses_split_stage(&misplaced));
        assert!(!refuses_split_stage(&mongodb::error::Error::custom("x")));
    }

    #[test]
    fn tokens_convert_both_ways() {
        let token = Bson::Document(doc! {"_data": "826A0B", "x": 1_i64});
        let rt = to_resume_token(&token).unwrap();
        assert_eq!(from_resume_token(&rt).unwrap(), token);
    }
}
