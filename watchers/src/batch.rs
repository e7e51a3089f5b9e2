//! The per-key scheduler: which pending records go into the next PutRecords call.
//!
//! Kinesis does not promise order inside one PutRecords call, and a call can accept record
//! i+1 while rejecting record i. So a call never holds two unacknowledged records of one
//! partition key: the scheduler hands out, in read order, the first pending record of each key
//! that has nothing in flight, and the next record of that key only after the earlier one is
//! acknowledged. A failed record goes back to the head of its key's queue and is sent again
//! before anything after it. Calls that are in flight at the same time never share a key.
//!
//! A record sent again waits its own delay first (`retry` names the instant it may go): until
//! then its key is *delayed*, neither ready nor in flight, and every other key keeps moving.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

/// AWS limits of one PutRecords call. Its bytes depend on the stream's record limit
/// ([`crate::stream_limits`]); this is the call limit of a stream at the default.
pub const MAX_BATCH_RECORDS: usize = 500;
pub const MAX_BATCH_BYTES: usize = crate::stream_limits::DEFAULT_REQUEST_BYTES;

/// One record waiting for Kinesis: one event, or (aggregation) several events of one key
/// packed into one Kinesis record, acknowledged or rejected together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    /// Position in read order; also the record's entry in the ack tracker.
    pub seq: u64,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Events packed behind `seq` into this record, in read order (empty unless aggregated).
    pub packed: Vec<u64>,
}

impl PendingRecord {
    pub fn new(seq: u64, partition_key: String, data: Vec<u8>) -> Self {
        Self {
            seq,
            partition_key,
            data,
            attempts: 0,
            packed: Vec::new(),
        }
    }

    /// Bytes this record counts against the call and record limits.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    /// Events this record carries.
    pub fn events(&self) -> usize {
        1 + self.packed.len()
    }

    /// Sequence numbers of the events this record carries, in read order.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.seq).chain(self.packed.iter().copied())
    }
}

#[derive(Debug, Default)]
struct KeyQueue {
    queue: VecDeque<PendingRecord>,
    in_flight: bool,
    /// The head is a rejected record that may not be sent before this instant.
    not_before: Option<Instant>,
}

/// Records read but not yet acknowledged, grouped by partition key.
#[derive(Debug, Default)]
pub struct Scheduler {
    /// Each key is held once, shared with `ready` and `delayed` (a key is cloned into the
    /// scheduler once per run of its records, not twice per record). foldhash (hashbrown's
    /// default, seeded per process) rather than SipHash: a map of every key in flight is
    /// hashed several times per record.
    keys: hashbrown::HashMap<Arc<str>, KeyQueue>,
    /// Head records whose key has nothing in flight, by read order.
    ready: BTreeMap<u64, Arc<str>>,
    /// Keys whose head waits for its retry delay, by the instant it ends.
    delayed: BTreeMap<(Instant, u64), Arc<str>>,
    ready_bytes: usize,
    queued: usize,
    queued_bytes: usize,
    in_flight: usize,
    in_flight_bytes: usize,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records held (queued or in flight).
    pub fn len(&self) -> usize {
        self.queued + self.in_flight
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of records waiting to be sent (not counting in-flight ones).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Bytes of every record held, queued or in flight.
    pub fn held_bytes(&self) -> usize {
        self.queued_bytes + self.in_flight_bytes
    }

    /// Records waiting for their retry delay.
    pub fn delayed_len(&self) -> usize {
        self.delayed.len()
    }

    /// When the next delayed record may be sent again.
    pub fn next_retry_at(&self) -> Option<Instant> {
        self.delayed.keys().next().map(|(at, _)| *at)
    }

    /// Makes every record whose retry delay has ended by `now` ready again; returns how many.
    pub fn promote(&mut self, now: Instant) -> usize {
        let mut promoted = 0;
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), key) = entry.remove_entry();
            if let Some(state) = self.keys.get_mut(&*key) {
                state.not_before = None;
                if let Some(head) = state.queue.front() {
                    self.ready_bytes += head.size();
                }
            }
            self.ready.insert(seq, key);
            promoted += 1;
        }
        promoted
    }

    /// Records that could go into a call right now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Whether the ready records fill a whole call.
    pub fn ready_fills_batch(&self, max_records: usize, max_bytes: usize) -> bool {
        self.ready.len() >= max_records || self.ready_bytes >= max_bytes
    }

    /// Adds a newly read record behind every earlier record of its key.
    pub fn push(&mut self, record: PendingRecord) {
        self.queued += 1;
        self.queued_bytes += record.size();
        let (key, entry) = self
            .keys
            .raw_entry_mut()
            .from_key(record.partition_key.as_str())
            .or_insert_with(|| {
                (
                    Arc::from(record.partition_key.as_str()),
                    KeyQueue::default(),
                )
            });
        if entry.queue.is_empty() && !entry.in_flight {
            self.ready_bytes += record.size();
            self.ready.insert(record.seq, key.clone());
        }
        entry.queue.push_back(record);
    }

    /// Takes, in read order, the first pending record of each idle key, up to the limits.
    /// Their keys are in flight until [`Self::ack`] or [`Self::retry`] returns them.
    pub fn next_batch(&mut self, max_records: usize, max_bytes: usize) -> Vec<PendingRecord> {
        self.next_batch_packed(max_records, max_bytes, None)
    }

    /// [`Self::next_batch`], and with `pack` (the stream's record limit) each key's head is
    /// packed with the events queued behind it, in order, into one KPL aggregated record of
    /// at most that many bytes ([`crate::aggregate`]). The key has nothing else in flight, so
    /// the aggregate is the only unacknowledged record of its key: accepted or rejected whole,
    /// it cannot reorder the key. An aggregate that is rejected goes back as it is.
    pub fn next_batch_packed(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        pack: Option<usize>,
    ) -> Vec<PendingRecord> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < max_records {
            let Some((&seq, key)) = self.ready.iter().next() else {
                break;
            };
            let Some(state) = self.keys.get_mut(&**key) else {
                break;
            };
            let Some(size) = state.queue.front().map(PendingRecord::size) else {
                break;
            };
            if !batch.is_empty() && bytes + size > max_bytes {
                break;
            }
            self.ready.remove(&seq);
            let Some(mut record) = state.queue.pop_front() else {
                break;
            };
            state.in_flight = true;
            self.ready_bytes -= size;
            self.queued -= record.events();
            self.queued_bytes -= size;
            if let Some(limit) = pack {
                let room = limit.min(max_bytes.saturating_sub(bytes)).max(size);
                let (taken, taken_bytes) = pack_behind(&mut record, &mut state.queue, room);
                self.queued -= taken;
                self.queued_bytes -= taken_bytes;
            }
            let size = record.size();
            bytes += size;
            self.in_flight += record.events();
            self.in_flight_bytes += size;
            batch.push(record);
        }
        batch
    }

    /// Kinesis accepted `record`: its key's next record becomes ready.
    pub fn ack(&mut self, record: &PendingRecord) {
        self.release(&record.partition_key, record.events(), record.size());
    }

    /// Kinesis rejected `record`: it goes back to the head of its key's queue, and becomes
    /// ready again at `not_before` (at once when that is not in the future).
    pub fn retry(&mut self, mut record: PendingRecord, not_before: Option<Instant>) {
        record.attempts += 1;
        let (events, size) = (record.events(), record.size());
        let key = record.partition_key.clone();
        let state = self
            .keys
            .raw_entry_mut()
            .from_key(key.as_str())
            .or_insert_with(|| (Arc::from(key.as_str()), KeyQueue::default()))
            .1;
        state.queue.push_front(record);
        state.not_before = not_before;
        self.queued += events;
        self.queued_bytes += size;
        self.release(&key, events, size);
    }

    fn release(&mut self, key: &str, events: usize, size: usize) {
        self.in_flight = self.in_flight.saturating_sub(events);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(size);
        let Some((shared, state)) = self.keys.get_key_value_mut(key) else {
            return;
        };
        state.in_flight = false;
        match state.queue.front() {
            Some(head) => match state.not_before {
                Some(at) => {
                    self.delayed.insert((at, head.seq), shared.clone());
                }
                None => {
                    self.ready_bytes += head.size();
                    self.ready.insert(head.seq, shared.clone());
                }
            },
            None => {
                self.keys.remove(key);
            }
        }
    }
}

/// Packs the events queued behind `head` (same key, read order) into it while the aggregate
/// stays within `room` bytes; returns how many events and bytes left the queue. A head that
/// is already an aggregate (a retry) goes as it is.
fn pack_behind(
    head: &mut PendingRecord,
    queue: &mut VecDeque<PendingRecord>,
    room: usize,
) -> (usize, usize) {
    if !head.packed.is_empty() || queue.front().is_none_or(|next| !next.packed.is_empty()) {
        return (0, 0);
    }
    let mut builder =
        crate::aggregate::Builder::new(&head.partition_key, std::mem::take(&mut head.data));
    let (mut taken, mut taken_bytes) = (0, 0);
    while let Some(next) = queue.front() {
        if !next.packed.is_empty() || builder.size_with(next.data.len()) > room {
            break;
        }
        let Some(next) = queue.pop_front() else {
            break;
        };
        taken += 1;
        taken_bytes += next.size();
        head.packed.push(next.seq);
        builder.push(next.data);
    }
    head.data = builder.finish(&head.partition_key);
    (taken, taken_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(seq: u64, key: &str) -> PendingRecord {
        PendingRecord::new(seq, key.to_owned(), vec![b'x'; 10])
    }

    fn seqs(batch: &[PendingRecord]) -> Vec<u64> {
        batch.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn one_record_per_key_per_call_in_read_order() {
        let mut s = Scheduler::new();
        for (seq, key) in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "b")] {
            s.push(rec(seq, key));
        }
        let first = s.next_batch(500, MAX_BATCH_BYTES);
        assert_eq!(seqs(&first), vec![1, 2, 4]);
        // Nothing else is ready while a, b and c are in flight.
        assert!(s.next_batch(500, MAX_BATCH_BYTES).is_empty());
        for r in &first {
            s.ack(r);
        }
        assert_eq!(seqs(&s.next_batch(500, MAX_BATCH_BYTES)), vec![3, 5]);
    }

    #[test]
    fn failed_record_is_resent_before_later_records_of_its_key() {
        let mut s = Scheduler::new();
        s.push(rec(1, "a"));
        s.push(rec(2, "a"));
        s.push(rec(3, "b"));
        let batch = s.next_batch(500, MAX_BATCH_BYTES);
        assert_eq!(seqs(&batch), vec![1, 3]);
        let mut it = batch.into_iter();
        let a1 = it.next().unwrap();
        let b3 = it.next().unwrap();
        s.ack(&b3);
        s.retry(a1, None);
        let again = s.next_batch(500, MAX_BATCH_BYTES);
        assert_eq!(seqs(&again), vec![1]);
        assert_eq!(again[0].attempts, 1);
        s.ack(&again[0]);
        assert_eq!(seqs(&s.next_batch(500, MAX_BATCH_BYTES)), vec![2]);
    }

    #[test]
    fn limits_cut_the_batch() {
        let mut s = Scheduler::new();
        for seq in 0..10 {
            s.push(rec(seq, &format!("k{seq}")));
        }
        assert_eq!(s.next_batch(4, MAX_BATCH_BYTES).len(), 4);
        // each record is 10 + 2 bytes
        assert_eq!(s.next_batch(500, 30).len(), 2);
        assert!(s.ready_fills_batch(4, usize::MAX));
        assert_eq!(s.len(), 10);
        assert_eq!(s.ready_len(), 4);
    }

    #[test]
    fn an_oversized_first_record_still_goes_alone() {
        let mut s = Scheduler::new();
        s.push(rec(1, "a"));
        s.push(rec(2, "b"));
        assert_eq!(seqs(&s.next_batch(500, 5)), vec![1]);
    }

    #[test]
    fn accounting_returns_to_zero() {
        let mut s = Scheduler::new();
        for seq in 0..100 {
            s.push(rec(seq, ["a", "b", "c"][seq as usize % 3]));
        }
        while !s.is_empty() {
            let batch = s.next_batch(2, MAX_BATCH_BYTES);
            assert!(!batch.is_empty());
            let keys: std::collections::HashSet<_> =
                batch.iter().map(|r| r.partition_key.clone()).collect();
            assert_eq!(keys.len(), batch.len(), "a key twice in one call");
            for (i, r) in batch.into_iter().enumerate() {
                if i == 0 && r.attempts == 0 {
                    s.retry(r, None);
                } else {
                    s.ack(&r);
                }
            }
        }
        assert_eq!(s.queued_bytes(), 0);
        assert_eq!(s.held_bytes(), 0);
        assert_eq!(s.ready_len(), 0);
        assert!(s.keys.is_empty());
    }

    fn data(seq: u64) -> Vec<u8> {
        format!("event-{seq}").into_bytes()
    }

    fn event(seq: u64, key: &str) -> PendingRecord {
        PendingRecord::new(seq, key.to_owned(), data(seq))
    }

    fn unpacked(r: &PendingRecord) -> Vec<Vec<u8>> {
        crate::aggregate::deaggregate(&r.data).unwrap()
    }

    #[test]
    fn packing_takes_a_keys_queue_in_order_and_leaves_lone_events_plain() {
        let mut s = Scheduler::new();
        for (seq, key) in [(1, "hot"), (2, "hot"), (3, "b"), (4, "hot"), (5, "hot")] {
            s.push(event(seq, key));
        }
        let batch = s.next_batch_packed(500, MAX_BATCH_BYTES, Some(1 << 20));
        assert_eq!(seqs(&batch), vec![1, 3]);
        assert_eq!(batch[0].seqs().collect::<Vec<_>>(), vec![1, 2, 4, 5]);
        assert_eq!(
            unpacked(&batch[0]),
            vec![data(1), data(2), data(4), data(5)]
        );
        assert_eq!(
            batch[1].data,
            data(3),
            "a lone event goes as a plain record"
        );
        assert_eq!(s.len(), 5);
        // Read after the aggregate left: waits for its ack, then goes.
        s.push(event(6, "hot"));
        assert!(s
            .next_batch_packed(500, MAX_BATCH_BYTES, Some(1 << 20))
            .is_empty());
        for r in &batch {
            s.ack(r);
        }
        assert_eq!(s.len(), 1);
        let next = s.next_batch_packed(500, MAX_BATCH_BYTES, Some(1 << 20));
        assert_eq!(seqs(&next), vec![6]);
        assert_eq!(next[0].data, data(6));
    }

    #[test]
    fn an_aggregate_stays_within_the_record_limit_and_the_call() {
        let mut s = Scheduler::new();
        for seq in 0..100 {
            s.push(event(seq, "hot"));
        }
        let limit = 200;
        let mut order = Vec::new();
        while !s.is_empty() {
            let batch = s.next_batch_packed(500, MAX_BATCH_BYTES, Some(limit));
            assert_eq!(batch.len(), 1);
            let r = &batch[0];
            assert!(r.size() <= limit, "{} > {limit}", r.size());
            assert!(r.events() > 1 || s.is_empty() || r.seq >= 95);
            order.extend(unpacked(r));
            s.ack(r);
        }
        assert_eq!(order, (0..100).map(data).collect::<Vec<_>>());
        // The call's bytes bound the aggregate too.
        for seq in 0..10 {
            s.push(event(seq, "hot"));
        }
        let batch = s.next_batch_packed(500, 60, Some(1 << 20));
        assert!(batch[0].size() <= 60 && batch[0].events() > 1);
    }

    #[test]
    fn a_rejected_aggregate_goes_back_whole_before_later_events() {
        let mut s = Scheduler::new();
        for seq in 1..=3 {
            s.push(event(seq, "hot"));
        }
        let first = s.next_batch_packed(500, MAX_BATCH_BYTES, Some(1 << 20));
        let aggregate = first.into_iter().next().unwrap();
        s.push(event(4, "hot"));
        s.push(event(5, "hot"));
        s.retry(aggregate.clone(), None);
        assert_eq!(s.len(), 5);
        let again = s.next_batch_packed(500, MAX_BATCH_BYTES, Some(1 << 20));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].data, aggregate.data, "resent as it was");
        assert_eq!(again[0].attempts, 1);
        s.ack(&again[0]);
        let rest = s.next_batch_packed(500, MAX_BATCH_BYTES, Some(1 << 20));
        assert_eq!(rest[0].seqs().collect::<Vec<_>>(), vec![4, 5]);
        s.ack(&rest[0]);
        assert_eq!((s.len(), s.held_bytes(), s.queued_bytes()), (0, 0, 0));
    }

    #[test]
    fn a_delayed_record_holds_only_its_own_key() {
        let start = Instant::now();
        let mut s = Scheduler::new();
        s.push(rec(1, "a"));
        s.push(rec(2, "b"));
        let first = s.next_batch(500, MAX_BATCH_BYTES);
        let mut it = first.into_iter();
        let (a1, b2) = (it.next().unwrap(), it.next().unwrap());
        s.ack(&b2);
        s.retry(a1, Some(start + Duration::from_millis(100)));
        s.push(rec(3, "a"));
        s.push(rec(4, "c"));
        // a waits for its delay (and 3 waits behind 1); c goes at once.
        assert_eq!(s.delayed_len(), 1);
        assert_eq!(s.next_retry_at(), Some(start + Duration::from_millis(100)));
        assert_eq!(seqs(&s.next_batch(500, MAX_BATCH_BYTES)), vec![4]);
        s.promote(start + Duration::from_millis(99));
        assert_eq!(s.ready_len(), 0);
        s.promote(start + Duration::from_millis(100));
        assert_eq!(s.delayed_len(), 0);
        let again = s.next_batch(500, MAX_BATCH_BYTES);
        assert_eq!(seqs(&again), vec![1]);
        assert_eq!(again[0].attempts, 1);
        s.ack(&again[0]);
        assert_eq!(seqs(&s.next_batch(500, MAX_BATCH_BYTES)), vec![3]);
        assert_eq!(s.len(), 2, "c and a's 3 are in flight");
    }
}
