//! `on_oversized: s3` in the loop, on the paused clock against a fake object store: reading
//! waits behind an upload, the pointer takes the event's place in its key's order, the loop
//! keeps acknowledging and checkpointing meanwhile, failures are retried and shown, and a
//! stop with the upload unfinished leaves the event past the checkpoint.

use std::sync::atomic::AtomicU32;

use super::*;
use crate::claim_check::{ObjectStore, PutError, UploadFuture};
use crate::spec::S3Target;

/// S3 in memory: each put waits while the gate is closed, then fails while `failures` is
/// above zero (one less per put), else stores the object.
struct FakeS3 {
    objects: Mutex<Vec<(Instant, String, Vec<u8>)>>,
    gate: watch::Receiver<bool>,
    failures: AtomicU32,
}

impl FakeS3 {
    fn new(open: bool, failures: u32) -> (Arc<Self>, watch::Sender<bool>) {
        let (tx, gate) = watch::channel(open);
        let s3 = Self {
            objects: Mutex::default(),
            gate,
            failures: AtomicU32::new(failures),
        };
        (Arc::new(s3), tx)
    }

    fn keys(&self) -> Vec<String> {
        let objects = self.objects.lock().unwrap();
        objects.iter().map(|(_, k, _)| k.clone()).collect()
    }
}

/// Lets `Arc<FakeS3>` serve as the store while the test keeps its own handle.
struct Shared(Arc<FakeS3>);

impl ObjectStore for Shared {
    fn put(&self, _bucket: &str, key: &str, body: bytes::Bytes) -> UploadFuture {
        let s3 = self.0.clone();
        let key = key.to_owned();
        Box::pin(async move {
            let mut gate = s3.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
            tokio::time::sleep(ms(5)).await;
            let failing = s3
                .failures
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(PutError {
                    code: Some("NoSuchBucket".into()),
                    message: Some("The specified bucket does not exist".into()),
                    detail: "NoSuchBucket".into(),
                });
            }
            s3.objects
                .lock()
                .unwrap()
                .push((Instant::now(), key, body.to_vec()));
            Ok(())
        })
    }
}

fn claim_spec() -> WatcherSpec {
    WatcherSpec {
        on_oversized: OnOversized::S3,
        s3: Some(S3Target {
            bucket: "big".into(),
            prefix: "cdc/".into(),
        }),
        checkpoint_interval: ms(1000),
        ..spec(BatchSettings {
            linger: ms(1),
            ..batch()
        })
    }
}

/// As [`Run::start_silent`], with claim-checks going to `s3`.
fn start(sink: FakeSink, store: Option<MemoryStore>, s3: &Arc<FakeS3>) -> Run {
    let spec = Arc::new(claim_spec());
    let (status_tx, status) = StatusTx::channel();
    let mut pipeline = Pipeline::new(
        spec.clone(),
        sink,
        status_tx,
        AckTracker::new(),
        test_metrics(),
        StreamLimits::default(),
    );
    pipeline.claim_check = Some(ClaimCheck::with_store(
        Arc::new(Shared(s3.clone())),
        spec.s3.as_ref().unwrap(),
        "w",
    ));
    Run::drive(pipeline, status, store)
}

/// Seqs of the acknowledged records of `key`, in acknowledgement order.
fn delivered_of(sink: &FakeSink, key: &str) -> Vec<u64> {
    let delivered = sink.delivered();
    delivered
        .into_iter()
        .filter(|(_, k, _)| k == key)
        .map(|(_, _, seq)| seq)
        .collect()
}

fn token(seq: u64) -> Option<Bson> {
    Some(Bson::Document(doc! {"_data": format!("{:08}", seq + 1)}))
}

#[tokio::test(start_paused = true)]
async fn reading_waits_behind_an_upload_and_the_pointer_keeps_its_place() {
    let pointers: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = FakeSink::new({
        let pointers = pointers.clone();
        move |r, _| {
            if r.seq == 1 {
                pointers.lock().unwrap().push(r.data.clone());
            }
            Fate::Accept
        }
    });
    let (s3, open) = FakeS3::new(false, 0);
    let store = MemoryStore::default();
    let mut run = start(sink.clone(), Some(store.clone()), &s3);
    run.insert("a").await; // seq 0
    run.insert_sized("a", 2 * MIB).await; // seq 1: oversized
    run.insert("b").await; // seq 2
    run.insert("a").await; // seq 3
    tokio::time::sleep(ms(1500)).await;

    // The upload is held: only what was read before it is delivered, and the loop goes on
    // (seq 0 acknowledged and checkpointed, the tick still firing).
    assert_eq!(sink.delivered().len(), 1, "{:?}", sink.delivered());
    let saves = store.saves.lock().unwrap().clone();
    assert_eq!(saves.last().map(|(_, c)| c.token.clone()), Some(token(0)));
    assert!(s3.keys().is_empty());

    open.send(true).unwrap();
    tokio::time::sleep(ms(100)).await;
    assert_eq!(delivered_of(&sink, "a"), [0, 1, 3]);
    assert_eq!(delivered_of(&sink, "b"), [2]);
    // The object was stored before its pointer went out, under the token's key.
    let objects = s3.objects.lock().unwrap().clone();
    assert_eq!(objects.len(), 1);
    let (stored_at, key, body) = &objects[0];
    assert_eq!(
        key,
        &crate::claim_check::object_key("cdc/", "w", &token(1).unwrap())
    );
    let calls = sink.calls();
    let pointer_call = calls.iter().find(|(_, seqs)| seqs.contains(&1)).unwrap();
    assert!(pointer_call.0 >= *stored_at);
    assert!(body.len() > 2 * MIB, "the whole event");
    let pointer: serde_json::Value = serde_json::from_slice(&pointers.lock().unwrap()[0]).unwrap();
    assert_eq!(pointer["claimCheck"]["key"], key.as_str());
    assert_eq!(pointer["claimCheck"]["bytes"], body.len() as u64);
    assert_eq!(
        pointer["claimCheck"]["sha256"],
        crate::claim_check::sha256_hex(body).as_str()
    );
    assert_eq!(pointer["documentKey"]["_id"], "a");

    tokio::time::sleep(ms(1000)).await;
    let saves = store.saves.lock().unwrap().clone();
    assert_eq!(saves.last().map(|(_, c)| c.token.clone()), Some(token(3)));
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_upload_is_retried_and_shown_until_it_goes_through() {
    let sink = FakeSink::accept_all();
    let (s3, _open) = FakeS3::new(true, 3);
    let mut run = start(sink.clone(), None, &s3);
    run.insert_sized("a", 2 * MIB).await;
    run.insert("b").await;
    tokio::time::sleep(ms(20)).await;
    {
        let status = run.status.borrow();
        assert_eq!(
            status.state,
            State::BackingOff,
            "shown at the first failure"
        );
        let reason = status.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("s3 bucket `big`") && reason.contains("NoSuchBucket"),
            "{reason}"
        );
    }
    assert!(sink.delivered().is_empty(), "b waits behind the upload");
    // Three failures at the watcher's backoff (100 ms doubling), then through.
    tokio::time::sleep(ms(2000)).await;
    assert_eq!(s3.keys().len(), 1);
    assert_eq!(delivered_of(&sink, "a"), [0]);
    assert_eq!(delivered_of(&sink, "b"), [1]);
    assert_eq!(run.status.borrow().state, State::Running);
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stop_with_the_upload_unfinished_leaves_the_event_past_the_checkpoint() {
    let sink = FakeSink::accept_all();
    let (s3, _open) = FakeS3::new(false, 0);
    let store = MemoryStore::default();
    let mut run = start(sink.clone(), Some(store.clone()), &s3);
    run.insert("a").await;
    run.insert_sized("a", 2 * MIB).await;
    tokio::time::sleep(ms(1500)).await;
    let started = Instant::now();
    let (result, unsent) = run.stop().await;
    result.unwrap();
    assert_eq!(unsent, 1, "the unfinished upload");
    assert!(Instant::now() - started >= DRAIN_TIMEOUT, "waited for it");
    assert!(s3.keys().is_empty());
    assert_eq!(delivered_of(&sink, "a"), [0]);
    let saves = store.saves.lock().unwrap().clone();
    assert_eq!(saves.last().map(|(_, c)| c.token.clone()), Some(token(0)));
}
