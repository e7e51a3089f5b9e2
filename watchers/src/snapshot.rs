//! Copies of a collection's documents (`snapshot: initial`, and on-demand backfills through
//! `POST /watchers/{name}/snapshot`): read in `_id` ranges side by side
//! (`snapshot_parallelism`) while the change stream is read too, and handed to the pipeline
//! as snapshot events through the same scheduler, byte budgets and ack tracker as change
//! events.
//!
//! A snapshot event is shaped like an insert event, so that `record::EventRecord::from_raw`
//! encodes it and finds its partition key like any event:
//! `{_id: {snapshot: <document _id>}, operationType: "snapshot", clusterTime: <copy's start>,
//! ns: {db, coll}, documentKey: {_id}, fullDocument: <document>}`. Its `_id` is not a resume
//! token: the pipeline enters it in the ack tracker at the newest stream position read, with
//! the copy's progress ([`SnapshotProgress`]: per range, the last `_id` read) beside it, so
//! the frontier says how far both the stream and every range are acknowledged.
//!
//! Ranges are bounded with `find`'s `min`/`max` on the `_id` index (`min <= _id < max`), which
//! follow the index's order across BSON types, so a collection whose `_id`s mix types is
//! split and continued without a gap; their bounds are quantiles of a `$sample` of `_id`s.

use std::sync::Arc;

use bson::{doc, rawdoc, Bson, Document, RawDocument, RawDocumentBuf, Timestamp};
use futures_util::TryStreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checkpoint::{CopyRange, SnapshotProgress};
use crate::error::WatcherError;
use crate::flow::{ByteBudget, Reservation};
use crate::spec::WatcherSpec;

/// Documents per `find` batch of the copy.
pub const SNAPSHOT_BATCH: u32 = 1000;

/// The `operationType` of a snapshot record.
pub const SNAPSHOT_OPERATION: &str = "snapshot";

/// `_id`s sampled per range to place the ranges' bounds.
const SAMPLE_PER_RANGE: i64 = 32;

/// Messages of a copy to the pipeline.
#[derive(Debug)]
pub enum CopyMsg {
    /// A document of range `range` (its index in the progress), as a snapshot event, with
    /// its bytes taken from the copy's, the watcher's and the process's budgets.
    Document {
        range: usize,
        raw: RawDocumentBuf,
        reservation: Reservation,
    },
    /// Every document of range `range` read.
    RangeDone(usize),
    /// Reading failed: the life ends, and the next one continues the copy from its checkpoint.
    Failed(WatcherError),
}

/// Budgets a copy's documents are taken from: the copy's own share of the watcher's bytes
/// (so that the change stream keeps the rest), the watcher's and the process's.
#[derive(Debug, Clone)]
pub struct CopyBudgets {
    pub copy: Arc<ByteBudget>,
    pub watcher: Arc<ByteBudget>,
    pub process: Arc<ByteBudget>,
}

/// The snapshot event of `document` (see the module docs); `None` when it has no `_id`.
pub fn event(
    database: &str,
    collection: &str,
    document: &RawDocument,
    cluster_time: Timestamp,
) -> Option<RawDocumentBuf> {
    let id = bson::RawBson::from(document.get("_id").ok()??);
    Some(rawdoc! {
        "_id": { "snapshot": id.clone() },
        "operationType": SNAPSHOT_OPERATION,
        "clusterTime": cluster_time,
        "ns": { "db": database, "coll": collection },
        "documentKey": { "_id": id },
        "fullDocument": document.to_owned(),
    })
}

/// The document `_id` of a snapshot event's `_id` (`{snapshot: <_id>}`).
pub fn document_id(token: &Bson) -> Option<Bson> {
    match token {
        Bson::Document(d) => d.get("snapshot").cloned(),
        _ => None,
    }
}

/// The `_id` ranges of a new copy: `parallelism` ranges with bounds at quantiles of a
/// `$sample` of `_id`s (sorted by the server, so in the index's order across types), or one
/// range over everything when the collection is small, the sample fails or `parallelism` is 1.
/// Uneven ranges only copy less in parallel; no document falls outside them.
pub async fn plan(
    client: &mongodb::Client,
    spec: &WatcherSpec,
    filter: Option<&Document>,
    parallelism: usize,
) -> Vec<CopyRange> {
    let whole = vec![CopyRange::default()];
    if parallelism <= 1 {
        return whole;
    }
    let collection = client
        .database(&spec.database)
        .collection::<Document>(&spec.collection);
    let estimated = collection.estimated_document_count().await.unwrap_or(0);
    if estimated < (parallelism as u64) * u64::from(SNAPSHOT_BATCH) {
        return whole;
    }
    let mut pipeline = Vec::new();
    if let Some(filter) = filter {
        pipeline.push(doc! {"$match": filter.clone()});
    }
    pipeline.extend([
        doc! {"$sample": {"size": SAMPLE_PER_RANGE * parallelism as i64}},
        doc! {"$project": {"_id": 1}},
        doc! {"$sort": {"_id": 1}},
    ]);
    let sampled: Vec<Bson> = match collection.aggregate(pipeline).await {
        Ok(cursor) => match cursor.try_collect::<Vec<Document>>().await {
            Ok(docs) => docs
                .into_iter()
                .filter_map(|d| d.get("_id").cloned())
                .collect(),
            Err(e) => {
                warn!(error = %e, "snapshot: sampling `_id`s failed; copying in one range");
                return whole;
            }
        },
        Err(e) => {
            warn!(error = %e, "snapshot: sampling `_id`s failed; copying in one range");
            return whole;
        }
    };
    let mut bounds: Vec<Bson> = Vec::new();
    for i in 1..parallelism {
        let Some(b) = sampled.get(i * sampled.len() / parallelism) else {
            continue;
        };
        // A `null` bound would read as an open one; equal bounds make empty ranges.
        if *b != Bson::Null && bounds.last() != Some(b) {
            bounds.push(b.clone());
        }
    }
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut min = None;
    for b in bounds {
        ranges.push(CopyRange {
            min: min.replace(b.clone()),
            max: Some(b),
            ..CopyRange::default()
        });
    }
    ranges.push(CopyRange {
        min,
        ..CopyRange::default()
    });
    ranges
}

/// Documents the copy has left: its progress's ranges counted from where each continues
/// (`$gt` within the range on the `_id` index), and the collection's estimated count. Either
/// is `None` when the server does not answer: progress is shown, not relied on.
pub async fn starting_counts(
    client: &mongodb::Client,
    spec: &WatcherSpec,
    progress: &SnapshotProgress,
) -> (u64, Option<u64>) {
    let collection = client
        .database(&spec.database)
        .collection::<RawDocumentBuf>(&spec.collection);
    let total = match &progress.filter {
        None => collection.estimated_document_count().await.ok(),
        Some(filter) => collection.count_documents(filter.clone()).await.ok(),
    };
    let mut before = 0;
    for range in &progress.ranges {
        let mut bound = Document::new();
        if let Some(min) = &range.min {
            bound.insert("$gte", min.clone());
        }
        match (range.done, &range.after, &range.max) {
            (true, _, Some(max)) => {
                bound.insert("$lt", max.clone());
            }
            (true, _, None) => {}
            (false, Some(after), _) => {
                bound.insert("$lte", after.clone());
            }
            (false, None, _) => continue,
        }
        let mut filter = progress.filter.clone().unwrap_or_default();
        if !bound.is_empty() {
            filter.insert("_id", bound);
        }
        before += collection.count_documents(filter).await.unwrap_or(0);
    }
    (before, total)
}

/// Starts one reader per unfinished range of `progress`; their documents, and each range's
/// end, come on the returned channel. The readers stop when `cancel` is cancelled or the
/// receiver is dropped.
pub fn start(
    client: &mongodb::Client,
    spec: &Arc<WatcherSpec>,
    progress: &SnapshotProgress,
    budgets: CopyBudgets,
    cancel: &CancellationToken,
) -> mpsc::Receiver<CopyMsg> {
    let (tx, rx) = mpsc::channel(64);
    let cluster_time = progress.cluster_time.unwrap_or(Timestamp {
        time: 0,
        increment: 0,
    });
    for (index, range) in progress.ranges.iter().enumerate() {
        if range.done {
            continue;
        }
        let reader = RangeReader {
            client: client.clone(),
            spec: spec.clone(),
            index,
            range: range.clone(),
            filter: progress.filter.clone(),
            cluster_time,
            budgets: budgets.clone(),
            tx: tx.clone(),
        };
        let cancel = cancel.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let tx = reader.tx.clone();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = reader.run() => r,
            };
            let msg = match result {
                Ok(true) => CopyMsg::RangeDone(index),
                Ok(false) => return,
                Err(e) => CopyMsg::Failed(e),
            };
            let _ = tx.send(msg).await;
        }));
    }
    rx
}

/// One range of a copy being read.
struct RangeReader {
    client: mongodb::Client,
    spec: Arc<WatcherSpec>,
    index: usize,
    range: CopyRange,
    filter: Option<Document>,
    cluster_time: Timestamp,
    budgets: CopyBudgets,
    tx: mpsc::Sender<CopyMsg>,
}

impl RangeReader {
    /// Reads the range from where it continues, in `_id` order. `Ok(false)`: the pipeline
    /// stopped listening.
    async fn run(&self) -> Result<bool, WatcherError> {
        let spec = &self.spec;
        let collection = self
            .client
            .database(&spec.database)
            .collection::<RawDocumentBuf>(&spec.collection);
        // `min` is inclusive: a continued range starts at its last acknowledged `_id`, read
        // again and skipped.
        let min = self.range.after.as_ref().or(self.range.min.as_ref());
        info!(range = self.index,
            min = %min.map(crate::record::to_text).unwrap_or_default(),
            max = %self.range.max.as_ref().map(crate::record::to_text).unwrap_or_default(),
            "snapshot: copying a range");
        let mut find = collection
            .find(self.filter.clone().unwrap_or_default())
            .sort(doc! {"_id": 1})
            .hint(mongodb::options::Hint::Keys(doc! {"_id": 1}))
            .batch_size(SNAPSHOT_BATCH);
        if let Some(min) = min {
            find = find.min(doc! {"_id": min.clone()});
        }
        if let Some(max) = &self.range.max {
            find = find.max(doc! {"_id": max.clone()});
        }
        let mut cursor = find.await.map_err(WatcherError::Mongo)?;
        let mut first = true;
        while let Some(document) = cursor.try_next().await.map_err(WatcherError::Mongo)? {
            if std::mem::take(&mut first) {
                if let (Some(after), Ok(Some(id))) = (&self.range.after, document.get("_id")) {
                    if Bson::try_from(id).ok().as_ref() == Some(after) {
                        continue;
                    }
                }
            }
            let Some(raw) = event(
                &spec.database,
                &spec.collection,
                &document,
                self.cluster_time,
            ) else {
                continue;
            };
            let bytes = raw.as_bytes().len();
            let b = &self.budgets;
            let reservation = Reservation::take_copy(&b.copy, &b.watcher, &b.process, bytes).await;
            let msg = CopyMsg::Document {
                range: self.index,
                raw,
                reservation,
            };
            if self.tx.send(msg).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{EventRecord, FieldPath, RecordFormat};

    #[test]
    fn a_snapshot_event_encodes_like_an_insert_with_its_key() {
        let document = rawdoc! {"_id": 7, "name": "ada"};
        let ts = Timestamp {
            time: 10,
            increment: 2,
        };
        let raw = event("shop", "orders", &document, ts).unwrap();
        let key = FieldPath::parse("documentKey._id").unwrap();
        let record = EventRecord::from_raw(&raw, &key, RecordFormat::Relaxed).unwrap();
        assert_eq!(record.operation, SNAPSHOT_OPERATION);
        assert_eq!(record.cluster_time, Some(ts));
        assert_eq!(record.partition_key, "7");
        assert_eq!(
            document_id(&record.token.unwrap().to_bson()),
            Some(Bson::Int32(7))
        );
        let json: serde_json::Value = serde_json::from_slice(&record.data).unwrap();
        assert_eq!(json["fullDocument"]["name"], "ada");
        assert_eq!(json["documentKey"]["_id"], 7);
        assert_eq!(json["ns"]["coll"], "orders");
    }
}
