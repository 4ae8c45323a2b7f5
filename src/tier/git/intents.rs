//! What this node's tree is about to hold for durable paths, noted before it does, so that a
//! mount after `kill -9` can tell an interrupted step from a change (issue 10, defect 7).
//!
//! The core asks the tier first and changes the tree after: a file created by `open(O_CREAT)`
//! is in the tree before any close, and a committed change (an fsync's commit included) is
//! installed into the tree only after the tier took it. Without a note, the next mount's
//! comparison of the tree with `refs/syncfs/tree` takes the empty created file, or the content
//! the install did not replace yet, for a change of this node, and commits it over the
//! committed content. One line per note, appended without fsync (the guarantee is against a
//! crash of the process, like the tier's objects); the log is read and emptied at each mount.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use git2::Oid;
use parking_lot::Mutex;

/// The log is emptied when it grows past this (its old lines are about long-installed changes).
const MAX_BYTES: u64 = 8 << 20;

/// What the tree is about to hold for a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Created by an open; no close committed it yet.
    Created,
    /// Committed with this blob; its install into the tree follows.
    Holds(Oid),
    /// Removed.
    Gone,
}

/// The append-only log of intents.
pub(crate) struct Intents {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

impl Intents {
    /// The last intent per path that the previous mount noted.
    pub(crate) fn load(path: &Path) -> HashMap<PathBuf, Intent> {
        let mut out = HashMap::new();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A torn last line (a crash mid-append) does not parse and is skipped.
        for line in text.lines() {
            let mut parts = line.split(' ');
            let (Some(op), Some(p)) = (parts.next(), parts.next()) else { continue };
            let Some(bytes) = unhex(p) else { continue };
            let intent = match op {
                "C" => Intent::Created,
                "D" => Intent::Gone,
                "B" => match parts.next().and_then(|b| Oid::from_str(b).ok()) {
                    Some(oid) => Intent::Holds(oid),
                    None => continue,
                },
                _ => continue,
            };
            out.insert(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)), intent);
        }
        out
    }

    /// Starts an empty log (after the mount's recovery used the old one).
    pub(crate) fn create(path: &Path) -> Intents {
        let file = std::fs::File::create(path)
            .inspect_err(|e| tracing::warn!(error = %e, file = %path.display(), "cannot keep the git tier's intents; a crash may commit an interrupted create"))
            .ok();
        Intents { path: path.to_path_buf(), file: Mutex::new(file) }
    }

    /// Notes what the tree is about to hold for `path`.
    pub(crate) fn note(&self, path: &Path, intent: Intent) {
        let line = match intent {
            Intent::Created => format!("C {}\n", hex(path.as_os_str().as_bytes())),
            Intent::Gone => format!("D {}\n", hex(path.as_os_str().as_bytes())),
            Intent::Holds(oid) => format!("B {} {oid}\n", hex(path.as_os_str().as_bytes())),
        };
        let mut file = self.file.lock();
        let Some(f) = file.as_mut() else { return };
        if f.metadata().is_ok_and(|m| m.len() > MAX_BYTES) {
            *file = std::fs::File::create(&self.path).ok();
        }
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
