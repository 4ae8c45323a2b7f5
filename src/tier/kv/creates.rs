//! Compare-and-swap creates no close has acknowledged yet.
//!
//! A `cas`/`cas-create` open that creates a file publishes an empty value at once: that is
//! what makes `O_EXCL` a cluster-wide lock. If the daemon dies before the file's first close,
//! that close never returns success, yet the empty value would stay on every node (forever,
//! unless the policy has a TTL). So each such create is written down here, with the message id
//! it is published under, before it is published (a kill between the server's acknowledgement
//! and a later record would leave nothing to take back), and forgotten at the file's next own
//! write. What a stopped daemon left here is taken back at the next mount: when the key's last
//! message is still that empty value (same message id), it is deleted with a compare-and-swap
//! on its revision, so that a value anybody wrote since stays.
//!
//! The file is rewritten (temporary file and rename, no fsync) at each change: it must survive
//! a crash of the daemon, which never loses what it wrote to the page cache.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// One create: the bucket's name, the key and the message id of the empty value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Create {
    pub bucket: String,
    pub key: String,
    pub msg_id: String,
}

/// The creates of this mount not yet followed by a write, and those a stopped daemon left.
#[derive(Debug)]
pub(super) struct Creates {
    file: PathBuf,
    open: BTreeMap<PathBuf, Create>,
    leftover: Vec<Create>,
}

impl Creates {
    /// Reads what a stopped daemon left in `file` (a missing file is none).
    pub fn open(file: &Path) -> io::Result<Creates> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let leftover = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split('\t');
                let (bucket, key, msg_id) = (parts.next()?, parts.next()?, parts.next()?);
                Some(Create { bucket: bucket.into(), key: key.into(), msg_id: msg_id.into() })
            })
            .collect();
        Ok(Creates { file: file.to_path_buf(), open: BTreeMap::new(), leftover })
    }

    /// Writes down a create of `path`, before it is published.
    pub fn begin(&mut self, path: &Path, create: Create) {
        self.open.insert(path.to_path_buf(), create);
        self.save();
    }

    /// `path` was written (or removed) by this mount since its create.
    pub fn done(&mut self, path: &Path) {
        if self.open.remove(path).is_some() {
            self.save();
        }
    }

    /// What a stopped daemon left, to take back.
    pub fn leftover(&self) -> Vec<Create> {
        self.leftover.clone()
    }

    /// `create` was taken back (or found changed since): it is forgotten.
    pub fn settled(&mut self, create: &Create) {
        self.leftover.retain(|c| c != create);
        self.save();
    }

    fn save(&self) {
        let mut text = String::new();
        for c in self.leftover.iter().chain(self.open.values()) {
            text.push_str(&format!("{}\t{}\t{}\n", c.bucket, c.key, c.msg_id));
        }
        let tmp = self.file.with_extension("tmp");
        let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = result {
            // Only costs the clean-up after a crash: the empty value then stays.
            tracing::warn!(file = %self.file.display(), error = %e, "cannot record the open creates");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_left_by_a_stopped_daemon_come_back_and_written_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creates");
        let c = |key: &str, id: &str| Create { bucket: "b".into(), key: key.into(), msg_id: id.into() };
        let mut a = Creates::open(&file).unwrap();
        a.begin(Path::new("x"), c("x", "n-3"));
        a.begin(Path::new("y"), c("y", "n-4"));
        a.done(Path::new("y"));
        drop(a);
        let mut b = Creates::open(&file).unwrap();
        assert_eq!(b.leftover(), vec![c("x", "n-3")]);
        b.settled(&c("x", "n-3"));
        assert!(Creates::open(&file).unwrap().leftover().is_empty());
    }
}
