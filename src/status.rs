//! What `syncfs status` reports. The daemon serves it as the JSON value of the root's
//! `user.syncfs.status` attribute, so the command needs no socket and works wherever the mount
//! point is visible (containers included); `--json` prints it unchanged.
//!
//! The JSON shape is stable: fields are only ever added. `version` changes if one is removed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The status as a file (the same JSON), relative to the sync root.
pub const STATUS_FILE: &str = ".syncfs/status";
/// The name of the root attribute that carries the status.
pub const STATUS_XATTR: &str = "user.syncfs.status";
/// The name of the root attribute that carries the active policy file.
pub const POLICIES_XATTR: &str = "user.syncfs.policies";

/// A mount's status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Format version of this JSON.
    pub version: u32,
    /// This node's id.
    pub node: String,
    /// The daemon's process id.
    pub pid: u32,
    /// The mount point.
    pub mountpoint: String,
    /// The node's state directory.
    pub state_dir: String,
    /// The daemon's log file (empty in the foreground).
    pub log_file: String,
    /// When the mount started (RFC 3339).
    pub started_at: String,
    /// FUSE session details.
    pub fuse: FuseStatus,
    /// NATS connection.
    pub nats: NatsStatus,
    /// Git remote.
    pub git: GitStatus,
    /// Per-tier counters.
    pub tiers: BTreeMap<String, TierStatus>,
    /// Writes accepted but not yet delivered to their tier.
    pub pending_writes: u64,
    /// Conflict files awaiting a human.
    pub conflicts: Vec<String>,
    /// Rules in the active policy table (built-ins included).
    pub policies: usize,
    /// Inodes the kernel references.
    pub inodes: usize,
    /// Open file handles.
    pub open_files: usize,
    /// The append tier.
    #[serde(default)]
    pub streams: StreamsStatus,
    /// The blob tier.
    #[serde(default)]
    pub blobs: BlobsStatus,
    /// Damage found in the offline KV journal, until the operator removes each report.
    #[serde(default)]
    pub journal_damage: Vec<JournalDamage>,
    /// The event feed (`.syncfs/events`).
    #[serde(default)]
    pub events: EventsStatus,
    /// The daemon's log.
    #[serde(default)]
    pub log: LogStatus,
    /// `flock`/`fcntl` locks this mount holds: files, and owners holding them.
    #[serde(default)]
    pub locks_held: (usize, usize),
}

/// The event feed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EventsStatus {
    /// Events written since the mount started.
    pub written: u64,
    /// Events left out (the feed's queue was full, or its disk).
    pub dropped: u64,
}

/// The daemon's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LogStatus {
    /// Warning lines left out by the rate limit (at most 20 a minute from one place).
    pub left_out: u64,
    /// Lines that could not be written (a full disk).
    pub dropped: u64,
}

/// How long commits may wait for the remote before the mount counts as degraded.
pub const UNPUSHED_DEGRADED_SECS: u64 = 300;

/// Damage found in the offline KV journal when it was opened: what was lost, and where the
/// damaged bytes are kept. Also the content of the report file (`kv.log.lost-<time>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JournalDamage {
    /// When it was found (RFC 3339).
    pub found_at: String,
    /// The journal.
    pub journal: String,
    /// The copy of the damaged journal.
    pub copy: String,
    /// The report; removing it acknowledges the damage.
    pub report: String,
    /// Acknowledged writes lost (a lower bound when `at_least`).
    pub lost: u64,
    /// Whether `lost` is a lower bound (damage at the end, or a first-format journal).
    pub at_least: bool,
    /// The lost writes whose key could still be read: `key (path, bucket b)`.
    pub keys: Vec<String>,
    /// Bytes that did not check.
    pub damaged_bytes: u64,
    /// Intact records kept and replayed.
    pub kept: u64,
}

/// The append tier.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamsStatus {
    /// Streams this mount uses.
    pub streams: usize,
    /// Files in them.
    pub files: usize,
}

/// The blob tier.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BlobsStatus {
    /// Pointer buckets this mount uses.
    pub buckets: usize,
    /// Blob paths this node knows.
    pub paths: usize,
    /// Blobs in this node's cache.
    pub cached: usize,
    /// Bytes in this node's cache.
    pub cached_bytes: u64,
    /// The cache's bound (`cache.max_bytes`).
    pub cache_max_bytes: u64,
    /// The last garbage collection on this node.
    pub gc: crate::tier::blob::gc::Report,
}

/// FUSE session details.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FuseStatus {
    /// Whether the kernel serves local files' I/O directly (FUSE passthrough).
    pub passthrough: bool,
    /// Worker threads.
    pub threads: usize,
    /// Whether other users may use the mount.
    pub allow_other: bool,
    /// Read requests the daemon served (passthrough reads never reach it).
    pub read_requests: u64,
    /// Write requests the daemon served (passthrough writes never reach it).
    pub write_requests: u64,
}

/// The NATS connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NatsStatus {
    /// `not configured`, `connected`, `disconnected`.
    pub state: String,
    /// Server URL (no credentials).
    pub url: Option<String>,
    /// Whether syncfs started the server itself (the embedded default).
    pub embedded: bool,
    /// KV buckets this mount uses.
    pub buckets: usize,
    /// KV paths this node knows.
    pub keys: usize,
    /// Strong writes that timed out (`ETIMEDOUT`) whose message has not shown up yet: each is
    /// reconciled when the link returns (it landed, or it is dropped after a while).
    #[serde(default)]
    pub unknown_outcomes: usize,
    /// Claims this mount held and lost (to another writer, or to expiry while away), with
    /// why: their programs must stop believing they hold them.
    #[serde(default)]
    pub lost_claims: Vec<LostClaim>,
}

/// A claim this mount lost while a program held it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LostClaim {
    /// Relative to the sync root.
    pub path: String,
    /// What took it.
    pub reason: String,
}

/// The git remote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GitStatus {
    /// `not configured`, or the remote URL (no credentials).
    pub remote: Option<String>,
    /// Last successful push (RFC 3339).
    pub last_push: Option<String>,
    /// Last successful fetch (RFC 3339).
    pub last_pull: Option<String>,
    /// Commits not yet on the remote.
    pub unpushed: u64,
    /// Durable changes waiting for their commit (the quiet period).
    #[serde(default)]
    pub uncommitted: u64,
    /// This node's branch commit.
    #[serde(default)]
    pub head: Option<String>,
    /// The last error reaching the remote, until an exchange succeeds.
    #[serde(default)]
    pub error: Option<String>,
    /// Paths git refuses, kept out of this node's commits (its files) or tree (the branch's).
    #[serde(default)]
    pub quarantined: Vec<QuarantinedPath>,
    /// Why the branch's policy table is not installed, while it is not a valid table.
    #[serde(default)]
    pub policy_error: Option<String>,
}

/// A path the durable tier keeps out, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuarantinedPath {
    /// Relative to the sync root.
    pub path: String,
    /// Why, and what fixes it.
    pub reason: String,
}

/// Counters of one tier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TierStatus {
    /// Staged writes committed.
    pub commits: u64,
    /// Staged writes refused or failed.
    pub refused: u64,
    /// Seconds spent in commits (refused ones included).
    #[serde(default)]
    pub commit_seconds: f64,
    /// Bytes committed.
    #[serde(default)]
    pub bytes: u64,
}

impl Status {
    /// What makes the mount degraded, if anything (empty: healthy). `syncfs status` exits 1
    /// when there is something.
    pub fn problems(&self, now: std::time::SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        if self.nats.state == "disconnected" {
            out.push("NATS is disconnected (fast, append and blob paths cannot sync)".to_string());
        }
        if self.git.unpushed > 0 {
            let since = self.git.last_push.as_deref().or(Some(self.started_at.as_str()));
            let age = since
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if age >= UNPUSHED_DEGRADED_SECS {
                out.push(format!("{} commits not pushed for {} s", self.git.unpushed, age));
            }
        }
        if let Some(e) = &self.git.error {
            out.push(format!("git remote: {e}"));
        }
        if let Some(e) = &self.git.policy_error {
            out.push(format!("the remote's policy table is not valid: {e}"));
        }
        if !self.git.quarantined.is_empty() {
            out.push(format!("{} paths quarantined by git", self.git.quarantined.len()));
        }
        if !self.conflicts.is_empty() {
            out.push(format!("{} conflict files", self.conflicts.len()));
        }
        if !self.nats.lost_claims.is_empty() {
            out.push(format!("{} claims lost", self.nats.lost_claims.len()));
        }
        if !self.journal_damage.is_empty() {
            out.push("the KV journal was damaged".to_string());
        }
        out
    }

    /// The human-readable form.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let problems = self.problems(std::time::SystemTime::now());
        if problems.is_empty() {
            let _ = writeln!(s, "health:       ok");
        } else {
            let _ = writeln!(s, "health:       degraded: {}", problems.join("; "));
        }
        let _ = writeln!(s, "mount point:  {}", self.mountpoint);
        let _ = writeln!(s, "node:         {}", self.node);
        let _ = writeln!(s, "daemon:       pid {}, up since {}", self.pid, self.started_at);
        let _ = writeln!(s, "state:        {}", self.state_dir);
        if !self.log_file.is_empty() {
            let _ = writeln!(s, "log:          {}", self.log_file);
        }
        let _ = writeln!(
            s,
            "fuse:         {} threads, passthrough {}, allow_other {}; served {} reads, {} writes",
            self.fuse.threads,
            if self.fuse.passthrough { "on" } else { "off" },
            if self.fuse.allow_other { "on" } else { "off" },
            self.fuse.read_requests,
            self.fuse.write_requests
        );
        let nats = match (&self.nats.url, self.nats.embedded) {
            (Some(url), true) => format!(
                "{} (embedded server at {url}; other nodes join with --nats {url}), {} buckets, {} keys",
                self.nats.state, self.nats.buckets, self.nats.keys
            ),
            (Some(url), false) => format!(
                "{} ({url}), {} buckets, {} keys",
                self.nats.state, self.nats.buckets, self.nats.keys
            ),
            (None, _) => self.nats.state.clone(),
        };
        let _ = writeln!(s, "nats:         {nats}");
        let mut git = match &self.git.remote {
            Some(remote) => format!(
                "{remote}, last push {}, last pull {}, {} commits unpushed",
                self.git.last_push.as_deref().unwrap_or("never"),
                self.git.last_pull.as_deref().unwrap_or("never"),
                self.git.unpushed
            ),
            None => "no remote (local history only)".into(),
        };
        if self.git.uncommitted > 0 {
            let _ = write!(git, ", {} changes waiting for their commit", self.git.uncommitted);
        }
        let _ = writeln!(s, "git:          {git}");
        if let Some(e) = &self.git.error {
            let _ = writeln!(s, "git error:    {e}");
        }
        if let Some(e) = &self.git.policy_error {
            let _ = writeln!(s, "policy table: {e}");
        }
        if !self.git.quarantined.is_empty() {
            let _ = writeln!(s, "quarantined:  {} paths git refuses", self.git.quarantined.len());
            for q in &self.git.quarantined {
                let _ = writeln!(s, "  {}: {}", q.path, q.reason);
            }
        }
        if self.streams.streams > 0 {
            let _ = writeln!(s, "streams:      {} streams, {} files", self.streams.streams, self.streams.files);
        }
        if self.blobs.buckets > 0 {
            let _ = writeln!(
                s,
                "blobs:        {} paths, {} cached ({} of {} MiB)",
                self.blobs.paths,
                self.blobs.cached,
                self.blobs.cached_bytes >> 20,
                self.blobs.cache_max_bytes >> 20
            );
            if let Some(at) = &self.blobs.gc.at {
                let _ = writeln!(
                    s,
                    "blob gc:      {at}: {} objects, {} referenced, {} condemned, {} deleted",
                    self.blobs.gc.objects, self.blobs.gc.referenced, self.blobs.gc.condemned, self.blobs.gc.deleted
                );
            }
        }
        for (tier, t) in &self.tiers {
            let _ = writeln!(s, "tier {tier:<13} {} commits, {} refused", t.commits, t.refused);
        }
        for d in &self.journal_damage {
            let _ = writeln!(
                s,
                "JOURNAL DAMAGE: {}: {}{} acknowledged write{} lost, {} kept; copy {}",
                d.found_at,
                if d.at_least { "at least " } else { "" },
                d.lost,
                if d.lost == 1 { "" } else { "s" },
                d.kept,
                d.copy
            );
            for k in &d.keys {
                let _ = writeln!(s, "  lost: {k}");
            }
            let _ = writeln!(s, "  (remove {} to acknowledge)", d.report);
        }
        let _ = writeln!(s, "pending:      {} writes queued", self.pending_writes);
        if self.nats.unknown_outcomes > 0 {
            let _ = writeln!(s, "unknown:      {} writes timed out, outcome not known yet", self.nats.unknown_outcomes);
        }
        for c in &self.nats.lost_claims {
            let _ = writeln!(s, "lost claim:   {}: {}", c.path, c.reason);
        }
        let _ = writeln!(s, "open:         {} files, {} inodes", self.open_files, self.inodes);
        let _ = writeln!(s, "policies:     {} rules", self.policies);
        if self.conflicts.is_empty() {
            let _ = writeln!(s, "conflicts:    none");
        } else {
            let _ = writeln!(s, "conflicts:    {}", self.conflicts.len());
            for c in &self.conflicts {
                let _ = writeln!(s, "  {c}");
            }
        }
        s
    }
}
