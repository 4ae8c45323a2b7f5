//! Free space on the state directory's disk, for tiers that must refuse a write (`ENOSPC`)
//! before it reaches a backend rather than fail half-way after it did.
//!
//! A failure is reported as `ENOSPC` ([`TierError::Io`], which the core passes through) when
//! it is one (libgit2 says so only in its message), or when the filesystem is out of room at
//! the time: libgit2's and others' writers turn the errno into "write error".

use std::io;
use std::path::Path;

use super::TierError;

/// Room a git commit needs besides its blobs: tree and commit objects, the ref's lock file
/// and its log (each at least a block).
pub const GIT_MARGIN: u64 = 256 << 10;

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C string and out pointer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The filesystem holding `path`: its size and its free bytes.
pub fn usage(path: &Path) -> io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C string and out pointer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_blocks as u64 * st.f_frsize as u64, st.f_bavail as u64 * st.f_frsize as u64))
}

/// `ENOSPC` (the log says what did not fit: the errno carries no text).
pub fn no_space(what: impl std::fmt::Display) -> TierError {
    tracing::warn!("{what}: no space left on the state directory's disk");
    TierError::Io(io::Error::from_raw_os_error(libc::ENOSPC))
}

/// Whether `path`'s filesystem has fewer than `need` bytes free (unknown: no).
pub fn short_of(path: &Path, need: u64) -> bool {
    free_bytes(path).is_ok_and(|free| free < need)
}

/// Whether a libgit2 error is the OS's "no space" or "quota exceeded".
pub fn git_is_full(e: &git2::Error) -> bool {
    let msg = e.message();
    [libc::ENOSPC, libc::EDQUOT].iter().any(|&errno| msg.contains(&io::Error::from_raw_os_error(errno).to_string()))
        || msg.contains("No space left on device")
}

/// `e`, or `ENOSPC` when it is one or `path`'s filesystem has fewer than `need` bytes free.
pub fn or_full(e: TierError, path: &Path, need: u64) -> TierError {
    match &e {
        TierError::Io(io) if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => e,
        _ if short_of(path, need) => no_space(format_args!("{e} (in {})", path.display())),
        _ => e,
    }
}
