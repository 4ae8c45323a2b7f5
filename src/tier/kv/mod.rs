//! The fast tier: NATS JetStream key-value buckets (`tier: nats-kv`).
//!
//! # Where things are
//!
//! - One bucket per policy, named from its pattern (`syncfs_fast_claims_1a2b3c4d` for
//!   `fast/claims/**`), with `max_age` = the policy's `ttl`, and replicas and history from the
//!   config. The key of a file is its whole path, encoded by [`key`]. Values are the file's
//!   bytes, unchanged, so any NATS client can read them.
//! - Writes are published by syncfs itself on `$KV.<bucket>.<key>`, with headers:
//!   `Nats-Expected-Last-Subject-Sequence` for compare-and-swap (0 for an exclusive create),
//!   `Nats-Msg-Id` so a retried publish is de-duplicated by JetStream, `Syncfs-Node` so other
//!   nodes can show the writer (`user.syncfs.node`), and `KV-Operation: DEL` for deletes.
//! - Every node watches every bucket (an ordered consumer, last value per key, then changes)
//!   and writes what it hears into its tree through the core ([`sync`]).
//!
//! # Consistency
//!
//! - `lww`: the latest publish wins. While NATS is unreachable, or while earlier queued writes
//!   wait, the change goes to the offline [`journal`] (fsync'ed before `close()` returns) and is
//!   replayed in order on reconnect.
//! - `cas`: a write commits only if the key's revision is still the one the file had when it
//!   was opened (or the one the program named); otherwise `ESTALE`, nothing written.
//! - `cas-create`: creation is exclusive across the cluster (exactly one creator; the others
//!   get `EEXIST` at `open()`); later writes are `cas`.
//! - Strongly consistent operations never queue: while disconnected they fail at once with
//!   `EAGAIN`.
//!
//! A create whose acknowledgement was lost is retried with the same message id; if JetStream's
//! de-duplication window has passed, the last message's id proves whether it was ours, so the
//! real winner is never told `EEXIST`.

mod creates;
mod dirs;
mod journal;
pub mod key;
mod own;
mod sync;
mod view;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::stream::Stream;
use async_nats::HeaderMap;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use self::dirs::claims_dirs;
use self::journal::{Journal, JournalOp, Record};
use self::key::Decoded;
use self::own::OwnWrites;
use self::view::{Owned, View};
use super::jetstream::{self, blocking, MsgIds, Tasks};
use super::{RemoteSink, Revision, Target, Tier, TierError, WriteMode};
use crate::fs::Kind;
use crate::nats::{Nats, PublishFailure};
use crate::op::Op;
use crate::policy::{Consistency, Policy, PolicyTable, TierKind};

const NODE_HEADER: &str = "Syncfs-Node";
const KV_OPERATION: &str = "KV-Operation";
/// Room left under the server's `max_payload` for the headers syncfs adds.
const HEADER_ROOM: usize = 1024;
/// How long a lock holder waits for a bucket's watch to reach the server's last message.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// One bucket: the policy it serves and where its paths live.
#[derive(Debug)]
pub struct Bucket {
    /// The bucket's name.
    pub name: String,
    /// The policy whose paths it holds.
    pub policy: Arc<Policy>,
    /// The literal directory prefix of the pattern (`fast/claims` for `fast/claims/**`),
    /// which always exists in the tree.
    pub root: PathBuf,
    /// `$KV.<name>.`
    pub prefix: String,
}

/// The bucket name of a policy: readable, and unique per pattern.
pub fn bucket_name(pattern: &str) -> String {
    let mut readable = String::new();
    for c in pattern.chars() {
        if c.is_ascii_alphanumeric() {
            readable.push(c);
        } else if !readable.ends_with('_') {
            readable.push('_');
        }
    }
    let readable: String = readable.trim_matches('_').chars().take(40).collect();
    let mut hash: u32 = 0x811c9dc5;
    for b in pattern.bytes() {
        hash = (hash ^ b as u32).wrapping_mul(0x01000193);
    }
    if readable.is_empty() {
        format!("syncfs_{hash:08x}")
    } else {
        format!("syncfs_{readable}_{hash:08x}")
    }
}

/// The directories of a pattern before its first wildcard.
pub fn pattern_root(pattern: &str) -> PathBuf {
    let mut root = PathBuf::new();
    let parts: Vec<&str> = pattern.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let literal = !part.contains(['*', '?', '[', ']', '{', '}', '\\']);
        if !literal || i + 1 == parts.len() {
            break;
        }
        root.push(part);
    }
    root
}

/// What a publish does to a key.
enum KvOp {
    Put(Bytes),
    Delete,
}

/// Why a publish failed, before it becomes a [`TierError`].
enum PubError {
    /// The expected revision did not match.
    WrongLastSequence,
    /// Anything else, already mapped.
    Tier(TierError),
}

pub(crate) struct Inner {
    nats: Arc<Nats>,
    node: String,
    policies: Arc<PolicyTable>,
    buckets: Vec<Bucket>,
    view: Mutex<View>,
    journal: Mutex<Journal>,
    sink: OnceLock<Arc<dyn RemoteSink>>,
    streams: Mutex<Vec<Option<Stream>>>,
    /// Buckets whose view is complete in the current connection.
    synced: watch::Sender<Vec<bool>>,
    /// The last stream sequence each bucket's watch has applied: a lock holder waits for the
    /// server's last one (see [`Tier::settle`]).
    handled: watch::Sender<Vec<u64>>,
    /// Timers, the supervisor, and the current connection's work (replay, then the watches).
    tasks: Tasks,
    rt: tokio::runtime::Handle,
    /// This process's message ids.
    ids: MsgIds,
    /// Its publishes in flight and those of unknown outcome (see [`own`]).
    own: Mutex<OwnWrites>,
    /// Serializes replays of the journal (on each connection, and whenever it holds writes).
    replaying: tokio::sync::Mutex<()>,
    /// Ephemeral entries this mount held and lost to another writer or to expiry, with why:
    /// for the log, `status` and `user.syncfs.error` of the file.
    lost: Mutex<std::collections::BTreeMap<PathBuf, String>>,
    /// Compare-and-swap creates not yet followed by a write ([`creates`]).
    creates: Mutex<creates::Creates>,
    max_payload: AtomicU64,
}

/// The nats-kv tier of a mount.
#[derive(Clone)]
pub struct KvTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KvTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTier").field("buckets", &self.inner.buckets).finish_non_exhaustive()
    }
}

fn unavailable(reason: impl std::fmt::Display) -> TierError {
    TierError::unavailable(TierKind::NatsKv, reason)
}

/// Reads a staged file whole; KV values are bounded by the server's payload limit.
fn read_value(file: &File, limit: usize, path: &Path) -> Result<Bytes, TierError> {
    let len = file.metadata()?.len() as usize;
    if len > limit {
        return Err(TierError::TooBig(format!(
            "{} is {len} bytes; this NATS server takes values up to {limit} bytes",
            path.display()
        )));
    }
    let mut buf = Vec::with_capacity(len);
    crate::fs::tree::ReadAt::new(file).read_to_end(&mut buf)?;
    if buf.len() > limit {
        return Err(TierError::TooBig(format!("{} grew past {limit} bytes", path.display())));
    }
    Ok(buf.into())
}

impl KvTier {
    /// A tier for every nats-kv policy of `policies`, journaling offline writes in
    /// `journal_path`. Nothing touches the network until [`Tier::start`].
    pub fn new(
        nats: Arc<Nats>,
        node: &str,
        policies: Arc<PolicyTable>,
        journal_path: &Path,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<KvTier> {
        let buckets: Vec<Bucket> = policies
            .reachable()
            .iter()
            .filter(|p| p.tier == TierKind::NatsKv)
            .map(|p| {
                let name = bucket_name(&p.pattern);
                Bucket {
                    prefix: format!("$KV.{name}."),
                    name,
                    policy: p.clone(),
                    root: pattern_root(&p.pattern),
                }
            })
            .collect();
        let journal = Journal::open(journal_path)
            .map_err(|e| anyhow::anyhow!("cannot open the journal {}: {e}", journal_path.display()))?;
        if !journal.is_empty() {
            tracing::info!(records = journal.len(), "the offline journal holds writes to replay");
        }
        let creates_file = journal_path.with_file_name("kv-creates");
        let creates = creates::Creates::open(&creates_file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", creates_file.display()))?;
        let n = buckets.len();
        Ok(KvTier {
            inner: Arc::new(Inner {
                max_payload: AtomicU64::new(nats.max_payload() as u64),
                nats,
                node: node.to_string(),
                policies,
                buckets,
                view: Mutex::new(View::default()),
                journal: Mutex::new(journal),
                sink: OnceLock::new(),
                streams: Mutex::new(vec![None; n]),
                synced: watch::channel(vec![false; n]).0,
                handled: watch::channel(vec![0; n]).0,
                tasks: Tasks::default(),
                rt,
                ids: MsgIds::new(node),
                own: Mutex::new(OwnWrites::default()),
                replaying: tokio::sync::Mutex::new(()),
                lost: Mutex::new(std::collections::BTreeMap::new()),
                creates: Mutex::new(creates),
            }),
        })
    }

    /// Writes waiting in the offline journal.
    pub fn pending(&self) -> usize {
        self.inner.journal.lock().len()
    }

    /// Damage found in the offline journal, until the operator removes each report.
    pub fn journal_damage(&self) -> Vec<crate::status::JournalDamage> {
        let path = self.inner.journal.lock().path().to_path_buf();
        journal::damage_reports(&path)
    }

    /// Strongly consistent writes whose outcome is still unknown (they timed out).
    pub fn unknown_outcomes(&self) -> usize {
        self.inner.own.lock().unknown()
    }

    /// Ephemeral entries (claims) this mount held and lost, with why.
    pub fn lost_claims(&self) -> Vec<(PathBuf, String)> {
        self.inner.lost.lock().iter().map(|(p, w)| (p.clone(), w.clone())).collect()
    }

    /// How many paths the view holds.
    pub fn keys(&self) -> usize {
        self.inner.view.lock().len()
    }

    /// Waits until every bucket's view is complete (or `timeout` passes): reads after that see
    /// what the cluster holds. Returns whether it completed.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        jetstream::wait_synced(&self.inner.synced, timeout).await
    }

    /// The buckets, for status and tests.
    pub fn buckets(&self) -> &[Bucket] {
        &self.inner.buckets
    }
}

impl Inner {
    fn bucket_of(&self, at: &Target) -> Result<usize, TierError> {
        self.buckets
            .iter()
            .position(|b| b.policy.pattern == at.policy.pattern)
            .ok_or_else(|| TierError::Backend(format!("no bucket for {}", at.policy.pattern)))
    }

    fn key_of(at: &Target) -> Result<String, TierError> {
        jetstream::key_of(&at.path)
    }

    fn msg_id(&self) -> String {
        self.ids.next()
    }

    fn value_limit(&self) -> usize {
        (self.max_payload.load(Ordering::Relaxed) as usize).saturating_sub(HEADER_ROOM)
    }

    fn stream(&self, bucket: usize) -> Option<Stream> {
        self.streams.lock()[bucket].clone()
    }

    /// Publishes one change, retrying lost acknowledgements with the same message id. The
    /// message stays *in flight* after a success (the watch leaves it to the caller) until the
    /// caller recorded it and called [`Inner::settle`]. A publish that timed out is confirmed
    /// if a watch saw its message, else remembered as an unknown outcome (see [`own`]).
    async fn publish(
        &self,
        bucket: usize,
        key: &str,
        op: &KvOp,
        expected: Option<u64>,
        msg_id: &str,
    ) -> Result<u64, PubError> {
        let subject = format!("{}{key}", self.buckets[bucket].prefix);
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, self.node.as_str());
        let payload = match op {
            KvOp::Put(value) => value.clone(),
            KvOp::Delete => {
                headers.insert(KV_OPERATION, "DEL");
                Bytes::new()
            }
        };
        self.own.lock().begin(msg_id, std::time::Instant::now());
        let result = self.nats.publish(subject.clone(), payload.clone(), headers, msg_id, expected).await;
        match result {
            Ok(seq) => Ok(seq),
            Err(PublishFailure::Unknown(reason)) => {
                let unknown = own::Unknown {
                    bucket,
                    path: match key::decode(key) {
                        Some(Decoded::File(p)) | Some(Decoded::Dir(p)) => p,
                        None => PathBuf::from(key),
                    },
                    value: matches!(op, KvOp::Put(_)).then(|| payload.to_vec()),
                    since: std::time::Instant::now(),
                };
                let seen = self.own.lock().timed_out(msg_id, unknown);
                match seen {
                    // A watch saw it: it landed.
                    Some(seq) => Ok(seq),
                    None => {
                        tracing::warn!(key, %reason, "a publish timed out; its outcome is unknown until its message shows up");
                        Err(PubError::Tier(TierError::Unknown { tier: TierKind::NatsKv, reason }))
                    }
                }
            }
            Err(e) => {
                self.settle(msg_id);
                Err(match e {
                    PublishFailure::WrongLastSequence => PubError::WrongLastSequence,
                    other => PubError::Tier(jetstream::publish_error(TierKind::NatsKv, &subject, other)),
                })
            }
        }
    }

    /// The caller of [`Inner::publish`] recorded its outcome: the watch treats the message as
    /// an ordinary change from now on.
    fn settle(&self, msg_id: &str) {
        self.own.lock().settle(msg_id);
    }

    /// An exclusive create of `key` with `value` (empty for files). `Ok(Err(msg))` when the key exists
    /// (with its current last message).
    async fn create_exclusive(
        &self,
        bucket: usize,
        key: &str,
        msg_id: String,
        value: Bytes,
    ) -> Result<Result<(u64, String), async_nats::jetstream::message::StreamMessage>, TierError> {
        let subject = format!("{}{key}", self.buckets[bucket].prefix);
        let mut expected = 0;
        for _ in 0..4 {
            match self.publish(bucket, key, &KvOp::Put(value.clone()), Some(expected), &msg_id).await {
                Ok(rev) => return Ok(Ok((rev, msg_id))),
                Err(PubError::Tier(e)) => return Err(e),
                Err(PubError::WrongLastSequence) => {
                    let stream = self.stream(bucket).ok_or_else(|| unavailable("bucket not ready"))?;
                    let last = match stream.get_last_raw_message_by_subject(&subject).await {
                        Ok(m) => m,
                        // Purged or expired in between: try again from nothing.
                        Err(_) => {
                            expected = 0;
                            continue;
                        }
                    };
                    let ours = last
                        .headers
                        .get(async_nats::header::NATS_MESSAGE_ID)
                        .is_some_and(|id| id.as_str() == msg_id);
                    if ours {
                        // Our earlier attempt won; its acknowledgement was lost.
                        return Ok(Ok((last.sequence, msg_id)));
                    }
                    if sync::is_delete(&last) {
                        expected = last.sequence;
                        continue;
                    }
                    return Ok(Err(last));
                }
            }
        }
        Err(unavailable("exclusive create did not settle"))
    }

    /// Opening an existing key the view has not heard of yet: its current value goes into the
    /// tree first, so the open sees it and writes against its revision.
    async fn bring_in(
        self: &Arc<Self>,
        at: &Target,
        bucket: usize,
        current: async_nats::jetstream::message::StreamMessage,
    ) -> Result<Option<Revision>, TierError> {
        let created = SystemTime::from(current.time);
        let node = current.headers.get(NODE_HEADER).map(|v| v.as_str().to_string());
        self.view.lock().record(&at.path, bucket, current.sequence, false, node, created, at.policy.ttl);
        if let Some(sink) = self.sink().cloned() {
            let (path, payload, rev) = (at.path.clone(), current.payload.to_vec(), current.sequence);
            blocking(move || {
                sink.apply(&path, super::RemoteChange::File(payload), Some(Revision(rev.to_string())))
                    .map_err(TierError::Backend)
            })
            .await?;
        }
        Ok(Some(Revision(current.sequence.to_string())))
    }

    /// Records what this node just wrote, so `user.syncfs.rev` shows it at once.
    fn record_own(&self, at: &Target, bucket: usize, rev: u64, value: Option<&Bytes>) {
        let mut view = self.view.lock();
        view.record(
            &at.path,
            bucket,
            rev,
            value.is_none(),
            Some(self.node.clone()),
            SystemTime::now(),
            at.policy.ttl,
        );
        match value {
            Some(v) if at.policy.ephemeral => {
                let key = Self::key_of(at).unwrap_or_default();
                view.owned.insert(
                    at.path.clone(),
                    Owned {
                        bucket,
                        key,
                        rev,
                        value: v.to_vec(),
                        dir: false,
                    },
                );
            }
            _ => {
                view.owned.remove(&at.path);
            }
        }
    }

    /// Queues a last-write-wins change for replay (fsync'ed before returning).
    async fn enqueue(self: &Arc<Self>, bucket: usize, key: String, op: JournalOp, value: Bytes, msg_id: String) -> Result<(), TierError> {
        let this = self.clone();
        blocking(move || {
            let record = Record {
                bucket: this.buckets[bucket].name.clone(),
                key,
                op,
                msg_id,
                value: value.to_vec(),
            };
            this.journal.lock().append(record)?;
            Ok(())
        })
        .await
    }

    /// A last-write-wins change: published when connected and nothing is queued before it,
    /// queued otherwise (also when the publish fails for want of the server).
    async fn write_lww(self: &Arc<Self>, at: &Target, bucket: usize, key: String, op: KvOp) -> Result<Option<Revision>, TierError> {
        let (jop, value) = match &op {
            KvOp::Put(v) => (JournalOp::Put, v.clone()),
            KvOp::Delete => (JournalOp::Delete, Bytes::new()),
        };
        // The id goes with the write into the journal: if a timed-out publish lands after all,
        // its replay is a duplicate JetStream drops, not a second write over newer ones.
        let msg_id = self.msg_id();
        if self.nats.is_connected() && self.journal.lock().is_empty() {
            match self.publish(bucket, &key, &op, None, &msg_id).await {
                Ok(rev) => {
                    self.record_own(at, bucket, rev, Some(&value).filter(|_| matches!(op, KvOp::Put(_))));
                    self.creates.lock().done(&at.path);
                    self.settle(&msg_id);
                    return Ok(Some(Revision(rev.to_string())));
                }
                Err(PubError::Tier(TierError::Unavailable { reason, .. })) => {
                    tracing::info!(path = %at.path.display(), %reason, "NATS unavailable; queueing the write");
                }
                Err(PubError::Tier(TierError::Unknown { reason, .. })) => {
                    tracing::info!(path = %at.path.display(), %reason, "write not acknowledged; queueing it with its message id");
                    self.own.lock().drop_unknown(&msg_id);
                }
                Err(PubError::Tier(e)) => return Err(e),
                Err(PubError::WrongLastSequence) => return Err(TierError::Backend("unexpected sequence check".into())),
            }
        }
        self.enqueue(bucket, key, jop, value, msg_id).await?;
        Ok(None)
    }

    /// A compare-and-swap change against `base` (`None`: the key must not exist).
    async fn write_cas(
        self: &Arc<Self>,
        at: &Target,
        bucket: usize,
        key: String,
        op: KvOp,
        base: Option<Revision>,
    ) -> Result<Option<Revision>, TierError> {
        if !self.nats.is_connected() {
            return Err(unavailable("not connected; compare-and-swap writes are not queued"));
        }
        let stale = || TierError::Stale {
            path: at.path.clone(),
            base: base.clone(),
        };
        let msg_id = self.msg_id();
        if let (None, KvOp::Put(value)) = (&base, &op) {
            // The first content of a new key: created only if nobody else did (a delete
            // marker counts as absent).
            return match self.create_exclusive(bucket, &key, msg_id, value.clone()).await? {
                Ok((rev, msg_id)) => {
                    self.record_own(at, bucket, rev, Some(value));
                    self.creates.lock().done(&at.path);
                    self.settle(&msg_id);
                    Ok(Some(Revision(rev.to_string())))
                }
                Err(_) => Err(stale()),
            };
        }
        let expected = match &base {
            None => 0,
            Some(rev) => rev.0.trim().parse::<u64>().map_err(|_| stale())?,
        };
        match self.publish(bucket, &key, &op, Some(expected), &msg_id).await {
            Ok(rev) => {
                let value = match &op {
                    KvOp::Put(v) => Some(v.clone()),
                    KvOp::Delete => None,
                };
                self.record_own(at, bucket, rev, value.as_ref());
                self.creates.lock().done(&at.path);
                self.settle(&msg_id);
                Ok(Some(Revision(rev.to_string())))
            }
            Err(PubError::WrongLastSequence) => Err(stale()),
            Err(PubError::Tier(e)) => Err(e),
        }
    }

    async fn write(
        self: &Arc<Self>,
        at: &Target,
        op: KvOp,
        base: Option<Revision>,
    ) -> Result<Option<Revision>, TierError> {
        let bucket = self.bucket_of(at)?;
        let key = Self::key_of(at)?;
        match at.policy.consistency {
            Consistency::Cas | Consistency::CasCreate => self.write_cas(at, bucket, key, op, base).await,
            _ => self.write_lww(at, bucket, key, op).await,
        }
    }

    fn sink(&self) -> Option<&Arc<dyn RemoteSink>> {
        self.sink.get()
    }
}

impl Tier for KvTier {
    fn kind(&self) -> TierKind {
        TierKind::NatsKv
    }

    fn write_mode(&self) -> WriteMode {
        WriteMode::Staged
    }

    fn revision(&self, at: &Target) -> Option<Revision> {
        let view = self.inner.view.lock();
        let e = view.get(&at.path)?;
        // The revision whose content the tree holds: a newer one the watch heard of is not in
        // the tree yet, and a writer opening now starts from the tree's content.
        if e.installed != 0 && e.installed < e.known {
            return Some(Revision(e.installed.to_string()));
        }
        (!e.deleted).then(|| Revision(e.known.to_string()))
    }

    fn revision_at(&self, at: &Target, when: std::time::Instant) -> Option<Revision> {
        let current = self.revision(at);
        self.inner.view.lock().log.at(&at.path, when, current)
    }

    fn max_file_size(&self, _at: &Target) -> Option<u64> {
        Some(self.inner.value_limit() as u64)
    }

    fn create(&self, at: &Target, kind: Kind, exclusive: bool) -> Op<Option<Revision>, TierError> {
        let inner = self.inner.clone();
        let at = at.clone();
        if kind == Kind::Dir {
            if claims_dirs(&at) && !self.inner.nats.is_connected() {
                return Op::err(unavailable("not connected; directory claims are not queued"));
            }
            return Op::pending(async move {
                let bucket = inner.bucket_of(&at)?;
                let key = key::encode_dir(&at.path).map_err(|_| {
                    TierError::Io(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG))
                })?;
                if claims_dirs(&at) {
                    return inner.claim_dir(&at, bucket, key).await;
                }
                let rev = inner.write_lww(&at, bucket, key, KvOp::Put(Bytes::new())).await?;
                let rev_n = rev.as_ref().and_then(|r| r.0.parse().ok()).unwrap_or(0);
                // The marker is not a file: keep it out of the file entries.
                inner.view.lock().remove(&at.path);
                inner.view.lock().mark_dir(&at.path, rev_n, None);
                Ok(None)
            });
        }
        if kind != Kind::File {
            return Op::err(TierError::Unsupported {
                op: "special files",
                tier: TierKind::NatsKv,
            });
        }
        let exclusive = exclusive || at.policy.consistency == Consistency::CasCreate;
        if !matches!(at.policy.consistency, Consistency::Cas | Consistency::CasCreate) {
            // The first commit creates the key (also for `touch`).
            return Op::ok(None);
        }
        if let Err(e) = Inner::key_of(&at) {
            return Op::err(e);
        }
        if !self.inner.nats.is_connected() {
            return Op::err(unavailable("not connected; exclusive creates are not queued"));
        }
        if !exclusive {
            // `echo x > f` on a new key: nothing is published until the close, which creates
            // the key with its content (ESTALE if another node created it first), so no node
            // ever reads an empty value nobody wrote. An existing key is opened as it is.
            return Op::pending(async move {
                let bucket = inner.bucket_of(&at)?;
                let key = Inner::key_of(&at)?;
                match sync::last_message(&inner, bucket, &key).await {
                    None => Err(unavailable("the key's last value could not be read")),
                    Some(Some(current)) if !sync::is_delete(&current) => inner.bring_in(&at, bucket, current).await,
                    Some(_) => Ok(None),
                }
            });
        }
        Op::pending(async move {
            let bucket = inner.bucket_of(&at)?;
            let key = Inner::key_of(&at)?;
            // Written down before it is published: a kill right after the server's
            // acknowledgement must still leave the empty value to take back.
            let msg_id = inner.msg_id();
            let create = creates::Create { bucket: inner.buckets[bucket].name.clone(), key: key.clone(), msg_id: msg_id.clone() };
            inner.creates.lock().begin(&at.path, create);
            let created = inner.create_exclusive(bucket, &key, msg_id, Bytes::new()).await;
            if !matches!(created, Ok(Ok(_)) | Err(TierError::Unknown { .. })) {
                // Not created (for certain): nothing to take back.
                inner.creates.lock().done(&at.path);
            }
            match created? {
                Ok((rev, msg_id)) => {
                    inner.record_own(&at, bucket, rev, Some(&Bytes::new()));
                    inner.settle(&msg_id);
                    inner.lost.lock().remove(&at.path);
                    Ok(Some(Revision(rev.to_string())))
                }
                Err(_) => Err(TierError::Exists { path: at.path.clone() }),
            }
        })
    }

    fn commit(
        &self,
        at: &Target,
        content: Arc<File>,
        base: Option<Revision>,
        _durable: bool,
    ) -> Op<Option<Revision>, TierError> {
        let inner = self.inner.clone();
        let at = at.clone();
        Op::pending(async move {
            // A KV value is at most the server's max_payload (1 MiB by default), just written
            // and in the page cache: read inline.
            let value = read_value(&content, inner.value_limit(), &at.path)?;
            inner.write(&at, KvOp::Put(value), base).await
        })
    }

    fn admit(&self, at: &Target, rev: Option<&Revision>) -> bool {
        let rev = rev.and_then(|r| r.0.parse::<u64>().ok());
        self.inner.view.lock().admit(&at.path, rev)
    }

    fn remove(&self, at: &Target, kind: Kind) -> Op<(), TierError> {
        let inner = self.inner.clone();
        let at = at.clone();
        if kind == Kind::Dir {
            return Op::pending(async move {
                let bucket = inner.bucket_of(&at)?;
                let Ok(key) = key::encode_dir(&at.path) else { return Ok(()) };
                if claims_dirs(&at) {
                    return inner.release_dir(&at, bucket, key).await;
                }
                inner.write_lww(&at, bucket, key, KvOp::Delete).await?;
                inner.view.lock().unmark_dir(&at.path, None);
                Ok(())
            });
        }
        let current = self.revision(&at);
        let strong = matches!(at.policy.consistency, Consistency::Cas | Consistency::CasCreate);
        if strong && current.is_none() {
            // Nothing in the bucket (never committed, or expired): only the local name goes.
            return Op::ok(());
        }
        Op::pending(async move {
            // A claim this mount keeps alive: its own refreshes move the revision under the
            // program, so the delete follows them, and the refresher stops first.
            let Some(owned) = inner.view.lock().owned.remove(&at.path) else {
                return inner.write(&at, KvOp::Delete, current).await.map(|_| ());
            };
            let mut rev = owned.rev;
            for _ in 0..3 {
                match inner.write(&at, KvOp::Delete, Some(Revision(rev.to_string()))).await {
                    Ok(_) => return Ok(()),
                    Err(e @ TierError::Stale { .. }) => match sync::last_message(&inner, owned.bucket, &owned.key).await {
                        Some(last) => match sync::ours(&inner, last.as_ref()) {
                            Some(seq) if seq != rev => rev = seq,
                            _ => return Err(e),
                        },
                        None => return Err(e),
                    },
                    Err(e) => {
                        // Not sent: the program still holds it. (An unknown outcome is not
                        // kept alive: the claim expires if the delete did not land.)
                        if matches!(e, TierError::Unavailable { .. }) {
                            inner.view.lock().owned.insert(at.path.clone(), owned);
                        }
                        return Err(e);
                    }
                }
            }
            Err(TierError::Stale { path: at.path.clone(), base: current })
        })
    }

    fn rename(&self, from: &Target, to: &Target, kind: Kind, content: Option<Arc<File>>, base: Option<Revision>) -> Op<(), TierError> {
        if kind == Kind::Dir && claims_dirs(from) && claims_dirs(to) && !self.inner.view.lock().has_children(&from.path) {
            let inner = self.inner.clone();
            let (from, to) = (from.clone(), to.clone());
            return Op::pending(async move { inner.move_dir_claim(&from, &to).await });
        }
        if kind != Kind::File {
            return Op::err(TierError::CrossDevice(format!(
                "{}: directories of nats-kv paths cannot be renamed atomically",
                from.path.display()
            )));
        }
        let Some(content) = content else {
            return Op::err(TierError::Backend("rename without content".into()));
        };
        let inner = self.inner.clone();
        let (from, to) = (from.clone(), to.clone());
        let (from_rev, to_rev) = (self.revision(&from), base);
        Op::pending(async move {
            let value = read_value(&content, inner.value_limit(), &from.path)?;
            inner.write(&to, KvOp::Put(value), to_rev).await?;
            if from_rev.is_some() || !matches!(from.policy.consistency, Consistency::Cas | Consistency::CasCreate) {
                inner.write(&from, KvOp::Delete, from_rev).await?;
            }
            inner.view.lock().owned.remove(&from.path);
            Ok(())
        })
    }

    fn supports_hard_links(&self) -> bool {
        false
    }

    fn shares_locks(&self) -> bool {
        true
    }

    fn settle(&self, _at: &Target) -> Op<(), TierError> {
        let inner = self.inner.clone();
        Op::pending(async move {
            // Every bucket, not only the locked file's: the last holder may have written any
            // file before it released. What the server held when the lock was granted is in
            // each stream by then; the watches apply in stream order.
            for bucket in 0..inner.buckets.len() {
                let Some(stream) = inner.stream(bucket) else { continue };
                let info = tokio::time::timeout(SETTLE_WAIT, stream.get_info())
                    .await
                    .map_err(|_| unavailable("the bucket's state did not come"))?
                    .map_err(|e| unavailable(format!("the bucket's state: {e}")))?;
                if info.state.messages == 0 {
                    continue;
                }
                let last = info.state.last_sequence;
                let mut handled = inner.handled.subscribe();
                // The newest message may have expired since (a TTL): then no watch brings it.
                if tokio::time::timeout(SETTLE_WAIT, handled.wait_for(|h| h[bucket] >= last)).await.is_err() {
                    tracing::debug!(bucket = %inner.buckets[bucket].name, last, "the watch did not reach the bucket's last message in time");
                }
            }
            Ok(())
        })
    }

    fn attribute(&self, at: &Target, name: &str) -> Option<Vec<u8>> {
        if name == "user.syncfs.error" {
            return self.inner.lost.lock().get(&at.path).map(|w| w.clone().into_bytes());
        }
        let view = self.inner.view.lock();
        let e = view.get(&at.path).filter(|e| !e.deleted)?;
        match name {
            "user.syncfs.rev" => Some(e.known.to_string().into_bytes()),
            "user.syncfs.node" => e.node.clone().map(String::into_bytes),
            "user.syncfs.expires" => at
                .policy
                .ttl
                .map(|ttl| humantime::format_rfc3339_millis(e.created + ttl).to_string().into_bytes()),
            _ => None,
        }
    }

    fn start(&self, sink: Arc<dyn RemoteSink>) {
        let _ = self.inner.sink.set(sink);
        let inner = self.inner.clone();
        let task = self.inner.rt.spawn(sync::supervise(inner));
        self.inner.tasks.keep(task);
    }

    fn shutdown(&self) -> Op<(), TierError> {
        let inner = self.inner.clone();
        Op::pending(async move {
            inner.tasks.stop().await;
            sync::release_owned(&inner).await;
            Ok(())
        })
    }
}
