//! The blob tier: the NATS object store (`tier: object-store`, `consistency:
//! content-addressed`).
//!
//! # Where things are
//!
//! - Content lives in one object store (`nats.object_store.bucket`, default `syncfs_blobs`),
//!   one object per distinct content, named `sha256:<hex>` after its SHA-256: identical
//!   content is stored once, whatever its names.
//! - Names point at content through a KV bucket per policy (`syncfs_ptr_<pattern>_<hash>`):
//!   the key is the path (the KV tier's encoding), the value `sha256:<hex> <size>`. Pointers
//!   are last-write-wins; every node watches them.
//! - On this node, the tree holds a sparse placeholder of each blob's size, tagged with its
//!   revision (`user.syncfs.rev` = `sha256:<hex>`); the content is fetched when a program
//!   first opens the file, verified against its digest, and kept in the on-disk cache
//!   ([`cache`], bounded by `cache.max_bytes`), from which every later read is served.
//!
//! # Writes
//!
//! A program's writes go to a shadow in the spool (never to memory). At close the shadow is
//! hashed, uploaded in chunks unless the object exists already, the pointer is published,
//! and the shadow becomes the cache entry (a new name for the same inode, no copy). Blob
//! writes need NATS: while it is unreachable they fail with `EAGAIN` and nothing changes.
//!
//! # Garbage collection
//!
//! Objects no pointer names are removed by [`gc`], safely against writers on any node that
//! are about to point at them; see that module for the protocol.

mod cache;
pub mod gc;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::object_store::ObjectStore;
use base64::Engine as _;
use async_nats::jetstream::stream::Stream;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

pub use self::cache::hash_file;
use self::cache::{Cache, Lookup};
use super::jetstream::{self, blocking, MsgIds, Tasks};
use super::kv::{bucket_name, key, pattern_root};
use super::{Arrival, Content, RemoteChange, RemoteSink, Revision, Target, Tier, TierError, WriteMode};
use crate::fs::Kind;
use crate::nats::Nats;
use crate::op::Op;
use crate::policy::{PolicyTable, TierKind};

const NODE_HEADER: &str = "Syncfs-Node";
const KV_OPERATION: &str = "KV-Operation";
/// The revision prefix of blob content.
const SHA256: &str = "sha256:";
/// Chunks of an upload in flight at once.
const UPLOAD_WINDOW: usize = 8;

/// Settings of the blob tier (`nats.object_store.*` and `cache.*` in the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSettings {
    /// The object store.
    pub bucket: String,
    /// Replicas of the object store and the pointer buckets.
    pub replicas: usize,
    /// Bytes per chunk of an object.
    pub chunk_bytes: usize,
    /// The most the on-disk cache holds.
    pub cache_max_bytes: u64,
    /// How often this node collects unreferenced objects.
    pub gc_interval: Duration,
    /// How long an object stays unreferenced before it may be removed.
    pub gc_grace: Duration,
}

impl Default for BlobSettings {
    fn default() -> Self {
        BlobSettings {
            bucket: "syncfs_blobs".into(),
            replicas: 1,
            // A default server's max_payload (1 MiB) less room for the protocol: fewer,
            // larger messages move a blob faster both ways (measured, docs/benchmarks.md).
            chunk_bytes: (1 << 20) - (8 << 10),
            cache_max_bytes: 4 << 30,
            gc_interval: Duration::from_secs(3600),
            gc_grace: Duration::from_secs(3600),
        }
    }
}

/// One pointer bucket: the policy it serves.
#[derive(Debug)]
struct Bucket {
    name: String,
    policy: Arc<crate::policy::Policy>,
    root: PathBuf,
    /// `$KV.<name>.`
    prefix: String,
}

/// What this node knows of a blob path: its newest pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The pointer's KV revision.
    seq: u64,
    /// `sha256:<hex>`, or `None` when the newest pointer is a delete.
    rev: Option<String>,
    node: Option<String>,
}

pub(crate) struct Inner {
    nats: Arc<Nats>,
    node: String,
    policies: Arc<PolicyTable>,
    settings: BlobSettings,
    buckets: Vec<Bucket>,
    view: Mutex<HashMap<PathBuf, Entry>>,
    cache: Cache,
    store: Mutex<Option<ObjectStore>>,
    marks: Mutex<Option<async_nats::jetstream::kv::Store>>,
    pointer_streams: Mutex<Vec<Option<Stream>>>,
    sink: OnceLock<Arc<dyn RemoteSink>>,
    synced: watch::Sender<Vec<bool>>,
    tasks: Tasks,
    rt: tokio::runtime::Handle,
    /// Fetches in flight, one per digest, so concurrent opens download once.
    fetching: Mutex<HashMap<String, Fetch>>,
    ids: MsgIds,
    /// What the last collection did, for status.
    pub(crate) gc_report: Mutex<gc::Report>,
    /// Files this mount created that have no pointer yet: the first catch-up removes every
    /// other such file, which a stopped daemon created and no close acknowledged.
    creating: Mutex<std::collections::HashSet<PathBuf>>,
}

/// The object-store tier of a mount.
#[derive(Clone)]
pub struct BlobTier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlobTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobTier").field("buckets", &self.inner.buckets).finish_non_exhaustive()
    }
}

fn unavailable(reason: impl std::fmt::Display) -> TierError {
    TierError::unavailable(TierKind::ObjectStore, reason)
}

fn backend(what: &str, e: impl std::fmt::Display) -> TierError {
    TierError::Backend(format!("{what}: {e}"))
}

/// The hex digest of a `sha256:<hex>` revision. Only 64 lower-case hex digits pass: the
/// digest names a file in the cache, so a pointer another client wrote must not be able to
/// name anything else.
fn digest_of(rev: &str) -> Result<&str, TierError> {
    rev.strip_prefix(SHA256)
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .ok_or_else(|| TierError::Backend(format!("not a blob revision: {rev}")))
}

/// Parses a pointer value, `sha256:<hex> <size>`.
fn parse_pointer(value: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (rev, size) = text.trim().split_once(' ')?;
    digest_of(rev).ok()?;
    Some((rev.to_string(), size.parse().ok()?))
}

/// A fetch in flight: the file it fills and how far it is.
#[derive(Debug, Clone)]
struct Fetch {
    file: Arc<File>,
    arrival: watch::Receiver<Arrival>,
}

impl Fetch {
    /// The content as a reader gets it now, or (`whole`) once it is all there and verified.
    async fn content(self, whole: bool) -> Result<Content, TierError> {
        if !whole {
            return Ok(Content {
                file: self.file,
                arriving: Some(self.arrival),
            });
        }
        let mut rx = self.arrival;
        let done = rx
            .wait_for(|a| a.done.is_some())
            .await
            .map_err(|_| TierError::Backend("the fetch stopped".into()))?
            .done
            .clone();
        match done {
            Some(Ok(())) => Ok(Content { file: self.file, arriving: None }),
            Some(Err(e)) => Err(TierError::Backend(e)),
            None => unreachable!("waited for it"),
        }
    }
}

/// Status figures of the blob tier.
#[derive(Debug, Clone, Default)]
pub struct BlobUsage {
    /// Pointer buckets.
    pub buckets: usize,
    /// Blob paths this node knows.
    pub paths: usize,
    /// Cache entries.
    pub cached: usize,
    /// Bytes in the cache.
    pub cached_bytes: u64,
    /// The last garbage collection.
    pub gc: gc::Report,
}

impl BlobTier {
    /// A tier for every object-store policy of `policies`, caching content in `cache_dir`.
    /// Nothing touches the network until [`Tier::start`].
    pub fn new(
        nats: Arc<Nats>,
        node: &str,
        policies: Arc<PolicyTable>,
        settings: BlobSettings,
        cache_dir: &Path,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<BlobTier> {
        let buckets: Vec<Bucket> = policies
            .reachable()
            .iter()
            .filter(|p| p.tier == TierKind::ObjectStore)
            .map(|p| {
                let readable = bucket_name(&p.pattern);
                let name = format!("syncfs_ptr_{}", readable.trim_start_matches("syncfs_"));
                Bucket {
                    prefix: format!("$KV.{name}."),
                    name,
                    policy: p.clone(),
                    root: pattern_root(&p.pattern),
                }
            })
            .collect();
        let cache = Cache::open(cache_dir, settings.cache_max_bytes)
            .map_err(|e| anyhow::anyhow!("cannot open the blob cache {}: {e}", cache_dir.display()))?;
        let n = buckets.len();
        Ok(BlobTier {
            inner: Arc::new(Inner {
                nats,
                node: node.to_string(),
                policies,
                settings,
                buckets,
                view: Mutex::new(HashMap::new()),
                cache,
                store: Mutex::new(None),
                marks: Mutex::new(None),
                pointer_streams: Mutex::new(vec![None; n]),
                sink: OnceLock::new(),
                synced: watch::channel(vec![false; n]).0,
                tasks: Tasks::default(),
                rt,
                fetching: Mutex::new(HashMap::new()),
                ids: MsgIds::new(node),
                gc_report: Mutex::new(gc::Report::default()),
                creating: Mutex::new(std::collections::HashSet::new()),
            }),
        })
    }

    /// Waits until every pointer bucket has been read (or `timeout` passes).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        jetstream::wait_synced(&self.inner.synced, timeout).await
    }

    /// Figures for `syncfs status`.
    pub fn usage(&self) -> BlobUsage {
        let (cached, cached_bytes) = self.inner.cache.usage();
        BlobUsage {
            buckets: self.inner.buckets.len(),
            paths: self.inner.view.lock().values().filter(|e| e.rev.is_some()).count(),
            cached,
            cached_bytes,
            gc: self.inner.gc_report.lock().clone(),
        }
    }

    /// Runs one garbage collection now (the periodic one runs every `gc_interval`).
    pub async fn collect(&self) -> Result<gc::Report, TierError> {
        gc::collect(&self.inner).await
    }
}

impl Inner {
    fn bucket_of(&self, at: &Target) -> Result<usize, TierError> {
        self.buckets
            .iter()
            .position(|b| b.policy.pattern == at.policy.pattern)
            .ok_or_else(|| TierError::Backend(format!("no pointer bucket for {}", at.policy.pattern)))
    }

    fn store(&self) -> Result<ObjectStore, TierError> {
        self.store.lock().clone().ok_or_else(|| unavailable("the object store is not ready"))
    }

    fn connected(&self) -> Result<(), TierError> {
        if self.nats.is_connected() {
            Ok(())
        } else {
            Err(unavailable("not connected; blob writes are not queued"))
        }
    }

    /// Publishes a pointer (`Some(rev, size)`) or its removal (`None`); returns its revision.
    async fn point(&self, at: &Target, to: Option<(&str, u64)>) -> Result<u64, TierError> {
        let bucket = self.bucket_of(at)?;
        let subject = format!("{}{}", self.buckets[bucket].prefix, jetstream::key_of(&at.path)?);
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, self.node.as_str());
        let payload = match to {
            Some((rev, size)) => Bytes::from(format!("{rev} {size}")),
            None => {
                headers.insert(KV_OPERATION, "DEL");
                Bytes::new()
            }
        };
        let seq = self
            .nats
            .publish(subject, payload, headers, &self.ids.next(), None)
            .await
            .map_err(|e| jetstream::publish_error(TierKind::ObjectStore, "a blob pointer", e))?;
        let mut view = self.view.lock();
        let newer = view.get(&at.path).is_none_or(|e| e.seq < seq);
        if newer {
            let old = view.insert(
                at.path.clone(),
                Entry {
                    seq,
                    rev: to.map(|(r, _)| r.to_string()),
                    node: Some(self.node.clone()),
                },
            );
            self.release(view, old);
        }
        Ok(seq)
    }

    /// Drops from the cache the content `old` named, unless a path of `view` still names it:
    /// content no name on this node points at only fills the disk (every node that needs it
    /// again fetches it from the store).
    fn release(&self, view: parking_lot::MutexGuard<'_, HashMap<PathBuf, Entry>>, old: Option<Entry>) {
        let Some(rev) = old.and_then(|e| e.rev) else { return };
        if view.values().any(|e| e.rev.as_deref() == Some(rev.as_str())) {
            return;
        }
        drop(view);
        if let Ok(hex) = digest_of(&rev) {
            tracing::debug!(digest = %hex, "no path names this blob any more; dropped from the cache");
            self.cache.discard(hex);
        }
    }

    /// Uploads `content` as object `rev` unless the store has it already (`check`).
    ///
    /// This is the object store's own layout (chunks on `$O.<store>.C.<nuid>`, then the
    /// object's description as a rollup on `$O.<store>.M.<name>`), so any NATS client reads
    /// the objects, but with up to [`UPLOAD_WINDOW`] chunks in flight: async-nats's `put`
    /// waits for each chunk's acknowledgement before it sends the next. Chunks are read from
    /// the file one at a time, so memory stays at the window's size whatever the file's.
    async fn upload(&self, store: &ObjectStore, rev: &str, size: u64, content: &File, check: bool) -> Result<(), TierError> {
        let existing = store.info(rev).await.ok();
        if check && existing.as_ref().is_some_and(|i| !i.deleted && i.size as u64 == size) {
            return Ok(());
        }
        let failed = |e: &dyn std::fmt::Display| {
            if self.nats.is_connected() {
                backend("uploading a blob", e)
            } else {
                unavailable(e)
            }
        };
        let bucket = &self.settings.bucket;
        // The store's stream: to count the chunks that landed, and to purge them on failure.
        let stream = self.nats.js.get_stream(format!("OBJ_{bucket}")).await.map_err(|e| failed(&e))?;
        let nuid = self.ids.next().replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let chunks = format!("$O.{bucket}.C.{nuid}");
        // Never more than the server takes in one message.
        let chunk = self.settings.chunk_bytes.min(self.nats.max_payload().saturating_sub(1024)).max(1024);
        let js = &self.nats.js;
        let mut in_flight = std::collections::VecDeque::new();
        let mut offset = 0u64;
        let mut count = 0usize;
        let sent = async {
            while offset < size {
                let n = chunk.min((size - offset) as usize);
                let mut buf = vec![0u8; n];
                // One chunk from the page cache: cheaper inline than a hop to the blocking pool.
                std::os::unix::fs::FileExt::read_exact_at(content, &mut buf, offset)?;
                let ack = js.publish(chunks.clone(), Bytes::from(buf)).await.map_err(|e| failed(&e))?;
                in_flight.push_back(ack);
                if in_flight.len() >= UPLOAD_WINDOW {
                    in_flight.pop_front().expect("not empty").await.map_err(|e| failed(&e))?;
                }
                offset += n as u64;
                count += 1;
            }
            for ack in in_flight.drain(..) {
                ack.await.map_err(|e| failed(&e))?;
            }
            let hex = digest_of(rev)?;
            let digest: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0)).collect();
            let info = async_nats::jetstream::object_store::ObjectInfo {
                name: rev.to_string(),
                description: Some("syncfs blob content".into()),
                metadata: HashMap::new(),
                headers: None,
                options: Some(async_nats::jetstream::object_store::ObjectOptions {
                    link: None,
                    max_chunk_size: Some(chunk),
                }),
                bucket: bucket.clone(),
                nuid: nuid.clone(),
                size: size as usize,
                chunks: count,
                modified: Some(SystemTime::now().into()),
                digest: Some(format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(&digest))),
                deleted: false,
            };
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_ROLLUP, "sub");
            let meta = format!("$O.{bucket}.M.{}", base64::engine::general_purpose::URL_SAFE.encode(rev));
            let payload = Bytes::from(serde_json::to_vec(&info).map_err(|e| backend("describing a blob", e))?);
            js.publish_with_headers(meta, headers, payload)
                .await
                .map_err(|e| failed(&e))?
                .await
                .map_err(|e| failed(&e))?;
            // Described now: count what the store holds of it (a collector that took the
            // chunks for an abandoned upload would otherwise leave a broken object).
            let mut subjects = stream.info_with_subjects(chunks.clone()).await.map_err(|e| failed(&e))?;
            let mut stored = 0;
            while let Some(s) = subjects.next().await {
                stored += s.map_err(|e| failed(&e))?.1;
            }
            if stored != count {
                return Err(TierError::Backend(format!("{rev}: the store holds {stored} of its {count} chunks")));
            }
            Ok::<_, TierError>(())
        }
        .await;
        let purge = |nuid: String| {
            let stream = &stream;
            async move {
                if let Err(e) = stream.purge().filter(format!("$O.{bucket}.C.{nuid}")).await {
                    tracing::debug!(error = %e, "cannot purge a blob's chunks");
                }
            }
        };
        match sent {
            Ok(()) => {
                // The object this one replaced (a deleted one, or one cut short) keeps no chunks.
                if let Some(old) = existing.filter(|i| i.nuid != nuid) {
                    purge(old.nuid).await;
                }
                Ok(())
            }
            Err(e) => {
                purge(nuid).await;
                Err(e)
            }
        }
    }

    /// Commits the complete content of a blob file (see the module docs).
    async fn commit(&self, at: &Target, content: Arc<File>) -> Result<Option<Revision>, TierError> {
        self.connected()?;
        let store = self.store()?;
        let file = content.clone();
        let started = std::time::Instant::now();
        let (hex, size) = blocking(move || Ok((hash_file(&file)?, file.metadata()?.len()))).await?;
        let hashed = started.elapsed();
        let rev = format!("{SHA256}{hex}");
        self.upload(&store, &rev, size, &content, true).await?;
        let uploaded = started.elapsed();
        self.point(at, Some((&rev, size))).await?;
        gc::protect(self, &store, &rev, size, Some(&content)).await?;
        tracing::debug!(path = %at.path.display(), size, ?hashed, ?uploaded, total = ?started.elapsed(), "blob committed");
        if let Err(e) = self.cache.adopt(&hex, &content) {
            tracing::warn!(error = %e, "cannot keep a committed blob in the cache");
        }
        self.creating.lock().remove(&at.path);
        Ok(Some(Revision(rev)))
    }

    /// The content of `rev`: from the cache (verified), or being fetched into it. With
    /// `whole`, only once all of it arrived and was verified.
    async fn content(self: &Arc<Self>, rev: &str, whole: bool) -> Result<Content, TierError> {
        let hex = digest_of(rev)?.to_string();
        loop {
            // A fetch in flight is shared: concurrent opens download once.
            let fetch = self.fetching.lock().get(&hex).cloned();
            if let Some(fetch) = fetch {
                return fetch.content(whole).await;
            }
            match self.cache.lookup(&hex) {
                Lookup::Verified(file) => return Ok(Content { file: Arc::new(file), arriving: None }),
                Lookup::Unchecked(file) => {
                    let file = Arc::new(file);
                    let check = file.clone();
                    let actual = blocking(move || Ok(hash_file(&check)?)).await?;
                    if actual == hex {
                        self.cache.checked(&hex, &file);
                        return Ok(Content { file, arriving: None });
                    }
                    tracing::warn!(digest = %hex, actual = %actual, "a cached blob does not match its digest; fetching it again");
                    self.cache.discard(&hex);
                }
                Lookup::Missing => return self.fetch(rev, &hex).await?.content(whole).await,
            }
        }
    }

    /// Starts fetching `rev` into the cache; returns the fetch (another one, if another open
    /// started it meanwhile).
    async fn fetch(self: &Arc<Self>, rev: &str, hex: &str) -> Result<Fetch, TierError> {
        if !self.nats.is_connected() {
            return Err(unavailable("not connected, and the content is not cached here"));
        }
        let store = self.store()?;
        let object = store.get(rev).await.map_err(|e| backend("fetching a blob", e))?;
        // async-nats hashes what it reads and fails the last read unless it matches the
        // object's recorded SHA-256; that digest must be the one the name says.
        let want: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0)).collect();
        let recorded = format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(&want));
        if object.info().digest.as_deref() != Some(recorded.as_str()) {
            return Err(TierError::Backend(format!(
                "object {rev} records the digest {:?}, not its name's",
                object.info().digest
            )));
        }
        let size = object.info().size as u64;
        if !self.cache.make_room(size) {
            tracing::warn!(digest = %hex, size, "the state disk is short of space for this blob even with the cache emptied");
        }
        let (temp, temp_path) = self.cache.temp()?;
        let (tx, rx) = watch::channel(Arrival { len: 0, size, done: None });
        let fetch = Fetch {
            file: Arc::new(temp),
            arrival: rx,
        };
        {
            let mut fetching = self.fetching.lock();
            if let Some(other) = fetching.get(hex) {
                let _ = std::fs::remove_file(&temp_path);
                return Ok(other.clone());
            }
            fetching.insert(hex.to_string(), fetch.clone());
        }
        let (inner, file, hex) = (self.clone(), fetch.file.clone(), hex.to_string());
        tokio::spawn(async move { inner.pump(object, file, temp_path, hex, tx).await });
        Ok(fetch)
    }

    /// Streams an object into its cache file, telling readers how far it is.
    async fn pump(
        &self,
        mut object: async_nats::jetstream::object_store::Object,
        file: Arc<File>,
        temp_path: PathBuf,
        hex: String,
        tx: watch::Sender<Arrival>,
    ) {
        let started = std::time::Instant::now();
        let size = object.info().size as u64;
        let fetched = async {
            // At least a chunk: a smaller buffer makes async-nats keep the rest of each
            // message aside and copy it again.
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            loop {
                let n = object.read(&mut buf).await.map_err(|e| backend("fetching a blob", e))?;
                if n == 0 {
                    break;
                }
                // Page-cache writes of at most a chunk: cheaper inline than a hop.
                std::os::unix::fs::FileExt::write_all_at(file.as_ref(), &buf[..n], got)?;
                got += n as u64;
                tx.send_modify(|a| a.len = got);
            }
            if got != size {
                return Err(TierError::Backend(format!("got {got} of {size} bytes")));
            }
            // The same inode: readers' open files stay valid.
            self.cache.insert(&hex, &temp_path)?;
            Ok::<_, TierError>(())
        }
        .await;
        match &fetched {
            Ok(()) => tracing::debug!(digest = %hex, size, elapsed = ?started.elapsed(), "blob fetched"),
            Err(e) => {
                tracing::warn!(digest = %hex, error = %e, "fetching a blob failed; nothing was cached");
                let _ = std::fs::remove_file(&temp_path);
            }
        }
        tx.send_modify(|a| a.done = Some(fetched.map_err(|e| e.to_string())));
        self.fetching.lock().remove(&hex);
    }

    fn sink(&self) -> Option<&Arc<dyn RemoteSink>> {
        self.sink.get()
    }
}

impl Tier for BlobTier {
    fn kind(&self) -> TierKind {
        TierKind::ObjectStore
    }

    fn write_mode(&self) -> WriteMode {
        WriteMode::Staged
    }

    fn keeps_content(&self) -> bool {
        true
    }

    fn revision(&self, at: &Target) -> Option<Revision> {
        self.inner.view.lock().get(&at.path).and_then(|e| e.rev.clone()).map(Revision)
    }

    fn create(&self, at: &Target, kind: Kind, _exclusive: bool) -> Op<Option<Revision>, TierError> {
        if kind == Kind::File {
            // Its first commit would fail: refuse the name now rather than leave an empty
            // file only this node has.
            if let Err(e) = self.inner.connected() {
                return Op::err(e);
            }
        }
        if kind == Kind::File {
            self.inner.creating.lock().insert(at.path.clone());
        }
        // The first commit makes the pointer (also for `touch`).
        super::create_lazily(at, kind)
    }

    fn commit(&self, at: &Target, content: Arc<File>, _base: Option<Revision>, _durable: bool) -> Op<Option<Revision>, TierError> {
        let inner = self.inner.clone();
        let at = at.clone();
        // The object and its pointer are acknowledged by JetStream before this returns: a
        // commit is as durable as the store, whether or not the program asked with fsync.
        Op::pending(async move { inner.commit(&at, content).await })
    }

    fn content(&self, _at: &Target, rev: &Revision, whole: bool) -> Op<Content, TierError> {
        let Ok(hex) = digest_of(&rev.0) else {
            return Op::err(TierError::Backend(format!("not a blob revision: {}", rev.0)));
        };
        // The common case (cached and unchanged) is answered without a hop to the runtime.
        if !self.inner.fetching.lock().contains_key(hex) {
            if let Lookup::Verified(file) = self.inner.cache.lookup(hex) {
                return Op::ok(Content { file: Arc::new(file), arriving: None });
            }
        }
        let inner = self.inner.clone();
        let rev = rev.0.clone();
        Op::pending(async move { inner.content(&rev, whole).await })
    }

    fn admit(&self, at: &Target, rev: Option<&Revision>) -> bool {
        let Some(rev) = rev else { return true };
        // Content is identified by its digest: the newest pointer's content may land, and
        // no other (an older commit, or an older remote pointer).
        match self.inner.view.lock().get(&at.path) {
            None => true,
            Some(e) => e.rev.as_deref() == Some(rev.0.as_str()),
        }
    }

    fn remove(&self, at: &Target, kind: Kind) -> Op<(), TierError> {
        if kind == Kind::Dir || self.revision(at).is_none() {
            return Op::ok(());
        }
        let inner = self.inner.clone();
        let at = at.clone();
        Op::pending(async move {
            inner.connected()?;
            inner.point(&at, None).await?;
            Ok(())
        })
    }

    fn rename(&self, from: &Target, to: &Target, kind: Kind, _content: Option<Arc<File>>, _base: Option<Revision>) -> Op<(), TierError> {
        if kind != Kind::File {
            return Op::err(TierError::CrossDevice(format!(
                "{}: directories of object-store paths cannot be renamed atomically",
                from.path.display()
            )));
        }
        let Some(rev) = self.revision(from) else {
            // Never committed (or not heard of): only the local name moves.
            return Op::ok(());
        };
        let inner = self.inner.clone();
        let (from, to) = (from.clone(), to.clone());
        Op::pending(async move {
            inner.connected()?;
            let store = inner.store()?;
            let info = store.info(&rev.0).await.map_err(|e| backend("looking up a blob", e))?;
            let size = info.size as u64;
            inner.point(&to, Some((&rev.0, size))).await?;
            let cached = match inner.cache.lookup(digest_of(&rev.0)?) {
                Lookup::Verified(f) | Lookup::Unchecked(f) => Some(Arc::new(f)),
                Lookup::Missing => None,
            };
            gc::protect(&inner, &store, &rev.0, size, cached.as_ref()).await?;
            inner.point(&from, None).await?;
            Ok(())
        })
    }

    fn supports_hard_links(&self) -> bool {
        false
    }

    fn attribute(&self, at: &Target, name: &str) -> Option<Vec<u8>> {
        let view = self.inner.view.lock();
        let e = view.get(&at.path).filter(|e| e.rev.is_some())?;
        match name {
            "user.syncfs.rev" => e.rev.clone().map(String::into_bytes),
            "user.syncfs.node" => e.node.clone().map(String::into_bytes),
            _ => None,
        }
    }

    fn start(&self, sink: Arc<dyn RemoteSink>) {
        let _ = self.inner.sink.set(sink);
        self.inner.tasks.keep(self.inner.rt.spawn(supervise(self.inner.clone())));
        self.inner.tasks.keep(self.inner.rt.spawn(gc::run(self.inner.clone())));
    }

    fn shutdown(&self) -> Op<(), TierError> {
        let inner = self.inner.clone();
        Op::pending(async move {
            inner.tasks.stop().await;
            Ok(())
        })
    }
}

// ---- other nodes' pointers ------------------------------------------------------------------

/// Runs for the life of the mount: on every connection, prepares the store and buckets and
/// watches every pointer bucket.
async fn supervise(inner: Arc<Inner>) {
    let roots = inner.buckets.iter().map(|b| b.root.clone()).collect();
    jetstream::create_roots(inner.sink().cloned(), roots).await;
    jetstream::on_each_connection(&inner.nats, &inner.tasks, &inner.synced, |generation, state| {
        let inner = inner.clone();
        async move {
            if jetstream::prepared("the NATS object store is", generation, &state, || prepare(&inner)).await.is_none() {
                return;
            }
            futures::future::join_all((0..inner.buckets.len()).map(|b| watch_bucket(inner.clone(), b))).await;
        }
    })
    .await;
}

async fn prepare(inner: &Arc<Inner>) -> anyhow::Result<()> {
    use async_nats::jetstream::{kv, object_store, stream::StorageType};
    inner.nats.check_server().await?;
    let js = &inner.nats.js;
    let store = match js.get_object_store(&inner.settings.bucket).await {
        Ok(s) => s,
        Err(_) => {
            let config = object_store::Config {
                bucket: inner.settings.bucket.clone(),
                description: Some("syncfs: blob content by SHA-256".into()),
                storage: StorageType::File,
                num_replicas: inner.settings.replicas.max(1),
                ..Default::default()
            };
            match js.create_object_store(config).await {
                Ok(s) => s,
                Err(create) => js
                    .get_object_store(&inner.settings.bucket)
                    .await
                    .map_err(|_| anyhow::anyhow!("cannot create the object store {}: {create}", inner.settings.bucket))?,
            }
        }
    };
    *inner.store.lock() = Some(store);
    let config = |bucket: String, description: String| kv::Config {
        bucket,
        description,
        history: 1,
        num_replicas: inner.settings.replicas.max(1),
        storage: StorageType::File,
        ..Default::default()
    };
    let marks = config(gc::marks_bucket(&inner.settings.bucket), "syncfs: blobs condemned by garbage collection".into());
    *inner.marks.lock() = Some(jetstream::kv_bucket(&inner.nats, marks).await?);
    for (i, b) in inner.buckets.iter().enumerate() {
        let pointers = config(b.name.clone(), format!("syncfs: blob paths matching {}", b.policy.pattern));
        inner.pointer_streams.lock()[i] = Some(jetstream::kv_bucket(&inner.nats, pointers).await?.stream);
    }
    Ok(())
}

async fn watch_bucket(inner: Arc<Inner>, bucket: usize) {
    let what = format!("the blob pointer watch of {}", inner.buckets[bucket].name);
    jetstream::restarting(&what, || async {
        let b = &inner.buckets[bucket];
        let stream = inner.pointer_streams.lock()[bucket].clone().ok_or_else(|| anyhow::anyhow!("bucket not ready"))?;
        let watch = Watch { inner: &inner, bucket };
        jetstream::watch_last_values(&inner.nats, &stream, format!("{}>", b.prefix), format!("syncfs watch of {}", b.name), &watch).await
    })
    .await;
}

/// One pointer bucket's watch.
struct Watch<'a> {
    inner: &'a Inner,
    bucket: usize,
}

impl jetstream::LastValues for Watch<'_> {
    fn handle(&self, message: &async_nats::Message, seq: u64, _created: SystemTime) -> Option<PathBuf> {
        handle(self.inner, self.bucket, message, seq)
    }

    fn caught_up(&self, seen: &HashSet<PathBuf>) {
        finish_sync(self.inner, self.bucket, seen);
    }
}

/// Applies one pointer message. Returns the path it concerns.
fn handle(inner: &Inner, bucket: usize, message: &async_nats::Message, seq: u64) -> Option<PathBuf> {
    let b = &inner.buckets[bucket];
    let k = message.subject.as_str().strip_prefix(&b.prefix)?;
    let Some(key::Decoded::File(path)) = key::decode(k) else { return None };
    if inner.policies.resolve(&path).pattern != b.policy.pattern {
        return None;
    }
    let headers = message.headers.as_ref();
    let op = headers.and_then(|h| h.get(KV_OPERATION)).map(|v| v.as_str().to_string());
    let node = headers.and_then(|h| h.get(NODE_HEADER)).map(|v| v.as_str().to_string());
    let pointer = if matches!(op.as_deref(), Some("DEL") | Some("PURGE")) {
        None
    } else {
        match parse_pointer(&message.payload) {
            Some(p) => Some(p),
            None => {
                tracing::warn!(path = %path.display(), "ignoring a blob pointer that is not `sha256:<hex> <size>`");
                return Some(path);
            }
        }
    };
    let fresh = {
        let mut view = inner.view.lock();
        let fresh = view.get(&path).is_none_or(|e| e.seq < seq);
        if fresh {
            let old = view.insert(
                path.clone(),
                Entry {
                    seq,
                    rev: pointer.as_ref().map(|(r, _)| r.clone()),
                    node,
                },
            );
            inner.release(view, old);
        }
        fresh
    };
    // This process's own pointers were installed by the core already.
    if fresh && !inner.ids.is_own(message) {
        if let Some(sink) = inner.sink() {
            let result = match pointer {
                Some((rev, size)) => sink.apply(&path, RemoteChange::Stub { size }, Some(Revision(rev))),
                None => sink.apply(&path, RemoteChange::Delete, None),
            };
            if let Err(e) = result {
                tracing::warn!(path = %path.display(), error = %e, "cannot apply a remote blob pointer");
            }
        }
    }
    Some(path)
}

/// After a watch caught up: removes blob files whose pointer vanished while the node was away.
fn finish_sync(inner: &Inner, bucket: usize, seen: &HashSet<PathBuf>) {
    let b = &inner.buckets[bucket];
    let first = !inner.synced.borrow()[bucket];
    if let Some(sink) = inner.sink() {
        let on_disk = tokio::task::block_in_place(|| sink.files(&b.root));
        for path in on_disk {
            if seen.contains(&path) || inner.policies.resolve(&path).pattern != b.policy.pattern {
                continue;
            }
            // Only files that were committed (their placeholder names content) can have lost
            // their pointer; an untagged file is a local write on its way.
            let known = inner.view.lock().get(&path).cloned();
            if known.is_some_and(|e| e.rev.is_some()) {
                continue;
            }
            if sink.tagged(&path) {
                tracing::debug!(path = %path.display(), "no longer in the pointer bucket; removing");
                let _ = sink.apply(&path, RemoteChange::Delete, None);
            } else if first && !inner.creating.lock().contains(&path) {
                // Not created by this mount and never committed: the daemon stopped between
                // the create and the first close, which therefore never returned success.
                tracing::info!(path = %path.display(), "removing a blob file whose create no close acknowledged (the daemon stopped)");
                let _ = sink.apply(&path, RemoteChange::Delete, None);
            }
        }
    }
    inner.synced.send_modify(|s| s[bucket] = true);
    tracing::info!(bucket = %b.name, paths = seen.len(), "view of the blob pointers is complete");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_name_only_digests() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_pointer(format!("sha256:{hex} 12").as_bytes()), Some((format!("sha256:{hex}"), 12)));
        for bad in [
            format!("sha256:{} 1", "AB".repeat(32)),
            format!("sha256:{}/../../x 1", &hex[..54]),
            format!("sha256:{hex}"),
            format!("sha256:{hex} -1"),
            format!("md5:{hex} 1"),
            "garbage".to_string(),
        ] {
            assert_eq!(parse_pointer(bad.as_bytes()), None, "{bad}");
        }
    }
}
