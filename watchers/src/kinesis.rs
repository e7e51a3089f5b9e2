//! One PutRecords call and what its answer means for each record.

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_smithy_types::body::SdkBody;

use crate::batch::PendingRecord;

/// The fate of one record of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordResult {
    /// Written; `shard` is the number of the shard it went to (`shardId-000000000003` is 3),
    /// when the answer names one.
    Accepted {
        shard: Option<u64>,
    },
    Rejected {
        error_code: String,
        message: String,
    },
}

/// The error code of a record rejected because its shard is over its limit.
pub const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// A shard's number from its id (`shardId-000000000003` is 3).
pub fn shard_number(shard_id: &str) -> Option<u64> {
    shard_id.strip_prefix("shardId-")?.parse().ok()
}

/// The shard a throttled record's message names: Kinesis answers "Rate exceeded for shard
/// shardId-000000000001 in stream ... under account ...". `None` for any other wording.
pub fn throttled_shard(message: &str) -> Option<u64> {
    let at = message.find("shardId-")?;
    let id = &message[at..];
    let end = id
        .char_indices()
        .skip("shardId-".len())
        .find(|(_, c)| !c.is_ascii_digit())
        .map_or(id.len(), |(i, _)| i);
    shard_number(&id[..end])
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
    ///
    /// The body is written here, straight from the pending records ([`put_records_body`]),
    /// and given to the SDK before it signs the request: the SDK's own serializer would need
    /// each record's data copied into a `Blob` and its key into a `String` per call, then
    /// base64 into a `String` per record. The SDK still resolves the endpoint (from the
    /// stream name, as the input carries it), signs, sends and reads the answer; it does not
    /// retry ([`no_retries`]).
    pub async fn put(&self, records: &[PendingRecord]) -> Result<Vec<RecordResult>, CallError> {
        let body = bytes::Bytes::from(put_records_body(&self.stream, records));
        let call = self
            .client
            .put_records()
            .stream_name(&self.stream)
            .set_records(Some(Vec::new()))
            .customize()
            .config_override(no_retries())
            .mutate_request(move |request| {
                let length = body.len();
                *request.body_mut() = SdkBody::from(body.clone());
                request
                    .headers_mut()
                    .insert("content-length", length.to_string());
            });
        match call.send().await {
            Ok(output) => Ok(record_results(&output, records.len())),
            Err(err) => Err(classify(&self.stream, err)),
        }
    }
}

/// SDK settings for PutRecords: no retries. A failed call comes back to the pipeline at
/// once, which retries its records by their own delays and halves its send limit
/// (`crate::flow`). The SDK's standard retries would hold the call for up to 1 s, then 2 s
/// (its backoff starts at 1 s), out of sight of that limit, the metrics and the status.
fn no_retries() -> aws_sdk_kinesis::config::Builder {
    aws_sdk_kinesis::Config::builder()
        .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
}

/// The JSON body of a PutRecords call of `records` to `stream`, as the SDK's serializer
/// writes it (`Data` base64 with padding, strings JSON-escaped), in one buffer.
pub fn put_records_body(stream: &str, records: &[PendingRecord]) -> Vec<u8> {
    let size: usize = records
        .iter()
        .map(|r| 36 + r.data.len().div_ceil(3) * 4 + r.partition_key.len() + 8)
        .sum();
    let mut out = Vec::with_capacity(40 + stream.len() + size);
    out.extend_from_slice(b"{\"StreamName\":");
    write_json_str(&mut out, stream);
    out.extend_from_slice(b",\"Records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"Data\":\"");
        base64_simd::STANDARD.encode_append(&r.data, &mut out);
        out.extend_from_slice(b"\",\"PartitionKey\":");
        write_json_str(&mut out, &r.partition_key);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// `s` as a JSON string (RFC 8259 escapes; everything else as it is, UTF-8).
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        match crate::record::short_escape(b) {
            Some(escape) => out.extend_from_slice(escape),
            None => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
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
    let message = if code == "ResourceNotFoundException" {
        format!("kinesis stream `{stream}` does not exist (or is not visible to these credentials)")
    } else {
        crate::error::aws_words(&err)
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
                None if e.sequence_number().is_some() => RecordResult::Accepted {
                    shard: e.shard_id().and_then(shard_number),
                },
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

    fn client(endpoint: &str) -> aws_sdk_kinesis::Client {
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
                "AKID", "secret", None, None, "test",
            ))
            .endpoint_url(endpoint)
            .build();
        aws_sdk_kinesis::Client::from_conf(config)
    }

    /// Keys and data that need escaping or padding: quotes, backslashes, control characters,
    /// non-ASCII, empty and binary data of every length modulo 3.
    fn awkward_records() -> Vec<PendingRecord> {
        let keys = [
            "plain",
            "quote \" and \\ back",
            "tab\t nl\n cr\r bs\u{8} ff\u{c} nul\u{0} us\u{1f} del\u{7f}",
            "é ü 日本 🦀",
            "{\"$oid\": \"65f0c0ffee\"}",
        ];
        let mut records = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            for len in [0usize, 1, 2, 3, 1024] {
                let data: Vec<u8> = (0..len).map(|b| (b * 37 + i) as u8).collect();
                records.push(PendingRecord::new(
                    records.len() as u64,
                    (*key).into(),
                    data,
                ));
            }
        }
        records
    }

    /// What the SDK's own serializer writes for `records`, caught before it is sent (to a
    /// port nothing listens on).
    async fn sdk_body(records: &[PendingRecord]) -> serde_json::Value {
        let caught = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = caught.clone();
        let entries = records
            .iter()
            .map(|r| {
                aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                    .data(aws_sdk_kinesis::primitives::Blob::new(r.data.clone()))
                    .partition_key(r.partition_key.clone())
                    .build()
                    .unwrap()
            })
            .collect();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let _ = client(&closed)
            .put_records()
            .stream_name("orders \"eu\"")
            .set_records(Some(entries))
            .customize()
            .mutate_request(move |request| {
                let bytes = request.body().bytes().unwrap().to_vec();
                *sink.lock().unwrap() = bytes;
            })
            .send()
            .await;
        let bytes = caught.lock().unwrap().clone();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn the_body_is_the_sdks_own() {
        let records = awkward_records();
        let ours: serde_json::Value =
            serde_json::from_slice(&put_records_body("orders \"eu\"", &records)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sdk = rt.block_on(sdk_body(&records));
        assert_eq!(sdk["Records"].as_array().unwrap().len(), records.len());
        assert_eq!(ours, sdk);
    }

    /// The whole call, against a one-shot HTTP server: the body the server reads (its
    /// `content-length` included) is the SDK's, and the answer maps back record by record.
    #[tokio::test]
    async fn a_call_sends_the_body_and_reads_the_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let records = awkward_records();
        let expected = sdk_body(&records).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let n = records.len();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 65536];
            let head_end = loop {
                let read = socket.read(&mut buf).await.unwrap();
                assert!(read > 0, "connection closed before the headers ended");
                request.extend_from_slice(&buf[..read]);
                if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
            };
            let head = String::from_utf8(request[..head_end].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("a content-length header");
            while request.len() < head_end + length {
                let read = socket.read(&mut buf).await.unwrap();
                assert!(read > 0, "connection closed inside the body");
                request.extend_from_slice(&buf[..read]);
            }
            assert_eq!(
                request.len(),
                head_end + length,
                "body longer than its length"
            );
            let entries: Vec<String> = (0..n)
                .map(|i| match i {
                    1 => r#"{"ErrorCode":"ProvisionedThroughputExceededException","ErrorMessage":"slow down"}"#.to_owned(),
                    _ => format!(r#"{{"SequenceNumber":"{i}","ShardId":"shardId-000000000000"}}"#),
                })
                .collect();
            let answer = format!(
                r#"{{"FailedRecordCount":1,"Records":[{}]}}"#,
                entries.join(",")
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
            (head, request[head_end..].to_vec())
        });
        let sink = KinesisSink::new(client(&endpoint), "orders \"eu\"");
        let within = std::time::Duration::from_secs(20);
        let results = tokio::time::timeout(within, sink.put(&records))
            .await
            .expect("the call never ended (a body shorter than its content-length?)")
            .unwrap();
        let (head, body) = tokio::time::timeout(within, server)
            .await
            .expect("the server never read the whole body")
            .unwrap();
        assert!(head.starts_with("POST / "), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-amz-target: kinesis_20131202.putrecords"),
            "{head}"
        );
        assert!(head.contains("Signature="), "unsigned: {head}");
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(sent, expected);
        assert_eq!(results.len(), n);
        assert!(
            matches!(&results[1], RecordResult::Rejected { error_code, .. }
            if error_code == "ProvisionedThroughputExceededException")
        );
        assert!(results
            .iter()
            .enumerate()
            .all(|(i, r)| i == 1 || matches!(r, RecordResult::Accepted { .. })));
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
        assert_eq!(results[0], RecordResult::Accepted { shard: Some(0) });
        assert_eq!(
            results[1],
            RecordResult::Rejected {
                error_code: "ProvisionedThroughputExceededException".into(),
                message: "slow down".into()
            }
        );
        assert_eq!(results[2], RecordResult::Accepted { shard: Some(0) });
    }

    #[test]
    fn a_throttled_record_names_its_shard() {
        // The wording of Kinesis's PutRecords reference (PutRecordsResultEntry).
        let aws = "Rate exceeded for shard shardId-000000000001 in stream exampleStreamName \
                   under account 111111111111.";
        assert_eq!(throttled_shard(aws), Some(1));
        assert_eq!(
            throttled_shard("Rate exceeded for shard shardId-000000012345"),
            Some(12345)
        );
        assert_eq!(throttled_shard("Rate exceeded (injected)"), None);
        assert_eq!(throttled_shard("shardId-x in stream"), None);
        assert_eq!(shard_number("shardId-000000000003"), Some(3));
        assert_eq!(shard_number("shard-3"), None);
    }

    #[test]
    fn short_or_empty_answers_are_not_acks() {
        let out = PutRecordsOutput::builder()
            .records(ok("1"))
            .records(PutRecordsResultEntry::builder().build())
            .build()
            .unwrap();
        let results = record_results(&out, 3);
        assert_eq!(results[0], RecordResult::Accepted { shard: Some(0) });
        assert!(matches!(results[1], RecordResult::Rejected { .. }));
        assert!(matches!(results[2], RecordResult::Rejected { .. }));
    }
}
