//! Garbage collection of blob objects no path points at.
//!
//! Any node may collect, at any time, and several may at once: every step that could race is
//! a compare-and-swap on a *mark* in the KV bucket `<object store>_gc`, keyed by the object's
//! digest. A collection run:
//!
//! 1. reads every mark (with its revision);
//! 2. then lists every pointer of every blob bucket, from the server;
//! 3. for each object no pointer names: without a mark, creates one (`condemned`); with a
//!    `condemned` mark older than the grace period (`nats.object_store.gc_grace_ms`),
//!    swaps it, against the revision read in step 1, to `deleting`, deletes the object, then
//!    removes the mark. Objects that are named again lose their mark.
//!
//! A writer that points a path at an object (a commit whose content existed already, or a
//! rename) publishes the pointer first and then calls [`protect`]: it reads the object's
//! mark; a `condemned` mark it removes (compare-and-swap), a `deleting` one it waits out, and
//! if the object is gone it uploads it again. The proof that no pointer is left dangling:
//! a collector deletes only after swapping the mark it read *before* listing pointers. If the
//! writer's pointer was published before that listing, the collector saw it and deletes
//! nothing. Otherwise the writer reads the mark after the collector read it: it either removes
//! the `condemned` mark first (the collector's swap then fails), or sees `deleting` or no mark,
//! and then uploads the object again once it is gone.
//!
//! The one timing assumption: a collector that holds a `deleting` mark for more than
//! [`STALE_DELETE`] has died; a writer then finishes its work and uploads again.
//!
//! Chunks that no object describes (an upload that never finished: its writer died, or lost
//! the connection) are collected the same way, marked under `chunks.<nuid>`, and purged once
//! still undescribed after the grace period *and* idle (no chunk added) for at least
//! [`ORPHAN_IDLE`], whatever the grace: an upload in progress adds chunks every few
//! milliseconds. Right before purging, the collector lists the objects again, and an uploader
//! counts its chunks after describing them, so an upload never loses chunks silently.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::object_store::ObjectStore;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{backend, digest_of, parse_pointer, unavailable, Inner};
use crate::tier::TierError;

/// A `deleting` mark older than this belongs to a collector that died.
pub const STALE_DELETE: Duration = Duration::from_secs(60);

/// Chunks no object describes are purged only when none was added for this long (or the grace
/// period, if longer): a live upload adds one every few milliseconds.
pub const ORPHAN_IDLE: Duration = Duration::from_secs(600);

/// The KV bucket of marks for an object store.
pub fn marks_bucket(store: &str) -> String {
    format!("{store}_gc")
}

/// What the last collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// When it ran (RFC 3339).
    pub at: Option<String>,
    /// Objects in the store.
    pub objects: usize,
    /// Objects some path points at.
    pub referenced: usize,
    /// Objects newly condemned.
    pub condemned: usize,
    /// Objects deleted.
    pub deleted: usize,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Chunk subjects of unfinished uploads purged.
    #[serde(default)]
    pub orphans_purged: usize,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    Condemned,
    Deleting,
}

#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    state: State,
    node: String,
}

fn encode(mark: &Mark) -> Bytes {
    Bytes::from(serde_json::to_vec(mark).expect("a mark serializes"))
}

/// A mark as read: its state, revision and age (by the server's clock).
#[derive(Debug, Clone, Copy)]
struct Read {
    state: State,
    rev: u64,
    age: Duration,
}

async fn read_mark(marks: &Store, hex: &str) -> Result<Option<Read>, TierError> {
    let entry = marks.entry(hex).await.map_err(|e| backend("reading a blob mark", e))?;
    Ok(entry.filter(|e| e.operation == Operation::Put).and_then(|e| {
        let mark: Mark = serde_json::from_slice(&e.value).ok()?;
        let age = SystemTime::now().duration_since(SystemTime::from(e.created)).unwrap_or_default();
        Some(Read {
            state: mark.state,
            rev: e.revision,
            age,
        })
    }))
}

fn marks(inner: &Inner) -> Result<Store, TierError> {
    inner.marks.lock().clone().ok_or_else(|| unavailable("the blob marks bucket is not ready"))
}

/// Makes sure the object `rev`, which a pointer just published names, survives collection
/// (see the module docs). `content` is used to upload it again if it is gone.
pub(super) async fn protect(inner: &Inner, store: &ObjectStore, rev: &str, size: u64, content: Option<&Arc<File>>) -> Result<(), TierError> {
    let marks = marks(inner)?;
    let hex = digest_of(rev)?;
    let started = std::time::Instant::now();
    loop {
        match read_mark(&marks, hex).await? {
            None => break,
            Some(Read { state: State::Condemned, rev: r, .. }) => {
                if marks.delete_expect_revision(hex, Some(r)).await.is_ok() {
                    tracing::debug!(digest = %hex, "revived a condemned blob");
                    return Ok(());
                }
                // The mark changed under us (a collector swapped it): read it again.
            }
            Some(Read { state: State::Deleting, rev: r, age }) => {
                if age > STALE_DELETE || started.elapsed() > STALE_DELETE {
                    tracing::warn!(digest = %hex, "a collector left a blob half deleted; finishing its work");
                    let _ = store.delete(rev).await;
                    let _ = marks.delete_expect_revision(hex, Some(r)).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let present = store.info(rev).await.is_ok_and(|i| !i.deleted);
    if !present {
        let Some(content) = content else {
            return Err(TierError::Backend(format!(
                "{rev} was collected while it was being linked, and this node has no copy to upload again"
            )));
        };
        tracing::info!(digest = %hex, "uploading a collected blob again");
        inner.upload(store, rev, size, content, false).await?;
    }
    Ok(())
}

/// Every object some pointer names, read from the server.
async fn referenced(inner: &Inner) -> Result<HashSet<String>, TierError> {
    let mut names = HashSet::new();
    for b in &inner.buckets {
        let store = inner
            .nats
            .js
            .get_key_value(&b.name)
            .await
            .map_err(|e| backend("opening a pointer bucket", e))?;
        let mut keys = store.keys().await.map_err(|e| backend("listing blob pointers", e))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| backend("listing blob pointers", e))?;
            if let Some(value) = store.get(&key).await.map_err(|e| backend("reading a blob pointer", e))? {
                if let Some((rev, _)) = parse_pointer(&value) {
                    names.insert(rev);
                }
            }
        }
    }
    Ok(names)
}

/// One collection (see the module docs).
pub(super) async fn collect(inner: &Inner) -> Result<Report, TierError> {
    if !inner.nats.is_connected() {
        return Err(unavailable("not connected"));
    }
    let marks = marks(inner)?;
    let store = inner.store()?;
    let mut report = Report {
        at: Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        ..Report::default()
    };
    // 1. The marks, before the pointers.
    let mut read = HashMap::new();
    let mut keys = marks.keys().await.map_err(|e| backend("listing blob marks", e))?;
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| backend("listing blob marks", e))?;
        if let Some(mark) = read_mark(&marks, &key).await? {
            read.insert(key, mark);
        }
    }
    // 2. The pointers.
    let named = referenced(inner).await?;
    // 3. The objects.
    let mut objects = store.list().await.map_err(|e| backend("listing blobs", e))?;
    let mut present = HashSet::new();
    let mut candidates = Vec::new();
    let mut described = HashSet::new();
    while let Some(info) = objects.next().await {
        let info = info.map_err(|e| backend("listing blobs", e))?;
        described.insert(info.nuid.clone());
        let Ok(hex) = digest_of(&info.name) else { continue };
        present.insert(hex.to_string());
        report.objects += 1;
        if named.contains(&info.name) {
            report.referenced += 1;
            if let Some(mark) = read.get(hex) {
                let _ = marks.delete_expect_revision(hex, Some(mark.rev)).await;
            }
            continue;
        }
        candidates.push((info.name.clone(), hex.to_string(), info.size as u64));
    }
    for (name, hex, size) in candidates {
        let mark = read.get(&hex).copied();
        let condemn = Mark {
            state: State::Condemned,
            node: inner.node.clone(),
        };
        let deleting = Mark {
            state: State::Deleting,
            node: inner.node.clone(),
        };
        match mark {
            None => {
                if marks.create(&hex, encode(&condemn)).await.is_ok() {
                    report.condemned += 1;
                }
            }
            Some(m) if (m.state == State::Condemned && m.age >= inner.settings.gc_grace)
                || (m.state == State::Deleting && m.age > STALE_DELETE) =>
            {
                let Ok(r) = marks.update(&hex, encode(&deleting), m.rev).await else {
                    continue;
                };
                match store.delete(&name).await {
                    Ok(()) => {
                        report.deleted += 1;
                        report.freed_bytes += size;
                        tracing::info!(object = %name, size, "collected an unreferenced blob");
                    }
                    Err(e) => tracing::warn!(object = %name, error = %e, "cannot delete a blob"),
                }
                let _ = marks.delete_expect_revision(&hex, Some(r)).await;
            }
            Some(_) => {}
        }
    }
    // Chunks no object describes: unfinished uploads.
    let bucket = &inner.settings.bucket;
    let chunk_prefix = format!("$O.{bucket}.C.");
    let stream = inner
        .nats
        .js
        .get_stream(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| backend("opening the object store's stream", e))?;
    let mut subjects = stream
        .info_with_subjects(format!("{chunk_prefix}>"))
        .await
        .map_err(|e| backend("listing blob chunks", e))?;
    let mut undescribed = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.map_err(|e| backend("listing blob chunks", e))?;
        if let Some(nuid) = subject.strip_prefix(&chunk_prefix) {
            if !described.contains(nuid) {
                undescribed.push(nuid.to_string());
            }
        }
    }
    let idle_for = inner.settings.gc_grace.max(ORPHAN_IDLE);
    let mut due = Vec::new();
    for nuid in &undescribed {
        let key = format!("chunks.{nuid}");
        let condemn = Mark {
            state: State::Condemned,
            node: inner.node.clone(),
        };
        match read.get(&key).copied() {
            None => {
                let _ = marks.create(&key, encode(&condemn)).await;
            }
            Some(m) if m.state == State::Condemned && m.age >= inner.settings.gc_grace => {
                let last = stream.get_last_raw_message_by_subject(&format!("{chunk_prefix}{nuid}")).await;
                let idle = last.is_ok_and(|l| {
                    SystemTime::now().duration_since(SystemTime::from(l.time)).unwrap_or_default() >= idle_for
                });
                if idle {
                    due.push((nuid.clone(), key, m));
                }
            }
            Some(_) => {}
        }
    }
    if !due.is_empty() {
        // Described meanwhile (an upload that finished after the listing above)?
        let mut again = store.list().await.map_err(|e| backend("listing blobs", e))?;
        while let Some(info) = again.next().await {
            let info = info.map_err(|e| backend("listing blobs", e))?;
            due.retain(|(nuid, _, _)| *nuid != info.nuid);
        }
    }
    for (nuid, key, m) in due {
        match stream.purge().filter(format!("{chunk_prefix}{nuid}")).await {
            Ok(_) => {
                report.orphans_purged += 1;
                tracing::info!(nuid = %nuid, "purged the chunks of an upload that never finished");
            }
            Err(e) => tracing::warn!(nuid = %nuid, error = %e, "cannot purge orphaned blob chunks"),
        }
        let _ = marks.delete_expect_revision(&key, Some(m.rev)).await;
    }
    // Marks of objects (and chunks) that are gone, or described again, go too.
    for (key, mark) in read {
        let stale = match key.strip_prefix("chunks.") {
            Some(nuid) => !undescribed.iter().any(|u| u == nuid),
            None => !present.contains(&key),
        };
        if stale {
            let _ = marks.delete_expect_revision(&key, Some(mark.rev)).await;
        }
    }
    *inner.gc_report.lock() = report.clone();
    Ok(report)
}

/// Collects every `gc_interval`, for the life of the mount.
pub(super) async fn run(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.settings.gc_interval.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        match collect(&inner).await {
            Ok(r) => tracing::debug!(objects = r.objects, condemned = r.condemned, deleted = r.deleted, "blob collection"),
            Err(e) => {
                tracing::debug!(error = %e, "blob collection skipped");
                inner.gc_report.lock().error = Some(e.to_string());
            }
        }
    }
}
