//! Hostile names on every tier (issue 10, fault suite 6): names git reserves, NATS subject
//! tokens and wildcards, whitespace, invalid UTF-8, the escape characters of the KV key codec,
//! and names of 255 and 256 bytes. Each is created, written, read, renamed and unlinked on one
//! node; the other node (real NATS server, real git remote) must see exactly the same names and
//! contents, no name may address another's key, and the daemons must keep syncing afterwards.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::git::{node, wait_pushed, Remote};
use crate::harness::{wait_for, Mount};
use crate::nats::NatsServer;

/// The names git's tree-entry validation refuses (`EPERM` at create on git paths).
/// (`.git` itself is no hostile name: a built-in rule keeps it local on every tier, for git's
/// own repositories; mount-tests/git.rs tests it.)
const GIT_RESERVED: [&[u8]; 5] = [b".git ", b".git.", b"GIT~1", b"git~1", b".GIT"];

/// Every other hostile name: each must work on every syncing tier.
fn ordinary_hostile() -> Vec<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = [
        &b"*"[..], b">", b"a.b", b"$JS", b"_INBOX", b"$KV", b"a b", b" lead", b"trail ", b"a\tb", b"a\nb", b"a\rb",
        b"...", b"..a", b"=", b"==", b"=2E", b"a=3Db", b"%", b"%2E", b"%00", b"\\", b"a*b>c", b"\xff\xfe", b"caf\xe9",
        b"\xc3", b"\xed\xa0\x80",
    ]
    .iter()
    .map(|n| n.to_vec())
    .collect();
    names.push(vec![b'n'; 255]);
    names.push(vec![b'.'; 255]); // every byte an escape in a KV key: 765 bytes of key
    names.push([b"\xff".repeat(254), b"x".to_vec()].concat());
    names
}

/// A tier under test: its directory in the default table and what it refuses.
struct Tier {
    dir: &'static str,
    /// Whether the other node sees the files (everything but `local`).
    synced: bool,
    /// Whether git's reserved names are refused (`EPERM`, docs/errors.md).
    git: bool,
    /// What a rename within the directory gives (`EXDEV` on append paths, docs/errors.md).
    rename_errno: Option<i32>,
}

fn name_path(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(OsStr::from_bytes(name))
}

/// Creates (or appends to, on a new file: both give the content) `path` with `content`.
fn write(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(content)?;
    f.sync_all()?;
    drop(f);
    Ok(())
}

/// The files below `dir` (recursively, as relative byte paths) and their contents.
fn snapshot(dir: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(content) = std::fs::read(&p) {
                out.insert(p.strip_prefix(dir).unwrap().as_os_str().as_bytes().to_vec(), content);
            }
        }
    }
    out
}

fn show(files: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    files
        .iter()
        .map(|(k, v)| format!("{:?} = {:?}", String::from_utf8_lossy(k), String::from_utf8_lossy(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `b`'s copy of `dir` is exactly `want`.
fn converges(b: &Mount, dir: &str, want: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let ok = wait_for(Duration::from_secs(40), || &snapshot(&b.path(dir)) == want);
    assert!(
        ok,
        "the other node's {dir} differs.\n--- expected\n{}\n--- found\n{}\n--- status\n{}",
        show(want),
        show(&snapshot(&b.path(dir))),
        b.status()
    );
}

/// Nothing is stuck: NATS connected, nothing queued, git committed and pushed with no error.
fn healthy(m: &Mount) {
    let ok = wait_for(Duration::from_secs(30), || {
        let s = m.status();
        s["nats"]["state"] == "connected"
            && s["pending_writes"] == 0
            && s["git"]["error"].is_null()
            && s["git"]["quarantined"].as_array().is_none_or(|q| q.is_empty())
            && s["conflicts"].as_array().is_none_or(|c| c.is_empty())
    });
    assert!(ok, "{}", m.status());
    wait_pushed(m);
    // Nor did a name stop the node from keeping its own state (the stream tier's resume point).
    let log = std::fs::read_to_string(m.state.join("syncfs.log")).unwrap_or_default();
    let unsaved: Vec<&str> = log.lines().filter(|l| l.contains("cannot save")).take(3).collect();
    assert!(unsaved.is_empty(), "{}", unsaved.join("\n"));
}

fn hostile_names_on(tier: Tier) {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    let b = node("b", &remote, &nats);
    let dir = a.path(tier.dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut want: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();

    // Names git reserves: refused on git paths, ordinary names elsewhere.
    for name in GIT_RESERVED {
        let path = name_path(&dir, name);
        let r = write(&path, b"reserved\n");
        if tier.git {
            let err = r.expect_err(&format!("{:?} was created on a git path", String::from_utf8_lossy(name)));
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{:?}: {err}", String::from_utf8_lossy(name));
            assert!(!path.exists());
        } else {
            r.unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(name)));
            want.insert(name.to_vec(), b"reserved\n".to_vec());
        }
    }
    // Everything else works on every tier, and reads back on this node at once.
    for (i, name) in ordinary_hostile().iter().enumerate() {
        let path = name_path(&dir, name);
        let content = format!("content {i} of {:?}\n", String::from_utf8_lossy(name)).into_bytes();
        write(&path, &content).unwrap_or_else(|e| panic!("{:?} ({} bytes): {e}", String::from_utf8_lossy(name), name.len()));
        assert_eq!(std::fs::read(&path).unwrap(), content, "{:?}", String::from_utf8_lossy(name));
        want.insert(name.clone(), content);
    }
    // A name longer than 255 bytes is refused, and nothing is created.
    for long in [vec![b'n'; 256], vec![b'.'; 256], b"\xff".repeat(300)] {
        let err = write(&name_path(&dir, &long), b"x").expect_err("a 256-byte name was created");
        assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG), "{} bytes: {err}", long.len());
    }
    // `a.b` and `a/b` are different files (a KV key joins components with `.`).
    std::fs::create_dir_all(dir.join("a")).unwrap();
    write(&dir.join("a/b"), b"the file b in a\n").unwrap();
    want.insert(b"a/b".to_vec(), b"the file b in a\n".to_vec());
    assert_eq!(std::fs::read(dir.join("a.b")).unwrap(), want[&b"a.b"[..]]);
    assert_eq!(snapshot(&dir), want, "this node's listing");
    if tier.synced {
        converges(&b, tier.dir, &want);
    }

    // Renames between hostile names.
    let renames: [(&[u8], &[u8]); 4] =
        [(b"a.b", b"a b.c"), (b"\xff\xfe", b"\xfe\xff"), (b"*", b">>"), (b"=2E", b"=2E=2E")];
    for (from, to) in renames {
        if !want.contains_key(from) { continue; }
        let r = std::fs::rename(name_path(&dir, from), name_path(&dir, to));
        match tier.rename_errno {
            Some(errno) => assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(errno))),
            None => {
                r.unwrap_or_else(|e| panic!("rename {:?}: {e}", String::from_utf8_lossy(from)));
                let content = want.remove(from).unwrap();
                want.insert(to.to_vec(), content);
            }
        }
    }
    {
        let long_to = [vec![b'm'; 254], b"\xff".to_vec()].concat();
        let r = std::fs::rename(name_path(&dir, &[b'n'; 255]), name_path(&dir, &long_to));
        if tier.rename_errno.is_none() {
            r.unwrap();
            let content = want.remove(&[b'n'; 255][..]).unwrap();
            want.insert(long_to, content);
        }
    }
    // Unlinks: every other name goes.
    let doomed: Vec<Vec<u8>> = want.keys().filter(|k| !k.contains(&b'/')).step_by(2).cloned().collect();
    for name in &doomed {
        std::fs::remove_file(name_path(&dir, name)).unwrap_or_else(|e| panic!("unlink {:?}: {e}", String::from_utf8_lossy(name)));
        want.remove(name);
    }
    assert_eq!(snapshot(&dir), want, "this node's listing after renames and unlinks");
    if tier.synced {
        converges(&b, tier.dir, &want);
        // And the other way round: B's own writes with hostile names reach A.
        write(&name_path(&b.path(tier.dir), b"from b: a.b*>\xff"), b"b\n").unwrap();
        want.insert(b"from b: a.b*>\xff".to_vec(), b"b\n".to_vec());
        converges(&a, tier.dir, &want);
    }

    // The daemons were not stopped by any of it: a later ordinary write propagates.
    write(&dir.join("later"), b"later\n").unwrap();
    want.insert(b"later".to_vec(), b"later\n".to_vec());
    if tier.synced {
        converges(&b, tier.dir, &want);
    }
    healthy(&a);
    healthy(&b);
    if tier.rename_errno == Some(libc::EXDEV) {
        // The stream tier saves where each file's messages start and end, to resume from on the
        // next mount: the save must cover the files named with any bytes.
        let saved = || {
            std::fs::read_dir(a.state.join("streams")).into_iter().flatten().flatten().any(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&format!("{}/later", tier.dir)))
            })
        };
        let ok = wait_for(Duration::from_secs(15), saved);
        let log = std::fs::read_to_string(a.state.join("syncfs.log")).unwrap_or_default();
        let why: Vec<&str> = log.lines().filter(|l| l.contains("cannot save")).take(2).collect();
        assert!(ok, "the stream state was never saved:\n{}", why.join("\n"));
    }
    // A new node, mounted from the servers alone, sees the same.
    if tier.synced {
        let c = node("c", &remote, &nats);
        converges(&c, tier.dir, &want);
    }
}

#[test]
fn hostile_names_on_local_paths() {
    hostile_names_on(Tier { dir: "local/h", synced: false, git: false, rename_errno: None });
}

#[test]
fn hostile_names_on_git_paths() {
    hostile_names_on(Tier { dir: "durable/h", synced: true, git: true, rename_errno: None });
}

#[test]
fn hostile_names_on_kv_lww_paths() {
    hostile_names_on(Tier { dir: "fast/casual/h", synced: true, git: false, rename_errno: None });
}

#[test]
fn hostile_names_on_kv_cas_create_paths() {
    hostile_names_on(Tier { dir: "fast/claims/h", synced: true, git: false, rename_errno: None });
}

#[test]
fn hostile_names_on_stream_paths() {
    hostile_names_on(Tier { dir: "fast/messages/h", synced: true, git: false, rename_errno: Some(libc::EXDEV) });
}

#[test]
fn hostile_names_on_blob_paths() {
    hostile_names_on(Tier { dir: "blobs/h", synced: true, git: false, rename_errno: None });
}
