//! Random operations on two and three real mounts, recorded and judged by `history`.
//!
//! Each driver mounts nodes on one nats-server (and, for git paths, one bare remote), drives
//! real system calls from threads (std::fs, and bash or python where the idiom is a program's:
//! noclobber, `>>`, tempfile + fsync + os.replace), records every operation with the shared
//! [`Recorder`], and then runs the checks. A driver fails with the checker's report: the
//! violating ops with their times (relative to the recorder's start) and escaped bytes.
//!
//! **Drivers.** (i) KV lww: A rewrites keys with values of random length (2..300 bytes, each
//! starting with a unique tag, so every torn shape is bytes nobody wrote), B and C read in
//! loops; checks a, b, d. (ii) The same on a git lww path, three nodes. (iii) Claims: 40 keys,
//! 8 racers per key on each of A and B, readers on A, B, C; checks a, c and that every node's
//! last read is the owner's content. A std racer's `open(O_EXCL)` is recorded as a create of
//! "" and its write + `close` as a write of its content (readers on its node may see the empty
//! file in between); a bash racer's create and write both span its process. (iv) Appends from
//! A and B to one file, read on C; check e. (v) Read-modify-write by python on `durable/`
//! (temp file + fsync + os.replace, and in place); check f and no conflict or temp files.
//!
//! **Settle bounds.** `SETTLE_KV` and `SETTLE_GIT` bound propagation: a read invoked that long
//! after a write's close returned must see it (or a later write). They are correctness bounds,
//! not performance claims, and sized to hold on a loaded two-core machine: KV changes arrive
//! in about a millisecond (docs/benchmarks.md), git changes in a quarter of a second with the
//! short timings below (quiet period, commit, push, NATS notice, fetch, merge); the drivers
//! print what they measured.
//!
//! Each driver also asserts that it observed enough (reads per node, distinct values), so a
//! run that recorded nothing cannot pass. `CHECKER_SEED=N` replays a run's random choices.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use crate::git::{Remote, QUICK};
use crate::harness::{wait_content, wait_for, Mount, Options};
use crate::history::{
    self, check_appends, check_fields, check_linearizable, check_lww_converged, check_no_stale_reads, check_reads_written, Final, History, Kind, Recorder,
    Violation,
};
use crate::nats::NatsServer;

/// KV propagation bound (loopback: about a millisecond; generous for a loaded machine).
const SETTLE_KV: Duration = Duration::from_secs(2);
/// Git propagation bound with [`QUICK`] timings (measured: about 0.25 s when idle).
const SETTLE_GIT: Duration = Duration::from_secs(5);


/// The default table's modes, plus a git lww path.
const TABLE: &str = r#"
policies:
  - pattern: "fast/claims/**"
    tier: nats-kv
    consistency: cas-create
    ttl: 300
    ephemeral: true
  - pattern: "fast/casual/**"
    tier: nats-kv
    consistency: lww
  - pattern: "fast/messages/**"
    tier: nats-stream
    consistency: append
    purge: true
  - pattern: "durable/lww/**"
    tier: git
    consistency: lww
  - pattern: "durable/**"
    tier: git
    consistency: merge
"#;

/// A node on `nats` (and `remote`), with [`TABLE`] and [`QUICK`].
fn node(name: &str, nats: &NatsServer, remote: Option<&Remote>) -> Mount {
    Mount::with(Options {
        node: Some(name.into()),
        nats: vec![nats.url()],
        git_remote: remote.map(|r| r.path.display().to_string()),
        policies: Some(TABLE.into()),
        config: Some(QUICK.into()),
        ..Default::default()
    })
}

/// Waits until the node committed and pushed everything (so finals are final).
fn wait_pushed(m: &Mount) -> bool {
    wait_for(Duration::from_secs(60), || {
        let g = &m.status()["git"];
        g["uncommitted"] == 0 && g["unpushed"] == 0 && g["error"].is_null()
    })
}

/// Random choices, replayable from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("CHECKER_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
        eprintln!("{test}: CHECKER_SEED={seed}");
        Rng(seed | 1)
    }

    /// Another stream for another thread, derived from this one.
    fn fork(&mut self) -> Rng {
        Rng(self.next() | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
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
}

/// A value of exactly `len` (>= 2) bytes starting with a tag unique to `n`, so no value is a
/// prefix of another and every torn shape is bytes nobody wrote.
fn tagged(rng: &mut Rng, n: usize, len: usize) -> Vec<u8> {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let tag = [DIGITS[n / 36 % 36], DIGITS[n % 36]];
    let mut v = tag.to_vec();
    v.extend(rng.letters(len.max(2) - 2).bytes());
    v
}

/// Lengths that alternate between short and long, the shapes that tear.
fn random_len(rng: &mut Rng) -> usize {
    if rng.next() % 2 == 0 {
        rng.range(2, 16) as usize
    } else {
        rng.range(100, 300) as usize
    }
}

/// An extended attribute of a file (the revision), as getfattr prints it.
fn xattr(path: &Path, name: &str) -> Option<String> {
    let out = Command::new("getfattr").args(["--only-values", "-n", name]).arg(path).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A node's settled value and revision of `key`, read until two reads around the revision
/// agree (the revision is a separate call).
fn final_of(m: &Mount, node: &str, key: &str) -> Final {
    let path = m.path(key);
    let mut last = None;
    for _ in 0..10 {
        let v1 = std::fs::read(&path).ok();
        let rev = xattr(&path, "user.syncfs.rev");
        let v2 = std::fs::read(&path).ok();
        last = Some(Final {
            node: node.into(),
            key: key.into(),
            value: v2.clone(),
            rev,
        });
        if v1 == v2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last.unwrap()
}

/// `close(2)` with its result: a KV write's error comes from close, which `drop` ignores.
fn close(f: std::fs::File) -> std::io::Result<()> {
    // SAFETY: the fd is ours, taken from the File, and closed once.
    if unsafe { libc::close(f.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How many ops of each kind each node recorded: printed so a run shows what it exercised.
fn summary(h: &History) -> String {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for o in &h.ops {
        let result = match o.result {
            Ok(()) => String::new(),
            Err(e) => format!("(errno {e})"),
        };
        *counts.entry((o.node.clone(), format!("{:?}{result}", o.kind))).or_default() += 1;
    }
    counts.iter().map(|((n, k), c)| format!("{n}:{k}={c}")).collect::<Vec<_>>().join(" ")
}

/// Fails with the checker's report when there are violations.
fn verdict(test: &str, h: &History, violations: &[Violation]) {
    eprintln!("{test}: {} ops ({}), {} violations", h.ops.len(), summary(h), violations.len());
    assert!(violations.is_empty(), "{test}: {}", history::report(violations, 25));
}

/// How long after a write's close a reader first read it, per reader node (median, max, and
/// how many writes it never saw): printed to back the settle bounds, never asserted.
fn propagation(h: &History, readers: &[&str]) -> String {
    let mut out = Vec::new();
    for node in readers {
        let mut delays: Vec<Duration> = Vec::new();
        let mut unseen = 0;
        for w in h.ops.iter().filter(|o| o.kind == Kind::Write && o.result.is_ok()) {
            let first = h
                .ops
                .iter()
                .find(|r| r.node == *node && r.kind == Kind::Read && r.key == w.key && r.value == w.value && r.ret >= w.invoke);
            match first {
                Some(r) => delays.push(r.ret.saturating_duration_since(w.ret)),
                None => unseen += 1,
            }
        }
        delays.sort();
        let median = delays.get(delays.len() / 2).copied().unwrap_or_default();
        let max = delays.last().copied().unwrap_or_default();
        out.push(format!("{node}: median {median:?} max {max:?} ({} seen, {unseen} never seen)", delays.len()));
    }
    out.join("; ")
}

/// Reads on `node` that returned bytes: a driver that saw nothing must not pass.
fn reads_with_bytes(h: &History, node: &str) -> Vec<Vec<u8>> {
    h.ops
        .iter()
        .filter(|o| o.node == node && o.kind == Kind::Read && o.result.is_ok())
        .filter_map(|o| o.value.clone())
        .collect()
}

/// One node rewrites `keys` with values of random length while `readers` read them in loops
/// (open + read + close); then every node's final value. Checks a, b and d.
#[allow(clippy::too_many_arguments)]
fn lww_driver(
    test: &str,
    (wname, writer): (&str, &Mount),
    readers: &[(&str, &Mount)],
    all: &[(&str, &Mount)],
    keys: &[&str],
    rounds: usize,
    duration: Duration,
    pause_ms: (u64, u64),
    read_pause: Duration,
    settle: Duration,
) {
    let mut rng = Rng::new(test);
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let (rec_w, stop_w, mut wrng) = (rec.clone(), stop.clone(), rng.fork());
        s.spawn(move || {
            let start = Instant::now();
            for n in 0..rounds {
                if start.elapsed() > duration {
                    break;
                }
                let key = keys[wrng.range(0, keys.len() as u64 - 1) as usize];
                let len = random_len(&mut wrng);
                let v = tagged(&mut wrng, n, len);
                let _ = rec_w.write(wname, key, &writer.path(key), &v);
                let pause = wrng.range(pause_ms.0, pause_ms.1);
                if pause > 0 {
                    std::thread::sleep(Duration::from_millis(pause));
                }
            }
            stop_w.store(true, Ordering::SeqCst);
        });
        for (name, m) in readers {
            let (rec_r, stop_r, mut rrng) = (rec.clone(), stop.clone(), rng.fork());
            s.spawn(move || {
                while !stop_r.load(Ordering::SeqCst) {
                    let key = keys[rrng.range(0, keys.len() as u64 - 1) as usize];
                    let _ = rec_r.read(name, key, &m.path(key));
                    if !read_pause.is_zero() {
                        std::thread::sleep(read_pause);
                    }
                }
            });
        }
    });
    let spread = propagation(&rec.history(), &readers.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    std::thread::sleep(settle);
    // Final reads (recorded: check b demands the last write) and final values.
    let mut finals = Vec::new();
    for (name, m) in all {
        for key in keys {
            if readers.iter().any(|(r, _)| r == name) {
                let _ = rec.read(name, key, &m.path(key));
            }
            finals.push(final_of(m, name, key));
        }
    }
    let h = rec.history();
    for (name, _) in readers {
        let seen = reads_with_bytes(&h, name);
        let distinct: std::collections::HashSet<&Vec<u8>> = seen.iter().collect();
        assert!(
            seen.len() >= 50 && distinct.len() >= 3,
            "{test}: {name} read too little to judge: {} reads, {} distinct values ({})",
            seen.len(),
            distinct.len(),
            summary(&h)
        );
    }
    eprintln!("{test}: propagation while writing: {spread}");
    let none = BTreeMap::new();
    let mut vs = check_reads_written(&h, &none);
    vs.extend(check_no_stale_reads(&h, &none, settle));
    vs.extend(check_lww_converged(&h, &none, &finals));
    verdict(test, &h, &vs);
}

/// (i) KV lww: A rewrites two keys with values of 2..300 bytes; B and C read them in loops.
#[test]
fn kv_lww_reads_return_written_values_on_three_nodes() {
    let nats = NatsServer::start();
    let (a, b, c) = (node("a", &nats, None), node("b", &nats, None), node("c", &nats, None));
    let keys = ["fast/casual/lww-0", "fast/casual/lww-1"];
    lww_driver(
        "kv_lww",
        ("a", &a),
        &[("b", &b), ("c", &c)],
        &[("a", &a), ("b", &b), ("c", &c)],
        &keys,
        1000,
        Duration::from_secs(15),
        (0, 3),
        Duration::ZERO,
        SETTLE_KV,
    );
}

/// (ii) The same on a git lww path: slower propagation, so pauses between writes (longer than
/// the quiet period, so commits happen) and a longer settle.
#[test]
fn git_lww_reads_return_written_values_on_three_nodes() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let (a, b, c) = (
        node("a", &nats, Some(&remote)),
        node("b", &nats, Some(&remote)),
        node("c", &nats, Some(&remote)),
    );
    a.sh_ok("mkdir -p durable/lww");
    let keys = ["durable/lww/v.txt"];
    lww_driver(
        "git_lww",
        ("a", &a),
        &[("b", &b), ("c", &c)],
        &[("a", &a), ("b", &b), ("c", &c)],
        &keys,
        100,
        Duration::from_secs(20),
        (50, 400),
        Duration::from_millis(3),
        SETTLE_GIT,
    );
    for m in [&a, &b, &c] {
        assert!(wait_pushed(m), "not pushed: {}", m.status()["git"]);
    }
}

/// One racer's exclusive create of `key`: std::fs (open O_EXCL, then write + close, recorded
/// as a create of "" and a write) or bash noclobber (one process: both ops span it).
fn race_once(rec: &Recorder, node: &str, process: &str, m: &Mount, key: &str, value: &[u8], bash: bool) {
    let path = m.path(key);
    let t0 = Instant::now();
    if !bash {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                let t1 = Instant::now();
                rec.record(node, process, key, Kind::Create, t0, t1, Some(Vec::new()), Ok(()));
                let r = f.write_all(value).and_then(|_| close(f));
                rec.record(
                    node,
                    process,
                    key,
                    Kind::Write,
                    t1,
                    Instant::now(),
                    Some(value.to_vec()),
                    r.map_err(|e| e.raw_os_error().unwrap_or(-1)),
                );
            }
            Err(e) => {
                rec.record(
                    node,
                    process,
                    key,
                    Kind::Create,
                    t0,
                    Instant::now(),
                    Some(value.to_vec()),
                    Err(e.raw_os_error().unwrap_or(-1)),
                );
            }
        }
        return;
    }
    let text = String::from_utf8_lossy(&value[..value.len() - 1]).into_owned();
    let out = Command::new("bash")
        .arg("-c")
        .arg("set -o noclobber; echo \"$V\" > \"$F\"")
        .env("V", &text)
        .env("F", &path)
        .output()
        .unwrap();
    let t1 = Instant::now();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        rec.record(node, process, key, Kind::Create, t0, t1, Some(Vec::new()), Ok(()));
        rec.record(node, process, key, Kind::Write, t0, t1, Some(value.to_vec()), Ok(()));
    } else if stderr.contains("cannot overwrite existing file") || stderr.contains("File exists") {
        rec.record(node, process, key, Kind::Create, t0, t1, Some(value.to_vec()), Err(libc::EEXIST));
    } else {
        eprintln!("{process} {key}: bash failed: {stderr}");
        rec.record(node, process, key, Kind::Create, t0, t1, Some(value.to_vec()), Err(-1));
    }
}

/// (iii) Claims: 40 keys, 8 racers per key on each of A and B (half std::fs O_EXCL, half bash
/// noclobber), readers on A, B and C during the race and for a settle after it. Checks a, c
/// (reads may lag by the settle bound), and that every node's last read is the owner's.
#[test]
fn claim_race_has_one_owner_and_every_node_reads_it() {
    const KEYS: usize = 40;
    const RACERS: usize = 8;
    let mut rng = Rng::new("claims");
    let nats = NatsServer::start();
    let (a, b, c) = (node("a", &nats, None), node("b", &nats, None), node("c", &nats, None));
    let keys: Vec<String> = (0..KEYS).map(|k| format!("fast/claims/race-{k}")).collect();
    let rec = Arc::new(Recorder::new());
    let race_done: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let barrier = Arc::new(Barrier::new(2 * RACERS));
    std::thread::scope(|s| {
        for (name, m) in [("a", &a), ("b", &b), ("c", &c)] {
            let (rec, race_done, keys, mut rrng) = (rec.clone(), race_done.clone(), &keys, rng.fork());
            s.spawn(move || loop {
                if race_done.lock().unwrap().is_some_and(|t| t.elapsed() > SETTLE_KV + Duration::from_millis(1500)) {
                    break;
                }
                // A sweep in random order: reads of every key, during and after the race.
                let mut order: Vec<usize> = (0..KEYS).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rrng.range(0, i as u64) as usize);
                }
                for k in order {
                    let _ = rec.read(name, &keys[k], &m.path(&keys[k]));
                }
            });
        }
        let racers: Vec<_> = [("a", &a), ("b", &b)]
            .into_iter()
            .flat_map(|(name, m)| (0..RACERS).map(move |j| (name, m, j)))
            .map(|(name, m, j)| {
                let (rec, barrier, keys) = (rec.clone(), barrier.clone(), &keys);
                s.spawn(move || {
                    let process = format!("{name}-racer{j}{}", if j % 2 == 1 { "-bash" } else { "" });
                    for (k, key) in keys.iter().enumerate() {
                        barrier.wait();
                        let value = format!("{name}-r{j}-k{k}\n");
                        race_once(&rec, name, &process, m, key, value.as_bytes(), j % 2 == 1);
                    }
                })
            })
            .collect();
        for r in racers {
            r.join().unwrap();
        }
        *race_done.lock().unwrap() = Some(Instant::now());
    });
    let h = rec.history();
    let mut vs = check_reads_written(&h, &BTreeMap::new());
    vs.extend(check_linearizable(&h, SETTLE_KV));
    // Every node's last read of each key is the owner's content.
    for key in &keys {
        let owner: Vec<&history::Op> = h.ops.iter().filter(|o| &o.key == key && o.kind == Kind::Write && o.result.is_ok()).collect();
        let Some(w) = owner.first() else { continue }; // no owner: check c reports it
        for node in ["a", "b", "c"] {
            let last = h
                .ops
                .iter()
                .filter(|o| &o.key == key && o.node == node && o.kind == Kind::Read)
                .max_by_key(|o| o.invoke);
            let last = last.expect("every node read every key");
            assert!(last.invoke > w.ret + SETTLE_KV, "{key}: {node}'s reads stopped before the settle bound");
            if last.value != w.value || last.result.is_err() {
                vs.push(Violation {
                    check: "iii:owner-read",
                    key: key.clone(),
                    detail: format!("{node}'s last read {} is not the owner's write {}", h.describe(last), h.describe(w)),
                });
            }
        }
    }
    let creates = h.ops.iter().filter(|o| o.kind == Kind::Create).count();
    assert_eq!(creates, KEYS * 2 * RACERS, "{}", summary(&h));
    verdict("claims", &h, &vs);
}

/// (iv) Appends: A and B append unique records to one `fast/messages/` file from two threads
/// each (std::fs O_APPEND + close, and bash `>>`), C reads it meanwhile. Check e.
#[test]
fn concurrent_appends_have_one_order_on_three_nodes() {
    const PER_THREAD: usize = 150;
    let mut rng = Rng::new("appends");
    let nats = NatsServer::start();
    let (a, b, c) = (node("a", &nats, None), node("b", &nats, None), node("c", &nats, None));
    let key = "fast/messages/checker.log";
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let (rec_r, stop_r) = (rec.clone(), stop.clone());
        let c = &c;
        s.spawn(move || {
            while !stop_r.load(Ordering::SeqCst) {
                let _ = rec_r.read("c", key, &c.path(key));
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let writers: Vec<_> = [("a", &a), ("b", &b)]
            .into_iter()
            .flat_map(|(name, m)| [(name, m, false), (name, m, true)])
            .map(|(name, m, bash)| {
                let (rec, mut wrng) = (rec.clone(), rng.fork());
                s.spawn(move || {
                    let process = format!("{name}-{}", if bash { "bash" } else { "std" });
                    let path = m.path(key);
                    for i in 0..PER_THREAD {
                        let len = wrng.range(0, 120) as usize;
                        let line = format!("{process}-{i:03}:{}", wrng.letters(len));
                        let record = format!("{line}\n").into_bytes();
                        if bash {
                            let t0 = Instant::now();
                            let out = Command::new("bash")
                                .arg("-c")
                                .arg("echo \"$V\" >> \"$F\"")
                                .env("V", &line)
                                .env("F", &path)
                                .output()
                                .unwrap();
                            let result = if out.status.success() { Ok(()) } else { Err(-1) };
                            if result.is_err() {
                                eprintln!("{process}: {}", String::from_utf8_lossy(&out.stderr));
                            }
                            rec.record(name, &process, key, Kind::Append, t0, Instant::now(), Some(record), result);
                        } else {
                            let _ = rec.run(name, key, Kind::Append, Some(&record), || {
                                let mut f = OpenOptions::new().append(true).create(true).open(&path)?;
                                f.write_all(&record)?;
                                close(f).map(|_| None)
                            });
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
    });
    let h = rec.history();
    let acked: usize = h
        .ops
        .iter()
        .filter(|o| o.kind == Kind::Append && o.result.is_ok())
        .map(|o| o.value.as_ref().unwrap().len())
        .sum();
    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    let read_all = || {
        nodes
            .iter()
            .map(|(n, m)| (n.to_string(), std::fs::read(m.path(key)).unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    let settled = wait_for(Duration::from_secs(20), || {
        let f = read_all();
        f.iter().all(|(_, x)| x == &f[0].1 && x.len() >= acked)
    });
    let finals = read_all();
    eprintln!(
        "appends: settled={settled}, final sizes {:?}, acknowledged bytes {acked}",
        finals.iter().map(|(n, f)| (n.clone(), f.len())).collect::<Vec<_>>()
    );
    assert!(reads_with_bytes(&h, "c").len() >= 20, "{}", summary(&h));
    verdict("appends", &h, &check_appends(&h, key, &finals));
}

/// The read-modify-write programs: python reads the document, thinks, and writes it back with
/// its fields set (lines edited by hand, no PyYAML), either through a temporary file in the
/// same directory that is fsynced and renamed over it (tempfile + os.fsync + os.replace, as
/// write-file-atomic does), or in place (open r+, read, think, seek 0, write, truncate, close).
/// It prints what it read.
const RMW: &str = r#"
import json, os, sys, tempfile, time
path, mode, think, sets, style = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
def edit(text):
    lines = text.split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    seen, out = set(), []
    for l in lines:
        k = l.split(':', 1)[0]
        if ':' in l and not l[:1] in (' ', '#', '-') and k in sets:
            out.append('%s: %s' % (k, sets[k]))
            seen.add(k)
        else:
            out.append(l)
    out += ['%s: %s' % (k, v) for k, v in sets.items() if k not in seen]
    return '\n'.join(out) + '\n'
if mode == 'replace':
    with open(path) as f:
        text = f.read()
    time.sleep(think)
    d = os.path.dirname(path)
    if style == 'prefixed':
        fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + '.')
    else:
        fd, tmp = tempfile.mkstemp(dir=d)
    with os.fdopen(fd, 'w') as f:
        f.write(edit(text))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
else:
    with open(path, 'r+') as f:
        text = f.read()
        time.sleep(think)
        f.seek(0)
        f.write(edit(text))
        f.truncate()
sys.stdout.write(text)
"#;

/// A document's top-level fields as strings.
fn fields_of(text: &str) -> Result<BTreeMap<String, String>, String> {
    let v: serde_json::Value = yaml_serde::from_str(text).map_err(|e| format!("not YAML ({e}): {}", history::esc(text.as_bytes())))?;
    let obj = v.as_object().ok_or_else(|| format!("not a map: {}", history::esc(text.as_bytes())))?;
    Ok(obj
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
        .collect())
}

/// (v) Merge paths lose no field: A and B each repeatedly read-modify-write `x.yml` (temp file
/// + fsync + rename) and `y.yml` (in place), each round adding a field of its own and updating
/// its own counter, with a think time long enough for the other node's change to arrive
/// between the read and the write. Check f on both documents, and no conflict files.
#[test]
fn merge_read_modify_write_loses_no_field_on_two_nodes() {
    const ROUNDS: usize = 10;
    let mut rng = Rng::new("rmw");
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let (a, b) = (node("a", &nats, Some(&remote)), node("b", &nats, Some(&remote)));
    let docs = [("durable/rmw/x.yml", "replace"), ("durable/rmw/y.yml", "inplace")];
    a.sh_ok("mkdir -p durable/rmw");
    for (doc, _) in docs {
        std::fs::write(a.path(doc), "kind: rmw\n").unwrap();
    }
    for (doc, _) in docs {
        assert!(wait_content(&b.path(doc), "kind: rmw\n"), "B never saw {doc}");
    }
    let rec = Arc::new(Recorder::new());
    std::thread::scope(|s| {
        for (name, m) in [("a", &a), ("b", &b)] {
            for (doc, mode) in docs {
                let (rec, mut trng) = (rec.clone(), rng.fork());
                s.spawn(move || {
                    let process = format!("{name}-{mode}");
                    for round in 0..ROUNDS {
                        let sets: BTreeMap<String, String> = [
                            (format!("{name}_{round}"), format!("v{round}{}", trng.letters(4))),
                            (format!("{name}_n"), format!("n{round}")),
                        ]
                        .into();
                        let think = trng.range(200, 2000) as f64 / 1000.0;
                        let style = if round % 2 == 0 { "mkstemp" } else { "prefixed" };
                        let t0 = Instant::now();
                        let out = Command::new("python3")
                            .arg("-c")
                            .arg(RMW)
                            .arg(m.path(doc))
                            .arg(mode)
                            .arg(think.to_string())
                            .arg(serde_json::to_string(&sets).unwrap())
                            .arg(style)
                            .output()
                            .unwrap();
                        let t1 = Instant::now();
                        let result = if out.status.success() { Ok(()) } else { Err(-1) };
                        if result.is_err() {
                            eprintln!("{process} round {round}: {}", String::from_utf8_lossy(&out.stderr));
                        } else {
                            rec.record(name, &process, doc, Kind::Read, t0, t1, Some(out.stdout.clone()), Ok(()));
                        }
                        for (field, value) in &sets {
                            rec.record(
                                name,
                                &process,
                                &format!("{doc}#{field}"),
                                Kind::Write,
                                t0,
                                t1,
                                Some(value.clone().into_bytes()),
                                result,
                            );
                        }
                        std::thread::sleep(Duration::from_millis(trng.range(0, 400)));
                    }
                });
            }
        }
    });
    let h = rec.history();
    let acked = h.ops.iter().filter(|o| o.kind == Kind::Write && o.result.is_ok()).count();
    assert!(acked >= ROUNDS * 4, "too few read-modify-writes succeeded to judge: {}", summary(&h));
    // Exposure: RMWs during which the other node's RMW of the same document returned, at
    // least half a second before this one wrote: the window in which its change could arrive.
    for (doc, mode) in docs {
        let rmws: Vec<&history::Op> = h.ops.iter().filter(|o| o.key == doc && o.kind == Kind::Read).collect();
        let exposed = rmws
            .iter()
            .filter(|x| {
                rmws.iter()
                    .any(|y| y.node != x.node && y.ret > x.invoke && y.ret + Duration::from_millis(500) < x.ret)
            })
            .count();
        eprintln!(
            "rmw: {doc} ({mode}): {} read-modify-writes, {exposed} with the other node's change landing while they thought",
            rmws.len()
        );
    }
    // Converged: both nodes pushed and hold the same fields.
    let parsed = |m: &Mount, doc: &str| fields_of(&std::fs::read_to_string(m.path(doc)).unwrap_or_default());
    let converged = wait_for(Duration::from_secs(60), || {
        docs.iter().all(|(doc, _)| parsed(&a, doc).is_ok() && parsed(&a, doc) == parsed(&b, doc))
    }) && wait_pushed(&a)
        && wait_pushed(&b);
    eprintln!("rmw: converged={converged}");
    let initial = BTreeMap::from([("kind".to_string(), "rmw".to_string())]);
    let mut vs = Vec::new();
    for (doc, _) in docs {
        let mut finals = Vec::new();
        for (name, m) in [("a", &a), ("b", &b)] {
            match parsed(m, doc) {
                Ok(map) => finals.push((name.to_string(), map)),
                Err(e) => vs.push(Violation {
                    check: "f:field-merge",
                    key: doc.into(),
                    detail: format!("{name}: {e}"),
                }),
            }
        }
        vs.extend(check_fields(&h, doc, &initial, &finals));
    }
    if !vs.is_empty() {
        for (doc, _) in docs {
            for (name, m) in [("a", &a), ("b", &b)] {
                eprintln!("rmw: {name}'s final {doc}:\n{}", std::fs::read_to_string(m.path(doc)).unwrap_or_default());
            }
        }
    }
    for (name, m) in [("a", &a), ("b", &b)] {
        for e in std::fs::read_dir(m.path("durable/rmw")).unwrap() {
            let file = e.unwrap().file_name().to_string_lossy().into_owned();
            let why = if file.contains(".conflict-") {
                // Its header names the fields in dispute: what to look at first.
                let text = std::fs::read_to_string(m.path(&format!("durable/rmw/{file}"))).unwrap_or_default();
                let header: String = text.lines().take_while(|l| l.starts_with('#')).collect::<Vec<_>>().join(" | ");
                format!("a conflict file, though each writer owns distinct fields (no legitimate conflict): {header}")
            } else if file.starts_with("tmp") || file.starts_with("x.yml.") {
                "a temporary file, though every one was renamed over x.yml".to_string()
            } else {
                continue;
            };
            vs.push(Violation {
                check: "v:leftover",
                key: format!("durable/rmw/{file}"),
                detail: format!("on {name}: {why}"),
            });
        }
    }
    verdict("rmw", &h, &vs);
}
