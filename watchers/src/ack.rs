//! The ack frontier: which position may be checkpointed.
//!
//! Every event read gets a sequence number and is entered here in read order with its resume
//! position. Acks mark entries; the front is popped while it is acknowledged, and the position
//! of the last popped entry is the frontier: it and every event before it are in Kinesis.
//! Only the frontier is ever checkpointed. An idle marker (the post-batch resume token of an
//! empty read) is entered already acknowledged, so a quiet collection's frontier keeps moving
//! once everything read before it is acknowledged.

use std::collections::VecDeque;
use std::sync::Arc;

use bson::{Bson, RawBson, RawBsonRef, RawDocument, Timestamp};

/// A resume token, opaque, as the server sent it.
///
/// An event's token is held as the raw BSON it arrived in: one buffer to build, clone and
/// free, where a `Bson::Document` is a map, a key and a string (~10x the cost per event, see
/// `examples/record_cost.rs`). It is decoded only where it is stored or shown
/// ([`Token::to_bson`]), a few times a second at most. Tokens from elsewhere (a stored
/// checkpoint, a post-batch token, a rewind) are already decoded and stay so.
#[derive(Debug, Clone)]
pub enum Token {
    /// Read from an event; [`Token::from_raw`] has checked that it decodes.
    Raw(RawBson),
    Decoded(Bson),
}

impl Token {
    /// The token at `value` (an event's `_id`), checked to decode (every element of every
    /// nested document read, as decoding reads them), without decoding it.
    pub fn from_raw(value: RawBsonRef<'_>) -> Result<Self, bson::error::Error> {
        check(value)?;
        Ok(Self::Raw(RawBson::from(value)))
    }

    /// The token decoded.
    pub fn to_bson(&self) -> Bson {
        match self {
            Self::Decoded(b) => b.clone(),
            // `from_raw` read every element that decoding reads, so this cannot fail; were it
            // to, the token would be unusable either way (the server refuses it on resume),
            // and the log says why.
            Self::Raw(raw) => Bson::try_from(raw.clone()).unwrap_or_else(|e| {
                tracing::error!(error = %e, "a resume token read from an event does not decode");
                Bson::Null
            }),
        }
    }
}

/// Reads every element of `value`'s documents and arrays, as `Bson::try_from` does.
fn check(value: RawBsonRef<'_>) -> Result<(), bson::error::Error> {
    let document = |d: &RawDocument| -> Result<(), bson::error::Error> {
        for element in d {
            check(element?.1)?;
        }
        Ok(())
    };
    match value {
        RawBsonRef::Document(d) => document(d),
        RawBsonRef::Array(a) => {
            for item in a {
                check(item?)?;
            }
            Ok(())
        }
        RawBsonRef::JavaScriptCodeWithScope(c) => document(c.scope),
        _ => Ok(()),
    }
}

impl From<Bson> for Token {
    fn from(token: Bson) -> Self {
        Self::Decoded(token)
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Raw(a), Self::Raw(b)) => a == b,
            (Self::Decoded(a), Self::Decoded(b)) => a == b,
            _ => self.to_bson() == other.to_bson(),
        }
    }
}

/// Where a change stream can be reopened.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// The resume token, opaque, as the server sent it.
    pub token: Token,
    /// Cluster time of the event, when known (idle markers have none).
    pub cluster_time: Option<Timestamp>,
    /// While a copy runs: its progress as of this entry (per range, the last `_id` read up
    /// to here). A copied document's entry carries the newest stream position read before
    /// it as `token` (a copy never moves the stream's position), so the frontier says how far
    /// both are acknowledged. Shared: entries between two copied documents carry one value.
    pub snapshot: Option<Arc<crate::checkpoint::SnapshotProgress>>,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    position: Position,
    acked: bool,
    marker: bool,
}

#[derive(Debug, Default)]
pub struct AckTracker {
    entries: VecDeque<Entry>,
    next_seq: u64,
    frontier: Option<Position>,
    /// Cluster time of the newest event at or behind the frontier.
    frontier_event_time: Option<Timestamp>,
    /// Events (not markers) the frontier has passed, ever.
    events_passed: u64,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters a newly read event; returns its sequence number.
    pub fn push_event(&mut self, position: Position) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(Entry {
            seq,
            position,
            acked: false,
            marker: false,
        });
        seq
    }

    /// Enters a position reached without an event (post-batch resume token), with a running
    /// copy's progress (see [`Self::push_marker`]).
    pub fn push_idle(
        &mut self,
        token: Bson,
        snapshot: Option<Arc<crate::checkpoint::SnapshotProgress>>,
    ) {
        self.push_marker(Position {
            token: token.into(),
            cluster_time: None,
            snapshot,
        });
    }

    /// Enters a position with nothing to acknowledge: it becomes the frontier once everything
    /// before it is acknowledged. Consecutive markers coalesce into the newest.
    pub fn push_marker(&mut self, position: Position) {
        if self.entries.is_empty() {
            self.frontier = Some(position);
            return;
        }
        if let Some(back) = self.entries.back_mut() {
            if back.marker {
                back.position = position;
                return;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(Entry {
            seq,
            position,
            acked: true,
            marker: true,
        });
    }

    /// Marks `seq` acknowledged (or skipped on purpose) and advances the frontier.
    pub fn ack(&mut self, seq: u64) {
        let Some(front) = self.entries.front() else {
            return;
        };
        let Some(index) = seq.checked_sub(front.seq) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(index as usize) {
            debug_assert_eq!(entry.seq, seq);
            entry.acked = true;
        }
        while self.entries.front().is_some_and(|e| e.acked) {
            if let Some(entry) = self.entries.pop_front() {
                if !entry.marker {
                    self.frontier_event_time = entry.position.cluster_time;
                    self.events_passed += 1;
                }
                self.frontier = Some(entry.position);
            }
        }
    }

    /// How many events (not idle or other markers) the frontier has passed: unchanged while
    /// the frontier moves only with post-batch tokens.
    pub fn events_passed(&self) -> u64 {
        self.events_passed
    }

    /// The newest position such that it and everything read before it are acknowledged.
    pub fn frontier(&self) -> Option<&Position> {
        self.frontier.as_ref()
    }

    /// The newest position entered (the frontier when nothing is outstanding).
    pub fn newest(&self) -> Option<&Position> {
        self.entries
            .back()
            .map(|e| &e.position)
            .or(self.frontier.as_ref())
    }

    /// Cluster time of the newest acknowledged event behind the frontier.
    pub fn frontier_event_time(&self) -> Option<Timestamp> {
        self.frontier_event_time
    }

    /// Whether `seq` and everything read before it are behind the frontier.
    pub fn passed(&self, seq: u64) -> bool {
        seq < self.next_seq && self.entries.front().is_none_or(|e| e.seq > seq)
    }

    /// Entries read and not yet behind the frontier.
    pub fn outstanding(&self) -> usize {
        self.entries.len()
    }

    /// The position of event `seq` while it is not yet behind the frontier (searched from the
    /// newest: the caller asks about the event it just entered).
    pub fn position(&self, seq: u64) -> Option<&Position> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.seq == seq)
            .map(|e| &e.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn pos(n: i32) -> Position {
        Position {
            token: Bson::Document(doc! {"_data": n}).into(),
            cluster_time: Some(Timestamp {
                time: n as u32,
                increment: 1,
            }),
            snapshot: None,
        }
    }

    #[test]
    fn raw_tokens_decode_as_they_were_and_a_malformed_one_is_refused() {
        let token = doc! {"_data": "8263A1", "nested": {"a": [1, "two", {"b": null}]}};
        let raw = bson::RawDocumentBuf::try_from(&token).unwrap();
        let read = Token::from_raw(RawBsonRef::Document(&raw)).unwrap();
        assert_eq!(read.to_bson(), Bson::Document(token.clone()));
        assert_eq!(read, Token::from(Bson::Document(token)));
        // Invalid UTF-8 deep inside: decoding would fail, so reading it does.
        let mut bytes = raw.into_bytes();
        let at = bytes.windows(3).position(|w| w == b"two").unwrap();
        bytes[at] = 0xff;
        let broken = bson::RawDocumentBuf::from_bytes(bytes).unwrap();
        assert!(Token::from_raw(RawBsonRef::Document(&broken)).is_err());
    }

    fn token_of(t: &AckTracker) -> Option<Bson> {
        t.frontier().map(|p| p.token.to_bson())
    }

    #[test]
    fn frontier_waits_for_the_oldest_unacked() {
        let mut t = AckTracker::new();
        let a = t.push_event(pos(1));
        let b = t.push_event(pos(2));
        let c = t.push_event(pos(3));
        t.ack(c);
        t.ack(b);
        assert_eq!(token_of(&t), None, "frontier moved past unacked event 1");
        t.ack(a);
        assert_eq!(token_of(&t), Some(pos(3).token.to_bson()));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn idle_marker_moves_only_after_earlier_events() {
        let mut t = AckTracker::new();
        t.push_idle(Bson::String("idle0".into()), None);
        assert_eq!(token_of(&t), Some(Bson::String("idle0".into())));
        let a = t.push_event(pos(1));
        t.push_idle(Bson::String("idle1".into()), None);
        t.push_idle(Bson::String("idle2".into()), None);
        assert_eq!(t.outstanding(), 2, "consecutive markers coalesce");
        assert_eq!(token_of(&t), Some(Bson::String("idle0".into())));
        t.ack(a);
        assert_eq!(token_of(&t), Some(Bson::String("idle2".into())));
        assert_eq!(t.frontier_event_time(), pos(1).cluster_time);
    }

    #[test]
    fn stale_and_unknown_acks_are_ignored() {
        let mut t = AckTracker::new();
        let a = t.push_event(pos(1));
        t.ack(a);
        t.ack(a);
        t.ack(99);
        assert_eq!(token_of(&t), Some(pos(1).token.to_bson()));
    }
}
