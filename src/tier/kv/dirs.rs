//! Directory claims: on compare-and-swap paths (`cas`, `cas-create`) a directory's marker key
//! is created exclusively, so `mkdir` is a cluster-wide lock (the idiom of lock directories:
//! tbd's `ids.yml.lock`, `mkdir /var/lock/x || exit`). `rmdir` releases it only while it is the
//! revision this node knows (never another node's newer claim); `rename` moves it as one
//! claim (create the new name exclusively, then delete the old one by compare-and-swap, undone
//! when the old one changed meanwhile), which is how a stale lock is broken. TTL and
//! `ephemeral` apply as to files: an ephemeral directory is refreshed while this mount holds
//! it, and every node removes it when it expires.

use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;

use super::{creates, sync, unavailable, Inner, KvOp, PubError};
use crate::policy::{Consistency, Policy};
use crate::tier::{Revision, Target, TierError};

/// Whether directories on this path are claims.
pub(super) fn claims_dirs(at: &Target) -> bool {
    claims(&at.policy)
}

/// Whether a policy's directories are claims. (Markers of `lww` directories do not expire on
/// the nodes: a directory made by `mkdir` stays while the node is mounted.)
pub(super) fn claims(policy: &Policy) -> bool {
    matches!(policy.consistency, Consistency::Cas | Consistency::CasCreate)
}

/// A directory claim's creation time as its marker's value: nanoseconds since the epoch.
fn stamp(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_string()
}

/// The creation time a marker's value names (markers of `lww` paths have none).
pub(super) fn created_at(value: &[u8]) -> Option<SystemTime> {
    let nanos: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

/// What the server holds for a key, compared with a revision this node knows.
enum Last {
    /// No live value (deleted, purged or expired).
    Gone,
    /// A live value this mount wrote (its own refresh), at this revision.
    Ours(u64),
    /// Another writer's live value.
    Other(u64),
}

impl Inner {
    /// `mkdir` of a directory claim: `EEXIST` when anybody holds the name.
    pub(super) async fn claim_dir(&self, at: &Target, bucket: usize, key: String) -> Result<Option<Revision>, TierError> {
        let rev = self.create_dir_marker(at, bucket, &key).await?;
        self.lost.lock().remove(&at.path);
        Ok(Some(Revision(rev.to_string())))
    }

    /// Creates `at`'s marker exclusively and records it (owned when ephemeral).
    async fn create_dir_marker(&self, at: &Target, bucket: usize, key: &str) -> Result<u64, TierError> {
        if !self.nats.is_connected() {
            return Err(unavailable("not connected; directory claims are not queued"));
        }
        // As for files: written down before it is published, so that a kill before mkdir
        // returns takes the claim back at the next mount.
        let msg_id = self.msg_id();
        let create = creates::Create { bucket: self.buckets[bucket].name.clone(), key: key.to_string(), msg_id: msg_id.clone() };
        self.creates.lock().begin(&at.path, create);
        // The marker's value is its creation time: refreshes re-publish it, so the age every
        // node shows (the directory's mtime) stays the creation's.
        let stamp = Bytes::from(stamp(SystemTime::now()));
        let created = self.create_exclusive(bucket, key, msg_id, stamp.clone()).await;
        let result = match created {
            Ok(Ok((rev, msg_id))) => {
                // Not kept alive nor expired on the nodes (yet): a claim directory is often the
                // parent of file claims, and one that expired took its tree entry with it
                // while file claims were being created in it.
                self.view.lock().mark_dir(&at.path, rev, None);
                self.settle(&msg_id);
                Ok(rev)
            }
            Ok(Err(_)) => Err(TierError::Exists { path: at.path.clone() }),
            Err(e) => Err(e),
        };
        // Acknowledged (or certainly not made): nothing to take back. An unknown outcome
        // stays written down: if it landed, the next mount takes it back.
        if !matches!(result, Err(TierError::Unknown { .. })) {
            self.creates.lock().done(&at.path);
        }
        result
    }

    /// `rmdir` of a directory claim. Nothing to do when the server has no marker this node
    /// knows; `ESTALE` when another node holds the name at a revision this node has not seen.
    pub(super) async fn release_dir(&self, at: &Target, bucket: usize, key: String) -> Result<(), TierError> {
        let owned = self.view.lock().owned.remove(&at.path).filter(|o| o.dir);
        let known = owned.as_ref().map(|o| o.rev).or_else(|| self.view.lock().dir_rev(&at.path));
        let Some(rev) = known else { return Ok(()) };
        match self.delete_marker(&at.path, bucket, &key, rev, owned.is_some()).await {
            // Deleted, or already gone (expired, broken): the name is free either way.
            Ok(_) => {
                self.view.lock().unmark_dir(&at.path, None);
                Ok(())
            }
            Err(e) => {
                if let (TierError::Unavailable { .. }, Some(o)) = (&e, owned) {
                    // Not sent: the program still holds it.
                    self.view.lock().owned.insert(at.path.clone(), o);
                }
                Err(e)
            }
        }
    }

    /// Deletes `path`'s marker at `rev` (following this mount's own refreshes when `held`).
    /// `Ok(false)`: it was already gone. `ESTALE` when another writer's marker is there.
    async fn delete_marker(&self, path: &Path, bucket: usize, key: &str, mut rev: u64, held: bool) -> Result<bool, TierError> {
        let stale = |seq: u64| TierError::Stale { path: path.to_path_buf(), base: Some(Revision(seq.to_string())) };
        for _ in 0..3 {
            let msg_id = self.msg_id();
            match self.publish(bucket, key, &KvOp::Delete, Some(rev), &msg_id).await {
                Ok(_) => {
                    self.settle(&msg_id);
                    return Ok(true);
                }
                Err(PubError::Tier(e)) => return Err(e),
                Err(PubError::WrongLastSequence) => match self.last(bucket, key).await? {
                    Last::Gone => return Ok(false),
                    Last::Ours(seq) if held && seq != rev => rev = seq,
                    Last::Ours(seq) | Last::Other(seq) => return Err(stale(seq)),
                },
            }
        }
        Err(stale(rev))
    }

    async fn last(&self, bucket: usize, key: &str) -> Result<Last, TierError> {
        let last = sync::last_message(self, bucket, key).await.ok_or_else(|| unavailable("cannot read the marker"))?;
        let Some(m) = last else { return Ok(Last::Gone) };
        if sync::is_delete(&m) {
            return Ok(Last::Gone);
        }
        Ok(match sync::ours(self, Some(&m)) {
            Some(seq) => Last::Ours(seq),
            None => Last::Other(m.sequence),
        })
    }

    /// `rename` of an empty directory claim onto a free name of a claim rule: `EEXIST` when
    /// the new name is held, `ENOENT` when the old one was released or broken meanwhile,
    /// `ESTALE` when another node took the old name again.
    pub(super) async fn move_dir_claim(&self, from: &Target, to: &Target) -> Result<(), TierError> {
        let (from_bucket, to_bucket) = (self.bucket_of(from)?, self.bucket_of(to)?);
        let encode = |p: &Path| {
            super::key::encode_dir(p).map_err(|_| TierError::Io(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)))
        };
        let (from_key, to_key) = (encode(&from.path)?, encode(&to.path)?);
        let owned = self.view.lock().owned.get(&from.path).filter(|o| o.dir).cloned();
        let known = owned.as_ref().map(|o| o.rev).or_else(|| self.view.lock().dir_rev(&from.path));
        if known.is_none() && self.view.lock().dir_removed(&from.path) {
            // Released or broken by another node; this node's tree has not caught up yet.
            return Err(TierError::Io(std::io::Error::from_raw_os_error(libc::ENOENT)));
        }
        let to_rev = self.create_dir_marker(to, to_bucket, &to_key).await?;
        // A directory no marker ever named (made for a file's parent) moves in the tree only.
        let Some(rev) = known else { return Ok(()) };
        let moved = self.delete_marker(&from.path, from_bucket, &from_key, rev, owned.is_some()).await;
        if let Ok(true) = moved {
            self.view.lock().unmark_dir(&from.path, None);
            return Ok(());
        }
        // The old name is not this node's to move (released or broken by another node since
        // this node heard of it, or taken again): give the new one back.
        match self.delete_marker(&to.path, to_bucket, &to_key, to_rev, true).await {
            Ok(_) => {
                self.view.lock().unmark_dir(&to.path, None);
            }
            Err(u) => {
                tracing::warn!(path = %to.path.display(), error = %u, "cannot undo a directory claim's rename; it stays until removed or expired");
            }
        }
        match moved {
            Ok(_) => {
                self.view.lock().unmark_dir(&from.path, None);
                Err(TierError::Io(std::io::Error::from_raw_os_error(libc::ENOENT)))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_value_names_its_creation_time() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(1_796_235_786_886_876_121);
        assert_eq!(created_at(stamp(t).as_bytes()), Some(t));
        assert_eq!(created_at(b""), None);
    }
}
