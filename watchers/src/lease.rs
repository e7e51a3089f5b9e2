//! Leases (`leases: {table, ttl}`): which replica owns each watcher, in a DynamoDB table that
//! every replica of one config shares, after the Kinesis Client Library's lease table.
//!
//! One item per watcher, keyed `watcher`: `owner` (a replica id, `""` once released), `epoch`
//! (raised by every change of owner) and `counter` (raised by every heartbeat). One item per
//! live replica, keyed `replica#<id>`, whose `counter` its heartbeat raises too, so that a
//! replica owning nothing is still counted when the watchers are shared out.
//!
//! Expiry needs no synchronised clocks: as in KCL, an observer notes when it last saw an
//! item's counter change, on its own monotonic clock, and takes an item whose counter stood
//! still for a whole ttl as expired ([`Observer`]). Every change is a conditional write that
//! names what the writer last saw (`epoch` and `counter`), so of two replicas claiming one
//! lease only one wins, and a renewal by a replica that lost its lease is refused.
//!
//! Checkpoint writes are fenced by the epoch ([`Fence`], used by `checkpoint.rs`): the owner's
//! first write after a claim stores its epoch with the checkpoint, and every later write
//! requires it, so a replica that lost its lease (a GC pause, a partition) can never move the
//! checkpoint again.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, KeyType};
use tokio::time::Instant;

/// The replica holding a lease, and the lease's epoch when it got it. Checkpoint writes carry
/// it as their fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub owner: String,
    pub epoch: u64,
}

/// Why a lease operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The item was not as the writer last saw it: another replica claimed it, or (for a
    /// renewal) the lease is no longer this replica's.
    #[error("lease of `{watcher}` changed under us (another replica holds or claimed it)")]
    Lost { watcher: String },
    #[error("lease table `{table}`: {operation} failed: {message}")]
    Table {
        table: String,
        operation: &'static str,
        message: String,
    },
}

/// One item of the lease table as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseItem {
    /// A watcher's name, or `replica#<id>`.
    pub key: String,
    /// `""` when released (or for a replica's item).
    pub owner: String,
    pub epoch: u64,
    pub counter: u64,
}

/// The prefix of a replica's own item.
pub const REPLICA_PREFIX: &str = "replica#";

#[derive(Clone)]
pub struct LeaseStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl LeaseStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Checks that the table exists and is keyed by `watcher` (S) alone.
    pub async fn verify_table(&self) -> Result<(), LeaseError> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| self.error("DescribeTable", e))?;
        let keys = out.table().map(|t| t.key_schema()).unwrap_or_default();
        if keys.len() == 1
            && keys[0].attribute_name() == "watcher"
            && keys[0].key_type() == &KeyType::Hash
        {
            Ok(())
        } else {
            Err(LeaseError::Table {
                table: self.table.clone(),
                operation: "DescribeTable",
                message: "the key schema must be exactly one hash key named `watcher` (S)".into(),
            })
        }
    }

    /// Every item, read consistently.
    pub async fn scan(&self) -> Result<Vec<LeaseItem>, LeaseError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| self.error("Scan", e))?;
            items.extend(out.items().iter().filter_map(parse_item));
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(items),
            }
        }
    }

    /// Takes `watcher` for `owner` if its item is still as `seen` (`None`: no item yet).
    /// Returns the fence of the new ownership.
    pub async fn claim(
        &self,
        watcher: &str,
        owner: &str,
        seen: Option<&LeaseItem>,
    ) -> Result<Fence, LeaseError> {
        let epoch = seen.map_or(1, |s| s.epoch + 1);
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("watcher", AttributeValue::S(watcher.to_owned()))
            .update_expression("SET #owner = :me, epoch = :epoch, #counter = :counter")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#counter", "counter")
            .expression_attribute_values(":me", AttributeValue::S(owner.to_owned()))
            .expression_attribute_values(":epoch", num(epoch));
        let req = match seen {
            None => req
                .condition_expression("attribute_not_exists(watcher)")
                .expression_attribute_values(":counter", num(0)),
            Some(s) => req
                .condition_expression("epoch = :seen_epoch AND #counter = :seen_counter")
                .expression_attribute_values(":seen_epoch", num(s.epoch))
                .expression_attribute_values(":seen_counter", num(s.counter))
                .expression_attribute_values(":counter", num(s.counter + 1)),
        };
        self.conditional(req.send().await, watcher, "UpdateItem")?;
        Ok(Fence {
            owner: owner.to_owned(),
            epoch,
        })
    }

    /// Heartbeat of a held lease: refused once it is not `fence`'s any more.
    pub async fn renew(&self, watcher: &str, fence: &Fence) -> Result<(), LeaseError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("watcher", AttributeValue::S(watcher.to_owned()))
            .update_expression("ADD #counter :one")
            .condition_expression("#owner = :me AND epoch = :epoch")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#counter", "counter")
            .expression_attribute_values(":me", AttributeValue::S(fence.owner.clone()))
            .expression_attribute_values(":epoch", num(fence.epoch))
            .expression_attribute_values(":one", num(1))
            .send()
            .await;
        self.conditional(out, watcher, "UpdateItem")
    }

    /// Gives a held lease up (its owner becomes `""`), so another replica takes it at once.
    pub async fn release(&self, watcher: &str, fence: &Fence) -> Result<(), LeaseError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("watcher", AttributeValue::S(watcher.to_owned()))
            .update_expression("SET #owner = :none ADD #counter :one")
            .condition_expression("#owner = :me AND epoch = :epoch")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#counter", "counter")
            .expression_attribute_values(":me", AttributeValue::S(fence.owner.clone()))
            .expression_attribute_values(":none", AttributeValue::S(String::new()))
            .expression_attribute_values(":epoch", num(fence.epoch))
            .expression_attribute_values(":one", num(1))
            .send()
            .await;
        self.conditional(out, watcher, "UpdateItem")
    }

    /// This replica's own heartbeat (creates its item on the first beat).
    pub async fn beat(&self, replica: &str) -> Result<(), LeaseError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(
                "watcher",
                AttributeValue::S(format!("{REPLICA_PREFIX}{replica}")),
            )
            .update_expression("ADD #counter :one")
            .expression_attribute_names("#counter", "counter")
            .expression_attribute_values(":one", num(1))
            .send()
            .await
            .map_err(|e| self.error("UpdateItem", e))?;
        Ok(())
    }

    /// Removes this replica's item (a clean shutdown), so the others share the watchers among
    /// themselves without waiting a ttl.
    pub async fn leave(&self, replica: &str) -> Result<(), LeaseError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key(
                "watcher",
                AttributeValue::S(format!("{REPLICA_PREFIX}{replica}")),
            )
            .send()
            .await
            .map_err(|e| self.error("DeleteItem", e))?;
        Ok(())
    }

    fn conditional<T, E, R>(
        &self,
        out: Result<T, SdkError<E, R>>,
        watcher: &str,
        operation: &'static str,
    ) -> Result<(), LeaseError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        match out {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e))
                if e.err().code() == Some("ConditionalCheckFailedException") =>
            {
                Err(LeaseError::Lost {
                    watcher: watcher.to_owned(),
                })
            }
            Err(e) => Err(self.error(operation, e)),
        }
    }

    fn error<E, R>(&self, operation: &'static str, err: SdkError<E, R>) -> LeaseError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        LeaseError::Table {
            table: self.table.clone(),
            operation,
            message: crate::error::aws_message(&err),
        }
    }
}

fn num(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn parse_item(item: &HashMap<String, AttributeValue>) -> Option<LeaseItem> {
    let n = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(LeaseItem {
        key: item.get("watcher")?.as_s().ok()?.clone(),
        owner: item
            .get("owner")
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default(),
        epoch: n("epoch"),
        counter: n("counter"),
    })
}

/// When this replica last saw each item's counter change, on its own monotonic clock.
#[derive(Debug, Default)]
pub struct Observer {
    seen: HashMap<String, (u64, u64, Instant)>,
}

impl Observer {
    /// Notes a scan's items at `now`; items gone from the table are forgotten.
    pub fn observe(&mut self, items: &[LeaseItem], now: Instant) {
        let mut seen = HashMap::with_capacity(items.len());
        for item in items {
            let since = match self.seen.get(&item.key) {
                Some(&(epoch, counter, since))
                    if epoch == item.epoch && counter == item.counter =>
                {
                    since
                }
                _ => now,
            };
            seen.insert(item.key.clone(), (item.epoch, item.counter, since));
        }
        self.seen = seen;
    }

    /// Whether `item` has not changed for `ttl` (a replica that stopped beating, an owner that
    /// stopped renewing). A replica that just started has seen nothing stand still yet, so it
    /// takes nothing held by another as expired before a ttl of its own has passed.
    pub fn expired(&self, item: &LeaseItem, ttl: Duration, now: Instant) -> bool {
        self.seen
            .get(&item.key)
            .is_some_and(|&(_, _, since)| now.duration_since(since) >= ttl)
    }
}

/// How many watchers one replica may own: an even share, rounded up.
pub fn share(watchers: usize, replicas: usize) -> usize {
    watchers.div_ceil(replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, owner: &str, epoch: u64, counter: u64) -> LeaseItem {
        LeaseItem {
            key: key.into(),
            owner: owner.into(),
            epoch,
            counter,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_expires_only_after_standing_still_a_whole_ttl() {
        let ttl = Duration::from_secs(15);
        let mut o = Observer::default();
        let t0 = Instant::now();
        let a = item("a", "r1", 1, 5);
        o.observe(std::slice::from_ref(&a), t0);
        assert!(!o.expired(&a, ttl, t0 + Duration::from_secs(14)));
        // The counter moved at 10 s: the clock starts again.
        let a2 = item("a", "r1", 1, 6);
        o.observe(std::slice::from_ref(&a2), t0 + Duration::from_secs(10));
        assert!(!o.expired(&a2, ttl, t0 + Duration::from_secs(24)));
        assert!(o.expired(&a2, ttl, t0 + Duration::from_secs(25)));
        // A new epoch with the same counter is a change too.
        let a3 = item("a", "r2", 2, 6);
        o.observe(std::slice::from_ref(&a3), t0 + Duration::from_secs(30));
        assert!(!o.expired(&a3, ttl, t0 + Duration::from_secs(44)));
        // Never observed: not expired.
        assert!(!o.expired(&item("b", "r1", 1, 1), ttl, t0 + Duration::from_secs(99)));
    }

    #[test]
    fn shares_round_up() {
        assert_eq!(share(10, 3), 4);
        assert_eq!(share(10, 1), 10);
        assert_eq!(share(2, 3), 1);
        assert_eq!(share(0, 2), 0);
        assert_eq!(share(5, 0), 5);
    }

    #[test]
    fn items_parse() {
        let mut m = HashMap::new();
        m.insert("watcher".to_owned(), AttributeValue::S("orders".into()));
        m.insert("owner".to_owned(), AttributeValue::S("r1".into()));
        m.insert("epoch".to_owned(), num(3));
        m.insert("counter".to_owned(), num(17));
        assert_eq!(parse_item(&m), Some(item("orders", "r1", 3, 17)));
        m.remove("owner");
        m.remove("epoch");
        assert_eq!(parse_item(&m), Some(item("orders", "", 0, 17)));
        m.remove("watcher");
        assert_eq!(parse_item(&m), None);
    }
}
