//! A full state disk (fault suite 5, ENOSPC): the state directory on a small tmpfs the test
//! mounts and fills, on every tier. What must hold: a write that was not kept fails with
//! `ENOSPC` (never `EIO`, never 0), nothing acknowledged is lost, stored values are unchanged
//! after a refused write, the daemon survives and logs again once space returns, and after
//! that writes work and copies a full disk tore are repaired.

use std::fs::File;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::harness::{process_alive, wait_for, Mount, Options};
use crate::nats::NatsServer;

/// A mount whose state directory is a tmpfs of its own, unmounted after the daemon.
struct SmallDisk {
    mount: Option<Mount>,
    state: PathBuf,
}

impl SmallDisk {
    fn mount(mib: u64, opts: Options) -> SmallDisk {
        let mut m = Mount::prepare();
        std::fs::create_dir_all(&m.state).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(&m.state)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs");
        let state = m.state.clone();
        let out = m.try_mount(&opts);
        let disk = SmallDisk { mount: Some(m), state };
        assert!(out.status.success(), "syncfs mount failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        disk
    }

    fn m(&self) -> &Mount {
        self.mount.as_ref().unwrap()
    }

    fn filler(&self) -> PathBuf {
        self.state.join("filler")
    }

    /// Fills the disk to its last page.
    fn fill(&self) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.filler()).unwrap();
        let buf = vec![0u8; 1 << 16];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                    break;
                }
            }
        }
        // The last partial page too.
        while f.write(&buf[..512]).is_ok_and(|n| n > 0) {}
    }

    /// Gives the space back.
    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("syncfs.log")).unwrap_or_default()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        drop(self.mount.take());
        let _ = Command::new("umount").arg("-l").arg(&self.state).status();
        let _ = std::fs::remove_dir(&self.state);
    }
}

/// Writes `data` to `path` (appending with `append`, else replacing, then fsync with `fsync`)
/// and closes it: "ok", or the failing step and its errno (`close:ENOSPC`).
fn attempt(path: &Path, data: &[u8], append: bool, fsync: bool) -> String {
    attempt_with(path, data, if append { How::Append } else { How::Replace }, fsync)
}

/// How [`attempt_with`] opens the file.
#[derive(Clone, Copy, PartialEq)]
enum How {
    /// `O_APPEND`.
    Append,
    /// `O_TRUNC`: the open itself empties the file, whatever the writes then do (POSIX).
    Replace,
    /// At offset 0 without `O_TRUNC`: a refused write leaves the stored value.
    Overwrite,
}

fn attempt_with(path: &Path, data: &[u8], how: How, fsync: bool) -> String {
    let name = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ENOSPC) => "ENOSPC".to_string(),
        Some(libc::EIO) => "EIO".to_string(),
        Some(n) => format!("errno {n}"),
        None => e.to_string(),
    };
    let mut opts = std::fs::OpenOptions::new();
    match how {
        How::Append => opts.append(true).create(true),
        How::Replace => opts.write(true).create(true).truncate(true),
        How::Overwrite => opts.write(true).create(true),
    };
    let mut f = match opts.open(path) {
        Ok(f) => f,
        Err(e) => return format!("open:{}", name(e)),
    };
    if let Err(e) = f.write_all(data) {
        return format!("write:{}", name(e));
    }
    if fsync {
        if let Err(e) = f.sync_all() {
            return format!("fsync:{}", name(e));
        }
    }
    // SAFETY: closing the fd we own, to see close's own answer.
    if unsafe { libc::close(f.into_raw_fd()) } != 0 {
        return format!("close:{}", name(std::io::Error::last_os_error()));
    }
    "ok".into()
}

fn refused_with_enospc(outcome: &str) -> bool {
    outcome.ends_with(":ENOSPC")
}

fn random(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::io::Read::read_exact(&mut File::open("/dev/urandom").unwrap(), &mut buf).unwrap();
    buf
}

fn digest(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Stays true for `secs` seconds (something that must not happen, given time to happen).
fn holds_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    !wait_for(Duration::from_secs(secs), || !cond())
}

#[test]
fn local_tier_and_the_log_survive_a_full_disk() {
    let opts = Options {
        env: vec![("SYNCFS_LOG".into(), "debug".into())],
        ..Options::local()
    };
    let disk = SmallDisk::mount(16, opts);
    let m = disk.m();
    let pid = m.pid();
    std::fs::write(m.path("kept.txt"), "kept\n").unwrap();
    disk.fill();
    // Every request logs a line (debug), none of which fits.
    for i in 0..200 {
        let _ = std::fs::read_dir(&m.mnt).map(|d| d.count());
        let _ = std::fs::metadata(m.path("kept.txt"));
        if i % 20 == 0 {
            let outcome = attempt(&m.path(&format!("new-{i}.txt")), &[b'x'; 8192], false, false);
            assert!(refused_with_enospc(&outcome), "a new file on a full disk: {outcome}");
        }
    }
    assert!(process_alive(pid), "the daemon died on a full disk:\n{}", disk.log());
    assert_eq!(std::fs::read_to_string(m.path("kept.txt")).unwrap(), "kept\n");
    disk.free();
    std::fs::write(m.path("after-space.txt"), "back\n").unwrap();
    assert_eq!(std::fs::read_to_string(m.path("after-space.txt")).unwrap(), "back\n");
    assert!(process_alive(pid));
    let log = disk.log();
    assert!(log.contains("log lines were dropped"), "the log says what it lost");
    assert!(log.contains("after-space.txt"), "the daemon logs again once space returns");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(std::fs::read_to_string(disk.state.join("panic.log")).unwrap(), "", "no panic");
}

const GIT_TABLE: &str = "policies:\n  - pattern: \"durable/**\"\n    tier: git\n    consistency: merge\n";

/// The branch's version of `rel` on this node (its own git repository).
fn branch_file(state: &Path, rel: &str) -> Option<String> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(state.join("git"))
        .args(["show", &format!("refs/heads/main:{rel}")])
        .output()
        .unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn git_writes_on_a_full_disk_get_enospc_and_nothing_is_quarantined() {
    let disk = SmallDisk::mount(
        24,
        Options {
            policies: Some(GIT_TABLE.into()),
            config: Some("git:\n  quiet_ms: 1500\n".into()),
            ..Options::default()
        },
    );
    let m = disk.m();
    std::fs::create_dir_all(m.path("durable")).unwrap();
    assert_eq!(attempt(&m.path("durable/a.yml"), b"v: 1\n", false, true), "ok");
    assert_eq!(branch_file(&disk.state, "durable/a.yml").as_deref(), Some("v: 1\n"));

    // Room for the program's copy of a write, not for git's.
    let content = random(256 << 10);
    let mut yaml = b"v: ".to_vec();
    yaml.extend(content.iter().map(|b| b'a' + b % 26));
    yaml.push(b'\n');
    for fsync in [false, true] {
        disk.fill();
        let len = std::fs::metadata(disk.filler()).unwrap().len();
        std::fs::File::options().write(true).open(disk.filler()).unwrap().set_len(len - (320 << 10)).unwrap();
        let outcome = attempt(&m.path("durable/a.yml"), &yaml, false, fsync);
        assert!(refused_with_enospc(&outcome), "a git write git has no room for (fsync {fsync}): {outcome}");
        assert_eq!(std::fs::read_to_string(m.path("durable/a.yml")).unwrap(), "v: 1\n", "the stored version stays");
        disk.free();
    }

    // Changes closed just before the disk fills wait for their commit, and are not
    // quarantined as changes git refuses.
    for i in 0..5 {
        assert_eq!(attempt(&m.path(&format!("durable/b{i}.yml")), format!("n: {i}\n").as_bytes(), false, false), "ok");
    }
    disk.fill();
    std::thread::sleep(Duration::from_secs(4));
    let quarantined = m.status()["git"]["quarantined"].clone();
    assert_eq!(quarantined, serde_json::json!([]), "a full disk is no change's fault");
    disk.free();
    for i in 0..5 {
        let rel = format!("durable/b{i}.yml");
        assert!(
            wait_for(Duration::from_secs(20), || branch_file(&disk.state, &rel).as_deref() == Some(format!("n: {i}\n").as_str())),
            "{rel} is committed once space returns"
        );
    }
    assert_eq!(attempt(&m.path("durable/a.yml"), b"v: 3\n", false, true), "ok");
    assert_eq!(branch_file(&disk.state, "durable/a.yml").as_deref(), Some("v: 3\n"));
    assert_eq!(m.status()["git"]["quarantined"], serde_json::json!([]));
}

const STREAM_TABLE: &str = "policies:\n  - pattern: \"logs/**\"\n    tier: nats-stream\n    consistency: append\n";

#[test]
fn appends_on_a_full_disk_get_enospc_and_torn_copies_are_repaired() {
    let server = NatsServer::start();
    let opts = |node: &str| Options {
        node: Some(node.into()),
        nats: vec![server.url()],
        policies: Some(STREAM_TABLE.into()),
        ..Options::default()
    };
    let disk = SmallDisk::mount(16, opts("a"));
    let a = disk.m();
    let b = Mount::with(opts("b"));
    std::fs::create_dir_all(a.path("logs")).unwrap();
    assert_eq!(attempt(&a.path("logs/t.log"), b"first\n", true, false), "ok");
    let read = |m: &Mount| std::fs::read(m.path("logs/t.log")).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(10), || read(&b) == b"first\n"));

    disk.fill();
    // More than the last page of the file holds.
    let mine = vec![b'a'; 10_000];
    let outcome = attempt(&a.path("logs/t.log"), &mine, true, false);
    assert!(refused_with_enospc(&outcome), "an append the writer's copy has no room for: {outcome}");
    assert_eq!(read(a), b"first\n", "the writer's copy is unchanged");
    assert!(holds_for(2, || read(&b) == b"first\n"), "a refused append reached the stream");

    // Another node's append arrives while the disk is full: the copy tears, then is repaired.
    let theirs = vec![b'b'; 10_000];
    assert_eq!(attempt(&b.path("logs/t.log"), &theirs, true, false), "ok");
    let mut want = b"first\n".to_vec();
    want.extend(&theirs);
    disk.free();
    assert!(
        wait_for(Duration::from_secs(20), || read(a) == want),
        "the copy the full disk tore is repaired: {} bytes, want {}",
        read(a).len(),
        want.len()
    );
    assert_eq!(attempt(&a.path("logs/t.log"), b"after\n", true, false), "ok");
    want.extend(b"after\n");
    assert_eq!(read(a), want);
    assert!(wait_for(Duration::from_secs(10), || read(&b) == want));
}

const BLOB_TABLE: &str = "policies:\n  - pattern: \"blobs/**\"\n    tier: object-store\n    consistency: content-addressed\n";

#[test]
fn the_blob_cache_frees_deleted_content_and_makes_room_on_a_small_disk() {
    let server = NatsServer::start();
    let opts = |node: &str| Options {
        node: Some(node.into()),
        nats: vec![server.url()],
        policies: Some(BLOB_TABLE.into()),
        ..Options::default()
    };
    let disk = SmallDisk::mount(48, opts("a"));
    let a = disk.m();
    let b = Mount::with(opts("b"));
    std::fs::create_dir_all(a.path("blobs")).unwrap();
    // Written and removed, one after the other: 64 MiB through a 48 MiB disk.
    for i in 0..8 {
        let path = a.path(&format!("blobs/w{i}.bin"));
        let outcome = attempt(&path, &random(8 << 20), false, false);
        assert_eq!(outcome, "ok", "blob write {i} on a disk whose blobs were all removed");
        std::fs::remove_file(&path).unwrap();
    }
    // Read from another node's writes: the cache makes room for each fetch.
    std::fs::create_dir_all(b.path("blobs")).unwrap();
    let mut digests = Vec::new();
    for i in 0..7 {
        let data = random(8 << 20);
        digests.push(digest(&data));
        assert_eq!(attempt(&b.path(&format!("blobs/r{i}.bin")), &data, false, false), "ok");
    }
    for (i, want) in digests.iter().enumerate().chain(digests.iter().enumerate().take(1)) {
        let path = a.path(&format!("blobs/r{i}.bin"));
        assert!(wait_for(Duration::from_secs(20), || std::fs::metadata(&path).is_ok_and(|m| m.len() == 8 << 20)));
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("reading blob {i} on a small disk: {e}"));
        assert_eq!(&digest(&got), want, "blob {i}");
    }
    assert_eq!(attempt(&a.path("blobs/last.bin"), &random(8 << 20), false, false), "ok");
}

const KV_TABLE: &str = "policies:\n  - pattern: \"fast/**\"\n    tier: nats-kv\n    consistency: lww\n";

#[test]
fn kv_writes_on_a_full_disk_are_refused_or_kept_never_lost() {
    let mut server = NatsServer::start();
    let opts = |node: &str, url: String| Options {
        node: Some(node.into()),
        nats: vec![url],
        policies: Some(KV_TABLE.into()),
        ..Options::default()
    };
    let disk = SmallDisk::mount(16, opts("a", server.url()));
    let a = disk.m();
    let b = Mount::with(opts("b", server.url()));
    std::fs::create_dir_all(a.path("fast")).unwrap();
    assert_eq!(attempt(&a.path("fast/k"), b"v1\n", false, false), "ok");
    let read = |m: &Mount, rel: &str| std::fs::read(m.path(rel)).ok();
    assert!(wait_for(Duration::from_secs(10), || read(&b, "fast/k").as_deref() == Some(b"v1\n")));

    disk.fill();
    let outcome = attempt_with(&a.path("fast/k"), &[b'2'; 10_000], How::Overwrite, false);
    assert!(refused_with_enospc(&outcome), "a KV write on a full disk: {outcome}");
    assert_eq!(read(a, "fast/k").as_deref(), Some(&b"v1\n"[..]));
    assert!(holds_for(2, || read(&b, "fast/k").as_deref() == Some(b"v1\n")));
    disk.free();
    assert_eq!(attempt(&a.path("fast/k"), b"v3\n", false, false), "ok");
    assert!(wait_for(Duration::from_secs(10), || read(&b, "fast/k").as_deref() == Some(b"v3\n")));

    // Offline, lww writes queue in the journal: on a nearly full disk each is queued (and
    // lands) or refused with ENOSPC (and never lands).
    server.stop();
    assert!(wait_for(Duration::from_secs(20), || a.status()["nats"]["state"] == "disconnected"));
    // Rounds with 16, 4 and 8 KiB free: the shadow fits, then the journal's record may not.
    let mut values: Vec<(String, Vec<u8>)> = Vec::new();
    let mut outcomes: Vec<String> = Vec::new();
    for (round, free) in [16u64 << 10, 4 << 10, 8 << 10].into_iter().enumerate() {
        disk.fill();
        let len = std::fs::metadata(disk.filler()).unwrap().len();
        std::fs::File::options().write(true).open(disk.filler()).unwrap().set_len(len.saturating_sub(free)).unwrap();
        for i in 0..4 {
            let (rel, v) = (format!("fast/q{round}-{i}"), vec![b'a' + i as u8; 4000]);
            outcomes.push(attempt(&a.path(&rel), &v, false, false));
            values.push((rel, v));
        }
        disk.free();
    }
    for o in &outcomes {
        assert!(o == "ok" || refused_with_enospc(o), "an offline lww write on a full disk: {o} (all: {outcomes:?})");
    }
    server.restart();
    for ((rel, v), o) in values.iter().zip(&outcomes) {
        if o == "ok" {
            assert!(
                wait_for(Duration::from_secs(30), || read(&b, rel).as_deref() == Some(v.as_slice())),
                "{rel} was acknowledged ({outcomes:?}) but never reached the other node"
            );
        }
    }
    // The open that created a refused file succeeded: the file may exist, empty (a create,
    // like `touch`), but never with the refused bytes.
    for ((rel, _), o) in values.iter().zip(&outcomes) {
        if o != "ok" {
            for m in [a, &b] {
                let got = read(m, rel);
                assert!(got.as_ref().is_none_or(|c| c.is_empty()), "{rel} was refused ({o}) but holds {} bytes", got.unwrap().len());
            }
        }
    }
    eprintln!("offline lww writes on a nearly full disk: {outcomes:?}");
}
