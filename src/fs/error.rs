//! The core's error type and the one place where errors become errnos.
//!
//! [`FsError::errno`] matches every variant (and every [`TierError`] variant) without a
//! wildcard arm, so a new failure cannot reach a program without someone deciding what it sees.
//! docs/errors.md is the same table in prose, and mount-tests/errors.rs checks each row.

use std::io;
use std::path::PathBuf;

use crate::policy::TierKind;
use crate::tier::TierError;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The kernel named an inode the core no longer knows.
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    /// The kernel named a file handle the core no longer knows.
    #[error("unknown file handle {0}")]
    UnknownHandle(u64),
    /// An I/O error on the node's tree, with the kernel's errno.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A tier refused or failed.
    #[error(transparent)]
    Tier(#[from] TierError),
    /// A `flock`/`fcntl` lock was not granted.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// Content that this path's policy validates is invalid; the old content is kept.
    #[error("{path}: {reason}")]
    InvalidContent {
        /// The path, relative to the sync root.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A rename or hard link between paths of different tiers.
    #[error("{op} from {from} ({from_tier}) to {to} ({to_tier}) would cross tiers")]
    CrossTier {
        /// `rename` or `link`.
        op: &'static str,
        /// Source path.
        from: PathBuf,
        /// Source tier.
        from_tier: TierKind,
        /// Destination path.
        to: PathBuf,
        /// Destination tier.
        to_tier: TierKind,
    },
    /// The path's tier cannot represent the operation (a symlink in KV, a hard link in git).
    #[error("{op} is not supported on {tier} paths ({path})")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The tier.
        tier: TierKind,
        /// The path.
        path: PathBuf,
    },
    /// An `O_TRUNC` open of a file a program on this node is executing.
    #[error("{0} is being executed")]
    TextBusy(PathBuf),
    /// A read-only path: syncfs's own files (the history view, the event feed, the status).
    #[error("{0} is read-only (syncfs writes it)")]
    ReadOnly(PathBuf),
    /// A `user.syncfs.*` attribute that only syncfs sets.
    #[error("{0} is read-only")]
    ReadOnlyAttribute(String),
    /// An attribute namespace other than `user.`.
    #[error("only user.* extended attributes are supported, not {0}")]
    AttributeNamespace(String),
    /// The attribute does not exist.
    #[error("no attribute {0}")]
    NoAttribute(String),
    /// The caller's buffer is smaller than the value.
    #[error("buffer of {size} bytes is too small for {needed}")]
    Range {
        /// The caller's buffer size.
        size: u32,
        /// The value's size.
        needed: usize,
    },
}

impl FsError {
    /// The errno a program sees. The only errno mapping in syncfs.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::UnknownInode(_) => libc::ESTALE,
            FsError::UnknownHandle(_) => libc::EBADF,
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::Tier(e) => match e {
                TierError::CrossDevice(_) => libc::EXDEV,
                TierError::Exists { .. } => libc::EEXIST,
                TierError::Stale { .. } => libc::ESTALE,
                TierError::Unavailable { .. } => libc::EAGAIN,
                TierError::Unknown { .. } => libc::ETIMEDOUT,
                TierError::Refused(_) => libc::EPERM,
                TierError::Invalid(_) => libc::EINVAL,
                TierError::TooBig(_) => libc::EFBIG,
                TierError::Unsupported { .. } => libc::EPERM,
                TierError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
                TierError::Backend(_) => libc::EIO,
            },
            FsError::Lock(crate::lock::LockError::Conflict(_)) => libc::EAGAIN,
            FsError::Lock(crate::lock::LockError::Unavailable(_)) => libc::ENOLCK,
            FsError::InvalidContent { .. } => libc::EINVAL,
            FsError::CrossTier { .. } => libc::EXDEV,
            FsError::Unsupported { .. } => libc::EPERM,
            FsError::ReadOnlyAttribute(_) => libc::EPERM,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::TextBusy(_) => libc::ETXTBSY,
            FsError::AttributeNamespace(_) => libc::EOPNOTSUPP,
            FsError::NoAttribute(_) => libc::ENODATA,
            FsError::Range { .. } => libc::ERANGE,
        }
    }

    /// Whether programs hit this error in normal use (ENOENT on lookup, EEXIST, ENODATA...),
    /// so it is logged at debug level; everything else is logged as a warning.
    pub fn is_expected(&self) -> bool {
        matches!(
            self.errno(),
            libc::ENOENT
                | libc::EEXIST
                | libc::ENODATA
                | libc::ENOTEMPTY
                | libc::ERANGE
                | libc::EISDIR
                | libc::ENOTDIR
                | libc::EOPNOTSUPP
                // A program writing syncfs's own files: its own mistake, nothing to fix here.
                | libc::EROFS
        )
    }

    /// Whether a refused commit can never succeed as it is (a policy, a size or a base
    /// revision refused it), or must not be tried again (an unknown outcome: the tier
    /// reconciles the write that went out; a second one would race it), as opposed to a
    /// failure worth retrying (EAGAIN, a full disk).
    pub fn is_final(&self) -> bool {
        match self {
            FsError::Tier(e) => matches!(
                e,
                TierError::Refused(_)
                    | TierError::Invalid(_)
                    | TierError::TooBig(_)
                    | TierError::Stale { .. }
                    | TierError::Exists { .. }
                    | TierError::Unsupported { .. }
                    | TierError::CrossDevice(_)
                    | TierError::Unknown { .. }
            ),
            FsError::InvalidContent { .. } | FsError::ReadOnly(_) | FsError::Unsupported { .. } => true,
            _ => false,
        }
    }

    /// A shorthand for an errno from the tree.
    pub fn os(errno: i32) -> FsError {
        FsError::Io(io::Error::from_raw_os_error(errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_errnos() {
        let p = || PathBuf::from("p");
        let cases: Vec<(FsError, i32)> = vec![
            (TierError::Exists { path: p() }.into(), libc::EEXIST),
            (TierError::Stale { path: p(), base: None }.into(), libc::ESTALE),
            (
                TierError::Unavailable {
                    tier: TierKind::NatsKv,
                    reason: "down".into(),
                }
                .into(),
                libc::EAGAIN,
            ),
            (TierError::Unknown { tier: TierKind::NatsKv, reason: "no ack".into() }.into(), libc::ETIMEDOUT),
            (TierError::Refused("immutable".into()).into(), libc::EPERM),
            (TierError::Invalid("schema".into()).into(), libc::EINVAL),
            (TierError::TooBig("1 MiB".into()).into(), libc::EFBIG),
            (TierError::Backend("boom".into()).into(), libc::EIO),
            (TierError::CrossDevice("dir rename".into()).into(), libc::EXDEV),
            (FsError::InvalidContent { path: p(), reason: "x".into() }, libc::EINVAL),
            (
                FsError::CrossTier {
                    op: "rename",
                    from: p(),
                    from_tier: TierKind::Local,
                    to: p(),
                    to_tier: TierKind::Git,
                },
                libc::EXDEV,
            ),
            (FsError::ReadOnlyAttribute("user.syncfs.tier".into()), libc::EPERM),
            (FsError::TextBusy(p()), libc::ETXTBSY),
            (FsError::AttributeNamespace("trusted.x".into()), libc::EOPNOTSUPP),
            (FsError::NoAttribute("user.x".into()), libc::ENODATA),
            (FsError::Range { size: 1, needed: 2 }, libc::ERANGE),
            (FsError::os(libc::ENOSPC), libc::ENOSPC),
            (FsError::Io(io::Error::other("no errno")), libc::EIO),
        ];
        for (error, errno) in cases {
            assert_eq!(error.errno(), errno, "{error}");
        }
    }
}
