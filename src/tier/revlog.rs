//! Which revision a path had a short while ago: the base of a rename onto it.
//!
//! A program that rewrites a file by writing a copy and renaming it over the original (tbd,
//! npm's write-file-atomic, Python's `tempfile` + `os.replace`, editors) read the original
//! before it created the copy. If another node's change arrived in between, merging the copy
//! against the version current at the rename would count everything that change added as
//! removed by the program. The base must be the version current when the copy was created, as
//! git takes the parent of a commit from what was checked out.
//!
//! The log keeps, per path, the moments its revision changed and the revision before each
//! change, for [`KEEP`] (at most [`PER_PATH`] changes per path and [`MAX_CHANGES`] in all):
//! enough for a program's read-modify-write, bounded however fast paths change.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Revision;

/// How long changes are remembered.
pub const KEEP: Duration = Duration::from_secs(600);
/// Changes remembered per path; older ones answer with the oldest known revision.
pub const PER_PATH: usize = 16;
/// Changes remembered in all: past this, the oldest go first, however recent.
pub const MAX_CHANGES: usize = 100_000;

/// Recent revision changes of paths (see the module docs).
#[derive(Debug, Default)]
pub struct RevisionLog {
    /// Per path, oldest first: (when it changed, the revision it had before).
    paths: HashMap<PathBuf, VecDeque<(Instant, Option<Revision>)>>,
    /// Every change, oldest first, to forget them in order.
    order: VecDeque<(Instant, PathBuf)>,
}

impl RevisionLog {
    /// Records that `path` changed at `now` from revision `before` (`None`: it did not exist).
    pub fn changed(&mut self, path: &Path, before: Option<Revision>, now: Instant) {
        self.forget_before(now.checked_sub(KEEP).unwrap_or(now));
        while self.order.len() >= MAX_CHANGES {
            let oldest = self.order.front().map(|(at, _)| *at).expect("not empty");
            self.forget_before(oldest + Duration::from_nanos(1));
        }
        let changes = self.paths.entry(path.to_path_buf()).or_default();
        if changes.len() == PER_PATH {
            changes.pop_front();
        }
        changes.push_back((now, before));
        self.order.push_back((now, path.to_path_buf()));
    }

    /// The revision `path` had at `when`, given that it has `current` now. A moment older
    /// than the log answers with the oldest revision it knows.
    pub fn at(&self, path: &Path, when: Instant, current: Option<Revision>) -> Option<Revision> {
        let Some(changes) = self.paths.get(path) else {
            return current;
        };
        match changes.iter().find(|(at, _)| *at > when) {
            Some((_, before)) => before.clone(),
            None => current,
        }
    }

    fn forget_before(&mut self, limit: Instant) {
        while let Some((at, _)) = self.order.front() {
            if *at >= limit {
                break;
            }
            let (at, path) = self.order.pop_front().expect("peeked");
            if let Some(changes) = self.paths.get_mut(&path) {
                if changes.front().is_some_and(|(t, _)| *t <= at) {
                    changes.pop_front();
                }
                if changes.is_empty() {
                    self.paths.remove(&path);
                }
            }
        }
    }

    /// How many changes are remembered (for tests).
    pub fn len(&self) -> usize {
        self.paths.values().map(VecDeque::len).sum()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(s: &str) -> Option<Revision> {
        Some(Revision(s.into()))
    }

    #[test]
    fn answers_the_revision_at_a_moment() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut log = RevisionLog::default();
        let p = Path::new("durable/x.yml");
        log.changed(p, None, ms(10)); // created: a
        log.changed(p, rev("a"), ms(20)); // a -> b
        log.changed(p, rev("b"), ms(30)); // b -> c
        assert_eq!(log.at(p, ms(5), rev("c")), None, "did not exist yet");
        assert_eq!(log.at(p, ms(15), rev("c")), rev("a"));
        assert_eq!(log.at(p, ms(20), rev("c")), rev("b"), "a change at the very moment is included");
        assert_eq!(log.at(p, ms(25), rev("c")), rev("b"));
        assert_eq!(log.at(p, ms(35), rev("c")), rev("c"));
        assert_eq!(log.at(Path::new("other"), ms(1), rev("z")), rev("z"), "never changed: current");
    }

    #[test]
    fn stays_bounded_in_time_and_per_path() {
        let t0 = Instant::now();
        let mut log = RevisionLog::default();
        let p = Path::new("k");
        for i in 0..(PER_PATH as u64 + 5) {
            log.changed(p, rev(&i.to_string()), t0 + Duration::from_millis(i));
        }
        assert_eq!(log.len(), PER_PATH);
        // Older than the log: the oldest revision it knows.
        assert_eq!(log.at(p, t0, rev("now")), rev("5"));
        for i in 0..100u64 {
            log.changed(Path::new(&format!("p{i}")), None, t0 + Duration::from_millis(100 + i));
        }
        log.changed(Path::new("late"), None, t0 + KEEP + Duration::from_secs(1));
        assert_eq!(log.len(), 1, "changes older than KEEP are forgotten");
        assert_eq!(log.at(p, t0, rev("now")), rev("now"));
    }
}
