//! The replica's side of `leases`: one coordinator task per process that heartbeats this
//! replica, renews the leases it holds, claims its share of the watchers and gives up what is
//! over its share, and tells each watcher's task whether it may run (a [`Grant`]).
//!
//! Each tick (ttl / 3) it scans the lease table (`watchers::lease`): replicas whose item
//! stood still for a ttl are gone, leases whose counter stood still for a ttl have expired.
//! A replica owns at most `ceil(watchers / live replicas)`; below that it claims free,
//! released or expired leases; above it (a replica joined) it hands watchers over: the task
//! stops at a safe point (flush, final checkpoint) and reports back, and only then is the
//! lease released, so the next owner starts from the final checkpoint.
//!
//! A renewal that is refused means another replica holds the lease: the watcher is stopped
//! at once (its checkpoint writes are fenced anyway). A renewal that cannot reach DynamoDB
//! for a whole ttl is treated the same, since the others will have taken the lease by then.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use watchers::lease::{self, Fence, LeaseError, LeaseItem, LeaseStore, Observer, REPLICA_PREFIX};

/// What a watcher's task may do, as the coordinator last decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Another replica owns the watcher (`Some`), or nobody does yet.
    Standby { owner: Option<String> },
    /// This replica holds the lease: run, with checkpoint writes fenced by it.
    Owned(Fence),
    /// Stop at a safe point and report [`Released`]: the lease goes to another replica.
    HandOver(Fence),
}

/// A task's report that it stopped running a watcher whose lease it held.
#[derive(Debug)]
pub struct Released {
    pub watcher: String,
    pub fence: Fence,
}

/// A watcher task's end of the coordinator.
pub struct LeaseLink {
    pub replica: String,
    pub grants: watch::Receiver<Grant>,
    pub released: mpsc::UnboundedSender<Released>,
}

/// Lease state the coordinator keeps per watcher it holds.
struct Held {
    fence: Fence,
    last_renewed: Instant,
    handing_over: bool,
}

pub struct Coordinator {
    store: LeaseStore,
    replica: String,
    ttl: Duration,
    grants: HashMap<String, watch::Sender<Grant>>,
    released: mpsc::UnboundedReceiver<Released>,
    held: HashMap<String, Held>,
    observer: Observer,
    started: Instant,
}

/// This replica's id: `HOSTNAME` (the pod's name on Kubernetes), the process id and a random
/// suffix, so that a restarted process is a new replica.
pub fn replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".to_owned());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

impl Coordinator {
    /// A coordinator for `watchers` and each watcher's link.
    pub fn new(
        store: LeaseStore,
        replica: String,
        ttl: Duration,
        watchers: &[String],
    ) -> (Self, HashMap<String, LeaseLink>) {
        let (released_tx, released) = mpsc::unbounded_channel();
        let mut grants = HashMap::new();
        let mut links = HashMap::new();
        for name in watchers {
            let (tx, rx) = watch::channel(Grant::Standby { owner: None });
            grants.insert(name.clone(), tx);
            links.insert(
                name.clone(),
                LeaseLink {
                    replica: replica.clone(),
                    grants: rx,
                    released: released_tx.clone(),
                },
            );
        }
        let coordinator = Self {
            store,
            replica,
            ttl,
            grants,
            released,
            held: HashMap::new(),
            observer: Observer::default(),
            started: Instant::now(),
        };
        (coordinator, links)
    }

    /// Runs until `stop` fires (after the watchers drained), then releases what it holds and
    /// removes this replica's item. `shutdown` (the process's) ends claiming at once.
    pub async fn run(mut self, shutdown: CancellationToken, stop: CancellationToken) {
        info!(replica = %self.replica, ttl = ?self.ttl, table = %self.store.table(), "leases: joining");
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.tick(shutdown.is_cancelled()).await,
                Some(r) = self.released.recv() => self.release(r).await,
            }
        }
        while let Ok(r) = self.released.try_recv() {
            self.release(r).await;
        }
        let held: Vec<(String, Fence)> =
            self.held.drain().map(|(name, h)| (name, h.fence)).collect();
        for (name, fence) in held {
            if let Err(e) = self.store.release(&name, &fence).await {
                warn!(watcher = %name, error = %e, "leases: release at shutdown failed; the lease expires after its ttl");
            }
        }
        if let Err(e) = self.store.leave(&self.replica).await {
            warn!(error = %e, "leases: could not remove this replica's item");
        }
        info!(replica = %self.replica, "leases: left");
    }

    async fn release(&mut self, r: Released) {
        let Some(held) = self.held.get(&r.watcher) else {
            return;
        };
        if held.fence != r.fence {
            return;
        }
        self.held.remove(&r.watcher);
        match self.store.release(&r.watcher, &r.fence).await {
            Ok(()) => info!(watcher = %r.watcher, "leases: handed over"),
            Err(e) => {
                warn!(watcher = %r.watcher, error = %e, "leases: release failed; the lease expires after its ttl")
            }
        }
        self.grant(&r.watcher, Grant::Standby { owner: None });
    }

    fn grant(&self, watcher: &str, grant: Grant) {
        if let Some(tx) = self.grants.get(watcher) {
            tx.send_if_modified(|g| {
                if *g == grant {
                    false
                } else {
                    *g = grant;
                    true
                }
            });
        }
    }

    async fn tick(&mut self, draining: bool) {
        let now = Instant::now();
        if let Err(e) = self.store.beat(&self.replica).await {
            warn!(error = %e, "leases: heartbeat failed");
        }
        self.renew(now).await;
        let items = match self.store.scan().await {
            Ok(items) => items,
            Err(e) => {
                warn!(error = %e, "leases: cannot read the lease table");
                return;
            }
        };
        let now = Instant::now();
        self.observer.observe(&items, now);
        let by_key: HashMap<&str, &LeaseItem> = items.iter().map(|i| (i.key.as_str(), i)).collect();
        let mine = format!("{REPLICA_PREFIX}{}", self.replica);
        let replicas = items
            .iter()
            .filter(|i| i.key.starts_with(REPLICA_PREFIX))
            .filter(|i| i.key == mine || !self.observer.expired(i, self.ttl, now))
            .count()
            .max(1);
        let share = lease::share(self.grants.len(), replicas);
        // What others hold, as the API shows it.
        for name in self.grants.keys() {
            if self.held.contains_key(name) {
                continue;
            }
            let owner = by_key
                .get(name.as_str())
                .filter(|i| !i.owner.is_empty() && !self.observer.expired(i, self.ttl, now))
                .map(|i| i.owner.clone());
            self.grant(name, Grant::Standby { owner });
        }
        if draining {
            return;
        }
        let running = self.held.values().filter(|h| !h.handing_over).count();
        if running < share {
            let mut free: Vec<&String> = self
                .grants
                .keys()
                .filter(|name| !self.held.contains_key(*name))
                .filter(|name| match by_key.get(name.as_str()) {
                    None => true,
                    Some(i) => i.owner.is_empty() || self.observer.expired(i, self.ttl, now),
                })
                .collect();
            // Replicas starting together would all go for the same names first.
            free.shuffle(&mut rand::rng());
            let mut claimed = 0;
            for name in free {
                if running + claimed >= share {
                    break;
                }
                let seen = by_key.get(name.as_str()).copied();
                match self.store.claim(name, &self.replica, seen).await {
                    Ok(fence) => {
                        claimed += 1;
                        info!(watcher = %name, epoch = fence.epoch, previous_owner = %seen.map(|s| s.owner.as_str()).unwrap_or(""), "leases: claimed");
                        self.held.insert(
                            name.clone(),
                            Held {
                                fence: fence.clone(),
                                last_renewed: Instant::now(),
                                handing_over: false,
                            },
                        );
                        self.grant(name, Grant::Owned(fence));
                    }
                    Err(LeaseError::Lost { .. }) => {}
                    Err(e) => warn!(watcher = %name, error = %e, "leases: claim failed"),
                }
            }
        } else if running > share && now.duration_since(self.started) >= self.ttl {
            // Over the share (a replica joined): hand the surplus over, one tick at a time.
            let surplus = running - share;
            let mut names: Vec<String> = self
                .held
                .iter()
                .filter(|(_, h)| !h.handing_over)
                .map(|(n, _)| n.clone())
                .collect();
            names.sort();
            for name in names.into_iter().take(surplus) {
                if let Some(h) = self.held.get_mut(&name) {
                    h.handing_over = true;
                    info!(watcher = %name, share, replicas, "leases: over this replica's share; handing over");
                    let fence = h.fence.clone();
                    self.grant(&name, Grant::HandOver(fence));
                }
            }
        }
    }

    /// Renews every held lease; a refused renewal, or none for a whole ttl, stops the watcher.
    async fn renew(&mut self, now: Instant) {
        let names: Vec<String> = self.held.keys().cloned().collect();
        let mut lost = HashSet::new();
        for name in names {
            let Some(held) = self.held.get(&name) else {
                continue;
            };
            let fence = held.fence.clone();
            match self.store.renew(&name, &fence).await {
                Ok(()) => {
                    if let Some(h) = self.held.get_mut(&name) {
                        h.last_renewed = Instant::now();
                    }
                }
                Err(LeaseError::Lost { .. }) => {
                    error!(watcher = %name, epoch = fence.epoch, "leases: lease taken by another replica; stopping the watcher here");
                    lost.insert(name);
                }
                Err(e) if now.duration_since(held.last_renewed) >= self.ttl => {
                    error!(watcher = %name, error = %e, "leases: not renewed for a whole ttl; stopping the watcher here");
                    lost.insert(name);
                }
                Err(e) => warn!(watcher = %name, error = %e, "leases: renewal failed; retrying"),
            }
        }
        for name in lost {
            self.held.remove(&name);
            self.grant(&name, Grant::Standby { owner: None });
        }
    }
}

/// Handles for `main`: stop the coordinator after the drain and wait for its releases.
pub struct Running {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the coordinator; returns the links for the watchers' tasks.
pub fn start(
    store: LeaseStore,
    ttl: Duration,
    watchers: &[String],
    shutdown: &CancellationToken,
) -> (Running, HashMap<String, LeaseLink>, String) {
    let replica = replica_id();
    let (coordinator, links) = Coordinator::new(store, replica.clone(), ttl, watchers);
    let stop = CancellationToken::new();
    let task = tokio::spawn(tracing::Instrument::instrument(
        coordinator.run(shutdown.clone(), stop.clone()),
        tracing::info_span!("leases"),
    ));
    (Running { stop, task }, links, replica)
}
