//! Several replicas of one config (`leases: {table, ttl}`), as processes against SecantusDB and
//! moto: they share the watchers evenly, a kill -9 moves a replica's watchers to the others
//! within ttl + 10 s without loss, SIGTERM hands them over in seconds without duplicates, a
//! joining replica takes its share, and a replica that lost its lease while frozen (SIGSTOP,
//! as a long GC pause) is fenced: it never moves a checkpoint again and stops the watcher.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use bson::{doc, Document};
use support::*;

struct Cluster {
    mongo: Mongo,
    moto: Moto,
    aws: Aws,
    checkpoints: String,
    leases: String,
    streams: Vec<String>,
    watchers: usize,
    ttl: &'static str,
}

impl Cluster {
    async fn new(watchers: usize, ttl: &'static str) -> Self {
        let mongo = Mongo::start();
        let moto = Moto::start();
        let aws = Aws::new(&moto).await;
        let (checkpoints, leases) = (unique("cps"), unique("leases"));
        aws.create_checkpoint_table(&checkpoints).await;
        // The lease table has the checkpoint table's key schema (hash key `watcher`).
        aws.create_checkpoint_table(&leases).await;
        let mut streams = Vec::new();
        for _ in 0..watchers {
            let s = unique("s");
            aws.create_stream(&s, 1).await;
            streams.push(s);
        }
        Self {
            mongo,
            moto,
            aws,
            checkpoints,
            leases,
            streams,
            watchers,
            ttl,
        }
    }

    fn config(&self, port: u16) -> String {
        let watchers: Vec<String> = (0..self.watchers)
            .map(|i| {
                watcher_yaml(
                    &format!("w{i}"),
                    "db",
                    &format!("c{i}"),
                    &self.streams[i],
                    "",
                )
            })
            .collect();
        config_yaml(&self.mongo, Some(&self.checkpoints), &watchers)
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
            .replacen(
                "http:",
                &format!(
                    "leases:\n  table: {}\n  ttl: {}\nhttp:",
                    self.leases, self.ttl
                ),
                1,
            )
    }

    /// A replica with its own directory and API port, ready (`/readyz` 200).
    fn replica(&self) -> Replica {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let w = Watcher::start_with_env(
            dir.path(),
            &self.config(port),
            &self.moto.endpoint(),
            &[
                ("RUST_LOG", "info,watchers=debug"),
                ("MONGO_WATCHER_API_TOKEN", TOKEN),
            ],
        );
        wait_http(port, "/readyz", WAIT, |r| r.status == 200);
        Replica { w, port, _dir: dir }
    }

    /// Owner of each watcher's lease, by replica id (empty when released).
    async fn owners(&self) -> HashMap<String, String> {
        let out = self
            .aws
            .dynamodb
            .scan()
            .table_name(&self.leases)
            .consistent_read(true)
            .send()
            .await
            .expect("scan leases");
        out.items()
            .iter()
            .filter_map(|i| {
                let key = i.get("watcher")?.as_s().ok()?;
                if key.starts_with("replica#") {
                    return None;
                }
                let owner = i.get("owner").and_then(|o| o.as_s().ok()).cloned();
                Some((key.clone(), owner.unwrap_or_default()))
            })
            .collect()
    }

    /// Waits until every watcher is owned and `check` holds for the owners' counts; returns
    /// the owners and how long it took.
    async fn wait_owned(
        &self,
        replicas: &[&Replica],
        timeout: Duration,
        check: impl Fn(&HashMap<String, usize>) -> bool,
    ) -> (HashMap<String, String>, Duration) {
        let started = Instant::now();
        loop {
            let owners = self.owners().await;
            let mut counts: HashMap<String, usize> = HashMap::new();
            for o in owners.values().filter(|o| !o.is_empty()) {
                *counts.entry(o.clone()).or_default() += 1;
            }
            let all = owners.len() == self.watchers && owners.values().all(|o| !o.is_empty());
            if all && check(&counts) {
                return (owners, started.elapsed());
            }
            if started.elapsed() >= timeout {
                for r in replicas {
                    let lines: Vec<String> =
                        r.w.logs()
                            .lines()
                            .filter(|l| l.contains("leases") || l.contains("lease"))
                            .map(str::to_owned)
                            .collect();
                    eprintln!("--- replica on port {}:\n{}", r.port, lines.join("\n"));
                }
                panic!("owners not as expected after {timeout:?}: {owners:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn coll(&self, i: usize) -> mongodb::Collection<Document> {
        self.mongo
            .client()
            .await
            .database("db")
            .collection::<Document>(&format!("c{i}"))
    }

    /// Updates documents `0..KEYS` of every collection round-robin, `v` counting up from
    /// `after + 1`, until stopped; returns the last `v` (update `v` went to key `v % KEYS`).
    fn write(&self, colls: Vec<mongodb::Collection<Document>>, after: i64) -> Writer {
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut v = after;
            while !s.is_cancelled() {
                v += 1;
                for c in &colls {
                    c.update_one(doc! {"_id": v % KEYS}, doc! {"$set": {"v": v}})
                        .upsert(true)
                        .await
                        .expect("update");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            v
        });
        Writer { stop, task }
    }

    async fn all_colls(&self) -> Vec<mongodb::Collection<Document>> {
        let mut v = Vec::new();
        for i in 0..self.watchers {
            v.push(self.coll(i).await);
        }
        v
    }

    /// Waits until every update `from..=to` is in every stream; returns each stream's records.
    async fn delivered(&self, from: i64, to: i64) -> Vec<Vec<Record>> {
        let mut out = Vec::new();
        for s in &self.streams {
            let records = self
                .aws
                .wait_for_records(s, Duration::from_secs(90), |r| {
                    let seen: HashSet<i64> = r.iter().filter_map(version).collect();
                    (from..=to).all(|v| seen.contains(&v))
                })
                .await;
            out.push(records);
        }
        out
    }
}

/// Documents each collection's writer updates.
const KEYS: i64 = 3;

const TOKEN: &str = "lease-test-token";

/// Updates `vs` one by one, as the writer would.
async fn update(coll: &mongodb::Collection<Document>, vs: std::ops::RangeInclusive<i64>) {
    for v in vs {
        coll.update_one(doc! {"_id": v % KEYS}, doc! {"$set": {"v": v}})
            .upsert(true)
            .await
            .expect("update");
    }
}

/// The `v` an update event set.
fn version(r: &Record) -> Option<i64> {
    r.json["updateDescription"]["updatedFields"]["v"]
        .as_i64()
        .or_else(|| r.json["fullDocument"]["v"].as_i64())
}

/// Per key, the versions in order of first arrival are increasing: a replay after a
/// failover may repeat versions, but none overtakes an earlier one of its key.
fn per_key_order(records: &[Record]) -> Result<(), String> {
    let mut firsts: HashMap<i64, Vec<i64>> = HashMap::new();
    for r in records {
        let (Some(k), Some(v)) = (r.id(), version(r)) else {
            continue;
        };
        let list = firsts.entry(k).or_default();
        if !list.contains(&v) {
            list.push(v);
        }
    }
    for (k, vs) in &firsts {
        if !vs.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("key {k}: versions out of order: {vs:?}"));
        }
    }
    Ok(())
}

struct Writer {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<i64>,
}

impl Writer {
    async fn finish(self) -> i64 {
        self.stop.cancel();
        self.task.await.expect("writer")
    }
}

struct Replica {
    w: Watcher,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn watchers(&self) -> Vec<serde_json::Value> {
        request(self.port, "GET", "/watchers", None, "").json()["watchers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// This replica's id, as `/watchers` shows it on a watcher it runs.
    fn id(&self) -> Option<String> {
        self.watchers()
            .iter()
            .find(|w| w["state"] == "running")
            .and_then(|w| w["owner"].as_str().map(str::to_owned))
    }

    /// [`Self::id`] once a watcher runs here: a claimed lease is in the table a moment before
    /// its watcher has fenced its checkpoint and opened its stream.
    fn wait_id(&self, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(id) = self.id() {
                return id;
            }
            assert!(Instant::now() < deadline, "{what}: no watcher running here");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Three replicas share six watchers two each; a kill -9 of one moves its two to the others
/// within ttl + 10 s (ttl + ttl/3 expected; the slack is for a loaded test machine), under
/// steady writes, and nothing is lost (first arrivals in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_watchers_and_take_over_after_kill9() {
    let c = Cluster::new(6, "3s").await;
    let mut a = c.replica();
    let b = c.replica();
    let d = c.replica();
    let (owners, _) = c
        .wait_owned(&[&a, &b, &d], Duration::from_secs(30), |n| {
            n.len() == 3 && n.values().all(|&k| k == 2)
        })
        .await;
    let writer = c.write(c.all_colls().await, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a_id = a.wait_id("replica a runs a watcher");
    let killed: Vec<String> = owners
        .iter()
        .filter(|(_, o)| **o == a_id)
        .map(|(w, _)| w.clone())
        .collect();
    assert_eq!(killed.len(), 2);
    a.w.kill9();
    let (after, took) = c
        .wait_owned(&[&b, &d], Duration::from_secs(3 + 10), |n| {
            !n.contains_key(&a_id) && n.len() == 2 && n.values().all(|&k| k == 3)
        })
        .await;
    eprintln!("kill -9: {killed:?} taken over in {took:?}: {after:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = writer.finish().await;
    assert!(n > 50, "the load was too light: {n}");
    for records in c.delivered(1, n).await {
        per_key_order(&records).unwrap();
    }
    // The survivors show the watchers they took as running, the others as standby with an
    // owner, and both are ready.
    for r in [&b, &d] {
        let ws = r.watchers();
        assert_eq!(ws.len(), 6);
        assert_eq!(ws.iter().filter(|w| w["state"] == "running").count(), 3);
        assert!(ws
            .iter()
            .filter(|w| w["state"] == "standby")
            .all(|w| w["owner"].is_string()));
        assert_eq!(request(r.port, "GET", "/readyz", None, "").status, 200);
    }
}

/// SIGTERM: the replica flushes, writes its final checkpoints and releases its leases; the
/// other takes them within a few seconds (well inside the 10 s ttl), each event exactly once.
/// Then a replica that joins takes its share from the one that holds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_at_once_and_a_joining_replica_takes_its_share() {
    let c = Cluster::new(4, "10s").await;
    let mut a = c.replica();
    let b = c.replica();
    c.wait_owned(&[&a, &b], Duration::from_secs(30), |n| {
        n.len() == 2 && n.values().all(|&k| k == 2)
    })
    .await;
    let writer = c.write(c.all_colls().await, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b_id = b.wait_id("b runs a watcher");
    let (code, _) = a.w.terminate();
    assert_eq!(code, Some(0), "a clean shutdown");
    let (_, took) = c
        .wait_owned(&[&b], Duration::from_secs(8), |n| n.get(&b_id) == Some(&4))
        .await;
    eprintln!("SIGTERM hand-over took {took:?}");
    assert!(took < Duration::from_secs(8));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = writer.finish().await;
    for records in c.delivered(1, n).await {
        per_key_order(&records).unwrap();
        let mut vs: Vec<i64> = records.iter().filter_map(version).collect();
        vs.sort();
        assert_eq!(vs, (1..=n).collect::<Vec<_>>(), "each update exactly once");
    }
    // A replica joins: b is over its share (4 of 4) and hands two over at safe points.
    let e = c.replica();
    let (owners, took) = c
        .wait_owned(&[&b, &e], Duration::from_secs(40), |n| {
            n.len() == 2 && n.values().all(|&k| k == 2)
        })
        .await;
    eprintln!("joining replica took its share in {took:?}: {owners:?}");
    let writer = c.write(c.all_colls().await, n);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = writer.finish().await;
    for records in c.delivered(1, m).await {
        per_key_order(&records).unwrap();
    }
    assert!(e.watchers().iter().any(|w| w["state"] == "running"));
    // A command sent to a standby replica answers 409 naming the owner.
    let standby = e
        .watchers()
        .into_iter()
        .find(|w| w["state"] == "standby")
        .expect("e has a standby watcher");
    let name = standby["name"].as_str().unwrap();
    let owner = standby["owner"].as_str().unwrap();
    let r = request(
        e.port,
        "POST",
        &format!("/watchers/{name}/pause"),
        Some(TOKEN),
        "",
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains(owner), "409 names the owner: {}", r.body);
    drop(b);
}

/// A replica frozen past its ttl (SIGSTOP) loses its lease: the other claims it and fences
/// the checkpoint, and when the frozen one wakes it writes nothing more (the item keeps the
/// new owner's fence) and stops the watcher; nothing written meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_is_fenced_and_stops() {
    let c = Cluster::new(1, "3s").await;
    let a = c.replica();
    c.wait_owned(&[&a], Duration::from_secs(30), |n| n.len() == 1)
        .await;
    let a_id = a.wait_id("a runs w0");
    let b = c.replica();
    let coll = c.coll(0).await;
    update(&coll, 1..=20).await;
    c.delivered(1, 20).await;
    let pid = a.w.pid().expect("a running").to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success());
    };
    signal("-STOP");
    let (owners, took) = c
        .wait_owned(&[&a, &b], Duration::from_secs(3 + 8), |n| {
            n.len() == 1 && !n.contains_key(&a_id)
        })
        .await;
    let b_id = owners["w0"].clone();
    eprintln!("frozen owner replaced in {took:?} by {b_id}");
    update(&coll, 21..=40).await;
    c.delivered(1, 40).await;
    let fenced = c
        .aws
        .checkpoint(&c.checkpoints, "w0")
        .await
        .expect("checkpoint");
    assert_eq!(
        fenced.get("lease_owner").and_then(|v| v.as_s().ok()),
        Some(&b_id),
        "the new owner fenced the checkpoint"
    );
    let fenced_revision = revision(&fenced);
    signal("-CONT");
    // The woken replica finds its lease gone at its next renewal and stops the watcher.
    a.w.wait_for_log("stopping the watcher here", Duration::from_secs(10));
    wait_http(a.port, "/watchers/w0", Duration::from_secs(10), |r| {
        r.json()["state"] == "standby" && r.json()["owner"].as_str() == Some(b_id.as_str())
    });
    update(&coll, 41..=60).await;
    let records = c.delivered(1, 60).await;
    per_key_order(&records[0]).unwrap();
    let item = c
        .aws
        .checkpoint(&c.checkpoints, "w0")
        .await
        .expect("checkpoint");
    assert_eq!(
        item.get("lease_owner").and_then(|v| v.as_s().ok()),
        Some(&b_id),
        "only the new owner wrote since"
    );
    assert!(revision(&item) >= fenced_revision);
    let epoch = |i: &HashMap<String, AttributeValue>| {
        i.get("lease_epoch")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<u64>().ok())
    };
    assert_eq!(epoch(&item), epoch(&fenced));
    drop(b);
}

/// The fence itself, against moto's DynamoDB: once a checkpoint was written under epoch 2, a
/// write under epoch 1 is refused even when it names the current revision (what a stale
/// owner that read the item after the new owner's write would send), while the owner of
/// epoch 2 goes on writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_an_older_epoch_is_refused() {
    use watchers::checkpoint::{Checkpoint, CheckpointStore};
    use watchers::lease::Fence;
    use watchers::WatcherError;
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let store = CheckpointStore::new(aws.dynamodb.clone(), &table);
    let at = |n: u32| Checkpoint {
        token: Some(bson::Bson::Document(doc! {"_data": format!("{n:04}")})),
        cluster_time: None,
        paused: false,
        namespace: Some("db.c".into()),
    };
    let (old, new) = (
        Fence {
            owner: "a".into(),
            epoch: 1,
        },
        Fence {
            owner: "b".into(),
            epoch: 2,
        },
    );
    assert_eq!(store.save("w", None, &at(1), Some(&old)).await.unwrap(), 1);
    assert_eq!(
        store.save("w", Some(1), &at(2), Some(&new)).await.unwrap(),
        2
    );
    let stale = store.save("w", Some(2), &at(3), Some(&old)).await;
    assert!(
        matches!(stale, Err(WatcherError::CheckpointConflict { .. })),
        "a write under the older epoch went through: {stale:?}"
    );
    // The same epoch under another owner is no better.
    let forged = Fence {
        owner: "c".into(),
        epoch: 2,
    };
    assert!(store
        .save("w", Some(2), &at(3), Some(&forged))
        .await
        .is_err());
    assert_eq!(
        store.save("w", Some(2), &at(3), Some(&new)).await.unwrap(),
        3
    );
    let item = aws.checkpoint(&table, "w").await.unwrap();
    assert_eq!(item["lease_owner"].as_s().unwrap(), "b");
    assert_eq!(item["lease_epoch"].as_n().unwrap(), "2");
}
