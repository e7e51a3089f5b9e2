//! The KPL aggregated record format (`aggregation: kpl`): several events of one partition key
//! packed into one Kinesis record, which Kinesis accepts or rejects whole.
//!
//! The format is the one the Kinesis Producer Library writes and KCL, AWS's Lambda
//! deaggregation libraries, Firehose and Flink's Kinesis connector read
//! (amazon-kinesis-producer `aws/kinesis/core/kinesis_record.cc`, `aggregation-format.md`):
//!
//! ```text
//! magic F3 89 9A C2 | protobuf AggregatedRecord | MD5 of the protobuf bytes (16)
//! ```
//!
//! Every record of one aggregate here shares the one partition key of the Kinesis record that
//! carries it, so the partition key table has one entry and no explicit hash keys are set: a
//! consumer that deaggregates sees each event with its own (identical) key, on the shard that
//! key always maps to. An aggregate of one event is never built: a lone event goes as a plain
//! record, byte for byte what `aggregation: none` sends, which every deaggregator passes
//! through unchanged.

use md5::{Digest, Md5};
use prost::Message;

/// The four bytes an aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Length of the MD5 trailer.
const DIGEST_LEN: usize = 16;

/// `AggregatedRecord` of the KPL's `messages.proto` (proto2).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// `Record` of `messages.proto`: proto2 `required` fields are always written, even when zero,
/// as the Java and Python parsers insist on them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    pub data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// Bytes one event of `data_len` bytes adds to the protobuf: the `records` field's tag and
/// length, then `partition_key_index = 0` (2 bytes) and `data`'s tag, length and bytes.
fn record_len(data_len: usize) -> usize {
    let inner = 2 + 1 + prost::encoding::encoded_len_varint(data_len as u64) + data_len;
    1 + prost::encoding::encoded_len_varint(inner as u64) + inner
}

/// Events of one partition key being packed into one Kinesis record.
#[derive(Debug)]
pub struct Builder {
    key_len: usize,
    datas: Vec<Vec<u8>>,
    /// Length of the protobuf message built from `datas`.
    proto_len: usize,
}

impl Builder {
    /// Starts with the first event's record bytes.
    pub fn new(partition_key: &str, first: Vec<u8>) -> Self {
        let key_len = partition_key.len();
        let table = 1 + prost::encoding::encoded_len_varint(key_len as u64) + key_len;
        let proto_len = table + record_len(first.len());
        Self {
            key_len,
            datas: vec![first],
            proto_len,
        }
    }

    /// Events packed so far.
    pub fn len(&self) -> usize {
        self.datas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.datas.is_empty()
    }

    /// Bytes the Kinesis record counts against its limits (data plus partition key) with one
    /// more event of `data_len` bytes.
    pub fn size_with(&self, data_len: usize) -> usize {
        MAGIC.len() + self.proto_len + record_len(data_len) + DIGEST_LEN + self.key_len
    }

    /// Bytes the Kinesis record counts against its limits as it stands.
    pub fn size(&self) -> usize {
        match self.datas.as_slice() {
            [only] => only.len() + self.key_len,
            _ => MAGIC.len() + self.proto_len + DIGEST_LEN + self.key_len,
        }
    }

    pub fn push(&mut self, data: Vec<u8>) {
        self.proto_len += record_len(data.len());
        self.datas.push(data);
    }

    /// The Kinesis record's data: the lone event as it is, or the aggregate.
    pub fn finish(mut self, partition_key: &str) -> Vec<u8> {
        if self.datas.len() == 1 {
            return self.datas.pop().unwrap_or_default();
        }
        let message = AggregatedRecord {
            partition_key_table: vec![partition_key.to_owned()],
            explicit_hash_key_table: Vec::new(),
            records: self
                .datas
                .into_iter()
                .map(|data| Record {
                    partition_key_index: 0,
                    explicit_hash_key_index: None,
                    data,
                    tags: Vec::new(),
                })
                .collect(),
        };
        let mut out = Vec::with_capacity(MAGIC.len() + self.proto_len + DIGEST_LEN);
        out.extend_from_slice(&MAGIC);
        // Encoding into a Vec only fails for want of capacity, which a Vec does not lack.
        let _ = message.encode(&mut out);
        let digest = Md5::digest(&out[MAGIC.len()..]);
        out.extend_from_slice(&digest);
        out
    }
}

/// The events inside a Kinesis record's data: one (a plain record), or each of an aggregate's.
/// For tests and tools; consumers use the KPL's deaggregation libraries.
pub fn deaggregate(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let Some(body) = data.strip_prefix(&MAGIC) else {
        return Ok(vec![data.to_vec()]);
    };
    if body.len() < DIGEST_LEN {
        return Err("aggregated record shorter than its digest".into());
    }
    let (proto, digest) = body.split_at(body.len() - DIGEST_LEN);
    if Md5::digest(proto).as_slice() != digest {
        return Err("aggregated record's MD5 does not match".into());
    }
    let message = AggregatedRecord::decode(proto).map_err(|e| e.to_string())?;
    Ok(message.records.into_iter().map(|r| r.data).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_event_is_a_plain_record() {
        let b = Builder::new("k", b"{\"a\":1}".to_vec());
        assert_eq!(b.size(), 8);
        assert_eq!(b.finish("k"), b"{\"a\":1}");
    }

    #[test]
    fn sizes_are_exact_and_round_trip() {
        let key = "a-partition-key";
        for sizes in [
            vec![1usize, 2],
            vec![0, 0, 0],
            vec![127, 128, 129],
            vec![300, 16_384, 20_000],
        ] {
            let datas: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| vec![b'a' + i as u8; *n])
                .collect();
            let mut b = Builder::new(key, datas[0].clone());
            for d in &datas[1..] {
                let predicted = b.size_with(d.len());
                b.push(d.clone());
                assert_eq!(b.size(), predicted);
            }
            let size = b.size();
            let bytes = b.finish(key);
            assert_eq!(bytes.len() + key.len(), size, "{sizes:?}");
            assert_eq!(&bytes[..4], &MAGIC);
            assert_eq!(deaggregate(&bytes).unwrap(), datas);
            let message = AggregatedRecord::decode(&bytes[4..bytes.len() - DIGEST_LEN]).unwrap();
            assert_eq!(message.partition_key_table, vec![key.to_owned()]);
        }
    }

    #[test]
    fn a_zero_index_is_written_as_proto2_requires() {
        let mut b = Builder::new("k", b"x".to_vec());
        b.push(b"y".to_vec());
        let bytes = b.finish("k");
        // records[0]: tag 3 (0x1A), length 5, then partition_key_index = 0 (08 00), data.
        let at = bytes.windows(2).position(|w| w == [0x1A, 5]).unwrap();
        assert_eq!(&bytes[at + 2..at + 7], &[0x08, 0x00, 0x1A, 0x01, b'x']);
    }

    #[test]
    fn a_corrupt_aggregate_is_refused() {
        let mut b = Builder::new("k", b"x".to_vec());
        b.push(b"y".to_vec());
        let mut bytes = b.finish("k");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(deaggregate(&bytes).is_err());
        assert_eq!(deaggregate(b"plain").unwrap(), vec![b"plain".to_vec()]);
    }
}
