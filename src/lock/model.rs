//! The locks of one file, as a value: who holds which byte ranges, shared or exclusive.
//!
//! Pure: the manager reads a [`LockSet`] from its backend, asks it for a conflict, changes it
//! and writes it back by compare-and-swap, so the rules live here and are tested here. The
//! rules are POSIX record locks (fcntl `F_SETLK`): an owner's new lock replaces whatever that
//! owner held on the range (a write lock over part of a read lock splits it), unlocking part of
//! a range keeps the rest, and two owners conflict where their ranges overlap and at least one
//! holds a write lock. `flock(2)` arrives as a lock of the whole file (the kernel's FUSE
//! emulation), so it follows the same rules.

use serde::{Deserialize, Serialize};

/// What a program asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A shared (read) lock.
    Read,
    /// An exclusive (write) lock.
    Write,
    /// No lock on the range.
    Unlock,
}

impl Want {
    /// From fcntl's lock type (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`).
    pub fn from_type(typ: i32) -> Option<Want> {
        match typ {
            libc::F_RDLCK => Some(Want::Read),
            libc::F_WRLCK => Some(Want::Write),
            libc::F_UNLCK => Some(Want::Unlock),
            _ => None,
        }
    }
}

/// A lock one owner holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The mount that holds it: node id and a number of that mount's own (a restarted daemon
    /// is another holder, so its predecessor's locks expire rather than live on as its own).
    pub holder: String,
    /// The kernel's lock owner (a process's file table for fcntl, an open file for flock).
    pub owner: u64,
    /// The process that took it, on the holder's node (what `F_GETLK` reports).
    pub pid: u32,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive; `u64::MAX` and the kernel's `OFFSET_MAX` both mean "to the end").
    pub end: u64,
    /// Exclusive.
    pub write: bool,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    fn same_owner(&self, holder: &str, owner: u64) -> bool {
        self.holder == holder && self.owner == owner
    }
}

/// Every lock of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSet {
    /// The locks, in no particular order.
    pub held: Vec<Held>,
}

impl LockSet {
    /// The first lock of another owner that keeps `holder`'s `owner` from taking `want` on
    /// `start..=end`. Locks of holders `alive` rejects do not count.
    pub fn conflict(&self, holder: &str, owner: u64, start: u64, end: u64, want: Want, alive: impl Fn(&str) -> bool) -> Option<&Held> {
        if want == Want::Unlock {
            return None;
        }
        self.held.iter().find(|h| {
            !h.same_owner(holder, owner) && h.overlaps(start, end) && (want == Want::Write || h.write) && alive(&h.holder)
        })
    }

    /// Gives `holder`'s `owner` exactly `want` on `start..=end`, keeping what it holds
    /// elsewhere. Does not check conflicts (see [`LockSet::conflict`]).
    pub fn set(&mut self, holder: &str, owner: u64, pid: u32, start: u64, end: u64, want: Want) {
        let mut out = Vec::with_capacity(self.held.len() + 2);
        for h in self.held.drain(..) {
            if h.same_owner(holder, owner) && h.overlaps(start, end) {
                if h.start < start {
                    out.push(Held { end: start - 1, ..h.clone() });
                }
                if h.end > end {
                    out.push(Held { start: end + 1, ..h });
                }
            } else {
                out.push(h);
            }
        }
        if want != Want::Unlock {
            out.push(Held {
                holder: holder.to_string(),
                owner,
                pid,
                start,
                end,
                write: want == Want::Write,
            });
        }
        self.held = out;
    }

    /// Drops every lock of `holder`'s `owner`. Returns whether there was one.
    pub fn drop_owner(&mut self, holder: &str, owner: u64) -> bool {
        let before = self.held.len();
        self.held.retain(|h| !h.same_owner(holder, owner));
        before != self.held.len()
    }

    /// Drops every lock of the holders `alive` rejects. Returns whether there was one.
    pub fn drop_dead(&mut self, alive: impl Fn(&str) -> bool) -> bool {
        let before = self.held.len();
        self.held.retain(|h| alive(&h.holder));
        before != self.held.len()
    }

    /// Whether `holder` holds any lock here.
    pub fn holds(&self, holder: &str) -> bool {
        self.held.iter().any(|h| h.holder == holder)
    }

    /// Whether nobody holds anything.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: u64 = u64::MAX;

    fn alive(_: &str) -> bool {
        true
    }

    #[test]
    fn shared_locks_share_and_exclusive_ones_exclude() {
        let mut s = LockSet::default();
        s.set("a", 1, 10, 0, ALL, Want::Read);
        assert!(s.conflict("b", 2, 0, ALL, Want::Read, alive).is_none());
        s.set("b", 2, 20, 0, ALL, Want::Read);
        assert_eq!(s.conflict("c", 3, 0, ALL, Want::Write, alive).map(|h| h.pid), Some(10));
        // Upgrading conflicts with the other reader, not with itself.
        assert_eq!(s.conflict("a", 1, 0, ALL, Want::Write, alive).map(|h| h.holder.as_str()), Some("b"));
        s.drop_owner("b", 2);
        assert!(s.conflict("a", 1, 0, ALL, Want::Write, alive).is_none());
        s.set("a", 1, 10, 0, ALL, Want::Write);
        assert_eq!(s.held.len(), 1, "an owner's new lock replaces its old one: {s:?}");
        assert!(s.conflict("b", 2, 5, 5, Want::Read, alive).is_some());
    }

    #[test]
    fn ranges_conflict_only_where_they_overlap() {
        // SQLite's locks: a shared range, a reserved byte, a pending byte.
        let (pending, reserved, shared) = (0x4000_0000u64, 0x4000_0001u64, 0x4000_0002u64);
        let mut s = LockSet::default();
        s.set("a", 1, 1, shared, shared + 509, Want::Read);
        s.set("b", 2, 2, shared, shared + 509, Want::Read);
        assert!(s.conflict("a", 1, reserved, reserved, Want::Write, alive).is_none());
        s.set("a", 1, 1, reserved, reserved, Want::Write);
        assert!(s.conflict("b", 2, reserved, reserved, Want::Write, alive).is_some(), "one writer reserves");
        assert!(s.conflict("b", 2, pending, pending, Want::Write, alive).is_none());
        // A writes: exclusive on the shared range conflicts while B reads.
        assert!(s.conflict("a", 1, shared, shared + 509, Want::Write, alive).is_some());
        s.drop_owner("b", 2);
        assert!(s.conflict("a", 1, shared, shared + 509, Want::Write, alive).is_none());
    }

    #[test]
    fn unlocking_part_of_a_range_keeps_the_rest() {
        let mut s = LockSet::default();
        s.set("a", 1, 1, 0, 99, Want::Write);
        s.set("a", 1, 1, 40, 59, Want::Unlock);
        let mut ranges: Vec<(u64, u64)> = s.held.iter().map(|h| (h.start, h.end)).collect();
        ranges.sort();
        assert_eq!(ranges, [(0, 39), (60, 99)]);
        assert!(s.conflict("b", 2, 40, 59, Want::Write, alive).is_none());
        assert!(s.conflict("b", 2, 39, 40, Want::Read, alive).is_some());
        // A read lock in the middle of a write lock splits it in three.
        s.set("a", 1, 1, 0, 99, Want::Write);
        s.set("a", 1, 1, 10, 19, Want::Read);
        assert_eq!(s.held.len(), 3);
        assert!(s.conflict("b", 2, 10, 19, Want::Read, alive).is_none());
        assert!(s.conflict("b", 2, 10, 19, Want::Write, alive).is_some());
    }

    #[test]
    fn locks_of_dead_holders_neither_conflict_nor_stay() {
        let mut s = LockSet::default();
        s.set("dead", 1, 1, 0, ALL, Want::Write);
        assert!(s.conflict("b", 2, 0, ALL, Want::Write, |h| h != "dead").is_none());
        assert!(s.drop_dead(|h| h != "dead"));
        assert!(s.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Set { who: usize, start: u64, len: u64, want: u8 },
        Drop { who: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..3usize, 0..20u64, 1..10u64, 0..3u8).prop_map(|(who, start, len, want)| Step::Set { who, start, len, want }),
            1 => (0..3usize).prop_map(|who| Step::Drop { who }),
        ]
    }

    proptest! {
        /// A model of bytes: after any sequence of granted requests, no byte is held by a
        /// writer and anyone else, and every owner holds exactly what its requests left it.
        #[test]
        fn granted_locks_never_overlap_a_writer(steps in prop::collection::vec(step(), 1..40)) {
            let mut s = LockSet::default();
            // What each owner holds on bytes 0..30: None, Some(false) read, Some(true) write.
            let mut bytes = [[None::<bool>; 30]; 3];
            for st in steps {
                match st {
                    Step::Set { who, start, len, want } => {
                        let want = [Want::Read, Want::Write, Want::Unlock][want as usize];
                        let end = start + len - 1;
                        let holder = format!("n{who}");
                        if s.conflict(&holder, 7, start, end, want, alive).is_none() {
                            s.set(&holder, 7, 1, start, end, want);
                            for b in start..=end {
                                bytes[who][b as usize] = match want { Want::Read => Some(false), Want::Write => Some(true), Want::Unlock => None };
                            }
                        }
                    }
                    Step::Drop { who } => {
                        s.drop_owner(&format!("n{who}"), 7);
                        bytes[who] = [None; 30];
                    }
                }
                for b in 0..30u64 {
                    let holders: Vec<&Held> = s.held.iter().filter(|h| h.start <= b && b <= h.end).collect();
                    let writers = holders.iter().filter(|h| h.write).count();
                    prop_assert!(writers == 0 || holders.len() == 1, "byte {b}: {holders:?}");
                    for (who, owned) in bytes.iter().enumerate() {
                        let mine: Vec<&&Held> = holders.iter().filter(|h| h.holder == format!("n{who}")).collect();
                        prop_assert!(mine.len() <= 1, "byte {b} twice for n{who}: {mine:?}");
                        prop_assert_eq!(mine.first().map(|h| h.write), owned[b as usize]);
                    }
                }
            }
        }
    }
}
