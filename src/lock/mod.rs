//! Locks programs take with `flock(2)` and `fcntl(2)`, held where the path's tier says.
//!
//! # Where locks live
//!
//! - On paths whose tier [shares locks](crate::tier::Tier::shares_locks) (git, NATS KV), in the
//!   NATS KV bucket [`LOCK_BUCKET`]: one key per file (the path's KV key), whose value is the
//!   file's [`LockSet`], changed only by compare-and-swap on the key's revision. Two nodes
//!   racing for a lock both read the set, and only one write lands; the other reads again.
//! - Elsewhere (local, streams, blobs), in this mount's memory, with the same rules.
//!
//! # Leases
//!
//! Each mount is a *holder* (`node#number`): it keeps a key in [`HOLDER_BUCKET`] alive every
//! third of the lease, and the bucket forgets keys one lease after their last write. A lock
//! whose holder's key is gone belongs to a dead mount: it does not conflict, and the next
//! change of that file's set drops it. So a killed daemon's locks go one lease after it died
//! (`locks.lease_ms`, 15 s), and a restarted daemon is a new holder that does not inherit
//! them. Unmount releases everything at once.
//!
//! # Fencing
//!
//! Every acquisition writes the set: the key's new revision grows with each acquisition of
//! any lock of the bucket, and is what `user.syncfs.lock` shows the holder (a fencing token a
//! program can hand to a service that checks it).

pub mod model;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;

pub use model::{Held, LockSet, Want};

use crate::nats::Nats;

/// The bucket that holds the lock sets of shared paths.
pub const LOCK_BUCKET: &str = "syncfs_locks";
/// The bucket where live holders keep their keys.
pub const HOLDER_BUCKET: &str = "syncfs_lock_holders";
/// How long a dead mount's locks last, by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// How long one backend call may take before the lock call fails (`ENOLCK`).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a lock was not granted. The errno for each is decided in [`crate::fs::FsError::errno`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum LockError {
    /// Another owner holds a conflicting lock (`EAGAIN`, which is `EWOULDBLOCK`).
    #[error("locked by {} (pid {} there)", .0.holder, .0.pid)]
    Conflict(Held),
    /// The backend that keeps the lock cannot be reached (`ENOLCK`).
    #[error("the lock service is unreachable: {0}")]
    Unavailable(String),
}

/// Where a file's locks live, and its name there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockKey {
    /// In the cluster's bucket (else in this mount).
    pub shared: bool,
    /// The file's KV key (shared) or path (local).
    pub key: String,
}

struct Cluster {
    locks: kv::Store,
    holders: kv::Store,
}

/// The locks of one mount.
pub struct Locks {
    holder: String,
    cluster: Option<Cluster>,
    local: Mutex<HashMap<String, (LockSet, u64)>>,
    local_changed: tokio::sync::Notify,
    /// The owners this mount holds locks for, by file: what a close or unmount releases
    /// without asking the backend about files it holds nothing on.
    mine: Mutex<HashMap<LockKey, HashSet<u64>>>,
    /// The revision of this mount's last acquisition, by file.
    fences: Mutex<HashMap<LockKey, u64>>,
    lease: Duration,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks").field("holder", &self.holder).field("shared", &self.cluster.is_some()).finish()
    }
}

fn holder_key(holder: &str) -> String {
    holder.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unavailable(e: impl std::fmt::Display) -> LockError {
    LockError::Unavailable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(what: &str, f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, LockError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(format!("{what}: {e}"))),
        Err(_) => Err(unavailable(format!("{what}: no answer within {CALL_TIMEOUT:?}"))),
    }
}

impl Locks {
    /// Files this mount holds locks on, and the owners holding them (for metrics).
    pub fn held(&self) -> (usize, usize) {
        let mine = self.mine.lock();
        (mine.len(), mine.values().map(HashSet::len).sum())
    }

    /// Locks kept in this mount only (no NATS).
    pub fn local(node: &str) -> Locks {
        Locks {
            holder: format!("{node}#{:x}", std::process::id()),
            cluster: None,
            local: Mutex::new(HashMap::new()),
            local_changed: tokio::sync::Notify::new(),
            mine: Mutex::new(HashMap::new()),
            fences: Mutex::new(HashMap::new()),
            lease: DEFAULT_LEASE,
        }
    }

    /// Locks shared through `nats` for paths whose tier shares them: opens (or makes) the
    /// buckets and starts keeping this mount's holder key alive.
    pub async fn shared(node: &str, nats: &Arc<Nats>, lease: Duration) -> anyhow::Result<Arc<Locks>> {
        let bucket = |bucket: &str, description: &str, max_age: Duration| kv::Config {
            bucket: bucket.to_string(),
            description: description.to_string(),
            history: 1,
            max_age,
            num_replicas: nats.replicas.max(1),
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let locks = crate::tier::jetstream::kv_bucket(nats, bucket(LOCK_BUCKET, "syncfs: flock and fcntl locks", Duration::ZERO)).await?;
        let holders = crate::tier::jetstream::kv_bucket(nats, bucket(HOLDER_BUCKET, "syncfs: mounts holding locks", lease)).await?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let this = Arc::new(Locks {
            holder: format!("{node}#{stamp:x}"),
            cluster: Some(Cluster { locks, holders }),
            local: Mutex::new(HashMap::new()),
            local_changed: tokio::sync::Notify::new(),
            mine: Mutex::new(HashMap::new()),
            fences: Mutex::new(HashMap::new()),
            lease,
        });
        this.beat().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let Some(this) = weak.upgrade() else { return };
                if let Err(e) = this.beat().await {
                    tracing::warn!(error = %e, "cannot renew this mount's lock lease; other nodes take its locks back if this lasts");
                }
            }
        });
        Ok(this)
    }

    async fn beat(&self) -> Result<(), LockError> {
        let Some(c) = &self.cluster else { return Ok(()) };
        timed("renewing the lease", c.holders.put(holder_key(&self.holder), Bytes::from(self.holder.clone()))).await?;
        Ok(())
    }

    /// This mount's holder name (`node#number`).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How long a dead mount's locks last.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether locks of `key`'s kind are shared with other nodes here.
    pub fn shares(&self) -> bool {
        self.cluster.is_some()
    }

    /// The holders of `set` that are alive (this one always is).
    async fn alive(&self, set: &LockSet) -> Result<HashSet<String>, LockError> {
        let mut alive = HashSet::from([self.holder.clone()]);
        let Some(c) = &self.cluster else {
            alive.extend(set.held.iter().map(|h| h.holder.clone()));
            return Ok(alive);
        };
        for h in set.held.iter().map(|h| h.holder.clone()).collect::<HashSet<_>>() {
            if h != self.holder {
                let entry = timed("checking a holder", c.holders.entry(holder_key(&h))).await?;
                if entry.is_some_and(|e| e.operation == kv::Operation::Put) {
                    alive.insert(h);
                }
            }
        }
        Ok(alive)
    }

    /// Reads, changes and writes back one file's set, retrying when another node changed it
    /// in between. `change` returns `Err` to leave the set as it is.
    async fn update(&self, at: &LockKey, change: impl Fn(&mut LockSet, &HashSet<String>) -> Result<(), LockError>) -> Result<u64, LockError> {
        match (&self.cluster, at.shared) {
            (Some(c), true) => loop {
                let entry = timed("reading a lock", c.locks.entry(at.key.clone())).await?;
                let (mut set, rev) = match &entry {
                    Some(e) if e.operation == kv::Operation::Put => (serde_json::from_slice(&e.value).unwrap_or_default(), Some(e.revision)),
                    Some(e) => (LockSet::default(), Some(e.revision)),
                    None => (LockSet::default(), None),
                };
                let alive = self.alive(&set).await?;
                let before = set.clone();
                set.drop_dead(|h| alive.contains(h));
                change(&mut set, &alive)?;
                if set == before {
                    return Ok(rev.unwrap_or(0));
                }
                let value = Bytes::from(serde_json::to_vec(&set).expect("a lock set serializes"));
                let written = match rev {
                    Some(rev) => tokio::time::timeout(CALL_TIMEOUT, c.locks.update(at.key.clone(), value, rev)).await.map(|r| r.map_err(|e| e.to_string())),
                    None => tokio::time::timeout(CALL_TIMEOUT, c.locks.create(at.key.clone(), value)).await.map(|r| r.map_err(|e| e.to_string())),
                };
                match written {
                    Ok(Ok(rev)) => return Ok(rev),
                    // Another node changed the set since it was read: read it again.
                    Ok(Err(e)) if e.contains("wrong last sequence") || e.contains("already exists") || e.contains("key exists") => continue,
                    Ok(Err(e)) => return Err(unavailable(format!("writing a lock: {e}"))),
                    Err(_) => return Err(unavailable(format!("writing a lock: no answer within {CALL_TIMEOUT:?}"))),
                }
            },
            _ => {
                let mut local = self.local.lock();
                let (set, rev) = local.entry(at.key.clone()).or_default();
                let alive: HashSet<String> = set.held.iter().map(|h| h.holder.clone()).chain([self.holder.clone()]).collect();
                let before = set.clone();
                change(set, &alive)?;
                if *set != before {
                    *rev += 1;
                    self.local_changed.notify_waiters();
                }
                let rev = *rev;
                if set.is_empty() {
                    local.remove(&at.key);
                }
                Ok(rev)
            }
        }
    }

    /// Takes (or changes, or gives up) `owner`'s lock on `start..=end` of `at`. With `wait`,
    /// waits until no other owner's lock is in the way; otherwise fails with
    /// [`LockError::Conflict`]. Returns the fencing revision.
    pub async fn set(&self, at: &LockKey, owner: u64, pid: u32, start: u64, end: u64, want: Want, wait: bool) -> Result<u64, LockError> {
        loop {
            // Listen before trying, so a release between the try and the wait is not missed.
            let notified = self.local_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let watch = match (&self.cluster, at.shared, wait) {
                (Some(c), true, true) => Some(timed("watching a lock", c.locks.watch(at.key.clone())).await?),
                _ => None,
            };
            let holder = self.holder.clone();
            let result = self
                .update(at, |set, alive| {
                    if let Some(h) = set.conflict(&holder, owner, start, end, want, |x| alive.contains(x)) {
                        return Err(LockError::Conflict(h.clone()));
                    }
                    set.set(&holder, owner, pid, start, end, want);
                    Ok(())
                })
                .await;
            match result {
                Ok(rev) => {
                    let mut mine = self.mine.lock();
                    if want == Want::Unlock {
                        // Still holds other ranges, perhaps: forgotten at its close.
                    } else {
                        mine.entry(at.clone()).or_default().insert(owner);
                        self.fences.lock().insert(at.clone(), rev);
                    }
                    return Ok(rev);
                }
                Err(LockError::Conflict(_)) if wait => match watch {
                    // A change of the set, or a lease's end (a dead holder's locks stop counting).
                    Some(mut watch) => {
                        let _ = tokio::time::timeout(self.lease / 3, watch.next()).await;
                    }
                    None => {
                        let _ = tokio::time::timeout(self.lease / 3, notified).await;
                    }
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// The first lock of another owner that keeps `owner` from taking `want` (`F_GETLK`).
    pub async fn test(&self, at: &LockKey, owner: u64, start: u64, end: u64, want: Want) -> Result<Option<Held>, LockError> {
        let set = match (&self.cluster, at.shared) {
            (Some(c), true) => match timed("reading a lock", c.locks.entry(at.key.clone())).await? {
                Some(e) if e.operation == kv::Operation::Put => serde_json::from_slice(&e.value).unwrap_or_default(),
                _ => LockSet::default(),
            },
            _ => self.local.lock().get(&at.key).map(|(s, _)| s.clone()).unwrap_or_default(),
        };
        let alive = self.alive(&set).await?;
        Ok(set.conflict(&self.holder, owner, start, end, want, |h| alive.contains(h)).cloned())
    }

    /// Whether this mount may hold locks of `owner` on `at` (a close then releases them).
    pub fn may_hold(&self, at: &LockKey, owner: u64) -> bool {
        self.mine.lock().get(at).is_some_and(|o| o.contains(&owner))
    }

    /// Releases every lock of `owner` on `at` (a close, a process's exit).
    pub async fn release(&self, at: &LockKey, owner: u64) -> Result<(), LockError> {
        if !self.may_hold(at, owner) {
            return Ok(());
        }
        let holder = self.holder.clone();
        self.update(at, |set, _| {
            set.drop_owner(&holder, owner);
            Ok(())
        })
        .await?;
        let mut mine = self.mine.lock();
        if let Some(owners) = mine.get_mut(at) {
            owners.remove(&owner);
            if owners.is_empty() {
                mine.remove(at);
                self.fences.lock().remove(at);
            }
        }
        Ok(())
    }

    /// The fencing revision of this mount's lock on `at`, while it holds one.
    pub fn fence(&self, at: &LockKey) -> Option<u64> {
        self.fences.lock().get(at).copied()
    }

    /// Releases everything this mount holds (unmount) and ends its lease at once.
    pub async fn release_all(&self) {
        let held: Vec<LockKey> = self.mine.lock().keys().cloned().collect();
        let holder = self.holder.clone();
        for at in held {
            let done = self
                .update(&at, |set, _| {
                    set.held.retain(|h| h.holder != holder);
                    Ok(())
                })
                .await;
            if let Err(e) = done {
                tracing::warn!(key = %at.key, error = %e, "cannot release a lock at unmount; it expires with the lease");
            }
        }
        self.mine.lock().clear();
        if let Some(c) = &self.cluster {
            let _ = tokio::time::timeout(CALL_TIMEOUT, c.holders.delete(holder_key(&self.holder))).await;
        }
    }
}
