//! Open files: reads, writes, and the commit of staged writes at flush, fsync and release.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::handle::{Appender, Current, Frozen, Handle, HandleIo, Stage};
use super::tree::{self, Ident};
use super::{Attr, Caller, Core, FsError, FsOp, Ino, Kind, Opened, Placement};
use crate::op::Op;
use crate::policy::{PolicyTable, POLICY_FILE};
use crate::tier::{Content, Revision, Target, TierError, WriteMode, CONTENT_TAG};

/// The largest file the core reads whole to validate (policy file, schema-checked documents).
const MAX_VALIDATED_SIZE: u64 = 16 << 20;

/// The open flag the kernel sets (and FUSE passes on) when it opens a file to execute it.
const FMODE_EXEC: i32 = 0x20;

/// What an open brings to the handle it makes.
struct Opening {
    /// The open flags.
    flags: i32,
    /// The file `create` just opened, if any, with the revision the tier gave the new entry
    /// (`Some(None)`: new, but not stored in the tier yet).
    created: Option<(File, Option<Option<Revision>>)>,
    /// The file that holds the current content when it is not the tree's file (tiers that
    /// keep content).
    content: Option<Content>,
    /// The version a truncating writer read before (the base of what it writes), if known.
    read_base: Option<Revision>,
    /// The opening thread.
    opener: u32,
}

impl Core {
    fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
    }

    /// Opens the tree's file of a node, checked to be the node's backing inode (for an
    /// orphan, the inode it still reaches).
    fn open_tree_file(&self, ino: Ino, flags: i32) -> Result<File, FsError> {
        for _ in 0..3 {
            let Some((dir, name, ident)) = self.locate(ino)? else {
                let fd = self.orphan_fd(ino).ok_or(FsError::os(libc::ENOENT))?;
                return Ok(tree::reopen(fd.as_fd(), flags)?);
            };
            let file = File::from(tree::open_content_at(dir.as_fd(), &name, flags, 0)?);
            if Ident::of(&tree::fstat(file.as_fd())?) == ident {
                return Ok(file);
            }
        }
        Err(FsError::os(libc::ESTALE))
    }

    /// `open` of a regular file.
    pub fn open(self: &Arc<Self>, caller: Caller, ino: Ino, flags: i32) -> FsOp<Opened> {
        // As on a local filesystem, O_TRUNC truncates whatever the access mode (the kernel,
        // with FUSE_ATOMIC_O_TRUNC, has already dropped its size and pages when it sends this).
        let truncate = flags & libc::O_TRUNC != 0;
        let prepared = (|| {
            if self.kind(ino)? != Kind::File {
                return Err(FsError::os(libc::EINVAL));
            }
            let target = self.target_of(ino)?;
            if flags & libc::O_ACCMODE != libc::O_RDONLY || truncate {
                super::writable(&target)?;
            }
            if truncate && self.inodes.lock().get(ino).is_some_and(|n| n.execs > 0) {
                // The kernel refuses writers of a running program, but checks a read-only
                // O_TRUNC only after the open truncated it (which kills the program).
                return Err(FsError::TextBusy(target.path));
            }
            Ok(target)
        })();
        let target = match prepared {
            Ok(t) => t,
            Err(e) => return Op::err(e),
        };
        if target.path == Path::new(crate::status::STATUS_FILE) {
            return Op::Ready(self.open_snapshot(ino));
        }
        let tier = self.tier(&target).clone();
        let read_base = if truncate {
            // Replaced whole: made from what this program read before, if it did.
            self.read_base(caller, &target)
        } else {
            self.note_read(caller, &target, tier.revision(&target));
            None
        };
        let opener = caller.pid;
        let opening = move |content| Opening { flags, created: None, content, read_base: None, opener };
        let this = self.clone();
        if tier.write_mode() == WriteMode::Append && truncate {
            // Opening an append file with O_TRUNC empties it: a purge, when it holds anything.
            let size = match self.getattr(ino) {
                Ok(a) => a.size,
                Err(e) => return Op::err(e),
            };
            if size > 0 {
                let opening = Opening { flags: flags & !libc::O_TRUNC, ..opening(None) };
                return self.purge(ino, &target).and_then(move |()| this.open_handle(ino, &target, opening));
            }
        }
        if tier.keeps_content() && !truncate && !self.has_stage(ino) {
            match self.content_tag(ino) {
                Err(e) => return Op::err(e),
                Ok(Some(rev)) => {
                    // A reader may start while the content arrives; a writer's stage starts
                    // from all of it.
                    let whole = flags & libc::O_ACCMODE != libc::O_RDONLY;
                    return tier
                        .content(&target, &rev, whole)
                        .err_into()
                        .and_then(move |content| this.open_handle(ino, &target, opening(Some(content))));
                }
                // Empty, or a file the tier has not stored yet: the tree's file is its content.
                Ok(None) => {}
            }
        }
        Op::Ready(self.open_handle(ino, &target, Opening { read_base, ..opening(None) }))
    }

    /// Opens `.syncfs/status`: a handle of its own on the status as it is now (the same JSON
    /// as `syncfs status --json`), read without the kernel's page cache or size (direct I/O),
    /// so every open reads a whole, fresh document, like a file of /proc.
    fn open_snapshot(&self, ino: Ino) -> Result<Opened, FsError> {
        let mut json = self.status.get().map(|f| f()).unwrap_or_default();
        json.push(b'\n');
        // SAFETY: a valid C string; a new fd we own on success.
        let fd = unsafe { libc::memfd_create(c"syncfs-status".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a new fd we own.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.write_all_at(&json, 0)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inodes.lock().get_mut(ino).ok_or(FsError::UnknownInode(ino))?.opens += 1;
        let handle = Handle {
            ino,
            io: HandleIo::Direct(Arc::new(file)),
            append: false,
            writable: false,
            commits: false,
            opener: 0,
            exec: false,
            refused: Default::default(),
        };
        self.handles.lock().insert(fh, Arc::new(handle));
        Ok(Opened { fh, passthrough: None, keep_cache: false, needs_flush: false, direct_io: true })
    }

    fn has_stage(&self, ino: Ino) -> bool {
        self.inodes.lock().get(ino).is_some_and(|n| n.stage.is_some())
    }

    /// The revision a placeholder of a tier that keeps content stands for.
    pub(super) fn content_tag(&self, ino: Ino) -> Result<Option<Revision>, FsError> {
        let fd = self.node_fd(ino)?;
        let tag = tree::get_xattr(fd.as_fd(), CONTENT_TAG)?;
        Ok(tag.map(|t| Revision(String::from_utf8_lossy(&t).into_owned())))
    }

    /// Creates a handle on `ino` (see [`Opening`]).
    fn open_handle(&self, ino: Ino, target: &Target, opening: Opening) -> Result<Opened, FsError> {
        let Opening { flags, created, content, read_base, opener } = opening;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let append = flags & libc::O_APPEND != 0;
        let truncate = flags & libc::O_TRUNC != 0;
        let exec = flags & FMODE_EXEC != 0;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = |io, commits| Handle { ino, io, append, writable, commits, opener, exec, refused: Default::default() };

        if self.tier(target).write_mode() == WriteMode::Append {
            return self.open_append(ino, fh, target, writable, created, |io| handle(io, writable));
        }

        if !self.is_staged(target) {
            let existing = self.inodes.lock().get(ino).and_then(|n| n.file.clone());
            let file = match (existing, created) {
                (Some(file), _) => file,
                (None, Some((file, _))) => Arc::new(file),
                // Always read-write: the kernel checked the caller's access, and passthrough
                // needs one backing file per inode that serves every later open.
                (None, None) => Arc::new(self.open_tree_file(ino, libc::O_RDWR)?),
            };
            if truncate {
                file.set_len(0)?;
            }
            let file = {
                let mut table = self.inodes.lock();
                let node = table.get_mut(ino).ok_or(FsError::UnknownInode(ino))?;
                let file = node.file.get_or_insert(file).clone();
                node.opens += 1;
                node.execs += exec as u32;
                file
            };
            self.handles.lock().insert(fh, Arc::new(handle(HandleIo::Direct(file.clone()), false)));
            return Ok(Opened {
                fh,
                passthrough: Some(file),
                keep_cache: true,
                needs_flush: false,
                direct_io: false,
            });
        }

        if !writable && !truncate && created.is_none() {
            // A reader with no writer around: the node's committed content, shared with its
            // other readers (a stage would only cost a lock per read). A commit of this node's
            // own writer later moves the readers to the new content, which is what the
            // kernel's size of the node says then.
            // Not even content a tier keeps (a blob in its cache) is handed to the kernel for
            // passthrough: the kernel takes one backing file per inode while any is open, so
            // a new content could not be opened while a program still reads the old one.
            if let Some(io) = self.reader_io(ino, content.clone(), exec)? {
                self.handles.lock().insert(fh, Arc::new(handle(io, false)));
                // No cached pages across opens: a reader that opened the previous content just
                // before another node's change can read it after the invalidation and so refill
                // the inode's page cache with old pages.
                return Ok(Opened {
                    fh,
                    passthrough: None,
                    keep_cache: false,
                    needs_flush: false,
                    direct_io: false,
                });
            }
            // A writer staged the node meanwhile: read through its stage.
        }
        // A handle whose open changed the file (created or truncated it) commits even when it
        // cannot write.
        let commits = writable || truncate || created.is_some();
        let existing = self.inodes.lock().get(ino).and_then(|n| n.stage.clone());
        let stage = match existing {
            Some(stage) => {
                if truncate {
                    stage.truncate_by_open()?;
                }
                stage
            }
            None => {
                let tier = self.tier(target);
                let fresh = match created {
                    // A new name the tier has not stored yet: its first commit creates it, even
                    // if nothing is written (`touch`).
                    Some((file, Some(None))) => Stage::created(Arc::new(file), self.spool.clone(), None),
                    // A new name the tier stored already (an exclusive create): its base.
                    Some((file, Some(rev))) => Stage::on(Arc::new(file), self.spool.clone(), rev),
                    Some((file, None)) if !truncate => {
                        Stage::on(Arc::new(file), self.spool.clone(), tier.revision(target))
                    }
                    _ if truncate => Stage::empty(self.spool.clone(), read_base.or_else(|| tier.revision(target)))?,
                    _ => {
                        let file = match content {
                            Some(content) => content.file,
                            None => Arc::new(self.open_tree_file(ino, libc::O_RDONLY)?),
                        };
                        Stage::on(file, self.spool.clone(), tier.revision(target))
                    }
                };
                let mut table = self.inodes.lock();
                let node = table.get_mut(ino).ok_or(FsError::UnknownInode(ino))?;
                match &node.stage {
                    Some(stage) => {
                        // Another open won the race; ours was never written.
                        fresh.discard();
                        stage.clone()
                    }
                    None => {
                        let stage = Arc::new(fresh);
                        node.stage = Some(stage.clone());
                        stage
                    }
                }
            }
        };
        {
            let mut table = self.inodes.lock();
            let node = table.get_mut(ino).ok_or(FsError::UnknownInode(ino))?;
            node.stage.get_or_insert_with(|| stage.clone());
            if let Some(current) = &node.current {
                current.follow(&stage);
            }
            node.opens += 1;
            node.execs += exec as u32;
        }
        if commits {
            stage.writers.fetch_add(1, Ordering::Relaxed);
        }
        self.handles.lock().insert(fh, Arc::new(handle(HandleIo::Staged(stage), commits)));
        Ok(Opened {
            fh,
            passthrough: None,
            keep_cache: false,
            needs_flush: true,
            direct_io: false,
        })
    }

    /// The reader handle of a staged node with no writer: its shared current content. Decided
    /// in one critical section with the count of opens, so a release in between cannot drop
    /// the shared slot, nor an install move the content under a reader that is joining; `None`
    /// when a writer staged the node meanwhile.
    fn reader_io(&self, ino: Ino, content: Option<Content>, exec: bool) -> Result<Option<HandleIo>, FsError> {
        if let Some(Content { file, arriving: Some(arrival) }) = content {
            self.count_open(ino, exec)?;
            return Ok(Some(HandleIo::Arriving { file, arrival }));
        }
        let mut content = content.map(|c| c.file);
        for _ in 0..3 {
            let shared = self.inodes.lock().get(ino).ok_or(FsError::UnknownInode(ino))?.current.is_some();
            // Opened before the lock: the table lock is never held across file system calls
            // that can wait on the disk.
            let opened = match (shared, content.take()) {
                (true, _) => None,
                (false, Some(file)) => Some((file, true)),
                (false, None) => Some((Arc::new(self.open_tree_file(ino, libc::O_RDONLY)?), false)),
            };
            let mut table = self.inodes.lock();
            let node = table.get_mut(ino).ok_or(FsError::UnknownInode(ino))?;
            if node.stage.is_some() {
                return Ok(None);
            }
            let current = match (&node.current, opened) {
                (Some(current), _) => current.clone(),
                (None, Some((file, from_tier))) => {
                    // The tree's file must still be the node's: an install in between moved it.
                    if !from_tier && tree::fstat(file.as_fd()).map(|st| Ident::of(&st)).ok() != Some(node.ident) {
                        continue;
                    }
                    node.current.insert(Arc::new(Current::new(file))).clone()
                }
                (None, None) => continue,
            };
            node.opens += 1;
            node.execs += exec as u32;
            return Ok(Some(HandleIo::Current(current)));
        }
        Err(FsError::os(libc::ESTALE))
    }

    fn count_open(&self, ino: Ino, exec: bool) -> Result<(), FsError> {
        let mut table = self.inodes.lock();
        let node = table.get_mut(ino).ok_or(FsError::UnknownInode(ino))?;
        node.opens += 1;
        node.execs += exec as u32;
        Ok(())
    }

    /// A handle on a file of an append tier: readers read the tree's file; writers share the
    /// inode's appender. The tree's file is never replaced (the tier appends to it in place),
    /// so a reader that keeps it open (`tail -f`) sees every later append.
    fn open_append(
        &self,
        ino: Ino,
        fh: u64,
        target: &Target,
        writable: bool,
        created: Option<(File, Option<Option<Revision>>)>,
        handle: impl FnOnce(HandleIo) -> Handle,
    ) -> Result<Opened, FsError> {
        let fresh = matches!(created, Some((_, Some(_))));
        let file = match created {
            Some((file, _)) => Arc::new(file),
            None => Arc::new(self.open_tree_file(ino, libc::O_RDONLY)?),
        };
        let io = {
            let mut table = self.inodes.lock();
            let node = table.get_mut(ino).ok_or(FsError::UnknownInode(ino))?;
            node.opens += 1;
            if writable {
                let appender = node
                    .appender
                    .get_or_insert_with(|| Arc::new(Appender::new(self.spool.clone(), fresh)))
                    .clone();
                let end = file.metadata()?.len() + appender.pending();
                HandleIo::Append {
                    file,
                    appender,
                    next: std::sync::atomic::AtomicU64::new(end),
                    target: target.clone(),
                }
            } else {
                HandleIo::Direct(file)
            }
        };
        self.handles.lock().insert(fh, Arc::new(handle(io)));
        Ok(Opened {
            fh,
            passthrough: None,
            keep_cache: false,
            needs_flush: writable,
            // One write(2) must reach the tier as one append: through the page cache the
            // kernel splits a write that starts in a page it has not read into a request for
            // the rest of that page and one for what follows, and another handle's commit
            // between the two published them as two messages with another node's between
            // (checker::concurrent_appends_have_one_order_on_three_nodes, once in a full run).
            direct_io: writable,
        })
    }

    /// Empties a file of an append tier (truncation to zero): the tier purges it, then what
    /// this node buffered for it is dropped too.
    fn purge(self: &Arc<Self>, ino: Ino, target: &Target) -> FsOp<()> {
        let this = self.clone();
        let noted = (self.clone(), target.clone());
        self.tier(target)
            .purge(target)
            .err_into()
            .inspect_err(move |e| noted.0.note_refusal(&noted.1, e))
            .and_then(move |()| {
                let appender = this.inodes.lock().get(ino).and_then(|n| n.appender.clone());
                if let Some(appender) = appender {
                    appender.clear();
                }
                this.invalidate_inode(ino);
                Ok(())
            })
    }

    /// Hands what an append handle's inode buffered to the tier, in order (see
    /// [`Appender`]). With `all` (fsync, last close) a created file with nothing written is
    /// appended as empty, so it exists on every node.
    fn append_commit(self: &Arc<Self>, ino: Ino, target: Target, appender: Arc<Appender>, all: bool, durable: bool) -> FsOp<()> {
        let this = self.clone();
        Op::pending(async move {
            let _order = appender.commit_lock.lock().await;
            if this.placement(ino)? == Placement::Unlinked {
                // A program on this node removed the file: what was appended since goes
                // nowhere, as with any unlinked file.
                appender.clear();
                return Ok(());
            }
            let segments = appender.take(all, || this.next_fh.fetch_add(1, Ordering::Relaxed));
            if segments.is_empty() {
                return Ok(());
            }
            // The handle's target, not the node's current name: a file another node removed
            // meanwhile is appended to again, as the path it was opened at.
            for (id, data) in segments {
                let (started, len) = (std::time::Instant::now(), data.len());
                let result = this.tier(&target).append(&target, id, data, durable).into_future().await;
                this.count(target.policy.tier, result.is_ok());
                if let Some(c) = this.counters.get(&target.policy.tier) {
                    c.commit_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if result.is_ok() {
                        c.bytes.fetch_add(len, Ordering::Relaxed);
                    }
                }
                match result {
                    Ok(_) => appender.done(id),
                    Err(e) => {
                        let e = FsError::from(e);
                        this.note_refusal(&target, &e);
                        return Err(e);
                    }
                }
            }
            this.clear_refusal(&target);
            this.report("append", &target, None, None);
            // The tree grew by what was buffered: sizes the kernel fetched meanwhile counted it twice.
            this.invalidate_inode(ino);
            Ok(())
        })
    }

    /// `create`: makes (or, without `O_EXCL`, opens) a regular file and opens it. With
    /// `O_EXCL` the tier makes the name exclusive across the cluster first.
    pub fn create(
        self: &Arc<Self>,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> FsOp<(Attr, Opened)> {
        let target = match self.target_in(parent, name).and_then(|t| super::writable(&t).map(|()| t)) {
            Ok(t) => t,
            Err(e) => return Op::err(e),
        };
        let exclusive = flags & libc::O_EXCL != 0;
        let read_base = self.read_base(caller, &target);
        let this = self.clone();
        let name = name.to_os_string();
        self.tier(&target)
            .create(&target, Kind::File, exclusive)
            .err_into()
            .and_then(move |rev| {
                let dir = this.dir_fd(parent)?;
                let cname = tree::cname(&name)?;
                let parent_st = tree::fstat(dir.as_fd())?;
                // When the tier stored the new entry itself, exclusivity was decided cluster-wide,
                // and the entry's own echo may already have put the file in the tree.
                let stored = rev.is_some();
                let (file, ino, created) = {
                    let mut table = this.inodes.lock();
                    let (fd, created) = match tree::open_content_at(
                        dir.as_fd(),
                        &cname,
                        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                        (mode & 0o7777) as libc::mode_t,
                    ) {
                        Ok(fd) => (fd, true),
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && (!exclusive || stored) => {
                            let fd = tree::open_content_at(dir.as_fd(), &cname, libc::O_RDWR, 0)?;
                            if stored {
                                // Made by the echo, with default mode: give it the caller's.
                                tree::chmod_fd(fd.as_fd(), mode & 0o7777)?;
                            }
                            (fd, stored)
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let file = File::from(fd);
                    if created {
                        this.own(&file, &parent_st, caller)?;
                    }
                    let st = tree::fstat(file.as_fd())?;
                    let ino = table.lookup(parent, &name, Ident::of(&st), Kind::File);
                    if created {
                        if let Some(node) = table.get_mut(ino) {
                            node.born = Some(std::time::Instant::now());
                        }
                    }
                    (file, ino, created)
                };
                if created {
                    this.report("create", &target, rev.as_ref(), None);
                }
                let fresh = (created || rev.is_some()).then_some(rev);
                let opening = Opening { flags, created: Some((file, fresh)), content: None, read_base, opener: caller.pid };
                let opened = match this.open_handle(ino, &target, opening) {
                    Ok(o) => o,
                    Err(e) => {
                        this.forget(ino, 1);
                        return Err(e);
                    }
                };
                Ok((this.getattr(ino)?, opened))
            })
    }

    /// Reads up to `size` bytes at `offset`. Ready at once, except for content still
    /// arriving, whose reads wait for their bytes.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsOp<Vec<u8>> {
        self.io.reads.fetch_add(1, Ordering::Relaxed);
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return Op::err(e),
        };
        let HandleIo::Arriving { arrival, .. } = &handle.io else {
            return Op::Ready(read_handle(&handle, offset, size));
        };
        let mut arrival = arrival.clone();
        let readable = arrival.borrow().readable(offset, size as u64);
        match readable {
            Ok(true) => return Op::Ready(read_handle(&handle, offset, size)),
            Err(e) => return Op::err(FsError::Tier(TierError::Backend(e))),
            Ok(false) => {}
        }
        Op::pending(async move {
            let ready = arrival
                .wait_for(|a| a.readable(offset, size as u64) != Ok(false))
                .await
                .map(|a| a.readable(offset, size as u64))
                .map_err(|_| FsError::Tier(TierError::Backend("the fetch stopped".into())))?;
            if let Err(e) = ready {
                return Err(FsError::Tier(TierError::Backend(e)));
            }
            read_handle(&handle, offset, size)
        })
    }

    /// Writes `data` at `offset` (at the end for `O_APPEND` handles).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        let handle = self.handle(fh)?;
        match &handle.io {
            // Opened for reading only; the kernel sends no writes for it.
            HandleIo::Arriving { .. } | HandleIo::Current(_) => return Err(FsError::os(libc::EBADF)),
            HandleIo::Direct(file) => {
                let offset = if handle.append {
                    file.metadata()?.len()
                } else {
                    offset
                };
                file.write_all_at(data, offset)?;
            }
            HandleIo::Staged(stage) => {
                if handle.append {
                    stage.append(data)?;
                } else {
                    stage.write_at(data, offset)?;
                }
                // New bytes: their own close decides.
                handle.refused.lock().take();
            }
            HandleIo::Append { file, appender, next, target } => {
                let checked = self.tier(target).check_append(target).map_err(FsError::from).and_then(|()| {
                    let end = file.metadata()?.len() + appender.pending();
                    // At the end of the file, or right after this handle's previous write
                    // (another node's append may have moved the end meanwhile).
                    if handle.append || offset == end || offset == next.load(Ordering::Relaxed) {
                        return Ok(end);
                    }
                    Err(FsError::Tier(TierError::Refused(format!(
                        "{} takes appends only: a write at offset {offset}, but the file ends at {end}",
                        target.path.display()
                    ))))
                });
                let end = match checked {
                    Ok(end) => end,
                    Err(e) => {
                        self.note_refusal(target, &e);
                        return Err(e);
                    }
                };
                appender.push(data)?;
                let at = if handle.append { end } else { offset };
                next.store(at + data.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(data.len() as u32)
    }

    /// `fallocate`.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
        let handle = self.handle(fh)?;
        match &handle.io {
            HandleIo::Direct(file) => {
                // SAFETY: valid fd; plain integer arguments.
                let ret = unsafe {
                    libc::fallocate(
                        std::os::fd::AsRawFd::as_raw_fd(file.as_ref()),
                        mode,
                        offset as libc::off_t,
                        length as libc::off_t,
                    )
                };
                if ret < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                Ok(())
            }
            // On the stage's copy, committed at close like a write.
            HandleIo::Staged(stage) => Ok(stage.fallocate(mode, offset, length)?),
            HandleIo::Append { .. } | HandleIo::Arriving { .. } | HandleIo::Current(_) => Err(FsError::os(libc::EOPNOTSUPP)),
        }
    }

    /// `flush` (every close): commits what a writable handle of a staged file wrote.
    pub fn flush(self: &Arc<Self>, fh: u64) -> FsOp<()> {
        match self.handle(fh) {
            Err(e) => Op::err(e),
            Ok(handle) => match &handle.io {
                HandleIo::Staged(stage) if handle.commits => {
                    if let Some(errno) = *handle.refused.lock() {
                        return Op::err(FsError::os(errno));
                    }
                    let commit = self.commit(handle.ino, stage.clone(), Commit::Flush, Some(handle.opener));
                    remember_refusal(commit, handle.clone())
                }
                HandleIo::Append { appender, target, .. } => {
                    self.append_commit(handle.ino, target.clone(), appender.clone(), false, false)
                }
                _ => Op::ok(()),
            },
        }
    }

    /// `fsync`: commits a staged file durably, or syncs an in-place file to disk.
    pub fn fsync(self: &Arc<Self>, fh: u64, datasync: bool) -> FsOp<()> {
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return Op::err(e),
        };
        match &handle.io {
            HandleIo::Staged(stage) => {
                if let Some(errno) = *handle.refused.lock() {
                    return Op::err(FsError::os(errno));
                }
                let commit = self.commit(handle.ino, stage.clone(), Commit::Fsync, Some(handle.opener));
                remember_refusal(commit, handle.clone())
            }
            HandleIo::Append { appender, target, .. } => self.append_commit(handle.ino, target.clone(), appender.clone(), true, true),
            // A reader's fsync: nothing of its own to make durable.
            HandleIo::Arriving { .. } | HandleIo::Current(_) => Op::ok(()),
            HandleIo::Direct(file) => {
                let file = file.clone();
                Op::pending(async move {
                    tokio::task::spawn_blocking(move || {
                        if datasync {
                            file.sync_data()
                        } else {
                            file.sync_all()
                        }
                    })
                    .await
                    .map_err(|e| FsError::Io(std::io::Error::other(e)))??;
                    Ok(())
                })
            }
        }
    }

    /// `release`: the last close of a handle. Commits writes that no flush committed (shared
    /// mappings write back late); errors here reach no program, so they are only logged.
    pub fn release(self: &Arc<Self>, fh: u64) -> FsOp<()> {
        let Some(handle) = self.handles.lock().remove(&fh) else {
            return Op::err(FsError::UnknownHandle(fh));
        };
        let (ino, exec, opener) = (handle.ino, handle.exec, handle.opener);
        if let HandleIo::Append { appender, target, .. } = &handle.io {
            let this = self.clone();
            let commit = self.append_commit(ino, target.clone(), appender.clone(), true, false);
            drop(handle);
            return Op::pending(async move {
                if let Err(e) = commit.into_future().await {
                    tracing::warn!(ino, error = %e, "append at release failed; it was not stored");
                }
                this.finish_release(ino, None, exec);
                Ok(())
            });
        }
        let (stage, commit) = match &handle.io {
            HandleIo::Staged(stage) => {
                let last_writer = handle.commits && stage.writers.fetch_sub(1, Ordering::Relaxed) == 1;
                (Some(stage.clone()), last_writer && stage.needs_commit())
            }
            HandleIo::Direct(_) | HandleIo::Current(_) | HandleIo::Append { .. } | HandleIo::Arriving { .. } => (None, false),
        };
        if matches!(handle.io, HandleIo::Direct(_)) && handle.writable {
            // An in-place file (the local tier): its writes never reach the core one by one
            // (passthrough), so the feed reports the close of a writer.
            if let Ok(target) = self.target_of(ino) {
                self.report("write", &target, None, None);
            }
        }
        // From here on the handle's stage is referenced by `stage` and by other handles only.
        drop(handle);
        match stage {
            Some(stage) if commit => {
                let this = self.clone();
                let commit = self.commit(ino, stage.clone(), Commit::Release, Some(opener));
                Op::pending(async move {
                    if let Err(e) = commit.into_future().await {
                        tracing::warn!(ino, error = %e, "commit at release failed; the stored file is unchanged");
                    }
                    this.finish_release(ino, Some(stage), exec);
                    Ok(())
                })
            }
            stage => {
                self.finish_release(ino, stage, exec);
                Op::ok(())
            }
        }
    }

    /// Counts a handle of `ino` closed; `stage` is the handle's stage, if it had one, `exec`
    /// whether it was opened to execute the file.
    fn finish_release(&self, ino: Ino, stage: Option<Arc<Stage>>, exec: bool) {
        let mut table = self.inodes.lock();
        let Some(node) = table.get_mut(ino) else {
            return;
        };
        node.opens = node.opens.saturating_sub(1);
        node.execs = node.execs.saturating_sub(exec as u32);
        let mut refused = false;
        if let Some(stage) = stage {
            // A stage another node's change detached from the inode, closed by its last
            // handle: nothing else will drop its shadow.
            let detached = !node.stage.as_ref().is_some_and(|s| Arc::ptr_eq(s, &stage));
            if detached && Arc::strong_count(&stage) == 1 {
                refused |= stage.is_refused();
                stage.discard();
            }
        }
        if node.opens == 0 {
            node.file = None;
            node.current = None;
            node.appender = None;
            if let Some(stage) = node.stage.take() {
                refused = stage.is_refused();
                stage.discard();
            }
        }
        table.maybe_drop(ino);
        drop(table);
        if refused {
            // The kernel's page cache may still hold the refused content.
            self.invalidate_inode(ino);
        }
    }

    /// Changes a file's size. A staged file changed without an open writer commits at once.
    /// A file of an append tier can only be emptied (a purge), or "resized" to its own size.
    pub(super) fn resize(self: &Arc<Self>, ino: Ino, size: u64, fh: Option<u64>) -> FsOp<()> {
        let special = (|| {
            if self.kind(ino)? != Kind::File {
                return Ok(None);
            }
            let target = self.target_of(ino)?;
            let tier = self.tier(&target).clone();
            if let Some(max) = tier.max_file_size(&target).filter(|max| size > *max) {
                // Like a filesystem's largest file size: refused when set, nothing changes.
                let e = FsError::Tier(TierError::TooBig(format!(
                    "{} cannot be {size} bytes: its tier stores files up to {max} bytes",
                    target.path.display()
                )));
                self.note_refusal(&target, &e);
                return Err(e);
            }
            if tier.write_mode() == WriteMode::Append {
                let current = self.getattr(ino)?.size;
                if size == current {
                    return Ok(Some(Op::ok(())));
                }
                if size != 0 {
                    let e = FsError::Tier(TierError::Refused(format!(
                        "{} takes appends only: it can be truncated to zero, not to {size} bytes",
                        target.path.display()
                    )));
                    self.note_refusal(&target, &e);
                    return Err(e);
                }
                return Ok(Some(self.purge(ino, &target)));
            }
            let own_stage = fh.and_then(|fh| self.handle(fh).ok()).is_some_and(|h| matches!(h.io, HandleIo::Staged(_)));
            if tier.keeps_content() && size > 0 && !own_stage && !self.has_stage(ino) {
                // The tree holds a placeholder: the stage must start from the real content.
                if let Some(rev) = self.content_tag(ino)? {
                    let this = self.clone();
                    let spool = self.spool.clone();
                    let op = tier.content(&target, &rev, true).err_into::<FsError>().and_then(move |content| {
                        let stage = Arc::new(Stage::on(content.file, spool, None));
                        stage.set_len(size)?;
                        Ok(stage)
                    });
                    return Ok(Some(Op::pending(async move {
                        let stage = op.into_future().await?;
                        let result = this.commit(ino, stage.clone(), Commit::Release, None).into_future().await;
                        stage.discard();
                        result
                    })));
                }
            }
            Ok(None)
        })();
        match special {
            Err(e) => return Op::err(e),
            Ok(Some(op)) => return op,
            Ok(None) => {}
        }
        let result = (|| {
            match self.kind(ino)? {
                Kind::File => {}
                Kind::Dir => return Err(FsError::os(libc::EISDIR)),
                _ => return Err(FsError::os(libc::EINVAL)),
            }
            let handle = fh.and_then(|fh| self.handle(fh).ok());
            if let Some(HandleIo::Direct(file)) = handle.as_ref().map(|h| &h.io) {
                file.set_len(size)?;
                return Ok(None);
            }
            let target = self.target_of(ino)?;
            if !self.is_staged(&target) {
                let file = self.inodes.lock().get(ino).and_then(|n| n.file.clone());
                match file {
                    Some(file) => file.set_len(size)?,
                    None => self.open_tree_file(ino, libc::O_WRONLY)?.set_len(size)?,
                }
                return Ok(None);
            }
            // The caller's own stage (it may have been detached by another node's change),
            // else the inode's.
            let own = match handle.as_ref().map(|h| &h.io) {
                Some(HandleIo::Staged(stage)) => Some(stage.clone()),
                _ => None,
            };
            let existing = match own {
                Some(stage) => Some(stage),
                None => {
                    // A truncate by path through the node's stage holds the stage like an open
                    // file until it committed: a release in between must not drop it.
                    let mut table = self.inodes.lock();
                    let node = table.get_mut(ino).ok_or(FsError::UnknownInode(ino))?;
                    let stage = node.stage.clone();
                    if stage.is_some() {
                        node.opens += 1;
                    }
                    stage
                }
            };
            match existing {
                Some(stage) => {
                    if let Err(e) = stage.set_len(size) {
                        if fh.is_none() {
                            self.finish_release(ino, Some(stage), false);
                        }
                        return Err(e.into());
                    }
                    // A writer's close commits it; a truncate by path commits now.
                    Ok(fh.is_none().then_some((stage, false)))
                }
                None => {
                    let file = self.open_tree_file(ino, libc::O_RDONLY)?;
                    let stage = Arc::new(Stage::on(Arc::new(file), self.spool.clone(), None));
                    stage.set_len(size)?;
                    Ok(Some((stage, true)))
                }
            }
        })();
        match result {
            Err(e) => Op::err(e),
            Ok(None) => Op::ok(()),
            Ok(Some((stage, transient))) => {
                let commit = self.commit(ino, stage.clone(), Commit::Release, None);
                let this = self.clone();
                Op::pending(async move {
                    let result = commit.into_future().await;
                    if transient {
                        stage.discard();
                    } else {
                        this.finish_release(ino, Some(stage), false);
                    }
                    result
                })
            }
        }
    }

    /// Commits a stage: freeze, validate, hand to the tier, install into the tree. `opener`
    /// is the thread that opened the committing handle: on merge paths its process has then
    /// read what it committed (the base of its next write).
    fn commit(self: &Arc<Self>, ino: Ino, stage: Arc<Stage>, when: Commit, opener: Option<u32>) -> FsOp<()> {
        let this = self.clone();
        let durable = when == Commit::Fsync;
        Op::pending(async move {
            let _order = stage.commit_lock.lock().await;
            let placement = this.placement(ino);
            let Some(frozen) = stage.freeze(when != Commit::Flush) else {
                // An O_TRUNC open with nothing written yet waits for release, whose errors reach
                // no program: a validated file checks that empty content at close instead, so
                // `: > file` fails like `truncate -s 0`. Nothing changes: a write still may.
                if when == Commit::Flush && stage.needs_commit() && stage.owns_shadow() {
                    if let Ok(Placement::Named(path) | Placement::Taken(path)) = &placement {
                        let target = this.target(path.clone());
                        if super::validates(&target) {
                            this.validate(&target, &stage.file())?;
                        }
                    }
                }
                if !durable {
                    return Ok(());
                }
                // Nothing new, but an earlier flush may have installed without syncing.
                let t = this.clone();
                return blocking(move || Ok(t.open_tree_file(ino, libc::O_RDONLY)?.sync_all()?)).await;
            };
            let target = match placement {
                Err(e) => {
                    stage.thaw(frozen);
                    return Err(e);
                }
                // A program on this node removed the file: as on any filesystem, what its open
                // descriptors write reaches no path (they still read it back).
                Ok(Placement::Unlinked) => {
                    stage.keep(frozen);
                    return Ok(());
                }
                Ok(Placement::Named(path) | Placement::Taken(path)) => this.target(path),
            };
            let started = std::time::Instant::now();
            let result = this.commit_frozen(ino, &target, &stage, &frozen, durable).await;
            this.count(target.policy.tier, result.is_ok());
            if let Some(c) = this.counters.get(&target.policy.tier) {
                c.commit_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                if result.is_ok() {
                    let len = frozen.file.metadata().map(|m| m.len()).unwrap_or(0);
                    c.bytes.fetch_add(len, Ordering::Relaxed);
                }
            }
            match &result {
                Ok(_) => this.clear_refusal(&target),
                Err(e) => this.note_refusal(&target, e),
            }
            let keeps_content = this.tier(&target).keeps_content();
            match result {
                Ok(Installed::Yes(rev)) => {
                    stage.installed();
                    this.report("write", &target, rev.as_ref(), None);
                    if let Some(opener) = opener {
                        this.note_read(Caller { uid: 0, gid: 0, pid: opener }, &target, rev);
                    }
                    Ok(())
                }
                Ok(Installed::Lost) => {
                    // A newer version won: the descriptor reads what the node holds now, and
                    // the kernel forgets what this writer wrote.
                    this.fall_back(ino, &stage, frozen, keeps_content).await;
                    Ok(())
                }
                Err(e) if e.is_final() => {
                    // Refused for good: the descriptor reads the stored content again, and the
                    // kernel forgets the refused size and pages before the program hears of
                    // the refusal (a stat after close must not show them).
                    this.fall_back(ino, &stage, frozen, keeps_content).await;
                    Err(e)
                }
                // Worth retrying (EAGAIN, a full disk): an fsync may commit it later.
                Err(e) => {
                    stage.thaw(frozen);
                    Err(e)
                }
            }
        })
    }

    /// Puts a stage whose content did not land back on what the node holds, and waits until
    /// the kernel dropped the node's cached attributes and pages.
    async fn fall_back(&self, ino: Ino, stage: &Stage, frozen: Frozen, keeps_content: bool) {
        // A placeholder is not content: a tier that keeps content keeps the writer's bytes on
        // the stage instead (they read as written; nothing is committed).
        let stored = if keeps_content { None } else { self.open_tree_file(ino, libc::O_RDONLY).ok() };
        match stored {
            Some(file) => stage.revert(frozen, Arc::new(file)),
            None => stage.thaw(frozen),
        }
        if let Some(k) = self.kernel.get() {
            let _ = k.invalidate_inode_acked(ino).await;
        }
    }

    async fn commit_frozen(
        self: &Arc<Self>,
        ino: Ino,
        target: &Target,
        stage: &Stage,
        frozen: &Frozen,
        durable: bool,
    ) -> Result<Installed, FsError> {
        // Validation reads at most 1 MiB of a file that was just written (in the page cache):
        // cheaper inline than a hop to the blocking pool.
        self.validate(target, &frozen.file)?;
        let rev = self
            .tier(target)
            .commit(target, frozen.file.clone(), stage.base(), durable)
            .into_future()
            .await?;
        stage.set_base(rev.clone());
        let installed = if durable {
            // fsync can stall: keep it off the runtime's workers.
            let (t, file, name, r) = (self.clone(), frozen.file.clone(), frozen.name.clone(), rev.clone());
            blocking(move || t.install(ino, &file, name.as_ref(), r, true)).await?
        } else {
            // A handful of metadata calls and a rename on the local tree.
            self.install(ino, &frozen.file, frozen.name.as_ref(), rev.clone(), false)?
        };
        if !installed {
            return Ok(Installed::Lost);
        }
        if frozen.name.is_some() {
            // The rename that installed it gave the file a new change time: the kernel's
            // cached one must go before the program hears the commit is done.
            if let Some(k) = self.kernel.get() {
                let _ = k.invalidate_attrs_acked(ino).await;
            }
        }
        Ok(Installed::Yes(rev))
    }

    fn count(&self, tier: crate::policy::TierKind, ok: bool) {
        if let Some(c) = self.counters.get(&tier) {
            let counter = if ok { &c.commits } else { &c.refused };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Checks content the core validates: the policy file must parse and name only tiers this
    /// build has (or the next mount would refuse it); a document under a policy with a
    /// `schema` must parse and satisfy it.
    pub(super) fn validate(&self, target: &Target, file: &File) -> Result<(), FsError> {
        let is_policy_file = target.path == Path::new(POLICY_FILE);
        if !is_policy_file && target.policy.schema.is_none() {
            return Ok(());
        }
        let invalid = |reason: String| FsError::InvalidContent {
            path: target.path.clone(),
            reason,
        };
        let len = file.metadata()?.len();
        if len > MAX_VALIDATED_SIZE {
            return Err(invalid(format!("larger than {MAX_VALIDATED_SIZE} bytes, the most syncfs validates")));
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0)?;
        if let Some(schema) = &target.policy.schema {
            self.schemas.check(schema, &target.path, &bytes).map_err(invalid)?;
        }
        if is_policy_file {
            let text = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
            let at = |e: crate::policy::PolicyError| invalid(format!("line {}, column {}: {}", e.line, e.col, e.reason));
            PolicyTable::parse(&text, Path::new(POLICY_FILE)).map_err(at)?;
        }
        Ok(())
    }

    /// Checks a merge result against the path's schema (the durable tier's merges): an invalid
    /// result becomes a conflict instead.
    pub fn check_schema(&self, path: &Path, content: &[u8]) -> Result<(), String> {
        let target = self.target(path.to_path_buf());
        match &target.policy.schema {
            Some(schema) => self.schemas.check(schema, path, content),
            None => Ok(()),
        }
    }

    /// Records why a commit of `target` was refused, for `user.syncfs.error` and the log.
    pub(super) fn note_refusal(&self, target: &Target, e: &FsError) {
        let reason = match e {
            FsError::InvalidContent { reason, .. } => reason.clone(),
            FsError::Tier(t @ (TierError::Refused(_) | TierError::Invalid(_) | TierError::TooBig(_))) => t.to_string(),
            _ => return,
        };
        tracing::warn!(path = %target.path.display(), %reason, "write refused; the stored version is unchanged");
        self.errors.lock().insert(target.path.clone(), reason);
    }

    pub(super) fn clear_refusal(&self, target: &Target) {
        let mut errors = self.errors.lock();
        if !errors.is_empty() {
            errors.remove(&target.path);
        }
    }

    /// Why the last write of `path` was refused, if it was.
    pub(super) fn refusal(&self, path: &Path) -> Option<String> {
        self.errors.lock().get(path).cloned()
    }

    /// Replaces the tree's file of `ino` with a committed shadow: same owner, mode and user
    /// attributes, then an atomic rename. With `durable`, data and the rename reach the disk.
    /// When the tier already installed a newer revision (another node's change arrived while
    /// this commit was in flight) the shadow is dropped instead: the newer content stays.
    /// A node whose name another node's change took installs at the path it had, as a new
    /// version of it (see [`Core::replace_name`]); the kernel then finds this node there again.
    ///
    /// `spool_name` is the shadow's name in the spool; `None` when the shadow is the tree's
    /// file itself (a created file committed as it is), which then stays where it is. Returns
    /// whether the content landed (not when a newer version won).
    fn install(
        &self,
        ino: Ino,
        shadow: &Arc<File>,
        spool_name: Option<&CString>,
        rev: Option<Revision>,
        durable: bool,
    ) -> Result<bool, FsError> {
        let old = self.node_fd(ino)?;
        let target = self.target_of(ino)?;
        let keeps_content = self.tier(&target).keeps_content();
        let in_place = spool_name.is_none() && !keeps_content && self.placement(ino)? != Placement::Unlinked;
        if in_place && matches!(self.placement(ino)?, Placement::Named(_)) {
            // Committed as it is: only the tier's record of what the tree holds changes.
            let table = self.inodes.lock();
            let same = table.get(ino).is_some_and(|n| tree::fstat(shadow.as_fd()).is_ok_and(|st| Ident::of(&st) == n.ident));
            let admitted = self.tier(&target).admit(&target, rev.as_ref());
            drop(table);
            if durable && same {
                shadow.sync_all()?;
            }
            return Ok(admitted);
        }
        // Anything else moves a file into place: a copy of an in-place file whose name was
        // taken, a placeholder, or the shadow itself.
        let copied = match spool_name {
            Some(_) => None,
            None if keeps_content => None,
            None => Some(self.spool_copy(shadow)?),
        };
        let spool_name = match (&copied, spool_name) {
            (Some((_, name)), _) => name.clone(),
            (None, Some(name)) => name.clone(),
            (None, None) => CString::default(),
        };
        let spool_name = &spool_name;
        let placeholder = if keeps_content {
            // The tier holds the content now; the tree gets its placeholder.
            let stub = self.placeholder(Ok(old.as_fd()), shadow.metadata()?.len(), rev.as_ref());
            if !spool_name.is_empty() {
                self.spool.remove(spool_name);
            }
            Some(stub?)
        } else {
            let moved = copied.as_ref().map(|(f, _)| f).unwrap_or(shadow.as_ref());
            tree::copy_metadata(old.as_fd(), moved)?;
            if durable {
                moved.sync_all()?;
            }
            None
        };
        let (file, spool_name) = match (&placeholder, &copied) {
            (Some((file, name)), _) => (file, name),
            (None, Some((file, name))) => (file, name),
            (None, None) => (shadow.as_ref(), spool_name),
        };
        let mut inval = Vec::new();
        let mut synced_dir = None;
        for _ in 0..3 {
            let placement = self.placement(ino)?;
            let (dir, link) = match &placement {
                Placement::Named(_) => {
                    let link = self.inodes.lock().get(ino).and_then(|n| n.links.first().cloned());
                    let (parent, name) = link.ok_or(FsError::os(libc::ENOENT))?;
                    (self.dir_fd(parent)?, (parent, name))
                }
                Placement::Taken(path) => {
                    let parent = path.parent().unwrap_or(Path::new(""));
                    let name = path.file_name().ok_or(FsError::os(libc::EINVAL))?.to_os_string();
                    (self.ensure_dir(parent, &mut inval)?, (0, name))
                }
                Placement::Unlinked => {
                    tracing::debug!(ino, path = %target.path.display(), "committed, but removed here meanwhile: not installed");
                    self.spool.remove(spool_name);
                    return Ok(false);
                }
            };
            let name = link.1.clone();
            let cname = tree::cname(&name)?;
            let mut table = self.inodes.lock();
            let node = table.get(ino).ok_or(FsError::UnknownInode(ino))?;
            let unchanged = match &placement {
                Placement::Named(_) => node.links.first() == Some(&link) && table.path(ino).is_some(),
                Placement::Taken(path) => node.links.is_empty() && node.orphan.as_ref().is_some_and(|o| o.remote && o.path == *path),
                Placement::Unlinked => false,
            };
            if !unchanged {
                // Renamed, or its name taken, while the commit was in flight: look again.
                continue;
            }
            let current = node.current.clone();
            if !self.tier(&target).admit(&target, rev.as_ref()) {
                drop(table);
                self.spool.remove(spool_name);
                self.send(inval);
                return Ok(false);
            }
            match &placement {
                Placement::Named(_) => {
                    tree::rename_at(self.spool.dir().as_fd(), spool_name, dir.as_fd(), &cname, 0)?;
                    table.set_ident(ino, Ident::of(&tree::fstat(file.as_fd())?));
                }
                _ => {
                    let path = target.path.clone();
                    let new = self.replace_name(&mut table, &dir, &name, &path, spool_name, &mut inval)?;
                    table.set_ident(ino, new);
                    let fd = Arc::new(std::os::fd::OwnedFd::from(tree::reopen(file.as_fd(), libc::O_PATH)?));
                    if let Some(node) = table.get_mut(ino) {
                        node.orphan = Some(super::inode::Orphan { fd, path, remote: true });
                    }
                }
            }
            drop(table);
            // Readers of this node read what its writer committed, as the kernel's size says.
            if let Some(current) = current {
                current.set(shadow.clone());
            }
            synced_dir = Some(dir);
            break;
        }
        self.send(inval);
        let Some(dir) = synced_dir else {
            tracing::warn!(ino, path = %target.path.display(), "committed, but renamed here three times meanwhile: not installed");
            self.spool.remove(spool_name);
            return Err(FsError::os(libc::ESTALE));
        };
        if durable {
            File::from(tree::open_at(dir.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?)
                .sync_all()?;
        }
        Ok(true)
    }

    /// A copy of `file` in the spool, to move into the tree.
    fn spool_copy(&self, file: &File) -> Result<(File, CString), FsError> {
        let (mut copy, name) = self.spool.create()?;
        let copied = std::io::copy(&mut tree::ReadAt::new(file), &mut copy);
        if let Err(e) = copied {
            self.spool.remove(&name);
            return Err(e.into());
        }
        Ok((copy, name))
    }
}

impl Core {
    /// A new placeholder in the spool for content a tier keeps: a sparse file of `size`
    /// bytes with the metadata of `like` (or `mode`, for a new file) and the content's
    /// revision as its tag.
    pub(super) fn placeholder(
        &self,
        like: Result<std::os::fd::BorrowedFd<'_>, u32>,
        size: u64,
        rev: Option<&Revision>,
    ) -> Result<(File, CString), FsError> {
        let (file, name) = self.spool.create()?;
        let made = (|| {
            file.set_len(size)?;
            match like {
                Ok(like) => tree::copy_metadata(like, &file)?,
                Err(mode) => tree::chmod_fd(file.as_fd(), mode)?,
            }
            match rev {
                Some(rev) => tree::set_xattr(file.as_fd(), CONTENT_TAG, rev.0.as_bytes(), 0)?,
                None => match tree::remove_xattr(file.as_fd(), CONTENT_TAG) {
                    Err(e) if e.raw_os_error() != Some(libc::ENODATA) => return Err(e),
                    _ => {}
                },
            }
            Ok::<_, std::io::Error>(())
        })();
        match made {
            Ok(()) => Ok((file, name)),
            Err(e) => {
                self.spool.remove(&name);
                Err(e.into())
            }
        }
    }
}

/// Whether a commit's content landed in the tree.
enum Installed {
    /// It did; its revision.
    Yes(Option<Revision>),
    /// A newer version was there first.
    Lost,
}

/// What asks for a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// A `close()`: commits what was written.
    Flush,
    /// An `fsync()`: commits everything, durably.
    Fsync,
    /// The last close, or a truncate by path: commits everything.
    Release,
}

/// A staged commit of `handle` that, refused for good, stays refused for the descriptor's
/// other copies (see [`Handle::refused`]).
fn remember_refusal(commit: FsOp<()>, handle: Arc<Handle>) -> FsOp<()> {
    commit.inspect_err(move |e| {
        if e.is_final() {
            *handle.refused.lock() = Some(e.errno());
        }
    })
}

/// Reads up to `size` bytes at `offset` of a handle's content.
fn read_handle(handle: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
    let file = handle.read_file();
    let mut buf = vec![0u8; size as usize];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let HandleIo::Append { appender, .. } = &handle.io {
        // What this node wrote and the tier has not appended yet follows the tree's file.
        let len = file.metadata()?.len();
        while done < buf.len() && offset + done as u64 >= len {
            match appender.read_at(&mut buf[done..], offset + done as u64 - len)? {
                0 => break,
                n => done += n,
            }
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Runs blocking file work off the runtime's worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FsError::Io(std::io::Error::other(e)))?
}
