//! Flow control: how fast a watcher sends when Kinesis pushes back, and how much it may hold.
//!
//! Three mechanisms, each acting where its signal comes from:
//! - **Per record** ([`record_delay`]): a record Kinesis rejected (a throttled shard, a hot key)
//!   waits its own delay, by its own attempt count with jitter, before it is eligible again;
//!   every other key keeps flowing (the scheduler parks only that key).
//! - **Per stream** ([`SendLimit`]): a call that failed whole (an error answer, a timeout), or
//!   of two or more records none of which Kinesis accepted, says the stream as a whole is
//!   struggling (a lone record rejected on its own speaks only for its key). The number of calls in flight then
//!   follows AIMD, as Vector's adaptive request concurrency: halved on such a call, raised by
//!   one on a call with every record acknowledged, between 1 and `max_in_flight`; after two such
//!   calls in a row no call starts until a stream backoff has passed.
//! - **Memory** ([`ByteBudget`]): bytes read and not yet acknowledged, bounded per watcher and
//!   for the whole process; the reader waits for room before it hands an event on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// How long a rejected record waits before it may be sent again: full jitter over a ceiling
/// that doubles with the record's own failed attempts (`attempts` >= 1), from `initial` up to
/// `max`. `jitter` is a draw from [0, 1); one draw serves every record of a call, so records
/// rejected together become ready together and share their next call.
pub fn record_delay(attempts: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    let ceiling = initial
        .saturating_mul(1u32 << doublings)
        .min(max.max(initial));
    ceiling.mul_f64(jitter.clamp(0.0, 1.0))
}

/// The number of PutRecords calls a watcher may have in flight, adapted to how the stream
/// answers (additive increase, multiplicative decrease).
#[derive(Debug, Clone)]
pub struct SendLimit {
    current: usize,
    max: usize,
}

impl SendLimit {
    /// Starts at `max` (a healthy stream is the common case).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self { current: max, max }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// A call with every record acknowledged.
    pub fn on_success(&mut self) {
        self.current = (self.current + 1).min(self.max);
    }

    /// A call that failed whole or had nothing acknowledged.
    pub fn on_stream_failure(&mut self) {
        self.current = (self.current / 2).max(1);
    }
}

/// Bytes held by events read and not yet acknowledged, against a limit. The reader reserves
/// an event's size before handing it on and waits while the budget is spent; the reservation
/// is released when the event is acknowledged or dropped. An event larger than the whole
/// budget is let through when nothing else is held, so a large document never wedges a
/// watcher.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
    freed: Notify,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `n` bytes if they fit (or nothing is held); never waits.
    pub fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used.saturating_add(n) <= self.limit).then(|| used + n)
            })
            .is_ok()
    }

    /// Waits until `n` bytes fit, then takes them.
    pub async fn reserve(&self, n: usize) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release between the check and the wait
            // still wakes this reserver.
            freed.as_mut().enable();
            if self.try_reserve(n) {
                return;
            }
            freed.await;
        }
    }

    pub fn release(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
        self.freed.notify_waiters();
    }
}

/// Bytes of one event taken from a watcher's budget and the process's (and a copy's share,
/// for a snapshot record), given back on drop.
#[derive(Debug)]
pub struct Reservation {
    bytes: usize,
    budgets: [Option<Arc<ByteBudget>>; 3],
}

impl Reservation {
    /// Waits for room in the watcher's budget, then in the process's, and takes `bytes` from
    /// both. The watcher's comes first so that a watcher at its own bound does not hold
    /// process-wide bytes it cannot use.
    pub async fn take(watcher: &Arc<ByteBudget>, process: &Arc<ByteBudget>, bytes: usize) -> Self {
        watcher.reserve(bytes).await;
        // Built before the second wait, so a reader cancelled there gives the first back.
        let mut taken = Self {
            bytes,
            budgets: [Some(watcher.clone()), None, None],
        };
        process.reserve(bytes).await;
        taken.budgets[1] = Some(process.clone());
        taken
    }

    /// As [`Self::take`], after room in `copy`, a copy's share of the watcher's budget: its
    /// documents never hold more than that share, and the change stream keeps the rest.
    pub async fn take_copy(
        copy: &Arc<ByteBudget>,
        watcher: &Arc<ByteBudget>,
        process: &Arc<ByteBudget>,
        bytes: usize,
    ) -> Self {
        copy.reserve(bytes).await;
        // Held from here on, so that a reader cancelled in the waits below gives it back.
        let mut share = Self {
            bytes,
            budgets: [Some(copy.clone()), None, None],
        };
        let mut taken = Self::take(watcher, process, bytes).await;
        // Moved: `share` is dropped holding nothing, `taken` gives the copy's bytes back.
        taken.budgets[2] = share.budgets[0].take();
        taken
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for budget in self.budgets.iter().flatten() {
            budget.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_delays_double_by_attempt_up_to_the_cap() {
        let ms = Duration::from_millis;
        let ceilings: Vec<_> = (1..=6)
            .map(|a| record_delay(a, ms(100), ms(500), 1.0).as_millis())
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 500, 500, 500]);
        assert_eq!(record_delay(3, ms(100), ms(500), 0.5), ms(200));
        assert_eq!(record_delay(1, ms(100), ms(500), 0.0), Duration::ZERO);
        assert_eq!(record_delay(u32::MAX, ms(100), ms(500), 1.0), ms(500));
    }

    #[test]
    fn default_record_delays_grow_from_25_to_100_ms() {
        // The README's figures: a record's ceiling doubles from 25 ms and stops at 100 ms,
        // separate from the stream backoff's 100 ms start.
        let b = crate::spec::BatchSettings::default();
        let ceilings: Vec<_> = (1..=5)
            .map(|a| {
                record_delay(
                    a,
                    b.record_retry_initial_backoff,
                    b.record_retry_max_backoff,
                    1.0,
                )
                .as_millis()
            })
            .collect();
        assert_eq!(ceilings, vec![25, 50, 100, 100, 100]);
        assert_eq!(b.retry_initial_backoff, Duration::from_millis(100));
    }

    #[test]
    fn send_limit_is_aimd_between_one_and_max() {
        let mut l = SendLimit::new(8);
        assert_eq!(l.current(), 8);
        l.on_stream_failure();
        assert_eq!(l.current(), 4);
        for _ in 0..5 {
            l.on_stream_failure();
        }
        assert_eq!(l.current(), 1);
        l.on_success();
        l.on_success();
        assert_eq!(l.current(), 3);
        for _ in 0..20 {
            l.on_success();
        }
        assert_eq!(l.current(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_waits_for_a_release() {
        let watcher = ByteBudget::new(100);
        let process = ByteBudget::new(1000);
        let first = Reservation::take(&watcher, &process, 80).await;
        assert_eq!((watcher.used(), process.used()), (80, 80));
        let waiting = tokio::spawn({
            let (w, p) = (watcher.clone(), process.clone());
            async move { Reservation::take(&w, &p, 30).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "30 more bytes do not fit in 100");
        drop(first);
        let second = waiting.await.unwrap();
        assert_eq!((watcher.used(), process.used()), (30, 30));
        drop(second);
        assert_eq!((watcher.used(), process.used()), (0, 0));
    }

    #[tokio::test]
    async fn a_copy_takes_its_share_and_gives_it_back() {
        let (copy, watcher, process) = (
            ByteBudget::new(50),
            ByteBudget::new(100),
            ByteBudget::new(100),
        );
        let taken = Reservation::take_copy(&copy, &watcher, &process, 40).await;
        assert_eq!((copy.used(), watcher.used(), process.used()), (40, 40, 40));
        assert!(!copy.try_reserve(20), "the copy's share is spent");
        assert!(watcher.try_reserve(20), "the stream still has the rest");
        watcher.release(20);
        drop(taken);
        assert_eq!((copy.used(), watcher.used(), process.used()), (0, 0, 0));
    }

    #[tokio::test]
    async fn an_event_larger_than_the_budget_passes_alone() {
        let watcher = ByteBudget::new(100);
        let process = ByteBudget::new(100);
        let big = Reservation::take(&watcher, &process, 500).await;
        assert_eq!(big.bytes(), 500);
        assert!(!watcher.try_reserve(1));
        drop(big);
        assert!(watcher.try_reserve(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_process_budget_is_shared_by_watchers() {
        let process = ByteBudget::new(100);
        let (a, b) = (ByteBudget::new(100), ByteBudget::new(100));
        let held = Reservation::take(&a, &process, 90).await;
        let other = tokio::spawn({
            let (b, p) = (b.clone(), process.clone());
            async move { Reservation::take(&b, &p, 20).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !other.is_finished(),
            "the process budget is spent by another watcher"
        );
        assert_eq!(b.used(), 20, "the watcher's own budget is taken first");
        drop(held);
        drop(other.await.unwrap());
        assert_eq!(process.used(), 0);
    }
}
