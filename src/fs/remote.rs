//! Other nodes' changes, applied to the tree.
//!
//! A synced tier watches its backend and hands each change to [`RemoteSink::apply`]. The core
//! writes the new content to the spool, asks the tier to [`admit`](crate::tier::Tier::admit) it
//! under the table lock (so that an older revision never replaces a newer one, whether the newer
//! came from this node or another), renames it into place, and then drops the kernel's caches:
//! the inode's pages and attributes when the file was known, the name when it was not (the
//! kernel may hold a negative entry for it).
//!
//! Files keep the owner, mode and `user.*` attributes of the local file they replace. New files
//! get mode 0644 and new directories 0755, owned by the daemon's user: tiers that sync content
//! do not sync ownership.
//!
//! A name cannot be a file on one node and a directory on another at once. When a change would
//! need that, the local entry stays and the change is logged and skipped.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Weak};

use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;

use super::inode::{InodeTable, Orphan};
use super::tree::{self, Ident};
use super::{Core, FsError, Ino, Kind};
use crate::op::Op;
use crate::tier::{RemoteChange, RemoteSink, Revision, TierError};

const NEW_FILE_MODE: u32 = 0o644;
const NEW_DIR_MODE: u32 = 0o755;

/// The core as the tiers see it. Holds the core weakly: tiers live inside the core.
struct CoreSink(Weak<Core>);

impl RemoteSink for CoreSink {
    fn apply_from(&self, path: &Path, change: RemoteChange, rev: Option<Revision>, node: Option<&str>) -> Result<(), String> {
        let Some(core) = self.0.upgrade() else {
            return Ok(());
        };
        core.apply_remote(path, change, rev, node).map_err(|e| e.to_string())
    }

    fn validate(&self, path: &Path, content: &[u8]) -> Result<(), String> {
        match self.0.upgrade() {
            Some(core) => core.check_schema(path, content),
            None => Ok(()),
        }
    }

    fn size(&self, path: &Path) -> Option<u64> {
        let (dir, name) = self.0.upgrade()?.entry(path)?;
        let st = tree::lstat_at(dir.as_fd(), &name).ok()?;
        (Kind::from_mode(st.st_mode) == Kind::File).then_some(st.st_size as u64)
    }

    fn tagged(&self, path: &Path) -> bool {
        let Some((dir, name)) = self.0.upgrade().and_then(|core| core.entry(path)) else { return false };
        let Ok(fd) = tree::open_path_at(dir.as_fd(), &name) else { return false };
        tree::get_xattr(fd.as_fd(), crate::tier::CONTENT_TAG).is_ok_and(|t| t.is_some())
    }

    fn files(&self, dir: &Path) -> Vec<PathBuf> {
        let Some(core) = self.0.upgrade() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Ok(Some(fd)) = core.existing_dir(dir) {
            walk(&fd, dir, &mut out);
        }
        out
    }
}

/// Collects the regular files below a directory of the tree.
fn walk(dir: &OwnedFd, rel: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = tree::read_dir(dir.as_fd()) else { return };
    for entry in entries {
        if entry.name == "." || entry.name == ".." {
            continue;
        }
        let path = rel.join(&entry.name);
        let Ok(cname) = tree::cname(&entry.name) else { continue };
        match Kind::from_d_type(entry.d_type) {
            Some(Kind::File) => out.push(path),
            Some(Kind::Dir) => {
                if let Ok(sub) = tree::open_at(dir.as_fd(), &cname, libc::O_PATH | libc::O_DIRECTORY, 0) {
                    walk(&sub, &path, out);
                }
            }
            _ => {}
        }
    }
}

/// Under the table lock, before `name` in `dir` changes behind the kernel's back: the node
/// that stands for it, with an fd of its backing inode, so that it lives on (see
/// [`Core::orphan_taken`]).
fn take_name(table: &InodeTable, dir: &OwnedFd, name: &CStr) -> Result<Option<(Ino, Arc<OwnedFd>)>, FsError> {
    let Ok(st) = tree::lstat_at(dir.as_fd(), name) else { return Ok(None) };
    let Some(ino) = table.by_ident(Ident::of(&st)) else { return Ok(None) };
    Ok(Some((ino, Arc::new(tree::open_path_at(dir.as_fd(), name)?))))
}

/// The node of a directory fd, under the table lock.
fn dir_node(table: &InodeTable, dir: &OwnedFd) -> Option<Ino> {
    let st = tree::fstat(dir.as_fd()).ok()?;
    table.by_ident(Ident::of(&st))
}

/// What to tell the kernel once the table lock is released.
pub(super) enum Invalidate {
    Inode(Ino),
    Entry(Ino, std::ffi::OsString),
}

impl Core {
    /// Starts every tier's watch of its backend.
    pub fn start_tiers(self: &Arc<Self>) {
        let sink: Arc<dyn RemoteSink> = Arc::new(CoreSink(Arc::downgrade(self)));
        for kind in self.tiers.kinds() {
            if let Some(tier) = self.tiers.get(kind) {
                tier.start(sink.clone());
            }
        }
    }

    /// Stops every tier cleanly (releases what they hold for this mount).
    pub fn shutdown(&self) -> Op<(), TierError> {
        let ops: Vec<_> = self
            .tiers
            .kinds()
            .into_iter()
            .filter_map(|k| self.tiers.get(k).map(|t| t.shutdown()))
            .collect();
        Op::pending(async move {
            for op in ops {
                if let Err(e) = op.into_future().await {
                    tracing::warn!(error = %e, "tier shutdown");
                }
            }
            Ok(())
        })
    }

    /// Hands the invalidations to the kernel-notification thread. Not written from here: the
    /// kernel takes the directory's lock to drop a name, a pending request in that directory
    /// (an exclusive create waiting for NATS) can hold it, and its reply needs a runtime
    /// worker, which this very call would block.
    pub(super) fn send(&self, inval: Vec<Invalidate>) {
        let Some(k) = self.kernel.get() else { return };
        for i in inval {
            match i {
                Invalidate::Inode(ino) => k.invalidate_inode(ino),
                Invalidate::Entry(parent, name) => k.invalidate_entry(parent, &name),
            }
        }
    }

    /// The node id of a directory fd, if the kernel may know it.
    fn dir_ino(&self, dir: &OwnedFd) -> Option<Ino> {
        let st = tree::fstat(dir.as_fd()).ok()?;
        self.inodes.lock().by_ident(Ident::of(&st))
    }

    /// Opens (creating what is missing) the directory `rel` below the root.
    pub(super) fn ensure_dir(&self, rel: &Path, inval: &mut Vec<Invalidate>) -> Result<Arc<OwnedFd>, FsError> {
        // Usually it exists: one openat2 instead of a walk.
        if let Some(dir) = self.existing_dir(rel)? {
            return Ok(dir);
        }
        let mut dir = self.root.clone();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(FsError::os(libc::EINVAL));
            };
            let cname = tree::cname(name)?;
            match tree::open_at(dir.as_fd(), &cname, libc::O_PATH | libc::O_DIRECTORY, 0) {
                Ok(fd) => dir = Arc::new(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match tree::mkdir_at(dir.as_fd(), &cname, NEW_DIR_MODE) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    if let Some(parent) = self.dir_ino(&dir) {
                        inval.push(Invalidate::Entry(parent, name.to_os_string()));
                    }
                    dir = Arc::new(tree::open_at(
                        dir.as_fd(),
                        &cname,
                        libc::O_PATH | libc::O_DIRECTORY,
                        0,
                    )?);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(dir)
    }

    /// The directory holding `path` and its name there, if the directory exists.
    pub(super) fn entry(&self, path: &Path) -> Option<(Arc<OwnedFd>, std::ffi::CString)> {
        let dir = self.existing_dir(path.parent()?).ok()??;
        Some((dir, tree::cname(path.file_name()?).ok()?))
    }

    /// Opens the directory `rel` if it exists.
    fn existing_dir(&self, rel: &Path) -> Result<Option<Arc<OwnedFd>>, FsError> {
        if rel.as_os_str().is_empty() {
            return Ok(Some(self.root.clone()));
        }
        match tree::resolve_dir(self.root.as_fd(), &tree::cname(rel.as_os_str())?) {
            Ok(fd) => Ok(Some(Arc::new(fd))),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Under the table lock: moves the spool file `spool_name` to `name` in `dir` (the tree's
    /// copy of `path`), as a new version that replaces the old one behind the kernel's back.
    /// The node of the old version keeps it (an orphan: open files and the kernel's entries
    /// read it whole, its size matching it), and the kernel drops the name, so its next lookup
    /// meets the new version as a new node. Returns the new version's identity.
    pub(super) fn replace_name(
        &self,
        table: &mut InodeTable,
        dir: &OwnedFd,
        name: &OsStr,
        path: &Path,
        spool_name: &CStr,
        inval: &mut Vec<Invalidate>,
    ) -> Result<Ident, FsError> {
        let cname = tree::cname(name)?;
        let taken = take_name(table, dir, &cname)?;
        tree::rename_at(self.spool.dir().as_fd(), spool_name, dir.as_fd(), &cname, 0)?;
        let new = Ident::of(&tree::lstat_at(dir.as_fd(), &cname)?);
        self.orphan_taken(table, dir, name, path, taken, inval);
        Ok(new)
    }

    /// After `name` in `dir` changed behind the kernel's back: the node that stood for it (if
    /// any) becomes an orphan that its writers still commit from, and the kernel is told to
    /// drop the name (also a negative entry, when there was no node). The kernel takes the
    /// directory's lock for that, after any lookup in flight there has installed its answer, so
    /// no answer about the old version outlives the invalidation.
    pub(super) fn orphan_taken(
        &self,
        table: &mut InodeTable,
        dir: &OwnedFd,
        name: &OsStr,
        path: &Path,
        taken: Option<(Ino, Arc<OwnedFd>)>,
        inval: &mut Vec<Invalidate>,
    ) {
        let parent = dir_node(table, dir);
        if let Some((ino, fd)) = taken {
            if table.unlink(ino, parent.unwrap_or(0), name, true) {
                table.set_orphan(ino, Orphan { fd, path: path.to_path_buf(), remote: true });
            }
        }
        if let Some(parent) = parent {
            inval.push(Invalidate::Entry(parent, name.to_os_string()));
        }
    }

    /// Applies another node's change of `path` (see the module docs).
    pub fn apply_remote(&self, path: &Path, change: RemoteChange, rev: Option<Revision>, node: Option<&str>) -> Result<(), FsError> {
        self.remote_applies.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let target = self.target(path.to_path_buf());
        let tier = self.tier(&target).clone();
        let parent_rel = path.parent().unwrap_or(Path::new(""));
        let Some(name) = path.file_name() else {
            return Ok(());
        };
        let cname = tree::cname(name)?;
        let mut inval = Vec::new();
        let result = (|| match change {
            RemoteChange::File(_) | RemoteChange::Program { .. } | RemoteChange::Stub { .. } => {
                let dir = self.ensure_dir(parent_rel, &mut inval)?;
                let old = tree::lstat_at(dir.as_fd(), &cname).ok().map(|st| Kind::from_mode(st.st_mode));
                // A symlink here is the tier's own (only tiers that store links make them): the
                // file replaces it, as a new file.
                if old.is_some_and(|k| !matches!(k, Kind::File | Kind::Symlink)) {
                    tracing::warn!(path = %path.display(), "a remote file and a local non-file share this name; keeping the local one");
                    return Ok(None);
                }
                let old_fd = match old {
                    Some(Kind::File) => Some(tree::open_path_at(dir.as_fd(), &cname)?),
                    _ => None,
                };
                let (_file, spool_name) = match &change {
                    RemoteChange::Stub { size } => {
                        let like = old_fd.as_ref().map(|fd| fd.as_fd()).ok_or(NEW_FILE_MODE);
                        self.placeholder(like, *size, rev.as_ref())?
                    }
                    RemoteChange::File(bytes) | RemoteChange::Program { bytes, .. } => {
                        let (mut file, spool_name) = self.spool.create()?;
                        let prepared = (|| {
                            file.write_all(bytes)?;
                            match &old_fd {
                                Some(old_fd) => tree::copy_metadata(old_fd.as_fd(), &file)?,
                                None => tree::chmod_fd(file.as_fd(), NEW_FILE_MODE)?,
                            }
                            if let RemoteChange::Program { executable, .. } = &change {
                                let mode = tree::fstat(file.as_fd())?.st_mode & 0o7777;
                                let mode = if *executable { mode | ((mode & 0o444) >> 2) } else { mode & !0o111 };
                                tree::chmod_fd(file.as_fd(), mode)?;
                            }
                            Ok::<_, FsError>(())
                        })();
                        if let Err(e) = prepared {
                            self.spool.remove(&spool_name);
                            return Err(e);
                        }
                        (file, spool_name)
                    }
                    _ => unreachable!("matched above"),
                };
                let mut table = self.inodes.lock();
                if !tier.admit(&target, rev.as_ref()) {
                    drop(table);
                    self.spool.remove(&spool_name);
                    return Ok(None);
                }
                self.replace_name(&mut table, &dir, name, path, &spool_name, &mut inval)?;
                Ok(Some(if old.is_some() { "write" } else { "create" }))
            }
            RemoteChange::Symlink(link) => {
                let dir = self.ensure_dir(parent_rel, &mut inval)?;
                let old = tree::lstat_at(dir.as_fd(), &cname).ok().map(|st| Kind::from_mode(st.st_mode));
                if old.is_some_and(|k| !matches!(k, Kind::File | Kind::Symlink)) {
                    tracing::warn!(path = %path.display(), "a remote symlink and a local directory share this name; keeping the local one");
                    return Ok(None);
                }
                let spool_name = self.spool.link(OsStr::from_bytes(&link))?;
                let mut table = self.inodes.lock();
                if !tier.admit(&target, rev.as_ref()) {
                    drop(table);
                    self.spool.remove(&spool_name);
                    return Ok(None);
                }
                self.replace_name(&mut table, &dir, name, path, &spool_name, &mut inval)?;
                Ok(Some("symlink"))
            }
            RemoteChange::Append { at, bytes } => {
                let dir = self.ensure_dir(parent_rel, &mut inval)?;
                let table = self.inodes.lock();
                if !tier.admit(&target, rev.as_ref()) {
                    return Ok(None);
                }
                let (fd, created) = match tree::open_at(
                    dir.as_fd(),
                    &cname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    NEW_FILE_MODE as libc::mode_t,
                ) {
                    Ok(fd) => (fd, true),
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => (tree::open_at(dir.as_fd(), &cname, libc::O_WRONLY, 0)?, false),
                    Err(e) => return Err(e.into()),
                };
                let file = std::fs::File::from(fd);
                let st = tree::fstat(file.as_fd())?;
                if Kind::from_mode(st.st_mode) != Kind::File {
                    tracing::warn!(path = %path.display(), "an appended file and a local non-file share this name; keeping the local one");
                    return Ok(None);
                }
                let len = st.st_size as u64;
                if len < at {
                    return Err(FsError::Io(std::io::Error::other(format!(
                        "{} holds {len} bytes, fewer than the {at} an append expects",
                        path.display()
                    ))));
                }
                if len > at {
                    file.set_len(at)?;
                }
                file.write_all_at(&bytes, at)?;
                let ino = table.by_ident(Ident::of(&st));
                drop(table);
                match ino {
                    Some(ino) if !created => inval.push(Invalidate::Inode(ino)),
                    _ => {
                        if let Some(parent) = self.dir_ino(&dir) {
                            inval.push(Invalidate::Entry(parent, name.to_os_string()));
                        }
                    }
                }
                Ok(Some("append"))
            }
            RemoteChange::Delete => {
                let Some(dir) = self.existing_dir(parent_rel)? else {
                    return Ok(None);
                };
                let mut table = self.inodes.lock();
                if !tier.admit(&target, rev.as_ref()) {
                    return Ok(None);
                }
                let Ok(st) = tree::lstat_at(dir.as_fd(), &cname) else {
                    return Ok(None);
                };
                if !matches!(Kind::from_mode(st.st_mode), Kind::File | Kind::Symlink) {
                    return Ok(None);
                }
                let taken = take_name(&table, &dir, &cname)?;
                tree::unlink_at(dir.as_fd(), &cname, false)?;
                self.orphan_taken(&mut table, &dir, name, path, taken, &mut inval);
                Ok(Some("delete"))
            }
            RemoteChange::Dir { created } => {
                let dir = self.ensure_dir(parent_rel, &mut inval)?;
                match tree::lstat_at(dir.as_fd(), &cname) {
                    Ok(st) if Kind::from_mode(st.st_mode) == Kind::Dir => Ok(None),
                    Ok(_) => {
                        tracing::warn!(path = %path.display(), "a remote directory and a local file share this name; keeping the local one");
                        Ok(None)
                    }
                    Err(_) => {
                        let made = self.ensure_dir(path, &mut inval)?;
                        if let Some(at) = created {
                            tree::utimens_fd(made.as_fd(), tree::SetTime::Omit, tree::SetTime::At(at))?;
                        }
                        Ok(Some("mkdir"))
                    }
                }
            }
            RemoteChange::PruneDir => {
                let Some(dir) = self.existing_dir(parent_rel)? else {
                    return Ok(None);
                };
                let mut table = self.inodes.lock();
                let Ok(st) = tree::lstat_at(dir.as_fd(), &cname) else {
                    return Ok(None);
                };
                if Kind::from_mode(st.st_mode) != Kind::Dir {
                    return Ok(None);
                }
                let taken = take_name(&table, &dir, &cname)?;
                match tree::unlink_at(dir.as_fd(), &cname, true) {
                    Ok(()) => {}
                    // Not empty (or busy as a mount point): it stays.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST) | Some(libc::EBUSY)) => {
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
                let gone = taken.as_ref().map(|(ino, _)| *ino);
                self.orphan_taken(&mut table, &dir, name, path, taken, &mut inval);
                drop(table);
                if let Some(ino) = gone {
                    self.dir_fds.lock().pop(&ino);
                }
                Ok(Some("rmdir"))
            }
        })();
        self.send(inval);
        let op = result?;
        if let (Some(op), Some(events)) = (op, self.events.get()) {
            // A deletion's revision is a marker in the git tier, no version: left out.
            let rev = rev.as_ref().map(|r| r.0.as_str()).filter(|r| *r != crate::tier::git::DELETED);
            events.report(op, path, target.policy.tier, rev, true, node, None);
        }
        Ok(())
    }
}
