//! Tiers: the backends that own paths. One trait, one module per backend.
//!
//! # The contract
//!
//! Every path of the sync root has a local copy in the node's materialized tree
//! (`--state/tree`); the filesystem core serves all reads and directory listings from it. A tier
//! decides what happens when that copy changes, and (for synced tiers) brings other nodes'
//! changes into it. The core calls a tier at these points, always *before* it changes the
//! tree, so that a refusal leaves the tree as it was:
//!
//! - [`Tier::create`] when a name is created. With `exclusive` (the program passed `O_EXCL`)
//!   the tier must make the name exclusive across the whole cluster and fail with
//!   [`TierError::Exists`] for every loser.
//! - [`Tier::commit`] when a program closes (flush) or fsyncs a file it wrote, for tiers whose
//!   [`WriteMode`] is `Staged`. `content` holds the complete new content and does not change
//!   while the call runs. The commit is *durable* when it returns `Ok`: the content reached the
//!   tier, or a journal that survives `kill -9` of the daemon and is replayed on the next mount.
//!   The returned [`Revision`] is what `user.syncfs.rev` shows from then on.
//! - [`Tier::remove`] and [`Tier::rename`] before a name goes away or moves.
//! - [`Tier::attribute`] for the read-only `user.syncfs.*` attributes the tier defines.
//! - [`Tier::admit`] under the core's tree lock, right before content of a given revision
//!   replaces the tree's copy of a path: a local commit being installed, or another node's
//!   change arriving. The tier refuses content older than what the tree already holds, so
//!   local installs and remote changes can race without an older one ever winning.
//!
//! Other nodes' changes reach the core through the [`RemoteSink`] the tier gets in
//! [`Tier::start`]: the tier watches its backend and hands each change, with its revision, to
//! [`RemoteSink::apply`], which updates the tree and drops the kernel's caches of the path.
//!
//! A [`Revision`] is an opaque string that changes with every committed change of a path's
//! content (the KV revision for nats-kv, a blob id for git). A tier without revisions (local)
//! returns none. The base of a compare-and-swap write is [`Tier::revision`] when the file was
//! opened, or the revision a program named (`user.syncfs.rev` on a temporary file renamed over
//! the target).
//!
//! Two kinds of tier change this picture:
//!
//! - An *append* tier ([`WriteMode::Append`]) takes only appends. The core buffers what
//!   programs write and hands each buffered run to [`Tier::append`] at flush and fsync; the
//!   tier publishes it and brings the tree's file up to date itself, in the backend's order
//!   ([`RemoteChange::Append`]), before the call returns. Truncation to zero is
//!   [`Tier::purge`]. The tree's copy of such a file is only ever changed by the tier.
//! - A tier that [keeps content](Tier::keeps_content) itself (the blob tier) leaves a sparse
//!   placeholder of the right size in the tree, tagged with the content's revision, and serves
//!   reads from [`Tier::content`] (its cache).
//!
//! Calls return an [`Op`]: ready when the tier answered without waiting (local disk), pending
//! when it needs the network. The core never blocks a FUSE thread on a pending op.

pub mod blob;
pub mod git;
pub mod jetstream;
pub mod kv;
pub mod local;
pub mod revlog;
pub mod space;
pub mod stream;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fs::Kind;
use crate::op::Op;
use crate::policy::{Policy, TierKind};

/// What a tier says about a path's content version. Opaque to everything but the tier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Revision(pub String);

/// How writes to a tier's files are handled by the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Programs write the tree's file directly; nothing to commit (the local tier).
    InPlace,
    /// Programs write a private shadow copy; flush/fsync commit it to the tier and only then
    /// replace the tree's file. A refused commit leaves the tree's file untouched.
    Staged,
    /// Programs may only append. Writes are buffered by the core and handed to
    /// [`Tier::append`] at flush/fsync; the tier changes the tree's file itself.
    Append,
}

/// Bytes programs appended to a file, as the core hands them to [`Tier::append`].
#[derive(Debug, Clone)]
pub enum Appended {
    /// Held in memory (short appends).
    Bytes(bytes::Bytes),
    /// Spooled to disk: the first `len` bytes of the file (long appends).
    File(Arc<File>, u64),
}

impl Appended {
    /// How many bytes were appended.
    pub fn len(&self) -> u64 {
        match self {
            Appended::Bytes(b) => b.len() as u64,
            Appended::File(_, len) => *len,
        }
    }

    /// Whether nothing was appended (a new file that was only created).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes starting at `offset`.
    pub fn chunk(&self, offset: u64, max: usize) -> io::Result<bytes::Bytes> {
        let end = self.len().min(offset + max as u64);
        if offset >= end {
            return Ok(bytes::Bytes::new());
        }
        match self {
            Appended::Bytes(b) => Ok(b.slice(offset as usize..end as usize)),
            Appended::File(file, _) => {
                let mut buf = vec![0u8; (end - offset) as usize];
                std::os::unix::fs::FileExt::read_exact_at(file.as_ref(), &mut buf, offset)?;
                Ok(buf.into())
            }
        }
    }
}

/// A path and the policy that governs it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Relative to the sync root, `/`-separated.
    pub path: PathBuf,
    /// The matching rule.
    pub policy: Arc<Policy>,
}

/// Why a tier refused or failed an operation. The errno each maps to is decided in one place,
/// [`crate::fs::FsError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The operation cannot be done atomically in this tier (a directory rename in KV):
    /// programs such as `mv` then copy and delete.
    #[error("{0}")]
    CrossDevice(String),
    /// An exclusive create lost: another node holds the name.
    #[error("{path} already exists in the cluster")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// Compare-and-swap failed: the base revision is no longer current.
    #[error("{path} changed since revision {base:?}; nothing was written")]
    Stale {
        /// The path.
        path: PathBuf,
        /// The revision the writer started from.
        base: Option<Revision>,
    },
    /// A strongly consistent operation while the backend is unreachable.
    #[error("{tier} is unreachable: {reason}")]
    Unavailable {
        /// The tier.
        tier: TierKind,
        /// What failed.
        reason: String,
    },
    /// A strongly consistent operation whose outcome is unknown: the request went out and
    /// no answer came in time. The tier reconciles it when it learns the outcome (its message
    /// id shows up, or not).
    #[error("{tier}: outcome unknown ({reason}); it is reconciled when the link returns")]
    Unknown {
        /// The tier.
        tier: TierKind,
        /// What timed out.
        reason: String,
    },
    /// The write breaks the path's policy.
    #[error("refused by policy: {0}")]
    Refused(String),
    /// Content the policy validates is invalid.
    #[error("invalid content: {0}")]
    Invalid(String),
    /// Larger than the tier allows.
    #[error("too large: {0}")]
    TooBig(String),
    /// The tier cannot represent this kind of operation (e.g. a symlink in KV).
    #[error("{op} is not supported on {tier} paths")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The tier.
        tier: TierKind,
    },
    /// A local I/O error, passed through with its errno.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Anything else the backend reported; the message goes to the log.
    #[error("{0}")]
    Backend(String),
}

impl TierError {
    /// A strongly consistent operation of `tier` while its backend is unreachable.
    pub fn unavailable(tier: TierKind, reason: impl std::fmt::Display) -> TierError {
        TierError::Unavailable {
            tier,
            reason: reason.to_string(),
        }
    }
}

/// A backend that owns the paths its policies match. See the module docs for the contract.
pub trait Tier: Send + Sync + 'static {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// How writes to this tier's files are handled.
    fn write_mode(&self) -> WriteMode;

    /// The revision of the content the tree holds for `at`, if the tier has revisions.
    fn revision(&self, at: &Target) -> Option<Revision>;

    /// The revision `at` had at `when`, a recent moment: the base of a file created then and
    /// renamed onto `at` (its writer read the version current then; see [`revlog`]). Tiers
    /// that keep no log answer with the current revision.
    fn revision_at(&self, at: &Target, _when: std::time::Instant) -> Option<Revision> {
        self.revision(at)
    }

    /// The largest file the tier stores at `at`, if it has a limit: setting a larger size
    /// fails at once with `EFBIG`, and so does a commit of larger content.
    fn max_file_size(&self, _at: &Target) -> Option<u64> {
        None
    }

    /// A name is about to be created. `exclusive` is `O_EXCL`. Returns the revision of the new
    /// (empty) entry when the tier stored it already.
    fn create(&self, at: &Target, kind: Kind, exclusive: bool) -> Op<Option<Revision>, TierError>;

    /// Commits the complete new content of a staged file. `base` is the revision the writer
    /// started from; `durable` is set for `fsync` (a tier that batches should not wait for its
    /// next batch). Only called for [`WriteMode::Staged`] tiers (and validated local files).
    /// `None` means accepted without a revision yet (queued while offline).
    fn commit(
        &self,
        at: &Target,
        content: Arc<File>,
        base: Option<Revision>,
        durable: bool,
    ) -> Op<Option<Revision>, TierError>;

    /// Whether content of revision `rev` may replace the tree's copy of `at` now; records it.
    /// Called under the core's tree lock. `None` (local or queued content) is always admitted.
    fn admit(&self, at: &Target, rev: Option<&Revision>) -> bool;

    /// A name (file, directory, symlink) is about to be removed.
    fn remove(&self, at: &Target, kind: Kind) -> Op<(), TierError>;

    /// A name is about to move within this tier (both targets belong to it). `content` is the
    /// file's current content, for tiers that store content by name; `base` is the revision
    /// of `to` the moved content was made against (see [`Tier::revision_at`]).
    fn rename(
        &self,
        from: &Target,
        to: &Target,
        kind: Kind,
        content: Option<Arc<File>>,
        base: Option<Revision>,
    ) -> Op<(), TierError>;

    /// Whether hard links are allowed (only where the tier stores inodes, not names).
    fn supports_hard_links(&self) -> bool;

    /// A symbolic link to `target` is about to be created at `at`. Tiers that store links
    /// (git, local) record it and return its revision; the others refuse (`EPERM`).
    fn symlink(&self, at: &Target, _target: &std::ffi::OsStr) -> Op<Option<Revision>, TierError> {
        Op::err(TierError::Unsupported {
            op: "symlink",
            tier: at.policy.tier,
        })
    }

    /// Whether `flock`/`fcntl` locks on this tier's paths are the cluster's (held in NATS,
    /// seen by every node) rather than this mount's.
    fn shares_locks(&self) -> bool {
        false
    }

    /// Makes this node's changes visible to other nodes now: called before a lock on a path
    /// of a tier that [shares locks](Tier::shares_locks) is released, so the next holder can
    /// read them (git pushes what is pending; KV writes are on the server at their close).
    fn publish(&self) -> Op<(), TierError> {
        Op::ok(())
    }

    /// Brings the tree up to what the backend holds now: a program that just acquired a lock
    /// reads what the last holder wrote (on any of this tier's paths) before releasing it.
    fn settle(&self, _at: &Target) -> Op<(), TierError> {
        Op::ok(())
    }

    /// The permission bits of the regular file at `at` changed to `mode` (after the tree's
    /// file took them). Tiers that store the executable bit (git) record it; others keep
    /// modes node-local.
    fn chmod(&self, _at: &Target, _mode: u32) {}

    /// A read-only attribute the tier defines (`user.syncfs.rev`, ...), if the path has it.
    fn attribute(&self, at: &Target, name: &str) -> Option<Vec<u8>>;

    /// Appends bytes programs wrote to `at` ([`WriteMode::Append`] tiers). `id` is the same
    /// when the core retries an append that failed, so a retry is never stored twice. Returns
    /// once the tree's file holds the appended bytes, with the file's new revision.
    fn append(&self, at: &Target, _id: u64, _data: Appended, _durable: bool) -> Op<Option<Revision>, TierError> {
        Op::err(TierError::Unsupported {
            op: "append",
            tier: at.policy.tier,
        })
    }

    /// Whether an append to `at` can be taken now; checked at every `write(2)` so that an
    /// append tier fails fast (`EAGAIN`) while its backend is unreachable.
    fn check_append(&self, _at: &Target) -> Result<(), TierError> {
        Ok(())
    }

    /// Empties `at` ([`WriteMode::Append`] tiers: truncation to zero). Returns once the tree's
    /// file is empty.
    fn purge(&self, at: &Target) -> Op<(), TierError> {
        Op::err(TierError::Unsupported {
            op: "truncate",
            tier: at.policy.tier,
        })
    }

    /// Whether the tier keeps file content itself: the tree then holds a sparse placeholder
    /// of the file's size, tagged with the content's revision ([`CONTENT_TAG`]), and reads
    /// are served from [`Tier::content`].
    fn keeps_content(&self) -> bool {
        false
    }

    /// The file that holds the content of revision `rev` of `at`, for tiers that
    /// [keep content](Tier::keeps_content). Content that is not here yet may be returned while
    /// it arrives ([`Content::arriving`]), unless `whole` asks for all of it, verified.
    fn content(&self, at: &Target, _rev: &Revision, _whole: bool) -> Op<Content, TierError> {
        Op::err(TierError::Unsupported {
            op: "content",
            tier: at.policy.tier,
        })
    }

    /// Brings the directory `dir` (relative to the sync root) of the read-only history view
    /// up to date in the tree whose root is `root`. Only the durable tier has history.
    fn prepare_view(&self, _root: std::os::fd::BorrowedFd<'_>, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    /// Starts bringing other nodes' changes into the tree through `sink`.
    fn start(&self, _sink: Arc<dyn RemoteSink>) {}

    /// Stops cleanly at unmount (synced tiers release what they hold for this mount).
    fn shutdown(&self) -> Op<(), TierError> {
        Op::ok(())
    }
}

/// [`Tier::create`] of a tier that stores only files and whose first commit (or append)
/// makes a new name exist in the backend: files and directories need nothing yet (directories
/// are made where files arrive), anything else cannot be stored.
pub fn create_lazily(at: &Target, kind: Kind) -> Op<Option<Revision>, TierError> {
    match kind {
        Kind::File | Kind::Dir => Op::ok(None),
        _ => Op::err(TierError::Unsupported {
            op: "special files",
            tier: at.policy.tier,
        }),
    }
}

/// A change another node made, as a tier hands it to the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteChange {
    /// The file's new content; a file it replaces keeps its mode.
    File(Vec<u8>),
    /// The file's new content and whether it is executable, from a tier that stores the
    /// executable bit (git): the file's mode follows (`x` where `r`, or no `x` at all).
    Program {
        /// The content.
        bytes: Vec<u8>,
        /// Whether the file is executable.
        executable: bool,
    },
    /// A symbolic link to this target (it replaces a file or link of the same name).
    Symlink(Vec<u8>),
    /// The file (or symlink) is gone.
    Delete,
    /// The directory exists (possibly empty). A new directory gets `created` as its mtime
    /// when the tier knows it: a directory claim's age is the same on every node.
    Dir {
        /// When it was made (server time).
        created: Option<std::time::SystemTime>,
    },
    /// The directory may go if it is empty (its last entry, or its marker, was removed).
    PruneDir,
    /// Bytes appended to the file, which must hold exactly `at` bytes before them: a longer
    /// file is cut to `at` first (so an interrupted apply can be redone); a shorter one is an
    /// error. The file is created when missing and changed in place, so readers that have it
    /// open (`tail -f`) see it grow.
    Append {
        /// The file's length before the bytes.
        at: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The file's content is kept by the tier ([`Tier::keeps_content`]): the tree gets a
    /// sparse placeholder of `size` bytes tagged with the change's revision.
    Stub {
        /// The content's size.
        size: u64,
    },
}

/// Content a tier keeps, as [`Tier::content`] hands it out.
#[derive(Debug, Clone)]
pub struct Content {
    /// The file that holds it (or will).
    pub file: Arc<File>,
    /// Set while the content is still being fetched into `file`.
    pub arriving: Option<tokio::sync::watch::Receiver<Arrival>>,
}

/// How far content being fetched has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// Bytes in the file so far.
    pub len: u64,
    /// The content's whole size.
    pub size: u64,
    /// `Some` once the fetch ended: `Ok` when the content was verified against its digest.
    pub done: Option<Result<(), String>>,
}

impl Arrival {
    /// Whether `offset..offset + n` can be read now. Bytes before the end are served as they
    /// arrive; a read that reaches the end waits for the verification, so no program reads a
    /// whole file that did not match its digest without an error.
    pub fn readable(&self, offset: u64, n: u64) -> Result<bool, String> {
        match &self.done {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e.clone()),
            None => {
                let end = (offset + n).min(self.size);
                Ok(end < self.size && self.len >= end)
            }
        }
    }
}

/// The attribute on a placeholder naming the revision of the content it stands for.
pub const CONTENT_TAG: &std::ffi::CStr = c"user.syncfs.content";

/// Where tiers deliver other nodes' changes: the filesystem core.
pub trait RemoteSink: Send + Sync {
    /// Brings the tree's copy of `path` in line with `change` of revision `rev`, unless the
    /// tier does not [`admit`](Tier::admit) it, and drops the kernel's caches of the path.
    /// Does blocking file I/O: call it from a blocking context.
    fn apply(&self, path: &Path, change: RemoteChange, rev: Option<Revision>) -> Result<(), String> {
        self.apply_from(path, change, rev, None)
    }

    /// [`RemoteSink::apply`], naming the node that made the change where the tier knows it
    /// (for the event feed).
    fn apply_from(&self, path: &Path, change: RemoteChange, rev: Option<Revision>, node: Option<&str>) -> Result<(), String>;

    /// The regular files below `dir` in the tree, as paths relative to the sync root (for
    /// sweeping files whose keys vanished while the node was away).
    fn files(&self, dir: &Path) -> Vec<PathBuf>;

    /// The size of the regular file at `path` in the tree, if there is one.
    fn size(&self, _path: &Path) -> Option<u64> {
        None
    }

    /// Whether the tree's file at `path` is a placeholder tagged with a revision
    /// ([`CONTENT_TAG`]): content a tier that keeps content committed.
    fn tagged(&self, _path: &Path) -> bool {
        false
    }

    /// Checks content a tier produced itself (a merge result) against the path's schema.
    fn validate(&self, _path: &Path, _content: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// The tiers of one mount, by kind.
#[derive(Clone, Default)]
pub struct Tiers {
    tiers: Vec<(TierKind, Arc<dyn Tier>)>,
}

impl Tiers {
    /// Adds a tier.
    pub fn add(&mut self, tier: Arc<dyn Tier>) {
        self.tiers.push((tier.kind(), tier));
    }

    /// Every tier of the mount.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Tier>> {
        self.tiers.iter().map(|(_, t)| t)
    }

    /// The tier of a kind, if this mount has it.
    pub fn get(&self, kind: TierKind) -> Option<&Arc<dyn Tier>> {
        self.tiers.iter().find(|(k, _)| *k == kind).map(|(_, t)| t)
    }

    /// The kinds this mount serves.
    pub fn kinds(&self) -> Vec<TierKind> {
        self.tiers.iter().map(|(k, _)| *k).collect()
    }
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds()).finish()
    }
}
