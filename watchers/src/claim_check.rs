//! Claim-check for events too large for a record (`on_oversized: s3`): this module owns the
//! S3 side of it, i.e. where the whole event goes (the object key, derived from the watcher
//! and the resume token so that a retry or a replay after a restart overwrites the same
//! object), what the object holds (the event's record bytes, exactly as its record would
//! have been), the small pointer record that takes the event's place in the stream, and the
//! one `PutObject` call.
//!
//! The pipeline (`pipeline.rs`) owns the ordering: while an upload is in flight it reads no
//! further event, and once the object is written it queues the pointer at the event's place,
//! so the event is checkpointed only after both the object and the pointer are stored.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use bson::raw::RawDocument;
use bson::{doc, Bson, Document, Timestamp};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::{aws_refusal, AwsResource, WatcherError};
use crate::flow::Reservation;
use crate::record::{self, RecordFormat};
use crate::retry::Backoff;
use crate::spec::S3Target;

/// Appended to every object key: the object holds the event as its record would be (JSON,
/// or the old tool's near-JSON with `record_format: legacy`).
pub const OBJECT_SUFFIX: &str = ".json";

/// The IAM operation an upload needs (`s3:PutObject`).
pub const PUT_OBJECT: &str = "PutObject";

/// S3 error codes that no retry fixes by itself; shown at once, like an access denial.
const WAITS_FOR_FIX: [&str; 2] = ["NoSuchBucket", "PermanentRedirect"];

/// Writes one object: S3 ([`aws_sdk_s3::Client`]), or a fake in the pipeline's paused-clock
/// tests. The future is lazy: nothing is sent before it is polled.
pub trait ObjectStore: Send + Sync {
    fn put(&self, bucket: &str, key: &str, body: Bytes) -> UploadFuture;
}

impl ObjectStore for aws_sdk_s3::Client {
    fn put(&self, bucket: &str, key: &str, body: Bytes) -> UploadFuture {
        let request = self
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        Box::pin(async move {
            match request.send().await {
                Ok(_) => Ok(()),
                Err(e) => Err(PutError {
                    code: e.code().map(str::to_owned),
                    message: e.message().map(str::to_owned),
                    detail: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                }),
            }
        })
    }
}

/// Where one watcher's claim-checked events go, with the client that writes them.
#[derive(Clone)]
pub struct ClaimCheck {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    watcher: String,
}

/// One event's object, as the pointer record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub bucket: String,
    pub key: String,
    /// Length of the object (the event's record bytes).
    pub bytes: u64,
    /// Hex SHA-256 of the object.
    pub sha256: String,
}

/// What a pointer record repeats of its event, so that a consumer can route, order and
/// filter it without fetching the object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventHead {
    pub token: Option<Bson>,
    pub operation: Option<String>,
    pub ns: Option<Document>,
    pub document_key: Option<Bson>,
    pub cluster_time: Option<Timestamp>,
}

impl EventHead {
    /// The head of a raw change event; a field that cannot be read is left out (an event that
    /// needed lenient decoding may be malformed elsewhere, and its pointer still goes out).
    pub fn from_raw(event: &RawDocument) -> Self {
        let get = |name: &str| {
            event
                .get(name)
                .ok()
                .flatten()
                .and_then(|v| Bson::try_from(bson::RawBson::from(v)).ok())
        };
        Self {
            token: get("_id"),
            operation: match get("operationType") {
                Some(Bson::String(op)) => Some(op),
                _ => None,
            },
            ns: match get("ns") {
                Some(Bson::Document(ns)) => Some(ns),
                _ => None,
            },
            document_key: get("documentKey"),
            cluster_time: match get("clusterTime") {
                Some(Bson::Timestamp(ts)) => Some(ts),
                _ => None,
            },
        }
    }
}

/// Why a `PutObject` failed, as the watcher's status and logs show it.
#[derive(Debug, Clone)]
pub struct PutError {
    pub code: Option<String>,
    pub message: Option<String>,
    /// The SDK's whole error chain (a timeout or a dropped connection has no code).
    pub detail: String,
}

impl PutError {
    /// `AccessDenied` naming `s3:PutObject` on the bucket, when IAM refused the call.
    pub fn refusal(&self, bucket: &str) -> Option<WatcherError> {
        aws_refusal(
            AwsResource::S3Bucket(bucket.to_owned()),
            PUT_OBJECT,
            self.code.as_deref(),
            self.message.as_deref(),
        )
    }

    /// A failure only a change from outside ends (a refusal, a missing bucket): shown at
    /// once rather than after a run of failures. It is retried all the same.
    pub fn waits_for_fix(&self, bucket: &str) -> bool {
        self.refusal(bucket).is_some()
            || self
                .code
                .as_deref()
                .is_some_and(|c| WAITS_FOR_FIX.contains(&c))
    }
}

pub type UploadFuture = Pin<Box<dyn Future<Output = Result<(), PutError>> + Send>>;

impl ClaimCheck {
    pub fn new(client: aws_sdk_s3::Client, target: &S3Target, watcher: &str) -> Self {
        Self::with_store(Arc::new(client), target, watcher)
    }

    pub fn with_store(store: Arc<dyn ObjectStore>, target: &S3Target, watcher: &str) -> Self {
        Self {
            store,
            bucket: target.bucket.clone(),
            prefix: target.prefix.clone(),
            watcher: watcher.to_owned(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The claim for an event with resume token `token` whose record bytes are `body`.
    pub fn claim(&self, token: &Bson, body: &[u8]) -> Claim {
        Claim {
            bucket: self.bucket.clone(),
            key: object_key(&self.prefix, &self.watcher, token),
            bytes: body.len() as u64,
            sha256: sha256_hex(body),
        }
    }

    /// Writes `body` as the claim's object, after `delay` (a retry's backoff). The future
    /// owns everything it needs, so the pipeline polls it in its loop next to its calls.
    pub fn upload(&self, claim: &Claim, body: Bytes, delay: Duration) -> UploadFuture {
        let put = self.store.put(&claim.bucket, &claim.key, body);
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            put.await
        })
    }
}

/// One event on its way to S3: the upload in flight (or waiting out its backoff) and what
/// goes into the stream once the object is written. It holds the event's budget bytes until
/// then, when they pass to the pointer record and are given back at its ack.
pub struct Upload {
    pub seq: u64,
    pub partition_key: String,
    pub pointer: Vec<u8>,
    pub claim: Claim,
    /// `documentKey` as text, for logs and the status reason.
    pub document_key: String,
    pub reservation: Reservation,
    /// Failed attempts in a row.
    pub failures: u32,
    /// The object's bytes, shared with the attempt in flight.
    body: Bytes,
    backoff: Backoff,
    future: UploadFuture,
}

impl Upload {
    /// Starts writing `body` (the event's record bytes) for event `seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cc: &ClaimCheck,
        seq: u64,
        head: &EventHead,
        token: &Bson,
        partition_key: String,
        body: Vec<u8>,
        format: RecordFormat,
        backoff: Backoff,
        reservation: Reservation,
    ) -> Self {
        let claim = cc.claim(token, &body);
        let pointer = pointer_record(head, &claim, format);
        let body = Bytes::from(body);
        let future = cc.upload(&claim, body.clone(), Duration::ZERO);
        Self {
            seq,
            partition_key,
            pointer,
            document_key: head
                .document_key
                .as_ref()
                .map(record::to_text)
                .unwrap_or_else(|| "(none)".into()),
            claim,
            reservation,
            failures: 0,
            body,
            backoff,
            future,
        }
    }

    /// The outcome of the attempt in flight.
    pub async fn done(&mut self) -> Result<(), PutError> {
        (&mut self.future).await
    }

    /// Writes again after the next backoff delay; returns the delay.
    pub fn retry(&mut self, cc: &ClaimCheck) -> Duration {
        self.failures += 1;
        let delay = self.backoff.next_delay();
        self.future = cc.upload(&self.claim, self.body.clone(), delay);
        delay
    }
}

/// `{prefix}{watcher}/{hex SHA-256 of the token's canonical Extended JSON}.json`: one object
/// per event and watcher, the same on every retry and after a restart that reads the event
/// again (so a replay overwrites instead of piling up copies). The prefix is taken as is.
pub fn object_key(prefix: &str, watcher: &str, token: &Bson) -> String {
    let canonical = token.clone().into_canonical_extjson().to_string();
    format!(
        "{prefix}{watcher}/{}{OBJECT_SUFFIX}",
        sha256_hex(canonical.as_bytes())
    )
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The pointer record that takes the event's place in the stream: `{"_id", "operationType",
/// "ns", "documentKey", "clusterTime", "claimCheck": {"bucket", "key", "bytes", "sha256"}}`
/// (a field the event lacks is left out), written in the watcher's record format. `bytes`
/// is a 64-bit integer, so canonical Extended JSON writes `{"$numberLong": ...}`; with
/// `legacy` the pointer is the old tool's encoding of the same document (its layout, its
/// plain numbers), the nearest a legacy consumer can read.
pub fn pointer_record(head: &EventHead, claim: &Claim, format: RecordFormat) -> Vec<u8> {
    let mut pointer = Document::new();
    if let Some(token) = &head.token {
        pointer.insert("_id", token.clone());
    }
    if let Some(op) = &head.operation {
        pointer.insert("operationType", op.as_str());
    }
    if let Some(ns) = &head.ns {
        pointer.insert("ns", ns.clone());
    }
    if let Some(key) = &head.document_key {
        pointer.insert("documentKey", key.clone());
    }
    if let Some(ts) = head.cluster_time {
        pointer.insert("clusterTime", ts);
    }
    pointer.insert(
        "claimCheck",
        doc! {
            "bucket": &claim.bucket,
            "key": &claim.key,
            "bytes": i64::try_from(claim.bytes).unwrap_or(i64::MAX),
            "sha256": &claim.sha256,
        },
    );
    record::encode_owned(pointer, format)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Bson {
        Bson::Document(doc! {"_data": "8263F1A2B3000000012B042C0100296E5A1004"})
    }

    fn claim() -> Claim {
        Claim {
            bucket: "big".into(),
            key: "cdc/orders/k.json".into(),
            bytes: 2_097_152,
            sha256: "ab".repeat(32),
        }
    }

    fn head() -> EventHead {
        EventHead {
            token: Some(token()),
            operation: Some("insert".into()),
            ns: Some(doc! {"db": "shop", "coll": "orders"}),
            document_key: Some(Bson::Document(doc! {"_id": 7_i64})),
            cluster_time: Some(Timestamp {
                time: 1_700_000_000,
                increment: 3,
            }),
        }
    }

    #[test]
    fn sha256_is_lowercase_hex_of_the_bytes() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn object_key_is_prefix_watcher_and_the_tokens_hash() {
        let canonical = r#"{"_data":"8263F1A2B3000000012B042C0100296E5A1004"}"#;
        assert_eq!(
            token().into_canonical_extjson().to_string(),
            canonical,
            "the text hashed"
        );
        let key = object_key("cdc/", "orders", &token());
        assert_eq!(
            key,
            format!("cdc/orders/{}.json", sha256_hex(canonical.as_bytes()))
        );
        // Stable (a retry overwrites), distinct per watcher and per token, prefix as is.
        assert_eq!(key, object_key("cdc/", "orders", &token()));
        assert_ne!(key, object_key("cdc/", "users", &token()));
        let other = Bson::Document(doc! {"_data": "8263F1A2B3000000022B"});
        assert_ne!(key, object_key("cdc/", "orders", &other));
        assert!(object_key("", "orders", &token()).starts_with("orders/"));
        assert!(object_key("x-", "orders", &token()).starts_with("x-orders/"));
    }

    #[test]
    fn claim_names_bucket_key_length_and_hash_of_the_body() {
        let cc = ClaimCheck::new(
            aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::Config::builder()
                    .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                    .build(),
            ),
            &S3Target {
                bucket: "big".into(),
                prefix: "p/".into(),
            },
            "w",
        );
        let c = cc.claim(&token(), b"abc");
        assert_eq!(c.bucket, "big");
        assert_eq!(c.key, object_key("p/", "w", &token()));
        assert_eq!(c.bytes, 3);
        assert_eq!(c.sha256, sha256_hex(b"abc"));
    }

    #[test]
    fn pointer_record_bytes_per_format() {
        let relaxed =
            String::from_utf8(pointer_record(&head(), &claim(), RecordFormat::Relaxed)).unwrap();
        let sha = "ab".repeat(32);
        assert_eq!(
            relaxed,
            format!(
                r#"{{"_id": {{"_data": "8263F1A2B3000000012B042C0100296E5A1004"}}, "operationType": "insert", "ns": {{"db": "shop", "coll": "orders"}}, "documentKey": {{"_id": 7}}, "clusterTime": {{"$timestamp": {{"t": 1700000000, "i": 3}}}}, "claimCheck": {{"bucket": "big", "key": "cdc/orders/k.json", "bytes": 2097152, "sha256": "{sha}"}}}}"#
            )
        );
        let canonical =
            String::from_utf8(pointer_record(&head(), &claim(), RecordFormat::Canonical)).unwrap();
        assert!(
            canonical.contains(r#""documentKey": {"_id": {"$numberLong": "7"}}"#),
            "{canonical}"
        );
        assert!(
            canonical.contains(r#""bytes": {"$numberLong": "2097152"}"#),
            "{canonical}"
        );
        let legacy =
            String::from_utf8(pointer_record(&head(), &claim(), RecordFormat::Legacy)).unwrap();
        assert!(
            legacy.contains(
                r#""claimCheck": {"bucket": "big", "key": "cdc/orders/k.json", "bytes": 2097152"#
            ),
            "{legacy}"
        );
        // A field the event lacks is left out; claimCheck is always there.
        let bare = pointer_record(&EventHead::default(), &claim(), RecordFormat::Relaxed);
        assert!(String::from_utf8(bare)
            .unwrap()
            .starts_with(r#"{"claimCheck": {"bucket": "big""#));
    }

    #[test]
    fn head_is_read_from_the_raw_event() {
        let event = doc! {
            "_id": token(),
            "operationType": "insert",
            "clusterTime": Timestamp { time: 1_700_000_000, increment: 3 },
            "fullDocument": {"_id": 7_i64, "blob": "x"},
            "ns": {"db": "shop", "coll": "orders"},
            "documentKey": {"_id": 7_i64},
        };
        let raw = bson::RawDocumentBuf::try_from(&event).unwrap();
        assert_eq!(EventHead::from_raw(&raw), head());
    }

    #[test]
    fn refusals_and_a_missing_bucket_wait_for_a_fix() {
        let err = |code: &str| PutError {
            code: Some(code.into()),
            message: Some("m".into()),
            detail: String::new(),
        };
        let denied = err("AccessDenied").refusal("big").unwrap().to_string();
        assert!(
            denied.contains("grant `s3:PutObject` on S3 bucket `big`"),
            "{denied}"
        );
        assert!(err("AccessDenied").waits_for_fix("big"));
        assert!(err("NoSuchBucket").waits_for_fix("big"));
        assert!(!err("InternalError").waits_for_fix("big"));
        assert!(err("InternalError").refusal("big").is_none());
    }
}
