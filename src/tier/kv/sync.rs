//! Keeping the tree in line with the buckets, and the buckets with this mount's promises.
//!
//! On every new connection (the first, and each reconnect) the supervisor checks the server,
//! makes sure the buckets exist, replays the offline journal in order, and only then (re)starts
//! one watch per bucket: the journal's writes are newer than anything the watch could deliver
//! for the same keys. Each watch delivers the last value of every key, then every change; once
//! it has caught up, keys that vanished while this node was away (purged, expired, or deleted
//! without a marker reaching us) are removed from the tree. Changes at or below the revision the
//! node knows are ignored ([`super::view::View::record`]).
//!
//! Two timers run beside the watches. Expiry removes entries at created + TTL: a 2.10 server
//! does not announce expiry, so nodes expire their copies themselves. The refresher re-publishes
//! this mount's entries of ephemeral policies every TTL/3 (compare-and-swap against its own last
//! revision, so it never overwrites another writer), which keeps them alive exactly as long as
//! the mount is; a clean unmount deletes them ([`release_owned`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::journal::JournalOp;
use super::key::{self, Decoded};
use super::own;
use super::view::Owned;
use super::{Inner, KvOp, PubError, KV_OPERATION, NODE_HEADER};
use crate::tier::jetstream;
use crate::tier::{RemoteChange, Revision};

/// Runs for the life of the mount.
pub(super) async fn supervise(inner: Arc<Inner>) {
    let roots = inner.buckets.iter().map(|b| b.root.clone()).collect();
    jetstream::create_roots(inner.sink().cloned(), roots).await;
    inner.tasks.keep(tokio::spawn(expire(inner.clone())));
    inner.tasks.keep(tokio::spawn(refresh(inner.clone())));
    inner.tasks.keep(tokio::spawn(drain(inner.clone())));
    jetstream::on_each_connection(&inner.nats, &inner.tasks, &inner.synced, |generation, state| {
        let inner = inner.clone();
        // Everything one connection does: prepare (retried while the connection lasts), then
        // watch every bucket. Aborting the task stops all of it.
        async move {
            if jetstream::prepared("NATS KV is", generation, &state, || prepare(&inner)).await.is_none() {
                return;
            }
            futures::future::join_all((0..inner.buckets.len()).map(|b| watch_bucket(inner.clone(), b))).await;
        }
    })
    .await;
}

/// Checks the server, makes sure every bucket exists, and replays the journal.
async fn prepare(inner: &Arc<Inner>) -> anyhow::Result<()> {
    inner.nats.check_server().await?;
    inner
        .max_payload
        .store(inner.nats.max_payload() as u64, std::sync::atomic::Ordering::Relaxed);
    for (i, bucket) in inner.buckets.iter().enumerate() {
        let config = kv::Config {
            bucket: bucket.name.clone(),
            description: format!("syncfs: paths matching {}", bucket.policy.pattern),
            history: inner.nats.history.max(1),
            max_age: bucket.policy.ttl.unwrap_or_default(),
            num_replicas: inner.nats.replicas.max(1),
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let store = jetstream::kv_bucket(&inner.nats, config).await?;
        inner.streams.lock()[i] = Some(store.stream.clone());
    }
    replay(inner).await?;
    take_back_creates(inner).await;
    Ok(())
}

/// Deletes the empty values of creates a stopped daemon made and no close acknowledged, each
/// only while the key's last message is still that create (its message id), by a
/// compare-and-swap on that message's revision.
async fn take_back_creates(inner: &Arc<Inner>) {
    let leftover = inner.creates.lock().leftover();
    for c in leftover {
        let Some(bucket) = inner.buckets.iter().position(|b| b.name == c.bucket) else {
            inner.creates.lock().settled(&c);
            continue;
        };
        let Some(last) = last_message(inner, bucket, &c.key).await else { continue };
        // Still the create's own message: nothing was written (or refreshed) since.
        let untouched = last.as_ref().filter(|m| {
            m.headers.get(async_nats::header::NATS_MESSAGE_ID).is_some_and(|id| id.as_str() == c.msg_id)
        });
        if let Some(rev) = untouched.map(|m| m.sequence) {
            let msg_id = inner.msg_id();
            match inner.publish(bucket, &c.key, &KvOp::Delete, Some(rev), &msg_id).await {
                Ok(_) | Err(PubError::WrongLastSequence) => {
                    inner.settle(&msg_id);
                    tracing::info!(key = %c.key, rev, "took back an empty value whose create no close acknowledged (the daemon stopped)");
                }
                // Tried again at the next connection.
                Err(PubError::Tier(_)) => continue,
            }
        }
        inner.creates.lock().settled(&c);
    }
}

/// Replays the journal whenever it holds writes and the server answers, not only on a new
/// connection: a server that hung (SIGSTOP) and came back keeps the connection, and every
/// later write would queue behind the first one forever.
async fn drain(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let ready = inner.streams.lock().iter().all(Option::is_some);
        if ready && inner.nats.is_connected() && !inner.journal.lock().is_empty() {
            if let Err(e) = replay(&inner).await {
                tracing::debug!(error = %format!("{e:#}"), "the journal did not drain yet");
            }
        }
    }
}

/// Publishes the journal's records in order, each with its original message id.
async fn replay(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let _one = inner.replaying.lock().await;
    let mut replayed = 0;
    loop {
        let Some(record) = inner.journal.lock().front().cloned() else {
            break;
        };
        let Some(bucket) = inner.buckets.iter().position(|b| b.name == record.bucket) else {
            tracing::warn!(bucket = %record.bucket, key = %record.key, "dropping a queued write for a bucket no policy uses any more");
            inner.journal.lock().pop_front()?;
            continue;
        };
        let op = match record.op {
            JournalOp::Put => KvOp::Put(Bytes::from(record.value.clone())),
            JournalOp::Delete => KvOp::Delete,
        };
        match inner.publish(bucket, &record.key, &op, None, &record.msg_id).await {
            Ok(rev) => {
                if let Some(Decoded::File(path)) = key::decode(&record.key) {
                    let mut view = inner.view.lock();
                    let ttl = inner.buckets[bucket].policy.ttl;
                    let deleted = record.op == JournalOp::Delete;
                    // The tree holds it since its close: that revision is installed.
                    if view.record(&path, bucket, rev, deleted, Some(inner.node.clone()), SystemTime::now(), ttl) {
                        view.admit(&path, Some(rev));
                    }
                }
                inner.settle(&record.msg_id);
                let mut journal = inner.journal.lock();
                journal.pop_front()?;
                replayed += 1;
            }
            Err(PubError::Tier(e)) => {
                // The record keeps its id and its place; the next replay tries it again.
                inner.own.lock().drop_unknown(&record.msg_id);
                inner.journal.lock().compact()?;
                anyhow::bail!("replaying the offline journal stopped at {}: {e}", record.key);
            }
            Err(PubError::WrongLastSequence) => {
                inner.journal.lock().pop_front()?;
            }
        }
    }
    if replayed > 0 {
        tracing::info!(replayed, "offline journal replayed");
    }
    Ok(())
}

/// Applies a change to the tree. KV values are small and the tree is local, so this runs
/// inline on the watch's task (a hop to the blocking pool costs more than the write).
fn apply(inner: &Inner, path: &Path, change: RemoteChange, rev: Option<u64>, node: Option<&str>) {
    let Some(sink) = inner.sink() else { return };
    let rev = rev.map(|r| Revision(r.to_string()));
    if let Err(e) = sink.apply_from(path, change, rev, node) {
        tracing::warn!(path = %path.display(), error = %e, "cannot apply a remote change");
    }
}

/// Removes the now-empty, unmarked directories between `path` and its bucket's root.
fn prune(inner: &Inner, bucket: usize, path: &Path) {
    let root = &inner.buckets[bucket].root;
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) || d.as_os_str().is_empty() {
            break;
        }
        if !inner.view.lock().is_marked(d) {
            apply(inner, d, RemoteChange::PruneDir, None, None);
        }
        dir = d.parent();
    }
}

async fn watch_bucket(inner: Arc<Inner>, bucket: usize) {
    let what = format!("the watch of bucket {}", inner.buckets[bucket].name);
    jetstream::restarting(&what, || async {
        let b = &inner.buckets[bucket];
        let stream = inner.stream(bucket).ok_or_else(|| anyhow::anyhow!("bucket not ready"))?;
        let watch = Watch { inner: inner.clone(), bucket };
        jetstream::watch_last_values(&inner.nats, &stream, format!("{}>", b.prefix), format!("syncfs watch of {}", b.name), &watch).await
    })
    .await;
}

/// One bucket's watch, as [`jetstream::watch_last_values`] sees it.
struct Watch {
    inner: Arc<Inner>,
    bucket: usize,
}

impl jetstream::LastValues for Watch {
    fn handle(&self, message: &async_nats::Message, seq: u64, created: SystemTime) -> Option<PathBuf> {
        let path = handle(&self.inner, self.bucket, message, seq, created);
        let bucket = self.bucket;
        self.inner.handled.send_modify(|h| h[bucket] = h[bucket].max(seq));
        path
    }

    fn caught_up(&self, seen: &HashSet<PathBuf>) {
        finish_sync(&self.inner, self.bucket, seen);
    }
}

/// Applies one message of a bucket's stream. Returns the path it concerns.
fn handle(inner: &Inner, bucket: usize, message: &async_nats::Message, rev: u64, created: SystemTime) -> Option<PathBuf> {
    let b = &inner.buckets[bucket];
    let key = message.subject.as_str().strip_prefix(&b.prefix)?;
    let decoded = key::decode(key)?;
    let headers = message.headers.as_ref();
    let op = headers.and_then(|h| h.get(KV_OPERATION)).map(|v| v.as_str().to_string());
    let marker = headers.and_then(|h| h.get(async_nats::header::NATS_MARKER_REASON)).is_some();
    let deleted = matches!(op.as_deref(), Some("DEL") | Some("PURGE")) || marker;
    let node = headers.and_then(|h| h.get(NODE_HEADER)).map(|v| v.as_str().to_string());
    let mine = inner.ids.is_own(message);
    // A publish of this process still in flight is its publisher's to install; one whose
    // outcome was unknown is adopted: it landed, and is this node's write.
    let seen = match headers.and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID)) {
        Some(id) if mine => inner.own.lock().seen(id.as_str(), rev),
        _ => own::Seen::Change,
    };
    let in_flight = seen == own::Seen::InFlight;
    match decoded {
        Decoded::File(path) => {
            if inner.policies.resolve(&path).pattern != b.policy.pattern {
                return None;
            }
            let fresh = {
                let mut view = inner.view.lock();
                let fresh = view.record(&path, bucket, rev, deleted, node.clone(), created, b.policy.ttl);
                if fresh && !mine && view.owned.remove(&path).is_some() {
                    lose(inner, &path, format!("another writer ({}) wrote it at revision {rev}", node.as_deref().unwrap_or("unknown")));
                }
                if let (true, own::Seen::Adopt(u)) = (fresh, &seen) {
                    tracing::info!(path = %path.display(), rev, "a write whose outcome was unknown landed: it is this node's");
                    if let (true, Some(value)) = (b.policy.ephemeral, &u.value) {
                        let key = key::encode(&path).unwrap_or_default();
                        view.owned.insert(path.clone(), Owned { bucket, key, rev, value: value.clone(), dir: false });
                    }
                }
                fresh
            };
            if fresh && !in_flight {
                if deleted {
                    apply(inner, &path, RemoteChange::Delete, Some(rev), node.as_deref());
                    prune(inner, bucket, &path);
                } else if b.policy.ttl.is_some_and(|ttl| created + ttl <= SystemTime::now()) {
                    // Already past its TTL (a server that has not expired it yet): not visible.
                    apply(inner, &path, RemoteChange::Delete, Some(rev), node.as_deref());
                } else {
                    apply(inner, &path, RemoteChange::File(message.payload.to_vec()), Some(rev), node.as_deref());
                }
            }
            Some(path)
        }
        Decoded::Dir(path) => {
            if deleted {
                let (news, held) = {
                    let mut view = inner.view.lock();
                    let held = view.owned.get(&path).is_some_and(|o| o.dir);
                    (view.unmark_dir(&path, Some(rev)), held)
                };
                if news && held && !mine {
                    lose(inner, &path, format!("another node ({}) removed the directory at revision {rev}", node.as_deref().unwrap_or("unknown")));
                }
                if news && !in_flight {
                    apply(inner, &path, RemoteChange::PruneDir, None, node.as_deref());
                    prune(inner, bucket, &path);
                }
            } else {
                // A directory claim's age is its marker's: lock-age checks read the mtime.
                // Directory markers do not expire on the nodes (see `dirs`).
                let expires: Option<SystemTime> = None;
                let news = inner.view.lock().mark_dir(&path, rev, expires);
                let past = expires.is_some_and(|at| at <= SystemTime::now());
                if news && !in_flight && !past {
                    let made = super::dirs::created_at(&message.payload).unwrap_or(created);
                    apply(inner, &path, RemoteChange::Dir { created: Some(made) }, None, node.as_deref());
                }
            }
            None
        }
    }
}

/// After a watch caught up: removes what vanished from the bucket while this node was away.
/// "Caught up" can come early (a quiet second while a restarted server is slow to deliver),
/// so a key the watch has not named is only removed once the server says it has no value
/// for it: removing one it has would lose a write, this node's own included, until the next
/// remount (and a claim's keep-alive with it).
fn finish_sync(inner: &Arc<Inner>, bucket: usize, seen: &HashSet<PathBuf>) {
    let b = &inner.buckets[bucket];
    let mut gone: Vec<PathBuf> = inner
        .view
        .lock()
        .paths_of(bucket)
        .into_iter()
        .filter(|p| !seen.contains(p))
        .collect();
    if let Some(sink) = inner.sink() {
        let on_disk = tokio::task::block_in_place(|| sink.files(&b.root));
        gone.extend(
            on_disk
                .into_iter()
                .filter(|p| !seen.contains(p) && inner.policies.resolve(p).pattern == b.policy.pattern),
        );
    }
    gone.sort();
    gone.dedup();
    let keys = seen.len();
    let inner = inner.clone();
    tokio::spawn(async move {
        sweep(&inner, bucket, gone).await;
        inner.synced.send_modify(|s| s[bucket] = true);
        tracing::info!(bucket = %inner.buckets[bucket].name, keys, "view of the bucket is complete");
    });
}

/// Removes the paths of `candidates` the bucket really has no value for.
async fn sweep(inner: &Arc<Inner>, bucket: usize, candidates: Vec<PathBuf>) {
    let b = &inner.buckets[bucket];
    let Some(stream) = inner.stream(bucket) else { return };
    for path in candidates {
        let Ok(k) = key::encode(&path) else { continue };
        if inner.journal.lock().has(&b.name, &k) {
            continue;
        }
        let before = inner.view.lock().get(&path).map(|e| e.known);
        let absent = match stream.get_last_raw_message_by_subject(&format!("{}{k}", b.prefix)).await {
            Ok(m) => {
                is_delete(&m)
                    || m.headers.get(async_nats::header::NATS_MARKER_REASON).is_some()
            }
            Err(e) if matches!(e.kind(), async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound) => true,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot tell whether a key vanished; keeping it");
                false
            }
        };
        // A change the watch delivered meanwhile decides instead.
        if !absent || inner.view.lock().get(&path).map(|e| e.known) != before {
            continue;
        }
        tracing::debug!(path = %path.display(), "no longer in the bucket; removing");
        if inner.view.lock().owned.contains_key(&path) {
            lose(inner, &path, "it vanished from the server while this node was away".into());
        }
        inner.view.lock().remove(&path);
        apply(inner, &path, RemoteChange::Delete, None, None);
        prune(inner, bucket, &path);
    }
}

/// Removes entries whose TTL ran out.
async fn expire(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let due = inner.view.lock().expired(SystemTime::now());
        for (path, rev, dir) in due {
            tracing::debug!(path = %path.display(), rev, "TTL expired");
            if dir {
                apply(&inner, &path, RemoteChange::PruneDir, None, None);
                continue;
            }
            apply(&inner, &path, RemoteChange::Delete, Some(rev), None);
            // Bound first: a guard in an `if let` scrutinee lives through the block, and
            // `prune` takes the view's lock again (a subdirectory's expiry deadlocked).
            let bucket = inner.view.lock().get(&path).map(|e| e.bucket);
            if let Some(bucket) = bucket {
                prune(&inner, bucket, &path);
            }
        }
    }
}

/// Keeps this mount's ephemeral entries alive.
async fn refresh(inner: Arc<Inner>) {
    let period = inner
        .buckets
        .iter()
        .filter(|b| b.policy.ephemeral)
        .filter_map(|b| b.policy.ttl)
        .min()
        .map(|ttl| (ttl / 3).max(Duration::from_millis(100)));
    let Some(period) = period else { return };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        if !inner.nats.is_connected() {
            continue;
        }
        let owned: Vec<_> = inner.view.lock().owned.iter().map(|(p, o)| (p.clone(), o.clone())).collect();
        for (path, o) in owned {
            let msg_id = inner.msg_id();
            let value = Bytes::from(o.value.clone());
            match inner.publish(o.bucket, &o.key, &KvOp::Put(value), Some(o.rev), &msg_id).await {
                Ok(rev) => {
                    {
                        let mut view = inner.view.lock();
                        let ttl = inner.buckets[o.bucket].policy.ttl;
                        if o.dir {
                            view.mark_dir(&path, rev, ttl.map(|t| SystemTime::now() + t));
                        } else {
                            view.record(&path, o.bucket, rev, false, Some(inner.node.clone()), SystemTime::now(), ttl);
                        }
                        if let Some(entry) = view.owned.get_mut(&path) {
                            entry.rev = rev;
                        }
                    }
                    inner.settle(&msg_id);
                }
                Err(PubError::WrongLastSequence) => still_ours(&inner, &path, &o).await,
                Err(PubError::Tier(e)) => {
                    // Tried again at the next period; a refresh that lands late shows as ours.
                    inner.own.lock().drop_unknown(&msg_id);
                    tracing::debug!(path = %path.display(), error = %e, "refresh failed");
                }
            }
        }
    }
}

/// A refresh found the entry at another revision than this mount's last: still this process's
/// (an earlier refresh whose acknowledgement was lost landed), or lost to another writer or
/// to expiry, which the holder must hear of.
async fn still_ours(inner: &Arc<Inner>, path: &Path, o: &Owned) {
    let Some(last) = last_message(inner, o.bucket, &o.key).await else { return };
    let mut view = inner.view.lock();
    // Released meanwhile (the program removed it): nothing was lost.
    if !view.owned.contains_key(path) {
        return;
    }
    match ours(inner, last.as_ref()) {
        Some(seq) => {
            if let Some(entry) = view.owned.get_mut(path) {
                entry.rev = seq;
            }
        }
        None => {
            view.owned.remove(path);
            drop(view);
            let why = match last {
                Some(m) => format!("another writer holds it since revision {}", m.sequence),
                None => "it expired on the server before this mount refreshed it".to_string(),
            };
            lose(inner, path, why);
        }
    }
}

/// The last message of `key` on the server: `None` when the server could not be asked,
/// `Some(None)` when the key has none.
pub(super) async fn last_message(
    inner: &Inner,
    bucket: usize,
    key: &str,
) -> Option<Option<async_nats::jetstream::message::StreamMessage>> {
    let subject = format!("{}{key}", inner.buckets[bucket].prefix);
    let stream = inner.stream(bucket)?;
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Some(Some(m)),
        Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Some(None),
        Err(_) => None,
    }
}

/// Whether a key's message is a delete or purge marker, not a value.
pub(super) fn is_delete(m: &async_nats::jetstream::message::StreamMessage) -> bool {
    matches!(m.headers.get(KV_OPERATION).map(|v| v.as_str()), Some("DEL") | Some("PURGE"))
}

/// The revision of `last` when it is a live value this mount wrote (by its message id).
pub(super) fn ours(inner: &Inner, last: Option<&async_nats::jetstream::message::StreamMessage>) -> Option<u64> {
    last.filter(|m| {
        !is_delete(m) && m.headers.get(async_nats::header::NATS_MESSAGE_ID).is_some_and(|id| id.as_str().starts_with(inner.ids.prefix()))
    })
    .map(|m| m.sequence)
}

/// Records that this mount lost an ephemeral entry it held (a claim): the holder's program
/// must not believe it still holds the lock. Its next write to the file fails with `ESTALE`
/// (its base is gone); the reason is in the log, `status` and `user.syncfs.error`.
fn lose(inner: &Inner, path: &Path, why: String) {
    tracing::warn!(path = %path.display(), reason = %why, "this mount lost an entry it held and kept alive (a claim)");
    inner.lost.lock().insert(path.to_path_buf(), why);
}

/// Deletes this mount's ephemeral entries (clean unmount), each only if still ours.
pub(super) async fn release_owned(inner: &Arc<Inner>) {
    if !inner.nats.is_connected() {
        return;
    }
    let owned: Vec<_> = inner.view.lock().owned.drain().collect();
    for (path, o) in owned {
        let msg_id = inner.msg_id();
        match inner.publish(o.bucket, &o.key, &KvOp::Delete, Some(o.rev), &msg_id).await {
            Ok(_) => {
                inner.settle(&msg_id);
                tracing::debug!(path = %path.display(), "released")
            }
            Err(_) => tracing::debug!(path = %path.display(), "not released (changed by another writer, or unreachable)"),
        }
    }
}
