//! The blob tier (object store): several mounts on real NATS servers.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::harness::{peak_rss_kib, wait_for, wait_gone, Mount};
use crate::nats::NatsServer;

/// Every path under `blobs/` is a blob.
const TABLE: &str = r#"
policies:
  - pattern: "blobs/**"
    tier: object-store
    consistency: content-addressed
"#;

/// The default object store.
const BUCKET: &str = "syncfs_blobs";

/// Garbage collection every 300 ms, after a grace of one second.
const QUICK_GC: &str = "nats:\n  object_store:\n    gc_interval_ms: 300\n    gc_grace_ms: 1000\n";

fn node(server: &NatsServer, name: &str, config: Option<&str>) -> Mount {
    crate::harness::node_on(&server.url(), name, TABLE, config)
}

fn random(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut buf).unwrap();
    buf
}

fn hex_of(content: &[u8]) -> String {
    Sha256::digest(content).iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of `content`: its revision, and its object's name.
fn rev_of(content: &[u8]) -> String {
    format!("sha256:{}", hex_of(content))
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    let out = std::process::Command::new("getfattr").args(["--only-values", "-n", name]).arg(path).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until `m` knows `rel` as the blob `rev` (another node's pointer arriving).
fn wait_rev(m: &Mount, rel: &str, rev: &str) {
    let path = m.path(rel);
    assert!(
        wait_for(Duration::from_secs(20), || xattr(&path, "user.syncfs.rev").as_deref() == Some(rev)),
        "{} never became {rev} (now {:?})",
        path.display(),
        xattr(&path, "user.syncfs.rev")
    );
}

/// Reads `rel` on `m`, asserting it holds `content`.
fn assert_reads(m: &Mount, rel: &str, content: &[u8]) {
    let got = std::fs::read(m.path(rel)).unwrap_or_else(|e| panic!("read {rel} on {}: {e}", m.mnt.display()));
    assert!(
        got == content,
        "{rel} on {}: {} bytes, sha256 {} (expected {})",
        m.mnt.display(),
        got.len(),
        hex_of(&got),
        hex_of(content)
    );
}

/// The blob cache files (`<state>/blobs/<hex>`) of a mount, by name.
fn cache_files(m: &Mount) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(m.state.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect();
    files.sort();
    files
}

/// A client of the test's object store, to see what it holds.
struct Objects {
    rt: tokio::runtime::Runtime,
    store: async_nats::jetstream::object_store::ObjectStore,
}

impl Objects {
    /// The object store on `server` (the mounts created it).
    fn open(server: &NatsServer) -> Objects {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let store = rt.block_on(async {
            let client = async_nats::connect(server.url()).await.unwrap();
            async_nats::jetstream::new(client).get_object_store(BUCKET).await.unwrap()
        });
        Objects { rt, store }
    }

    /// The names of the objects present (deleted ones skipped), sorted.
    fn names(&self) -> Vec<String> {
        self.rt.block_on(async {
            let mut list = self.store.list().await.unwrap();
            let mut names = Vec::new();
            while let Some(info) = list.next().await {
                let info = info.unwrap();
                if !info.deleted && info.name.starts_with("sha256:") {
                    names.push(info.name);
                }
            }
            names.sort();
            names
        })
    }

    fn has(&self, name: &str) -> bool {
        self.names().iter().any(|n| n == name)
    }
}

/// Polls `cond` every 200 ms (for conditions that are costly to check) up to `timeout`.
fn wait_slow(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    crate::harness::wait_every(timeout, Duration::from_millis(200), cond)
}

/// Writes `content` to `path` and commits it with fsync; returns the first error.
fn write_file(path: &Path, content: &[u8], truncate: bool) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(truncate).open(path)?;
    f.write_all(content)?;
    f.sync_all()
}

/// A 256 MiB file copied in on one node reads back identically on another, with the same
/// `user.syncfs.rev` (its SHA-256), and neither daemon's peak RSS reaches 200 MiB: content is
/// streamed through files, never held in memory.
#[test]
fn a_256_mib_blob_round_trips_with_bounded_memory() {
    let server = NatsServer::start();
    let a = node(&server, "a", None);
    let b = node(&server, "b", None);
    let src = a.base.path().join("big.bin");
    let out = a.sh_ok(&format!(
        "head -c 256M /dev/urandom > {src}\nsha256sum < {src} | cut -d' ' -f1\ncp {src} blobs/big",
        src = src.display()
    ));
    let hex = out.trim().to_string();
    assert_eq!(hex.len(), 64, "{out}");
    let rev = format!("sha256:{hex}");
    assert_eq!(xattr(&a.path("blobs/big"), "user.syncfs.rev").as_deref(), Some(rev.as_str()));
    wait_rev(&b, "blobs/big", &rev);
    assert_eq!(std::fs::metadata(b.path("blobs/big")).unwrap().len(), 256 << 20);
    let read = b.sh_ok("sha256sum < blobs/big | cut -d' ' -f1");
    assert_eq!(read.trim(), hex, "the content read on B differs");
    assert_eq!(xattr(&b.path("blobs/big"), "user.syncfs.rev").as_deref(), Some(rev.as_str()));
    let (rss_a, rss_b) = (peak_rss_kib(a.pid()), peak_rss_kib(b.pid()));
    eprintln!("blob 256 MiB: peak RSS a={rss_a} KiB b={rss_b} KiB");
    assert!(rss_a < 200 << 10, "peak RSS of the writer: {rss_a} KiB");
    assert!(rss_b < 200 << 10, "peak RSS of the reader: {rss_b} KiB");
}

/// The same content written under two names on two nodes is one object; both names read
/// back on both nodes.
#[test]
fn identical_content_is_stored_once() {
    let server = NatsServer::start();
    let a = node(&server, "a", None);
    let b = node(&server, "b", None);
    let content = random(300 << 10);
    let rev = rev_of(&content);
    std::fs::write(a.path("blobs/one"), &content).unwrap();
    std::fs::write(b.path("blobs/two"), &content).unwrap();
    for m in [&a, &b] {
        wait_rev(m, "blobs/one", &rev);
        wait_rev(m, "blobs/two", &rev);
        assert_reads(m, "blobs/one", &content);
        assert_reads(m, "blobs/two", &content);
    }
    assert_eq!(Objects::open(&server).names(), vec![rev]);
}

/// With a 3 MiB cache, reading three 2 MiB blobs keeps at most one of them (the status and
/// the cache directory agree), and reading the first again fetches it again.
#[test]
fn the_cache_stays_bounded_and_evicted_blobs_are_fetched_again() {
    let server = NatsServer::start();
    let a = node(&server, "a", None);
    let b = node(&server, "b", Some("cache:\n  max_bytes: 3145728\n"));
    let contents: Vec<Vec<u8>> = (0..3).map(|_| random(2 << 20)).collect();
    for (i, c) in contents.iter().enumerate() {
        std::fs::write(a.path(&format!("blobs/c{i}")), c).unwrap();
    }
    for (i, c) in contents.iter().enumerate() {
        wait_rev(&b, &format!("blobs/c{i}"), &rev_of(c));
        assert_reads(&b, &format!("blobs/c{i}"), c);
        let files = cache_files(&b);
        assert!(files.len() <= 1, "more than one 2 MiB entry in a 3 MiB cache: {files:?}");
    }
    let status = b.status();
    let blobs = &status["blobs"];
    assert_eq!(blobs["cache_max_bytes"], 3145728, "{blobs}");
    assert!(blobs["cached_bytes"].as_u64().unwrap() <= 3145728, "{blobs}");
    let first = hex_of(&contents[0]);
    let cached = b.state.join("blobs").join(&first);
    assert!(!cached.exists(), "the least recently used blob is still cached: {:?}", cache_files(&b));
    assert_reads(&b, "blobs/c0", &contents[0]);
    assert!(cached.exists(), "the blob read again is not cached again: {:?}", cache_files(&b));
    assert!(b.status()["blobs"]["cached_bytes"].as_u64().unwrap() <= 3145728);
}

/// A cache entry changed behind syncfs's back is detected by its digest: the next read
/// fetches the content again, serves the original, and the log says so.
#[test]
fn a_corrupted_cache_entry_is_detected_and_fetched_again() {
    let server = NatsServer::start();
    let a = node(&server, "a", None);
    let b = node(&server, "b", None);
    let content = random(1 << 20);
    let hex = hex_of(&content);
    std::fs::write(a.path("blobs/f"), &content).unwrap();
    wait_rev(&b, "blobs/f", &rev_of(&content));
    assert_reads(&b, "blobs/f", &content);
    let cached = b.state.join("blobs").join(&hex);
    assert!(cached.exists(), "no cache entry {}: {:?}", cached.display(), cache_files(&b));
    // Let the modification time move on, then flip a few bytes in place.
    std::thread::sleep(Duration::from_millis(50));
    let f = OpenOptions::new().write(true).open(&cached).unwrap();
    let garbled: Vec<u8> = content[4096..4104].iter().map(|b| !b).collect();
    f.write_all_at(&garbled, 4096).unwrap();
    drop(f);
    assert_ne!(hex_of(&std::fs::read(&cached).unwrap()), hex);
    assert_reads(&b, "blobs/f", &content);
    let log = b.state.join("syncfs.log");
    assert!(
        wait_for(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("does not match its digest")),
        "the log does not mention the mismatch"
    );
    // The entry holds the right content again.
    assert_eq!(hex_of(&std::fs::read(&cached).unwrap()), hex);
}

/// Without NATS: cached blobs read, uncached ones fail with EAGAIN, and blob writes fail
/// (EAGAIN) and change nothing anywhere; once the server is back everything works.
#[test]
fn offline_cached_blobs_read_and_the_rest_fails_with_eagain() {
    let mut server = NatsServer::start();
    let a = node(&server, "a", None);
    let b = node(&server, "b", None);
    let (seen, unseen) = (random(512 << 10), random(512 << 10));
    std::fs::write(a.path("blobs/seen"), &seen).unwrap();
    std::fs::write(a.path("blobs/unseen"), &unseen).unwrap();
    wait_rev(&b, "blobs/seen", &rev_of(&seen));
    wait_rev(&b, "blobs/unseen", &rev_of(&unseen));
    assert_reads(&b, "blobs/seen", &seen);
    server.stop();
    assert!(wait_for(Duration::from_secs(10), || b.status()["nats"]["state"] == "disconnected"));
    // Cached content is served.
    assert_reads(&b, "blobs/seen", &seen);
    // Uncached content cannot be fetched.
    let err = std::fs::read(b.path("blobs/unseen")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "read of an uncached blob: {err}");
    let err = std::fs::File::open(b.path("blobs/unseen")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "open of an uncached blob: {err}");
    // Writes are not queued: a new blob and an overwrite both fail.
    let err = write_file(&b.path("blobs/new"), b"written offline\n", true).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "new blob written offline: {err}");
    let err = write_file(&b.path("blobs/seen"), b"overwritten offline\n", true).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "blob overwritten offline: {err}");
    // A program that only checks close() hears of it too.
    let out = b.sh_ok(
        "python3 -c '\nimport errno\ntry:\n  f = open(\"blobs/closed\", \"wb\"); f.write(b\"x\" * 1000); f.close(); print(\"ok\")\nexcept OSError as e:\n  print(errno.errorcode[e.errno])\n'",
    );
    assert_eq!(out.trim(), "EAGAIN", "close() of a blob written offline");
    assert_reads(&b, "blobs/seen", &seen);
    assert_eq!(xattr(&b.path("blobs/seen"), "user.syncfs.rev"), Some(rev_of(&seen)));
    server.restart();
    assert!(wait_for(Duration::from_secs(15), || b.status()["nats"]["state"] == "connected"));
    // Writes work again (EAGAIN while JetStream comes back is a reason to try again).
    let after = random(100 << 10);
    let mut last = None;
    let written = wait_slow(Duration::from_secs(15), || match write_file(&b.path("blobs/after"), &after, true) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            last = Some(e);
            false
        }
        Err(e) => panic!("write after the restart: {e}"),
    });
    assert!(written, "blob writes still fail after the restart: {last:?}");
    wait_rev(&a, "blobs/after", &rev_of(&after));
    assert_reads(&a, "blobs/after", &after);
    // Uncached content can be fetched again.
    assert_reads(&b, "blobs/unseen", &unseen);
    // What failed offline changed nothing.
    assert!(!a.path("blobs/new").exists(), "the blob written offline reached the other node");
    assert!(!a.path("blobs/closed").exists(), "the blob written offline reached the other node");
    for name in ["blobs/new", "blobs/closed"] {
        assert!(!b.path(name).exists(), "{name}, refused offline, was left behind on its node");
    }
    assert_reads(&a, "blobs/seen", &seen);
    assert_reads(&b, "blobs/seen", &seen);
    assert_eq!(xattr(&a.path("blobs/seen"), "user.syncfs.rev"), Some(rev_of(&seen)));
}

/// Garbage collection deletes objects no path names, keeps an object another node's path
/// still names, and content written again after its object was collected is stored again.
#[test]
fn garbage_collection_deletes_only_unreferenced_objects() {
    let server = NatsServer::start();
    let a = node(&server, "a", Some(QUICK_GC));
    let b = node(&server, "b", Some(QUICK_GC));
    let (x, y) = (random(200 << 10), random(200 << 10));
    let (rev_x, rev_y) = (rev_of(&x), rev_of(&y));
    std::fs::write(a.path("blobs/x"), &x).unwrap();
    std::fs::write(a.path("blobs/y"), &y).unwrap();
    std::fs::write(b.path("blobs/z"), &x).unwrap();
    let objects = Objects::open(&server);
    assert_eq!(objects.names(), {
        let mut v = vec![rev_x.clone(), rev_y.clone()];
        v.sort();
        v
    });
    wait_rev(&a, "blobs/z", &rev_x);
    a.sh_ok("rm blobs/x blobs/y");
    assert!(wait_gone(&b.path("blobs/x")) && wait_gone(&b.path("blobs/y")));
    assert!(
        wait_slow(Duration::from_secs(15), || !objects.has(&rev_y)),
        "the unreferenced object is still there: {:?}\nA: {}\nB: {}",
        objects.names(),
        a.status()["blobs"],
        b.status()["blobs"]
    );
    assert!(objects.has(&rev_x), "an object z points at was collected");
    // A few more cycles (past the grace period) do not take it either.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(objects.has(&rev_x), "an object z points at was collected");
    assert_reads(&a, "blobs/z", &x);
    assert_reads(&b, "blobs/z", &x);
    for m in [&a, &b] {
        let gc = &m.status()["blobs"]["gc"];
        assert!(gc["at"].is_string(), "no collection ran: {gc}");
    }
    // Content collected, then written again: it is uploaded again and stays.
    std::fs::write(a.path("blobs/w"), &y).unwrap();
    assert!(objects.has(&rev_y), "the rewritten content was not uploaded again");
    wait_rev(&b, "blobs/w", &rev_y);
    assert_reads(&b, "blobs/w", &y);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(objects.has(&rev_y), "the rewritten content was collected");
    assert!(objects.has(&rev_x));
    assert_reads(&b, "blobs/w", &y);
}

/// `mv` and `rm` of a blob on one node reach the other: the new name has the same content
/// and revision, the old name goes, and a removed blob goes.
#[test]
fn renames_and_removals_propagate() {
    let server = NatsServer::start();
    let a = node(&server, "a", None);
    let b = node(&server, "b", None);
    let content = random(64 << 10);
    let rev = rev_of(&content);
    std::fs::write(a.path("blobs/a"), &content).unwrap();
    wait_rev(&b, "blobs/a", &rev);
    assert_reads(&b, "blobs/a", &content);
    a.sh_ok("mv blobs/a blobs/b");
    wait_rev(&b, "blobs/b", &rev);
    assert!(wait_gone(&b.path("blobs/a")), "the old name is still on B");
    assert_reads(&b, "blobs/b", &content);
    assert_eq!(xattr(&a.path("blobs/b"), "user.syncfs.rev"), Some(rev.clone()));
    assert!(!a.path("blobs/a").exists());
    a.sh_ok("rm blobs/b");
    assert!(wait_gone(&b.path("blobs/b")), "the removed blob is still on B");
    assert_eq!(b.status()["blobs"]["paths"], 0);
}

/// Every open after new content arrived reads the new content, also while a program still
/// has the old one open (and after it closed it).
#[test]
fn new_opens_read_new_content_while_the_old_is_still_open() {
    let server = NatsServer::start();
    let a = node(&server, "a", None);
    let b = node(&server, "b", None);
    let (v1, v2) = (random(300 << 10), random(300 << 10));
    std::fs::write(a.path("blobs/f"), &v1).unwrap();
    wait_rev(&b, "blobs/f", &rev_of(&v1));
    let mut old = std::fs::File::open(b.path("blobs/f")).unwrap();
    let mut head = vec![0u8; 1000];
    old.read_exact(&mut head).unwrap();
    assert_eq!(head, v1[..1000]);
    std::fs::write(a.path("blobs/f"), &v2).unwrap();
    wait_rev(&b, "blobs/f", &rev_of(&v2));
    assert_reads(&b, "blobs/f", &v2);
    // The old handle still reads (which bytes: the kernel's page cache of the file is shared,
    // as for every synced file, docs/SEMANTICS.md).
    let mut rest = Vec::new();
    old.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len(), v1.len() - 1000);
    drop(old);
    assert_reads(&b, "blobs/f", &v2);
    assert_reads(&a, "blobs/f", &v2);
}
