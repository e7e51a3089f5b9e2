//! Prometheus metrics of the pipelines, registered once per process and recorded once per
//! batch. Gauges that depend on the wall clock (lag, checkpoint age, oplog headroom, state) are
//! set from each watcher's [`Status`](crate::status::Status) when scraped, so they keep moving
//! even when a watcher is stuck.

use prometheus::{
    exponential_buckets, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::status::{State, Status};

#[derive(Clone)]
pub struct Metrics {
    events: IntCounterVec,
    records_put: IntCounterVec,
    records_aggregated: IntCounterVec,
    put_retries: IntCounterVec,
    records_rejected: IntCounterVec,
    calls_failed: IntCounterVec,
    records_skipped: IntCounterVec,
    records_claim_checked: IntCounterVec,
    events_repaired: IntCounterVec,
    events_reassembled: IntCounterVec,
    checkpoint_writes: IntCounterVec,
    put_duration: HistogramVec,
    batch_records: HistogramVec,
    lag: GaugeVec,
    read_lag: GaugeVec,
    committed_lag: GaugeVec,
    oplog_headroom: GaugeVec,
    checkpoint_age: GaugeVec,
    state: IntGaugeVec,
    restarts: IntCounterVec,
    panics: IntCounterVec,
    send_limit: IntGaugeVec,
    pending_records: IntGaugeVec,
    pending_bytes: IntGaugeVec,
    records_delayed: IntGaugeVec,
    shards_paced: IntGaugeVec,
    snapshot_records: IntCounterVec,
    snapshot_progress: GaugeVec,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<HistogramVec> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets),
                    &["watcher"],
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let gauge = |name: &str, help: &str| -> prometheus::Result<GaugeVec> {
            let g = GaugeVec::new(Opts::new(name, help), &["watcher"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let int_gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["watcher"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let state = IntGaugeVec::new(
            Opts::new(
                "mongo_watcher_watcher_state",
                "1 for the watcher's current state, 0 for the others",
            ),
            &["watcher", "state"],
        )?;
        registry.register(Box::new(state.clone()))?;
        Ok(Self {
            events: counter(registry, "mongo_watcher_events_total", "Change events read, by operation type", &["watcher", "operation"])?,
            records_put: counter(registry, "mongo_watcher_records_put_total", "Events acknowledged by Kinesis (each once, also when packed into an aggregated record)", &["watcher"])?,
            records_aggregated: counter(registry, "mongo_watcher_records_aggregated_total", "Events acknowledged inside KPL aggregated records (aggregation: kpl); the rest of records_put went one event per record", &["watcher"])?,
            put_retries: counter(registry, "mongo_watcher_put_retries_total", "Records sent again, by reason (record error code or whole-call failure)", &["watcher", "reason"])?,
            records_rejected: counter(registry, "mongo_watcher_records_rejected_total", "Records Kinesis rejected inside an answered PutRecords call, by error code", &["watcher", "error_code"])?,
            calls_failed: counter(registry, "mongo_watcher_put_calls_failed_total", "PutRecords calls that failed whole (error answer, timeout, connection), by error code", &["watcher", "error_code"])?,
            records_skipped: counter(registry, "mongo_watcher_records_skipped_total", "Events not delivered on purpose, by reason", &["watcher", "reason"])?,
            records_claim_checked: counter(registry, "mongo_watcher_records_claim_checked_total", "Events too large for a record written whole to S3 (on_oversized: s3), a pointer record in their place", &["watcher"])?,
            events_repaired: counter(registry, "mongo_watcher_events_repaired_total", "Events delivered after decoding leniently, by reason (invalid_utf8: invalid sequences replaced with U+FFFD)", &["watcher", "reason"])?,
            events_reassembled: counter(registry, "mongo_watcher_events_reassembled_total", "Change events over 16 MiB that arrived as fragments ($changeStreamSplitLargeEvent) and were joined into one", &["watcher"])?,
            checkpoint_writes: counter(registry, "mongo_watcher_checkpoint_writes_total", "Checkpoints written to DynamoDB", &["watcher"])?,
            put_duration: histogram(
                "mongo_watcher_put_duration_seconds",
                "Duration of one PutRecords call",
                exponential_buckets(0.005, 2.0, 14)?,
            )?,
            batch_records: histogram(
                "mongo_watcher_batch_records",
                "Records per PutRecords call",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0],
            )?,
            lag: gauge("mongo_watcher_lag_seconds", "Wall clock minus the cluster time of the newest acknowledged event; 0 when caught up")?,
            read_lag: gauge("mongo_watcher_read_lag_seconds", "Wall clock minus the cluster time of the newest event read from the change stream; 0 when caught up")?,
            committed_lag: gauge("mongo_watcher_committed_lag_seconds", "Wall clock minus the cluster time of the stored checkpoint (what a restart would replay); 0 when caught up")?,
            oplog_headroom: gauge("mongo_watcher_oplog_headroom_seconds", "Cluster time of the stored checkpoint (now when caught up) minus the oldest entry still in the oplog: how long before a restart can no longer resume; absent when unknown (e.g. local.oplog.rs not readable)")?,
            checkpoint_age: gauge("mongo_watcher_checkpoint_age_seconds", "Seconds since the checkpoint was last written")?,
            state,
            restarts: counter(registry, "mongo_watcher_watcher_restarts_total", "Times the supervisor restarted the watcher after an error (a panic included)", &["watcher"])?,
            panics: counter(registry, "mongo_watcher_watcher_panics_total", "Times a life of the watcher panicked; each is caught and followed by a restart from the checkpoint", &["watcher"])?,
            send_limit: int_gauge("mongo_watcher_send_limit", "PutRecords calls the watcher may have in flight now (adaptive, 1 to max_in_flight)")?,
            pending_records: int_gauge("mongo_watcher_pending_records", "Records read and not yet acknowledged by Kinesis")?,
            pending_bytes: int_gauge("mongo_watcher_pending_bytes", "Bytes of the records read and not yet acknowledged by Kinesis")?,
            records_delayed: int_gauge("mongo_watcher_records_delayed", "Rejected records waiting for their own retry delay")?,
            shards_paced: int_gauge("mongo_watcher_shards_paced", "Shards over their limit whose throttled records go again at 1.5 times what the shard accepted over the last second")?,
            snapshot_records: counter(registry, "mongo_watcher_snapshot_records_total", "Documents of an initial snapshot (snapshot: initial) acknowledged by Kinesis", &["watcher"])?,
            snapshot_progress: gauge("mongo_watcher_snapshot_progress_ratio", "Documents of the initial snapshot acknowledged over the collection's estimated count (1 once done); absent without a snapshot or an estimate")?,
        })
    }

    /// The handles one watcher records into.
    pub fn for_watcher(&self, watcher: &str) -> WatcherMetrics {
        WatcherMetrics {
            watcher: watcher.to_owned(),
            metrics: self.clone(),
            records_put: self.records_put.with_label_values(&[watcher]),
            records_aggregated: self.records_aggregated.with_label_values(&[watcher]),
            checkpoint_writes: self.checkpoint_writes.with_label_values(&[watcher]),
            put_duration: self.put_duration.with_label_values(&[watcher]),
            batch_records: self.batch_records.with_label_values(&[watcher]),
        }
    }

    /// Sets the clock-dependent gauges from a watcher's status (call before encoding).
    pub fn observe_status(&self, watcher: &str, status: &Status, now: bson::DateTime) {
        self.lag
            .with_label_values(&[watcher])
            .set(status.lag_seconds(now));
        self.read_lag
            .with_label_values(&[watcher])
            .set(status.read_lag_seconds(now));
        self.committed_lag
            .with_label_values(&[watcher])
            .set(status.committed_lag_seconds(now));
        match status.oplog_headroom_seconds(now) {
            Some(headroom) => self
                .oplog_headroom
                .with_label_values(&[watcher])
                .set(headroom),
            // Absent rather than a made-up number: an alert on a low value must not fire,
            // and a stale value must not linger after the sample is lost. Absent already
            // when the series was never set, which is not an error.
            None => {
                let _ = self.oplog_headroom.remove_label_values(&[watcher]);
            }
        }
        if let Some(age) = status.checkpoint_age_seconds(now) {
            self.checkpoint_age.with_label_values(&[watcher]).set(age);
        }
        match status.snapshot.as_ref().and_then(|s| s.progress()) {
            Some(ratio) => self
                .snapshot_progress
                .with_label_values(&[watcher])
                .set(ratio),
            None => {
                let _ = self.snapshot_progress.remove_label_values(&[watcher]);
            }
        }
        for s in State::ALL {
            self.state
                .with_label_values(&[watcher, s.as_str()])
                .set(i64::from(s == status.state));
        }
    }

    /// The counters the supervisor of `watcher` records into. Their series are created here, at
    /// 0, so that the first restart or panic is an increase Prometheus can see (`increase()`
    /// cannot tell a series born at 1 from one that was always 1).
    pub fn supervision(&self, watcher: &str) -> SupervisionMetrics {
        SupervisionMetrics {
            restarts: self.restarts.with_label_values(&[watcher]),
            panics: self.panics.with_label_values(&[watcher]),
        }
    }
}

/// What the supervisor counts for one watcher.
#[derive(Clone)]
pub struct SupervisionMetrics {
    /// Restarts after an error, a panic included (`mongo_watcher_watcher_restarts_total`).
    pub restarts: IntCounter,
    /// Lives that panicked (`mongo_watcher_watcher_panics_total`).
    pub panics: IntCounter,
}

#[derive(Clone)]
pub struct WatcherMetrics {
    watcher: String,
    metrics: Metrics,
    pub records_put: IntCounter,
    pub records_aggregated: IntCounter,
    pub checkpoint_writes: IntCounter,
    pub put_duration: Histogram,
    pub batch_records: Histogram,
}

impl WatcherMetrics {
    pub fn event(&self, operation: &str) {
        self.events(operation).inc();
    }

    /// The events counter of one operation type, for a caller that keeps it.
    pub fn events(&self, operation: &str) -> IntCounter {
        self.metrics
            .events
            .with_label_values(&[&self.watcher, operation])
    }

    pub fn retries(&self, reason: &str, n: u64) {
        self.metrics
            .put_retries
            .with_label_values(&[&self.watcher, reason])
            .inc_by(n);
    }

    pub fn records_rejected(&self, error_code: &str, n: u64) {
        self.metrics
            .records_rejected
            .with_label_values(&[&self.watcher, error_code])
            .inc_by(n);
    }

    pub fn call_failed(&self, error_code: &str) {
        self.metrics
            .calls_failed
            .with_label_values(&[&self.watcher, error_code])
            .inc();
    }

    /// The flow-control gauges, set whenever the pipeline publishes its status.
    pub fn flow(
        &self,
        send_limit: usize,
        pending: usize,
        pending_bytes: usize,
        delayed: usize,
        paced_shards: usize,
    ) {
        let set = |g: &IntGaugeVec, v: usize| {
            g.with_label_values(&[&self.watcher])
                .set(i64::try_from(v).unwrap_or(i64::MAX))
        };
        set(&self.metrics.send_limit, send_limit);
        set(&self.metrics.pending_records, pending);
        set(&self.metrics.pending_bytes, pending_bytes);
        set(&self.metrics.records_delayed, delayed);
        set(&self.metrics.shards_paced, paced_shards);
    }

    pub fn repaired(&self, reason: &str) {
        self.metrics
            .events_repaired
            .with_label_values(&[&self.watcher, reason])
            .inc();
    }

    /// An event written to S3 whose pointer record is queued in its place.
    /// Snapshot records acknowledged (`mongo_watcher_snapshot_records_total`).
    pub fn snapshot_records(&self, n: u64) {
        self.metrics
            .snapshot_records
            .with_label_values(&[&self.watcher])
            .inc_by(n);
    }

    pub fn claim_checked(&self) {
        self.metrics
            .records_claim_checked
            .with_label_values(&[&self.watcher])
            .inc();
    }

    /// The counter of events joined from fragments, for the reader task; its series starts at
    /// 0 with the reader, so that the first one is an increase Prometheus can see.
    pub fn events_reassembled(&self) -> IntCounter {
        self.metrics
            .events_reassembled
            .with_label_values(&[&self.watcher])
    }

    pub fn skipped(&self, reason: &str) {
        self.metrics
            .records_skipped
            .with_label_values(&[&self.watcher, reason])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes_every_family() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        let w = m.for_watcher("orders");
        w.event("insert");
        w.records_put.inc_by(3);
        w.retries("ProvisionedThroughputExceededException", 2);
        w.records_rejected("ProvisionedThroughputExceededException", 2);
        w.call_failed("InternalFailure");
        w.flow(3, 10, 1000, 2, 1);
        w.skipped("oversized");
        w.claim_checked();
        w.snapshot_records(2);
        w.repaired("invalid_utf8");
        w.events_reassembled().inc();
        w.checkpoint_writes.inc();
        w.put_duration.observe(0.02);
        w.batch_records.observe(3.0);
        let supervision = m.supervision("orders");
        supervision.restarts.inc();
        let status = Status {
            state: State::Running,
            snapshot: Some(crate::status::SnapshotStatus {
                done: false,
                copied: 25,
                copied_before: 0,
                estimated_total: Some(100),
                started_at: bson::DateTime::now(),
                finished_at: None,
                ranges: 1,
                filter: None,
            }),
            ..Status::default()
        };
        m.observe_status("orders", &status, bson::DateTime::now());
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        for family in [
            "mongo_watcher_events_total{operation=\"insert\",watcher=\"orders\"} 1",
            "mongo_watcher_records_put_total{watcher=\"orders\"} 3",
            "mongo_watcher_put_retries_total",
            "mongo_watcher_records_rejected_total{error_code=\"ProvisionedThroughputExceededException\",watcher=\"orders\"} 2",
            "mongo_watcher_put_calls_failed_total{error_code=\"InternalFailure\",watcher=\"orders\"} 1",
            "mongo_watcher_send_limit{watcher=\"orders\"} 3",
            "mongo_watcher_pending_records{watcher=\"orders\"} 10",
            "mongo_watcher_pending_bytes{watcher=\"orders\"} 1000",
            "mongo_watcher_records_delayed{watcher=\"orders\"} 2",
            "mongo_watcher_shards_paced{watcher=\"orders\"} 1",
            "mongo_watcher_records_skipped_total{reason=\"oversized\",watcher=\"orders\"} 1",
            "mongo_watcher_checkpoint_writes_total{watcher=\"orders\"} 1",
            "mongo_watcher_records_claim_checked_total{watcher=\"orders\"} 1",
            "mongo_watcher_events_repaired_total{reason=\"invalid_utf8\",watcher=\"orders\"} 1",
            "mongo_watcher_events_reassembled_total{watcher=\"orders\"} 1",
            "mongo_watcher_snapshot_records_total{watcher=\"orders\"} 2",
            "mongo_watcher_snapshot_progress_ratio{watcher=\"orders\"} 0.25",
            "mongo_watcher_put_duration_seconds_bucket",
            "mongo_watcher_batch_records_bucket",
            "mongo_watcher_lag_seconds{watcher=\"orders\"} 0",
            "mongo_watcher_read_lag_seconds{watcher=\"orders\"} 0",
            "mongo_watcher_committed_lag_seconds{watcher=\"orders\"} 0",
            "mongo_watcher_watcher_state{state=\"running\",watcher=\"orders\"} 1",
            "mongo_watcher_watcher_state{state=\"failed\",watcher=\"orders\"} 0",
            "# TYPE mongo_watcher_watcher_restarts_total counter",
            "mongo_watcher_watcher_restarts_total{watcher=\"orders\"} 1",
            "# TYPE mongo_watcher_watcher_panics_total counter",
            "mongo_watcher_watcher_panics_total{watcher=\"orders\"} 0",
        ] {
            assert!(text.contains(family), "{family} missing in\n{text}");
        }
    }

    #[test]
    fn oplog_headroom_is_set_when_known_and_removed_when_not() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        let encode = || {
            prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .unwrap()
        };
        let at = |secs: i64| bson::DateTime::from_millis(secs * 1000);
        let mut status = Status {
            checkpoint: Some(crate::status::StoredPosition {
                token: None,
                cluster_time: Some(at(1000)),
            }),
            ..Status::default()
        };
        m.observe_status("orders", &status, at(2000));
        assert!(
            !encode().contains("mongo_watcher_oplog_headroom_seconds{"),
            "absent before the first oplog sample"
        );
        status.oplog_oldest = Some(at(250));
        m.observe_status("orders", &status, at(2000));
        assert!(encode().contains("mongo_watcher_oplog_headroom_seconds{watcher=\"orders\"} 750"));
        status.oplog_oldest = None;
        m.observe_status("orders", &status, at(2000));
        assert!(
            !encode().contains("mongo_watcher_oplog_headroom_seconds{"),
            "removed when the sample is lost"
        );
    }
}
