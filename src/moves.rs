//! Policy changes that move paths between tiers (issue 10, defect 10).
//!
//! A new policy table takes effect at a node's next mount. A path whose *home* (its tier, and
//! for the NATS tiers its bucket or stream) differs between the table the node's tree was last
//! mounted with and the new one is **moved** at that mount, before any tier starts watching:
//!
//! 1. *Plan.* The node's copy of each such file (the tree's content) is saved under
//!    `--state/moves/` with the old and the new home, and the plan is made durable before
//!    `--state/policies.applied.yml` (the table the tree is materialized under) is replaced.
//!    A crash anywhere after that resumes the plan at the next mount.
//! 2. *Into the new home, if absent.* nats-kv: an exclusive create of the key (expected
//!    sequence 0). nats-stream: the content as the file's first message (expected subject
//!    sequence 0). git: the tree's file is an added file of the git tier, and add/add of equal
//!    content merges to one version. local: the tree's file stays. When the new home already
//!    holds the path (another node moved it first) with other content, the first mover wins:
//!    this node's copy is kept in `--state/moved/` and a warning names it.
//! 3. *Out of the old home.* nats-kv: a delete; nats-stream: a rollup that removes the file's
//!    messages; git: a committed deletion (the file stays in the tree: it is no longer git's).
//!    Each is idempotent, so every node that mounts the new table may do it. A shared home is
//!    left as it is when the new home is `local`: every node takes its own copy from it.
//!
//! Each step is logged. A step that cannot be done (NATS unreachable) stays in the plan and is
//! retried at the next mount; nothing is removed from the old home before the new one holds
//! the content. Blob (object-store) homes are not moved by this release: such a path is
//! logged, and this node's copy of a file is kept in `--state/moved/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::nats::{Nats, PublishFailure};
use crate::policy::{Policy, PolicyTable, TierKind, HISTORY_DIR};
use crate::tier::jetstream;
use crate::tier::kv::bucket_name;

/// Where a path's content lives: a tier, and the bucket or stream of a NATS tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Home {
    /// The tier's name (`git`, `nats-kv`, ...).
    pub tier: String,
    /// The KV bucket or stream (NATS tiers), else empty.
    pub name: String,
    /// The policy's TTL in ms (a bucket created here gets it as `max_age`).
    #[serde(default)]
    pub ttl_ms: u64,
}

impl Home {
    fn of(p: &Policy) -> Home {
        let name = match p.tier {
            TierKind::NatsKv | TierKind::NatsStream | TierKind::ObjectStore => bucket_name(&p.pattern),
            _ => String::new(),
        };
        let ttl_ms = p.ttl.or(p.max_age).map(|d| d.as_millis() as u64).unwrap_or(0);
        Home { tier: p.tier.name().to_string(), name, ttl_ms }
    }

    fn is(&self, kind: TierKind) -> bool {
        self.tier == kind.name()
    }

    fn is_nats(&self) -> bool {
        self.is(TierKind::NatsKv) || self.is(TierKind::NatsStream) || self.is(TierKind::ObjectStore)
    }
}

/// One path to move, and how far the move got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Move {
    /// Relative to the sync root.
    pub path: PathBuf,
    /// The old home.
    pub from: Home,
    /// The new home.
    pub to: Home,
    /// The saved copy, under `--state/moves/`.
    pub data: String,
    /// The new home holds the path.
    pub placed: bool,
}

/// The plan of a mount: the moves still to do. Saved as `--state/moves/plan.json`.
#[derive(Debug, Default)]
pub struct Moves {
    dir: PathBuf,
    kept: PathBuf,
    node: String,
    moves: Vec<Move>,
}

const APPLIED: &str = "policies.applied.yml";

fn write_durably(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(file.parent().expect("has a parent"))?.sync_all()
}

/// Regular files of the tree (the history view and `.syncfs/` excluded).
fn tree_files(tree: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match std::fs::read_dir(tree.join(&rel)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() && path != Path::new(".syncfs") && path != Path::new(HISTORY_DIR) {
                stack.push(path);
            } else if kind.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl Moves {
    /// Plans the moves from the table the tree was last mounted with to `table`, adds them to
    /// the plan an interrupted mount left, and records `table` as the tree's.
    pub fn prepare(state: &Path, tree: &Path, node: &str, table: &PolicyTable) -> anyhow::Result<Moves> {
        let dir = state.join("moves");
        std::fs::create_dir_all(&dir)?;
        let plan = dir.join("plan.json");
        let mut moves: Vec<Move> = match std::fs::read(&plan) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, "the plan of moves is unreadable; its saved copies stay in {}", dir.display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let applied = state.join(APPLIED);
        let old = std::fs::read_to_string(&applied).ok().and_then(|text| match PolicyTable::parse(&text, &applied) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "the table this tree was last mounted with does not parse; nothing is moved");
                None
            }
        });
        if let Some(old) = old.filter(|o| o.source() != table.source()) {
            let mut n = moves.iter().filter_map(|m| m.data.parse::<u64>().ok()).max().unwrap_or(0);
            for path in tree_files(tree)? {
                let (from, to) = (Home::of(old.resolve(&path)), Home::of(table.resolve(&path)));
                if from == to || moves.iter().any(|m| m.path == path) {
                    continue;
                }
                n += 1;
                let data = n.to_string();
                let bytes = std::fs::read(tree.join(&path))?;
                write_durably(&dir.join(&data), &bytes)?;
                tracing::info!(path = %path.display(), from = %from.tier, to = %to.tier, "the new policy table moves this path to another tier");
                moves.push(Move { path, from, to, data, placed: false });
            }
            write_durably(&plan, &serde_json::to_vec(&moves)?)?;
        }
        write_durably(&applied, table.source().as_bytes())?;
        Ok(Moves { kept: state.join("moved"), dir, node: node.to_string(), moves })
    }

    /// Whether a move needs NATS (to reach an old or a new home).
    pub fn needs_nats(&self) -> bool {
        self.moves.iter().any(|m| m.from.is_nats() || m.to.is_nats())
    }

    /// Paths whose git entry is to be removed (their content is in the new home).
    pub fn out_of_git(&self) -> Vec<PathBuf> {
        self.moves.iter().filter(|m| m.placed && m.from.is(TierKind::Git)).map(|m| m.path.clone()).collect()
    }

    fn content(&self, m: &Move) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(&m.data))
    }

    /// Keeps this node's copy of a path the new home holds with other content.
    fn keep(&self, m: &Move, why: &str) {
        let name = m.path.to_string_lossy().replace('/', "%");
        let file = self.kept.join(format!("{name}.{}", self.node));
        let saved = std::fs::create_dir_all(&self.kept).and_then(|_| std::fs::copy(self.dir.join(&m.data), &file));
        tracing::warn!(path = %m.path.display(), kept = %file.display(), saved = saved.is_ok(), "{why}; this node's copy is kept beside the state");
    }

    /// Does the NATS steps of every move: into the new home, then out of the old one. A step
    /// that fails stays in the plan for the next mount.
    pub async fn run_nats(&mut self, nats: Option<&Arc<Nats>>) {
        let mut moves = std::mem::take(&mut self.moves);
        for m in &mut moves {
            if m.from.is(TierKind::ObjectStore) || m.to.is(TierKind::ObjectStore) {
                if !m.placed {
                    self.keep(m, "moves from or to the object store are not supported");
                    m.placed = true;
                }
                continue;
            }
            if !m.placed {
                match self.place(nats, m).await {
                    Ok(()) => m.placed = true,
                    Err(e) => {
                        tracing::warn!(path = %m.path.display(), error = %e, "cannot move the path into its new tier now; retrying at the next mount");
                        continue;
                    }
                }
            }
        }
        self.moves = moves;
    }

    /// Removes moved paths from their old NATS home; returns the moves left to do.
    pub async fn finish(&mut self, nats: Option<&Arc<Nats>>, git_done: impl Fn(&Path) -> bool) {
        let mut left = Vec::new();
        for m in std::mem::take(&mut self.moves) {
            let done = if !m.placed {
                false
            } else if m.to.is(TierKind::Local) && m.from.is_nats() {
                // Every node takes its own copy from the shared home: it stays.
                true
            } else if m.from.is(TierKind::Git) {
                m.to.is(TierKind::Local) || git_done(&m.path)
            } else if m.from.is(TierKind::NatsKv) || m.from.is(TierKind::NatsStream) {
                match self.remove(nats, &m).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(path = %m.path.display(), error = %e, "cannot remove the moved path from its old tier now; retrying at the next mount");
                        false
                    }
                }
            } else {
                true
            };
            if done {
                tracing::info!(path = %m.path.display(), from = %m.from.tier, to = %m.to.tier, "moved");
                let _ = std::fs::remove_file(self.dir.join(&m.data));
            } else {
                left.push(m);
            }
        }
        self.moves = left;
        if let Err(e) = write_durably(&self.dir.join("plan.json"), &serde_json::to_vec(&self.moves).unwrap_or_default()) {
            tracing::error!(error = %e, "cannot save the plan of moves");
        }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Syncfs-Node", self.node.as_str());
        h
    }

    fn msg_id(&self, m: &Move, what: &str) -> String {
        let mut hash: u64 = 0xcbf29ce484222325;
        for b in m.path.as_os_str().as_encoded_bytes() {
            hash = (hash ^ *b as u64).wrapping_mul(0x100000001b3);
        }
        format!("syncfs-move-{what}-{}-{hash:016x}", self.node)
    }

    async fn place(&self, nats: Option<&Arc<Nats>>, m: &Move) -> anyhow::Result<()> {
        if m.to.is(TierKind::Git) || m.to.is(TierKind::Local) {
            // The tree's file is the new home's (git commits it as an added file).
            return Ok(());
        }
        let nats = nats.filter(|n| n.is_connected()).ok_or_else(|| anyhow::anyhow!("NATS is not connected"))?;
        let key = jetstream::key_of(&m.path)?;
        let content = Bytes::from(self.content(m)?);
        let (subject, stream) = if m.to.is(TierKind::NatsKv) {
            let config = async_nats::jetstream::kv::Config {
                bucket: m.to.name.clone(),
                history: nats.history.max(1),
                max_age: std::time::Duration::from_millis(m.to.ttl_ms),
                num_replicas: nats.replicas.max(1),
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            };
            let store = jetstream::kv_bucket(nats, config).await?;
            (format!("$KV.{}.{key}", m.to.name), store.stream)
        } else {
            if content.is_empty() {
                return Ok(());
            }
            let config = async_nats::jetstream::stream::Config {
                name: m.to.name.clone(),
                subjects: vec![format!("syncfs.log.{}.>", m.to.name)],
                max_age: std::time::Duration::from_millis(m.to.ttl_ms),
                num_replicas: nats.replicas.max(1),
                storage: async_nats::jetstream::stream::StorageType::File,
                allow_rollup: true,
                duplicate_window: std::time::Duration::from_secs(120),
                ..Default::default()
            };
            let stream = match nats.js.get_stream(&m.to.name).await {
                Ok(s) => s,
                Err(_) => match nats.js.create_stream(config).await {
                    Ok(s) => s,
                    Err(e) => nats.js.get_stream(&m.to.name).await.map_err(|_| anyhow::anyhow!("cannot create the stream: {e}"))?,
                },
            };
            (format!("syncfs.log.{}.{key}", m.to.name), stream)
        };
        let mut expected = 0;
        for _ in 0..4 {
            match nats.publish(subject.clone(), content.clone(), self.headers(), &self.msg_id(m, "in"), Some(expected)).await {
                Ok(_) => {
                    tracing::info!(path = %m.path.display(), to = %m.to.tier, "moved the content into its new tier");
                    return Ok(());
                }
                Err(PublishFailure::WrongLastSequence) => {
                    let last = stream.get_last_raw_message_by_subject(&subject).await?;
                    let op = last.headers.get("KV-Operation").map(|v| v.as_str().to_string());
                    if matches!(op.as_deref(), Some("DEL") | Some("PURGE")) {
                        expected = last.sequence;
                        continue;
                    }
                    if last.payload != content {
                        self.keep(m, "the new tier holds this path already (another node moved it first) with other content");
                    }
                    return Ok(());
                }
                Err(e) => return Err(anyhow::anyhow!("{e:?}")),
            }
        }
        Err(anyhow::anyhow!("the new key did not settle"))
    }

    async fn remove(&self, nats: Option<&Arc<Nats>>, m: &Move) -> anyhow::Result<()> {
        let nats = nats.filter(|n| n.is_connected()).ok_or_else(|| anyhow::anyhow!("NATS is not connected"))?;
        let key = jetstream::key_of(&m.path)?;
        let (subject, stream_name) = if m.from.is(TierKind::NatsKv) {
            (format!("$KV.{}.{key}", m.from.name), format!("KV_{}", m.from.name))
        } else {
            (format!("syncfs.log.{}.{key}", m.from.name), m.from.name.clone())
        };
        let Ok(stream) = nats.js.get_stream(&stream_name).await else {
            return Ok(());
        };
        let Ok(last) = stream.get_last_raw_message_by_subject(&subject).await else {
            return Ok(());
        };
        let deleted = |name: &str, values: &[&str]| last.headers.get(name).is_some_and(|v| values.contains(&v.as_str()));
        if deleted("KV-Operation", &["DEL", "PURGE"]) || deleted("Syncfs-Op", &["delete"]) {
            return Ok(());
        }
        let mut headers = self.headers();
        if m.from.is(TierKind::NatsKv) {
            headers.insert("KV-Operation", "DEL");
        } else {
            headers.insert("Syncfs-Op", "delete");
            headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        }
        nats.publish(subject, Bytes::new(), headers, &self.msg_id(m, "out"), Some(last.sequence))
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        tracing::info!(path = %m.path.display(), from = %m.from.tier, "removed the moved path from its old tier");
        Ok(())
    }
}
