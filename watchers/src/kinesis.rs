//! One PutRecords call and what its answer means for each record.

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use crate::batch::PendingRecord;

/// The fate of one record of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordResult {
    Accepted,
    Rejected { error_code: String, message: String },
}

/// Why a whole call failed; every such failure is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// AWS error code when the service answered (`ResourceNotFoundException`, throttling...),
    /// otherwise a short class (`dispatch`, `timeout`, `response`).
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Where a watcher's records go: Kinesis ([`KinesisSink`]) in production, memory in the
/// pipeline's unit tests.
pub trait RecordSink: Clone + Send + Sync + 'static {
    /// The stream's name, for messages.
    fn stream(&self) -> &str;

    /// Sends `records` in one call. On success, returns one result per record, in order.
    fn put(
        &self,
        records: &[PendingRecord],
    ) -> impl std::future::Future<Output = Result<Vec<RecordResult>, CallError>> + Send;
}

impl RecordSink for KinesisSink {
    fn stream(&self) -> &str {
        KinesisSink::stream(self)
    }

    async fn put(&self, records: &[PendingRecord]) -> Result<Vec<RecordResult>, CallError> {
        KinesisSink::put(self, records).await
    }
}

#[derive(Clone)]
pub struct KinesisSink {
    client: aws_sdk_kinesis::Client,
    stream: String,
}

impl KinesisSink {
    pub fn new(client: aws_sdk_kinesis::Client, stream: impl Into<String>) -> Self {
        Self {
            client,
            stream: stream.into(),
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Sends `records` in one call. On success, returns one result per record, in order.
    pub async fn put(&self, records: &[PendingRecord]) -> Result<Vec<RecordResult>, CallError> {
        let mut entries = Vec::with_capacity(records.len());
        for r in records {
            let entry = PutRecordsRequestEntry::builder()
                .data(Blob::new(r.data.clone()))
                .partition_key(r.partition_key.clone())
                .build()
                .map_err(|e| CallError {
                    code: "build".into(),
                    message: e.to_string(),
                })?;
            entries.push(entry);
        }
        let call = self
            .client
            .put_records()
            .stream_name(&self.stream)
            .set_records(Some(entries));
        match call.send().await {
            Ok(output) => Ok(record_results(&output, records.len())),
            Err(err) => Err(classify(&self.stream, err)),
        }
    }
}

fn classify<E, R>(stream: &str, err: aws_sdk_kinesis::error::SdkError<E, R>) -> CallError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_kinesis::error::SdkError;
    let code = match &err {
        SdkError::ServiceError(e) => e.err().code().unwrap_or("service").to_owned(),
        SdkError::TimeoutError(_) => "timeout".to_owned(),
        SdkError::DispatchFailure(_) => "dispatch".to_owned(),
        SdkError::ResponseError(_) => "response".to_owned(),
        SdkError::ConstructionFailure(_) => "construction".to_owned(),
        _ => "unknown".to_owned(),
    };
    let message = match &err {
        _ if code == "ResourceNotFoundException" => format!(
            "kinesis stream `{stream}` does not exist (or is not visible to these credentials)"
        ),
        // The service's own words: the SDK's full context repeats them with the raw response,
        // too long for a reason an operator reads.
        SdkError::ServiceError(e) => match e.err().message() {
            Some(m) if !m.is_empty() => m.to_owned(),
            _ => DisplayErrorContext(&err).to_string(),
        },
        _ => DisplayErrorContext(&err).to_string(),
    };
    CallError { code, message }
}

/// Maps a PutRecords answer to one result per sent record. A missing entry (an answer shorter
/// than the call, which AWS never sends) counts as rejected, so nothing is taken as written
/// without evidence.
pub fn record_results(output: &PutRecordsOutput, sent: usize) -> Vec<RecordResult> {
    let entries = output.records();
    (0..sent)
        .map(|i| match entries.get(i) {
            Some(e) => match e.error_code() {
                Some(code) => RecordResult::Rejected {
                    error_code: code.to_owned(),
                    message: e.error_message().unwrap_or_default().to_owned(),
                },
                None if e.sequence_number().is_some() => RecordResult::Accepted,
                None => RecordResult::Rejected {
                    error_code: "MissingSequenceNumber".into(),
                    message: "no sequence number and no error code".into(),
                },
            },
            None => RecordResult::Rejected {
                error_code: "MissingResult".into(),
                message: "the answer had fewer entries than the call".into(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::types::PutRecordsResultEntry;

    fn ok(seq: &str) -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .sequence_number(seq)
            .shard_id("shardId-000000000000")
            .build()
    }

    fn failed(code: &str) -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .error_code(code)
            .error_message("slow down")
            .build()
    }

    #[test]
    fn partial_failures_map_to_their_positions() {
        let out = PutRecordsOutput::builder()
            .failed_record_count(1)
            .records(ok("1"))
            .records(failed("ProvisionedThroughputExceededException"))
            .records(ok("3"))
            .build()
            .unwrap();
        let results = record_results(&out, 3);
        assert_eq!(results[0], RecordResult::Accepted);
        assert_eq!(
            results[1],
            RecordResult::Rejected {
                error_code: "ProvisionedThroughputExceededException".into(),
                message: "slow down".into()
            }
        );
        assert_eq!(results[2], RecordResult::Accepted);
    }

    #[test]
    fn short_or_empty_answers_are_not_acks() {
        let out = PutRecordsOutput::builder()
            .records(ok("1"))
            .records(PutRecordsResultEntry::builder().build())
            .build()
            .unwrap();
        let results = record_results(&out, 3);
        assert_eq!(results[0], RecordResult::Accepted);
        assert!(matches!(results[1], RecordResult::Rejected { .. }));
        assert!(matches!(results[2], RecordResult::Rejected { .. }));
    }
}
