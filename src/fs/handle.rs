//! Open files and write stages.
//!
//! An in-place handle (local tier) reads and writes the tree's file directly.
//!
//! A staged handle (synced tiers, and local files the core validates) never writes the tree's
//! file. All handles of one inode share a [`Stage`]: a private *shadow* copy in the spool
//! directory that takes the writes and serves the reads, so programs on this node see their own
//! writes at once. At flush or fsync the shadow is *frozen* (the next write copies it first),
//! validated, committed to the tier, and then renamed over the tree's file. A refused commit
//! leaves the tree's file exactly as it was, and the shadow is kept so that a later fsync can
//! retry; it is discarded when the last handle closes.
//!
//! Until the first write a stage reads the tree's file itself (`owned == None`), so opening for
//! write costs no copy.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::inode::Ino;
use super::tree::{self, RawDirEntry};
use crate::tier::Revision;

/// The spool directory: shadows of staged files live here until installed into the tree. It is
/// on the same filesystem as the tree, so installing is a rename.
#[derive(Debug)]
pub struct Spool {
    dir: OwnedFd,
    next: AtomicU64,
}

impl Spool {
    /// Opens the spool directory (an `O_PATH` fd) and removes leftovers of an earlier run:
    /// shadows that were never committed, whose close() therefore never reported success.
    pub fn open(dir: OwnedFd) -> io::Result<Spool> {
        for entry in tree::read_dir(dir.as_fd())? {
            if entry.name != "." && entry.name != ".." {
                let name = tree::cname(&entry.name)?;
                tree::unlink_at(dir.as_fd(), &name, false)?;
            }
        }
        Ok(Spool {
            dir,
            next: AtomicU64::new(1),
        })
    }

    /// A new empty shadow file and its name in the spool.
    pub fn create(&self) -> io::Result<(File, CString)> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = CString::new(format!("shadow-{n}")).expect("no NUL");
        let fd = tree::open_at(
            self.dir.as_fd(),
            &name,
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            0o600,
        )?;
        Ok((File::from(fd), name))
    }

    /// Removes a shadow that will not be installed.
    pub fn remove(&self, name: &CString) {
        if let Err(e) = tree::unlink_at(self.dir.as_fd(), name, false) {
            tracing::warn!(name = ?name, error = %e, "cannot remove a spool file");
        }
    }

    /// The spool directory, for renames out of it.
    pub fn dir(&self) -> &OwnedFd {
        &self.dir
    }
}

/// The shared write state of a staged inode. See the module docs.
#[derive(Debug)]
pub struct Stage {
    inner: Mutex<StageInner>,
    /// Serializes commits of this stage, so installs happen in commit order.
    pub commit_lock: tokio::sync::Mutex<()>,
    spool: Arc<Spool>,
    /// The base of the next compare-and-swap commit: the revision when the stage began, then
    /// the revision of its own last commit.
    base: Mutex<Option<Revision>>,
}

#[derive(Debug)]
struct StageInner {
    /// What reads see and writes go to (after a copy, if not owned).
    file: Arc<File>,
    /// The spool name of `file` when the stage owns it; `None` when `file` is shared with the
    /// tree or with a commit in flight, so it must be copied before it is written.
    owned: Option<CString>,
    /// Changed since the last freeze.
    dirty: bool,
    /// The only change is the one `open` made (a new or truncated file). Shells open, `dup2`
    /// and close the original fd before writing, so the first flush of such a stage would
    /// publish an empty file only to replace it a moment later; such a change commits at
    /// fsync or at release instead, and any write makes it an ordinary change.
    open_only: bool,
    /// The last commit was refused and nothing was written since: do not retry at release.
    refused: bool,
}

/// A stage's content taken for one commit.
#[derive(Debug)]
pub struct Frozen {
    /// The complete content to commit; nothing writes it any more.
    pub file: Arc<File>,
    /// Its name in the spool.
    pub name: CString,
}

impl Stage {
    /// A stage reading the tree's file until its first write.
    pub fn on(file: Arc<File>, spool: Arc<Spool>, base: Option<Revision>) -> Stage {
        Stage {
            inner: Mutex::new(StageInner {
                file,
                owned: None,
                dirty: false,
                open_only: false,
                refused: false,
            }),
            commit_lock: tokio::sync::Mutex::new(()),
            spool,
            base: Mutex::new(base),
        }
    }

    /// The base revision of the next commit.
    pub fn base(&self) -> Option<Revision> {
        self.base.lock().clone()
    }

    /// Records the revision of a successful commit as the next base.
    pub fn set_base(&self, rev: Option<Revision>) {
        if rev.is_some() {
            *self.base.lock() = rev;
        }
    }

    /// A stage that starts empty (`O_TRUNC`) and is dirty: the truncation itself is a change.
    pub fn empty(spool: Arc<Spool>, base: Option<Revision>) -> io::Result<Stage> {
        let (file, name) = spool.create()?;
        Ok(Stage {
            inner: Mutex::new(StageInner {
                file: Arc::new(file),
                owned: Some(name),
                dirty: true,
                open_only: true,
                refused: false,
            }),
            commit_lock: tokio::sync::Mutex::new(()),
            spool,
            base: Mutex::new(base),
        })
    }

    /// The file reads are served from.
    pub fn file(&self) -> Arc<File> {
        self.inner.lock().file.clone()
    }

    /// Whether the stage holds content the tree does not (for attributes).
    pub fn owns_shadow(&self) -> bool {
        self.inner.lock().owned.is_some()
    }

    fn make_private(&self, inner: &mut StageInner) -> io::Result<()> {
        if inner.owned.is_some() {
            return Ok(());
        }
        let (mut copy, name) = self.spool.create()?;
        let result = (|| {
            // The shared file is only used with positional I/O, so its offset is free to move.
            let mut from = inner.file.try_clone()?;
            from.seek(SeekFrom::Start(0))?;
            io::copy(&mut from, &mut copy)?;
            // Owner and mode now, so installing it later changes nothing but the name.
            tree::copy_metadata(inner.file.as_fd(), &copy)?;
            Ok::<_, io::Error>(())
        })();
        if let Err(e) = result {
            self.spool.remove(&name);
            return Err(e);
        }
        inner.file = Arc::new(copy);
        inner.owned = Some(name);
        Ok(())
    }

    /// Writes at `offset`, copying the shared content first if needed.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        self.make_private(&mut inner)?;
        inner.file.write_all_at(data, offset)?;
        inner.dirty = true;
        inner.open_only = false;
        inner.refused = false;
        Ok(())
    }

    /// Appends at the current end of the shadow.
    pub fn append(&self, data: &[u8]) -> io::Result<u64> {
        let mut inner = self.inner.lock();
        self.make_private(&mut inner)?;
        let offset = inner.file.metadata()?.len();
        inner.file.write_all_at(data, offset)?;
        inner.dirty = true;
        inner.open_only = false;
        inner.refused = false;
        Ok(offset)
    }

    /// Truncates or extends the content.
    pub fn set_len(&self, size: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        self.make_private(&mut inner)?;
        inner.file.set_len(size)?;
        inner.dirty = true;
        inner.open_only = false;
        inner.refused = false;
        Ok(())
    }

    /// Takes the content for a commit, or `None` when nothing changed since the last one.
    /// At a flush (`all == false`), a change made only by `open` waits (see `open_only`).
    pub fn freeze(&self, all: bool) -> Option<Frozen> {
        let mut inner = self.inner.lock();
        if !inner.dirty || (inner.open_only && !all) {
            return None;
        }
        let name = inner.owned.take()?;
        inner.dirty = false;
        inner.open_only = false;
        Some(Frozen {
            file: inner.file.clone(),
            name,
        })
    }

    /// The commit of `frozen` failed: give the content back, unless newer writes replaced it.
    pub fn thaw(&self, frozen: Frozen) {
        let mut inner = self.inner.lock();
        if inner.owned.is_none() && Arc::ptr_eq(&inner.file, &frozen.file) {
            inner.owned = Some(frozen.name);
            inner.dirty = true;
            inner.refused = true;
        } else {
            self.spool.remove(&frozen.name);
        }
    }

    /// Whether closing the last writer must still commit (writes after the last flush, e.g.
    /// through a shared mapping).
    pub fn needs_commit(&self) -> bool {
        let inner = self.inner.lock();
        inner.dirty && !inner.refused
    }

    /// Whether the shadow holds content that was refused (the kernel's cache may hold it too).
    pub fn is_refused(&self) -> bool {
        self.inner.lock().refused
    }

    /// Drops the shadow, if the stage owns one.
    pub fn discard(&self) {
        let mut inner = self.inner.lock();
        if let Some(name) = inner.owned.take() {
            self.spool.remove(&name);
        }
        inner.dirty = false;
    }
}

/// How a handle reaches its content.
#[derive(Debug)]
pub enum HandleIo {
    /// The tree's file, written in place.
    Direct(Arc<File>),
    /// Through the inode's stage.
    Staged(Arc<Stage>),
}

/// An open file.
#[derive(Debug)]
pub struct Handle {
    /// The inode.
    pub ino: Ino,
    /// Where reads and writes go.
    pub io: HandleIo,
    /// Opened with `O_APPEND`: every write goes to the end.
    pub append: bool,
    /// Opened for writing.
    pub writable: bool,
}

impl Handle {
    /// The file reads are served from now.
    pub fn read_file(&self) -> Arc<File> {
        match &self.io {
            HandleIo::Direct(file) => file.clone(),
            HandleIo::Staged(stage) => stage.file(),
        }
    }
}

/// An open directory: a snapshot of its entries taken at opendir, so offsets stay stable.
#[derive(Debug)]
pub struct DirHandle {
    /// The directory.
    pub ino: Ino,
    /// Entries, `.` and `..` included.
    pub entries: Vec<RawDirEntry>,
}
