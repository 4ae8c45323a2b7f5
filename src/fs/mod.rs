//! The filesystem core: inodes, open files, and routing of each operation to its tier.
//!
//! The core knows nothing of FUSE. Each kernel request becomes one call here; the adapter in
//! `crate::fuse` only converts arguments and replies. That keeps every rule testable without
//! a kernel and leaves one place where a path's policy is resolved.
//!
//! # Where things live
//!
//! Every path has a local copy in the node's *materialized tree* (`--state/tree`), and all
//! reads and listings are served from it. For an operation that changes a path, the core:
//! 1. resolves the path's policy and the tier that owns it;
//! 2. asks the tier first ([`crate::tier::Tier`]), so a refusal leaves everything unchanged;
//! 3. applies the change to the tree and to the inode table, under the table's lock, so that
//!    the table always matches the tree.
//!
//! Calls that may wait on a tier return an [`Op`]; the rest return a `Result` at once.
//! Locking: the inode table lock is never held across a tier call or an `.await`, and never
//! taken while the directory-fd cache lock is held.

pub mod error;
pub mod handle;
pub mod inode;
mod io;
mod locks;
mod remote;
pub mod tree;
mod xattr;

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use parking_lot::Mutex;

pub use error::FsError;
pub use inode::{Ino, ROOT};
pub use tree::SetTime;

use crate::op::Op;
use crate::policy::{PolicyTable, TierKind, HISTORY_DIR, POLICY_FILE};
use crate::tier::{Revision, Target, Tier, Tiers, WriteMode};
use handle::{DirHandle, Handle, Spool};
use inode::{InodeTable, Orphan};
use tree::Ident;

/// An operation of the core: ready now, or a future for the runtime.
pub type FsOp<T> = Op<T, FsError>;

/// File types the tree can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
}

impl Kind {
    /// The kind of a `st_mode`.
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => Kind::File,
        }
    }

    /// The kind of a directory entry's `d_type`, if known.
    pub fn from_d_type(d_type: u8) -> Option<Kind> {
        Some(match d_type {
            libc::DT_REG => Kind::File,
            libc::DT_DIR => Kind::Dir,
            libc::DT_LNK => Kind::Symlink,
            libc::DT_FIFO => Kind::Fifo,
            libc::DT_SOCK => Kind::Socket,
            libc::DT_CHR => Kind::CharDevice,
            libc::DT_BLK => Kind::BlockDevice,
            _ => return None,
        })
    }
}

/// File attributes as the kernel sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Node id (also reported as `st_ino`).
    pub ino: Ino,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Last access.
    pub atime: SystemTime,
    /// Last modification.
    pub mtime: SystemTime,
    /// Last status change.
    pub ctime: SystemTime,
    /// File type.
    pub kind: Kind,
    /// Permission bits, including setuid, setgid and sticky.
    pub perm: u16,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number, for device files.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

impl Attr {
    /// Attributes of node `ino` from the backing file's stat.
    pub fn from_stat(ino: Ino, st: &libc::stat) -> Attr {
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            kind: Kind::from_mode(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }
}

/// Who asked: the calling process's credentials, from the FUSE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id.
    pub pid: u32,
}

/// The attribute changes of one `setattr`.
#[derive(Debug, Clone, Copy)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: SetTime,
    /// New modification time.
    pub mtime: SetTime,
}

/// A file opened by [`Core::open`] or [`Core::create`].
#[derive(Debug)]
pub struct Opened {
    /// The handle to pass back on later calls.
    pub fh: u64,
    /// A file the kernel may do this handle's reads and writes on directly (FUSE passthrough):
    /// set for in-place files; the adapter uses it when the kernel agreed to passthrough.
    pub passthrough: Option<Arc<File>>,
    /// The kernel may keep cached pages across opens (nothing changes the file behind it).
    pub keep_cache: bool,
    /// Close must reach the core (a staged file commits at flush).
    pub needs_flush: bool,
    /// Reads bypass the kernel's page cache and its idea of the size (`.syncfs/status`).
    pub direct_io: bool,
}

/// Kernel caches the core asks to drop when content changes behind them. Implementations
/// must not block the caller: the kernel may need a pending request answered first.
pub trait KernelCache: Send + Sync {
    /// Drops cached attributes and pages of an inode.
    fn invalidate_inode(&self, ino: Ino);
    /// Drops a cached name in a directory.
    fn invalidate_entry(&self, parent: Ino, name: &OsStr);
    /// Like [`KernelCache::invalidate_inode`]; the receiver completes once the kernel has
    /// dropped them, so that a reply sent after it cannot meet the old attributes.
    fn invalidate_inode_acked(&self, ino: Ino) -> tokio::sync::oneshot::Receiver<()>;
    /// Drops only the cached attributes of an inode (not its pages); acknowledged the same way.
    fn invalidate_attrs_acked(&self, ino: Ino) -> tokio::sync::oneshot::Receiver<()>;
}

/// Where a node's commits go (see [`Core::placement`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    /// Its path.
    Named(PathBuf),
    /// The path another node's change took from it: its writers commit there still.
    Taken(PathBuf),
    /// A program on this node removed its last name: what its writers write goes nowhere.
    Unlinked,
}

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// How many directory fds to keep open.
    pub dir_fd_cache: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig { dir_fd_cache: 1024 }
    }
}

/// Counters for `syncfs status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Staged commits that succeeded.
    pub commits: AtomicU64,
    /// Staged commits that were refused or failed.
    pub refused: AtomicU64,
    /// Time spent in commits, refused ones included, in microseconds.
    pub commit_micros: AtomicU64,
    /// Bytes of the commits that succeeded.
    pub bytes: AtomicU64,
}

/// Space usage of the tree's filesystem.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// The filesystem core of one mount.
pub struct Core {
    root: Arc<OwnedFd>,
    spool: Arc<Spool>,
    policies: Arc<PolicyTable>,
    tiers: Tiers,
    inodes: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    dir_fds: Mutex<LruCache<Ino, Arc<OwnedFd>>>,
    kernel: OnceLock<Arc<dyn KernelCache>>,
    status: OnceLock<Box<dyn Fn() -> Vec<u8> + Send + Sync>>,
    schemas: crate::schema::Schemas,
    /// Why the last commit of a path was refused (`user.syncfs.error`), until one succeeds.
    errors: Mutex<HashMap<PathBuf, String>>,
    /// The revision of a merge path each process last opened to read: the version it read,
    /// so the base of what it writes there later (SPEC 3.3), by (process id, path).
    reads: Mutex<LruCache<(u32, PathBuf), Revision>>,
    /// Process ids of the thread ids FUSE requests carry (node, Java and Go programs do file
    /// work on pools of threads), with when each was learned.
    processes: Mutex<LruCache<u32, (u32, std::time::Instant)>>,
    /// Commit counters, by tier.
    pub counters: HashMap<TierKind, Counters>,
    /// Read and write requests the core served itself (passthrough ones never reach it).
    pub io: IoCounters,
    /// Counts other nodes' changes applied to the tree: an operation that saw it move while
    /// its tier worked must drop the kernel's entries it may have left stale.
    remote_applies: AtomicU64,
    /// Where `flock` and `fcntl` locks are kept (set by the daemon; this mount's own until then).
    locks: OnceLock<Arc<crate::lock::Locks>>,
    /// The locks taken through each file handle, released when it is.
    lock_handles: Mutex<HashMap<u64, HashSet<(crate::lock::LockKey, u64)>>>,
    /// The event feed (set by the daemon; no events until then).
    events: OnceLock<Arc<crate::events::Events>>,
}

/// Read and write requests served by the core, for `syncfs status`.
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Read requests.
    pub reads: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("tiers", &self.tiers).finish_non_exhaustive()
    }
}

/// A path relative to the sync root as a C string, for `openat2`.
fn c_path(path: &Path) -> Result<CString, FsError> {
    Ok(tree::cname(path.as_os_str())?)
}

impl Core {
    /// A core serving the tree at `tree_dir`, with shadows in `spool_dir` (same filesystem).
    /// Every tier the policy table names must be in `tiers`.
    pub fn new(
        tree_dir: &Path,
        spool_dir: &Path,
        policies: Arc<PolicyTable>,
        tiers: Tiers,
        config: CoreConfig,
    ) -> Result<Core, FsError> {
        let open_dir = |p: &Path| -> Result<OwnedFd, FsError> {
            let c = tree::cname(p.as_os_str())?;
            // SAFETY: valid C string.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            // SAFETY: a new fd we own.
            Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
        };
        let root = open_dir(tree_dir)?;
        let spool_fd = open_dir(spool_dir)?;
        let root_st = tree::fstat(root.as_fd())?;
        let spool_st = tree::fstat(spool_fd.as_fd())?;
        if root_st.st_dev != spool_st.st_dev {
            return Err(FsError::Io(std::io::Error::other(format!(
                "{} and {} must be on the same filesystem",
                tree_dir.display(),
                spool_dir.display()
            ))));
        }
        for policy in policies.reachable() {
            if tiers.get(policy.tier).is_none() {
                return Err(FsError::Io(std::io::Error::other(format!(
                    "tier {} is not available",
                    policy.tier
                ))));
            }
        }
        let counters = tiers.kinds().into_iter().map(|k| (k, Counters::default())).collect();
        let cache = NonZeroUsize::new(config.dir_fd_cache.max(1)).expect("at least one");
        let root = Arc::new(root);
        Ok(Core {
            schemas: crate::schema::Schemas::new(root.clone()),
            errors: Mutex::new(HashMap::new()),
            reads: Mutex::new(LruCache::new(NonZeroUsize::new(READS_KEPT).expect("not zero"))),
            processes: Mutex::new(LruCache::new(NonZeroUsize::new(1024).expect("not zero"))),
            root,
            spool: Arc::new(Spool::open(spool_fd)?),
            policies,
            tiers,
            inodes: Mutex::new(InodeTable::new(Ident::of(&root_st))),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            dir_fds: Mutex::new(LruCache::new(cache)),
            kernel: OnceLock::new(),
            status: OnceLock::new(),
            counters,
            io: IoCounters::default(),
            remote_applies: AtomicU64::new(0),
            locks: OnceLock::new(),
            lock_handles: Mutex::new(HashMap::new()),
            events: OnceLock::new(),
        })
    }

    /// Connects the kernel's caches, once the mount exists.
    pub fn set_kernel_cache(&self, cache: Arc<dyn KernelCache>) {
        let _ = self.kernel.set(cache);
    }

    /// Sets the producer of the root's `user.syncfs.status` attribute.
    pub fn set_status(&self, status: Box<dyn Fn() -> Vec<u8> + Send + Sync>) {
        let _ = self.status.set(status);
    }

    /// The status document (JSON), once the daemon set its producer.
    pub fn status_json(&self) -> Vec<u8> {
        self.status.get().map(|f| f()).unwrap_or_default()
    }

    /// Starts reporting changes to `events`.
    pub fn set_events(&self, events: Arc<crate::events::Events>) {
        let _ = self.events.set(events);
    }

    /// The event feed, once set.
    pub fn events(&self) -> Option<&Arc<crate::events::Events>> {
        self.events.get()
    }

    /// Reports a change a program on this node made.
    fn report(&self, op: &str, target: &Target, rev: Option<&Revision>, to: Option<&Path>) {
        if let Some(events) = self.events.get() {
            events.report(op, &target.path, target.policy.tier, rev.map(|r| r.0.as_str()), false, None, to);
        }
    }

    /// Drops the kernel's cached attributes and pages of the tree file at `path`, if the
    /// kernel knows it (the daemon changed it behind the kernel: the event feed).
    pub fn invalidate_path(&self, path: &Path) {
        let Some((dir, name)) = self.entry(path) else { return };
        let Ok(st) = tree::lstat_at(dir.as_fd(), &name) else { return };
        let ino = self.inodes.lock().by_ident(Ident::of(&st));
        if let Some(ino) = ino {
            self.invalidate_inode(ino);
        }
    }

    /// The policy table this mount applies.
    pub fn policies(&self) -> &Arc<PolicyTable> {
        &self.policies
    }

    /// How many inodes and open files the core tracks (for status).
    pub fn usage(&self) -> (usize, usize) {
        (self.inodes.lock().len(), self.handles.lock().len())
    }

    fn invalidate_inode(&self, ino: Ino) {
        if let Some(k) = self.kernel.get() {
            k.invalidate_inode(ino);
        }
    }

    // ---- resolution ---------------------------------------------------------------------

    /// The policy target of a node's current path (for an orphan, the path it had).
    fn target_of(&self, ino: Ino) -> Result<Target, FsError> {
        let path = {
            let table = self.inodes.lock();
            let node = table.get(ino).ok_or(FsError::UnknownInode(ino))?;
            match table.path(ino) {
                Some(path) => path,
                None => node.orphan.as_ref().map(|o| o.path.clone()).ok_or(FsError::os(libc::ENOENT))?,
            }
        };
        Ok(self.target(path))
    }

    /// Where a node's commits go: its path, the path another node's change took from it, or
    /// nowhere (a program on this node removed its last name).
    fn placement(&self, ino: Ino) -> Result<Placement, FsError> {
        let table = self.inodes.lock();
        let node = table.get(ino).ok_or(FsError::UnknownInode(ino))?;
        if let Some(path) = table.path(ino) {
            return Ok(Placement::Named(path));
        }
        match &node.orphan {
            Some(o) if o.remote => Ok(Placement::Taken(o.path.clone())),
            Some(_) => Ok(Placement::Unlinked),
            None => Err(FsError::os(libc::ENOENT)),
        }
    }

    /// The backing inode a nameless node still reaches.
    fn orphan_fd(&self, ino: Ino) -> Option<Arc<OwnedFd>> {
        self.inodes.lock().get(ino)?.orphan.as_ref().map(|o| o.fd.clone())
    }

    /// The policy target of `name` in directory `parent`.
    fn target_in(&self, parent: Ino, name: &OsStr) -> Result<Target, FsError> {
        check_name(name)?;
        let path = {
            let table = self.inodes.lock();
            table.get(parent).ok_or(FsError::UnknownInode(parent))?;
            table.path(parent).ok_or(FsError::os(libc::ENOENT))?
        };
        Ok(self.target(path.join(name)))
    }

    fn target(&self, path: PathBuf) -> Target {
        let policy = self.policies.resolve(&path).clone();
        Target { path, policy }
    }

    fn tier(&self, target: &Target) -> &Arc<dyn Tier> {
        self.tiers
            .get(target.policy.tier)
            .expect("Core::new checked that every policy's tier exists")
    }

    /// Whether writes to `target` are staged (synced tiers, and files the core validates).
    fn is_staged(&self, target: &Target) -> bool {
        self.tier(target).write_mode() == WriteMode::Staged || validates(target)
    }

    /// An `O_PATH` fd of a directory node, from the cache or resolved beneath the root.
    fn dir_fd(&self, ino: Ino) -> Result<Arc<OwnedFd>, FsError> {
        if ino == ROOT {
            return Ok(self.root.clone());
        }
        if let Some(fd) = self.dir_fds.lock().get(&ino) {
            return Ok(fd.clone());
        }
        for _ in 0..3 {
            let (path, ident) = {
                let table = self.inodes.lock();
                let node = table.get(ino).ok_or(FsError::UnknownInode(ino))?;
                if node.kind != Kind::Dir {
                    return Err(FsError::os(libc::ENOTDIR));
                }
                match table.path(ino) {
                    Some(path) => (path, node.ident),
                    // A removed directory the kernel still holds (a process's cwd).
                    None => return node.orphan.as_ref().map(|o| o.fd.clone()).ok_or(FsError::os(libc::ENOENT)),
                }
            };
            let fd = tree::resolve_dir(self.root.as_fd(), &c_path(&path)?)?;
            if Ident::of(&tree::fstat(fd.as_fd())?) == ident {
                let fd = Arc::new(fd);
                self.dir_fds.lock().put(ino, fd.clone());
                return Ok(fd);
            }
        }
        Err(FsError::os(libc::ESTALE))
    }

    /// The parent fd and name of a non-directory node, with the identity to expect there.
    fn locate(&self, ino: Ino) -> Result<Option<(Arc<OwnedFd>, CString, Ident)>, FsError> {
        let (link, ident) = {
            let table = self.inodes.lock();
            let node = table.get(ino).ok_or(FsError::UnknownInode(ino))?;
            (node.links.first().cloned(), node.ident)
        };
        match link {
            None => Ok(None),
            Some((parent, name)) => Ok(Some((self.dir_fd(parent)?, tree::cname(&name)?, ident))),
        }
    }

    /// An `O_PATH` fd of any node, checked to be the node's backing inode.
    fn node_fd(&self, ino: Ino) -> Result<Arc<OwnedFd>, FsError> {
        let kind = self.kind(ino)?;
        if kind == Kind::Dir {
            return self.dir_fd(ino);
        }
        for _ in 0..3 {
            let Some((dir, name, ident)) = self.locate(ino)? else {
                return self.orphan_fd(ino).ok_or(FsError::os(libc::ENOENT));
            };
            let fd = tree::open_path_at(dir.as_fd(), &name)?;
            if Ident::of(&tree::fstat(fd.as_fd())?) == ident {
                return Ok(Arc::new(fd));
            }
        }
        Err(FsError::os(libc::ESTALE))
    }

    fn kind(&self, ino: Ino) -> Result<Kind, FsError> {
        Ok(self.inodes.lock().get(ino).ok_or(FsError::UnknownInode(ino))?.kind)
    }

    /// The stat of a node's backing inode in the tree.
    fn stat_node(&self, ino: Ino) -> Result<libc::stat, FsError> {
        let kind = self.kind(ino)?;
        if kind == Kind::Dir {
            return Ok(tree::fstat(self.dir_fd(ino)?.as_fd())?);
        }
        for _ in 0..3 {
            let Some((dir, name, ident)) = self.locate(ino)? else {
                // No name left: what the node still reaches.
                return match self.orphan_fd(ino) {
                    Some(fd) => Ok(tree::fstat(fd.as_fd())?),
                    None => Err(FsError::os(libc::ENOENT)),
                };
            };
            let st = tree::lstat_at(dir.as_fd(), &name)?;
            if Ident::of(&st) == ident {
                return Ok(st);
            }
        }
        Err(FsError::os(libc::ESTALE))
    }

    // ---- attributes -----------------------------------------------------------------------

    /// Attributes of a node. While a staged file has unsaved writes, size and times come from
    /// its shadow, owner and mode from the tree. (The hottest metadata call: one lock.)
    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        let (kind, ident, link, stage, appender) = {
            let table = self.inodes.lock();
            let node = table.get(ino).ok_or(FsError::UnknownInode(ino))?;
            (node.kind, node.ident, node.links.first().cloned(), node.stage.clone(), node.appender.clone())
        };
        let fast = match (kind, link) {
            (Kind::Dir, _) | (_, None) => None,
            (_, Some((parent, name))) => {
                let dir = self.dir_fd(parent)?;
                let st = tree::lstat_at(dir.as_fd(), &tree::cname(&name)?)?;
                (Ident::of(&st) == ident).then_some(st)
            }
        };
        let mut st = match fast {
            Some(st) => st,
            // Directories, files with no name left, and races with a rename or install.
            None => self.stat_node(ino)?,
        };
        if let Some(stage) = stage {
            if stage.owns_shadow() {
                let shadow = tree::fstat(stage.file().as_fd())?;
                st.st_size = shadow.st_size;
                st.st_blocks = shadow.st_blocks;
                st.st_mtime = shadow.st_mtime;
                st.st_mtime_nsec = shadow.st_mtime_nsec;
                st.st_ctime = shadow.st_ctime;
                st.st_ctime_nsec = shadow.st_ctime_nsec;
            }
        }
        if let Some(appender) = appender {
            // Appends written here and not yet taken by the tier follow the tree's file.
            st.st_size += appender.pending() as libc::off_t;
        }
        Ok(Attr::from_stat(ino, &st))
    }

    /// Changes attributes. Changing the size of a staged file with no open stage commits.
    pub fn setattr(self: &Arc<Self>, ino: Ino, set: SetAttr, fh: Option<u64>) -> FsOp<Attr> {
        if let Err(e) = self.target_of(ino).and_then(|t| writable(&t)) {
            return Op::err(e);
        }
        if let Err(e) = self.set_meta(ino, &set) {
            return Op::err(e);
        }
        let this = self.clone();
        let resize = match set.size {
            None => Op::ok(()),
            Some(size) => self.resize(ino, size, fh),
        };
        resize.and_then(move |()| {
            if set.atime != SetTime::Omit || set.mtime != SetTime::Omit {
                let fd = this.node_fd(ino)?;
                tree::utimens_fd(fd.as_fd(), set.atime, set.mtime)?;
                // A shadow waiting for its commit replaces the tree's file, times included.
                let stage = this.inodes.lock().get(ino).and_then(|n| n.stage.clone());
                if let Some(stage) = stage.filter(|s| s.owns_shadow()) {
                    tree::utimens_fd(stage.file().as_fd(), set.atime, set.mtime)?;
                }
            }
            this.getattr(ino)
        })
    }

    fn set_meta(&self, ino: Ino, set: &SetAttr) -> Result<(), FsError> {
        if set.mode.is_none() && set.uid.is_none() && set.gid.is_none() {
            return Ok(());
        }
        let fd = self.node_fd(ino)?;
        if set.uid.is_some() || set.gid.is_some() {
            tree::chown_fd(fd.as_fd(), set.uid, set.gid)?;
        }
        if let Some(mode) = set.mode {
            let kind = self.kind(ino)?;
            if kind == Kind::Symlink {
                return Err(FsError::os(libc::EOPNOTSUPP));
            }
            tree::chmod_fd(fd.as_fd(), mode & 0o7777)?;
            if kind == Kind::File {
                let target = self.target_of(ino)?;
                self.tier(&target).chmod(&target, mode & 0o7777);
            }
        }
        Ok(())
    }

    // ---- names ------------------------------------------------------------------------------

    /// Looks up `name` in `parent` and takes one kernel lookup on the result.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        check_name(name)?;
        match self.lookup_once(parent, name) {
            // A name of the history view that is not built yet (a new version, or the view
            // itself): build that directory and look again. Other lookups never pay for it.
            Err(e) if e.errno() == libc::ENOENT && self.prepare_view(parent, Some(name)) => {
                self.lookup_once(parent, name)
            }
            other => other,
        }
    }

    fn lookup_once(&self, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        let dir = self.dir_fd(parent)?;
        let cname = tree::cname(name)?;
        // Stat and record under the table lock, so an install or rename in between cannot
        // pair this name with a stale backing inode.
        let mut table = self.inodes.lock();
        let st = tree::lstat_at(dir.as_fd(), &cname)?;
        let kind = Kind::from_mode(st.st_mode);
        let ino = table.lookup(parent, name, Ident::of(&st), kind);
        if kind == Kind::Dir {
            let view = table.get(parent).is_some_and(|p| {
                p.view || (name == "history" && p.links.first().is_some_and(|(g, n)| *g == ROOT && n == ".syncfs"))
            });
            if view {
                if let Some(node) = table.get_mut(ino) {
                    node.view = true;
                }
            }
        }
        drop(table);
        let mut attr = Attr::from_stat(ino, &st);
        if Kind::from_mode(st.st_mode) == Kind::File {
            // A staged file's size is its shadow's.
            if let Ok(a) = self.getattr(ino) {
                attr = a;
            }
        }
        Ok(attr)
    }

    /// Drops `n` kernel lookups of a node.
    pub fn forget(&self, ino: Ino, n: u64) {
        let mut table = self.inodes.lock();
        table.forget(ino, n);
        if table.get(ino).is_none() {
            drop(table);
            self.dir_fds.lock().pop(&ino);
        }
    }

    /// Gives a new entry the caller's ownership: the daemon creates as root. The group follows
    /// a setgid parent, as on any local filesystem.
    fn own(&self, fd: &impl AsFd, parent_st: &libc::stat, caller: Caller) -> Result<(), FsError> {
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
            None
        } else {
            Some(caller.gid)
        };
        if caller.uid == 0 && gid.is_none_or(|g| g == 0) {
            return Ok(());
        }
        tree::chown_fd(fd.as_fd(), Some(caller.uid), gid)?;
        Ok(())
    }

    /// Creates a directory, symlink (to `link`) or special file after its tier agreed.
    fn make_node(
        self: &Arc<Self>,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        link: Option<&OsStr>,
        make: impl FnOnce(&OwnedFd, &CString) -> std::io::Result<()> + Send + 'static,
    ) -> FsOp<Attr> {
        let target = match self.target_in(parent, name).and_then(|t| writable(&t).map(|()| t)) {
            Ok(t) => t,
            Err(e) => return Op::err(e),
        };
        let reported = target.clone();
        if !matches!(kind, Kind::File | Kind::Dir | Kind::Symlink) {
            // Only the local tier stores inodes; synced tiers store files, links and directories.
            if target.policy.tier != TierKind::Local {
                return Op::err(FsError::Unsupported {
                    op: "mknod",
                    tier: target.policy.tier,
                    path: target.path,
                });
            }
        }
        let synced = target.policy.tier != TierKind::Local;
        let this = self.clone();
        let name = name.to_os_string();
        let tier = self.tier(&target);
        let agreed = match link {
            Some(link) => tier.symlink(&target, link),
            None => tier.create(&target, kind, true),
        };
        agreed
            .err_into()
            .and_then(move |rev| {
                let dir = this.dir_fd(parent)?;
                let cname = tree::cname(&name)?;
                let parent_st = tree::fstat(dir.as_fd())?;
                let mut table = this.inodes.lock();
                match make(&dir, &cname) {
                    Ok(()) => {}
                    // The tier's own change came back through its watch and made it first.
                    Err(e)
                        if synced
                            && e.raw_os_error() == Some(libc::EEXIST)
                            && tree::lstat_at(dir.as_fd(), &cname)
                                .is_ok_and(|st| Kind::from_mode(st.st_mode) == kind) => {}
                    Err(e) => return Err(e.into()),
                }
                let fd = tree::open_path_at(dir.as_fd(), &cname)?;
                this.own(&fd, &parent_st, caller)?;
                let st = tree::fstat(fd.as_fd())?;
                let ino = table.lookup(parent, &name, Ident::of(&st), Kind::from_mode(st.st_mode));
                drop(table);
                let op = match kind {
                    Kind::Dir => "mkdir",
                    Kind::Symlink => "symlink",
                    _ => "create",
                };
                this.report(op, &reported, rev.as_ref(), None);
                Ok(Attr::from_stat(ino, &st))
            })
    }

    /// `mkdir`.
    pub fn mkdir(self: &Arc<Self>, caller: Caller, parent: Ino, name: &OsStr, mode: u32) -> FsOp<Attr> {
        self.make_node(caller, parent, name, Kind::Dir, None, move |dir, name| {
            tree::mkdir_at(dir.as_fd(), name, mode & 0o7777)
        })
    }

    /// `mknod`: regular files, fifos, sockets and devices, where the tier stores inodes
    /// (local). The mount's `nodev` keeps device nodes from being opened through it.
    pub fn mknod(
        self: &Arc<Self>,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> FsOp<Attr> {
        let kind = Kind::from_mode(mode);
        if matches!(kind, Kind::Dir | Kind::Symlink) {
            return Op::err(FsError::os(libc::EPERM));
        }
        self.make_node(caller, parent, name, kind, None, move |dir, name| {
            tree::mknod_at(dir.as_fd(), name, mode, rdev as libc::dev_t)
        })
    }

    /// `symlink`.
    pub fn symlink(
        self: &Arc<Self>,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        target: &Path,
    ) -> FsOp<Attr> {
        let link_target = target.as_os_str().to_os_string();
        self.make_node(caller, parent, name, Kind::Symlink, Some(target.as_os_str()), move |dir, name| {
            tree::symlink_at(&link_target, dir.as_fd(), name)
        })
    }

    /// `readlink`.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        let fd = self.node_fd(ino)?;
        Ok(tree::readlink_fd(fd.as_fd())?.as_bytes().to_vec())
    }

    /// `link`: a new name for an existing file. Only where the tier stores inodes (local), and
    /// never for files the core stages (a staged install would split the link).
    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &OsStr) -> Result<Attr, FsError> {
        let from = self.target_of(ino)?;
        let to = self.target_in(new_parent, new_name)?;
        writable(&to)?;
        if from.policy.tier != to.policy.tier {
            return Err(FsError::CrossTier {
                op: "link",
                from: from.path,
                from_tier: from.policy.tier,
                to: to.path,
                to_tier: to.policy.tier,
            });
        }
        if !self.tier(&to).supports_hard_links() || self.is_staged(&from) || self.is_staged(&to) {
            return Err(FsError::Unsupported {
                op: "link",
                tier: to.policy.tier,
                path: to.path,
            });
        }
        let fd = self.node_fd(ino)?;
        let dir = self.dir_fd(new_parent)?;
        let cname = tree::cname(new_name)?;
        let mut table = self.inodes.lock();
        tree::link_fd(fd.as_fd(), dir.as_fd(), &cname)?;
        table.add_link(ino, new_parent, new_name);
        drop(table);
        self.getattr(ino)
    }

    /// `unlink` and `rmdir`. Returns the node whose file lost its last name, if known.
    pub fn remove(self: &Arc<Self>, parent: Ino, name: &OsStr, is_dir: bool) -> FsOp<Option<Ino>> {
        let target = match self.target_in(parent, name).and_then(|t| writable(&t).map(|()| t)) {
            Ok(t) => t,
            Err(e) => return Op::err(e),
        };
        let kind = if is_dir { Kind::Dir } else { Kind::File };
        let synced = target.policy.tier != TierKind::Local;
        let this = self.clone();
        let name = name.to_os_string();
        let path = target.path.clone();
        let reported = target.clone();
        self.tier(&target)
            .remove(&target, kind)
            .err_into()
            .and_then(move |()| {
                this.report(if is_dir { "rmdir" } else { "delete" }, &reported, None, None);
                let dir = this.dir_fd(parent)?;
                let cname = tree::cname(&name)?;
                let mut table = this.inodes.lock();
                let st = match tree::lstat_at(dir.as_fd(), &cname) {
                    Ok(st) => st,
                    // The tier's own change came back through its watch and was applied first.
                    Err(e) if synced && e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let last = st.st_nlink <= 1 || is_dir;
                let ino = table.by_ident(Ident::of(&st));
                let kept = keep_backing(&table, ino, (parent, &name), last, &dir, &cname)?;
                tree::unlink_at(dir.as_fd(), &cname, is_dir)?;
                if let Some(ino) = ino {
                    if table.unlink(ino, parent, &name, last) {
                        if let Some(fd) = kept {
                            table.set_orphan(ino, Orphan { fd, path, remote: false });
                        }
                    }
                    if is_dir {
                        drop(table);
                        this.dir_fds.lock().pop(&ino);
                    }
                }
                Ok(ino.filter(|_| last))
            })
    }

    /// `rename`, with `RENAME_NOREPLACE` and `RENAME_EXCHANGE`. Paths stay in one tier, with one
    /// exception: a local file moved onto a path of a staged tier is a commit of the target
    /// (SPEC 3.1's compare-and-swap idiom; see [`Core::rename_commit`]). A file moved onto a path
    /// the core validates is validated first (EINVAL, nothing moves). Returns the node of a
    /// replaced file that lost its last name, if any.
    pub fn rename(
        self: &Arc<Self>,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        flags: u32,
    ) -> FsOp<Option<Ino>> {
        let (from, to) = match (self.target_in(parent, name), self.target_in(new_parent, new_name)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => return Op::err(e),
        };
        if let Err(e) = writable(&from).and_then(|()| writable(&to)) {
            return Op::err(e);
        }
        let kind = match self.kind_at(parent, name) {
            Ok(k) => k,
            Err(e) => return Op::err(e),
        };
        if from.policy.tier != to.policy.tier {
            let idiom = from.policy.tier == TierKind::Local
                && kind == Kind::File
                && flags == 0
                && self.tier(&to).write_mode() == WriteMode::Staged;
            if idiom {
                return self.rename_commit(caller, parent, name, new_parent, new_name, to);
            }
            return Op::err(FsError::CrossTier {
                op: "rename",
                from: from.path,
                from_tier: from.policy.tier,
                to: to.path,
                to_tier: to.policy.tier,
            });
        }
        let content = if kind == Kind::File && (validates(&to) || self.is_staged(&from)) {
            match self.open_at(parent, name) {
                Ok(file) => Some(Arc::new(file)),
                Err(e) => return Op::err(e),
            }
        } else {
            None
        };
        if let (Some(file), true) = (&content, validates(&to)) {
            if let Err(e) = self.validate(&to, file) {
                self.note_refusal(&to, &e);
                return Op::err(e);
            }
        }
        let synced = from.policy.tier != TierKind::Local;
        let applies_before = self.remote_applies.load(Ordering::SeqCst);
        let base = self.base_of_move(caller, parent, name, &to);
        let this = self.clone();
        let name = name.to_os_string();
        let new_name = new_name.to_os_string();
        let noted = (self.clone(), to.clone());
        self.tier(&from)
            .rename(&from, &to, kind, content, base)
            .err_into()
            .inspect_err(move |e| noted.0.note_refusal(&noted.1, e))
            .and_then(move |()| {
                let moved = match this.rename_local(parent, &name, new_parent, &new_name, flags, None) {
                    // The tier's own changes came back through its watch and were applied first.
                    Err(e) if synced && e.errno() == libc::ENOENT => Ok(None),
                    other => other,
                };
                if moved.is_ok() {
                    this.clear_refusal(&to);
                    let rev = this.tier(&to).revision(&to);
                    this.report("rename", &from, rev.as_ref(), Some(&to.path));
                    this.note_read(caller, &to, rev);
                }
                if synced && this.remote_applies.load(Ordering::SeqCst) != applies_before {
                    // Another node's change of either name may have landed while the tier
                    // worked (the kernel held the directories then): its invalidation found
                    // the kernel's entries where they were before the move. Only then: an
                    // invalidation makes the kernel forget the moved node, and its next
                    // lookup gets a new inode number (`stat` before and after `mv` differ).
                    this.send(vec![
                        remote::Invalidate::Entry(parent, name.clone()),
                        remote::Invalidate::Entry(new_parent, new_name.clone()),
                    ]);
                }
                moved
            })
    }

    /// Opens `name` in `parent` for reading.
    fn open_at(&self, parent: Ino, name: &OsStr) -> Result<File, FsError> {
        let dir = self.dir_fd(parent)?;
        Ok(File::from(tree::open_at(dir.as_fd(), &tree::cname(name)?, libc::O_RDONLY, 0)?))
    }

    /// Moves a finished local file onto a path of a staged tier: commits its content to the
    /// target's tier with the base revision the program named in the file's `user.syncfs.rev`
    /// (or, without one, the target's current revision), then renames it into place. A refused
    /// commit (ESTALE, EAGAIN, EINVAL...) moves nothing: the temporary file stays.
    fn rename_commit(
        self: &Arc<Self>,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        to: Target,
    ) -> FsOp<Option<Ino>> {
        let prepared = (|| {
            let file = self.open_at(parent, name)?;
            let named = tree::get_xattr(file.as_fd(), c"user.syncfs.rev")?;
            let base = match named {
                Some(value) => Some(Revision(String::from_utf8_lossy(&value).trim().to_string())),
                None => self.base_of_move(caller, parent, name, &to),
            };
            self.validate(&to, &file)?;
            Ok::<_, FsError>((Arc::new(file), base))
        })();
        let (file, base) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.note_refusal(&to, &e);
                return Op::err(e);
            }
        };
        let this = self.clone();
        let name = name.to_os_string();
        let new_name = new_name.to_os_string();
        let refused = to.clone();
        let noted = self.clone();
        self.tier(&to)
            .commit(&to, file.clone(), base, false)
            .err_into()
            .inspect_err(move |e| noted.note_refusal(&refused, e))
            .and_then(move |rev| {
                // The revision named the old content; the moved file must not carry it on.
                match tree::remove_xattr(file.as_fd(), c"user.syncfs.rev") {
                    Err(e) if e.raw_os_error() != Some(libc::ENODATA) => return Err(e.into()),
                    _ => {}
                }
                if this.tier(&to).keeps_content() {
                    // The tier keeps the content: what moves into the tree is its placeholder.
                    this.stub_in_place(parent, &name, &file, rev.as_ref())?;
                }
                let admit = || this.tier(&to).admit(&to, rev.as_ref());
                let moved = this.rename_local(parent, &name, new_parent, &new_name, 0, Some(&admit));
                if moved.is_ok() {
                    this.clear_refusal(&to);
                    // What this program wrote is what it has read of the path from now on.
                    this.note_read(caller, &to, rev);
                }
                moved
            })
    }

    /// The process a request's thread belongs to (cached: a thread id is reused only after
    /// its thread ended, so an answer is trusted for a few seconds).
    fn process_of(&self, tid: u32) -> u32 {
        let now = std::time::Instant::now();
        if let Some((pid, at)) = self.processes.lock().get(&tid).copied() {
            if now.duration_since(at) < std::time::Duration::from_secs(5) {
                return pid;
            }
        }
        let pid = thread_group(tid);
        self.processes.lock().put(tid, (pid, now));
        pid
    }

    /// Records that `caller` opened `target` (a merge path) to read its version `rev`.
    pub(super) fn note_read(&self, caller: Caller, target: &Target, rev: Option<Revision>) {
        if target.policy.consistency != crate::policy::Consistency::Merge {
            return;
        }
        let Some(rev) = rev else { return };
        let pid = self.process_of(caller.pid);
        self.reads.lock().put((pid, target.path.clone()), rev);
    }

    /// The version of `target` (a merge path) that `caller`'s process last opened to read.
    pub(super) fn read_base(&self, caller: Caller, target: &Target) -> Option<Revision> {
        if target.policy.consistency != crate::policy::Consistency::Merge {
            return None;
        }
        let pid = self.process_of(caller.pid);
        self.reads.lock().get(&(pid, target.path.clone())).cloned()
    }

    /// The base of content moved onto `to` from `name` in `parent` (SPEC 3.3): the version of
    /// `to` the moving process last read (what its copy was made from); else the version
    /// current when the moved file was created here (the program read the target before
    /// writing its copy); without either, the current version.
    fn base_of_move(&self, caller: Caller, parent: Ino, name: &OsStr, to: &Target) -> Option<Revision> {
        if let Some(read) = self.read_base(caller, to) {
            return Some(read);
        }
        let born = (|| {
            let dir = self.dir_fd(parent).ok()?;
            let st = tree::lstat_at(dir.as_fd(), &tree::cname(name).ok()?).ok()?;
            let table = self.inodes.lock();
            table.get(table.by_ident(Ident::of(&st))?)?.born
        })();
        let tier = self.tier(to);
        match born {
            Some(when) => tier.revision_at(to, when),
            None => tier.revision(to),
        }
    }

    /// Replaces the file `name` in `parent` by a placeholder of its content (size, metadata,
    /// the tag `rev`), keeping its node.
    fn stub_in_place(&self, parent: Ino, name: &OsStr, file: &File, rev: Option<&Revision>) -> Result<(), FsError> {
        let dir = self.dir_fd(parent)?;
        let cname = tree::cname(name)?;
        let (stub, spool_name) = self.placeholder(Ok(file.as_fd()), file.metadata()?.len(), rev)?;
        let mut table = self.inodes.lock();
        let st = tree::lstat_at(dir.as_fd(), &cname)?;
        let ino = table.by_ident(Ident::of(&st));
        tree::rename_at(self.spool.dir().as_fd(), &spool_name, dir.as_fd(), &cname, 0)?;
        if let Some(ino) = ino {
            table.set_ident(ino, Ident::of(&tree::fstat(stub.as_fd())?));
        }
        Ok(())
    }

    fn kind_at(&self, parent: Ino, name: &OsStr) -> Result<Kind, FsError> {
        let dir = self.dir_fd(parent)?;
        let st = tree::lstat_at(dir.as_fd(), &tree::cname(name)?)?;
        Ok(Kind::from_mode(st.st_mode))
    }

    /// Renames in the tree and the inode table under the table lock. With `admit`, the tier
    /// decides under the same lock whether the moved content may still land (no newer revision
    /// arrived meanwhile); if not, the source name is removed instead, as if the rename had
    /// happened and been overwritten.
    fn rename_local(
        &self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        flags: u32,
        admit: Option<&dyn Fn() -> bool>,
    ) -> Result<Option<Ino>, FsError> {
        let from_dir = self.dir_fd(parent)?;
        let to_dir = self.dir_fd(new_parent)?;
        let (cfrom, cto) = (tree::cname(name)?, tree::cname(new_name)?);
        let mut table = self.inodes.lock();
        let src = tree::lstat_at(from_dir.as_fd(), &cfrom)?;
        let src_ino = table.by_ident(Ident::of(&src));
        if admit.is_some_and(|admit| !admit()) {
            let last = src.st_nlink <= 1;
            let kept = keep_backing(&table, src_ino, (parent, name), last, &from_dir, &cfrom)?;
            let path = table.path(parent).map(|p| p.join(name));
            tree::unlink_at(from_dir.as_fd(), &cfrom, false)?;
            if let Some(ino) = src_ino {
                if table.unlink(ino, parent, name, last) {
                    if let (Some(fd), Some(path)) = (kept, path) {
                        table.set_orphan(ino, Orphan { fd, path, remote: false });
                    }
                }
            }
            return Ok(src_ino.filter(|_| last));
        }
        let dst = tree::lstat_at(to_dir.as_fd(), &cto).ok();
        let dst_ino = dst.as_ref().and_then(|d| table.by_ident(Ident::of(d)));
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let replaced = dst_ino.filter(|d| !exchange && Some(*d) != src_ino);
        let dst_last = dst.as_ref().is_some_and(|d| d.st_nlink <= 1 || Kind::from_mode(d.st_mode) == Kind::Dir);
        let kept = keep_backing(&table, replaced, (new_parent, new_name), dst_last, &to_dir, &cto)?;
        let dst_path = table.path(new_parent).map(|p| p.join(new_name));
        tree::rename_at(from_dir.as_fd(), &cfrom, to_dir.as_fd(), &cto, flags)?;
        let mut gone = None;
        if exchange {
            if let Some(ino) = dst_ino {
                table.relink(ino, new_parent, new_name, parent, name);
            }
        } else if let Some(ino) = replaced {
            if table.unlink(ino, new_parent, new_name, dst_last) {
                if let (Some(fd), Some(path)) = (kept, dst_path) {
                    table.set_orphan(ino, Orphan { fd, path, remote: false });
                }
            }
            gone = Some(ino).filter(|_| dst_last);
        }
        if let Some(ino) = src_ino {
            table.relink(ino, parent, name, new_parent, new_name);
        }
        Ok(gone)
    }

    // ---- directories ------------------------------------------------------------------------

    /// Before a listing of a directory of the history view, or when a name is missing in one,
    /// lets the durable tier bring that directory up to date. Returns whether it did. Only
    /// `.syncfs` (the view's parent) and the view's own directories pay for a path.
    fn prepare_view(&self, dir: Ino, name: Option<&OsStr>) -> bool {
        let Some(git) = self.tiers.get(TierKind::Git) else { return false };
        let path = {
            let table = self.inodes.lock();
            let Some(node) = table.get(dir) else { return false };
            let syncfs_dir = node.links.first().is_some_and(|(p, l)| *p == ROOT && l == ".syncfs");
            if !(syncfs_dir || node.view) {
                return false;
            }
            match table.path(dir) {
                Some(p) => p,
                None => return false,
            }
        };
        let in_view = path.starts_with(HISTORY_DIR);
        let view_parent = path == Path::new(HISTORY_DIR).parent().expect("has a parent")
            && name.is_none_or(|n| n == Path::new(HISTORY_DIR).file_name().expect("has a name"));
        if !(in_view || view_parent) {
            return false;
        }
        if let Err(e) = git.prepare_view(self.root.as_fd(), &path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot build the history view");
        }
        true
    }

    /// Opens a directory: takes a snapshot of its entries.
    pub fn opendir(&self, ino: Ino) -> Result<u64, FsError> {
        self.prepare_view(ino, None);
        let dir = self.dir_fd(ino)?;
        let entries = tree::read_dir(dir.as_fd())?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(DirHandle { ino, entries }));
        Ok(fh)
    }

    /// The snapshot of an open directory.
    pub fn dir_entries(&self, fh: u64) -> Result<Arc<DirHandle>, FsError> {
        self.dirs.lock().get(&fh).cloned().ok_or(FsError::UnknownHandle(fh))
    }

    /// The node id to report for a directory entry without looking it up: the known node's,
    /// else the backing inode number (plain readdir only; Linux uses readdirplus here).
    pub fn entry_ino(&self, dir: Ino, entry: &tree::RawDirEntry) -> Ino {
        let table = self.inodes.lock();
        if entry.name == "." {
            return dir;
        }
        if entry.name == ".." {
            return table.first_link(dir).map(|(p, _)| p).unwrap_or(ROOT);
        }
        let dev = table.get(dir).map(|n| n.ident.dev).unwrap_or(0);
        table
            .by_ident(Ident { dev, ino: entry.ino })
            .unwrap_or(entry.ino)
    }

    /// Closes a directory.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    /// Flushes a directory's entries to disk.
    pub fn fsyncdir(&self, ino: Ino) -> FsOp<()> {
        let dir = match self.dir_fd(ino) {
            Ok(d) => d,
            Err(e) => return Op::err(e),
        };
        Op::pending(async move {
            tokio::task::spawn_blocking(move || {
                let f = tree::open_at(dir.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                File::from(f).sync_all()?;
                Ok(())
            })
            .await
            .map_err(|e| FsError::Io(std::io::Error::other(e)))?
        })
    }

    /// Space usage of the tree's filesystem.
    pub fn statfs(&self) -> Result<StatFs, FsError> {
        let st = tree::statvfs(self.root.as_fd())?;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
        })
    }
}

/// Opens the backing inode of a name that is about to lose its node's last link, when
/// something still uses the node: open files (which keep working, as on any filesystem) or,
/// for directories, the kernel's references. An unused file's storage is freed at once instead.
///
/// `last` says the backing inode loses its last link; a node can also lose the last name it
/// knows while the file keeps others it never looked up (a hard link), and still needs one.
fn keep_backing(
    table: &InodeTable,
    ino: Option<Ino>,
    link: (Ino, &OsStr),
    last: bool,
    dir: &OwnedFd,
    name: &CStr,
) -> Result<Option<Arc<OwnedFd>>, FsError> {
    let Some(node) = ino.and_then(|i| table.get(i)) else {
        return Ok(None);
    };
    let nameless = last || node.links.iter().all(|(p, n)| *p == link.0 && n == link.1);
    if !nameless || (node.kind != Kind::Dir && node.opens == 0) {
        return Ok(None);
    }
    Ok(Some(Arc::new(tree::open_path_at(dir.as_fd(), name)?)))
}

/// How many (process, path) reads of merge paths are remembered as bases of later writes.
const READS_KEPT: usize = 4096;

/// The process (thread group) of a thread id, from `/proc/<tid>/status`; the thread id itself
/// when that cannot be read.
fn thread_group(tid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(tid)
}

/// Refuses names that could address something other than one entry of the directory. The
/// kernel never sends these, but the core does not rely on it: `..` at the root would name the
/// state directory.
fn check_name(name: &OsStr) -> Result<(), FsError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') || bytes.contains(&0) {
        return Err(FsError::os(libc::EINVAL));
    }
    if bytes.len() > 255 {
        return Err(FsError::os(libc::ENAMETOOLONG));
    }
    Ok(())
}

/// Refuses changes to read-only paths (the history view).
fn writable(target: &Target) -> Result<(), FsError> {
    if target.policy.read_only {
        return Err(FsError::ReadOnly(target.path.clone()));
    }
    Ok(())
}

/// Whether the core validates writes to this path before they replace the stored file: the
/// policy file, and paths whose policy names a schema.
fn validates(target: &Target) -> bool {
    target.path == Path::new(POLICY_FILE) || target.policy.schema.is_some()
}

#[cfg(test)]
mod tests;
