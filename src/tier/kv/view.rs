//! What this node knows of each KV path: the newest revision seen, the revision the tree's copy
//! holds, who wrote it and when. Built from the watches (never persisted: a remount rebuilds it
//! from the buckets), read by `user.syncfs.*` attributes and compare-and-swap bases.
//!
//! Two revisions per path keep remote changes and local commits from overtaking each other:
//! `known` is the newest revision the node has heard of (from a watch or its own commit), and
//! `installed` the one whose content is in the tree. [`View::admit`] lets content into the tree
//! only if it is at least as new as both.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// One KV path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index of the bucket (in the tier's list) that holds it.
    pub bucket: usize,
    /// Newest revision heard of.
    pub known: u64,
    /// Revision whose content the tree holds.
    pub installed: u64,
    /// The newest revision is a delete.
    pub deleted: bool,
    /// The node that wrote the newest revision, if it said.
    pub node: Option<String>,
    /// When the newest revision was written (server time).
    pub created: SystemTime,
}

/// A revision of an entry this mount wrote in an ephemeral policy and keeps alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// Bucket index.
    pub bucket: usize,
    /// The key.
    pub key: String,
    /// The revision this mount wrote last.
    pub rev: u64,
    /// Its value, re-published at each refresh.
    pub value: Vec<u8>,
    /// It is a directory's marker (a directory claim), not a file's value.
    pub dir: bool,
}

/// The index of all KV paths of a mount.
#[derive(Debug, Default)]
pub struct View {
    files: HashMap<PathBuf, Entry>,
    /// Directories kept by a marker key: the marker's newest revision heard of, and whether
    /// it is live (not a delete). Deletes are kept so that older news cannot bring one back.
    dirs: HashMap<PathBuf, (u64, bool)>,
    /// (expiry time, path, revision, a directory's marker) of entries with a TTL, soonest first.
    expiry: BinaryHeap<Reverse<(SystemTime, PathBuf, u64, bool)>>,
    /// Entries this mount keeps alive (ephemeral policies).
    pub owned: HashMap<PathBuf, Owned>,
    /// Recent revision changes, for the base of renames onto a path.
    pub log: crate::tier::revlog::RevisionLog,
}

impl View {
    /// The entry of a path.
    pub fn get(&self, path: &Path) -> Option<&Entry> {
        self.files.get(path)
    }

    /// Records revision `rev` of `path` (a value, or a delete when `deleted`). Returns whether
    /// it is newer than anything heard of before; older news is ignored.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        path: &Path,
        bucket: usize,
        rev: u64,
        deleted: bool,
        node: Option<String>,
        created: SystemTime,
        ttl: Option<Duration>,
    ) -> bool {
        if let Some(e) = self.files.get(path) {
            if e.known >= rev {
                return false;
            }
        }
        let installed = self.files.get(path).map(|e| e.installed).unwrap_or(0);
        let before = self.files.get(path).filter(|e| !e.deleted).map(|e| e.known);
        self.log_change(path, before);
        if !deleted {
            if let Some(ttl) = ttl {
                self.expiry.push(Reverse((created + ttl, path.to_path_buf(), rev, false)));
            }
        }
        self.files.insert(
            path.to_path_buf(),
            Entry {
                bucket,
                known: rev,
                installed,
                deleted,
                node,
                created,
            },
        );
        true
    }

    /// Whether content of revision `rev` may replace the tree's copy now (see the module docs);
    /// records it as installed. `None` is content without a revision yet (queued offline).
    pub fn admit(&mut self, path: &Path, rev: Option<u64>) -> bool {
        let Some(rev) = rev else {
            return true;
        };
        match self.files.get_mut(path) {
            None => true,
            Some(e) if rev < e.known || rev < e.installed => false,
            Some(e) => {
                e.installed = rev;
                true
            }
        }
    }

    /// Forgets a path (its file was swept away).
    pub fn remove(&mut self, path: &Path) {
        if let Some(e) = self.files.remove(path) {
            self.log_change(path, Some(e.known).filter(|_| !e.deleted));
        }
        self.owned.remove(path);
    }

    fn log_change(&mut self, path: &Path, before: Option<u64>) {
        let before = before.map(|r| crate::tier::Revision(r.to_string()));
        self.log.changed(path, before, std::time::Instant::now());
    }

    /// Paths of a bucket.
    pub fn paths_of(&self, bucket: usize) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|(_, e)| e.bucket == bucket)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Records a directory marker of revision `rev`, which expires at `expires` (a TTL).
    /// Returns whether it is news (revision 0, a marker queued offline, always is).
    pub fn mark_dir(&mut self, path: &Path, rev: u64, expires: Option<SystemTime>) -> bool {
        let known = self.dirs.get(path).map(|(r, _)| *r).unwrap_or(0);
        if rev != 0 && known >= rev {
            return false;
        }
        self.dirs.insert(path.to_path_buf(), (rev.max(known), true));
        if let Some(at) = expires.filter(|_| rev != 0) {
            self.expiry.push(Reverse((at, path.to_path_buf(), rev, true)));
        }
        true
    }

    /// The revision of a directory's marker.
    pub fn dir_rev(&self, path: &Path) -> Option<u64> {
        self.dirs.get(path).filter(|(_, live)| *live).map(|(r, _)| *r).filter(|r| *r != 0)
    }

    /// Whether the newest news of a directory's marker is a delete.
    pub fn dir_removed(&self, path: &Path) -> bool {
        self.dirs.get(path).is_some_and(|(_, live)| !*live)
    }

    /// Whether any file or marked directory lies below `dir`.
    pub fn has_children(&self, dir: &Path) -> bool {
        let below = |p: &PathBuf| p != dir && p.starts_with(dir);
        self.files.iter().any(|(p, e)| !e.deleted && below(p)) || self.dirs.iter().any(|(p, (_, live))| *live && below(p))
    }

    /// Records that a directory's marker was deleted, at revision `rev` (`None`: by this
    /// mount, whatever the revision). Returns whether it is news.
    pub fn unmark_dir(&mut self, path: &Path, rev: Option<u64>) -> bool {
        let known = self.dirs.get(path).map(|(r, _)| *r).unwrap_or(0);
        match rev {
            Some(rev) if known >= rev => false,
            _ => {
                self.dirs.insert(path.to_path_buf(), (rev.unwrap_or(known).max(known), false));
                self.owned.remove(path);
                true
            }
        }
    }

    /// Whether a directory has a marker.
    pub fn is_marked(&self, path: &Path) -> bool {
        self.dirs.get(path).is_some_and(|(_, live)| *live)
    }

    /// Entries whose TTL ran out by `now`: (path, revision, a directory), each still the
    /// newest revision. Expired directory markers are forgotten.
    pub fn expired(&mut self, now: SystemTime) -> Vec<(PathBuf, u64, bool)> {
        let mut due = Vec::new();
        while let Some(Reverse((at, _, _, _))) = self.expiry.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, path, rev, dir)) = self.expiry.pop().expect("peeked");
            if dir {
                if self.dirs.get(&path) == Some(&(rev, true)) {
                    self.dirs.insert(path.clone(), (rev, false));
                    self.owned.remove(&path);
                    due.push((path, rev, true));
                }
                continue;
            }
            let expires = self.files.get_mut(&path).filter(|e| e.known == rev && !e.deleted);
            if let Some(e) = expires {
                e.deleted = true;
                self.log_change(&path, Some(rev));
                due.push((path, rev, false));
            }
        }
        due
    }

    /// How many paths the view holds.
    pub fn len(&self) -> usize {
        self.files.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn older_news_is_ignored_and_cannot_be_installed() {
        let mut v = View::default();
        let p = Path::new("fast/x");
        assert!(v.record(p, 0, 5, false, Some("a".into()), T0, None));
        assert!(!v.record(p, 0, 4, false, Some("b".into()), T0, None));
        assert_eq!(v.get(p).unwrap().node.as_deref(), Some("a"));
        assert!(v.admit(p, Some(5)));
        assert!(!v.admit(p, Some(4)), "an older revision must not replace a newer one");
        // A newer revision heard of but not yet installed blocks the older one too.
        assert!(v.record(p, 0, 7, false, None, T0, None));
        assert!(!v.admit(p, Some(6)));
        assert!(v.admit(p, Some(7)));
        assert!(v.admit(p, None), "queued content is always admitted");
    }

    #[test]
    fn entries_expire_at_created_plus_ttl_unless_rewritten() {
        let mut v = View::default();
        let ttl = Some(Duration::from_secs(2));
        v.record(Path::new("a"), 0, 1, false, None, T0, ttl);
        v.record(Path::new("b"), 0, 2, false, None, T0, ttl);
        // b is rewritten later: its first expiry must not fire.
        v.record(Path::new("b"), 0, 3, false, None, T0 + Duration::from_secs(1), ttl);
        assert!(v.expired(T0 + Duration::from_secs(1)).is_empty());
        assert_eq!(v.expired(T0 + Duration::from_secs(2)), vec![(PathBuf::from("a"), 1, false)]);
        assert_eq!(v.expired(T0 + Duration::from_secs(3)), vec![(PathBuf::from("b"), 3, false)]);
        assert!(v.get(Path::new("a")).unwrap().deleted);
    }

    #[test]
    fn directory_markers_expire_unless_marked_again_and_count_as_children() {
        let mut v = View::default();
        let (d, t) = (Path::new("c/x.lock"), |s| Some(T0 + Duration::from_secs(s)));
        v.mark_dir(d, 4, t(2));
        // Released and taken again at a later revision: the first expiry must not fire.
        v.mark_dir(d, 6, t(5));
        assert!(v.expired(T0 + Duration::from_secs(3)).is_empty());
        assert_eq!(v.dir_rev(d), Some(6));
        assert!(v.has_children(Path::new("c")) && !v.has_children(d));
        assert_eq!(v.expired(T0 + Duration::from_secs(5)), vec![(d.to_path_buf(), 6, true)]);
        assert_eq!(v.dir_rev(d), None);
        // A delete heard of late (older than the marker this mount made) changes nothing.
        assert!(v.mark_dir(d, 9, None));
        assert!(!v.unmark_dir(d, Some(8)));
        assert_eq!(v.dir_rev(d), Some(9));
        assert!(v.unmark_dir(d, Some(10)));
        assert!(!v.mark_dir(d, 9, None), "an older marker must not bring it back");
    }
}
