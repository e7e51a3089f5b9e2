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
//! - **Per shard** ([`ShardPacer`]): records a shard throttled
//!   (`ProvisionedThroughputExceededException`, whose message names the shard) go again no
//!   faster than 1.5 times what that shard accepted over the last second, as the KPL holds
//!   each shard to 150 % of its limit. Without it, every record waiting for a shard over its
//!   limit would be re-sent every ~50 ms, several times what the shard takes. Records of other
//!   shards, and first attempts, are not paced.
//! - **Memory** ([`ByteBudget`]): bytes read and not yet acknowledged, bounded per watcher and
//!   for the whole process; the reader waits for room before it hands an event on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

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

/// The own delay of a record its shard throttled (`ProvisionedThroughputExceededException`
/// naming the shard): full jitter under 1, 2, then 4 ms. Such a record is paced by its
/// shard's turns ([`ShardPacer`]); while many wait, the calls in flight bound their re-sends
/// first. Records rejected for any other reason wait `record_retry_initial_backoff` up to
/// `record_retry_max_backoff`.
pub const THROTTLED_RECORD_INITIAL: Duration = Duration::from_millis(1);
pub const THROTTLED_RECORD_MAX: Duration = Duration::from_millis(4);

/// How much faster than a throttled shard's accepted rate its rejected records go again
/// (the KPL's default `RateLimit` is 150 % of a shard's limit).
const PACE_HEADROOM: f64 = 1.5;
/// The accepted rate a throttled shard is paced at when it accepted less (or nothing) over the
/// last second, in records per second: a shard that takes nothing of ours is still tried ~75
/// times a second, so its records do not wait on an estimate of zero.
const PACE_FLOOR: f64 = 50.0;
/// The window a shard's accepted rate is counted over (Kinesis's limits are per second), in
/// slices of `PACE_WINDOW / PACE_SLICES`. A shard seen for less than a window is not paced:
/// its rate is not known yet.
const PACE_WINDOW: Duration = Duration::from_secs(1);
const PACE_SLICES: usize = 10;
/// Turns a shard left unused are kept for this long: records throttled after a quiet spell go
/// at once, up to this much of the shard's paced rate (a token bucket's depth: one second's
/// worth, as Kinesis's own per-shard buckets hold).
const PACE_BURST: Duration = Duration::from_secs(1);
/// Turns are given in ticks of this length: the records of one tick go together, in as few
/// calls as they fill, rather than one call each.
const PACE_TICK: Duration = Duration::from_millis(50);
/// The furthest ahead a rejected record is given a turn. Beyond it, records share the last
/// turn (and are throttled again there), rather than waiting on a rate measured long before.
const PACE_AHEAD: Duration = Duration::from_secs(5);

/// Per-shard pacing of throttled records: each shard's accepted records over the last second,
/// and the next turn for its rejected records, a token bucket filled at the shard's accepted
/// rate times [`PACE_HEADROOM`]. Records that wait for a shard over its limit reach it at
/// about the rate it takes them, rather than each on its own short delay; a shard that
/// rejects at random while taking most of what it gets is rarely held back by it. A shard that
/// throttles while it accepts records is at its limit, not down ([`ShardPacer::accepting`]):
/// such calls do not count against the stream.
#[derive(Debug, Default)]
pub struct ShardPacer {
    shards: HashMap<u64, ShardPace>,
    /// When shards with nothing to pace were last forgotten.
    swept: Option<Instant>,
}

#[derive(Debug)]
struct ShardPace {
    /// Accepted records per slice, the current slice last.
    slices: [u32; PACE_SLICES],
    /// Start of the current slice.
    slice_start: Instant,
    /// When this shard was first seen (paced from one window later).
    first_seen: Instant,
    /// The turn the next throttled records get (at most [`PACE_BURST`] in the past).
    next_turn: Instant,
}

impl ShardPace {
    fn new(now: Instant) -> Self {
        Self {
            slices: [0; PACE_SLICES],
            slice_start: now,
            first_seen: now,
            next_turn: now,
        }
    }

    /// Moves the window forward to `now`, dropping slices older than the window.
    fn advance(&mut self, now: Instant) {
        let slice = PACE_WINDOW / PACE_SLICES as u32;
        let elapsed = now.saturating_duration_since(self.slice_start);
        // Called for every accepted record: most calls stay in the current slice.
        if elapsed < slice {
            return;
        }
        let steps = (elapsed.as_nanos() / slice.as_nanos()) as usize;
        if steps >= PACE_SLICES {
            self.slices = [0; PACE_SLICES];
            self.slice_start = now;
        } else {
            self.slices.rotate_left(steps);
            self.slices[PACE_SLICES - steps..].fill(0);
            self.slice_start += slice * steps as u32;
        }
    }

    /// Records accepted per second over the slices held (the older ones whole, the current one
    /// so far); `None` while the shard has been seen for less than a window.
    fn rate(&self, now: Instant) -> Option<f64> {
        if now.saturating_duration_since(self.first_seen) < PACE_WINDOW {
            return None;
        }
        let count: u32 = self.slices.iter().sum();
        let slice = PACE_WINDOW / PACE_SLICES as u32;
        let held =
            slice * (PACE_SLICES as u32 - 1) + now.saturating_duration_since(self.slice_start);
        Some(f64::from(count) / held.as_secs_f64())
    }
}

impl ShardPacer {
    /// A record of `shard` was accepted at `now`.
    pub fn accepted(&mut self, shard: u64, now: Instant) {
        let pace = self.pace(shard, now);
        pace.slices[PACE_SLICES - 1] = pace.slices[PACE_SLICES - 1].saturating_add(1);
    }

    /// The earliest a record `shard` throttled at `now` may go again: the shard's next turn,
    /// which then moves on by one record's share of the shard's paced rate. Turns to come are
    /// rounded up to the shard's next [`PACE_TICK`], so the records of a tick share a call.
    pub fn throttled(&mut self, shard: u64, now: Instant) -> Instant {
        let pace = self.pace(shard, now);
        let Some(rate) = pace.rate(now) else {
            return now;
        };
        let rate = rate.max(PACE_FLOOR) * PACE_HEADROOM;
        let turn = pace
            .next_turn
            .max(now.checked_sub(PACE_BURST).unwrap_or(now))
            .min(now + PACE_AHEAD);
        pace.next_turn = turn + Duration::from_secs_f64(1.0 / rate);
        if turn <= now {
            return now;
        }
        let since = (turn - pace.first_seen).as_nanos();
        let tick = PACE_TICK.as_nanos();
        let ticks = u32::try_from(since.div_ceil(tick)).unwrap_or(u32::MAX);
        pace.first_seen + PACE_TICK * ticks
    }

    /// Whether `shard` accepted any record in the last window: a shard that throttles while
    /// it takes records is at its limit, not down.
    pub fn accepting(&mut self, shard: u64, now: Instant) -> bool {
        self.pace(shard, now).slices.iter().any(|&n| n > 0)
    }

    /// The shards being paced now (throttled records have taken turns still to come), in
    /// order.
    pub fn paced(&self, now: Instant) -> Vec<u64> {
        let mut shards: Vec<u64> = (self.shards.iter())
            .filter(|(_, p)| p.next_turn > now)
            .map(|(&shard, _)| shard)
            .collect();
        shards.sort_unstable();
        shards
    }

    /// `shard`'s state, its window moved to `now`. At most once a window, shards with nothing
    /// accepted or to pace in the last one are forgotten first (a resharded stream's closed
    /// shards, a shard that calmed down).
    fn pace(&mut self, shard: u64, now: Instant) -> &mut ShardPace {
        if self
            .swept
            .is_none_or(|t| now.saturating_duration_since(t) >= PACE_WINDOW)
        {
            self.swept = Some(now);
            self.shards.retain(|_, pace| {
                pace.advance(now);
                pace.next_turn > now || pace.slices.iter().any(|&n| n > 0)
            });
        }
        let pace = self
            .shards
            .entry(shard)
            .or_insert_with(|| ShardPace::new(now));
        pace.advance(now);
        pace
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

    /// `pacer` has seen `n` records of `shard` accepted, spread over the second before `now`.
    fn accepted_over_a_second(pacer: &mut ShardPacer, shard: u64, n: u32, now: Instant) {
        let start = now - PACE_WINDOW;
        for i in 0..n {
            pacer.accepted(shard, start + PACE_WINDOW * i / n);
        }
    }

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn throttled_records_take_turns_at_one_and_a_half_times_the_accepted_rate() {
        let now = Instant::now() + Duration::from_secs(10);
        let mut pacer = ShardPacer::default();
        accepted_over_a_second(&mut pacer, 1, 1000, now);
        let turns: Vec<Instant> = (0..3000).map(|_| pacer.throttled(1, now)).collect();
        // The bucket's depth (one second of the paced 1,500/s) goes at once...
        let at_once = turns.iter().filter(|&&t| t == now).count();
        assert!((1499..=1501).contains(&at_once), "{at_once}");
        // ...then 1,500 a second, in ticks of 50 ms (75 records each).
        let within_a_second = turns.iter().filter(|&&t| t <= now + PACE_WINDOW).count();
        assert!(
            (2925..=3076).contains(&within_a_second),
            "{within_a_second}"
        );
        let mut distinct: Vec<Instant> = turns.clone();
        distinct.dedup();
        for pair in distinct[1..].windows(2) {
            assert_eq!(pair[1] - pair[0], PACE_TICK);
        }
        let per_tick = turns.iter().filter(|&&t| t == distinct[5]).count();
        assert!((74..=76).contains(&per_tick), "{per_tick}");
        assert_eq!(pacer.paced(now), vec![1]);
        // Another shard is not held back by this one.
        accepted_over_a_second(&mut pacer, 2, 1000, now);
        assert_eq!(pacer.throttled(2, now), now);
        // Turns left unused are kept for the bucket's depth only.
        let later = now + PACE_BURST * 4;
        accepted_over_a_second(&mut pacer, 1, 1000, later);
        let at_once = (0..3000)
            .map(|_| pacer.throttled(1, later))
            .filter(|&t| t == later)
            .count();
        assert!((1400..=1700).contains(&at_once), "{at_once}");
    }

    #[test]
    fn a_shard_is_paced_once_its_rate_is_known() {
        let now = Instant::now() + Duration::from_secs(10);
        let mut pacer = ShardPacer::default();
        // Seen for less than a window: its rate is not known, nothing waits.
        for _ in 0..10_000 {
            assert_eq!(pacer.throttled(5, now), now);
        }
        assert!(pacer.paced(now).is_empty());
        assert!(!pacer.accepting(5, now));
        pacer.accepted(5, now);
        assert!(pacer.accepting(5, now));
    }

    #[test]
    fn a_shard_that_accepts_nothing_is_paced_at_the_floor_and_never_far_ahead() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut pacer = ShardPacer::default();
        accepted_over_a_second(&mut pacer, 7, 100, start);
        // 600 records at 150/s: 150 at once, the last ~3 s on.
        let last = (0..600).map(|_| pacer.throttled(7, start)).last().unwrap();
        assert!(
            (secs(last - start) - 3.0).abs() <= secs(PACE_TICK),
            "{:?}",
            last - start
        );
        // 1.5 s later nothing was accepted in the last second: 75 turns a second.
        let now = start + Duration::from_millis(1500);
        assert!(!pacer.accepting(7, now));
        let turns: Vec<Instant> = (0..76).map(|_| pacer.throttled(7, now)).collect();
        let spread = secs(turns[75] - turns[0]);
        assert!((spread - 1.0).abs() <= secs(PACE_TICK), "{spread}");
        let last = (0..10_000).map(|_| pacer.throttled(7, now)).last().unwrap();
        assert!(last >= now + PACE_AHEAD && last <= now + PACE_AHEAD + PACE_TICK);
    }

    #[test]
    fn a_quiet_shard_is_forgotten() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut pacer = ShardPacer::default();
        accepted_over_a_second(&mut pacer, 3, 100, start);
        assert!(pacer.paced(start + Duration::from_secs(3)).is_empty());
        pacer.accepted(4, start + Duration::from_secs(3));
        assert!(!pacer.shards.contains_key(&3));
        assert!(pacer.shards.contains_key(&4));
    }

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
    fn default_record_delays_grow_from_10_to_40_ms() {
        // The README's figures: a record's ceiling doubles from 10 ms and stops at 40 ms,
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
        assert_eq!(ceilings, vec![10, 20, 40, 40, 40]);
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
