//! Fault suites (issue 10): kill -9 of the daemon, nats-server killed, stopped and hung,
//! partitions through a proxy, and a 3-node cluster losing its leaders, each with random
//! operations in flight, recorded with `history::Recorder` and judged after the fault healed.
//!
//! **Modes.** The default run keeps each test within about a minute of wall time on two
//! cores. `SYNCFS_SOAK=1` runs the long variants: ten times the kill points (>= 1,000 in all),
//! longer cuts (a 20 s SIGSTOP, 30 s partitions), more traffic between faults, and a longer
//! claim TTL to match. `FAULTS_SEED=N` replays a run's random choices (each test prints its
//! seed).
//!
//! **Tests.**
//!
//! - [`kill9_of_the_daemon_at_random_points_loses_no_acknowledged_write`] (suite 1): nodes
//!   write every tier (KV lww, cas, claims, appends, blobs, git, local) and are killed with
//!   SIGKILL at random moments (including right after mount, during catch-up), then remounted
//!   on the same state directory. The manifest is the recording: after each remount every key
//!   holds its last acknowledged value (close/fsync returned 0) or the value of an operation
//!   the kill left in doubt after it, never torn or empty bytes nobody acknowledged; each log
//!   holds every acknowledged append once, in order, and nothing else. At the end another node
//!   must hold the same, and every node's KV view must equal the server's.
//! - [`external_nats_server_sigterm_sigkill_and_sigstop_with_traffic_in_flight`],
//!   [`embedded_nats_server_sigstop_sigterm_and_sigkill_with_traffic_in_flight`] (suite 2).
//! - [`half_open_link_with_cas_appends_claims_and_lww_in_flight`],
//!   [`hard_partition_then_late_retransmission_with_traffic_in_flight`] (suite 4, through
//!   `proxy::Proxy`).
//! - [`cluster_losing_meta_and_stream_leaders_during_claim_races_and_lww`] (suite 3).
//!
//! **What the fault tests (suites 2-4) assert**, all checked on the whole recording and each
//! reported with the ops involved (see [`judge`]):
//!
//! 1. errno discipline: an lww `close()` never fails (it queues); a strong operation (cas
//!    write, exclusive create, its delete, an append) fails only with `EAGAIN` (nothing was
//!    sent: it must not land) or `ETIMEDOUT` (outcome unknown: reconciled later), besides
//!    `EEXIST`/`ESTALE` where they mean what they always mean; never `EIO`.
//! 2. strong operations fail within [`STRONG_BOUND`] when the link is dead or the server hung,
//!    and the node reports the connection lost within [`DETECT_BOUND`].
//! 3. nothing refused with `EAGAIN` lands: its unique value is in no server revision (buckets
//!    keep 64 revisions per key, so the server's whole history is read), no node's final view,
//!    no log.
//! 4. each write lands at most once, and one process's writes land in the order it made them
//!    (a queued or retried write keeps its message id; a late original cannot land over a
//!    newer value); every acknowledged write reaches the server.
//! 5. after each fault heals and after the run, every node's view of every key equals the
//!    server's: value and revision (`user.syncfs.rev`), its own recent writes included, and
//!    the journal drained (`pending_writes` 0).
//! 6. the writing node reads its own acknowledged writes (no stale read on the writing node,
//!    `history::check_no_stale_reads` on its own keys), every read returns bytes some write
//!    produced (`check_reads_written`), lww keys converge (`check_lww_converged`), logs have
//!    one order (`check_appends`).
//! 7. claims: exclusive creates are linearizable (`check_linearizable`: one owner); at the end
//!    every claim on the server has a holder (an acknowledged create not released) and every
//!    held claim is on the server with its holder's content; a held ephemeral claim is still
//!    refreshed after the faults (its revision advances within TTL/3) and another node's
//!    `O_EXCL` on it fails with `EEXIST`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::git::{Remote, QUICK};
use crate::harness::{syncfs, wait_for, Mount, Options};
use crate::history::{
    check_appends, check_linearizable, check_lww_converged, check_no_stale_reads, check_reads_written, esc, report, Final, History, Kind, Op, Recorder,
    Violation,
};
use crate::nats::{NatsCluster, NatsServer};
use crate::proxy::Proxy;

// ---------------------------------------------------------------------------------------------
// Settings

/// The long variants (`SYNCFS_SOAK=1`).
fn soak() -> bool {
    std::env::var("SYNCFS_SOAK").is_ok_and(|v| v == "1")
}

/// A strong operation must fail (or succeed) within this while the link is dead (the issue:
/// "fail strong operations within ~2 s", not 15 s). An operation here is up to two system
/// calls that each wait for the server at most `nats.timeout_ms` (2 s): an append's `write`
/// and its `close`, or a `close` behind the same file's earlier commit; one more second for
/// a loaded machine. This guards against hangs; docs/reliability.md reports the measured times.
const STRONG_BOUND: Duration = Duration::from_secs(5);
/// A dead link or a hung server must be noticed within this ("within a few seconds").
const DETECT_BOUND: Duration = Duration::from_secs(5);
/// How long views may take to match the server once a fault healed (reconnect, replay,
/// rebuilt watches).
const HEAL_BOUND: Duration = Duration::from_secs(15);

/// TTL of the ephemeral claims under `fast/eph/`: long enough that no outage of the run lets a
/// refreshed claim expire (refresh every TTL/3, plus the longest outage, stays below it).
fn eph_ttl() -> u64 {
    if soak() {
        75
    } else {
        30
    }
}

/// The TTL of a claim key of [`table`] (ephemeral: refreshed while its mount lives).
fn claim_ttl(key: &str) -> Option<Duration> {
    if key.starts_with("fast/claims/") {
        Some(Duration::from_secs(300))
    } else if key.starts_with("fast/eph/") {
        Some(Duration::from_secs(eph_ttl()))
    } else {
        None
    }
}

/// The fault tests' table: every tier, claims with a long and a short TTL.
fn table() -> String {
    format!(
        r#"
policies:
  - pattern: "fast/claims/**"
    tier: nats-kv
    consistency: cas-create
    ttl: 300
    ephemeral: true
  - pattern: "fast/eph/**"
    tier: nats-kv
    consistency: cas-create
    ttl: {}
    ephemeral: true
  - pattern: "fast/critical/**"
    tier: nats-kv
    consistency: cas
  - pattern: "fast/casual/**"
    tier: nats-kv
    consistency: lww
  - pattern: "fast/messages/**"
    tier: nats-stream
    consistency: append
    purge: true
  - pattern: "blobs/**"
    tier: object-store
    consistency: content-addressed
  - pattern: "durable/**"
    tier: git
    consistency: lww
  - pattern: "local/**"
    tier: local
    consistency: none
"#,
        eph_ttl()
    )
}

/// The KV patterns of [`table`], whose buckets the tests read back from the server.
const KV_PATTERNS: [&str; 4] = ["fast/claims/**", "fast/eph/**", "fast/critical/**", "fast/casual/**"];

/// Buckets keep 64 revisions per key, so the tests see every value that ever landed.
fn config(cluster: bool) -> String {
    let nats = if cluster {
        "nats:\n  kv:\n    history: 64\n    replicas: 3\n  stream:\n    replicas: 3\n"
    } else {
        "nats:\n  kv:\n    history: 64\n"
    };
    format!("{nats}{QUICK}")
}

fn opts(node: &str, nats: Vec<String>, remote: Option<&Remote>, cluster: bool) -> Options {
    Options {
        node: Some(node.into()),
        nats,
        git_remote: remote.map(|r| r.path.display().to_string()),
        policies: Some(table()),
        config: Some(config(cluster)),
        ..Default::default()
    }
}

fn mount(o: &Options) -> Mount {
    Mount::with(o.clone())
}

// ---------------------------------------------------------------------------------------------
// Small tools

/// Random choices, replayable from the printed seed (`FAULTS_SEED`).
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
        eprintln!("{test}: FAULTS_SEED={seed}");
        Rng(seed | 1)
    }

    fn fork(&mut self) -> Rng {
        Rng(self.next() | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn letters(&mut self, n: usize) -> String {
        (0..n).map(|_| (b'a' + (self.next() % 26) as u8) as char).collect()
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// A unique value: the process, a counter, and random letters of random length (short and
/// long, the shapes that tear).
fn value(rng: &mut Rng, process: &str, n: u64) -> Vec<u8> {
    let len = if rng.next() % 2 == 0 { rng.range(0, 12) } else { rng.range(80, 300) } as usize;
    format!("{process}-{n:05}:{}", rng.letters(len)).into_bytes()
}

/// `close(2)` with its result: a synced write's error comes from close, which `drop` ignores.
fn close(f: File) -> std::io::Result<()> {
    // SAFETY: the fd is ours, taken from the File, and closed once.
    if unsafe { libc::close(f.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A whole-file write: open with O_TRUNC, write, (fsync), close.
fn put(path: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    f.write_all(bytes)?;
    if fsync {
        f.sync_all()?;
    }
    close(f)
}

/// An append: open with O_APPEND, write, close.
fn append(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().append(true).create(true).open(path)?;
    f.write_all(bytes)?;
    close(f)
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// An errno's name, for reports.
fn ename(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::EEXIST => "EEXIST",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ESTALE => "ESTALE",
        libc::ENOTCONN => "ENOTCONN",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EFBIG => "EFBIG",
        libc::EINVAL => "EINVAL",
        -1 => "unknown",
        _ => return format!("errno {e}"),
    };
    format!("{name} ({e})")
}

/// Times `f` and records it under an explicit process name.
#[allow(clippy::too_many_arguments)]
fn run<T>(
    rec: &Recorder,
    node: &str,
    process: &str,
    key: &str,
    kind: Kind,
    value: Option<Vec<u8>>,
    f: impl FnOnce() -> std::io::Result<T>,
) -> Result<T, i32> {
    let t0 = Instant::now();
    let out = f().map_err(|e| errno_of(&e));
    let result = out.as_ref().map(|_| ()).map_err(|e| *e);
    rec.record(node, process, key, kind, t0, Instant::now(), value, result);
    out
}

/// A read of `key` on `m`, recorded.
fn read(rec: &Recorder, node: &str, process: &str, m: &Mount, key: &str) -> Result<Vec<u8>, i32> {
    let path = m.path(key);
    let t0 = Instant::now();
    let out = std::fs::read(&path).map_err(|e| errno_of(&e));
    let (value, result) = match &out {
        Ok(v) => (Some(v.clone()), Ok(())),
        Err(e) => (None, Err(*e)),
    };
    rec.record(node, process, key, Kind::Read, t0, Instant::now(), value, result);
    out
}

/// An extended attribute's value.
fn getxattr(path: &Path, name: &str) -> Option<String> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A node's value and revision of `key`, read until two reads around the revision agree.
fn view_of(m: &Mount, node: &str, key: &str) -> Final {
    let path = m.path(key);
    let mut last = None;
    for _ in 0..5 {
        let v1 = std::fs::read(&path).ok();
        let rev = getxattr(&path, "user.syncfs.rev");
        let v2 = std::fs::read(&path).ok();
        let stable = v1 == v2;
        last = Some(Final {
            node: node.into(),
            key: key.into(),
            value: v2,
            rev,
        });
        if stable {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    last.unwrap()
}

/// Every file below `dir` on `m`, as paths relative to the mount.
fn files_below(m: &Mount, dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_string()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(m.path(&d)) else { continue };
        for e in rd.flatten() {
            let rel = format!("{d}/{}", e.file_name().to_string_lossy());
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(rel),
                Ok(_) => out.push(rel),
                Err(_) => {}
            }
        }
    }
    out
}

/// The daemon's pid, from its lock file (no round trip).
fn daemon_pid(m: &Mount) -> Option<i32> {
    std::fs::read_to_string(m.state.join("lock")).ok()?.trim().parse().ok()
}

/// `syncfs status --json`, or `None` when it does not answer within 5 s (a hung daemon).
fn status(m: &Mount) -> Option<serde_json::Value> {
    let mut child = std::process::Command::new(crate::harness::bin())
        .args(["status", &m.mnt.display().to_string(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    if !wait_for(Duration::from_secs(5), || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let out = child.wait_with_output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn nats_state(m: &Mount) -> String {
    status(m).map_or_else(|| "no answer".into(), |s| s["nats"]["state"].as_str().unwrap_or("?").to_string())
}

fn violation(check: &'static str, key: &str, detail: String) -> Violation {
    Violation {
        check,
        key: key.into(),
        detail,
    }
}

/// Counts of ops per (kind, result), for the summary a test prints.
fn summary(h: &History) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for o in &h.ops {
        let r = match o.result {
            Ok(()) => "ok".to_string(),
            Err(e) => ename(e),
        };
        *counts.entry(format!("{:?} {r}", o.kind)).or_default() += 1;
    }
    format!("{} ops: {counts:?}", h.ops.len())
}

/// Fails the test with the report, after printing what was measured.
fn verdict(test: &str, h: &History, vs: &[Violation], started: Instant) {
    eprintln!("{test}: {} in {:.1} s", summary(h), started.elapsed().as_secs_f64());
    if !vs.is_empty() {
        eprintln!("{test}: {}", report(vs, 40));
    }
    assert!(vs.is_empty(), "{test}: {}", report(vs, 40));
}

// ---------------------------------------------------------------------------------------------
// The server's side: every message the KV buckets keep

/// One message of a KV bucket's stream.
#[derive(Debug, Clone)]
struct Msg {
    seq: u64,
    /// `None`: a delete or purge marker.
    value: Option<Vec<u8>>,
    /// `Syncfs-Node`.
    node: Option<String>,
    /// `Nats-Msg-Id`.
    id: Option<String>,
    /// The server's timestamp: a TTL runs from it.
    time: SystemTime,
}

/// Path -> its messages in stream order.
type Msgs = BTreeMap<String, Vec<Msg>>;

/// Every message the [`KV_PATTERNS`] buckets keep, read from the server at `url`.
fn server_msgs(url: &str) -> Result<Msgs, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let work = async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(3))
                .connect(url)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut js = async_nats::jetstream::new(client);
            js.set_timeout(Duration::from_secs(5));
            let mut out: Msgs = BTreeMap::new();
            for pattern in KV_PATTERNS {
                let bucket = syncfs::tier::kv::bucket_name(pattern);
                let mut stream = match js.get_stream(format!("KV_{bucket}")).await {
                    Ok(s) => s,
                    Err(e) if e.to_string().contains("not found") => continue,
                    Err(e) => return Err(format!("stream KV_{bucket}: {e}")),
                };
                let state = stream.info().await.map_err(|e| format!("info: {e}"))?.state.clone();
                if state.messages == 0 {
                    continue;
                }
                let prefix = format!("$KV.{bucket}.");
                for seq in state.first_sequence..=state.last_sequence {
                    let m = match stream.get_raw_message(seq).await {
                        Ok(m) => m,
                        Err(e) if e.to_string().to_lowercase().contains("no message") => continue,
                        Err(e) => return Err(format!("message {seq} of KV_{bucket}: {e}")),
                    };
                    let Some(key) = m.subject.as_str().strip_prefix(&prefix) else { continue };
                    let Some(syncfs::tier::kv::key::Decoded::File(path)) = syncfs::tier::kv::key::decode(key) else {
                        continue;
                    };
                    let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string());
                    let value = match header("KV-Operation").as_deref() {
                        Some("DEL") | Some("PURGE") => None,
                        _ => Some(m.payload.to_vec()),
                    };
                    out.entry(path.display().to_string()).or_default().push(Msg {
                        seq,
                        value,
                        node: header("Syncfs-Node"),
                        id: header("Nats-Msg-Id"),
                        time: SystemTime::UNIX_EPOCH + Duration::from_nanos(m.time.unix_timestamp_nanos().max(0) as u64),
                    });
                }
            }
            Ok(out)
        };
        match tokio::time::timeout(Duration::from_secs(60), work).await {
            Ok(r) => r,
            Err(_) => Err("reading the buckets took over 60 s".into()),
        }
    })
}

/// [`server_msgs`], retried (a cluster may be electing leaders) for up to `within`.
fn server_msgs_retry(urls: &[String], within: Duration) -> Msgs {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        for url in urls {
            match server_msgs(url) {
                Ok(m) => return m,
                Err(e) => last = e,
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("cannot read the buckets back from the server: {last}");
}

/// The key's latest state on the server: `(value, revision)`, `None` when absent.
fn latest(msgs: &Msgs, key: &str) -> Option<(Vec<u8>, u64)> {
    let m = msgs.get(key)?.last()?;
    m.value.clone().map(|v| (v, m.seq))
}

fn show_msgs(msgs: &Msgs, key: &str) -> String {
    let Some(ms) = msgs.get(key) else { return "none".into() };
    let shown: Vec<String> = ms
        .iter()
        .rev()
        .take(6)
        .rev()
        .map(|m| {
            format!(
                "seq {} {} node {} id {}",
                m.seq,
                m.value.as_deref().map_or_else(|| "DEL".into(), esc),
                m.node.as_deref().unwrap_or("?"),
                m.id.as_deref().unwrap_or("?")
            )
        })
        .collect();
    format!("[{}]{}", shown.join("; "), if ms.len() > 6 { format!(" (last 6 of {})", ms.len()) } else { String::new() })
}

fn is_kv(key: &str) -> bool {
    KV_PATTERNS.iter().any(|p| key.starts_with(p.trim_end_matches("**")))
}

fn is_claim(key: &str) -> bool {
    key.starts_with("fast/claims/") || key.starts_with("fast/eph/")
}

fn is_lww(key: &str) -> bool {
    key.starts_with("fast/casual/")
}

fn is_cas(key: &str) -> bool {
    key.starts_with("fast/critical/")
}

fn is_log(key: &str) -> bool {
    key.starts_with("fast/messages/")
}

/// Compares every node's view of every KV key below `prefixes` with the server's, until they
/// agree or `within` passes; returns the disagreements of the last round. A node must hold the
/// server's latest value at the server's revision, and absent keys must be absent.
fn views_match_server(urls: &[String], nodes: &[(&str, &Mount)], prefixes: &[&str], extra: &BTreeSet<String>, within: Duration, phase: &str) -> Vec<Violation> {
    let deadline = Instant::now() + within;
    let started = Instant::now();
    loop {
        let msgs = server_msgs_retry(urls, Duration::from_secs(30));
        let mut keys: BTreeSet<String> = extra.iter().filter(|k| prefixes.iter().any(|p| k.starts_with(p))).cloned().collect();
        keys.extend(msgs.keys().filter(|k| prefixes.iter().any(|p| k.starts_with(p))).cloned());
        for (_, m) in nodes {
            for p in prefixes {
                keys.extend(files_below(m, p.trim_end_matches('/')));
            }
        }
        let mut vs = Vec::new();
        for key in &keys {
            let server = latest(&msgs, key);
            for (name, m) in nodes {
                let f = view_of(m, name, key);
                let rev: Option<u64> = f.rev.as_deref().and_then(|r| r.trim().parse().ok());
                // Reading the buckets back takes seconds: a claim whose TTL ran out since is
                // hidden by the nodes (created + TTL) before the server gets to expire it.
                let expired_since = claim_ttl(key).is_some_and(|ttl| {
                    msgs.get(key).and_then(|ms| ms.last()).is_some_and(|m| m.time + ttl <= SystemTime::now())
                });
                let ok = match &server {
                    Some(_) if expired_since && f.value.is_none() => true,
                    Some((v, seq)) => f.value.as_deref() == Some(v.as_slice()) && rev == Some(*seq),
                    None => f.value.is_none(),
                };
                if ok {
                    continue;
                }
                // What the server held at the node's revision, if it kept it.
                let at_rev = match rev {
                    None => String::new(),
                    Some(r) => match msgs.get(key).and_then(|ms| ms.iter().find(|m| m.seq == r)) {
                        None => format!("; the server has no message of this key at revision {r}"),
                        Some(m) if m.value.as_deref() == f.value.as_deref() => format!("; it was the server's value at revision {r}"),
                        Some(m) => format!(
                            "; at revision {r} the server has {}, not the node's value",
                            m.value.as_deref().map_or_else(|| "a delete".into(), esc)
                        ),
                    },
                };
                vs.push(violation(
                    "view=server",
                    key,
                    format!(
                        "{phase}: {name} shows {} rev {:?}, the server {}{at_rev}; server messages {}",
                        f.value.as_deref().map_or_else(|| "absent".into(), esc),
                        f.rev,
                        server.as_ref().map_or_else(|| "absent".into(), |(v, s)| format!("{} at rev {s}", esc(v))),
                        show_msgs(&msgs, key)
                    ),
                ));
            }
        }
        if vs.is_empty() || Instant::now() >= deadline {
            if vs.is_empty() {
                eprintln!("{phase}: every view matched the server after {:.1} s ({} keys)", started.elapsed().as_secs_f64(), keys.len());
            }
            return vs;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

// ---------------------------------------------------------------------------------------------
// Checks on recordings and server histories

/// The errnos each kind of operation may fail with under a fault (everything else, EIO in
/// particular, is a violation): lww writes queue, strong ones fail with EAGAIN or ETIMEDOUT.
fn errno_allowed(o: &Op) -> bool {
    let Err(e) = o.result else { return true };
    let key = o.key.as_str();
    match o.kind {
        Kind::Read => e == libc::ENOENT,
        _ if is_lww(key) => false,
        Kind::Create if is_claim(key) => matches!(e, libc::EEXIST | libc::EAGAIN | libc::ETIMEDOUT),
        Kind::Write if is_claim(key) || is_cas(key) => matches!(e, libc::EAGAIN | libc::ETIMEDOUT | libc::ESTALE),
        // ESTALE: a claim this mount lost meanwhile (docs/errors.md); `check_claim_holders`
        // judges who holds it.
        Kind::Delete if is_claim(key) => matches!(e, libc::EAGAIN | libc::ETIMEDOUT | libc::ENOENT | libc::ESTALE),
        Kind::Delete if is_cas(key) => matches!(e, libc::EAGAIN | libc::ETIMEDOUT | libc::ENOENT),
        Kind::Append if is_log(key) => matches!(e, libc::EAGAIN | libc::ETIMEDOUT),
        _ => false,
    }
}

fn check_errnos(h: &History) -> Vec<Violation> {
    let mut vs = Vec::new();
    let mut per: BTreeMap<(String, String), Vec<&Op>> = BTreeMap::new();
    for o in h.ops.iter().filter(|o| !errno_allowed(o)) {
        let tier = o.key.split('/').take(2).collect::<Vec<_>>().join("/");
        per.entry((format!("{:?} on {tier}/", o.kind), ename(o.result.unwrap_err()))).or_default().push(o);
    }
    for ((what, e), ops) in per {
        let promise = if what.contains("casual") {
            "an lww close() must succeed (queued) while NATS is unreachable or leaderless"
        } else {
            "strong operations fail only with EAGAIN (not sent) or ETIMEDOUT (outcome unknown)"
        };
        vs.push(violation(
            "errno",
            &ops[0].key,
            format!(
                "{} x {what} failed with {e}: {promise}; first: {}",
                ops.len(),
                ops.iter().take(3).map(|o| h.describe(o)).collect::<Vec<_>>().join("; ")
            ),
        ));
    }
    vs
}

/// Strong operations (cas, claims, appends) that took longer than `bound`.
fn check_latency(h: &History, bound: Duration) -> Vec<Violation> {
    let slow: Vec<&Op> = h
        .ops
        .iter()
        .filter(|o| o.kind != Kind::Read && !is_lww(&o.key) && is_strong(&o.key) && o.ret - o.invoke > bound)
        .collect();
    let max = h.ops.iter().filter(|o| o.kind != Kind::Read && is_strong(&o.key)).map(|o| o.ret - o.invoke).max();
    eprintln!("slowest strong operation: {max:?}");
    if slow.is_empty() {
        return Vec::new();
    }
    let mut by_err: BTreeMap<String, usize> = BTreeMap::new();
    for o in &slow {
        *by_err.entry(o.result.map_or_else(ename, |_| "ok".into())).or_default() += 1;
    }
    vec![violation(
        "latency",
        &slow[0].key,
        format!(
            "{} strong operations took longer than {bound:?} (results {by_err:?}, the slowest {:?}); e.g. {}",
            slow.len(),
            max.unwrap(),
            slow.iter().take(4).map(|o| h.describe(o)).collect::<Vec<_>>().join("; ")
        ),
    )]
}

fn is_strong(key: &str) -> bool {
    is_claim(key) || is_cas(key) || is_log(key)
}

/// Writes refused with EAGAIN did not land: their unique values are in no server revision,
/// no final view, and no read invoked after they returned. `finals`: (node, key, value).
fn check_refused_did_not_land(h: &History, msgs: &Msgs, finals: &[Final], logs: &BTreeMap<String, Vec<(String, Vec<u8>)>>) -> Vec<Violation> {
    let mut vs = Vec::new();
    for o in h.ops.iter().filter(|o| o.result == Err(libc::EAGAIN) && matches!(o.kind, Kind::Write | Kind::Append)) {
        let Some(v) = o.value.as_deref().filter(|v| !v.is_empty()) else { continue };
        if o.kind == Kind::Append {
            for (node, file) in logs.get(&o.key).into_iter().flatten() {
                if file.windows(v.len()).any(|w| w == v) {
                    vs.push(violation("eagain-landed", &o.key, format!("append {} was refused with EAGAIN, but {node}'s log holds it", h.describe(o))));
                }
            }
            continue;
        }
        if let Some(m) = msgs.get(&o.key).and_then(|ms| ms.iter().find(|m| m.value.as_deref() == Some(v))) {
            vs.push(violation(
                "eagain-landed",
                &o.key,
                format!(
                    "write {} was refused with EAGAIN, but landed at revision {} (node {}, id {})",
                    h.describe(o),
                    m.seq,
                    m.node.as_deref().unwrap_or("?"),
                    m.id.as_deref().unwrap_or("?")
                ),
            ));
        }
        for f in finals.iter().filter(|f| f.key == o.key && f.value.as_deref() == Some(v)) {
            vs.push(violation("eagain-landed", &o.key, format!("write {} was refused with EAGAIN, but {} ends with it", h.describe(o), f.node)));
        }
        if let Some(r) = h.ops.iter().find(|r| {
            r.kind == Kind::Read && r.key == o.key && r.invoke > o.ret + Duration::from_millis(200) && r.result.is_ok() && r.value.as_deref() == Some(v)
        }) {
            vs.push(violation(
                "eagain-landed",
                &o.key,
                format!("write {} was refused with EAGAIN, but read {} returned it afterwards", h.describe(o), h.describe(r)),
            ));
        }
    }
    vs
}

/// Per KV key (lww and cas): every write lands at most once; one process's writes land in the
/// order it made them; acknowledged writes reached the server (when the key's history is whole).
fn check_landed(h: &History, msgs: &Msgs) -> Vec<Violation> {
    let mut vs = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in h.ops.iter().filter(|o| o.kind == Kind::Write && (is_lww(&o.key) || is_cas(&o.key))) {
        by_key.entry(&o.key).or_default().push(o);
    }
    for (key, writes) in by_key {
        let ms = msgs.get(key).map(Vec::as_slice).unwrap_or_default();
        let whole = ms.len() < 64;
        let seqs = |o: &Op| -> Vec<u64> { ms.iter().filter(|m| m.value.as_deref() == o.value.as_deref()).map(|m| m.seq).collect() };
        for w in &writes {
            let at = seqs(w);
            if at.len() > 1 {
                vs.push(violation(
                    "landed-once",
                    key,
                    format!("write {} landed {} times, at revisions {at:?}: {}", h.describe(w), at.len(), show_msgs(msgs, key)),
                ));
            }
            if w.result.is_ok() && at.is_empty() && whole {
                vs.push(violation(
                    "acked-landed",
                    key,
                    format!("acknowledged write {} never reached the server: {}", h.describe(w), show_msgs(msgs, key)),
                ));
            }
        }
        // One process's writes, in order.
        let mut by_proc: BTreeMap<(&str, &str), Vec<&Op>> = BTreeMap::new();
        for w in &writes {
            by_proc.entry((w.node.as_str(), w.process.as_str())).or_default().push(w);
        }
        for ws in by_proc.values() {
            for (i, w1) in ws.iter().enumerate() {
                let Some(&p1) = seqs(w1).first() else { continue };
                if let Some(w2) = ws[i + 1..].iter().find(|w2| seqs(w2).first().is_some_and(|&p2| p2 < p1)) {
                    vs.push(violation(
                        "landed-order",
                        key,
                        format!(
                            "write {} landed at revision {p1}, after the same process's later write {} (revision {}): an old write landed over a newer one; {}",
                            h.describe(w1),
                            h.describe(w2),
                            seqs(w2)[0],
                            show_msgs(msgs, key)
                        ),
                    ));
                    break;
                }
            }
        }
    }
    vs
}

/// Claims: every claim on the server has a holder, every held claim is on the server with its
/// holder's content. The holder of a key is the creator of its last acknowledged create, unless
/// an acknowledged delete followed; a create or delete in doubt after that may go either way
/// only while its node reconciles, so at the end an in-doubt create must not have left a claim
/// nobody holds.
fn check_claim_holders(h: &History, msgs: &Msgs, prefix: &str) -> Vec<Violation> {
    let mut vs = Vec::new();
    let mut keys: BTreeSet<&str> = h.ops.iter().filter(|o| o.key.starts_with(prefix)).map(|o| o.key.as_str()).collect();
    keys.extend(msgs.keys().filter(|k| k.starts_with(prefix)).map(String::as_str));
    for key in keys {
        let ops: Vec<&Op> = h.ops.iter().filter(|o| o.key == key && o.kind != Kind::Read).collect();
        let mut events: Vec<&Op> = ops
            .iter()
            .copied()
            .filter(|o| o.result.is_ok() && matches!(o.kind, Kind::Create | Kind::Delete))
            .collect();
        events.sort_by_key(|o| o.ret);
        let holder = events.last().filter(|o| o.kind == Kind::Create).copied();
        let after = holder.map_or(events.last().map(|o| o.ret), |c| Some(c.ret));
        let doubtful_delete = ops.iter().any(|o| {
            o.kind == Kind::Delete && o.result.is_err() && o.result != Err(libc::EAGAIN) && holder.is_some_and(|c| o.process == c.process && o.invoke > c.invoke)
        });
        let server = latest(msgs, key);
        match (holder, &server) {
            (Some(c), Some((v, _))) => {
                let contents: Vec<&[u8]> = ops
                    .iter()
                    .filter(|o| o.process == c.process && o.node == c.node && o.invoke >= c.invoke && matches!(o.kind, Kind::Create | Kind::Write) && o.result != Err(libc::EAGAIN))
                    .map(|o| o.value.as_deref().unwrap_or_default())
                    .collect();
                if !contents.contains(&v.as_slice()) {
                    vs.push(violation(
                        "claim-holder",
                        key,
                        format!("held by {} (create {}), but the server holds {}: {}", c.node, h.describe(c), esc(v), show_msgs(msgs, key)),
                    ));
                }
            }
            (Some(c), None) if !doubtful_delete => vs.push(violation(
                "claim-lost",
                key,
                format!(
                    "create {} succeeded and was never released, but the claim is gone from the server (lost while its program held it): {}",
                    h.describe(c),
                    show_msgs(msgs, key)
                ),
            )),
            (None, Some((v, seq))) => {
                let doubt: Vec<String> = ops
                    .iter()
                    .filter(|o| o.kind == Kind::Create && o.result.is_err() && o.result != Err(libc::EEXIST) && after.is_none_or(|t| o.invoke > t))
                    .map(|o| h.describe(o))
                    .collect();
                let node = msgs.get(key).and_then(|ms| ms.last()).and_then(|m| m.node.clone()).unwrap_or_default();
                // A create that timed out and landed is its node's claim (docs/SEMANTICS.md:
                // the node keeps it, `user.syncfs.node` names it): held, by a node, not lost.
                let landed_in_doubt = ops.iter().any(|o| {
                    o.kind == Kind::Create && o.result == Err(libc::ETIMEDOUT) && o.node == node && after.is_none_or(|t| o.invoke > t)
                });
                // Events that overlap have no order by their returns: a create that succeeded
                // while another process's delete was in flight holds the key after it, if that
                // process wrote the value and deleted nothing since.
                let held_by_overlap = ops.iter().any(|c| {
                    c.kind == Kind::Create
                        && c.result.is_ok()
                        && !ops.iter().any(|d| d.kind == Kind::Delete && d.process == c.process && d.invoke > c.invoke && d.result != Err(libc::EAGAIN))
                        && ops.iter().any(|w| w.process == c.process && w.invoke >= c.invoke && w.value.as_deref() == Some(v.as_slice()))
                });
                if landed_in_doubt || held_by_overlap {
                    continue;
                }
                vs.push(violation(
                    "claim-no-holder",
                    key,
                    format!(
                        "the server holds {} at revision {seq} (node {node}), but no program holds this claim; creates that failed: [{}]; last acknowledged: {}",
                        esc(v),
                        doubt.join("; "),
                        events.last().map_or_else(|| "none".into(), |o| h.describe(o))
                    ),
                ));
            }
            _ => {}
        }
    }
    vs
}

/// Exclusive creates, writes and deletes of claims are linearizable (one owner at a time).
/// Reads and creates refused with EEXIST are left out: a partitioned node's cache is stale by design.
fn check_one_owner(h: &History) -> Vec<Violation> {
    let sub = History {
        t0: h.t0,
        // A create refused with EEXIST changed nothing: it observed a name, and a partitioned
        // node's kernel answers it from its own (stale) dentries, like a read.
        ops: h
            .ops
            .iter()
            .filter(|o| is_claim(&o.key) && o.kind != Kind::Read && !(o.kind == Kind::Create && o.result == Err(libc::EEXIST)))
            .cloned()
            .collect(),
    };
    check_linearizable(&sub, Duration::ZERO)
}

/// The writing node reads its own acknowledged writes: no stale read on `node` of keys only
/// it writes (`own`).
fn check_own_reads(h: &History, node: &str, own: impl Fn(&str) -> bool) -> Vec<Violation> {
    let sub = History {
        t0: h.t0,
        ops: h.ops.iter().filter(|o| o.node == node && own(&o.key)).cloned().collect(),
    };
    check_no_stale_reads(&sub, &BTreeMap::new(), Duration::from_millis(50))
        .into_iter()
        .map(|mut v| {
            v.check = "own-read";
            v.detail = format!("the writing node does not show its own write: {}", v.detail);
            v
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The traffic of the fault tests

/// Shared by the driver threads: the recording, a stop and a pause switch, and what the claim
/// threads hold.
struct Traffic {
    rec: Arc<Recorder>,
    stop: AtomicBool,
    pause: AtomicBool,
    inflight: AtomicUsize,
    /// The claim number A's claimer is at (B's racer aims around it).
    claim_at: AtomicU64,
    /// Claims A's claimer holds now (created, content written, not released).
    held: Mutex<Vec<String>>,
    /// Name of the prefix of this test's keys.
    dir: String,
}

/// What a fault test's traffic includes.
#[derive(Clone, Copy)]
struct Mix {
    /// Appends from both nodes to one log.
    appends: bool,
    /// cas writes by A.
    cas: bool,
}

impl Traffic {
    fn new(dir: &str) -> Arc<Traffic> {
        Arc::new(Traffic {
            rec: Arc::new(Recorder::new()),
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            claim_at: AtomicU64::new(0),
            held: Mutex::new(Vec::new()),
            dir: dir.into(),
        })
    }

    fn own(&self, i: usize) -> String {
        format!("fast/casual/{}/own{i:02}", self.dir)
    }

    fn shared(&self, i: usize) -> String {
        format!("fast/casual/{}/sh{i:02}", self.dir)
    }

    fn cas(&self, i: usize) -> String {
        format!("fast/critical/{}/c{i:02}", self.dir)
    }

    fn claim(&self, n: u64) -> String {
        format!("fast/eph/{}/k{n:04}", self.dir)
    }

    fn log(&self) -> String {
        format!("fast/messages/{}/log.log", self.dir)
    }

    /// Runs `op` unless paused or stopped; returns false when stopped.
    fn step(&self, op: impl FnOnce()) -> bool {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            self.inflight.fetch_add(1, Ordering::SeqCst);
            if !self.pause.load(Ordering::SeqCst) {
                break;
            }
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
        }
        op();
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        true
    }

    /// Pauses the writers and waits for every operation in flight to return.
    fn quiesce(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let ok = wait_for(Duration::from_secs(40), || self.inflight.load(Ordering::SeqCst) == 0);
        assert!(ok, "operations still in flight 40 s after the pause: the mount hangs");
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

const OWN: usize = 24;
const SHARED: usize = 8;
const CAS: usize = 16;

/// Starts the traffic threads in `s`: on A (the node the fault hits) lww writes to its own
/// keys and to keys B writes too, cas writes, claims (create, write content, hold, release),
/// appends and reads; on B lww writes to the shared keys, a claim racer aiming at A's claims,
/// appends and reads.
fn start_traffic<'s>(s: &'s std::thread::Scope<'s, '_>, t: &'s Arc<Traffic>, a: &'s Mount, b: &'s Mount, rng: &mut Rng, mix: Mix) {
    let rec = &t.rec;
    // The traffic's directories, on both nodes (an empty KV directory is a node's own).
    for d in ["fast/casual", "fast/critical", "fast/eph", "fast/messages"] {
        for m in [a, b] {
            std::fs::create_dir_all(m.path(&format!("{d}/{}", t.dir))).unwrap();
        }
    }
    // A: lww on its own keys and the shared ones.
    {
        let mut r = rng.fork();
        s.spawn(move || {
            let mut n = 0;
            while t.step(|| {
                n += 1;
                let key = if r.next() % 4 == 0 { t.shared(r.range(0, SHARED as u64 - 1) as usize) } else { t.own(r.range(0, OWN as u64 - 1) as usize) };
                let v = value(&mut r, "a-lww", n);
                let _ = run(rec, "a", "a-lww", &key, Kind::Write, Some(v.clone()), || put(&a.path(&key), &v, false));
            }) {
                std::thread::sleep(r.ms(20, 60));
            }
        });
    }
    // B: lww on the shared keys.
    {
        let mut r = rng.fork();
        s.spawn(move || {
            let mut n = 0;
            while t.step(|| {
                n += 1;
                let key = t.shared(r.range(0, SHARED as u64 - 1) as usize);
                let v = value(&mut r, "b-lww", n);
                let _ = run(rec, "b", "b-lww", &key, Kind::Write, Some(v.clone()), || put(&b.path(&key), &v, false));
            }) {
                std::thread::sleep(r.ms(60, 150));
            }
        });
    }
    if mix.cas {
        let mut r = rng.fork();
        s.spawn(move || {
            let mut n = 0;
            while t.step(|| {
                n += 1;
                let key = t.cas(r.range(0, CAS as u64 - 1) as usize);
                let v = value(&mut r, "a-cas", n);
                let _ = run(rec, "a", "a-cas", &key, Kind::Write, Some(v.clone()), || put(&a.path(&key), &v, false));
            }) {
                std::thread::sleep(r.ms(30, 90));
            }
        });
    }
    // A's claimer: a new claim every so often; holds up to three, releases the oldest.
    {
        let mut r = rng.fork();
        s.spawn(move || {
            let mut n = 0u64;
            while t.step(|| {
                n += 1;
                t.claim_at.store(n, Ordering::SeqCst);
                let key = t.claim(n);
                let path = a.path(&key);
                let f = run(rec, "a", "a-claim", &key, Kind::Create, Some(Vec::new()), || OpenOptions::new().write(true).create_new(true).open(&path));
                if let Ok(mut f) = f {
                    let v = format!("held by a-claim #{n}\n").into_bytes();
                    let ok = run(rec, "a", "a-claim", &key, Kind::Write, Some(v.clone()), || {
                        f.write_all(&v)?;
                        close(f)
                    });
                    if ok.is_ok() {
                        t.held.lock().unwrap().push(key.clone());
                    }
                }
                let oldest = {
                    let mut held = t.held.lock().unwrap();
                    (held.len() > 3).then(|| held.remove(0))
                };
                if let Some(old) = oldest {
                    let r = run(rec, "a", "a-claim", &old, Kind::Delete, None, || std::fs::remove_file(a.path(&old)));
                    if r.is_err() && r != Err(libc::ENOENT) {
                        // Still held as far as anyone knows: keep it.
                        t.held.lock().unwrap().insert(0, old);
                    }
                }
            }) {
                std::thread::sleep(r.ms(80, 200));
            }
        });
    }
    // B's racer: tries A's current and next claims; a win is held a moment and released.
    {
        let mut r = rng.fork();
        s.spawn(move || {
            while t.step(|| {
                let n = t.claim_at.load(Ordering::SeqCst) + r.range(0, 2);
                let key = t.claim(n);
                let path = b.path(&key);
                let f = run(rec, "b", "b-racer", &key, Kind::Create, Some(Vec::new()), || OpenOptions::new().write(true).create_new(true).open(&path));
                if let Ok(mut f) = f {
                    let v = format!("held by b-racer for #{n}\n").into_bytes();
                    let _ = run(rec, "b", "b-racer", &key, Kind::Write, Some(v.clone()), || {
                        f.write_all(&v)?;
                        close(f)
                    });
                    std::thread::sleep(r.ms(100, 600));
                    let _ = run(rec, "b", "b-racer", &key, Kind::Delete, None, || std::fs::remove_file(&path));
                }
            }) {
                std::thread::sleep(r.ms(100, 300));
            }
        });
    }
    if mix.appends {
        for (name, m) in [("a", a), ("b", b)] {
            let mut r = rng.fork();
            s.spawn(move || {
                let process = format!("{name}-append");
                let key = t.log();
                let mut n = 0;
                while t.step(|| {
                    n += 1;
                    let mut v = value(&mut r, &process, n);
                    v.truncate(120);
                    v.push(b'\n');
                    let _ = run(rec, name, &process, &key, Kind::Append, Some(v.clone()), || append(&m.path(&key), &v));
                }) {
                    std::thread::sleep(r.ms(40, 120));
                }
            });
        }
    }
    // Readers on both nodes.
    for (name, m) in [("a", a), ("b", b)] {
        let mut r = rng.fork();
        s.spawn(move || {
            let process = format!("{name}-reader");
            while t.step(|| {
                let key = match r.next() % 5 {
                    0 => t.shared(r.range(0, SHARED as u64 - 1) as usize),
                    1 if mix.cas => t.cas(r.range(0, CAS as u64 - 1) as usize),
                    2 => t.claim(t.claim_at.load(Ordering::SeqCst).saturating_sub(r.range(0, 3))),
                    _ => t.own(r.range(0, OWN as u64 - 1) as usize),
                };
                let _ = read(rec, name, &process, m, &key);
            }) {
                std::thread::sleep(r.ms(5, 25));
            }
        });
    }
}

/// Everything after the traffic stopped and the last fault healed: settle, then every check.
/// `urls`: where to read the buckets. Returns the violations.
fn judge(test: &str, t: &Traffic, a: &Mount, b: &Mount, urls: &[String], strong_bound: Option<Duration>) -> Vec<Violation> {
    let rec = &t.rec;
    let mut vs = Vec::new();
    let nodes = [("a", a), ("b", b)];
    let connected = wait_for(Duration::from_secs(20), || nats_state(a) == "connected" && nats_state(b) == "connected");
    if !connected {
        vs.push(violation("reconnect", "-", format!("20 s after the last fault healed: a is {}, b is {}", nats_state(a), nats_state(b))));
    }
    let prefixes = [
        format!("fast/casual/{}/", t.dir),
        format!("fast/critical/{}/", t.dir),
        format!("fast/eph/{}/", t.dir),
    ];
    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    let keys: BTreeSet<String> = rec.history().ops.iter().filter(|o| is_kv(&o.key)).map(|o| o.key.clone()).collect();
    vs.extend(views_match_server(urls, &nodes, &prefixes, &keys, HEAL_BOUND, &format!("{test}: final")));
    let drained = wait_for(Duration::from_secs(10), || status(a).is_some_and(|s| s["pending_writes"] == 0));
    if !drained {
        vs.push(violation(
            "journal-drained",
            "-",
            format!("a still has pending_writes = {} after the link healed", status(a).map_or_else(|| "?".into(), |s| s["pending_writes"].to_string())),
        ));
    }
    // Held claims are still refreshed, and nobody else can take them.
    let held: Vec<String> = t.held.lock().unwrap().clone();
    let msgs = server_msgs_retry(urls, Duration::from_secs(30));
    let revs: HashMap<String, Option<u64>> = held.iter().map(|k| (k.clone(), latest(&msgs, k).map(|(_, s)| s))).collect();
    let refresh = Duration::from_secs(eph_ttl() / 3 + 6);
    let refreshed = |msgs: &Msgs, k: &str| match (revs[k], latest(msgs, k)) {
        (Some(r0), Some((_, r1))) => r1 > r0,
        _ => false,
    };
    let deadline = Instant::now() + refresh;
    let mut msgs = msgs;
    while Instant::now() < deadline && !held.iter().all(|k| refreshed(&msgs, k)) {
        std::thread::sleep(Duration::from_millis(1000));
        msgs = server_msgs_retry(urls, Duration::from_secs(30));
    }
    for k in &held {
        if !refreshed(&msgs, k) {
            vs.push(violation(
                "claim-keepalive",
                k,
                format!(
                    "a holds this claim (created, written, never released), but it was not refreshed within {refresh:?} after the faults (left the keep-alive set?): {}",
                    show_msgs(&msgs, k)
                ),
            ));
        }
        let path = b.path(k);
        if let Ok(f) = run(rec, "b", "b-late-taker", k, Kind::Create, Some(Vec::new()), || OpenOptions::new().write(true).create_new(true).open(&path)) {
            drop(f);
            vs.push(violation("claim-two-owners", k, format!("b created {k} with O_EXCL while a's program still holds it")));
        }
    }
    // Final reads on both nodes, for the read checks.
    for key in &keys {
        for (name, m) in nodes {
            let _ = read(rec, name, &format!("{name}-final"), m, key);
        }
    }
    let h = rec.history();
    let msgs = server_msgs_retry(urls, Duration::from_secs(30));
    let finals: Vec<Final> = keys
        .iter()
        .filter(|k| is_lww(k) || is_cas(k))
        .flat_map(|k| nodes.iter().map(move |(n, m)| view_of(m, n, k)))
        .collect();
    let log = t.log();
    let logs: Vec<(String, Vec<u8>)> = nodes.iter().map(|(n, m)| (n.to_string(), std::fs::read(m.path(&log)).unwrap_or_default())).collect();
    let logs_by_key = BTreeMap::from([(log.clone(), logs.clone())]);
    vs.extend(check_errnos(&h));
    if let Some(bound) = strong_bound {
        vs.extend(check_latency(&h, bound));
    }
    vs.extend(check_refused_did_not_land(&h, &msgs, &finals, &logs_by_key));
    vs.extend(check_landed(&h, &msgs));
    vs.extend(check_claim_holders(&h, &msgs, &format!("fast/eph/{}/", t.dir)));
    vs.extend(check_one_owner(&h));
    vs.extend(check_own_reads(&h, "a", |k| k.contains("/own") || is_cas(k)));
    vs.extend(check_reads_written(&h, &BTreeMap::new()));
    vs.extend(check_lww_converged(&h, &BTreeMap::new(), &finals));
    if h.ops.iter().any(|o| o.key == log) {
        vs.extend(check_appends(&h, &log, &logs));
    }
    // The run must have exercised the faults: some strong operations failed, some succeeded.
    let failed_strong = h.ops.iter().filter(|o| is_strong(&o.key) && o.kind != Kind::Read && o.result.is_err() && o.result != Err(libc::EEXIST)).count();
    let ok_writes = h.ops.iter().filter(|o| o.kind == Kind::Write && o.result.is_ok()).count();
    eprintln!("{test}: {failed_strong} strong operations failed under the faults, {ok_writes} writes acknowledged");
    assert!(ok_writes > 100, "{test}: too little traffic to judge: {}", summary(&h));
    vs
}

/// Runs traffic for `d` (while the fault lasts or after it healed).
fn traffic_for(d: Duration) {
    std::thread::sleep(d);
}

/// After a fault healed: waits until `m` is connected again, pauses the traffic, and compares
/// both nodes' views with the server (the view after a reconnect equals the server's).
fn check_after_heal(phase: &str, t: &Traffic, a: &Mount, b: &Mount, urls: &[String], vs: &Mutex<Vec<Violation>>) {
    let t0 = Instant::now();
    let up = wait_for(Duration::from_secs(20), || nats_state(a) == "connected");
    eprintln!("{phase}: a connected again after {:.1} s ({up})", t0.elapsed().as_secs_f64());
    if !up {
        vs.lock().unwrap().push(violation("reconnect", "-", format!("{phase}: a is {} 20 s after the heal", nats_state(a))));
    }
    // Let the reconnect's catch-up and the queue run under traffic, then compare at rest.
    traffic_for(Duration::from_secs(2));
    t.quiesce();
    let prefixes = [
        format!("fast/casual/{}/", t.dir),
        format!("fast/critical/{}/", t.dir),
        format!("fast/eph/{}/", t.dir),
    ];
    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    let keys: BTreeSet<String> = t.rec.history().ops.iter().filter(|o| is_kv(&o.key)).map(|o| o.key.clone()).collect();
    let found = views_match_server(urls, &[("a", a), ("b", b)], &prefixes, &keys, Duration::from_secs(8), phase);
    vs.lock().unwrap().extend(found);
    t.resume();
}

/// Waits until `m` reports the connection lost; records a violation if that takes longer than
/// [`DETECT_BOUND`]. Returns how long it took.
fn check_detected(phase: &str, m: &Mount, since: Instant, vs: &Mutex<Vec<Violation>>) {
    let seen = wait_for(DETECT_BOUND + Duration::from_secs(5), || nats_state(m) != "connected");
    let took = since.elapsed();
    eprintln!("{phase}: a reported the connection lost after {:.1} s ({seen})", took.as_secs_f64());
    if !seen || took > DETECT_BOUND {
        vs.lock().unwrap().push(violation(
            "detect",
            "-",
            format!(
                "{phase}: a still said \"{}\" {:.1} s into the fault (a dead link or hung server must be noticed within {DETECT_BOUND:?})",
                nats_state(m),
                took.as_secs_f64()
            ),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Suite 2: nats-server killed, terminated, stopped

/// Suite 2, external server: SIGTERM (restart after 1 s), SIGKILL (restart after 1 s), then
/// SIGSTOP for 8 s (20 s with `SYNCFS_SOAK`) and SIGCONT, with lww, cas, claims and appends in
/// flight on A and B. After each fault heals the views must equal the server's; then every
/// check of [`judge`], strong operations within [`STRONG_BOUND`] and the hang detected within
/// [`DETECT_BOUND`].
#[test]
fn external_nats_server_sigterm_sigkill_and_sigstop_with_traffic_in_flight() {
    let test = "external-server";
    let started = Instant::now();
    let mut rng = Rng::new(test);
    let mut server = NatsServer::start();
    let urls = vec![server.url()];
    let a = mount(&opts("a", urls.clone(), None, false));
    let b = mount(&opts("b", urls.clone(), None, false));
    let t = Traffic::new("ext");
    let vs = Mutex::new(Vec::new());
    let (between, stop_for) = if soak() { (Duration::from_secs(15), Duration::from_secs(20)) } else { (Duration::from_secs(3), Duration::from_secs(8)) };
    std::thread::scope(|s| {
        start_traffic(s, &t, &a, &b, &mut rng, Mix { appends: true, cas: true });
        traffic_for(between);
        let rounds = if soak() { 3 } else { 1 };
        for round in 0..rounds {
            eprintln!("{test}: +{:.1}s SIGTERM", started.elapsed().as_secs_f64());
            server.stop();
            traffic_for(Duration::from_secs(1));
            server.start_again();
            check_after_heal(&format!("{test} round {round}: after SIGTERM + restart"), &t, &a, &b, &urls, &vs);
            traffic_for(between);
            eprintln!("{test}: +{:.1}s SIGKILL", started.elapsed().as_secs_f64());
            server.kill9();
            traffic_for(Duration::from_secs(1));
            server.start_again();
            check_after_heal(&format!("{test} round {round}: after SIGKILL + restart"), &t, &a, &b, &urls, &vs);
            traffic_for(between);
            eprintln!("{test}: +{:.1}s SIGSTOP for {stop_for:?}", started.elapsed().as_secs_f64());
            let t_stop = Instant::now();
            server.signal(libc::SIGSTOP);
            check_detected(&format!("{test} round {round}: SIGSTOP"), &a, t_stop, &vs);
            traffic_for(stop_for.saturating_sub(t_stop.elapsed()));
            server.signal(libc::SIGCONT);
            check_after_heal(&format!("{test} round {round}: after SIGSTOP + SIGCONT"), &t, &a, &b, &urls, &vs);
            traffic_for(between);
        }
        t.stop.store(true, Ordering::SeqCst);
    });
    let mut vs = vs.into_inner().unwrap();
    vs.extend(judge(test, &t, &a, &b, &urls, Some(STRONG_BOUND)));
    verdict(test, &t.rec.history(), &vs, started);
}

/// A nats-server this test started by hand (when the daemon did not restart its embedded
/// one): stopped at the end.
struct ByHand(Option<std::process::Child>);

impl Drop for ByHand {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signalling the server this test started.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The embedded server's pid, from `--state/nats/pid`, if that process lives.
fn embedded_pid(m: &Mount) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(m.state.join("nats/pid")).ok()?.trim().parse().ok()?;
    syncfs::daemon::process_alive(pid as u32).then_some(pid)
}

/// Suite 2, the embedded default: A runs its own nats-server (no `--nats`), B joins it with the
/// URL A's status shows. SIGSTOP 8 s + SIGCONT, then SIGTERM and SIGKILL of that server: the
/// daemon owns it, so it must start it again (same port, same store) within 10 s; when it does
/// not, that is a violation and the test restarts it by hand (same command line) to judge the
/// rest. Checks as in the external test.
#[test]
fn embedded_nats_server_sigstop_sigterm_and_sigkill_with_traffic_in_flight() {
    let test = "embedded-server";
    let started = Instant::now();
    let mut rng = Rng::new(test);
    // Declared first, dropped last: a server restarted by hand outlives the mounts.
    let mut by_hand = ByHand(None);
    let a = mount(&opts("a", vec![], None, false));
    let st = a.status();
    assert_eq!(st["nats"]["embedded"], true, "{st}");
    let url = st["nats"]["url"].as_str().expect("the embedded server's URL").to_string();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let urls = vec![url.clone()];
    let b = mount(&opts("b", urls.clone(), None, false));
    let t = Traffic::new("emb");
    let vs = Mutex::new(Vec::new());
    let (between, stop_for) = if soak() { (Duration::from_secs(15), Duration::from_secs(20)) } else { (Duration::from_secs(3), Duration::from_secs(8)) };
    std::thread::scope(|s| {
        start_traffic(s, &t, &a, &b, &mut rng, Mix { appends: true, cas: true });
        traffic_for(between);
        let pid = embedded_pid(&a).expect("the embedded server's pid (state/nats/pid)");
        eprintln!("{test}: +{:.1}s SIGSTOP of the embedded server (pid {pid}) for {stop_for:?}", started.elapsed().as_secs_f64());
        let t_stop = Instant::now();
        // SAFETY: signalling the server this test's daemon started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        check_detected(&format!("{test}: SIGSTOP"), &a, t_stop, &vs);
        traffic_for(stop_for.saturating_sub(t_stop.elapsed()));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        check_after_heal(&format!("{test}: after SIGSTOP + SIGCONT"), &t, &a, &b, &urls, &vs);
        traffic_for(between);
        for (name, sig) in [("SIGTERM", libc::SIGTERM), ("SIGKILL", libc::SIGKILL)] {
            // The daemon's server, or the one this test started by hand last time.
            let pid = embedded_pid(&a).or_else(|| by_hand.0.as_ref().map(|c| c.id() as i32));
            let Some(pid) = pid else {
                vs.lock().unwrap().push(violation("embedded-restart", "-", format!("{name}: no embedded server runs any more")));
                break;
            };
            let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            eprintln!("{test}: +{:.1}s {name} of the embedded server (pid {pid})", started.elapsed().as_secs_f64());
            // SAFETY: as above (or the server this test started).
            unsafe { libc::kill(pid, sig) };
            if by_hand.0.as_ref().is_some_and(|c| c.id() as i32 == pid) {
                let _ = by_hand.0.take().map(|mut c| c.wait());
            }
            let t_kill = Instant::now();
            let restarted = wait_for(Duration::from_secs(10), || embedded_pid(&a).is_some_and(|p| p != pid) && nats_state(&a) == "connected");
            eprintln!("{test}: {name}: the daemon restarted its server: {restarted} ({:.1} s)", t_kill.elapsed().as_secs_f64());
            if !restarted {
                vs.lock().unwrap().push(violation(
                    "embedded-restart",
                    "-",
                    format!("{name} of the embedded nats-server: the daemon did not start it again within 10 s (a is {}); restarted by hand", nats_state(&a)),
                ));
                wait_for(Duration::from_secs(10), || !syncfs::daemon::process_alive(pid as u32));
                assert!(!cmdline.is_empty(), "no command line of the embedded server");
                let child = std::process::Command::new(&cmdline[0])
                    .args(&cmdline[1..])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("restart the embedded nats-server by hand");
                by_hand.0 = Some(child);
                assert!(wait_for(Duration::from_secs(15), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()));
            }
            check_after_heal(&format!("{test}: after {name} and restart"), &t, &a, &b, &urls, &vs);
            traffic_for(between);
        }
        t.stop.store(true, Ordering::SeqCst);
    });
    let mut vs = vs.into_inner().unwrap();
    vs.extend(judge(test, &t, &a, &b, &urls, Some(STRONG_BOUND)));
    verdict(test, &t.rec.history(), &vs, started);
}

// ---------------------------------------------------------------------------------------------
// Suite 4: partitions through the proxy

/// Suite 4, half-open: A reaches the server through the proxy, B directly. The link goes
/// half-open (bytes stop both ways, sockets stay open) for 10 s (30 s with `SYNCFS_SOAK`)
/// while A writes lww, cas, claims and appends and B keeps writing and racing for A's claims;
/// then it heals (connections that lived through the cut are reset). A must notice within
/// [`DETECT_BOUND`], fail strong operations within [`STRONG_BOUND`] with EAGAIN or ETIMEDOUT,
/// and after the heal every check of [`judge`] holds: nothing refused with EAGAIN landed,
/// ETIMEDOUT outcomes are reconciled (A's view equals the server's), lww keys converge with
/// one value per revision, claims have one owner and no claim is left without a holder.
#[test]
fn half_open_link_with_cas_appends_claims_and_lww_in_flight() {
    let test = "half-open";
    let started = Instant::now();
    let mut rng = Rng::new(test);
    let server = NatsServer::start();
    let proxy = Proxy::start(server.port);
    let urls = vec![server.url()];
    let a = mount(&opts("a", vec![proxy.url()], None, false));
    let b = mount(&opts("b", urls.clone(), None, false));
    let t = Traffic::new("half");
    let vs = Mutex::new(Vec::new());
    let (between, cut) = if soak() { (Duration::from_secs(15), Duration::from_secs(30)) } else { (Duration::from_secs(3), Duration::from_secs(10)) };
    std::thread::scope(|s| {
        start_traffic(s, &t, &a, &b, &mut rng, Mix { appends: true, cas: true });
        traffic_for(between);
        let rounds = if soak() { 3 } else { 1 };
        for round in 0..rounds {
            eprintln!("{test}: +{:.1}s half-open for {cut:?}", started.elapsed().as_secs_f64());
            let t_cut = Instant::now();
            proxy.half_open();
            check_detected(&format!("{test} round {round}"), &a, t_cut, &vs);
            traffic_for(cut.saturating_sub(t_cut.elapsed()));
            eprintln!("{test}: +{:.1}s heal (held {} bytes, dropped)", started.elapsed().as_secs_f64(), proxy.held_bytes());
            proxy.heal();
            check_after_heal(&format!("{test} round {round}: after the heal"), &t, &a, &b, &urls, &vs);
            traffic_for(between);
        }
        t.stop.store(true, Ordering::SeqCst);
    });
    let mut vs = vs.into_inner().unwrap();
    vs.extend(judge(test, &t, &a, &b, &urls, Some(STRONG_BOUND)));
    verdict(test, &t.rec.history(), &vs, started);
}

/// Suite 4, hard partition and late retransmission: A through the proxy. A hard partition for
/// 6 s (connections closed, new ones refused), heal; then the link holds every byte for 8 s
/// and delivers them late at the heal (a PUB sent during the cut reaches the server after its
/// sender gave up on it). 20 s cuts with `SYNCFS_SOAK`. The same checks as the half-open test;
/// the late delivery is where an in-doubt write lands over a newer one.
#[test]
fn hard_partition_then_late_retransmission_with_traffic_in_flight() {
    let test = "hard+hold";
    let started = Instant::now();
    let mut rng = Rng::new(test);
    let server = NatsServer::start();
    let proxy = Proxy::start(server.port);
    let urls = vec![server.url()];
    let a = mount(&opts("a", vec![proxy.url()], None, false));
    let b = mount(&opts("b", urls.clone(), None, false));
    let t = Traffic::new("hard");
    let vs = Mutex::new(Vec::new());
    let (between, hard, hold) = if soak() {
        (Duration::from_secs(15), Duration::from_secs(20), Duration::from_secs(20))
    } else {
        (Duration::from_secs(3), Duration::from_secs(6), Duration::from_secs(8))
    };
    std::thread::scope(|s| {
        start_traffic(s, &t, &a, &b, &mut rng, Mix { appends: true, cas: true });
        traffic_for(between);
        eprintln!("{test}: +{:.1}s hard partition for {hard:?}", started.elapsed().as_secs_f64());
        let t_cut = Instant::now();
        proxy.hard();
        check_detected(&format!("{test}: hard"), &a, t_cut, &vs);
        traffic_for(hard.saturating_sub(t_cut.elapsed()));
        proxy.heal();
        check_after_heal(&format!("{test}: after the hard partition"), &t, &a, &b, &urls, &vs);
        traffic_for(between);
        eprintln!("{test}: +{:.1}s hold for {hold:?}", started.elapsed().as_secs_f64());
        let t_cut = Instant::now();
        proxy.hold();
        check_detected(&format!("{test}: hold"), &a, t_cut, &vs);
        traffic_for(hold.saturating_sub(t_cut.elapsed()));
        let held = proxy.held_bytes();
        proxy.heal();
        wait_for(Duration::from_secs(2), || proxy.held_bytes() == 0);
        eprintln!(
            "{test}: +{:.1}s released {held} held bytes late ({} delivered after holds in all)",
            started.elapsed().as_secs_f64(),
            proxy.released_bytes()
        );
        check_after_heal(&format!("{test}: after the late retransmission"), &t, &a, &b, &urls, &vs);
        traffic_for(between);
        t.stop.store(true, Ordering::SeqCst);
    });
    assert!(proxy.released_bytes() > 0, "the hold delivered nothing late: the scenario did not happen");
    let mut vs = vs.into_inner().unwrap();
    vs.extend(judge(test, &t, &a, &b, &urls, Some(STRONG_BOUND)));
    verdict(test, &t.rec.history(), &vs, started);
}

// ---------------------------------------------------------------------------------------------
// Suite 3: a 3-node cluster losing leaders

/// The server (index) that is the JetStream meta leader now, from the servers' logs: the
/// latest "new metadata leader" line of any running server names it.
fn meta_leader(c: &NatsCluster) -> Option<usize> {
    let mut best: Option<(String, usize)> = None;
    for (i, s) in c.servers.iter().enumerate() {
        if !s.running() {
            continue;
        }
        for line in s.log().lines() {
            let who = if line.contains("Self is new JetStream cluster metadata leader") {
                Some(i)
            } else if let Some(rest) = line.split("JetStream cluster new metadata leader: ").nth(1) {
                rest.split('/').next().and_then(|n| n.trim().strip_prefix('s')).and_then(|n| n.parse().ok())
            } else {
                None
            };
            if let Some(who) = who {
                // "[pid] 2024/01/02 15:04:05.000000 [INF] ...": the timestamp orders lines.
                let stamp: String = line.split(' ').skip(1).take(2).collect::<Vec<_>>().join(" ");
                if best.as_ref().is_none_or(|(b, _)| &stamp >= b) {
                    best = Some((stamp, who));
                }
            }
        }
    }
    best.map(|(_, i)| i)
}

/// The server (index) leading the stream of the KV bucket of `pattern`.
fn stream_leader(c: &NatsCluster, pattern: &str) -> Option<usize> {
    let bucket = syncfs::tier::kv::bucket_name(pattern);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for s in c.servers.iter().filter(|s| s.running()) {
        let url = s.url();
        let leader = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                let client = async_nats::connect(url).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let mut stream = js.get_stream(format!("KV_{bucket}")).await.ok()?;
                let info = stream.info().await.ok()?;
                info.cluster.as_ref()?.leader.clone()
            })
            .await
            .ok()
            .flatten()
        });
        if let Some(name) = leader {
            return name.strip_prefix('s').and_then(|n| n.parse().ok());
        }
    }
    None
}

/// Suite 3: three servers, R3 buckets. A (servers s0, s1, s2) and B (s1, s2, s0) race for
/// claims (two racers per node per key, every key once; winners write their content and
/// release half of them) and write shared lww keys, while the cluster loses its meta leader
/// (SIGKILL, restart 4 s later), the claims bucket's stream leader (SIGKILL, restart) and the
/// lww bucket's stream leader (SIGTERM, restart). Checks: one owner per claim (linearizable
/// creates), no claim without a holder and no held claim lost, lww keys converge to the
/// server's value and revision on both nodes, each write lands once and in its process's
/// order, no EIO (lww closes never fail, claim opens fail only with EEXIST, EAGAIN or
/// ETIMEDOUT), and no operation hangs longer than 10 s.
#[test]
fn cluster_losing_meta_and_stream_leaders_during_claim_races_and_lww() {
    let test = "cluster";
    let started = Instant::now();
    let mut rng = Rng::new(test);
    let mut cluster = NatsCluster::start();
    let urls: Vec<String> = cluster.servers.iter().map(NatsServer::url).collect();
    let a = mount(&opts("a", vec![urls[0].clone(), urls[1].clone(), urls[2].clone()], None, true));
    let b = mount(&opts("b", vec![urls[1].clone(), urls[2].clone(), urls[0].clone()], None, true));
    eprintln!("{test}: cluster and mounts up after {:.1} s", started.elapsed().as_secs_f64());
    let rec = Arc::new(Recorder::new());
    let stop = AtomicBool::new(false);
    let held: Mutex<Vec<String>> = Mutex::new(Vec::new());
    const RACERS: usize = 2;
    let barrier = Barrier::new(RACERS * 2);
    let round_stop = AtomicBool::new(false);
    let between = if soak() { Duration::from_secs(12) } else { Duration::from_secs(4) };
    let lww_keys: Vec<String> = (0..12).map(|i| format!("fast/casual/cl/s{i:02}")).collect();
    let mut faults: Vec<String> = Vec::new();
    for m in [&a, &b] {
        for d in ["fast/claims/cl", "fast/casual/cl"] {
            std::fs::create_dir_all(m.path(d)).unwrap();
        }
    }
    std::thread::scope(|s| {
        // Racers: every round one new key; a barrier starts them together.
        for (name, m) in [("a", &a), ("b", &b)] {
            for j in 0..RACERS {
                let (rec, barrier, stop, round_stop, held) = (&rec, &barrier, &stop, &round_stop, &held);
                let mut r = rng.fork();
                s.spawn(move || {
                    let process = format!("{name}-racer{j}");
                    for round in 0.. {
                        if barrier.wait().is_leader() {
                            round_stop.store(stop.load(Ordering::SeqCst), Ordering::SeqCst);
                        }
                        barrier.wait();
                        if round_stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let key = format!("fast/claims/cl/r{round:04}");
                        let path = m.path(&key);
                        let f = run(rec, name, &process, &key, Kind::Create, Some(Vec::new()), || OpenOptions::new().write(true).create_new(true).open(&path));
                        if let Ok(mut f) = f {
                            let v = format!("{process} won r{round}\n").into_bytes();
                            let ok = run(rec, name, &process, &key, Kind::Write, Some(v.clone()), || {
                                f.write_all(&v)?;
                                close(f)
                            });
                            if r.next() % 2 == 0 {
                                let _ = run(rec, name, &process, &key, Kind::Delete, None, || std::fs::remove_file(&path));
                            } else if ok.is_ok() {
                                held.lock().unwrap().push(key.clone());
                            }
                        }
                        std::thread::sleep(r.ms(10, 80));
                    }
                });
            }
        }
        // lww writers on both nodes.
        for (name, m) in [("a", &a), ("b", &b)] {
            let (rec, stop, keys) = (&rec, &stop, &lww_keys);
            let mut r = rng.fork();
            s.spawn(move || {
                let process = format!("{name}-lww");
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let key = r.pick(keys).clone();
                    let v = value(&mut r, &process, n);
                    let _ = run(rec, name, &process, &key, Kind::Write, Some(v.clone()), || put(&m.path(&key), &v, false));
                    std::thread::sleep(r.ms(40, 120));
                }
            });
        }
        traffic_for(between);
        let rounds = if soak() { 3 } else { 1 };
        for _ in 0..rounds {
            // The meta leader.
            let leader = meta_leader(&cluster).unwrap_or(0);
            faults.push(format!("+{:.1}s SIGKILL meta leader s{leader}", started.elapsed().as_secs_f64()));
            eprintln!("{test}: {}", faults.last().unwrap());
            cluster.servers[leader].kill9();
            traffic_for(between);
            cluster.servers[leader].start_again();
            traffic_for(between);
            // The claims bucket's stream leader.
            let leader = stream_leader(&cluster, "fast/claims/**").unwrap_or(1);
            faults.push(format!("+{:.1}s SIGKILL claims stream leader s{leader}", started.elapsed().as_secs_f64()));
            eprintln!("{test}: {}", faults.last().unwrap());
            cluster.servers[leader].kill9();
            traffic_for(between);
            cluster.servers[leader].start_again();
            traffic_for(between);
            // The lww bucket's stream leader, gracefully.
            let leader = stream_leader(&cluster, "fast/casual/**").unwrap_or(2);
            faults.push(format!("+{:.1}s SIGTERM lww stream leader s{leader}", started.elapsed().as_secs_f64()));
            eprintln!("{test}: {}", faults.last().unwrap());
            cluster.servers[leader].stop();
            traffic_for(between);
            cluster.servers[leader].start_again();
            traffic_for(between);
        }
        stop.store(true, Ordering::SeqCst);
    });
    eprintln!("{test}: traffic stopped at +{:.1}s", started.elapsed().as_secs_f64());
    let mut vs = Vec::new();
    let connected = wait_for(Duration::from_secs(20), || nats_state(&a) == "connected" && nats_state(&b) == "connected");
    if !connected {
        vs.push(violation("reconnect", "-", format!("after the faults: a is {}, b is {}", nats_state(&a), nats_state(&b))));
    }
    let keys: BTreeSet<String> = rec.history().ops.iter().map(|o| o.key.clone()).collect();
    vs.extend(views_match_server(&urls, &[("a", &a), ("b", &b)], &["fast/casual/cl/", "fast/claims/cl/"], &keys, HEAL_BOUND, "cluster: final"));
    let drained = wait_for(Duration::from_secs(10), || {
        status(&a).is_some_and(|s| s["pending_writes"] == 0) && status(&b).is_some_and(|s| s["pending_writes"] == 0)
    });
    if !drained {
        vs.push(violation("journal-drained", "-", "pending writes remain 10 s after the cluster healed".into()));
    }
    // Held claims cannot be taken by the other node.
    for key in held.lock().unwrap().iter() {
        for (name, m) in [("a", &a), ("b", &b)] {
            let path = m.path(key);
            let _ = run(&rec, name, &format!("{name}-late-taker"), key, Kind::Create, Some(Vec::new()), || OpenOptions::new().write(true).create_new(true).open(&path));
        }
    }
    for key in &lww_keys {
        for (name, m) in [("a", &a), ("b", &b)] {
            let _ = read(&rec, name, &format!("{name}-final"), m, key);
        }
    }
    let h = rec.history();
    let msgs = server_msgs_retry(&urls, Duration::from_secs(30));
    let finals: Vec<Final> = lww_keys.iter().flat_map(|k| [view_of(&a, "a", k), view_of(&b, "b", k)]).collect();
    vs.extend(check_errnos(&h));
    vs.extend(check_latency(&h, Duration::from_secs(10)));
    vs.extend(check_landed(&h, &msgs));
    vs.extend(check_claim_holders(&h, &msgs, "fast/claims/cl/"));
    vs.extend(check_one_owner(&h));
    vs.extend(check_reads_written(&h, &BTreeMap::new()));
    vs.extend(check_lww_converged(&h, &BTreeMap::new(), &finals));
    let rounds = h.ops.iter().filter(|o| o.kind == Kind::Create && o.result.is_ok()).count();
    eprintln!("{test}: faults {faults:?}; {rounds} claims won");
    assert!(rounds >= 20, "too few claim rounds to judge: {}", summary(&h));
    verdict(test, &h, &vs, started);
}

// ---------------------------------------------------------------------------------------------
// Suite 1: kill -9 of the daemon at random points

/// What one killable node writes: its own keys on every tier, one writer thread per tier, so
/// each key's operations are sequential and the recording is the manifest.
struct Keys {
    node: String,
}

impl Keys {
    fn lww(&self, i: u64) -> String {
        format!("fast/casual/k9/{}/l{i}", self.node)
    }
    fn cas(&self, i: u64) -> String {
        format!("fast/critical/k9/{}/c{i}", self.node)
    }
    fn claim(&self, n: u64) -> String {
        format!("fast/claims/k9/{}/k{n:04}", self.node)
    }
    fn log(&self, i: u64) -> String {
        format!("fast/messages/k9/{}/a{i}.log", self.node)
    }
    fn blob(&self, i: u64) -> String {
        format!("blobs/k9/{}/b{i}.bin", self.node)
    }
    fn durable(&self, i: u64) -> String {
        format!("durable/k9/{}/d{i}.txt", self.node)
    }
    fn local(&self, i: u64) -> String {
        format!("local/k9/{}/f{i}", self.node)
    }
    fn dirs(&self) -> Vec<String> {
        ["fast/casual", "fast/critical", "fast/claims", "fast/messages", "blobs", "durable", "local"]
            .iter()
            .map(|d| format!("{d}/k9/{}", self.node))
            .collect()
    }
}

/// Whether an errno says the operation had no effect (so the manifest ignores it).
fn refused(o: &Op) -> bool {
    matches!((o.kind, o.result), (Kind::Create, Err(libc::EEXIST)) | (Kind::Write, Err(libc::ESTALE | libc::EPERM)) | (Kind::Delete, Err(libc::ENOENT)))
}

/// What a key may hold now, from its sequential operations: the last acknowledged value, or
/// the value of an operation in doubt (the kill cut it) after it. `None`: absent.
fn allowed(ops: &[&Op]) -> Vec<Option<Vec<u8>>> {
    let mut allowed: Vec<Option<Vec<u8>>> = vec![None];
    for o in ops {
        let v = match o.kind {
            Kind::Read | Kind::Append => continue,
            Kind::Delete => None,
            _ => Some(o.value.clone().unwrap_or_default()),
        };
        if refused(o) {
            continue;
        }
        if o.result.is_ok() && o.kind == Kind::Create {
            // An open(O_CREAT) is acknowledged by the file's close: a create whose close a
            // kill cut is taken back at the next mount (docs/SEMANTICS.md).
            allowed = vec![None, v];
        } else if o.result.is_ok() {
            allowed = vec![v];
        } else if !allowed.contains(&v) {
            allowed.push(v);
        }
    }
    allowed
}

/// A log must be the acknowledged appends in order, each once, with in-doubt ones present or
/// not, and nothing else.
fn log_fits(file: &[u8], ops: &[&Op]) -> Result<(), String> {
    let mut pos = 0;
    for o in ops.iter().filter(|o| o.kind == Kind::Append) {
        let rec = o.value.as_deref().unwrap_or_default();
        if file[pos..].starts_with(rec) {
            pos += rec.len();
        } else if o.result.is_ok() {
            let elsewhere = file.windows(rec.len()).position(|w| w == rec);
            return Err(format!(
                "acknowledged append {} is not at offset {pos} ({}); the file has {} there",
                esc(rec),
                elsewhere.map_or_else(|| "it is missing".to_string(), |p| format!("it is at {p}")),
                esc(&file[pos..(pos + 60).min(file.len())])
            ));
        }
    }
    if pos != file.len() {
        return Err(format!("bytes nobody appended (or appended twice) at {pos}..{}: {}", file.len(), esc(&file[pos..(pos + 80).min(file.len())])));
    }
    Ok(())
}

/// Checks `m`'s view of every key `node` wrote against the manifest; returns the
/// disagreements (after waiting up to `within` for catch-up).
fn check_manifest(rec: &Recorder, node: &str, m: &Mount, viewer: &str, within: Duration, skip: impl Fn(&str) -> bool) -> Vec<Violation> {
    let h = rec.history();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in h.ops.iter().filter(|o| o.node == node && o.kind != Kind::Read) {
        by_key.entry(&o.key).or_default().push(o);
    }
    let deadline = Instant::now() + within;
    loop {
        let mut vs = Vec::new();
        for (key, ops) in &by_key {
            if skip(key) {
                continue;
            }
            let got = std::fs::read(m.path(key)).ok();
            if is_log(key) {
                let file = got.unwrap_or_default();
                if let Err(e) = log_fits(&file, ops) {
                    vs.push(violation("k9-log", key, format!("{viewer}: {e}")));
                }
                continue;
            }
            let mut ok = allowed(ops);
            // The local tier writes in place, as any file system does: a kill between the
            // O_TRUNC open and the last write of an in-doubt write leaves a prefix of it.
            let in_place = key.starts_with("local/");
            let prefix_of_in_doubt = |got: &Option<Vec<u8>>| {
                got.as_ref().is_some_and(|g| ops.iter().any(|o| o.result.is_err() && o.value.as_ref().is_some_and(|v| v.starts_with(g))))
            };
            if in_place && prefix_of_in_doubt(&got) {
                ok.push(got.clone());
            }
            // An ephemeral claim lives while its mount does: a killed holder stops refreshing
            // it, so it expires a TTL after its last write (a refresh after it only delays
            // that; the nodes are killed every few seconds) — by design, not a loss.
            let expired = claim_ttl(key).is_some_and(|ttl| ops.iter().map(|o| o.ret).max().is_some_and(|t| t.elapsed() >= ttl));
            if expired && got.is_none() {
                ok.push(None);
            }
            if !ok.contains(&got) {
                let last = ops.iter().rev().take(3).map(|o| h.describe(o)).collect::<Vec<_>>().join("; ");
                let shown = |v: &Option<Vec<u8>>| v.as_deref().map_or_else(|| "absent".into(), esc);
                vs.push(violation(
                    "k9-manifest",
                    key,
                    format!(
                        "{viewer} shows {}; allowed: [{}]; last ops: [{last}]",
                        shown(&got),
                        ok.iter().map(shown).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        if vs.is_empty() || Instant::now() >= deadline {
            return vs;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One writer per tier on `m` until `stop` or the mount dies (ENOTCONN); ops recorded as
/// `node`'s.
fn k9_writers<'s>(s: &'s std::thread::Scope<'s, '_>, rec: &'s Recorder, node: &'s str, m: &'s Mount, keys: &'s Keys, stop: &'s AtomicBool, claim_n: &'s AtomicU64, rng: &mut Rng) -> Vec<std::thread::ScopedJoinHandle<'s, ()>> {
    let dead = |r: &Result<(), i32>| matches!(r, Err(libc::ENOTCONN) | Err(libc::ECONNABORTED));
    let mut hs = Vec::new();
    // lww, cas, blobs, durable, local: whole-file writes to a few keys each.
    for tier in ["lww", "cas", "blob", "durable", "local"] {
        let mut r = rng.fork();
        hs.push(s.spawn(move || {
            let process = format!("{node}-{tier}");
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let i = r.range(0, 3);
                let key = match tier {
                    "lww" => keys.lww(i),
                    "cas" => keys.cas(i),
                    "blob" => keys.blob(i),
                    "durable" => keys.durable(i),
                    _ => keys.local(i),
                };
                let mut v = value(&mut r, &process, n);
                if tier == "blob" {
                    let more = r.range(1000, 40_000) as usize;
                    v.extend(std::iter::repeat_n(b'x', more));
                }
                let fsync = tier == "local" || (tier == "durable" && r.next() % 2 == 0);
                let res = run(rec, node, &process, &key, Kind::Write, Some(v.clone()), || put(&m.path(&key), &v, fsync));
                if dead(&res) {
                    return;
                }
                std::thread::sleep(r.ms(0, 15));
            }
        }));
    }
    // Appends to a few logs.
    {
        let mut r = rng.fork();
        hs.push(s.spawn(move || {
            let process = format!("{node}-append");
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let key = keys.log(r.range(0, 1));
                let mut v = value(&mut r, &process, n);
                v.truncate(100);
                v.push(b'\n');
                let res = run(rec, node, &process, &key, Kind::Append, Some(v.clone()), || append(&m.path(&key), &v));
                if dead(&res) {
                    return;
                }
                std::thread::sleep(r.ms(0, 15));
            }
        }));
    }
    // Claims: create, write the content, sometimes release; fresh names each time.
    {
        let mut r = rng.fork();
        hs.push(s.spawn(move || {
            let process = format!("{node}-claim");
            while !stop.load(Ordering::SeqCst) {
                let n = claim_n.fetch_add(1, Ordering::SeqCst);
                let key = keys.claim(n);
                let path = m.path(&key);
                let f = run(rec, node, &process, &key, Kind::Create, Some(Vec::new()), || OpenOptions::new().write(true).create_new(true).open(&path));
                let f = match f {
                    Ok(f) => f,
                    Err(e) if matches!(e, libc::ENOTCONN | libc::ECONNABORTED) => return,
                    Err(_) => continue,
                };
                let v = format!("{process} holds k{n}\n").into_bytes();
                let mut f = f;
                let res = run(rec, node, &process, &key, Kind::Write, Some(v.clone()), || {
                    f.write_all(&v)?;
                    close(f)
                });
                if dead(&res) {
                    return;
                }
                if r.next() % 3 == 0 {
                    let res = run(rec, node, &process, &key, Kind::Delete, None, || std::fs::remove_file(&path));
                    if dead(&res) {
                        return;
                    }
                }
                std::thread::sleep(r.ms(0, 20));
            }
        }));
    }
    hs
}

/// Suite 1: kill -9 of the daemon at random points, on every tier. Several nodes (each with
/// its own state directory) write their own keys on every tier (lww, cas, claims, appends,
/// blobs, git, local), one writer per tier, and are killed with SIGKILL after a random delay
/// (0..600 ms after the mount returned: during catch-up and replay, during writes, commits and
/// uploads), then detached and remounted on the same state directory; the recording is the
/// manifest. After every remount the node's view of every key it wrote must be allowed by the
/// manifest ([`allowed`], [`log_fits`]): the last acknowledged value (close/fsync returned 0),
/// or an in-doubt operation's value after it, never torn or empty bytes nobody acknowledged.
/// After the last remount, observer B (never killed) must show the same for everything but
/// the local tier, and every node's KV view must equal the server's. One nats-server and one
/// git remote for the whole run. 100 kill points in all (1,000 with `SYNCFS_SOAK`), asserted;
/// a time budget (5 min; 50 min with soak) only stops a run that cannot make progress. The
/// first failing remount stops the run.
#[test]
fn kill9_of_the_daemon_at_random_points_loses_no_acknowledged_write() {
    let test = "kill9";
    let started = Instant::now();
    let mut rng = Rng::new(test);
    // The budget only guards against a run that cannot make progress.
    let (target, budget) = if soak() { (1000, Duration::from_secs(3000)) } else { (100, Duration::from_secs(300)) };
    const NODES: usize = 3;
    let server = NatsServer::start();
    let remote = Remote::new();
    let urls = vec![server.url()];
    let names: Vec<String> = (0..NODES).map(|i| format!("k{i}")).collect();
    let all_opts: Vec<Options> = names.iter().map(|n| opts(n, urls.clone(), Some(&remote), false)).collect();
    let observer = mount(&opts("obs", urls.clone(), Some(&remote), false));
    let rec = Recorder::new();
    let kills = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let found: Mutex<Vec<Violation>> = Mutex::new(Vec::new());
    let mount_times: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
    let mut mounts: Vec<Mount> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..NODES)
            .map(|i| {
                let (rec, kills, failed, found, mount_times, o) = (&rec, &kills, &failed, &found, &mount_times, &all_opts[i]);
                let node = names[i].clone();
                let mut r = rng.fork();
                s.spawn(move || {
                    let keys = Keys { node: node.clone() };
                    let claim_n = AtomicU64::new(0);
                    let mut m = mount(o);
                    for d in keys.dirs() {
                        std::fs::create_dir_all(m.path(&d)).unwrap();
                    }
                    let mut cycle = 0;
                    while kills.load(Ordering::SeqCst) < target && started.elapsed() < budget && !failed.load(Ordering::SeqCst) {
                        cycle += 1;
                        let stop = AtomicBool::new(false);
                        let pid = daemon_pid(&m).expect("the daemon's pid");
                        let delay = r.ms(0, if soak() { 1500 } else { 600 });
                        std::thread::scope(|s2| {
                            let hs = k9_writers(s2, rec, &node, &m, &keys, &stop, &claim_n, &mut r);
                            std::thread::sleep(delay);
                            // SAFETY: killing this test's own daemon.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                            wait_for(Duration::from_secs(10), || !syncfs::daemon::process_alive(pid as u32));
                            stop.store(true, Ordering::SeqCst);
                            for h in hs {
                                h.join().unwrap();
                            }
                        });
                        kills.fetch_add(1, Ordering::SeqCst);
                        m.forget_mounted();
                        let out = syncfs(&["umount", &m.mnt.display().to_string()]);
                        assert!(out.status.success(), "umount of the stale mount: {}", String::from_utf8_lossy(&out.stderr));
                        let t0 = Instant::now();
                        let out = m.try_mount(o);
                        assert!(
                            out.status.success(),
                            "{node}: remount {cycle} failed:\n{}{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        );
                        mount_times.lock().unwrap().push(t0.elapsed());
                        let vs = check_manifest(rec, &node, &m, &format!("{node} after remount {cycle} (killed {delay:?} after mounting)"), Duration::from_secs(5), |_| false);
                        if !vs.is_empty() {
                            failed.store(true, Ordering::SeqCst);
                            found.lock().unwrap().extend(vs);
                        }
                    }
                    (m, cycle)
                })
            })
            .collect();
        for h in handles {
            let (m, cycles) = h.join().unwrap();
            eprintln!("{test}: {} was killed {cycles} times", m.mnt.display());
            mounts.push(m);
        }
    });
    let kill_time = started.elapsed();
    let n_kills = kills.load(Ordering::SeqCst);
    let times = mount_times.into_inner().unwrap();
    let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    eprintln!(
        "{test}: {n_kills} kill points in {:.1} s on {NODES} nodes; remount took {mean:?} on average, {:?} at most",
        kill_time.as_secs_f64(),
        times.iter().max()
    );
    let mut vs = found.into_inner().unwrap();
    // The other node: everything but the local tier, once the durable tier pushed.
    for m in &mounts {
        wait_for(Duration::from_secs(30), || {
            status(m).is_some_and(|s| s["git"]["uncommitted"] == 0 && s["git"]["unpushed"] == 0)
        });
    }
    for (i, name) in names.iter().enumerate() {
        vs.extend(check_manifest(&rec, name, &mounts[i], &format!("{name} at the end"), Duration::from_secs(5), |_| false));
        vs.extend(check_manifest(&rec, name, &observer, &format!("observer, for {name}'s writes"), Duration::from_secs(20), |k| k.starts_with("local/")));
    }
    let mut nodes: Vec<(&str, &Mount)> = names.iter().map(String::as_str).zip(mounts.iter()).collect();
    nodes.push(("obs", &observer));
    vs.extend(views_match_server(&urls, &nodes, &["fast/casual/k9/", "fast/critical/k9/", "fast/claims/k9/"], &BTreeSet::new(), HEAL_BOUND, "kill9: final"));
    let h = rec.history();
    // Every value on every node is whole: no torn shape nobody wrote (check a, on final reads).
    let finals: Vec<Final> = h
        .ops
        .iter()
        .filter(|o| !is_log(&o.key) && !o.key.starts_with("local/"))
        .map(|o| o.key.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|k| view_of(&observer, "obs", &k))
        .collect();
    for f in &finals {
        if f.value.as_deref() == Some(b"".as_slice()) && !is_claim(&f.key) {
            vs.push(violation("k9-empty", &f.key, format!("the observer shows an empty file, which nobody wrote: {f:?}")));
        }
    }
    let acked = h.ops.iter().filter(|o| o.result.is_ok()).count();
    let in_doubt = h.ops.iter().filter(|o| o.result.is_err() && !refused(o)).count();
    eprintln!("{test}: {acked} acknowledged operations, {in_doubt} cut by a kill");
    if vs.is_empty() {
        assert!(n_kills >= target, "{test}: only {n_kills} kill points within {budget:?} (target {target})");
    }
    verdict(test, &h, &vs, started);
}
