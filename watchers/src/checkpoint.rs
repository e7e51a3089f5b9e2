//! Checkpoints in DynamoDB: one item per watcher, written compare-and-set; or, in drop-in
//! mode, the old Python tool's marker item, read and written exactly as that tool did.
//!
//! Item layout (table with one string hash key `watcher`):
//! `watcher` (S), `resume_token` (S, canonical Extended JSON of the opaque token),
//! `cluster_time` (M `{t, i}`, when known), `paused` (BOOL), `revision` (N, +1 per write),
//! `updated_at` (S, RFC 3339). Every write names the revision it replaces, so two processes
//! running the same watcher cannot silently overwrite each other.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, KeyType};
use bson::{Bson, DateTime, Timestamp};

use crate::error::WatcherError;

/// What a checkpoint says.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Where to resume; `None` when only a cluster time is known.
    pub token: Option<Bson>,
    pub cluster_time: Option<Timestamp>,
    pub paused: bool,
}

/// A checkpoint as read, with the revision a following write must name.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub checkpoint: Checkpoint,
    pub revision: u64,
    pub updated_at: Option<String>,
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
}

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
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Checks that the table exists and is keyed by its layout's hash key (S) alone.
    pub async fn verify_table(&self) -> Result<(), WatcherError> {
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
    /// Returns the new revision.
    pub async fn save(
        &self,
        watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
    ) -> Result<u64, WatcherError> {
        if let Layout::LegacyMarker { collection_name } = &self.layout {
            return self.save_legacy(collection_name, checkpoint).await;
        }
        let revision = expected.map_or(1, |r| r + 1);
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("watcher", AttributeValue::S(watcher.to_owned()))
            .item("paused", AttributeValue::Bool(checkpoint.paused))
            .item("revision", AttributeValue::N(revision.to_string()))
            .item(
                "updated_at",
                AttributeValue::S(DateTime::now().try_to_rfc3339_string().unwrap_or_default()),
            );
        if let Some(token) = &checkpoint.token {
            let text = token.clone().into_canonical_extjson().to_string();
            req = req.item("resume_token", AttributeValue::S(text));
        }
        if let Some(ts) = checkpoint.cluster_time {
            req = req.item("cluster_time", timestamp_attr(ts));
        }
        req = match expected {
            None => req.condition_expression("attribute_not_exists(watcher)"),
            Some(r) => req
                .condition_expression("attribute_not_exists(watcher) OR revision = :expected")
                .expression_attribute_values(":expected", AttributeValue::N(r.to_string())),
        };
        match req.send().await {
            Ok(_) => Ok(revision),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                let found = match self.load(watcher).await {
                    Ok(Some(s)) => s.revision.to_string(),
                    Ok(None) => "no item".into(),
                    Err(e) => format!("unknown ({e})"),
                };
                Err(WatcherError::CheckpointConflict {
                    watcher: watcher.to_owned(),
                    expected: expected.unwrap_or(0),
                    found,
                })
            }
            Err(e) => Err(self.error("PutItem", e)),
        }
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
            },
            revision: 0,
            updated_at: None,
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
        }
        WatcherError::Checkpoint {
            table: self.table.clone(),
            operation,
            message: DisplayErrorContext(&err).to_string(),
        }
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
    Ok(Stored {
        checkpoint: Checkpoint {
            token,
            cluster_time,
            paused,
        },
        revision,
        updated_at,
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

    #[test]
    fn items_parse_and_reject_garbage() {
        let mut item = HashMap::from([
            ("watcher".to_owned(), AttributeValue::S("w".into())),
            (
                "resume_token".to_owned(),
                AttributeValue::S(r#"{"_data": "abc"}"#.into()),
            ),
            ("revision".to_owned(), AttributeValue::N("7".into())),
            ("paused".to_owned(), AttributeValue::Bool(true)),
            (
                "cluster_time".to_owned(),
                timestamp_attr(Timestamp {
                    time: 10,
                    increment: 2,
                }),
            ),
        ]);
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
}
