//! `flock(2)` and `fcntl(2)` locks: the core resolves the file, asks the tier whether its
//! locks are the cluster's, and hands the call to [`crate::lock::Locks`].

use std::sync::Arc;

use super::{Core, FsError, FsOp, Ino};
use crate::lock::{Held, LockKey, Locks, Want};
use crate::op::Op;
use crate::tier::Target;

/// A lock the kernel asked about, as `F_GETLK` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK`, or `F_UNLCK` when nothing is in the way.
    pub typ: i32,
    /// The holder's process id, on its node.
    pub pid: u32,
}

impl Core {
    /// Sets where locks are kept (the daemon, once NATS is there).
    pub fn set_locks(&self, locks: Arc<Locks>) {
        let _ = self.locks.set(locks);
    }

    /// The mount's locks.
    pub fn locks(&self) -> &Arc<Locks> {
        self.locks.get_or_init(|| Arc::new(Locks::local("local")))
    }

    fn lock_key(&self, target: &Target) -> Result<LockKey, FsError> {
        let shared = self.tier(target).shares_locks() && self.locks().shares();
        let key = if shared {
            crate::tier::jetstream::key_of(&target.path)?
        } else {
            target.path.display().to_string()
        };
        Ok(LockKey { shared, key })
    }

    /// `F_SETLK`, `F_SETLKW`, `flock`: takes, changes or gives up `owner`'s lock on
    /// `start..=end` of `ino`. A granted lock on a synced path brings the file up to what the
    /// backend holds before the program hears of it, so it reads what the last holder wrote.
    #[allow(clippy::too_many_arguments)]
    pub fn setlk(self: &Arc<Self>, ino: Ino, fh: u64, owner: u64, start: u64, end: u64, typ: i32, pid: u32, wait: bool) -> FsOp<()> {
        let Some(want) = Want::from_type(typ) else {
            return Op::err(FsError::os(libc::EINVAL));
        };
        let (target, at) = match self.target_of(ino).and_then(|t| self.lock_key(&t).map(|k| (t, k))) {
            Ok(x) => x,
            Err(e) => return Op::err(e),
        };
        let this = self.clone();
        Op::pending(async move {
            if want == Want::Unlock && at.shared {
                this.publish_all().await;
            }
            this.locks().set(&at, owner, pid, start, end, want, wait).await?;
            if want == Want::Unlock {
                return Ok(());
            }
            this.lock_handles.lock().entry(fh).or_default().insert((at.clone(), owner));
            if at.shared {
                // What the last holder wrote before releasing may be on any tier's paths.
                for tier in this.tiers.all() {
                    if tier.shares_locks() {
                        if let Err(e) = tier.settle(&target).into_future().await {
                            tracing::warn!(path = %target.path.display(), error = %e, "a lock was granted, but this node could not catch up with the server; it may read older versions");
                        }
                    }
                }
                // The kernel drops names and pages in order: once this one is done, every
                // invalidation the catch-up queued is, and the program's next open or read
                // cannot meet a version the catch-up replaced.
                if let Some(k) = this.kernel.get() {
                    let _ = k.invalidate_attrs_acked(super::ROOT).await;
                }
                if this.replaced_remotely(ino) {
                    // The descriptor reads a version another node has replaced: under the lock
                    // the program would read stale content and write over the newer one (a
                    // database's pages). It gets ESTALE instead, and reopens the file.
                    let _ = this.locks().set(&at, owner, pid, start, end, Want::Unlock, false).await;
                    return Err(FsError::os(libc::ESTALE));
                }
            }
            Ok(())
        })
    }

    /// Whether another node's change replaced the file `ino` stands for (its descriptors read
    /// an older version).
    fn replaced_remotely(&self, ino: Ino) -> bool {
        self.inodes.lock().get(ino).and_then(|n| n.orphan.as_ref()).is_some_and(|o| o.remote)
    }

    /// `F_GETLK`: the first lock of another owner in the way of `typ` on `start..=end`.
    pub fn getlk(self: &Arc<Self>, ino: Ino, owner: u64, start: u64, end: u64, typ: i32) -> FsOp<LockInfo> {
        let Some(want) = Want::from_type(typ) else {
            return Op::err(FsError::os(libc::EINVAL));
        };
        let at = match self.target_of(ino).and_then(|t| self.lock_key(&t)) {
            Ok(k) => k,
            Err(e) => return Op::err(e),
        };
        let this = self.clone();
        Op::pending(async move {
            let held: Option<Held> = this.locks().test(&at, owner, start, end, want).await?;
            Ok(match held {
                Some(h) => LockInfo { start: h.start, end: h.end, typ: if h.write { libc::F_WRLCK } else { libc::F_RDLCK }, pid: h.pid },
                None => LockInfo { start, end, typ: libc::F_UNLCK, pid: 0 },
            })
        })
    }

    /// A close (flush) of `ino` by `owner`: POSIX releases every lock the process holds on
    /// the file. Costs nothing where this mount holds none.
    pub fn unlock_owner(self: &Arc<Self>, ino: Ino, owner: u64) -> FsOp<()> {
        let Ok(at) = self.target_of(ino).and_then(|t| self.lock_key(&t)) else {
            return Op::ok(());
        };
        if !self.locks().may_hold(&at, owner) {
            return Op::ok(());
        }
        let this = self.clone();
        Op::pending(async move {
            if at.shared {
                this.publish_all().await;
            }
            Ok(this.locks().release(&at, owner).await?)
        })
    }

    /// The last close of a file handle: the locks taken through it go (`flock`'s, and
    /// `fcntl`'s where the kernel sends no flush).
    pub fn unlock_handle(self: &Arc<Self>, fh: u64) -> FsOp<()> {
        let Some(taken) = self.lock_handles.lock().remove(&fh) else {
            return Op::ok(());
        };
        let this = self.clone();
        Op::pending(async move {
            if taken.iter().any(|(at, owner)| at.shared && this.locks().may_hold(at, *owner)) {
                this.publish_all().await;
            }
            for (at, owner) in taken {
                this.locks().release(&at, owner).await?;
            }
            Ok(())
        })
    }

    /// Before a shared lock is released: every tier that shares locks makes this node's
    /// changes visible to the other nodes (git pushes), so the next holder can read them.
    async fn publish_all(&self) {
        for tier in self.tiers.all() {
            if tier.shares_locks() {
                if let Err(e) = tier.publish().into_future().await {
                    tracing::warn!(error = %e, "releasing a lock before this node's changes reached the other nodes");
                }
            }
        }
    }

    /// The fencing revision of this mount's lock on `ino`, while it holds one.
    pub(super) fn lock_fence(&self, target: &Target) -> Option<u64> {
        self.lock_key(target).ok().and_then(|k| self.locks().fence(&k))
    }
}
