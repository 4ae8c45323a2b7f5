//! The FUSE adapter: each kernel request becomes one call on [`Core`], and its answer a reply.
//!
//! Nothing here decides filesystem behaviour. The adapter converts fuser's types, answers
//! ready operations on the fuser worker thread, and moves pending ones (which wait on a tier)
//! into a task on the tokio runtime together with their reply object, so a FUSE thread never
//! waits on the network. It also owns the two kernel-facing details the core must not know:
//! passthrough backing ids (one per inode while it has passthrough handles) and the
//! [`fuser::Notifier`] that drops the kernel's caches.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    CopyFileRangeFlags, IoctlFlags, PollEvents, PollFlags, PollNotifier, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek,
    ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tracing::Instrument;

use crate::fs::{Attr, Caller, Core, FsError, FsOp, Ino, Kind, KernelCache, Opened, SetAttr, SetTime};
use crate::op::Op;

/// Settings of the adapter.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// How long the kernel may cache names and attributes. Safe to be long: every change made
    /// behind the kernel's back is followed by an explicit invalidation.
    pub ttl: Duration,
    /// Ask the kernel for FUSE passthrough of in-place files.
    pub passthrough: bool,
    /// Stacking depth of the tree's filesystem plus one (2 when the tree is on overlayfs).
    pub max_stack_depth: u32,
    /// Set once the kernel agreed to passthrough, for `syncfs status`.
    pub passthrough_active: Arc<std::sync::atomic::AtomicBool>,
}

/// A registered backing file of an inode.
struct Backing {
    id: BackingId,
    /// Open handles using it.
    open: usize,
    /// (device, inode) of the backing file: a blob's content file changes with its content.
    file: (u64, u64),
}

#[derive(Default)]
struct Passthrough {
    /// Backing file per inode, with the number of open handles using it. Kept after the last
    /// handle closes, until the kernel forgets the inode, so that re-opening a file costs no
    /// backing registration (two ioctls); the kernel requires one backing per inode anyway.
    by_ino: HashMap<Ino, Backing>,
    /// Handles opened with passthrough.
    handles: HashSet<u64>,
    /// Turned off for the session after a backing open failed.
    broken: bool,
}

/// The `fuser::Filesystem` of a syncfs mount.
pub struct FuseAdapter {
    core: Arc<Core>,
    rt: tokio::runtime::Handle,
    config: AdapterConfig,
    /// Whether the kernel agreed to passthrough (decided in `init`).
    passthrough_on: bool,
    passthrough: Arc<Mutex<Passthrough>>,
}

impl FuseAdapter {
    /// An adapter over `core`, running pending operations on `rt`.
    pub fn new(core: Arc<Core>, rt: tokio::runtime::Handle, config: AdapterConfig) -> Self {
        FuseAdapter {
            core,
            rt,
            config,
            passthrough_on: false,
            passthrough: Arc::new(Mutex::new(Passthrough::default())),
        }
    }

    /// Answers an operation: now if ready, else from a runtime task.
    fn answer<T: Send + 'static>(
        &self,
        op: FsOp<T>,
        what: &'static str,
        done: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) {
        match op {
            Op::Ready(result) => done(result.map_err(|e| errno(what, &e))),
            Op::Pending(future) => {
                let span = tracing::Span::current();
                self.rt.spawn(
                    async move { done(future.await.map_err(|e| errno(what, &e))) }.instrument(span),
                );
            }
        }
    }

    fn file_attr(&self, attr: &Attr) -> FileAttr {
        file_attr(attr)
    }

    fn reply_open(&self, ino: Ino, opened: Opened, flags: FopenFlags, reply: ReplyOpen) {
        reply_open(&self.passthrough, self.passthrough_on, ino, opened, flags, reply);
    }

    fn passthrough_backing(
        &self,
        ino: Ino,
        opened: &Opened,
        open_backing: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<()> {
        passthrough_backing(&self.passthrough, self.passthrough_on, ino, opened, open_backing)
    }

    fn release_backing(&self, ino: Ino, fh: u64) {
        let mut pt = self.passthrough.lock();
        if pt.handles.remove(&fh) {
            if let Some(entry) = pt.by_ino.get_mut(&ino) {
                entry.open -= 1;
            }
        }
    }

    /// The kernel evicted the inode: drop its idle backing.
    fn forget_backing(&self, ino: Ino) {
        drop_idle_backing(&self.passthrough, ino);
    }

    /// A closure that drops an inode's idle backing, for replies answered from a task.
    fn clone_passthrough_dropper(&self) -> impl Fn(Ino) + Send + 'static {
        let pt = self.passthrough.clone();
        move |ino| drop_idle_backing(&pt, ino)
    }

    fn open_flags(opened: &Opened) -> FopenFlags {
        let mut flags = FopenFlags::empty();
        if opened.keep_cache {
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        if !opened.needs_flush {
            flags |= FopenFlags::FOPEN_NOFLUSH;
        }
        if opened.direct_io {
            flags |= FopenFlags::FOPEN_DIRECT_IO;
        }
        flags
    }
}

/// Answers an open, with passthrough when the core offered a file for it and the kernel agrees.
fn reply_open(pt: &Mutex<Passthrough>, on: bool, ino: Ino, opened: Opened, flags: FopenFlags, reply: ReplyOpen) {
    if passthrough_backing(pt, on, ino, &opened, |fd| reply.open_backing(fd)).is_some() {
        let pt = pt.lock();
        let flags = flags & PASSTHROUGH_FLAGS;
        reply.opened_passthrough(FileHandle(opened.fh), flags, &pt.by_ino[&ino].id);
    } else {
        reply.opened(FileHandle(opened.fh), flags);
    }
}

/// Registers (or reuses) the inode's backing file for a passthrough handle. Returns
/// `Some(())` when the handle is to be answered with passthrough. The kernel takes one backing
/// file per inode while any passthrough handle is open: a handle whose file is another one (a
/// blob whose content changed while its old content is still open) goes through the daemon.
fn passthrough_backing(
    pt: &Mutex<Passthrough>,
    on: bool,
    ino: Ino,
    opened: &Opened,
    open_backing: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
) -> Option<()> {
    if !on {
        return None;
    }
    let file = opened.passthrough.as_ref()?;
    let meta = file.metadata().ok()?;
    let ident = (std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta));
    let mut pt = pt.lock();
    if pt.broken {
        return None;
    }
    match pt.by_ino.get_mut(&ino) {
        Some(b) if b.file == ident => b.open += 1,
        Some(b) if b.open > 0 => return None,
        _ => match open_backing(file) {
            Ok(id) => {
                // Replacing an idle backing of other content closes it.
                pt.by_ino.insert(ino, Backing { id, open: 1, file: ident });
            }
            Err(e) => {
                tracing::warn!(error = %e, "FUSE passthrough refused by the kernel; serving I/O through syncfs from now on");
                pt.broken = true;
                return None;
            }
        },
    }
    pt.handles.insert(opened.fh);
    Some(())
}

/// Drops an inode's backing if no handle uses it. Called when the kernel evicts the inode and
/// when the file loses its last name: the backing holds the file open, so after an unlink this
/// is where its storage is freed, within the unlink as on a native filesystem.
fn drop_idle_backing(pt: &Mutex<Passthrough>, ino: Ino) {
    let mut pt = pt.lock();
    if pt.by_ino.get(&ino).is_some_and(|b| b.open == 0) {
        pt.by_ino.remove(&ino);
    }
}

/// Converts a core error to an errno, logging it once: expected ones at debug level, the
/// others as a warning at most once a minute per operation and message (a program retrying
/// a refused rename in a loop wrote 28,000 lines in 10 s); the next warning counts the
/// repeats left out.
fn errno(what: &'static str, e: &FsError) -> Errno {
    let code = e.errno();
    if e.is_expected() {
        tracing::debug!(op = what, errno = code, "{e}");
    } else {
        let message = e.to_string();
        match WARNINGS.lock().admit(what, &message, std::time::Instant::now()) {
            Some(repeats) => tracing::warn!(op = what, errno = code, repeats, "{message}"),
            None => tracing::debug!(op = what, errno = code, "{message}"),
        }
    }
    Errno::from_i32(code)
}

static WARNINGS: Mutex<RateLimit> = Mutex::new(RateLimit { last: None });

/// When each warning was last logged, and how often it was left out since.
struct RateLimit {
    last: Option<HashMap<(&'static str, String), (std::time::Instant, u64)>>,
}

impl RateLimit {
    const EVERY: Duration = Duration::from_secs(60);
    /// Bounds the memory a flood of distinct messages can take (their paths differ).
    const KEEP: usize = 4096;

    /// `Some(repeats left out since the last one)` when the warning is to be logged now.
    fn admit(&mut self, op: &'static str, message: &str, now: std::time::Instant) -> Option<u64> {
        let last = self.last.get_or_insert_with(HashMap::new);
        let key = (op, message.to_string());
        match last.get_mut(&key) {
            Some((at, repeats)) if now.duration_since(*at) < Self::EVERY => {
                *repeats += 1;
                None
            }
            Some((at, repeats)) => {
                let left_out = std::mem::take(repeats);
                *at = now;
                Some(left_out)
            }
            None => {
                if last.len() >= Self::KEEP {
                    last.retain(|_, (at, _)| now.duration_since(*at) < Self::EVERY);
                }
                if last.len() < Self::KEEP {
                    last.insert(key, (now, 0));
                }
                Some(0)
            }
        }
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> SetTime {
    match t {
        None => SetTime::Omit,
        Some(TimeOrNow::Now) => SetTime::Now,
        Some(TimeOrNow::SpecificTime(t)) => SetTime::At(t),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

const GEN: Generation = Generation(0);

/// The only open flags the kernel accepts beside FOPEN_PASSTHROUGH (its
/// FOPEN_PASSTHROUGH_MASK); with any other, such as KEEP_CACHE, it refuses passthrough.
const PASSTHROUGH_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO
    .union(FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES)
    .union(FopenFlags::FOPEN_NOFLUSH);

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        for flag in [
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // Locks are the filesystem's: the cluster's on synced paths (crate::lock).
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        if self.config.passthrough {
            let depth = self.config.max_stack_depth;
            self.passthrough_on = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(depth).is_ok();
        }
        self.config
            .passthrough_active
            .store(self.passthrough_on, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(passthrough = self.passthrough_on, "FUSE session initialized");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = tracing::debug_span!("lookup", pid = req.pid(), parent = parent.0, ?name).entered();
        match self.core.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&self.config.ttl, &self.file_attr(&attr), GEN),
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // The kernel sends FORGET only when it evicts the inode.
        self.forget_backing(ino.0);
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = tracing::debug_span!("getattr", pid = req.pid(), ino = ino.0).entered();
        match self.core.getattr(ino.0) {
            Ok(attr) => reply.attr(&self.config.ttl, &self.file_attr(&attr)),
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _s = tracing::debug_span!("setattr", pid = req.pid(), ino = ino.0).entered();
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let ttl = self.config.ttl;
        self.answer(self.core.setattr(ino.0, set, fh.map(|f| f.0)), "setattr", move |r| match r {
            Ok(attr) => reply.attr(&ttl, &file_attr(&attr)),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let _s = tracing::debug_span!("readlink", pid = req.pid(), ino = ino.0).entered();
        match self.core.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("mknod", pid = req.pid(), parent = parent.0, ?name).entered();
        let ttl = self.config.ttl;
        let op = self.core.mknod(caller(req), parent.0, name, mode, rdev);
        self.answer(op, "mknod", move |r| match r {
            Ok(attr) => reply.entry(&ttl, &file_attr(&attr), GEN),
            Err(e) => reply.error(e),
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("mkdir", pid = req.pid(), parent = parent.0, ?name).entered();
        let ttl = self.config.ttl;
        let op = self.core.mkdir(caller(req), parent.0, name, mode);
        self.answer(op, "mkdir", move |r| match r {
            Ok(attr) => reply.entry(&ttl, &file_attr(&attr), GEN),
            Err(e) => reply.error(e),
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("unlink", pid = req.pid(), parent = parent.0, ?name).entered();
        let pt = self.clone_passthrough_dropper();
        self.answer(self.core.remove(parent.0, name, false), "unlink", move |r| match r {
            Ok(gone) => {
                if let Some(ino) = gone {
                    pt(ino);
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("rmdir", pid = req.pid(), parent = parent.0, ?name).entered();
        self.answer(self.core.remove(parent.0, name, true), "rmdir", move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("symlink", pid = req.pid(), parent = parent.0, name = ?link_name).entered();
        let ttl = self.config.ttl;
        let op = self.core.symlink(caller(req), parent.0, link_name, target);
        self.answer(op, "symlink", move |r| match r {
            Ok(attr) => reply.entry(&ttl, &file_attr(&attr), GEN),
            Err(e) => reply.error(e),
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("rename", pid = req.pid(), parent = parent.0, ?name, newparent = newparent.0, ?newname).entered();
        let op = self.core.rename(caller(req), parent.0, name, newparent.0, newname, flags.bits());
        let pt = self.clone_passthrough_dropper();
        self.answer(op, "rename", move |r| match r {
            Ok(gone) => {
                if let Some(ino) = gone {
                    pt(ino);
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("link", pid = req.pid(), ino = ino.0, newparent = newparent.0, ?newname).entered();
        match self.core.link(ino.0, newparent.0, newname) {
            Ok(attr) => reply.entry(&self.config.ttl, &self.file_attr(&attr), GEN),
            Err(e) => reply.error(errno("link", &e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = tracing::debug_span!("open", pid = req.pid(), ino = ino.0).entered();
        match self.core.open(caller(req), ino.0, flags.0) {
            Op::Ready(Ok(opened)) => {
                let fopen = Self::open_flags(&opened);
                self.reply_open(ino.0, opened, fopen, reply)
            }
            Op::Ready(Err(e)) => reply.error(errno("open", &e)),
            Op::Pending(future) => {
                // A file whose content had to be fetched or checked first (a blob).
                let (pt, on) = (self.passthrough.clone(), self.passthrough_on);
                let span = tracing::Span::current();
                self.rt.spawn(
                    async move {
                        match future.await {
                            Ok(opened) => {
                                let flags = Self::open_flags(&opened);
                                reply_open(&pt, on, ino.0, opened, flags, reply)
                            }
                            Err(e) => reply.error(errno("open", &e)),
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _s = tracing::trace_span!("read", pid = req.pid(), fh = fh.0, offset, size).entered();
        self.answer(self.core.read(fh.0, offset, size), "read", move |r| match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        });
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _s = tracing::trace_span!("write", pid = req.pid(), fh = fh.0, offset, len = data.len()).entered();
        match self.core.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", &e)),
        }
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("flush", pid = req.pid(), ino = ino.0, fh = fh.0).entered();
        // What the process wrote is committed before its locks go: the next holder reads it.
        let core = self.core.clone();
        let op = self.core.flush(fh.0).then(move |flushed| {
            let unlocked = core.unlock_owner(ino.0, lock_owner.0);
            unlocked.then(move |u| Op::Ready(flushed.and(u)))
        });
        self.answer(op, "flush", move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let _s = tracing::debug_span!("getlk", pid = req.pid(), ino = ino.0).entered();
        self.answer(self.core.getlk(ino.0, lock_owner.0, start, end, typ), "getlk", move |r| match r {
            Ok(l) => reply.locked(l.start, l.end, l.typ, l.pid),
            Err(e) => reply.error(e),
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("setlk", pid = req.pid(), ino = ino.0, typ, sleep).entered();
        self.answer(self.core.setlk(ino.0, fh.0, lock_owner.0, start, end, typ, pid, sleep), "setlk", move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("release", pid = req.pid(), ino = ino.0, fh = fh.0).entered();
        self.release_backing(ino.0, fh.0);
        let core = self.core.clone();
        let op = self.core.release(fh.0).then(move |released| {
            core.unlock_handle(fh.0).then(move |u| Op::Ready(released.and(u)))
        });
        self.answer(op, "release", move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("fsync", pid = req.pid(), ino = ino.0, fh = fh.0).entered();
        self.answer(self.core.fsync(fh.0, datasync), "fsync", move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _s = tracing::debug_span!("opendir", pid = req.pid(), ino = ino.0).entered();
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", &e)),
        }
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let _s = tracing::debug_span!("readdir", pid = req.pid(), ino = ino.0, offset).entered();
        let dir = match self.core.dir_entries(fh.0) {
            Ok(d) => d,
            Err(e) => return reply.error(errno("readdir", &e)),
        };
        for (i, entry) in dir.entries.iter().enumerate().skip(offset as usize) {
            let kind = Kind::from_d_type(entry.d_type).unwrap_or(Kind::File);
            let node = self.core.entry_ino(ino.0, entry);
            if reply.add(INodeNo(node), (i + 1) as u64, file_type(kind), &entry.name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let _s = tracing::debug_span!("readdirplus", pid = req.pid(), ino = ino.0, offset).entered();
        let dir = match self.core.dir_entries(fh.0) {
            Ok(d) => d,
            Err(e) => return reply.error(errno("readdirplus", &e)),
        };
        let ttl = self.config.ttl;
        for (i, entry) in dir.entries.iter().enumerate().skip(offset as usize) {
            let next = (i + 1) as u64;
            if entry.name == "." || entry.name == ".." {
                // The kernel takes no lookup for these; any directory attributes will do.
                let Ok(mut attr) = self.core.getattr(ino.0) else { continue };
                attr.ino = self.core.entry_ino(ino.0, entry);
                if reply.add(INodeNo(attr.ino), next, &entry.name, &Duration::ZERO, &file_attr(&attr), GEN) {
                    break;
                }
                continue;
            }
            match self.core.lookup(ino.0, &entry.name) {
                Ok(attr) => {
                    if reply.add(INodeNo(attr.ino), next, &entry.name, &ttl, &file_attr(&attr), GEN) {
                        // Not sent, so the kernel did not take this lookup.
                        self.core.forget(attr.ino, 1);
                        break;
                    }
                }
                // Removed since the snapshot: skip it.
                Err(_) => continue,
            }
        }
        reply.ok()
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("fsyncdir", pid = req.pid(), ino = ino.0).entered();
        self.answer(self.core.fsyncdir(ino.0), "fsyncdir", move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize),
            Err(e) => reply.error(errno("statfs", &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("setxattr", pid = req.pid(), ino = ino.0, ?name).entered();
        match self.core.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("setxattr", &e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _s = tracing::debug_span!("getxattr", pid = req.pid(), ino = ino.0, ?name).entered();
        match self.core.getxattr(ino.0, name) {
            Ok(value) => xattr_reply(value, size, reply),
            Err(e) => reply.error(errno("getxattr", &e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _s = tracing::debug_span!("listxattr", pid = req.pid(), ino = ino.0).entered();
        match self.core.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for name in names {
                    buf.extend_from_slice(name.as_encoded_bytes());
                    buf.push(0);
                }
                xattr_reply(buf, size, reply)
            }
            Err(e) => reply.error(errno("listxattr", &e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("removexattr", pid = req.pid(), ino = ino.0, ?name).entered();
        match self.core.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("removexattr", &e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Not called with default_permissions; the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _s = tracing::debug_span!("create", pid = req.pid(), parent = parent.0, ?name).entered();
        let ttl = self.config.ttl;
        match self.core.create(caller(req), parent.0, name, mode, flags) {
            Op::Ready(Ok((attr, opened))) => {
                let fopen = Self::open_flags(&opened);
                let fh = FileHandle(opened.fh);
                if self
                    .passthrough_backing(attr.ino, &opened, |fd| reply.open_backing(fd))
                    .is_some()
                {
                    let pt = self.passthrough.lock();
                    let id = &pt.by_ino[&attr.ino].id;
                    let fopen = fopen & PASSTHROUGH_FLAGS;
                    reply.created_passthrough(&ttl, &file_attr(&attr), GEN, fh, fopen, id);
                } else {
                    reply.created(&ttl, &file_attr(&attr), GEN, fh, fopen);
                }
            }
            Op::Ready(Err(e)) => reply.error(errno("create", &e)),
            Op::Pending(future) => {
                let span = tracing::Span::current();
                self.rt.spawn(
                    async move {
                        match future.await {
                            Ok((attr, opened)) => {
                                let flags = Self::open_flags(&opened);
                                reply.created(&ttl, &file_attr(&attr), GEN, FileHandle(opened.fh), flags)
                            }
                            Err(e) => reply.error(errno("create", &e)),
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("fallocate", pid = req.pid(), fh = fh.0).entered();
        match self.core.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fallocate", &e)),
        }
    }

    // The requests below are ones ordinary programs send that syncfs does not serve. fuser's
    // defaults log a warning for each (Python's `open()` asks `isatty` with TCGETS: a 6-minute
    // stress-ng run wrote 377,317 such lines); they are refused as a native filesystem would,
    // at debug level.

    /// No ioctl applies to a synced file: ENOTTY, what a regular file answers to TCGETS.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        tracing::debug!(ino = ino.0, cmd, "ioctl refused: ENOTTY");
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    /// ENOSYS: the kernel stops asking and treats files as always ready, as for regular files.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// ENOSYS: the kernel stops asking and answers SEEK_DATA/SEEK_HOLE itself (no holes).
    fn lseek(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: i64, _whence: i32, reply: ReplyLseek) {
        reply.error(Errno::ENOSYS);
    }

    /// ENOSYS: the kernel (and `cp`) falls back to reads and writes, which the tiers see.
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }
}

fn xattr_reply(value: Vec<u8>, size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(errno("xattr", &FsError::Range { size, needed: value.len() }));
    } else {
        reply.data(&value);
    }
}

/// Sends the core's invalidations to the kernel from a thread of their own. Writing one from a
/// request handler, or from a runtime worker, can deadlock: dropping a name takes the
/// directory's lock, which a pending request in that directory may hold while its reply waits
/// for the very thread that would be blocked.
///
/// The kernel answers an inode invalidation with ENOENT when it has no such inode yet: a
/// lookup's answer about it can be on its way, to be installed after the invalidation with
/// what it said before the change. So such an invalidation is tried again a few times over
/// ~120 ms (the answer lands within microseconds); by then the kernel has the inode, or has
/// forgotten it.
pub struct Invalidator {
    tx: Mutex<mpsc::Sender<Invalidation>>,
}

enum Invalidation {
    /// Attributes and pages (`pages`), or attributes only.
    Inode(Ino, bool, Option<tokio::sync::oneshot::Sender<()>>),
    Entry(Ino, std::ffi::OsString),
}

/// Retries of an inode invalidation the kernel did not know the inode for, and their delays.
const INODE_RETRY_MS: [u64; 6] = [1, 3, 8, 16, 32, 64];

impl Invalidator {
    /// Starts the notification thread.
    pub fn start(notifier: fuser::Notifier) -> Arc<Invalidator> {
        let (tx, rx) = mpsc::channel::<Invalidation>();
        std::thread::Builder::new()
            .name("syncfs-inval".into())
            .spawn(move || {
                // (when, inode, pages too, attempts so far)
                let mut retries: Vec<(std::time::Instant, Ino, bool, usize)> = Vec::new();
                let inval_inode = |ino: Ino, pages: bool, attempt: usize, retries: &mut Vec<(std::time::Instant, Ino, bool, usize)>| {
                    // An offset below zero leaves the pages alone.
                    let offset = if pages { 0 } else { -1 };
                    match notifier.inval_inode(INodeNo(ino), offset, 0) {
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && attempt < INODE_RETRY_MS.len() => {
                            let at = std::time::Instant::now() + Duration::from_millis(INODE_RETRY_MS[attempt]);
                            retries.push((at, ino, pages, attempt + 1));
                        }
                        Err(e) => tracing::debug!(ino, error = %e, "kernel invalidation failed"),
                        Ok(()) => {}
                    }
                };
                loop {
                    let wait = retries
                        .iter()
                        .map(|(at, ..)| at.saturating_duration_since(std::time::Instant::now()))
                        .min();
                    let msg = match wait {
                        Some(wait) => match rx.recv_timeout(wait) {
                            Ok(msg) => Some(msg),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        },
                        None => match rx.recv() {
                            Ok(msg) => Some(msg),
                            Err(_) => return,
                        },
                    };
                    match msg {
                        Some(Invalidation::Inode(ino, pages, ack)) => {
                            inval_inode(ino, pages, 0, &mut retries);
                            if let Some(ack) = ack {
                                let _ = ack.send(());
                            }
                        }
                        Some(Invalidation::Entry(parent, name)) => {
                            if let Err(e) = notifier.inval_entry(INodeNo(parent), &name) {
                                tracing::debug!(error = %e, "kernel invalidation failed");
                            }
                        }
                        None => {}
                    }
                    let now = std::time::Instant::now();
                    let due: Vec<_> = retries.iter().filter(|(at, ..)| *at <= now).copied().collect();
                    retries.retain(|(at, ..)| *at > now);
                    for (_, ino, pages, attempt) in due {
                        inval_inode(ino, pages, attempt, &mut retries);
                    }
                }
            })
            .expect("spawn the invalidation thread");
        Arc::new(Invalidator { tx: Mutex::new(tx) })
    }
}

impl KernelCache for Invalidator {
    fn invalidate_inode(&self, ino: Ino) {
        let _ = self.tx.lock().send(Invalidation::Inode(ino, true, None));
    }

    fn invalidate_entry(&self, parent: Ino, name: &OsStr) {
        let _ = self.tx.lock().send(Invalidation::Entry(parent, name.to_os_string()));
    }

    fn invalidate_inode_acked(&self, ino: Ino) -> tokio::sync::oneshot::Receiver<()> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let _ = self.tx.lock().send(Invalidation::Inode(ino, true, Some(ack)));
        done
    }

    fn invalidate_attrs_acked(&self, ino: Ino) -> tokio::sync::oneshot::Receiver<()> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let _ = self.tx.lock().send(Invalidation::Inode(ino, false, Some(ack)));
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_logged_once_a_minute_with_its_repeats() {
        let mut limit = RateLimit { last: None };
        let t0 = std::time::Instant::now();
        assert_eq!(limit.admit("rename", "x: EXDEV", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(limit.admit("rename", "x: EXDEV", t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(limit.admit("rename", "y: EXDEV", t0), Some(0), "another path is another warning");
        assert_eq!(limit.admit("rename", "x: EXDEV", t0 + Duration::from_secs(61)), Some(5));
        assert_eq!(limit.admit("rename", "x: EXDEV", t0 + Duration::from_secs(62)), None);
    }
}
