//! A copy in the loop beside the stream: a copied document's ack moves its range's
//! checkpointed progress, never the stream's token; stream events read meanwhile move the
//! token; the copy ends once every range is read and acknowledged.

use std::sync::atomic::AtomicBool;

use super::*;
use crate::checkpoint::{CopyRange, SnapshotProgress};

/// One write: the position and the copy's progress.
type Saved = (Checkpoint, Option<SnapshotProgress>);

/// Keeps what each write stored, the copy's progress included.
#[derive(Clone, Default)]
struct ProgressStore {
    saves: Arc<Mutex<Vec<Saved>>>,
}

impl CheckpointBackend for ProgressStore {
    fn table(&self) -> &str {
        "memory"
    }

    async fn load(&self, _watcher: &str) -> Result<Option<Stored>, WatcherError> {
        Ok(None)
    }

    async fn save(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        fence: Option<&crate::lease::Fence>,
    ) -> Result<u64, WatcherError> {
        self.save_snapshot(watcher, expected, checkpoint, None, fence)
            .await
    }

    async fn save_snapshot(
        &self,
        _watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        snapshot: Option<&SnapshotProgress>,
        _fence: Option<&crate::lease::Fence>,
    ) -> Result<u64, WatcherError> {
        let mut saves = self.saves.lock().unwrap();
        saves.push((checkpoint.clone(), snapshot.cloned()));
        Ok(expected.unwrap_or(0) + 1)
    }
}

fn start_token() -> Bson {
    Bson::Document(doc! {"_data": "START"})
}

/// Ranges `[.., 10)` and `[10, ..)`, each `after` its given `_id`, done as given.
fn progress(after: [Option<i64>; 2], done: [bool; 2], ts: Timestamp) -> SnapshotProgress {
    let range = |min: Option<i64>, max: Option<i64>, i: usize| CopyRange {
        min: min.map(Bson::Int64),
        max: max.map(Bson::Int64),
        after: after[i].map(Bson::Int64),
        done: done[i],
    };
    SnapshotProgress {
        ranges: vec![range(None, Some(10), 0), range(Some(10), None, 1)],
        filter: None,
        cluster_time: Some(ts),
    }
}

#[tokio::test(start_paused = true)]
async fn a_copy_moves_its_ranges_progress_and_the_stream_its_token() {
    // Document 3's record is rejected until `open` is set: the frontier waits behind it.
    let open = Arc::new(AtomicBool::new(false));
    let sink = FakeSink::new({
        let open = open.clone();
        move |record, _| match record.partition_key.as_str() {
            "3" if !open.load(Ordering::Relaxed) => Fate::Reject,
            _ => Fate::Accept,
        }
    });
    let store = ProgressStore::default();
    let (status_tx, status) = StatusTx::channel();
    let ts = Timestamp {
        time: 1_700_000_000,
        increment: 1,
    };
    let planned = Arc::new(progress([None, None], [false, false], ts));
    let mut tracker = AckTracker::new();
    // As `life` enters it: the recorded start with the copy's plan.
    tracker.push_marker(Position {
        token: start_token().into(),
        cluster_time: Some(ts),
        snapshot: Some(planned.clone()),
    });
    let spec = spec(BatchSettings {
        linger: ms(1),
        ..batch()
    });
    let mut pipeline = Pipeline::new(
        Arc::new(spec),
        sink,
        status_tx.clone(),
        tracker,
        test_metrics(),
        StreamLimits::default(),
    );
    status_tx.update(|s| {
        s.snapshot = Some(crate::status::SnapshotStatus {
            done: false,
            copied: 0,
            copied_before: 0,
            estimated_total: Some(5),
            started_at: bson::DateTime::now(),
            finished_at: None,
            ranges: 2,
            filter: None,
        })
    });
    let (copy_tx, copy_rx) = mpsc::channel(64);
    pipeline.attach_copy(planned, copy_rx, CancellationToken::new());
    let (events, rx) = mpsc::channel(64);
    let (_commands_tx, mut commands) = mpsc::channel(1);
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let (cancel, store) = (cancel.clone(), store.clone());
        async move {
            let mut cp = Checkpointer::default();
            pipeline
                .run_loop(rx, &cancel, Some(&store), &mut cp, &mut commands)
                .await
        }
    });
    let budget = ByteBudget::new(usize::MAX);
    let copy = |range: usize, id: i64| {
        let (copy_tx, budget) = (copy_tx.clone(), budget.clone());
        async move {
            let document = bson::rawdoc! {"_id": id, "v": 0_i64};
            let raw = crate::snapshot::event("d", "c", &document, ts).unwrap();
            let reservation = Reservation::take(&budget, &budget, 100).await;
            copy_tx
                .send(crate::snapshot::CopyMsg::Document {
                    range,
                    raw,
                    reservation,
                })
                .await
                .unwrap();
            tokio::time::sleep(ms(5)).await;
        }
    };
    let last = || {
        store
            .saves
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a write")
    };
    copy(0, 1).await;
    copy(0, 2).await;
    // A change written during the copy, read between its documents.
    let change = Bson::Document(doc! {"_data": "S1"});
    let event = doc! {
        "_id": change.clone(),
        "operationType": "insert",
        "clusterTime": Timestamp { time: 1_700_000_100, increment: 1 },
        "documentKey": {"_id": "x"},
    };
    let reservation = Reservation::take(&budget, &budget, 100).await;
    events
        .send(Ok(ReaderMsg::Event(
            RawDocumentBuf::try_from(&event).unwrap(),
            reservation,
        )))
        .await
        .unwrap();
    tokio::time::sleep(ms(5)).await;
    copy(0, 3).await;
    copy(1, 10).await;
    copy(1, 11).await;
    copy_tx
        .send(crate::snapshot::CopyMsg::RangeDone(1))
        .await
        .unwrap();
    tokio::time::sleep(ms(1500)).await;
    let (checkpoint, stored) = last();
    assert_eq!(
        checkpoint.token,
        Some(change.clone()),
        "the stream's token moves"
    );
    assert_eq!(
        stored,
        Some(progress([Some(2), None], [false, false], ts)),
        "only what is acknowledged with everything before it: 3, 10, 11 wait behind 3"
    );

    open.store(true, Ordering::Relaxed);
    tokio::time::sleep(ms(1500)).await;
    assert_eq!(
        last().1,
        Some(progress([Some(3), Some(11)], [false, true], ts)),
        "range 1 read to its end; range 0 not yet"
    );
    assert_eq!(status.borrow().snapshot.as_ref().unwrap().copied, 5);
    assert!(!status.borrow().snapshot.as_ref().unwrap().done);

    copy_tx
        .send(crate::snapshot::CopyMsg::RangeDone(0))
        .await
        .unwrap();
    drop(copy_tx);
    tokio::time::sleep(ms(1500)).await;
    let (checkpoint, stored) = last();
    assert_eq!(checkpoint.token, Some(change));
    assert_eq!(stored, None, "a finished copy leaves no progress behind");
    assert!(status.borrow().snapshot.as_ref().unwrap().done);
    cancel.cancel();
    task.await.unwrap().unwrap();
}
