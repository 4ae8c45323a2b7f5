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
//!
//! A [`Revision`] is an opaque string that changes with every committed change of a path's
//! content (the KV revision for nats-kv, a blob id for git). A tier without revisions (local)
//! returns none.
//!
//! Calls return an [`Op`]: ready when the tier answered without waiting (local disk), pending
//! when it needs the network. The core never blocks a FUSE thread on a pending op.

pub mod local;

use std::fs::File;
use std::io;
use std::path::PathBuf;
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

/// A backend that owns the paths its policies match. See the module docs for the contract.
pub trait Tier: Send + Sync + 'static {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// How writes to this tier's files are handled.
    fn write_mode(&self) -> WriteMode;

    /// A name is about to be created. `exclusive` is `O_EXCL`.
    fn create(&self, at: &Target, kind: Kind, exclusive: bool) -> Op<Option<Revision>, TierError>;

    /// Commits the complete new content of a staged file. `base` is the revision the writer
    /// started from. Only called for [`WriteMode::Staged`] tiers.
    fn commit(
        &self,
        at: &Target,
        content: Arc<File>,
        base: Option<Revision>,
    ) -> Op<Option<Revision>, TierError>;

    /// A name (file, directory, symlink) is about to be removed.
    fn remove(&self, at: &Target, kind: Kind) -> Op<(), TierError>;

    /// A name is about to move within this tier (both targets belong to it).
    fn rename(&self, from: &Target, to: &Target, kind: Kind) -> Op<(), TierError>;

    /// Whether hard links are allowed (only where the tier stores inodes, not names).
    fn supports_hard_links(&self) -> bool;

    /// A read-only attribute the tier defines (`user.syncfs.rev`, ...), if the path has it.
    fn attribute(&self, at: &Target, name: &str) -> Option<Vec<u8>>;
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
