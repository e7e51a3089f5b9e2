//! Checkpoints in DynamoDB: one item per watcher, written compare-and-set; or, in drop-in
//! mode, the old Python tool's marker item, read and written exactly as that tool did.
//!
//! Item layout (table with one string hash key `watcher`):
//! `watcher` (S), `resume_token` (S, canonical Extended JSON of the opaque token),
//! `cluster_time` (M `{t, i}`, when known), `paused` (BOOL), `revision` (N, +1 per write),
//! `updated_at` (S, RFC 3339), `namespace` (S, `database.collection` the token belongs to;
//! absent from items written before it was stored), and while a copy (an initial snapshot or
//! an on-demand backfill) runs, `snapshot` (S, `copying`) and `snapshot_progress` (S,
//! canonical Extended JSON of [`SnapshotProgress`]). Every write names the revision it
//! replaces, so two processes running the same watcher cannot silently overwrite each other. A write whose outcome is
//! unknown (no answer, a dropped connection) is settled by reading the item back
//! ([`Checkpointer`]), so the watcher's own write is never taken for a second writer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, KeyType, KeysAndAttributes, Put, TransactWriteItem};
use bson::{Bson, DateTime, Timestamp};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::ack::{AckTracker, Position};
use crate::error::{aws_refusal, AwsResource, InDoubt, WatcherError};
use crate::lease::Fence;
use crate::spec::WatcherSpec;

/// What a checkpoint says.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Where to resume; `None` when only a cluster time is known.
    pub token: Option<Bson>,
    pub cluster_time: Option<Timestamp>,
    pub paused: bool,
    /// The `database.collection` whose change stream the token belongs to, so that a watcher
    /// whose collection changed in the config under the same name is told, not resumed on a
    /// token its server refuses. `None` in items written before it was stored, and in the old
    /// tool's marker (keyed by the namespace itself).
    pub namespace: Option<String>,
}

/// A copy's progress while it runs (an initial snapshot, or an on-demand backfill), stored
/// as `snapshot: "copying"` and `snapshot_progress`, the canonical Extended JSON of
/// `{ranges: [{min, max, after, done}], filter, cluster_time}`. An item without them has no
/// copy to continue.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SnapshotProgress {
    /// The `_id` ranges copied side by side; empty until the copy has planned them (a copy
    /// stored before that plans them again when it continues).
    pub ranges: Vec<CopyRange>,
    /// Only documents matching this query filter (an on-demand backfill of a subset).
    pub filter: Option<bson::Document>,
    /// Stamped on every record of the copy as its `clusterTime`: the cluster time when the
    /// copy began. Every document read is at least as new as this; every change after it
    /// comes through the change stream.
    pub cluster_time: Option<Timestamp>,
}

/// One range of a copy, in the `_id` index's order (which orders BSON types too):
/// `min <= _id < max`, either bound open when `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CopyRange {
    pub min: Option<Bson>,
    pub max: Option<Bson>,
    /// The last `_id` of the range whose record is acknowledged with everything read before
    /// it; `None` before the first. A continued copy starts after it.
    pub after: Option<Bson>,
    /// Every document of the range read.
    pub done: bool,
}

impl SnapshotProgress {
    /// Every range planned and read to its end.
    pub fn all_done(&self) -> bool {
        !self.ranges.is_empty() && self.ranges.iter().all(|r| r.done)
    }

    /// As stored in `snapshot_progress`.
    pub fn to_document(&self) -> bson::Document {
        let opt = |b: &Option<Bson>| b.clone().unwrap_or(Bson::Null);
        let ranges: Vec<Bson> = self
            .ranges
            .iter()
            .map(|r| {
                Bson::Document(bson::doc! {
                    "min": opt(&r.min),
                    "max": opt(&r.max),
                    "after": opt(&r.after),
                    "done": r.done,
                })
            })
            .collect();
        let mut doc = bson::doc! { "ranges": ranges };
        if let Some(filter) = &self.filter {
            doc.insert("filter", filter.clone());
        }
        if let Some(ts) = self.cluster_time {
            doc.insert("cluster_time", ts);
        }
        doc
    }

    /// Reads what [`Self::to_document`] wrote. A `null` bound is an open one: an `_id` is
    /// never `null` in a range bound we write (the `_id` index starts below every value but
    /// MinKey, and a range's bounds come from documents' `_id`s).
    pub fn from_document(doc: &bson::Document) -> Result<Self, String> {
        let opt = |d: &bson::Document, k: &str| match d.get(k) {
            None | Some(Bson::Null) => None,
            Some(b) => Some(b.clone()),
        };
        let ranges = doc
            .get_array("ranges")
            .map_err(|_| "`snapshot_progress.ranges` is not an array".to_owned())?
            .iter()
            .map(|r| match r {
                Bson::Document(d) => Ok(CopyRange {
                    min: opt(d, "min"),
                    max: opt(d, "max"),
                    after: opt(d, "after"),
                    done: d.get_bool("done").unwrap_or(false),
                }),
                _ => Err("`snapshot_progress.ranges` holds a non-document".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let filter = match doc.get("filter") {
            None | Some(Bson::Null) => None,
            Some(Bson::Document(f)) => Some(f.clone()),
            Some(_) => return Err("`snapshot_progress.filter` is not a document".to_owned()),
        };
        let cluster_time = match doc.get("cluster_time") {
            None => None,
            Some(Bson::Timestamp(ts)) => Some(*ts),
            Some(_) => return Err("`snapshot_progress.cluster_time` is not a timestamp".to_owned()),
        };
        Ok(Self {
            ranges,
            filter,
            cluster_time,
        })
    }
}

/// The namespace a watcher's checkpoints are written for: `database.collection`.
pub fn namespace(spec: &WatcherSpec) -> String {
    format!("{}.{}", spec.database, spec.collection)
}

/// A checkpoint as read, with the revision a following write must name.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub checkpoint: Checkpoint,
    pub revision: u64,
    pub updated_at: Option<String>,
    /// An initial snapshot to continue (see [`SnapshotProgress`]).
    pub snapshot: Option<SnapshotProgress>,
}

/// How checkpoints are laid out in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One item per watcher keyed `watcher`, compare-and-set on `revision`.
    Native,
    /// The old Python tool's marker: hash key `collectionName` = `"<db>.<collection>"`, the
    /// token in attribute `_id` as a map (`{_data: <string>}`), written with UpdateItem
    /// `SET #id = :id` and nothing else, so the old tool can take over again at any time.
    LegacyMarker { collection_name: String },
}

impl Layout {
    fn hash_key(&self) -> &'static str {
        match self {
            Layout::Native => "watcher",
            Layout::LegacyMarker { .. } => "collectionName",
        }
    }
}

#[derive(Clone)]
pub struct CheckpointStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    layout: Layout,
    /// Set once the table's key schema was checked: every watcher of the process shares the
    /// store, so 1,000 watchers make one DescribeTable, not 1,000. A failed check is not
    /// kept, so a table created later is found.
    verified: Arc<tokio::sync::OnceCell<()>>,
    /// Loads of the process's watchers are read together: a task started by the first load
    /// takes every load waiting and reads up to [`BATCH_GET_KEYS`] of them in one
    /// BatchGetItem (1,000 watchers starting at once make 10 calls, not 1,000); a lone load
    /// is one GetItem, as before. See [`Self::load`].
    loads: Arc<std::sync::OnceLock<mpsc::UnboundedSender<LoadRequest>>>,
    /// BatchGetItem was refused once (an older IAM policy without it): said once, then loads
    /// fall back to GetItem each.
    batch_refused: Arc<std::sync::atomic::AtomicBool>,
    /// First writes (no item yet) of the process's watchers are written together in the same
    /// way: up to [`TRANSACT_ITEMS`] in one TransactWriteItems, each keeping its own
    /// condition, gathered as [`FIRST_WRITES`] says; a lone first write is one PutItem. Later
    /// writes are PutItem each, at each watcher's own pace. See [`Self::save_snapshot`].
    first_writes: Arc<std::sync::OnceLock<mpsc::UnboundedSender<FirstWrite>>>,
    /// TransactWriteItems was refused once (an IAM policy denying it): said once, then first
    /// writes are PutItem each.
    transact_refused: Arc<std::sync::atomic::AtomicBool>,
}

/// Keys DynamoDB's BatchGetItem takes at most.
const BATCH_GET_KEYS: usize = 100;

/// Writes DynamoDB's TransactWriteItems takes at most.
const TRANSACT_ITEMS: usize = 100;

/// One compare-and-set write: the item, its condition and the condition's values.
struct PutParts {
    item: HashMap<String, AttributeValue>,
    condition: String,
    values: Option<HashMap<String, AttributeValue>>,
}

/// A first write waiting for the first writer task, and where its answer goes.
struct FirstWrite {
    watcher: String,
    put: PutParts,
    tx: oneshot::Sender<Result<u64, WatcherError>>,
}

/// A load waiting for the loader task: the watcher, and where its item goes.
type LoadRequest = (
    String,
    oneshot::Sender<Result<Option<Stored>, WatcherError>>,
);

impl CheckpointStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self::with_layout(client, table, Layout::Native)
    }

    pub fn with_layout(
        client: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
        layout: Layout,
    ) -> Self {
        Self {
            client,
            table: table.into(),
            layout,
            verified: Arc::default(),
            loads: Arc::default(),
            batch_refused: Arc::default(),
            first_writes: Arc::default(),
            transact_refused: Arc::default(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Checks that the table exists and is keyed by its layout's hash key (S) alone; once per
    /// process after the first success.
    pub async fn verify_table(&self) -> Result<(), WatcherError> {
        self.verified
            .get_or_try_init(|| self.describe_and_check())
            .await
            .map(|_| ())
    }

    async fn describe_and_check(&self) -> Result<(), WatcherError> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| self.error("DescribeTable", e))?;
        let keys = out.table().map(|t| t.key_schema()).unwrap_or_default();
        let key = self.layout.hash_key();
        let ok = keys.len() == 1
            && keys[0].attribute_name() == key
            && keys[0].key_type() == &KeyType::Hash;
        if ok {
            Ok(())
        } else {
            Err(WatcherError::Checkpoint {
                table: self.table.clone(),
                operation: "DescribeTable",
                message: format!("the key schema must be exactly one hash key named `{key}` (S)"),
            })
        }
    }

    pub async fn load(&self, watcher: &str) -> Result<Option<Stored>, WatcherError> {
        if let Layout::LegacyMarker { collection_name } = &self.layout {
            return self.load_legacy(watcher, collection_name).await;
        }
        let loads = self.loads.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(self.helper().serve_loads(rx));
            tx
        });
        let (tx, rx) = oneshot::channel();
        if loads.send((watcher.to_owned(), tx)).is_err() {
            return self.get_one(watcher).await;
        }
        match rx.await {
            Ok(result) => result,
            // The loader is gone (its runtime shut down): read alone.
            Err(_) => self.get_one(watcher).await,
        }
    }

    /// The loader task (see `loads`): every load waiting, up to [`BATCH_GET_KEYS`], in one
    /// call, until every store is dropped.
    async fn serve_loads(self, rx: mpsc::UnboundedReceiver<LoadRequest>) {
        serve_batched(rx, Gather::waiting(BATCH_GET_KEYS), |batch| {
            self.load_batch(batch)
        })
        .await;
    }

    /// Reads `batch` with one BatchGetItem (consistent reads); a lone load, keys DynamoDB left
    /// unprocessed, and every load of a failed call are read with GetItem each, so that each
    /// gets its own answer and error as before.
    async fn load_batch(&self, mut batch: Vec<LoadRequest>) {
        if batch.len() == 1
            || self
                .batch_refused
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return self.load_each(batch).await;
        }
        let mut keys: Vec<&str> = batch.iter().map(|(w, _)| w.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let keys = keys
            .into_iter()
            .map(|w| HashMap::from([("watcher".to_owned(), AttributeValue::S(w.to_owned()))]))
            .collect();
        let request = match KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(true)
            .build()
        {
            Ok(request) => request,
            Err(_) => return self.load_each(batch).await,
        };
        let out = match self
            .client
            .batch_get_item()
            .request_items(&self.table, request)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let refused = matches!(
                    self.error("BatchGetItem", e),
                    WatcherError::AccessDenied { .. }
                );
                if refused
                    && !self
                        .batch_refused
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!(table = %self.table, "dynamodb:BatchGetItem is not granted on the checkpoint \
                        table; checkpoints are loaded one GetItem each (grant it to start many \
                        watchers faster)");
                }
                return self.load_each(batch).await;
            }
        };
        let name = |item: &HashMap<String, AttributeValue>| {
            item.get("watcher").and_then(|v| v.as_s().ok()).cloned()
        };
        let unprocessed: std::collections::HashSet<String> = out
            .unprocessed_keys()
            .and_then(|m| m.get(&self.table))
            .map(|k| k.keys().iter().filter_map(name).collect())
            .unwrap_or_default();
        let items: HashMap<String, &HashMap<String, AttributeValue>> = out
            .responses()
            .and_then(|r| r.get(&self.table))
            .map(|items| items.iter().filter_map(|i| Some((name(i)?, i))).collect())
            .unwrap_or_default();
        info!(
            table = %self.table,
            loads = batch.len(),
            unprocessed = unprocessed.len(),
            "checkpoints loaded together (one BatchGetItem)"
        );
        let mut again = Vec::new();
        for (watcher, tx) in batch.drain(..) {
            if unprocessed.contains(&watcher) {
                again.push((watcher, tx));
                continue;
            }
            let stored = items
                .get(&watcher)
                .map(|item| parse_item(&watcher, item))
                .transpose();
            let _ = tx.send(stored);
        }
        self.load_each(again).await;
    }

    /// GetItem for each load of `batch`, side by side.
    async fn load_each(&self, batch: Vec<LoadRequest>) {
        futures_util::future::join_all(batch.into_iter().map(|(watcher, tx)| async move {
            let _ = tx.send(self.get_one(&watcher).await);
        }))
        .await;
    }

    /// One watcher's item with GetItem.
    async fn get_one(&self, watcher: &str) -> Result<Option<Stored>, WatcherError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("watcher", AttributeValue::S(watcher.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", e))?;
        out.item().map(|item| parse_item(watcher, item)).transpose()
    }

    /// Writes `checkpoint` if the stored revision is still `expected` (`None`: no item yet).
    /// Returns the new revision. A failure that may have been applied anyway is
    /// [`WatcherError::CheckpointInDoubt`]; [`Checkpointer`] settles it by reading back.
    ///
    /// With a `fence` (leases), the item also stores the lease's owner and epoch, and the write
    /// is refused (a conflict) unless the item was last written under this lease or under an
    /// older epoch: once an owner wrote, a replica whose lease was taken over can never write
    /// again.
    pub async fn save(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        fence: Option<&Fence>,
    ) -> Result<u64, WatcherError> {
        self.save_snapshot(watcher, expected, checkpoint, None, fence)
            .await
    }

    /// [`Self::save`], with an initial snapshot's progress stored beside the position (the
    /// old tool's marker cannot hold it: a drop-in watcher's copy is not resumable).
    pub async fn save_snapshot(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        snapshot: Option<&SnapshotProgress>,
        fence: Option<&Fence>,
    ) -> Result<u64, WatcherError> {
        if let Layout::LegacyMarker { collection_name } = &self.layout {
            return self.save_legacy(collection_name, checkpoint).await;
        }
        let put = self.put_parts(watcher, expected, checkpoint, snapshot, fence);
        if expected.is_some() {
            return self.put_one(watcher, expected, put).await;
        }
        // A first write (no item yet): written together with the other first writes waiting,
        // as 1,000 watchers starting at once do (see `first_writes`).
        let writes = self.first_writes.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(self.helper().serve_first_writes(rx));
            tx
        });
        let (tx, rx) = oneshot::channel();
        let request = FirstWrite {
            watcher: watcher.to_owned(),
            put,
            tx,
        };
        if let Err(mpsc::error::SendError(request)) = writes.send(request) {
            return self.put_one(watcher, None, request.put).await;
        }
        match rx.await {
            Ok(result) => result,
            // The writer task is gone (its runtime shut down): whether it sent the write is
            // unknown, and the checkpointer settles that by reading back.
            Err(_) => Err(WatcherError::CheckpointInDoubt {
                table: self.table.clone(),
                operation: "TransactWriteItems",
                cause: InDoubt::Transport {
                    detail: "the checkpoint writer task ended".into(),
                },
            }),
        }
    }

    /// A store for a task of this store's (the loader, the first writer): it shares the
    /// refusal flags and holds no sender of the task channels, so the tasks end with the last
    /// store of the process.
    fn helper(&self) -> Self {
        Self {
            batch_refused: self.batch_refused.clone(),
            transact_refused: self.transact_refused.clone(),
            ..Self::with_layout(self.client.clone(), self.table.clone(), self.layout.clone())
        }
    }

    /// The item, condition and condition values of one compare-and-set write.
    fn put_parts(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        snapshot: Option<&SnapshotProgress>,
        fence: Option<&Fence>,
    ) -> PutParts {
        let revision = expected.map_or(1, |r| r + 1);
        let mut item = HashMap::from([
            ("watcher".to_owned(), AttributeValue::S(watcher.to_owned())),
            ("paused".to_owned(), AttributeValue::Bool(checkpoint.paused)),
            (
                "revision".to_owned(),
                AttributeValue::N(revision.to_string()),
            ),
            (
                "updated_at".to_owned(),
                AttributeValue::S(DateTime::now().try_to_rfc3339_string().unwrap_or_default()),
            ),
        ]);
        if let Some(token) = &checkpoint.token {
            let text = token.clone().into_canonical_extjson().to_string();
            item.insert("resume_token".to_owned(), AttributeValue::S(text));
        }
        if let Some(ts) = checkpoint.cluster_time {
            item.insert("cluster_time".to_owned(), timestamp_attr(ts));
        }
        if let Some(namespace) = &checkpoint.namespace {
            item.insert("namespace".to_owned(), AttributeValue::S(namespace.clone()));
        }
        if let Some(progress) = snapshot.filter(|p| !p.all_done()) {
            item.insert(
                "snapshot".to_owned(),
                AttributeValue::S(SNAPSHOT_COPYING.into()),
            );
            let text = Bson::Document(progress.to_document())
                .into_canonical_extjson()
                .to_string();
            item.insert("snapshot_progress".to_owned(), AttributeValue::S(text));
        }
        let mut values = HashMap::new();
        let revision_condition = match expected {
            None => "attribute_not_exists(watcher)",
            Some(r) => {
                values.insert(":expected".to_owned(), AttributeValue::N(r.to_string()));
                "(attribute_not_exists(watcher) OR revision = :expected)"
            }
        };
        let condition = match fence {
            None => revision_condition.to_owned(),
            Some(f) => {
                item.insert("lease_owner".to_owned(), AttributeValue::S(f.owner.clone()));
                item.insert(
                    "lease_epoch".to_owned(),
                    AttributeValue::N(f.epoch.to_string()),
                );
                values.insert(":epoch".to_owned(), AttributeValue::N(f.epoch.to_string()));
                values.insert(":owner".to_owned(), AttributeValue::S(f.owner.clone()));
                format!(
                    "{revision_condition} AND (attribute_not_exists(lease_epoch) \
                     OR lease_epoch < :epoch OR (lease_epoch = :epoch AND lease_owner = :owner))"
                )
            }
        };
        PutParts {
            item,
            condition,
            // DynamoDB refuses an empty map here.
            values: (!values.is_empty()).then_some(values),
        }
    }

    /// One compare-and-set PutItem.
    async fn put_one(
        &self,
        watcher: &str,
        expected: Option<u64>,
        put: PutParts,
    ) -> Result<u64, WatcherError> {
        let revision = expected.map_or(1, |r| r + 1);
        let req = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(put.item))
            .condition_expression(put.condition)
            .set_expression_attribute_values(put.values);
        // No SDK retries: a retried conditional write whose first attempt was applied fails its
        // own condition, and nothing could then tell it from a second writer. Every failure
        // reaches the checkpointer classified instead, and the next tick retries.
        let err = match req.customize().config_override(no_retries()).send().await {
            Ok(_) => return Ok(revision),
            Err(err) => err,
        };
        let failure = classify_write_failure(
            &err,
            |raw: &HttpResponse| raw.status().as_u16(),
            PutItemError::is_conditional_check_failed_exception,
        );
        Err(match failure {
            PutFailure::ConditionFailed => self.conflict(watcher, expected).await,
            PutFailure::InDoubt(cause) => WatcherError::CheckpointInDoubt {
                table: self.table.clone(),
                operation: "PutItem",
                cause,
            },
            PutFailure::NotApplied => self.error("PutItem", err),
        })
    }

    /// The error of a write whose condition failed, naming the revision found.
    async fn conflict(&self, watcher: &str, expected: Option<u64>) -> WatcherError {
        let found = match self.load(watcher).await {
            Ok(Some(s)) => s.revision.to_string(),
            Ok(None) => "no item".into(),
            Err(e) => format!("unknown ({e})"),
        };
        WatcherError::CheckpointConflict {
            watcher: watcher.to_owned(),
            expected: expected.unwrap_or(0),
            found,
        }
    }

    /// The first writer task (see `first_writes`): first writes gathered as [`FIRST_WRITES`]
    /// says, in one call, until every store is dropped.
    async fn serve_first_writes(self, rx: mpsc::UnboundedReceiver<FirstWrite>) {
        serve_batched(rx, FIRST_WRITES, |batch| self.first_write_batch(batch)).await;
    }

    /// Writes `batch` with one TransactWriteItems: each item keeps its own condition, and a
    /// cancelled transaction says which condition failed, so each write gets the answer its
    /// own PutItem would have got. A lone write, a write whose transaction was cancelled for
    /// another item, and every write of a call refused outright are written with PutItem each.
    /// A transaction whose outcome is unknown leaves each of its writes in doubt (settled by
    /// each watcher's read-back, as for PutItem).
    async fn first_write_batch(&self, mut batch: Vec<FirstWrite>) {
        let refused = self
            .transact_refused
            .load(std::sync::atomic::Ordering::Relaxed);
        if batch.len() == 1 || refused {
            return self.put_each(batch).await;
        }
        // A transaction may not touch one item twice; a second write of a watcher (not made
        // by one process) goes alone.
        let mut seen = std::collections::HashSet::new();
        let (together, alone): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .partition(|w| seen.insert(w.watcher.clone()));
        let items: Result<Vec<TransactWriteItem>, _> = together
            .iter()
            .map(|w| {
                Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(w.put.item.clone()))
                    .condition_expression(w.put.condition.clone())
                    .set_expression_attribute_values(w.put.values.clone())
                    .build()
                    .map(|put| TransactWriteItem::builder().put(put).build())
            })
            .collect();
        let Ok(items) = items else {
            return self
                .put_each(together.into_iter().chain(alone).collect())
                .await;
        };
        let sent = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .customize()
            .config_override(no_retries())
            .send()
            .await;
        let mut again = alone;
        match sent {
            Ok(_) => {
                info!(
                    table = %self.table,
                    writes = together.len(),
                    "first checkpoints written together (one TransactWriteItems)"
                );
                for w in together {
                    let _ = w.tx.send(Ok(1));
                }
            }
            Err(err) => {
                let reasons: Option<Vec<Option<String>>> = match &err {
                    SdkError::ServiceError(e) => match e.err() {
                        TransactWriteItemsError::TransactionCanceledException(c) => Some(
                            c.cancellation_reasons()
                                .iter()
                                .map(|r| r.code().map(str::to_owned))
                                .collect(),
                        ),
                        _ => None,
                    },
                    _ => None,
                };
                match reasons {
                    Some(reasons) if reasons.len() == together.len() => {
                        for (w, code) in together.into_iter().zip(reasons) {
                            if code.as_deref() == Some("ConditionalCheckFailed") {
                                let _ = w.tx.send(Err(self.conflict(&w.watcher, None).await));
                            } else {
                                again.push(w);
                            }
                        }
                    }
                    _ => match classify_write_failure(
                        &err,
                        |raw: &HttpResponse| raw.status().as_u16(),
                        |_| false,
                    ) {
                        PutFailure::InDoubt(cause) => {
                            for w in together {
                                let _ = w.tx.send(Err(WatcherError::CheckpointInDoubt {
                                    table: self.table.clone(),
                                    operation: "TransactWriteItems",
                                    cause: cause.clone(),
                                }));
                            }
                        }
                        _ => {
                            let error = self.error("TransactWriteItems", err);
                            if matches!(error, WatcherError::AccessDenied { .. })
                                && !self
                                    .transact_refused
                                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                            {
                                warn!(table = %self.table, %error, "TransactWriteItems is refused \
                                    on the checkpoint table; first checkpoints are written one \
                                    PutItem each");
                            }
                            again.extend(together);
                        }
                    },
                }
            }
        }
        self.put_each(again).await;
    }

    /// PutItem for each write of `batch`, side by side.
    async fn put_each(&self, batch: Vec<FirstWrite>) {
        futures_util::future::join_all(batch.into_iter().map(|w| async move {
            let _ = w.tx.send(self.put_one(&w.watcher, None, w.put).await);
        }))
        .await;
    }

    /// Sets the stored checkpoint's `paused` flag (an operator's pause or resume of a watcher
    /// that is not running), keeping its position. Nothing to do without a stored checkpoint
    /// or when it already says so; the old tool's marker cannot hold the flag (logged).
    pub async fn mark_paused(
        &self,
        watcher: &str,
        paused: bool,
        fence: Option<&Fence>,
    ) -> Result<(), WatcherError> {
        if matches!(self.layout, Layout::LegacyMarker { .. }) {
            tracing::warn!(
                "drop-in mode: the old marker cannot hold the paused flag; a restart resumes"
            );
            return Ok(());
        }
        let Some(stored) = self.load(watcher).await? else {
            return Ok(());
        };
        if stored.checkpoint.paused == paused {
            return Ok(());
        }
        let checkpoint = Checkpoint {
            paused,
            ..stored.checkpoint
        };
        // A copy in progress stays resumable across the pause.
        let snapshot = stored.snapshot.as_ref();
        self.save_snapshot(watcher, Some(stored.revision), &checkpoint, snapshot, fence)
            .await
            .map(|_| ())
    }

    /// Stores `checkpoint` in place of whatever is stored (a rewind of a paused watcher),
    /// compare-and-set on the revision just read.
    pub async fn replace(
        &self,
        watcher: &str,
        checkpoint: &Checkpoint,
        fence: Option<&Fence>,
    ) -> Result<u64, WatcherError> {
        let revision = self.load(watcher).await?.map(|s| s.revision);
        self.save(watcher, revision, checkpoint, fence).await
    }

    async fn load_legacy(
        &self,
        watcher: &str,
        collection_name: &str,
    ) -> Result<Option<Stored>, WatcherError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(
                "collectionName",
                AttributeValue::S(collection_name.to_owned()),
            )
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", e))?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let Some(token) = item.get("_id") else {
            return Ok(None);
        };
        let token = attr_to_bson(token).map_err(|message| WatcherError::CorruptCheckpoint {
            watcher: watcher.to_owned(),
            message: format!("marker `{collection_name}`: `_id` {message}"),
        })?;
        Ok(Some(Stored {
            checkpoint: Checkpoint {
                token: Some(token),
                cluster_time: None,
                paused: false,
                namespace: None,
            },
            revision: 0,
            updated_at: None,
            snapshot: None,
        }))
    }

    /// `UpdateItem SET #id = :id`, as the old tool wrote its marker. A position known only by
    /// time cannot be written in that format and is skipped (the next token will be).
    async fn save_legacy(
        &self,
        collection_name: &str,
        checkpoint: &Checkpoint,
    ) -> Result<u64, WatcherError> {
        let Some(token) = &checkpoint.token else {
            return Ok(0);
        };
        self.client
            .update_item()
            .table_name(&self.table)
            .key(
                "collectionName",
                AttributeValue::S(collection_name.to_owned()),
            )
            .update_expression("SET #id = :id")
            .expression_attribute_names("#id", "_id")
            .expression_attribute_values(":id", bson_to_attr(token))
            .send()
            .await
            .map_err(|e| self.error("UpdateItem", e))?;
        Ok(0)
    }

    fn error<E, R>(&self, operation: &'static str, err: SdkError<E, R>) -> WatcherError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        if let SdkError::ServiceError(e) = &err {
            if e.err().code() == Some("ResourceNotFoundException") {
                return WatcherError::CheckpointTableMissing {
                    table: self.table.clone(),
                    key: self.layout.hash_key(),
                };
            }
            let table = AwsResource::DynamoDbTable(self.table.clone());
            if let Some(refusal) = aws_refusal(table, operation, e.err().code(), e.err().message())
            {
                return refusal;
            }
        }
        WatcherError::Checkpoint {
            table: self.table.clone(),
            operation,
            message: crate::error::aws_message(&err),
        }
    }
}

/// What a failed conditional PutItem says about the item.
#[derive(Debug, PartialEq)]
enum PutFailure {
    /// The condition failed: the stored revision is not the one the write named.
    ConditionFailed,
    /// The request may have been applied (see [`InDoubt`]).
    InDoubt(InDoubt),
    /// Refused or never sent: nothing was written (throttling, validation, a missing table).
    NotApplied,
}

/// Sorts a PutItem failure by what it says about the item. `status` reads the HTTP status of a
/// raw response (a parameter so that tests need no HTTP types).
fn classify_write_failure<E, R>(
    err: &SdkError<E, R>,
    status: impl Fn(&R) -> u16,
    condition_failed: impl Fn(&E) -> bool,
) -> PutFailure
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = || DisplayErrorContext(err).to_string();
    match err {
        SdkError::ConstructionFailure(_) => PutFailure::NotApplied,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            PutFailure::InDoubt(InDoubt::Transport { detail: detail() })
        }
        SdkError::ResponseError(_) => {
            PutFailure::InDoubt(InDoubt::UnreadableAnswer { detail: detail() })
        }
        SdkError::ServiceError(e) if condition_failed(e.err()) => PutFailure::ConditionFailed,
        SdkError::ServiceError(e) => match status(e.raw()) {
            code @ 500.. => PutFailure::InDoubt(InDoubt::ServerError {
                status: code,
                detail: detail(),
            }),
            _ => PutFailure::NotApplied,
        },
        _ => PutFailure::InDoubt(InDoubt::Transport { detail: detail() }),
    }
}

/// How requests are gathered into one call by [`serve_batched`].
#[derive(Clone, Copy, Debug)]
struct Gather {
    /// Requests one call takes at most.
    max: usize,
    /// After the first request, keep waiting while another comes within this gap...
    gap: Duration,
    /// ...but no longer than this after the first.
    linger: Duration,
}

impl Gather {
    /// Only the requests already waiting.
    const fn waiting(max: usize) -> Self {
        Self {
            max,
            gap: Duration::ZERO,
            linger: Duration::ZERO,
        }
    }
}

/// First writes: watchers starting together open their change streams one after another,
/// paced by the server (1,000 on SecantusDB: ~300 a second), so what is already waiting when
/// a call returns is a handful. Waiting while they keep coming makes a few calls of up to
/// [`TRANSACT_ITEMS`] where there were hundreds of 2 or 3 (measured: 166 transactions and 60
/// PutItems for 1,000 first starts); a lone start waits [`Gather::gap`] once.
const FIRST_WRITES: Gather = Gather {
    max: TRANSACT_ITEMS,
    gap: Duration::from_millis(10),
    linger: Duration::from_millis(100),
};

/// Hands requests from `rx` to `batch` together, gathered as `gather` says (the loader's and
/// the first writer's loop), until every sender is dropped.
async fn serve_batched<T, F, Fut>(mut rx: mpsc::UnboundedReceiver<T>, gather: Gather, mut batch: F)
where
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while let Some(first) = rx.recv().await {
        let until = tokio::time::Instant::now() + gather.linger;
        let mut requests = vec![first];
        while requests.len() < gather.max {
            match rx.try_recv() {
                Ok(request) => requests.push(request),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let wait = gather
                        .gap
                        .min(until.saturating_duration_since(tokio::time::Instant::now()));
                    if wait.is_zero() {
                        break;
                    }
                    match tokio::time::timeout(wait, rx.recv()).await {
                        Ok(Some(request)) => requests.push(request),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        batch(requests).await;
    }
}

/// SDK settings for a conditional write: no retries (see [`CheckpointStore::save`]).
fn no_retries() -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::Config::builder().retry_config(RetryConfig::disabled())
}

/// Where checkpoints are kept: DynamoDB ([`CheckpointStore`]) in production, memory in the
/// pipeline's unit tests.
pub trait CheckpointBackend: Send + Sync {
    /// The table's name, for error messages.
    fn table(&self) -> &str;

    /// The stored checkpoint of `watcher`, if any, read consistently: the checkpointer reads
    /// a write with an unknown outcome back through it.
    fn load(
        &self,
        watcher: &str,
    ) -> impl std::future::Future<Output = Result<Option<Stored>, WatcherError>> + Send;

    /// Writes `checkpoint` if the stored revision is still `expected` (`None`: no item yet;
    /// `Some`: that revision, or no item, as `CheckpointStore`'s condition expression). Returns
    /// the new revision; [`WatcherError::CheckpointConflict`] when the condition failed, and
    /// [`WatcherError::CheckpointInDoubt`] when the write may have been applied anyway.
    fn save(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        fence: Option<&Fence>,
    ) -> impl std::future::Future<Output = Result<u64, WatcherError>> + Send;

    /// [`Self::save`] with an initial snapshot's progress; a backend that cannot hold it
    /// stores the position alone.
    fn save_snapshot(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        snapshot: Option<&SnapshotProgress>,
        fence: Option<&Fence>,
    ) -> impl std::future::Future<Output = Result<u64, WatcherError>> + Send {
        let _ = snapshot;
        self.save(watcher, expected, checkpoint, fence)
    }
}

impl CheckpointBackend for CheckpointStore {
    fn table(&self) -> &str {
        CheckpointStore::table(self)
    }

    async fn load(&self, watcher: &str) -> Result<Option<Stored>, WatcherError> {
        CheckpointStore::load(self, watcher).await
    }

    async fn save(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        fence: Option<&Fence>,
    ) -> Result<u64, WatcherError> {
        CheckpointStore::save(self, watcher, expected, checkpoint, fence).await
    }

    async fn save_snapshot(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        snapshot: Option<&SnapshotProgress>,
        fence: Option<&Fence>,
    ) -> Result<u64, WatcherError> {
        CheckpointStore::save_snapshot(self, watcher, expected, checkpoint, snapshot, fence).await
    }
}

/// The `snapshot` attribute of an item whose initial snapshot is still copying.
const SNAPSHOT_COPYING: &str = "copying";

/// Longest a checkpoint write may take before it is abandoned and tried at the next tick.
pub const CHECKPOINT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the read-back that settles a write with an unknown outcome may take.
pub const CHECKPOINT_READ_BACK_TIMEOUT: Duration = Duration::from_secs(5);
/// In-doubt writes remembered at most; each retry at the same revision adds one.
const MAX_IN_DOUBT: usize = 16;

/// The checkpoint writer of one watcher's life: what it last wrote and the revision the next
/// write must name. It writes the ack frontier, never more.
///
/// A write can end without knowing whether DynamoDB applied it (a timeout, a dropped
/// connection, an unreadable answer, a 5xx). Taking it as failed would keep the old revision,
/// and the next write would then fail its condition against the watcher's own write and stop
/// the watcher as if a second instance ran. So such a write is settled by reading the item
/// back: holding exactly what was written means applied. When the read-back fails too, the
/// write is remembered, and a later conditional-check failure is compared with it before it
/// counts as a second writer.
#[derive(Debug, Default)]
pub struct Checkpointer {
    /// The revision the next write must replace (`None`: no item yet).
    pub revision: Option<u64>,
    /// What the next write stores as `paused`.
    pub paused: bool,
    written_paused: bool,
    last_written: Option<Position>,
    /// A start position known only by time (no token yet).
    pub initial_time: Option<bson::Timestamp>,
    /// The namespace every write stores with the token (see [`Checkpoint::namespace`]).
    pub namespace: Option<String>,
    /// The lease this life holds (leases on): every write is fenced by it.
    pub fence: Option<Fence>,
    /// Writes naming the current `revision` whose outcome is not known, oldest first. One of
    /// them may still be (or already have been) applied; none can once the revision moves.
    in_doubt: Vec<Attempt>,
    /// The checkpoint of the last settled write.
    stored: Option<Checkpoint>,
    /// [`AckTracker::events_passed`] at the last write made here, and when it was made.
    events_at_write: u64,
    wrote_at: Option<tokio::time::Instant>,
}

/// How often a checkpoint is written while its frontier moves only with post-batch tokens
/// (no event delivered since the last write). On MongoDB an idle stream's token follows the
/// cluster time, so at `checkpoint_interval` every idle watcher would write each time its
/// reader waited out a getMore (`reader::MAX_AWAIT`): 500 DynamoDB writes a second for 1,000
/// idle watchers. Such a write only keeps the resume point fresh within the oplog window
/// (hours), and resuming from an older idle token re-reads no event.
pub const IDLE_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// A write to make: what the item will hold, and the tracker position it stands for.
#[derive(Debug, Clone)]
pub struct Due {
    checkpoint: Checkpoint,
    position: Option<Position>,
    /// [`AckTracker::events_passed`] when it was taken.
    events: u64,
}

/// One write as sent: what the item holds if it was applied.
#[derive(Debug, Clone)]
struct Attempt {
    revision: u64,
    checkpoint: Checkpoint,
    position: Option<Position>,
}

impl Attempt {
    /// Whether `stored` is this write. Tokens are compared after their round trip through
    /// canonical Extended JSON, which keeps every BSON type.
    fn is(&self, stored: &Stored) -> bool {
        stored.revision == self.revision && stored.checkpoint == self.checkpoint
    }
}

/// How one save ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Saved {
    /// This write is stored, at this revision.
    Written(u64),
    /// An earlier write of ours with an unknown outcome is stored; this one was not applied.
    Adopted,
}

/// Writes of one life whose outcome was never settled, handed to the next life of the same
/// watcher: such a write can still land after its life ended (a request queued in an
/// overloaded server), and the next life's first write must then take it for its own, not for
/// a second writer.
#[derive(Debug, Default)]
pub struct InDoubtWrites(Vec<Attempt>);

impl Checkpointer {
    /// A writer for a new life that still knows the unsettled writes of the previous one.
    pub fn with_in_doubt(writes: InDoubtWrites) -> Self {
        Self {
            in_doubt: writes.0,
            ..Self::default()
        }
    }

    /// The item holds `revision` (loaded at a life's start, or written again under a lease):
    /// the next write names it. A carried write in doubt at or below it landed before the load
    /// or can never land (its condition names an older revision): it is dropped, or a later
    /// read-back could take it for ours over a newer write of this life still in flight.
    pub fn based_on(&mut self, revision: u64) {
        self.revision = Some(revision);
        self.in_doubt.retain(|a| a.revision > revision);
    }

    /// The writes still unsettled, for the next life.
    pub fn take_in_doubt(&mut self) -> InDoubtWrites {
        InDoubtWrites(std::mem::take(&mut self.in_doubt))
    }

    /// Writes the frontier if it moved, or the paused flag changed (or `force`); keeps the
    /// revision for the next write. Returns whether it wrote. A write with an unknown outcome
    /// is settled before this returns when the item can be read; every error but
    /// [`WatcherError::CheckpointConflict`] is retryable at the next tick.
    pub async fn write(
        &mut self,
        store: &impl CheckpointBackend,
        watcher: &str,
        tracker: &AckTracker,
        force: bool,
    ) -> Result<bool, WatcherError> {
        match self.due(tracker, force) {
            Some(due) => self.write_due(store, watcher, due).await,
            None => Ok(false),
        }
    }

    /// What a write now would store: `None` when the frontier did not move and the paused
    /// flag did not change (and not `force`), or nothing is known yet. Taken apart from the
    /// write itself so that the write can run while the tracker moves on.
    pub fn due(&self, tracker: &AckTracker, force: bool) -> Option<Due> {
        let frontier = tracker.frontier();
        if !force && frontier == self.last_written.as_ref() && self.paused == self.written_paused {
            return None;
        }
        let checkpoint = match frontier {
            Some(p) => Checkpoint {
                token: Some(p.token.to_bson()),
                cluster_time: p.cluster_time.or(tracker.frontier_event_time()),
                paused: self.paused,
                namespace: self.namespace.clone(),
            },
            None => Checkpoint {
                token: None,
                // Nothing known yet: there is nothing to protect.
                cluster_time: Some(self.initial_time?),
                paused: self.paused,
                namespace: self.namespace.clone(),
            },
        };
        Some(Due {
            checkpoint,
            position: frontier.cloned(),
            events: tracker.events_passed(),
        })
    }

    /// [`Self::due`] at a checkpoint tick: as `due`, except that a frontier moved only by
    /// post-batch tokens since the last write here (no event passed, the same copy progress,
    /// the same paused flag) waits for [`IDLE_CHECKPOINT_INTERVAL`]. Shutdown and pause
    /// write at once (`write`).
    pub fn due_on_tick(&self, tracker: &AckTracker) -> Option<Due> {
        let snapshot = |p: Option<&Position>| p.and_then(|p| p.snapshot.clone());
        let idle_only = tracker.events_passed() == self.events_at_write
            && snapshot(tracker.frontier()) == snapshot(self.last_written.as_ref())
            && self.paused == self.written_paused
            && self
                .wrote_at
                .is_some_and(|at| at.elapsed() < IDLE_CHECKPOINT_INTERVAL);
        if idle_only {
            return None;
        }
        self.due(tracker, false)
    }

    /// Writes what [`Self::due`] returned; see [`Self::write`].
    pub async fn write_due(
        &mut self,
        store: &impl CheckpointBackend,
        watcher: &str,
        due: Due,
    ) -> Result<bool, WatcherError> {
        let Due {
            checkpoint,
            position,
            events,
        } = due;
        let frontier = position.as_ref();
        let mut saved = self.save(store, watcher, &checkpoint, frontier).await?;
        if saved == Saved::Adopted {
            if self.last_written.as_ref() == frontier && self.written_paused == checkpoint.paused {
                // The earlier write already holds what this one would store.
                self.events_at_write = events;
                self.wrote_at = Some(tokio::time::Instant::now());
                return Ok(true);
            }
            // Once more on top of it; no earlier write is in doubt any more, so this cannot
            // adopt again.
            saved = self.save(store, watcher, &checkpoint, frontier).await?;
        }
        let Saved::Written(revision) = saved else {
            return Ok(false);
        };
        debug!(
            revision,
            token = %checkpoint
                .token
                .as_ref()
                .map(crate::record::to_text)
                .unwrap_or_default(),
            "checkpoint written"
        );
        self.settle(revision, frontier.cloned(), checkpoint);
        self.events_at_write = events;
        self.wrote_at = Some(tokio::time::Instant::now());
        Ok(true)
    }

    /// One compare-and-set write, with an unknown outcome settled by reading the item back.
    async fn save(
        &mut self,
        store: &impl CheckpointBackend,
        watcher: &str,
        checkpoint: &Checkpoint,
        position: Option<&Position>,
    ) -> Result<Saved, WatcherError> {
        let expected = self.revision;
        let attempt = Attempt {
            revision: expected.map_or(1, |r| r + 1),
            checkpoint: checkpoint.clone(),
            position: position.cloned(),
        };
        let snapshot = position.and_then(|p| p.snapshot.as_deref());
        let write =
            store.save_snapshot(watcher, expected, checkpoint, snapshot, self.fence.as_ref());
        let result = match tokio::time::timeout(CHECKPOINT_WRITE_TIMEOUT, write).await {
            Ok(result) => result,
            Err(_) => Err(WatcherError::CheckpointInDoubt {
                table: store.table().to_owned(),
                operation: "PutItem",
                cause: InDoubt::NoAnswer {
                    after: CHECKPOINT_WRITE_TIMEOUT,
                },
            }),
        };
        match result {
            Ok(revision) => Ok(Saved::Written(revision)),
            Err(WatcherError::CheckpointInDoubt { cause, .. }) => {
                let stored = match read_back(store, watcher).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        let revision = attempt.revision;
                        self.remember(attempt);
                        return Err(WatcherError::CheckpointUnconfirmed {
                            table: store.table().to_owned(),
                            revision,
                            read_back: Box::new(e),
                        });
                    }
                };
                match stored {
                    Some(s) if attempt.is(&s) => {
                        info!(
                            revision = s.revision,
                            cause = %cause,
                            "checkpoint write confirmed by read-back"
                        );
                        Ok(Saved::Written(s.revision))
                    }
                    Some(s) if self.adopt(&s) => Ok(Saved::Adopted),
                    // Someone else's write: a second writer, exactly what the revision guards.
                    Some(s) if Some(s.revision) != expected => {
                        Err(WatcherError::CheckpointConflict {
                            watcher: watcher.to_owned(),
                            expected: expected.unwrap_or(0),
                            found: s.revision.to_string(),
                        })
                    }
                    // Still what this write replaces: not applied, or not yet. Remembered, in
                    // case it lands after the read.
                    _ => {
                        let revision = attempt.revision;
                        self.remember(attempt);
                        Err(WatcherError::CheckpointNotApplied {
                            table: store.table().to_owned(),
                            revision,
                            cause,
                        })
                    }
                }
            }
            // The condition may have failed on our own earlier write that was in doubt.
            Err(conflict @ WatcherError::CheckpointConflict { .. })
                if !self.in_doubt.is_empty() =>
            {
                match read_back(store, watcher).await {
                    Ok(Some(s)) if self.adopt(&s) => Ok(Saved::Adopted),
                    Ok(_) => Err(conflict),
                    Err(e) => Err(WatcherError::CheckpointUnconfirmed {
                        table: store.table().to_owned(),
                        revision: attempt.revision,
                        read_back: Box::new(e),
                    }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Takes `stored` as ours when it is one of the writes in doubt.
    fn adopt(&mut self, stored: &Stored) -> bool {
        let Some(attempt) = self.in_doubt.iter().find(|a| a.is(stored)).cloned() else {
            return false;
        };
        info!(
            revision = attempt.revision,
            "an earlier checkpoint write with an unknown outcome was applied; continuing from it"
        );
        self.settle(attempt.revision, attempt.position, attempt.checkpoint);
        true
    }

    /// The item now holds `revision`: the next write names it, and no earlier write can apply.
    fn settle(&mut self, revision: u64, position: Option<Position>, checkpoint: Checkpoint) {
        self.revision = Some(revision);
        self.last_written = position;
        self.written_paused = checkpoint.paused;
        self.stored = Some(checkpoint);
        self.in_doubt.clear();
    }

    /// What the item holds since this writer's last write, if it wrote.
    pub fn stored(&self) -> Option<&Checkpoint> {
        self.stored.as_ref()
    }

    fn remember(&mut self, attempt: Attempt) {
        if self.in_doubt.len() == MAX_IN_DOUBT {
            self.in_doubt.remove(0);
        }
        self.in_doubt.push(attempt);
    }
}

/// The stored item, read consistently, within [`CHECKPOINT_READ_BACK_TIMEOUT`].
async fn read_back(
    store: &impl CheckpointBackend,
    watcher: &str,
) -> Result<Option<Stored>, WatcherError> {
    match tokio::time::timeout(CHECKPOINT_READ_BACK_TIMEOUT, store.load(watcher)).await {
        Ok(result) => result,
        Err(_) => Err(WatcherError::Checkpoint {
            table: store.table().to_owned(),
            operation: "GetItem",
            message: format!("no answer within {CHECKPOINT_READ_BACK_TIMEOUT:?}"),
        }),
    }
}

fn timestamp_attr(ts: Timestamp) -> AttributeValue {
    AttributeValue::M(HashMap::from([
        ("t".to_owned(), AttributeValue::N(ts.time.to_string())),
        ("i".to_owned(), AttributeValue::N(ts.increment.to_string())),
    ]))
}

fn parse_item(
    watcher: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<Stored, WatcherError> {
    let corrupt = |message: String| WatcherError::CorruptCheckpoint {
        watcher: watcher.to_owned(),
        message,
    };
    let token = match item.get("resume_token") {
        None => None,
        Some(AttributeValue::S(text)) => Some(parse_token(text).map_err(corrupt)?),
        Some(_) => return Err(corrupt("`resume_token` is not a string".into())),
    };
    let cluster_time = match item.get("cluster_time") {
        None => None,
        Some(AttributeValue::M(m)) => {
            let num = |k: &str| -> Option<u32> { m.get(k)?.as_n().ok()?.parse().ok() };
            match (num("t"), num("i")) {
                (Some(time), Some(increment)) => Some(Timestamp { time, increment }),
                _ => return Err(corrupt("`cluster_time` needs numbers `t` and `i`".into())),
            }
        }
        Some(_) => return Err(corrupt("`cluster_time` is not a map".into())),
    };
    if token.is_none() && cluster_time.is_none() {
        return Err(corrupt(
            "neither `resume_token` nor `cluster_time` is set; delete the item to start over"
                .into(),
        ));
    }
    let paused = matches!(item.get("paused"), Some(AttributeValue::Bool(true)));
    let revision = match item.get("revision") {
        None => 0,
        Some(v) => v
            .as_n()
            .ok()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| corrupt("`revision` is not a number".into()))?,
    };
    let updated_at = item.get("updated_at").and_then(|v| v.as_s().ok()).cloned();
    let namespace = match item.get("namespace") {
        None => None,
        Some(AttributeValue::S(ns)) => Some(ns.clone()),
        Some(_) => return Err(corrupt("`namespace` is not a string".into())),
    };
    let snapshot = match item.get("snapshot") {
        None => None,
        Some(AttributeValue::S(state)) if state == SNAPSHOT_COPYING => {
            match item.get("snapshot_progress") {
                None => Some(SnapshotProgress::default()),
                Some(AttributeValue::S(text)) => match parse_token(text).map_err(corrupt)? {
                    Bson::Document(d) => {
                        Some(SnapshotProgress::from_document(&d).map_err(corrupt)?)
                    }
                    _ => return Err(corrupt("`snapshot_progress` is not a document".into())),
                },
                Some(_) => return Err(corrupt("`snapshot_progress` is not a string".into())),
            }
        }
        // Any other state (a later version's) has no copy to continue.
        Some(AttributeValue::S(_)) => None,
        Some(_) => return Err(corrupt("`snapshot` is not a string".into())),
    };
    Ok(Stored {
        checkpoint: Checkpoint {
            token,
            cluster_time,
            paused,
            namespace,
        },
        revision,
        updated_at,
        snapshot,
    })
}

/// A token (a BSON document, `{_data: "..."}` on MongoDB 4.2+) as a DynamoDB map, the way
/// boto3 wrote the old tool's dict: strings as S, numbers as N, binary as B, nested as M/L.
pub fn bson_to_attr(value: &Bson) -> AttributeValue {
    match value {
        Bson::String(s) => AttributeValue::S(s.clone()),
        Bson::Int32(n) => AttributeValue::N(n.to_string()),
        Bson::Int64(n) => AttributeValue::N(n.to_string()),
        Bson::Double(n) => AttributeValue::N(n.to_string()),
        Bson::Boolean(b) => AttributeValue::Bool(*b),
        Bson::Null => AttributeValue::Null(true),
        Bson::Binary(b) => {
            AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(b.bytes.clone()))
        }
        Bson::Document(d) => AttributeValue::M(
            d.iter()
                .map(|(k, v)| (k.clone(), bson_to_attr(v)))
                .collect(),
        ),
        Bson::Array(a) => AttributeValue::L(a.iter().map(bson_to_attr).collect()),
        other => AttributeValue::S(other.clone().into_canonical_extjson().to_string()),
    }
}

/// The inverse of [`bson_to_attr`] for what a marker can hold.
pub fn attr_to_bson(value: &AttributeValue) -> Result<Bson, String> {
    Ok(match value {
        AttributeValue::S(s) => Bson::String(s.clone()),
        AttributeValue::N(n) => match n.parse::<i64>() {
            Ok(i) => Bson::Int64(i),
            Err(_) => Bson::Double(n.parse().map_err(|_| format!("has a bad number `{n}`"))?),
        },
        AttributeValue::Bool(b) => Bson::Boolean(*b),
        AttributeValue::Null(_) => Bson::Null,
        AttributeValue::B(b) => Bson::Binary(bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: b.as_ref().to_vec(),
        }),
        AttributeValue::M(m) => {
            // DynamoDB maps are unordered; tokens have one field (`_data`) in practice.
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            let mut doc = bson::Document::new();
            for k in keys {
                doc.insert(k.clone(), attr_to_bson(&m[k])?);
            }
            Bson::Document(doc)
        }
        AttributeValue::L(l) => Bson::Array(l.iter().map(attr_to_bson).collect::<Result<_, _>>()?),
        _ => return Err("has an attribute type a token never has".into()),
    })
}

/// Parses a token stored as Extended JSON text.
pub fn parse_token(text: &str) -> Result<Bson, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("`resume_token` is not JSON: {e}"))?;
    Bson::try_from(value).map_err(|e| format!("`resume_token` is not Extended JSON: {e}"))
}

/// An in-memory [`CheckpointBackend`] for unit tests: DynamoDB's compare-and-set on the
/// revision, and faults injected per call.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex, MutexGuard};

    use tokio::time::Instant;

    use super::{Checkpoint, CheckpointBackend, Fence, Stored};
    use crate::error::{InDoubt, WatcherError};

    /// The table name in errors.
    pub(crate) const TABLE: &str = "memory";

    /// What the next save does instead of answering normally.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) enum Fault {
        /// Applied (if its condition holds), then no answer ever comes.
        ApplyThenHang,
        /// Applied (if its condition holds), then the connection fails: outcome unknown.
        ApplyThenError,
        /// Not applied, and no answer ever comes.
        Hang,
        /// Not applied, and the connection fails: outcome unknown to the caller.
        LostThenError,
        /// Refused, definitely not applied (as a throttled request).
        Reject,
        /// A second writer's unconditional write of this checkpoint lands first; then this
        /// save's connection fails (outcome unknown) without applying it.
        SecondWriterThenError(Checkpoint),
    }

    #[derive(Debug, Default)]
    struct Inner {
        items: HashMap<String, Stored>,
        /// Every write applied through `save`, when (tokio's clock, so paused tests see it).
        written: Vec<(Instant, Checkpoint)>,
        save_faults: VecDeque<Fault>,
        load_failures: usize,
        saves: usize,
        loads: usize,
    }

    /// Clones share one table, so a test can keep a handle on what the code under test writes.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct MemoryCheckpoints {
        inner: Arc<Mutex<Inner>>,
    }

    enum Answer {
        Now(Result<u64, WatcherError>),
        Never,
    }

    impl MemoryCheckpoints {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        fn lock(&self) -> MutexGuard<'_, Inner> {
            // A test that panicked while holding the lock has failed already.
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// The next save (one per call, in order) meets `fault`.
        pub(crate) fn fail_next_save(&self, fault: Fault) {
            self.lock().save_faults.push_back(fault);
        }

        /// The next `n` loads fail.
        pub(crate) fn fail_next_loads(&self, n: usize) {
            self.lock().load_failures += n;
        }

        /// The item as stored, read without faults.
        pub(crate) fn stored(&self, watcher: &str) -> Option<Stored> {
            self.lock().items.get(watcher).cloned()
        }

        /// Stores `stored` as it is (a checkpoint written before the test).
        pub(crate) fn insert(&self, watcher: &str, stored: Stored) {
            self.lock().items.insert(watcher.to_owned(), stored);
        }

        /// A second writer's unconditional write: the revision moves on by one. Returns it.
        pub(crate) fn write_as_second_writer(&self, watcher: &str, checkpoint: Checkpoint) -> u64 {
            let mut inner = self.lock();
            second_write(&mut inner.items, watcher, checkpoint)
        }

        /// The checkpoints `save` applied (answered or not), oldest first, with their time.
        pub(crate) fn written(&self) -> Vec<(Instant, Checkpoint)> {
            self.lock().written.clone()
        }

        /// Save calls so far, faulty ones included.
        pub(crate) fn saves(&self) -> usize {
            self.lock().saves
        }

        /// Load calls so far, failed ones included.
        pub(crate) fn loads(&self) -> usize {
            self.lock().loads
        }
    }

    fn second_write(
        items: &mut HashMap<String, Stored>,
        watcher: &str,
        checkpoint: Checkpoint,
    ) -> u64 {
        let revision = items.get(watcher).map_or(1, |s| s.revision + 1);
        items.insert(
            watcher.to_owned(),
            Stored {
                checkpoint,
                revision,
                updated_at: None,
                snapshot: None,
            },
        );
        revision
    }

    /// `attribute_not_exists(watcher)` when `expected` is `None`, else
    /// `attribute_not_exists(watcher) OR revision = :expected`, as `CheckpointStore::save`.
    fn compare_and_set(
        inner: &mut Inner,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
    ) -> Result<u64, WatcherError> {
        let current = inner.items.get(watcher).map(|s| s.revision);
        let holds = match (expected, current) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(e), Some(c)) => e == c,
        };
        if !holds {
            return Err(WatcherError::CheckpointConflict {
                watcher: watcher.to_owned(),
                expected: expected.unwrap_or(0),
                found: current.map_or_else(|| "no item".into(), |r| r.to_string()),
            });
        }
        let revision = expected.map_or(1, |r| r + 1);
        inner.items.insert(
            watcher.to_owned(),
            Stored {
                checkpoint: checkpoint.clone(),
                revision,
                updated_at: None,
                snapshot: None,
            },
        );
        inner.written.push((Instant::now(), checkpoint.clone()));
        Ok(revision)
    }

    fn lost() -> WatcherError {
        WatcherError::CheckpointInDoubt {
            table: TABLE.into(),
            operation: "PutItem",
            cause: InDoubt::Transport {
                detail: "injected".into(),
            },
        }
    }

    impl CheckpointBackend for MemoryCheckpoints {
        fn table(&self) -> &str {
            TABLE
        }

        async fn load(&self, watcher: &str) -> Result<Option<Stored>, WatcherError> {
            let mut inner = self.lock();
            inner.loads += 1;
            if inner.load_failures > 0 {
                inner.load_failures -= 1;
                return Err(WatcherError::Checkpoint {
                    table: TABLE.into(),
                    operation: "GetItem",
                    message: "injected".into(),
                });
            }
            Ok(inner.items.get(watcher).cloned())
        }

        async fn save(
            &self,
            watcher: &str,
            expected: Option<u64>,
            checkpoint: &Checkpoint,
            _fence: Option<&Fence>,
        ) -> Result<u64, WatcherError> {
            let answer = {
                let mut guard = self.lock();
                let inner = &mut *guard;
                inner.saves += 1;
                match inner.save_faults.pop_front() {
                    None => Answer::Now(compare_and_set(inner, watcher, expected, checkpoint)),
                    Some(Fault::ApplyThenHang) => {
                        let _ = compare_and_set(inner, watcher, expected, checkpoint);
                        Answer::Never
                    }
                    Some(Fault::ApplyThenError) => {
                        let _ = compare_and_set(inner, watcher, expected, checkpoint);
                        Answer::Now(Err(lost()))
                    }
                    Some(Fault::Hang) => Answer::Never,
                    Some(Fault::LostThenError) => Answer::Now(Err(lost())),
                    Some(Fault::Reject) => Answer::Now(Err(WatcherError::Checkpoint {
                        table: TABLE.into(),
                        operation: "PutItem",
                        message: "injected".into(),
                    })),
                    Some(Fault::SecondWriterThenError(other)) => {
                        second_write(&mut inner.items, watcher, other);
                        Answer::Now(Err(lost()))
                    }
                }
            };
            match answer {
                Answer::Now(result) => result,
                Answer::Never => std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Binary};

    #[test]
    fn tokens_round_trip_through_canonical_text() {
        let token = Bson::Document(doc! {
            "_data": "8263A1B2C3000000012B022C0100296E5A1004",
            "bin": Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "n": 5_i64,
        });
        let text = token.clone().into_canonical_extjson().to_string();
        assert_eq!(parse_token(&text).unwrap(), token);
    }

    #[test]
    fn legacy_markers_round_trip() {
        let token = Bson::Document(doc! {"_data": "8263A1B2C3000000012B"});
        let attr = bson_to_attr(&token);
        assert_eq!(
            attr,
            AttributeValue::M(HashMap::from([(
                "_data".to_owned(),
                AttributeValue::S("8263A1B2C3000000012B".into())
            )]))
        );
        assert_eq!(attr_to_bson(&attr).unwrap(), token);
        assert!(attr_to_bson(&AttributeValue::Ss(vec![])).is_err());
    }

    /// The item of watcher `w` at revision 3 with a resume token, as the parse tests start.
    fn base_item() -> HashMap<String, AttributeValue> {
        HashMap::from([
            ("watcher".to_owned(), AttributeValue::S("w".into())),
            (
                "resume_token".to_owned(),
                AttributeValue::S(r#"{"_data": "abc"}"#.into()),
            ),
            ("revision".to_owned(), AttributeValue::N("3".into())),
        ])
    }

    #[test]
    fn items_parse_and_reject_garbage() {
        let mut item = base_item();
        item.insert("revision".into(), AttributeValue::N("7".into()));
        item.insert("paused".into(), AttributeValue::Bool(true));
        item.insert(
            "cluster_time".into(),
            timestamp_attr(Timestamp {
                time: 10,
                increment: 2,
            }),
        );
        let stored = parse_item("w", &item).unwrap();
        assert_eq!(stored.revision, 7);
        assert!(stored.checkpoint.paused);
        assert_eq!(
            stored.checkpoint.token,
            Some(Bson::Document(doc! {"_data": "abc"}))
        );
        assert_eq!(
            stored.checkpoint.cluster_time,
            Some(Timestamp {
                time: 10,
                increment: 2
            })
        );
        item.insert("resume_token".into(), AttributeValue::S("{not json".into()));
        let err = parse_item("w", &item).unwrap_err().to_string();
        assert!(err.contains("`resume_token` is not JSON"), "{err}");
    }

    #[test]
    fn the_namespace_is_read_where_stored_and_old_items_stay_readable() {
        let mut item = base_item();
        let old = parse_item("w", &item).expect("an item written before namespaces");
        assert_eq!(old.checkpoint.namespace, None);
        item.insert("namespace".into(), AttributeValue::S("shop.orders".into()));
        let new = parse_item("w", &item).unwrap();
        assert_eq!(new.checkpoint.namespace.as_deref(), Some("shop.orders"));
        item.insert("namespace".into(), AttributeValue::N("1".into()));
        let err = parse_item("w", &item).unwrap_err().to_string();
        assert!(err.contains("`namespace` is not a string"), "{err}");
    }

    #[test]
    fn a_copy_in_progress_is_read_with_its_last_acknowledged_id() {
        let mut item = base_item();
        assert_eq!(parse_item("w", &item).unwrap().snapshot, None);
        item.insert("snapshot".into(), AttributeValue::S("copying".into()));
        assert_eq!(
            parse_item("w", &item).unwrap().snapshot,
            Some(SnapshotProgress::default()),
            "started, no range planned yet"
        );
        let progress = SnapshotProgress {
            ranges: vec![
                CopyRange {
                    min: None,
                    max: Some(Bson::Int64(500)),
                    after: Some(Bson::Int64(41)),
                    done: false,
                },
                CopyRange {
                    min: Some(Bson::Int64(500)),
                    max: Some(Bson::String("s".into())),
                    after: None,
                    done: true,
                },
                CopyRange {
                    min: Some(Bson::String("s".into())),
                    max: None,
                    after: Some(Bson::ObjectId(bson::oid::ObjectId::new())),
                    done: false,
                },
            ],
            filter: Some(bson::doc! {"kind": "a", "n": {"$gte": 3_i64}}),
            cluster_time: Some(Timestamp {
                time: 7,
                increment: 9,
            }),
        };
        let text = Bson::Document(progress.to_document())
            .into_canonical_extjson()
            .to_string();
        item.insert("snapshot_progress".into(), AttributeValue::S(text));
        assert_eq!(parse_item("w", &item).unwrap().snapshot, Some(progress));
        item.insert("snapshot".into(), AttributeValue::S("done".into()));
        assert_eq!(parse_item("w", &item).unwrap().snapshot, None);
        item.insert("snapshot".into(), AttributeValue::Bool(true));
        let err = parse_item("w", &item).unwrap_err().to_string();
        assert!(err.contains("`snapshot` is not a string"), "{err}");
    }

    #[tokio::test]
    async fn the_checkpointer_stores_its_namespace_with_every_write() {
        let store = MemoryCheckpoints::new();
        let mut cp = Checkpointer {
            namespace: Some("shop.orders".into()),
            ..Checkpointer::default()
        };
        assert!(cp.write(&store, W, &tracker_at(1), true).await.unwrap());
        assert!(cp.write(&store, W, &tracker_at(2), false).await.unwrap());
        let written: Vec<_> = store
            .written()
            .into_iter()
            .map(|(_, c)| c.namespace)
            .collect();
        assert_eq!(
            written,
            [
                Some("shop.orders".to_owned()),
                Some("shop.orders".to_owned())
            ]
        );
    }

    #[test]
    fn refusals_name_the_table_and_the_action_to_grant() {
        use aws_sdk_dynamodb::error::ErrorMetadata;
        use aws_sdk_dynamodb::operation::get_item::GetItemError;
        let client = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                .build(),
        );
        let store = CheckpointStore::new(client, "cps");
        let service_error = |code: &str| {
            let meta = ErrorMetadata::builder()
                .code(code)
                .message("User: arn:aws:sts::1:assumed-role/task/x is not authorized")
                .build();
            SdkError::service_error(GetItemError::generic(meta), ())
        };
        let denied = store.error("GetItem", service_error("AccessDeniedException"));
        assert!(
            matches!(
                &denied,
                WatcherError::AccessDenied {
                    resource: AwsResource::DynamoDbTable(t),
                    operation: "GetItem",
                    ..
                } if t == "cps"
            ),
            "{denied}"
        );
        assert!(denied
            .to_string()
            .contains("grant `dynamodb:GetItem` on DynamoDB table `cps` to the task role"));
        assert!(matches!(
            store.error("GetItem", service_error("ResourceNotFoundException")),
            WatcherError::CheckpointTableMissing { .. }
        ));
        let throttled = store.error("GetItem", service_error("ThrottlingException"));
        assert_eq!(
            throttled.to_string(),
            "checkpoint table `cps`: GetItem failed: ThrottlingException: User: \
             arn:aws:sts::1:assumed-role/task/x is not authorized",
            "one line: the code and the service's words"
        );
    }

    // ---- the checkpointer settling writes with unknown outcomes (issue 7, item 6) ----

    use super::fake::{Fault, MemoryCheckpoints};
    use crate::status::State;

    const W: &str = "w";

    fn token(n: u32) -> Bson {
        Bson::Document(doc! {"_data": format!("82{n:08}")})
    }

    fn at(n: u32) -> Checkpoint {
        Checkpoint {
            token: Some(token(n)),
            cluster_time: None,
            paused: false,
            namespace: None,
        }
    }

    /// A tracker whose frontier is `token(n)`.
    fn tracker_at(n: u32) -> AckTracker {
        let mut t = AckTracker::new();
        t.push_idle(token(n), None);
        t
    }

    /// A checkpointer that has written revision 1 at `token(1)`.
    async fn started(store: &MemoryCheckpoints) -> Checkpointer {
        let mut cp = Checkpointer::default();
        assert!(cp.write(store, W, &tracker_at(1), false).await.unwrap());
        assert_eq!(cp.revision, Some(1));
        cp
    }

    fn stored_at(store: &MemoryCheckpoints) -> (u64, Checkpoint) {
        let s = store.stored(W).expect("an item");
        (s.revision, s.checkpoint)
    }

    /// Feeds `serve_batched` requests at the given offsets (ms from the start) and returns
    /// the batches it made, with the time (ms) each was handed on.
    async fn gathered(gather: Gather, at_ms: &[u64]) -> Vec<(u64, Vec<usize>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let start = tokio::time::Instant::now();
        let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = batches.clone();
        let server = tokio::spawn(serve_batched(rx, gather, move |batch: Vec<usize>| {
            let seen = seen.clone();
            async move {
                let ms = start.elapsed().as_millis() as u64;
                seen.lock().unwrap().push((ms, batch));
            }
        }));
        for (i, &ms) in at_ms.iter().enumerate() {
            tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
            tx.send(i).unwrap();
        }
        // Senders stay for a while, as running watchers do.
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(tx);
        server.await.unwrap();
        let out = batches.lock().unwrap().clone();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn first_writes_are_gathered_while_they_keep_coming() {
        // A lone start waits one gap.
        assert_eq!(gathered(FIRST_WRITES, &[0]).await, vec![(10, vec![0])]);
        // Starts 5 ms apart go together; a pause longer than the gap ends the call.
        assert_eq!(
            gathered(FIRST_WRITES, &[0, 5, 10, 40]).await,
            vec![(20, vec![0, 1, 2]), (50, vec![3])]
        );
        // A steady trickle is cut at the linger after the first of the call.
        let steady: Vec<u64> = (0..30).map(|i| i * 5).collect();
        let batches = gathered(FIRST_WRITES, &steady).await;
        assert_eq!(batches[0], (100, (0..=20).collect::<Vec<_>>()));
        assert_eq!(batches.iter().map(|b| b.1.len()).sum::<usize>(), 30);
        // No call over the maximum, and a full call goes at once.
        let burst = vec![0; 250];
        let batches = gathered(FIRST_WRITES, &burst).await;
        let sizes: Vec<(u64, usize)> = batches.iter().map(|(t, b)| (*t, b.len())).collect();
        assert_eq!(sizes, vec![(0, 100), (0, 100), (10, 50)]);
    }

    #[tokio::test(start_paused = true)]
    async fn loads_take_only_what_is_waiting() {
        assert_eq!(
            gathered(Gather::waiting(BATCH_GET_KEYS), &[0, 5]).await,
            vec![(0, vec![0]), (5, vec![1])]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_applied_but_never_answered_is_confirmed_by_read_back() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::ApplyThenHang);
        let began = tokio::time::Instant::now();
        assert!(cp.write(&store, W, &tracker_at(2), false).await.unwrap());
        assert_eq!(
            began.elapsed(),
            CHECKPOINT_WRITE_TIMEOUT,
            "it waited for the answer"
        );
        assert_eq!(cp.revision, Some(2));
        // The next write names the revision of the write that was in doubt: no conflict.
        assert!(cp.write(&store, W, &tracker_at(3), false).await.unwrap());
        assert_eq!(stored_at(&store), (3, at(3)));
        assert_eq!(store.loads(), 1, "one read-back");
    }

    #[tokio::test]
    async fn a_write_applied_then_lost_is_confirmed_by_read_back() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::ApplyThenError);
        assert!(cp.write(&store, W, &tracker_at(2), false).await.unwrap());
        assert_eq!(cp.revision, Some(2));
        assert!(cp.write(&store, W, &tracker_at(3), false).await.unwrap());
        assert_eq!(stored_at(&store), (3, at(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_not_applied_fails_retryably_and_the_next_tick_writes() {
        for fault in [Fault::Hang, Fault::LostThenError] {
            let store = MemoryCheckpoints::new();
            let mut cp = started(&store).await;
            store.fail_next_save(fault.clone());
            let err = cp
                .write(&store, W, &tracker_at(2), false)
                .await
                .unwrap_err();
            assert!(
                matches!(err, WatcherError::CheckpointNotApplied { revision: 2, .. }),
                "{fault:?}: {err}"
            );
            assert_eq!(err.state(), State::BackingOff);
            assert_eq!(cp.revision, Some(1));
            assert_eq!(stored_at(&store), (1, at(1)));
            // The next tick retries the same frontier, on the same revision.
            assert!(cp.write(&store, W, &tracker_at(2), false).await.unwrap());
            assert_eq!(stored_at(&store), (2, at(2)), "{fault:?}");
        }
    }

    #[tokio::test]
    async fn a_definite_failure_is_not_read_back() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::Reject);
        let err = cp
            .write(&store, W, &tracker_at(2), false)
            .await
            .unwrap_err();
        assert!(matches!(err, WatcherError::Checkpoint { .. }), "{err}");
        assert_eq!(store.loads(), 0);
        assert!(cp.write(&store, W, &tracker_at(2), false).await.unwrap());
        assert_eq!(stored_at(&store), (2, at(2)));
    }

    #[tokio::test]
    async fn a_second_writer_is_a_conflict() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.write_as_second_writer(W, at(9));
        let err = cp
            .write(&store, W, &tracker_at(2), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointConflict { expected: 1, .. }),
            "{err}"
        );
        assert_eq!(err.state(), State::Failed);
        assert_eq!(
            stored_at(&store),
            (2, at(9)),
            "the other writer's item is kept"
        );
    }

    #[tokio::test]
    async fn a_second_writer_seen_by_the_read_back_is_a_conflict() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::SecondWriterThenError(at(9)));
        let err = cp
            .write(&store, W, &tracker_at(2), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointConflict { expected: 1, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_write_that_could_not_be_read_back_is_matched_at_the_next_conflict() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::ApplyThenError);
        store.fail_next_loads(1);
        let err = cp
            .write(&store, W, &tracker_at(2), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointUnconfirmed { revision: 2, .. }),
            "{err}"
        );
        assert_eq!(err.state(), State::BackingOff);
        assert_eq!(cp.revision, Some(1), "not taken as written without proof");
        // Revision 1 is named again and fails its condition on our own revision 2.
        assert!(cp.write(&store, W, &tracker_at(3), false).await.unwrap());
        assert_eq!(cp.revision, Some(3));
        assert_eq!(stored_at(&store), (3, at(3)));
    }

    #[tokio::test]
    async fn an_adopted_write_holding_the_frontier_is_not_written_again() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::ApplyThenError);
        store.fail_next_loads(1);
        assert!(cp.write(&store, W, &tracker_at(2), false).await.is_err());
        let saves = store.saves();
        assert!(cp.write(&store, W, &tracker_at(2), false).await.unwrap());
        assert_eq!(store.saves(), saves + 1, "one failed write, then adoption");
        assert_eq!(cp.revision, Some(2));
        assert!(!cp.write(&store, W, &tracker_at(2), false).await.unwrap());
    }

    #[tokio::test]
    async fn a_second_writer_after_a_write_in_doubt_is_still_a_conflict() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::LostThenError);
        store.fail_next_loads(1);
        assert!(cp.write(&store, W, &tracker_at(2), false).await.is_err());
        // Our revision and token, but not what we wrote: `paused` differs.
        store.write_as_second_writer(
            W,
            Checkpoint {
                paused: true,
                ..at(2)
            },
        );
        let err = cp
            .write(&store, W, &tracker_at(3), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointConflict { expected: 1, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_conflict_is_not_declared_while_the_item_cannot_be_read() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::ApplyThenError);
        store.fail_next_loads(2);
        assert!(cp.write(&store, W, &tracker_at(2), false).await.is_err());
        let err = cp
            .write(&store, W, &tracker_at(3), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointUnconfirmed { .. }),
            "{err}"
        );
        // Readable again: the write in doubt is ours.
        assert!(cp.write(&store, W, &tracker_at(3), false).await.unwrap());
        assert_eq!(stored_at(&store), (3, at(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_write_that_lands_after_its_life_ended_is_adopted_by_the_next_life() {
        let store = MemoryCheckpoints::new();
        // Life 1: the first write (no item yet) gets no answer and is not there on read-back.
        let mut life1 = Checkpointer::default();
        store.fail_next_save(Fault::Hang);
        let err = life1
            .write(&store, W, &tracker_at(1), true)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointNotApplied { .. }),
            "{err}"
        );
        let carried = life1.take_in_doubt();
        // Life 2 loads no item and starts over; then life 1's request lands.
        let mut life2 = Checkpointer::with_in_doubt(carried);
        store.insert(
            W,
            Stored {
                checkpoint: at(1),
                revision: 1,
                updated_at: None,
                snapshot: None,
            },
        );
        assert!(life2.write(&store, W, &tracker_at(2), true).await.unwrap());
        assert_eq!(stored_at(&store), (2, at(2)));
        // Without the carried writes the same sequence is a conflict.
        let store = MemoryCheckpoints::new();
        let mut life1 = Checkpointer::default();
        store.fail_next_save(Fault::Hang);
        let _ = life1.write(&store, W, &tracker_at(1), true).await;
        store.insert(
            W,
            Stored {
                checkpoint: at(1),
                revision: 1,
                updated_at: None,
                snapshot: None,
            },
        );
        let err = Checkpointer::default()
            .write(&store, W, &tracker_at(2), true)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointConflict { .. }),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_lands_after_its_read_back_is_adopted() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::Hang);
        let err = cp
            .write(&store, W, &tracker_at(2), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointNotApplied { .. }),
            "{err}"
        );
        // The abandoned request is applied late, after the read-back saw revision 1.
        store.insert(
            W,
            Stored {
                checkpoint: at(2),
                revision: 2,
                updated_at: None,
                snapshot: None,
            },
        );
        assert!(cp.write(&store, W, &tracker_at(3), false).await.unwrap());
        assert_eq!(stored_at(&store), (3, at(3)));
    }

    /// A write of the last life that landed before this life loaded the item is this life's
    /// base: when this life's own write is then in doubt and not yet applied, the read-back
    /// (still the base) must not adopt the carried write and write the same revision again; the
    /// write stays in doubt, and is adopted once it lands.
    #[tokio::test(start_paused = true)]
    async fn a_carried_write_that_landed_before_the_load_is_the_next_lifes_base() {
        let store = MemoryCheckpoints::new();
        let mut cp = started(&store).await;
        store.fail_next_save(Fault::Hang);
        cp.write(&store, W, &tracker_at(2), false)
            .await
            .unwrap_err();
        let landed = |revision, n| Stored {
            checkpoint: at(n),
            revision,
            updated_at: None,
            snapshot: None,
        };
        store.insert(W, landed(2, 2));
        // The next life loads revision 2.
        let mut next = Checkpointer::with_in_doubt(cp.take_in_doubt());
        next.based_on(store.stored(W).expect("an item").revision);
        store.fail_next_save(Fault::Hang);
        let err = next
            .write(&store, W, &tracker_at(3), false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WatcherError::CheckpointNotApplied { revision: 3, .. }),
            "{err}"
        );
        // It lands late; the next write adopts it and writes on top.
        store.insert(W, landed(3, 3));
        assert!(next.write(&store, W, &tracker_at(4), false).await.unwrap());
        assert_eq!(stored_at(&store), (4, at(4)));
    }

    #[tokio::test]
    async fn a_first_write_in_doubt_is_confirmed_too() {
        let store = MemoryCheckpoints::new();
        let mut cp = Checkpointer::default();
        store.fail_next_save(Fault::ApplyThenError);
        assert!(cp.write(&store, W, &tracker_at(1), true).await.unwrap());
        assert_eq!(cp.revision, Some(1));
        assert_eq!(stored_at(&store), (1, at(1)));
    }

    #[tokio::test]
    async fn the_fake_compares_and_sets_as_dynamodb() {
        let store = MemoryCheckpoints::new();
        assert_eq!(store.save(W, None, &at(1), None).await.unwrap(), 1);
        let conflict = |r: Result<u64, WatcherError>| {
            matches!(r, Err(WatcherError::CheckpointConflict { .. }))
        };
        assert!(
            conflict(store.save(W, None, &at(2), None).await),
            "item exists"
        );
        assert!(
            conflict(store.save(W, Some(5), &at(2), None).await),
            "wrong revision"
        );
        assert_eq!(store.save(W, Some(1), &at(2), None).await.unwrap(), 2);
        // `attribute_not_exists(watcher) OR revision = :expected`: a missing item is written.
        assert_eq!(store.save("other", Some(7), &at(1), None).await.unwrap(), 8);
        assert_eq!(store.load(W).await.unwrap().map(|s| s.revision), Some(2));
        let written: Vec<_> = store.written().into_iter().map(|(_, c)| c).collect();
        assert_eq!(written, [at(1), at(2), at(1)], "applied writes, in order");
        store.fail_next_loads(1);
        assert!(store.load(W).await.is_err());
        assert!(store.load(W).await.is_ok());
    }

    #[test]
    fn put_failures_are_sorted_by_what_they_say_about_the_item() {
        use aws_sdk_dynamodb::error::ConnectorError;
        use aws_sdk_dynamodb::types::error::{
            ConditionalCheckFailedException, InternalServerError,
            ProvisionedThroughputExceededException,
        };
        let classify = |e: SdkError<PutItemError, u16>| {
            classify_write_failure(
                &e,
                |s: &u16| *s,
                PutItemError::is_conditional_check_failed_exception,
            )
        };
        let ccf = PutItemError::ConditionalCheckFailedException(
            ConditionalCheckFailedException::builder().build(),
        );
        assert_eq!(
            classify(SdkError::service_error(ccf, 400)),
            PutFailure::ConditionFailed
        );
        let throttled = PutItemError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder().build(),
        );
        assert_eq!(
            classify(SdkError::service_error(throttled, 400)),
            PutFailure::NotApplied
        );
        let internal = PutItemError::InternalServerError(InternalServerError::builder().build());
        assert!(matches!(
            classify(SdkError::service_error(internal, 500)),
            PutFailure::InDoubt(InDoubt::ServerError { status: 500, .. })
        ));
        assert!(matches!(
            classify(SdkError::timeout_error("attempt timeout")),
            PutFailure::InDoubt(InDoubt::Transport { .. })
        ));
        assert!(matches!(
            classify(SdkError::dispatch_failure(ConnectorError::io(
                "connection closed before message completed".into()
            ))),
            PutFailure::InDoubt(InDoubt::Transport { .. })
        ));
        assert!(matches!(
            classify(SdkError::response_error("truncated body", 200)),
            PutFailure::InDoubt(InDoubt::UnreadableAnswer { .. })
        ));
        assert_eq!(
            classify(SdkError::construction_failure("bad input")),
            PutFailure::NotApplied
        );
    }
}
