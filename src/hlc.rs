//! A hybrid logical clock: orders writes across nodes without trusting their wall clocks alone.
//!
//! A stamp is (wall milliseconds, counter, node). A node's clock never goes backwards, and it
//! moves past every stamp it sees from another node ([`Clock::observe`]), so a change made
//! after seeing another change always stamps later, even if its wall clock lags. Ties are
//! broken by node id, so any two stamps compare the same way on every node. The durable tier
//! writes the stamp into each commit (`Syncfs-HLC` trailer) and `lww` merges pick the later one.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// One stamp.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stamp {
    /// Wall clock, milliseconds since the epoch (at least).
    pub wall_ms: u64,
    /// Orders stamps with the same wall time.
    pub counter: u32,
    /// The node that made it.
    pub node: String,
}

impl Stamp {
    /// A compact UTC form for file names: `20261124T163012.123Z.0`.
    pub fn file_stamp(&self) -> String {
        let time = UNIX_EPOCH + std::time::Duration::from_millis(self.wall_ms);
        let text = humantime::format_rfc3339_millis(time).to_string();
        // 2026-11-24T16:30:12.123Z -> 20261124T163012.123Z
        let compact: String = text.chars().filter(|c| *c != '-' && *c != ':').collect();
        format!("{compact}.{}", self.counter)
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.counter, self.node)
    }
}

impl FromStr for Stamp {
    type Err = String;

    fn from_str(s: &str) -> Result<Stamp, String> {
        let (time, node) = s.trim().split_once('@').ok_or_else(|| format!("no node in {s:?}"))?;
        let (wall, counter) = time.split_once('.').ok_or_else(|| format!("no counter in {s:?}"))?;
        Ok(Stamp {
            wall_ms: wall.parse().map_err(|_| format!("bad wall time in {s:?}"))?,
            counter: counter.parse().map_err(|_| format!("bad counter in {s:?}"))?,
            node: node.to_string(),
        })
    }
}

/// A node's clock.
#[derive(Debug)]
pub struct Clock {
    node: String,
    last: Mutex<(u64, u32)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Clock {
    /// A clock for `node`.
    pub fn new(node: &str) -> Clock {
        Clock {
            node: node.to_string(),
            last: Mutex::new((0, 0)),
        }
    }

    /// A stamp later than every stamp this clock made or observed.
    pub fn now(&self) -> Stamp {
        self.tick(now_ms())
    }

    fn tick(&self, physical: u64) -> Stamp {
        let mut last = self.last.lock();
        let (wall, counter) = if physical > last.0 {
            (physical, 0)
        } else {
            (last.0, last.1 + 1)
        };
        *last = (wall, counter);
        Stamp {
            wall_ms: wall,
            counter,
            node: self.node.clone(),
        }
    }

    /// Moves the clock past a stamp seen from another node.
    pub fn observe(&self, seen: &Stamp) {
        let mut last = self.last.lock();
        if (seen.wall_ms, seen.counter) > *last {
            *last = (seen.wall_ms, seen.counter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_grow_and_pass_observed_ones() {
        let c = Clock::new("a");
        let s1 = c.tick(1000);
        let s2 = c.tick(1000);
        let s3 = c.tick(999);
        assert!(s1 < s2 && s2 < s3);
        // A remote stamp far in the future: the next local one is later still.
        c.observe(&Stamp { wall_ms: 5000, counter: 7, node: "b".into() });
        let s4 = c.tick(1001);
        assert_eq!((s4.wall_ms, s4.counter), (5000, 8));
    }

    #[test]
    fn ties_break_by_node_and_stamps_round_trip() {
        let a = Stamp { wall_ms: 1, counter: 0, node: "a".into() };
        let b = Stamp { wall_ms: 1, counter: 0, node: "b".into() };
        assert!(a < b);
        let text = b.to_string();
        assert_eq!(text.parse::<Stamp>().unwrap(), b);
        let s = Stamp { wall_ms: 1_764_001_812_123, counter: 3, node: "n".into() };
        assert_eq!(s.file_stamp(), "20251124T163012.123Z.3");
    }
}
