//! The append tier: NATS JetStream streams (`tier: nats-stream`, `consistency: append`).
//!
//! # Where things are
//!
//! - One stream per policy, named from its pattern like a KV bucket (`syncfs_fast_messages_…`),
//!   with `max_age` from the policy's `retention.max_age_days` and size limits from the config
//!   (`nats.stream.*`). A file is one subject, `syncfs.log.<stream>.<key>`, with the KV tier's
//!   reversible path encoding, so no file name can address another file or a wildcard.
//! - A message is one append: its payload is the appended bytes, unchanged. Appends larger
//!   than the server's payload limit are split into parts (`Syncfs-Part: k/n`, `Syncfs-Append:
//!   <id>`) that readers put back together ([`log`]). Truncation to zero and removal are
//!   rollup messages (`Nats-Rollup: sub`, `Syncfs-Op: truncate|delete`): JetStream drops the
//!   file's earlier messages, and every reader sees the operation at its place in the order.
//!
//! # How a file is kept
//!
//! The tree's copy of a file is the concatenation of its messages in stream order, and only
//! this tier's applier writes it (one task per stream, reading every message in order, see
//! [`sync`]). A program's append is published, then waits until the applier has put it in the
//! tree, so `close()` returning means the line is in the file on this node, after every
//! append the stream ordered before it. Files change in place (never replaced), so
//! `tail -f` on any node follows them.
//!
//! On a full state disk an append is refused with `ENOSPC` before it is published, and a file
//! whose copy an apply could not write anyway is rebuilt from the stream when space returns.
//!
//! Retries are idempotent: every message carries a `Nats-Msg-Id` derived from the append's
//! id, which stays the same when the core retries a failed append. Appends never queue:
//! while NATS is unreachable they fail at once with `EAGAIN`.
//!
//! The applier's state (per file: length, first and last sequence) is saved in
//! `--state/streams/<stream>.json`, with a CRC-32; a restart cuts files back to the saved
//! lengths and replays the stream from the saved point, so a crash never doubles or loses an
//! append. A state that does not match its checksum (or does not parse) is set aside as
//! `<stream>.json.damaged` and every file of the stream is rebuilt from the stream.
//! Messages the stream no longer keeps (retention, size limits) leave every node's files
//! the same way: a file whose oldest message is gone is rebuilt from what the stream still
//! holds.

mod log;
mod sync;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use self::log::LogState;
use super::jetstream::{self, MsgIds, Tasks};
use super::kv::{bucket_name, key, pattern_root};
use super::{space, Appended, RemoteSink, Revision, Target, Tier, TierError, WriteMode};
use crate::fs::Kind;
use crate::nats::Nats;
use crate::op::Op;
use crate::policy::{PolicyTable, TierKind};

const NODE_HEADER: &str = "Syncfs-Node";
const OP_HEADER: &str = "Syncfs-Op";
const PART_HEADER: &str = "Syncfs-Part";
const APPEND_HEADER: &str = "Syncfs-Append";
/// Room left under the server's `max_payload` for headers.
const HEADER_ROOM: usize = 1024;
/// Free space an append leaves besides its bytes (the tree's last block, the saved state).
const APPEND_MARGIN: u64 = 64 << 10;

/// Limits of the streams syncfs creates (`nats.stream.*` in the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Bytes a stream keeps at most (oldest messages go first); `None`: no limit.
    pub max_bytes: Option<i64>,
    /// Messages a stream keeps at most; `None`: no limit.
    pub max_msgs: Option<i64>,
    /// Replicas of each stream.
    pub replicas: usize,
    /// How often a node checks which messages its streams still keep (retention, limits).
    pub check_interval: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            max_bytes: None,
            max_msgs: None,
            replicas: 1,
            check_interval: Duration::from_secs(30),
        }
    }
}

/// One stream: the policy it serves and its files.
pub(crate) struct Log {
    /// The stream's name.
    pub name: String,
    /// The policy whose paths it holds.
    pub policy: Arc<crate::policy::Policy>,
    /// The literal directory prefix of the pattern, which always exists in the tree.
    pub root: PathBuf,
    /// `syncfs.log.<name>.`
    pub prefix: String,
    /// Files and gathers.
    pub state: Mutex<LogState>,
    /// The last sequence the applier handled.
    pub applied: watch::Sender<u64>,
    /// Held while a message is handled and applied, so that the tree changes in stream order
    /// whoever applies (the applier, or a writer applying its own append, see `append`).
    pub apply_lock: tokio::sync::Mutex<()>,
    /// Where the state is saved.
    pub state_file: PathBuf,
    /// Files whose tree copy an apply could not write (a full disk): rebuilt when there is room.
    pub torn: Mutex<std::collections::BTreeSet<PathBuf>>,
}

pub(crate) struct Inner {
    nats: Arc<Nats>,
    node: String,
    policies: Arc<PolicyTable>,
    settings: StreamSettings,
    logs: Vec<Log>,
    sink: OnceLock<Arc<dyn RemoteSink>>,
    /// Logs whose applier has caught up in the current connection.
    synced: watch::Sender<Vec<bool>>,
    tasks: Tasks,
    rt: tokio::runtime::Handle,
    ids: MsgIds,
}

/// The nats-stream tier of a mount.
#[derive(Clone)]
pub struct StreamTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StreamTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.inner.logs.iter().map(|l| l.name.as_str()).collect();
        f.debug_struct("StreamTier").field("streams", &names).finish_non_exhaustive()
    }
}

fn unavailable(reason: impl std::fmt::Display) -> TierError {
    TierError::unavailable(TierKind::NatsStream, reason)
}

impl StreamTier {
    /// A tier for every nats-stream policy of `policies`, saving each stream's state under
    /// `state_dir`. Nothing touches the network until [`Tier::start`].
    pub fn new(
        nats: Arc<Nats>,
        node: &str,
        policies: Arc<PolicyTable>,
        settings: StreamSettings,
        state_dir: &Path,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<StreamTier> {
        std::fs::create_dir_all(state_dir)?;
        let spill = state_dir.join("parts");
        // Gathered parts of an earlier run are gathered again from the stream.
        let _ = std::fs::remove_dir_all(&spill);
        let mut logs = Vec::new();
        for p in policies.reachable().iter().filter(|p| p.tier == TierKind::NatsStream) {
            let name = bucket_name(&p.pattern);
            let state_file = state_dir.join(format!("{name}.json"));
            let saved = match log::load(&state_file) {
                Ok(saved) => saved.unwrap_or_default(),
                Err(e) => {
                    // Kept for a post-mortem; the next save writes a new state.
                    let copy = state_file.with_extension("json.damaged");
                    let _ = std::fs::rename(&state_file, &copy);
                    tracing::warn!(
                        stream = %name,
                        error = %e,
                        copy = %copy.display(),
                        "the stream state is damaged or unreadable; rebuilding its files from the stream"
                    );
                    Default::default()
                }
            };
            logs.push(Log {
                prefix: format!("syncfs.log.{name}."),
                state: Mutex::new(LogState::restore(saved, spill.clone())),
                applied: watch::channel(0).0,
                apply_lock: tokio::sync::Mutex::new(()),
                name,
                policy: p.clone(),
                root: pattern_root(&p.pattern),
                state_file,
                torn: Mutex::default(),
            });
        }
        let n = logs.len();
        Ok(StreamTier {
            inner: Arc::new(Inner {
                nats,
                node: node.to_string(),
                policies,
                settings,
                logs,
                sink: OnceLock::new(),
                synced: watch::channel(vec![false; n]).0,
                tasks: Tasks::default(),
                rt,
                ids: MsgIds::new(node),
            }),
        })
    }

    /// Waits until every stream's files are caught up (or `timeout` passes).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        jetstream::wait_synced(&self.inner.synced, timeout).await
    }

    /// How many streams and files this mount has.
    pub fn usage(&self) -> (usize, usize) {
        let files = self.inner.logs.iter().map(|l| l.state.lock().files.len()).sum();
        (self.inner.logs.len(), files)
    }
}

impl Inner {
    fn log_of(&self, at: &Target) -> Result<usize, TierError> {
        self.logs
            .iter()
            .position(|l| l.policy.pattern == at.policy.pattern)
            .ok_or_else(|| TierError::Backend(format!("no stream for {}", at.policy.pattern)))
    }

    fn subject_of(&self, log: usize, at: &Target) -> Result<String, TierError> {
        Ok(format!("{}{}", self.logs[log].prefix, jetstream::key_of(&at.path)?))
    }

    fn part_size(&self) -> usize {
        self.nats.max_payload().saturating_sub(HEADER_ROOM).max(1024)
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, self.node.as_str());
        headers
    }

    async fn publish(&self, subject: &str, payload: Bytes, headers: HeaderMap, msg_id: &str) -> Result<u64, TierError> {
        self.nats
            .publish(subject.to_string(), payload, headers, msg_id, None)
            .await
            .map_err(|e| jetstream::publish_error(TierKind::NatsStream, subject, e))
    }

    /// Waits until the applier of `log` has put message `seq` in the tree. A stored append
    /// is a success even if that takes longer: it is in the stream and will arrive.
    async fn wait_applied(&self, log: usize, seq: u64) {
        let mut rx = self.logs[log].applied.subscribe();
        let waited = tokio::time::timeout(self.nats.timeout, rx.wait_for(|a| *a >= seq)).await;
        if waited.is_err() {
            tracing::warn!(stream = %self.logs[log].name, seq, "stored, but not in the tree yet; it follows");
        }
    }

    async fn append(&self, at: &Target, id: u64, data: Appended) -> Result<Option<Revision>, TierError> {
        if !self.nats.is_connected() {
            return Err(unavailable("not connected; appends are not queued"));
        }
        let log = self.log_of(at)?;
        let subject = self.subject_of(log, at)?;
        // The tree's copy must take it too: refuse before the stream has it, not after.
        let dir = self.logs[log].state_file.parent().unwrap_or(Path::new("/"));
        if space::short_of(dir, data.len() + APPEND_MARGIN) {
            return Err(space::no_space(format_args!("an append of {} bytes to {}", data.len(), at.path.display())));
        }
        let part = self.part_size();
        let append_id = self.ids.with(id);
        let n = data.len().div_ceil(part as u64).max(1);
        let mut seq = 0;
        let mut single = None;
        for k in 1..=n {
            let chunk = data.chunk((k - 1) * part as u64, part)?;
            if n == 1 {
                single = Some(chunk.clone());
            }
            let mut headers = self.headers();
            let msg_id = if n == 1 {
                append_id.clone()
            } else {
                headers.insert(PART_HEADER, format!("{k}/{n}").as_str());
                headers.insert(APPEND_HEADER, append_id.as_str());
                format!("{append_id}.{k}")
            };
            seq = self.publish(&subject, chunk, headers, &msg_id).await?;
        }
        if let Some(payload) = single {
            if self.apply_own(log, at, seq, payload).await? {
                return Ok(Some(Revision(seq.to_string())));
            }
        }
        self.wait_applied(log, seq).await;
        Ok(Some(Revision(seq.to_string())))
    }

    /// Applies this node's own one-message append `seq` at once when the applier has handled
    /// every message before it, instead of waiting for the stream to deliver it back (the
    /// applier then skips it, as it skips any message at or below a file's last sequence).
    /// Returns whether it did.
    async fn apply_own(&self, log: usize, at: &Target, seq: u64, payload: Bytes) -> Result<bool, TierError> {
        let l = &self.logs[log];
        let _order = l.apply_lock.lock().await;
        let action = {
            let mut state = l.state.lock();
            if state.applied + 1 != seq {
                return Ok(false);
            }
            state.handle(log::Msg {
                seq,
                path: at.path.clone(),
                op: log::Op::Append(None),
                node: Some(self.node.clone()),
                payload,
                writer: Some(self.ids.prefix().to_string()),
            })?
        };
        if let Some(action) = action {
            // Stored either way: a copy the disk could not take is repaired when it can.
            sync::apply(self, l, action);
        }
        l.applied.send_modify(|a| *a = (*a).max(seq));
        Ok(true)
    }

    /// Publishes a truncation or removal of `at`: a rollup of its subject.
    async fn rollup(&self, at: &Target, op: &str) -> Result<(), TierError> {
        if !at.policy.purge {
            return Err(TierError::Refused(format!(
                "{} is append-only: its policy ({}) has no `purge: true`, so it cannot be {}",
                at.path.display(),
                at.policy.pattern,
                if op == "delete" { "removed" } else { "truncated" }
            )));
        }
        if !self.nats.is_connected() {
            return Err(unavailable("not connected; purges are not queued"));
        }
        let log = self.log_of(at)?;
        let subject = self.subject_of(log, at)?;
        let mut headers = self.headers();
        headers.insert(OP_HEADER, op);
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        // Not `ids.next()` alone: appends number their ids from the core's handle counter, in
        // the same space, and JetStream drops a message whose id it has seen as a duplicate.
        let seq = self.publish(&subject, Bytes::new(), headers, &format!("{}.{op}", self.ids.next())).await?;
        self.wait_applied(log, seq).await;
        Ok(())
    }

    fn file_state(&self, at: &Target) -> Option<log::FileState> {
        let log = self.log_of(at).ok()?;
        self.logs[log].state.lock().files.get(&at.path).cloned()
    }

    fn sink(&self) -> Option<&Arc<dyn RemoteSink>> {
        self.sink.get()
    }
}

impl Tier for StreamTier {
    fn kind(&self) -> TierKind {
        TierKind::NatsStream
    }

    fn write_mode(&self) -> WriteMode {
        WriteMode::Append
    }

    fn revision(&self, at: &Target) -> Option<Revision> {
        self.inner.file_state(at).map(|f| Revision(f.last.to_string()))
    }

    fn create(&self, at: &Target, kind: Kind, _exclusive: bool) -> Op<Option<Revision>, TierError> {
        if kind == Kind::File {
            // Its first append would fail: refuse the name now rather than leave an empty
            // file only this node has.
            if let Err(e) = self.check_append(at) {
                return Op::err(e);
            }
        }
        // The file's first append (an empty one, for a file only created) makes it exist on
        // every node.
        super::create_lazily(at, kind)
    }

    fn commit(&self, at: &Target, _content: Arc<File>, _base: Option<Revision>, _durable: bool) -> Op<Option<Revision>, TierError> {
        Op::err(TierError::Unsupported {
            op: "rewriting",
            tier: at.policy.tier,
        })
    }

    fn append(&self, at: &Target, id: u64, data: Appended, _durable: bool) -> Op<Option<Revision>, TierError> {
        let inner = self.inner.clone();
        let at = at.clone();
        // JetStream acknowledges a message once it is stored (on a quorum of replicas), so
        // every acknowledged append is as durable as the stream: fsync waits for nothing more.
        Op::pending(async move { inner.append(&at, id, data).await })
    }

    fn check_append(&self, _at: &Target) -> Result<(), TierError> {
        if self.inner.nats.is_connected() {
            Ok(())
        } else {
            Err(unavailable("not connected; appends are not queued"))
        }
    }

    fn purge(&self, at: &Target) -> Op<(), TierError> {
        let inner = self.inner.clone();
        let at = at.clone();
        Op::pending(async move { inner.rollup(&at, "truncate").await })
    }

    fn admit(&self, _at: &Target, _rev: Option<&Revision>) -> bool {
        // Only the applier writes these files, in stream order.
        true
    }

    fn remove(&self, at: &Target, kind: Kind) -> Op<(), TierError> {
        if kind == Kind::Dir || self.inner.file_state(at).is_none() {
            // A directory, or a file no message made (created here, never closed): local only.
            return Op::ok(());
        }
        let inner = self.inner.clone();
        let at = at.clone();
        Op::pending(async move { inner.rollup(&at, "delete").await })
    }

    fn rename(&self, from: &Target, _to: &Target, _kind: Kind, _content: Option<Arc<File>>, _base: Option<Revision>) -> Op<(), TierError> {
        Op::err(TierError::CrossDevice(format!(
            "{}: files of append paths are not renamed (a rename would rewrite the stream)",
            from.path.display()
        )))
    }

    fn supports_hard_links(&self) -> bool {
        false
    }

    fn attribute(&self, at: &Target, name: &str) -> Option<Vec<u8>> {
        let file = self.inner.file_state(at)?;
        match name {
            "user.syncfs.rev" => Some(file.last.to_string().into_bytes()),
            "user.syncfs.node" => file.node.map(String::into_bytes),
            _ => None,
        }
    }

    fn start(&self, sink: Arc<dyn RemoteSink>) {
        let _ = self.inner.sink.set(sink);
        self.inner.tasks.keep(self.inner.rt.spawn(sync::supervise(self.inner.clone())));
    }

    fn shutdown(&self) -> Op<(), TierError> {
        let inner = self.inner.clone();
        Op::pending(async move {
            inner.tasks.stop().await;
            for log in &inner.logs {
                sync::save(log);
            }
            Ok(())
        })
    }
}
