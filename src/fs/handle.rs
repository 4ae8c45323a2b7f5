//! Open files and write stages.
//!
//! An in-place handle (local tier) reads and writes the tree's file directly.
//!
//! A staged handle (synced tiers, and local files the core validates) never writes the tree's
//! file. All handles of one inode share a [`Stage`]: a private *shadow* copy in the spool
//! directory that takes the writes and serves the reads, so programs on this node see their own
//! writes at once. At flush or fsync the shadow is *frozen* (the next write copies it first),
//! validated, committed to the tier, and then renamed over the tree's file. A refused commit
//! leaves the tree's file exactly as it was; a refusal for good puts the stage back on it, a
//! failure worth retrying (EAGAIN) keeps the shadow so that a later fsync can retry. It is
//! discarded when the last handle closes. A file the open created is committed from the tree
//! as it is until something is written ([`Stage::created`]).
//!
//! Until the first write a stage reads the tree's file itself (`owned == None`), so opening for
//! write costs no copy.
//!
//! An append handle (append tiers) shares the inode's [`Appender`]: the bytes programs wrote
//! and no append has taken yet, in memory up to [`SPILL_AT`] and in a spool file beyond.
//! At flush the bytes written so far become a *segment* with an id of its own; segments are
//! handed to the tier in order, and one that fails stays queued, with its id, for the next
//! flush to retry, so a retried append is never stored twice. Reads past the tree's file see
//! the queued bytes.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::inode::Ino;
use super::tree::{self, RawDirEntry};
use crate::tier::{Appended, Revision};

/// Appended bytes beyond this many go to a spool file instead of memory.
pub const SPILL_AT: usize = 1 << 20;

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
        let fd = tree::open_content_at(
            self.dir.as_fd(),
            &name,
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            0o600,
        )?;
        Ok((File::from(fd), name))
    }

    /// A new symbolic link to `target` in the spool, and its name (a link another node made,
    /// renamed into the tree).
    pub fn link(&self, target: &std::ffi::OsStr) -> io::Result<CString> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = CString::new(format!("link-{n}")).expect("no NUL");
        tree::symlink_at(target, self.dir.as_fd(), &name)?;
        Ok(name)
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
    /// Writable handles sharing the stage. Only the last one's release commits what no flush
    /// did: an earlier handle's release (the kernel sends it late) would otherwise publish a
    /// later writer's unfinished content, such as the empty file its `O_TRUNC` made.
    pub writers: AtomicU64,
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
    /// `file` was frozen for a commit that is not installed yet: the tree still holds the
    /// content before it, and the kernel must not hear that older size meanwhile (it would
    /// keep it for the attribute lifetime, and later readers would read the file cut short).
    committing: bool,
}

/// A stage's content taken for one commit.
#[derive(Debug)]
pub struct Frozen {
    /// The complete content to commit; nothing writes it any more.
    pub file: Arc<File>,
    /// Its name in the spool; `None` when it is the tree's file itself (a file this node
    /// just created, committed as it is).
    pub name: Option<CString>,
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
                committing: false,
            }),
            commit_lock: tokio::sync::Mutex::new(()),
            spool,
            base: Mutex::new(base),
            writers: AtomicU64::new(0),
        }
    }

    /// A stage on a file this open just created in the tree, which the tier has not stored
    /// yet: its first commit stores it as it is (even if nothing is written: `touch`), and
    /// until a write the node's attributes are the created file's own.
    pub fn created(file: Arc<File>, spool: Arc<Spool>, base: Option<Revision>) -> Stage {
        let stage = Stage::on(file, spool, base);
        {
            let mut inner = stage.inner.lock();
            inner.dirty = true;
            inner.open_only = true;
        }
        stage
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
                committing: false,
            }),
            commit_lock: tokio::sync::Mutex::new(()),
            spool,
            base: Mutex::new(base),
            writers: AtomicU64::new(0),
        })
    }

    /// The file reads are served from.
    pub fn file(&self) -> Arc<File> {
        self.inner.lock().file.clone()
    }

    /// Whether the stage holds content the tree does not (yet): attributes come from it.
    pub fn owns_shadow(&self) -> bool {
        let inner = self.inner.lock();
        inner.owned.is_some() || inner.committing
    }

    /// The frozen content is in the tree now.
    pub fn installed(&self) {
        self.inner.lock().committing = false;
    }

    fn make_private(&self, inner: &mut StageInner) -> io::Result<()> {
        if inner.owned.is_some() {
            return Ok(());
        }
        let (mut copy, name) = self.spool.create()?;
        let result = (|| {
            io::copy(&mut tree::ReadAt::new(&inner.file), &mut copy)?;
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

    /// Empties the content for an `O_TRUNC` open: like a new truncating stage, a flush before
    /// anything is written does not publish the empty file (see `open_only`).
    pub fn truncate_by_open(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        self.make_private(&mut inner)?;
        inner.file.set_len(0)?;
        inner.dirty = true;
        inner.open_only = true;
        inner.refused = false;
        Ok(())
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

    /// `fallocate(2)` on the content (its own copy first): preallocation, holes and zeroed
    /// ranges are changes like writes.
    pub fn fallocate(&self, mode: i32, offset: u64, length: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        self.make_private(&mut inner)?;
        // SAFETY: valid fd; plain integer arguments.
        let ret = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(inner.file.as_ref()),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
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
        // Not owned but dirty: a created file, committed from the tree as it is.
        let name = inner.owned.take();
        inner.dirty = false;
        inner.open_only = false;
        inner.committing = name.is_some();
        Some(Frozen {
            file: inner.file.clone(),
            name,
        })
    }

    /// The commit of `frozen` went nowhere (the file has no name left): the stage keeps it
    /// as its own, so the descriptor reads it and `fstat` shows it, committed no more.
    pub fn keep(&self, frozen: Frozen) {
        let mut inner = self.inner.lock();
        inner.committing = false;
        if inner.owned.is_none() && Arc::ptr_eq(&inner.file, &frozen.file) {
            inner.owned = frozen.name;
        } else if let Some(name) = &frozen.name {
            self.spool.remove(name);
        }
    }

    /// The commit of `frozen` failed: give the content back, unless newer writes replaced it.
    pub fn thaw(&self, frozen: Frozen) {
        let mut inner = self.inner.lock();
        inner.committing = false;
        if inner.owned.is_none() && Arc::ptr_eq(&inner.file, &frozen.file) {
            inner.owned = frozen.name;
            inner.dirty = true;
            inner.refused = true;
        } else if let Some(name) = &frozen.name {
            self.spool.remove(name);
        }
    }

    /// A commit was refused for good: the stage reads the stored content `file` again, so
    /// the writer's descriptor and the kernel agree with what every other opener sees.
    pub fn revert(&self, frozen: Frozen, file: Arc<File>) {
        let mut inner = self.inner.lock();
        inner.committing = false;
        if let Some(name) = &frozen.name {
            self.spool.remove(name);
        }
        if inner.owned.is_none() && Arc::ptr_eq(&inner.file, &frozen.file) {
            inner.file = file;
            inner.dirty = false;
            inner.open_only = false;
            inner.refused = true;
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

/// Bytes not yet handed to the tier: memory, then a spool file.
#[derive(Debug, Default)]
struct Spill {
    mem: Vec<u8>,
    file: Option<(Arc<File>, CString)>,
    len: u64,
}

impl Spill {
    fn push(&mut self, spool: &Spool, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.mem.len() + data.len() > SPILL_AT {
            let (file, name) = spool.create()?;
            if let Err(e) = file.write_all_at(&self.mem, 0) {
                spool.remove(&name);
                return Err(e);
            }
            self.mem = Vec::new();
            self.file = Some((Arc::new(file), name));
        }
        match &self.file {
            Some((file, _)) => file.write_all_at(data, self.len)?,
            None => self.mem.extend_from_slice(data),
        }
        self.len += data.len() as u64;
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = buf.len().min((self.len - offset) as usize);
        match &self.file {
            Some((file, _)) => file.read_exact_at(&mut buf[..n], offset)?,
            None => buf[..n].copy_from_slice(&self.mem[offset as usize..offset as usize + n]),
        }
        Ok(n)
    }
}

/// A run of appended bytes taken for the tier, with the id its retries keep.
#[derive(Debug)]
struct Segment {
    id: u64,
    bytes: Spill,
}

impl Segment {
    fn appended(&self) -> Appended {
        match &self.bytes.file {
            Some((file, _)) => Appended::File(file.clone(), self.bytes.len),
            None => Appended::Bytes(bytes::Bytes::copy_from_slice(&self.bytes.mem)),
        }
    }
}

/// The shared append state of an inode of an append tier. See the module docs.
#[derive(Debug)]
pub struct Appender {
    inner: Mutex<AppendInner>,
    /// Serializes appends of this inode, so they reach the tier in the order written.
    pub commit_lock: tokio::sync::Mutex<()>,
    spool: Arc<Spool>,
}

#[derive(Debug, Default)]
struct AppendInner {
    /// Taken for the tier and not yet appended (a failed append waits here), oldest first.
    queued: std::collections::VecDeque<Segment>,
    /// Written since the last flush.
    open: Spill,
    /// The file was created on this node and nothing reached the tier yet: the last close
    /// appends nothing, so that the (empty) file exists on every node.
    created: bool,
}

impl Appender {
    /// The append state of an inode; `created` when this open made the file.
    pub fn new(spool: Arc<Spool>, created: bool) -> Appender {
        Appender {
            inner: Mutex::new(AppendInner {
                created,
                ..AppendInner::default()
            }),
            commit_lock: tokio::sync::Mutex::new(()),
            spool,
        }
    }

    /// Buffers bytes written at the end of the file.
    pub fn push(&self, data: &[u8]) -> io::Result<()> {
        self.inner.lock().open.push(&self.spool, data)
    }

    /// How many bytes are buffered (queued and open).
    pub fn pending(&self) -> u64 {
        let inner = self.inner.lock();
        inner.queued.iter().map(|s| s.bytes.len).sum::<u64>() + inner.open.len
    }

    /// Reads buffered bytes: `offset` 0 is the first byte after the tree's file.
    pub fn read_at(&self, buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
        let inner = self.inner.lock();
        for spill in inner.queued.iter().map(|s| &s.bytes).chain([&inner.open]) {
            if offset < spill.len {
                return spill.read_at(buf, offset);
            }
            offset -= spill.len;
        }
        Ok(0)
    }

    /// Takes what was written for the tier: the open bytes become a segment with a new id
    /// (`next_id`). With `all` (fsync, last close), a created file with nothing written
    /// becomes an empty segment. Returns every queued segment, oldest first, as (id, bytes).
    pub fn take(&self, all: bool, next_id: impl FnOnce() -> u64) -> Vec<(u64, Appended)> {
        let mut inner = self.inner.lock();
        let created_only = all && inner.created && inner.queued.is_empty() && inner.open.len == 0;
        if inner.open.len > 0 || created_only {
            let bytes = std::mem::take(&mut inner.open);
            inner.queued.push_back(Segment { id: next_id(), bytes });
        }
        inner.queued.iter().map(|s| (s.id, s.appended())).collect()
    }

    /// The tier took the segment `id`: forget it.
    pub fn done(&self, id: u64) {
        let mut inner = self.inner.lock();
        inner.created = false;
        if let Some(i) = inner.queued.iter().position(|s| s.id == id) {
            let segment = inner.queued.remove(i).expect("position is valid");
            if let Some((_, name)) = &segment.bytes.file {
                self.spool.remove(name);
            }
        }
    }

    /// Drops everything buffered (the file was truncated to zero).
    pub fn clear(&self) {
        let mut inner = self.inner.lock();
        let open = std::mem::take(&mut inner.open);
        for spill in inner.queued.drain(..).map(|s| s.bytes).chain([open]) {
            if let Some((_, name)) = &spill.file {
                self.spool.remove(name);
            }
        }
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The content a node's readers read while no writer stages it. Shared by the node's reader
/// handles and replaced when the node's own commit is installed, so that what they read is
/// always what the kernel's size and pages of the node describe. (Another node's change never
/// replaces it: that change is a new node.)
///
/// While a writer stages the node, its readers read the stage: the kernel's size of the node
/// is then what the writer wrote, and a read of the older content could come back short and
/// shrink it for later readers too.
#[derive(Debug)]
pub struct Current {
    file: Mutex<Arc<File>>,
    stage: Mutex<std::sync::Weak<Stage>>,
}

impl Current {
    /// Readers start on `file`.
    pub fn new(file: Arc<File>) -> Current {
        Current {
            file: Mutex::new(file),
            stage: Mutex::new(std::sync::Weak::new()),
        }
    }

    /// The file to read now.
    pub fn file(&self) -> Arc<File> {
        if let Some(stage) = self.stage.lock().upgrade() {
            return stage.file();
        }
        self.file.lock().clone()
    }

    /// The node's content is `file` from now on.
    pub fn set(&self, file: Arc<File>) {
        *self.file.lock() = file;
    }

    /// A writer stages the node: readers read its stage while it lives.
    pub fn follow(&self, stage: &Arc<Stage>) {
        *self.stage.lock() = Arc::downgrade(stage);
    }
}

/// How a handle reaches its content.
#[derive(Debug)]
pub enum HandleIo {
    /// The tree's file, written in place (or only read).
    Direct(Arc<File>),
    /// The node's current content, read-only (staged files with no writer on this node).
    Current(Arc<Current>),
    /// Through the inode's stage.
    Staged(Arc<Stage>),
    /// Reads content a tier is still fetching into `file`: each read waits until its bytes
    /// are there (and the last ones until the content is verified).
    Arriving {
        /// The file being filled.
        file: Arc<File>,
        /// How far it is.
        arrival: tokio::sync::watch::Receiver<crate::tier::Arrival>,
    },
    /// Appends through the inode's appender; reads from the tree's file, then the appender.
    Append {
        /// The tree's file, read-only.
        file: Arc<File>,
        /// The inode's appender.
        appender: Arc<Appender>,
        /// Where this handle's next write lands if it continues its own run of writes.
        next: AtomicU64,
        /// The file's path and policy (append files are never renamed), so that a write
        /// resolves nothing.
        target: crate::tier::Target,
    },
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
    /// Its stage must be committed when it closes: it can write, or its open changed the
    /// file (created or truncated it, also read-only).
    pub commits: bool,
    /// The thread that opened it (for the merge base of its writes).
    pub opener: u32,
    /// Opened to execute the file (the kernel refuses writers then; syncfs refuses `O_TRUNC`).
    pub exec: bool,
    /// The errno of a commit refused for good at a close of one copy of this descriptor (a
    /// forked child's exit, say). Every later close or fsync of the others reports it until
    /// the descriptor writes again: the refused bytes are gone, and the program that wrote
    /// them must hear so from its own close, not a `0`.
    pub refused: Mutex<Option<i32>>,
}

impl Handle {
    /// The file reads are served from now (for append handles: up to the tree's length).
    pub fn read_file(&self) -> Arc<File> {
        match &self.io {
            HandleIo::Direct(file) | HandleIo::Append { file, .. } | HandleIo::Arriving { file, .. } => file.clone(),
            HandleIo::Current(current) => current.file(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> (tempfile::TempDir, Arc<Spool>) {
        let dir = tempfile::tempdir().unwrap();
        let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C string.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        (dir, Arc::new(Spool::open(fd).unwrap()))
    }

    fn text(a: &Appended) -> String {
        String::from_utf8(a.chunk(0, usize::MAX).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn a_failed_append_keeps_its_id_and_new_writes_follow_it() {
        let (_dir, spool) = spool();
        let a = Appender::new(spool, false);
        let mut ids = 10..;
        a.push(b"one\n").unwrap();
        let first = a.take(false, || ids.next().unwrap());
        assert_eq!(first.len(), 1);
        assert_eq!(text(&first[0].1), "one\n");
        // The tier failed: nothing is done. More is written, and the next flush retries the
        // first append with the same id, then the new bytes with a new one.
        a.push(b"two\n").unwrap();
        let again = a.take(false, || ids.next().unwrap());
        assert_eq!(again.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![first[0].0, 11]);
        assert_eq!(text(&again[1].1), "two\n");
        // Reads past the tree's file see both, in order.
        let mut buf = [0u8; 16];
        let n = a.read_at(&mut buf, 2).unwrap();
        assert_eq!(&buf[..n], b"e\n");
        assert_eq!(a.pending(), 8);
        a.done(10);
        a.done(11);
        assert_eq!(a.pending(), 0);
        assert!(a.take(true, || ids.next().unwrap()).is_empty());
    }

    #[test]
    fn a_created_file_appends_nothing_at_its_last_close_only() {
        let (_dir, spool) = spool();
        let a = Appender::new(spool, true);
        let mut ids = 1..;
        assert!(a.take(false, || ids.next().unwrap()).is_empty(), "a flush (the shell's first close) waits");
        let last = a.take(true, || ids.next().unwrap());
        assert_eq!(last.len(), 1);
        assert!(last[0].1.is_empty());
        a.done(last[0].0);
        assert!(a.take(true, || ids.next().unwrap()).is_empty(), "once appended, nothing more");
    }

    #[test]
    fn long_appends_spill_to_the_spool_and_leave_nothing_behind() {
        let (dir, spool) = spool();
        let a = Appender::new(spool, false);
        let big = vec![b'x'; SPILL_AT + 10];
        a.push(&big[..100]).unwrap();
        a.push(&big[100..]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "spilled to one spool file");
        let taken = a.take(false, || 7);
        assert!(matches!(taken[0].1, Appended::File(_, n) if n == big.len() as u64));
        assert_eq!(taken[0].1.chunk(SPILL_AT as u64, 100).unwrap().len(), 10);
        a.done(7);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        a.push(&big).unwrap();
        a.clear();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a truncation drops the spool file");
    }
}
