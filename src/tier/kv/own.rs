//! This process's own publishes, as the watches must treat them.
//!
//! A watch delivers every change, this node's too. A change whose publish is still in flight
//! is the publisher's to record and install (the core installs it with its content); the
//! watch only notes the sequence it saw, so a publish whose acknowledgement is lost but whose
//! message did land is confirmed by its message id. A publish that timed out with nothing
//! seen has an unknown outcome: it may land later (the client sends what it buffered when the
//! connection comes back, a held packet arrives late). If its message shows up, the watch
//! *adopts* it: it is this node's write, so its content goes into the tree and an ephemeral
//! claim joins the keep-alive set. Every other message, own or not, is an ordinary change:
//! the view decides by revision whether it is news. (Skipping every message with this
//! process's id prefix, as before, left a node without its own writes that landed late, or
//! after a reconnect's sweep removed them.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long an unknown outcome, or a publish nobody settled, is remembered. Longer than
/// JetStream's duplicate window (2 minutes), past which a late copy is a new message anyway.
pub const REMEMBER: Duration = Duration::from_secs(600);

/// A publish that timed out with no trace of its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    /// The bucket's index.
    pub bucket: usize,
    /// The file it writes.
    pub path: PathBuf,
    /// Its value (`None`: a delete).
    pub value: Option<Vec<u8>>,
    /// When it timed out.
    pub since: Instant,
}

/// What a watch does with a message of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Its publisher will record and install it.
    InFlight,
    /// Its outcome was unknown: it landed, and is this node's write.
    Adopt(Unknown),
    /// An ordinary change (settled long ago, or not this process's).
    Change,
}

/// The own publishes of one mount (see the module docs).
#[derive(Debug, Default)]
pub struct OwnWrites {
    /// Message id -> (when it was sent, the sequence a watch saw it at).
    in_flight: HashMap<String, (Instant, Option<u64>)>,
    unknown: HashMap<String, Unknown>,
}

impl OwnWrites {
    /// A publish with message id `id` is about to go out.
    pub fn begin(&mut self, id: &str, now: Instant) {
        self.forget_old(now);
        self.in_flight.insert(id.to_string(), (now, None));
    }

    /// The publisher recorded the outcome of `id` (or it failed with nothing sent).
    pub fn settle(&mut self, id: &str) {
        self.in_flight.remove(id);
    }

    /// `id` timed out. Returns the sequence a watch saw its message at, if one did (it
    /// landed); otherwise remembers it as `unknown` to adopt it if it shows up.
    pub fn timed_out(&mut self, id: &str, unknown: Unknown) -> Option<u64> {
        let seen = self.in_flight.remove(id).and_then(|(_, seq)| seq);
        if seen.is_none() {
            self.unknown.insert(id.to_string(), unknown);
        }
        seen
    }

    /// Stops waiting for `id` (a queued write owns its outcome now).
    pub fn drop_unknown(&mut self, id: &str) {
        self.unknown.remove(id);
    }

    /// A watch delivered the message `id` at sequence `seq`.
    pub fn seen(&mut self, id: &str, seq: u64) -> Seen {
        if let Some(entry) = self.in_flight.get_mut(id) {
            entry.1 = Some(seq);
            return Seen::InFlight;
        }
        match self.unknown.remove(id) {
            Some(u) => Seen::Adopt(u),
            None => Seen::Change,
        }
    }

    /// How many outcomes are unknown (for status).
    pub fn unknown(&self) -> usize {
        self.unknown.len()
    }

    fn forget_old(&mut self, now: Instant) {
        let old = |t: Instant| now.duration_since(t) > REMEMBER;
        if self.in_flight.len() > 1024 {
            self.in_flight.retain(|_, (t, _)| !old(*t));
        }
        self.unknown.retain(|_, u| !old(u.since));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(now: Instant) -> Unknown {
        Unknown { bucket: 0, path: PathBuf::from("fast/claims/x"), value: Some(vec![]), since: now }
    }

    #[test]
    fn in_flight_messages_are_the_publishers_and_confirm_a_lost_ack() {
        let now = Instant::now();
        let mut own = OwnWrites::default();
        own.begin("a-1", now);
        assert_eq!(own.seen("a-1", 7), Seen::InFlight);
        // The acknowledgement was lost, but the watch saw the message: it landed at 7.
        assert_eq!(own.timed_out("a-1", unknown(now)), Some(7));
        assert_eq!(own.unknown(), 0);
        // Delivered again (a watch restarting): an ordinary change now.
        assert_eq!(own.seen("a-1", 7), Seen::Change);
    }

    #[test]
    fn a_timed_out_publish_is_adopted_when_it_shows_up() {
        let now = Instant::now();
        let mut own = OwnWrites::default();
        own.begin("a-2", now);
        assert_eq!(own.timed_out("a-2", unknown(now)), None);
        assert_eq!(own.unknown(), 1);
        assert_eq!(own.seen("a-2", 9), Seen::Adopt(unknown(now)));
        assert_eq!(own.seen("a-2", 9), Seen::Change, "adopted once");
    }

    #[test]
    fn settled_and_queued_writes_are_ordinary_changes() {
        let now = Instant::now();
        let mut own = OwnWrites::default();
        own.begin("a-3", now);
        own.settle("a-3");
        assert_eq!(own.seen("a-3", 1), Seen::Change);
        own.begin("a-4", now);
        own.timed_out("a-4", unknown(now));
        own.drop_unknown("a-4");
        assert_eq!(own.seen("a-4", 2), Seen::Change);
        assert_eq!(own.seen("b-1", 3), Seen::Change, "another process's message");
    }

    #[test]
    fn unknown_outcomes_are_forgotten_after_a_while() {
        let now = Instant::now();
        let mut own = OwnWrites::default();
        own.begin("a-5", now);
        own.timed_out("a-5", unknown(now));
        own.begin("a-6", now + REMEMBER + Duration::from_secs(1));
        assert_eq!(own.unknown(), 0);
    }
}
