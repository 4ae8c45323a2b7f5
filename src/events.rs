//! The event feed: every change this node makes or applies, as JSON lines in the read-only
//! `.syncfs/events` (SPEC "Events"), which `syncfs watch` and `tail -f` follow.
//!
//! inotify never fires on a FUSE mount for another node's change, so programs that react to
//! changes need a feed. The feed is a plain file of the node's tree, appended to by one writer
//! thread: a reader that starts late reads what came before, `tail -f` polls its size (GNU
//! tail polls on FUSE), and nothing here can block a FUSE request or a tier's watch (events
//! are queued; the queue is bounded and counts what it drops). After each batch the kernel's
//! cached attributes of the file are dropped so a poller sees the new size at once.
//!
//! The file is emptied when it passes [`MAX_BYTES`]: `tail -f` says "file truncated" and goes
//! on from the start; `syncfs watch` does the same silently.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The feed's path, relative to the sync root.
pub const EVENTS_FILE: &str = ".syncfs/events";
/// Size past which the feed is emptied and starts again.
pub const MAX_BYTES: u64 = 16 << 20;
/// Events queued for the writer before new ones are dropped (and counted).
const QUEUE: usize = 65_536;

/// One change, as one JSON line of the feed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// When this node saw it (RFC 3339, milliseconds, UTC).
    pub time: String,
    /// The node that made the change: this node for local changes; for another node's
    /// change, the node the tier names (KV), or null where the tier does not say (git,
    /// streams, blobs, in this version).
    pub node: Option<String>,
    /// The path, relative to the sync root.
    pub path: String,
    /// `create`, `write`, `append`, `delete`, `mkdir`, `rmdir`, `symlink`, `rename`.
    pub op: String,
    /// The tier that owns the path.
    pub tier: String,
    /// The path's revision after the change, where the tier has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// `local` (a program on this node) or `remote` (another node's change, applied here).
    pub origin: String,
    /// For a rename: the new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// Where the core reports changes. Cheap to call from any thread: it never blocks.
pub struct Events {
    node: String,
    tx: SyncSender<Event>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("node", &self.node).finish_non_exhaustive()
    }
}

impl Events {
    /// A feed appending to `file` (opened for appending) from a thread of its own; `written`
    /// runs after each batch (it drops the kernel's cached attributes of the file).
    pub fn start(node: String, file: File, written: Box<dyn Fn() + Send>) -> std::io::Result<Events> {
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let count = Arc::new(AtomicU64::new(0));
        let (d, c) = (dropped.clone(), count.clone());
        std::thread::Builder::new()
            .name("syncfs-events".into())
            .spawn(move || write_loop(rx, file, written, d, c))?;
        Ok(Events { node, tx, dropped, written: count })
    }

    /// Reports a change of `path`: this node's, or (`remote`) another's, made by `node` if known.
    #[allow(clippy::too_many_arguments)]
    pub fn report(&self, op: &str, path: &Path, tier: impl std::fmt::Display, rev: Option<&str>, remote: bool, node: Option<&str>, to: Option<&Path>) {
        if !reported(path) {
            return;
        }
        let event = Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            node: if remote { node.map(str::to_string) } else { Some(self.node.clone()) },
            path: path.to_string_lossy().into_owned(),
            op: op.to_string(),
            tier: tier.to_string(),
            rev: rev.map(str::to_string),
            origin: if remote { "remote" } else { "local" }.to_string(),
            to: to.map(|p| p.to_string_lossy().into_owned()),
        };
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events written to the feed, and events dropped (the queue was full).
    pub fn counts(&self) -> (u64, u64) {
        (self.written.load(Ordering::Relaxed), self.dropped.load(Ordering::Relaxed))
    }
}

/// Whether a change of `path` goes into the feed: syncfs's own files do not (the feed itself,
/// the status, the history view).
fn reported(path: &Path) -> bool {
    !(path == Path::new(EVENTS_FILE)
        || path == Path::new(crate::status::STATUS_FILE)
        || path.starts_with(crate::policy::HISTORY_DIR))
}

fn write_loop(rx: Receiver<Event>, mut file: File, written: Box<dyn Fn() + Send>, dropped: Arc<AtomicU64>, count: Arc<AtomicU64>) {
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reported_drops = 0;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(4096));
        let mut text = Vec::new();
        let drops = dropped.load(Ordering::Relaxed);
        if drops > reported_drops {
            tracing::warn!(dropped = drops - reported_drops, "the event feed fell behind; events were left out");
            reported_drops = drops;
        }
        for event in &batch {
            if let Ok(mut line) = serde_json::to_vec(event) {
                line.push(b'\n');
                text.extend_from_slice(&line);
            }
        }
        if size + text.len() as u64 > MAX_BYTES {
            if file.set_len(0).is_ok() {
                size = 0;
            }
        }
        match file.write_all(&text) {
            Ok(()) => {
                size += text.len() as u64;
                count.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // A full state disk: the feed has a gap, which the log says once a batch.
                dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                reported_drops += batch.len() as u64;
                tracing::warn!(error = %e, events = batch.len(), "cannot write the event feed");
                size = file.metadata().map(|m| m.len()).unwrap_or(size);
            }
        }
        written();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_in_order_and_syncfs_own_files_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let events = Events::start("n1".into(), file, Box::new(move || { let _ = tx.send(()); })).unwrap();
        events.report("write", Path::new("a/b.yml"), "git", Some("abc"), false, None, None);
        events.report("write", Path::new(EVENTS_FILE), "local", None, false, None, None);
        events.report("write", Path::new(".syncfs/history/a/x"), "local", None, false, None, None);
        events.report("delete", Path::new("fast/x"), "nats-kv", Some("7"), true, Some("n2"), None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while events.counts().0 < 2 && std::time::Instant::now() < deadline {
            let _ = rx.recv_timeout(std::time::Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Event> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!((lines[0].path.as_str(), lines[0].op.as_str(), lines[0].node.as_deref()), ("a/b.yml", "write", Some("n1")));
        assert_eq!(lines[0].origin, "local");
        assert_eq!((lines[1].node.as_deref(), lines[1].origin.as_str(), lines[1].rev.as_deref()), (Some("n2"), "remote", Some("7")));
    }
}
