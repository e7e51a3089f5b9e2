//! The size limits of each Kinesis stream: how large one record and one PutRecords call may be.
//!
//! A stream accepts records of 1 MiB unless its owner raised it (`UpdateMaxRecordSize`, up to
//! 10 MiB); a call carries up to 5 MiB, or up to the record limit on a raised stream (at most
//! 10 MiB). The limit is read once per stream per process (`DescribeStreamSummary`,
//! `MaxRecordSizeInKiB`) at the start of the first watcher writing to it, and shared by every
//! watcher and life through [`StreamLimitsCache`] in `Deps`. Where the summary cannot be read
//! (the role lacks `kinesis:DescribeStreamSummary`, an endpoint that does not know the field),
//! the stream is taken at 1 MiB, which every stream accepts: a raised stream then only refuses
//! records it would have taken, never loses one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata};
use tokio::sync::OnceCell;
use tracing::{info, warn};

const MIB: usize = 1024 * 1024;
/// Every stream's record limit (data plus partition key) unless raised.
pub const DEFAULT_RECORD_BYTES: usize = MIB;
/// The highest record limit a stream can be raised to.
pub const MAX_RECORD_BYTES: usize = 10 * MIB;
/// One PutRecords call on a stream whose records are at most 5 MiB.
pub const DEFAULT_REQUEST_BYTES: usize = 5 * MIB;
/// One PutRecords call on a raised stream, at most.
pub const MAX_REQUEST_BYTES: usize = 10 * MIB;
/// A summary that takes longer is given up on for this life (not cached).
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How large one record and one call to a stream may be, in bytes (partition keys included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub record_bytes: usize,
    pub request_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self::with_record_bytes(DEFAULT_RECORD_BYTES)
    }
}

impl StreamLimits {
    /// The limits of a stream whose records may be `record_bytes` (kept within 1 to 10 MiB).
    pub fn with_record_bytes(record_bytes: usize) -> Self {
        let record_bytes = record_bytes.clamp(DEFAULT_RECORD_BYTES, MAX_RECORD_BYTES);
        Self {
            record_bytes,
            request_bytes: record_bytes.clamp(DEFAULT_REQUEST_BYTES, MAX_REQUEST_BYTES),
        }
    }

    /// From `MaxRecordSizeInKiB` of the stream's summary.
    pub fn from_kib(kib: i32) -> Self {
        Self::with_record_bytes(usize::try_from(kib).unwrap_or(0).saturating_mul(1024))
    }
}

/// The limits read so far, one cell per stream, shared by every watcher of the process.
#[derive(Debug, Clone, Default)]
pub struct StreamLimitsCache {
    streams: Arc<Mutex<HashMap<String, Arc<OnceCell<StreamLimits>>>>>,
}

impl StreamLimitsCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream's limits, read on the first call for it. Watchers of one stream that start
    /// together wait for one read. A read that got no answer (timeout, connection, throttling,
    /// a server error) is not kept: this life uses 1 MiB and the next life asks again.
    pub async fn get(&self, client: &aws_sdk_kinesis::Client, stream: &str) -> StreamLimits {
        let cell = {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            streams.entry(stream.to_owned()).or_default().clone()
        };
        match cell.get_or_try_init(|| describe(client, stream)).await {
            Ok(limits) => *limits,
            Err(NoAnswer) => StreamLimits::default(),
        }
    }
}

/// DescribeStreamSummary got no answer, or was throttled; the fallback is used without being
/// cached.
struct NoAnswer;

async fn describe(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<StreamLimits, NoAnswer> {
    let call = client.describe_stream_summary().stream_name(stream).send();
    let result = match tokio::time::timeout(DESCRIBE_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => {
            warn!(
                stream,
                "DescribeStreamSummary timed out; records are held to 1 MiB for now"
            );
            return Err(NoAnswer);
        }
    };
    match result {
        Ok(out) => {
            let kib = out
                .stream_description_summary()
                .and_then(|s| s.max_record_size_in_kib());
            let limits = kib.map_or_else(StreamLimits::default, StreamLimits::from_kib);
            info!(
                stream,
                record_bytes = limits.record_bytes,
                request_bytes = limits.request_bytes,
                reported = kib.is_some(),
                "stream size limits read"
            );
            Ok(limits)
        }
        Err(e) => {
            // Throttled (DescribeStreamSummary allows 20 calls per second per account, and
            // many watchers start at once), a stream not created yet, a server error or no
            // answer: asked again by the next life.
            let transient = matches!(
                e.code(),
                Some(
                    "LimitExceededException" | "ThrottlingException" | "ResourceNotFoundException"
                )
            ) || e
                .raw_response()
                .is_none_or(|r| r.status().is_server_error());
            warn!(
                stream,
                error = %DisplayErrorContext(&e),
                "cannot read the stream's record size limit (grant kinesis:DescribeStreamSummary \
                 on it); records over 1 MiB are treated as oversized"
            );
            if transient {
                Err(NoAnswer)
            } else {
                // A refusal (access denied, unknown operation) will not change by itself:
                // logged once, the fallback kept for the process.
                Ok(StreamLimits::default())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_limit_follows_a_raised_record_limit() {
        let default = StreamLimits::default();
        assert_eq!(default.record_bytes, MIB);
        assert_eq!(default.request_bytes, 5 * MIB);
        assert_eq!(StreamLimits::from_kib(1024), default);
        let four = StreamLimits::from_kib(4096);
        assert_eq!((four.record_bytes, four.request_bytes), (4 * MIB, 5 * MIB));
        let eight = StreamLimits::from_kib(8192);
        assert_eq!(
            (eight.record_bytes, eight.request_bytes),
            (8 * MIB, 8 * MIB)
        );
        let ten = StreamLimits::from_kib(10240);
        assert_eq!((ten.record_bytes, ten.request_bytes), (10 * MIB, 10 * MIB));
        // Out of the documented range: kept within it.
        assert_eq!(StreamLimits::from_kib(20_000), ten);
        assert_eq!(StreamLimits::from_kib(-1), default);
    }
}
