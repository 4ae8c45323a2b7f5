//! Extended attributes: `user.*` stored on the tree's files, and the `user.syncfs.*` names
//! syncfs answers itself.
//!
//! Virtual names are not listed by `listxattr`, except `user.syncfs.rev` where the tier gives
//! one: `cp --preserve=xattr` then copies the revision (the compare-and-swap idiom of SPEC 3.1)
//! and nothing else, and `getfattr -d` shows what a program may set. Only `user.syncfs.rev`
//! may be set, and only on files that do not sync (the temporary file of that idiom).
//! Other namespaces (`trusted.`, `security.`, `system.`) are not stored: reads say "no such
//! attribute", writes `EOPNOTSUPP`, so no caller can reach privileged names through the root
//! daemon.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use super::tree;
use super::{Core, FsError, Ino, Kind, ROOT};
use crate::policy::TierKind;
use crate::tier::CONTENT_TAG;

/// The prefix of the attributes syncfs defines.
pub const SYNCFS_PREFIX: &str = "user.syncfs.";
/// The revision attribute, settable on local files for rename-based compare-and-swap.
pub const REV: &str = "user.syncfs.rev";

enum Name<'a> {
    Syncfs(&'a str),
    User,
    Other,
}

fn classify(name: &OsStr) -> Name<'_> {
    let bytes = name.as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) if s.starts_with(SYNCFS_PREFIX) => Name::Syncfs(s),
        _ if bytes.starts_with(b"user.") => Name::User,
        _ => Name::Other,
    }
}

impl Core {
    /// Whether the node stores `user.*` attributes on the tree (files and directories do).
    fn stores_xattrs(&self, ino: Ino) -> Result<bool, FsError> {
        Ok(matches!(self.kind(ino)?, Kind::File | Kind::Dir))
    }

    fn is_local(&self, ino: Ino) -> Result<bool, FsError> {
        Ok(self.target_of(ino)?.policy.tier == TierKind::Local)
    }

    /// The value of an attribute.
    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>, FsError> {
        let missing = || FsError::NoAttribute(name.to_string_lossy().into_owned());
        match classify(name) {
            Name::Syncfs(full) => {
                if full == REV && self.is_local(ino)? {
                    return self.stored_xattr(ino, name)?.ok_or_else(missing);
                }
                self.virtual_xattr(ino, full)?.ok_or_else(missing)
            }
            Name::User => self.stored_xattr(ino, name)?.ok_or_else(missing),
            Name::Other => Err(missing()),
        }
    }

    fn stored_xattr(&self, ino: Ino, name: &OsStr) -> Result<Option<Vec<u8>>, FsError> {
        if !self.stores_xattrs(ino)? {
            return Ok(None);
        }
        let fd = self.node_fd(ino)?;
        Ok(tree::get_xattr(fd.as_fd(), &tree::cname(name)?)?)
    }

    fn virtual_xattr(&self, ino: Ino, name: &str) -> Result<Option<Vec<u8>>, FsError> {
        let short = &name[SYNCFS_PREFIX.len()..];
        if ino == ROOT {
            match short {
                "status" => return Ok(self.status.get().map(|f| f())),
                "policies" => return Ok(Some(self.policies.source().as_bytes().to_vec())),
                _ => {}
            }
        }
        let target = self.target_of(ino)?;
        Ok(match short {
            "tier" => Some(target.policy.tier.name().as_bytes().to_vec()),
            "policy" => Some(target.policy.pattern.as_bytes().to_vec()),
            // A refused write here, else what the tier says (a claim this mount lost).
            "error" => self
                .refusal(&target.path)
                .map(String::into_bytes)
                .or_else(|| self.tier(&target).attribute(&target, name)),
            "content" => None,
            // The fencing revision of this mount's lock on the file, while it holds one.
            "lock" => self.lock_fence(&target).map(|f| f.to_string().into_bytes()),
            _ => {
                let tier = self.tier(&target);
                match tier.attribute(&target, name) {
                    // Not heard from the backend yet (offline since the mount): the placeholder
                    // names the revision it stands for.
                    None if name == REV && tier.keeps_content() => self.content_tag(ino)?.map(|r| r.0.into_bytes()),
                    other => other,
                }
            }
        })
    }

    /// Sets an attribute.
    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<(), FsError> {
        super::writable(&self.target_of(ino)?)?;
        match classify(name) {
            Name::Syncfs(full) if full == REV && self.is_local(ino)? => {}
            Name::Syncfs(full) => return Err(FsError::ReadOnlyAttribute(full.to_string())),
            Name::User => {}
            Name::Other => {
                return Err(FsError::AttributeNamespace(name.to_string_lossy().into_owned()))
            }
        }
        if !self.stores_xattrs(ino)? {
            return Err(FsError::os(libc::EPERM));
        }
        let fd = self.node_fd(ino)?;
        tree::set_xattr(fd.as_fd(), &tree::cname(name)?, value, flags)?;
        Ok(())
    }

    /// Names of the attributes a program may copy: stored `user.*` ones and the tier's revision.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<OsString>, FsError> {
        let mut names = Vec::new();
        if self.stores_xattrs(ino)? {
            let fd = self.node_fd(ino)?;
            names = tree::list_xattr(fd.as_fd())?
                .into_iter()
                .filter(|n| n.as_bytes().starts_with(b"user.") && n.as_bytes() != CONTENT_TAG.to_bytes())
                .collect();
        }
        if !self.is_local(ino)? && !names.iter().any(|n| n == REV) {
            if let Some(_rev) = self.virtual_xattr(ino, REV)? {
                names.push(OsString::from(REV));
            }
        }
        Ok(names)
    }

    /// Removes an attribute.
    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<(), FsError> {
        super::writable(&self.target_of(ino)?)?;
        match classify(name) {
            Name::Syncfs(full) if full == REV && self.is_local(ino)? => {}
            Name::Syncfs(full) => return Err(FsError::ReadOnlyAttribute(full.to_string())),
            Name::User => {}
            Name::Other => {
                return Err(FsError::AttributeNamespace(name.to_string_lossy().into_owned()))
            }
        }
        if !self.stores_xattrs(ino)? {
            return Err(FsError::NoAttribute(name.to_string_lossy().into_owned()));
        }
        let fd = self.node_fd(ino)?;
        match tree::remove_xattr(fd.as_fd(), &tree::cname(name)?) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {
                Err(FsError::NoAttribute(name.to_string_lossy().into_owned()))
            }
            other => Ok(other?),
        }
    }
}
