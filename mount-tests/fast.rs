//! The fast tier: several mounts on real NATS servers.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::harness::{last_errno, syncfs, wait_content, wait_for, wait_gone, Mount, Options};
use crate::nats::{NatsCluster, NatsServer, OldServer};

/// A table with short TTLs, so expiry is tested in seconds.
const SHORT: &str = r#"
policies:
  - pattern: "fast/claims/**"
    tier: nats-kv
    consistency: cas-create
    ttl: 300
    ephemeral: true
  - pattern: "fast/eph/**"
    tier: nats-kv
    consistency: cas-create
    ttl: 2
    ephemeral: true
  - pattern: "fast/short/**"
    tier: nats-kv
    consistency: lww
    ttl: 2
  - pattern: "fast/critical/**"
    tier: nats-kv
    consistency: cas
  - pattern: "fast/casual/**"
    tier: nats-kv
    consistency: lww
"#;

fn node(name: &str, urls: Vec<String>) -> Mount {
    Mount::with(Options {
        node: Some(name.into()),
        nats: urls,
        policies: Some(SHORT.into()),
        ..Default::default()
    })
}

fn nodes(server: &NatsServer, n: usize) -> Vec<Mount> {
    (0..n).map(|i| node(&format!("n{i}"), vec![server.url()])).collect()
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    let out = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", name])
        .arg(path)
        .output()
        .unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn writes_appear_on_every_mount() {
    let server = NatsServer::start();
    let ns = nodes(&server, 3);
    let (a, b, c) = (&ns[0], &ns[1], &ns[2]);
    a.sh_ok("echo one > fast/casual/x");
    assert!(wait_content(&b.path("fast/casual/x"), "one\n"));
    assert!(wait_content(&c.path("fast/casual/x"), "one\n"));
    assert_eq!(xattr(&c.path("fast/casual/x"), "user.syncfs.node").as_deref(), Some("n0"));
    b.sh_ok("echo two > fast/casual/x");
    assert!(wait_content(&a.path("fast/casual/x"), "two\n"));
    assert!(wait_content(&c.path("fast/casual/x"), "two\n"));
    // The revision is the same everywhere once it arrived.
    let rev = xattr(&b.path("fast/casual/x"), "user.syncfs.rev").unwrap();
    assert!(wait_for(Duration::from_secs(5), || xattr(&a.path("fast/casual/x"), "user.syncfs.rev") == Some(rev.clone())));
    c.sh_ok("rm fast/casual/x");
    assert!(wait_gone(&a.path("fast/casual/x")));
    assert!(wait_gone(&b.path("fast/casual/x")));
    // Directories: derived from keys, and empty ones survive.
    a.sh_ok("mkdir fast/casual/empty && mkdir -p fast/casual/deep/er && echo v > fast/casual/deep/er/f");
    assert!(wait_for(Duration::from_secs(10), || b.path("fast/casual/empty").is_dir()));
    assert!(wait_content(&b.path("fast/casual/deep/er/f"), "v\n"));
    a.sh_ok("rm fast/casual/deep/er/f");
    assert!(wait_gone(&b.path("fast/casual/deep/er/f")));
    // deep/er was made with mkdir: it has a marker, and stays.
    assert!(b.path("fast/casual/deep/er").is_dir());
    a.sh_ok("rmdir fast/casual/empty");
    assert!(wait_gone(&b.path("fast/casual/empty")));
    // Renames within the tier move the value.
    a.sh_ok("echo moved > fast/casual/m1 && mv fast/casual/m1 fast/casual/m2");
    assert!(wait_content(&b.path("fast/casual/m2"), "moved\n"));
    assert!(wait_gone(&b.path("fast/casual/m1")));
}

#[test]
fn odd_names_round_trip_and_values_are_raw_bytes() {
    let server = NatsServer::start();
    let ns = nodes(&server, 2);
    let names = ["a b", "v1.2.3", "star*", "gt>", "é🙂", ".hidden", "x=y"];
    for name in names {
        std::fs::write(ns[0].path(&format!("fast/casual/{name}")), name).unwrap();
    }
    for name in names {
        assert!(wait_content(&ns[1].path(&format!("fast/casual/{name}")), name), "{name}");
    }
    // Another NATS client reads the same bytes under the documented key.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let value = rt.block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value(syncfs::tier::kv::bucket_name("fast/casual/**")).await.unwrap();
        kv.get("fast.casual.a=20b").await.unwrap()
    });
    assert_eq!(value.as_deref(), Some(b"a b".as_slice()));
}

/// `attempts` threads per mount each try `open(O_EXCL)` on each key at the same moment.
fn claim_race(mounts: &[Mount], attempts: usize, keys: usize) {
    let threads = mounts.len() * attempts;
    let barrier = Arc::new(Barrier::new(threads));
    let mut handles = Vec::new();
    for (m, mount) in mounts.iter().enumerate() {
        for t in 0..attempts {
            let dir = mount.path("fast/claims");
            let barrier = barrier.clone();
            handles.push(std::thread::spawn(move || {
                let me = format!("m{m}-t{t}");
                barrier.wait();
                let mut won = Vec::new();
                for k in 0..keys {
                    let path = dir.join(format!("race-{k}"));
                    match OpenOptions::new().write(true).create_new(true).open(&path) {
                        Ok(mut f) => {
                            f.write_all(me.as_bytes()).unwrap();
                            drop(f);
                            won.push(k);
                        }
                        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{me} key {k}: {e}"),
                    }
                }
                (me, won)
            }));
        }
    }
    let mut winners: HashMap<usize, Vec<String>> = HashMap::new();
    for h in handles {
        let (me, won) = h.join().unwrap();
        for k in won {
            winners.entry(k).or_default().push(me.clone());
        }
    }
    for k in 0..keys {
        let w = winners.get(&k).cloned().unwrap_or_default();
        assert_eq!(w.len(), 1, "key {k} winners: {w:?}");
        // The winner's content is what every mount reads.
        for mount in mounts {
            assert!(wait_content(&mount.path(&format!("fast/claims/race-{k}")), &w[0]), "key {k} on a mount");
        }
    }
}

#[test]
fn claim_race_has_exactly_one_winner_per_key() {
    let server = NatsServer::start();
    let ns = nodes(&server, 3);
    claim_race(&ns, 4, 5);
}

#[test]
fn claim_race_on_a_three_node_cluster_with_three_replicas() {
    let cluster = NatsCluster::start();
    let mounts: Vec<Mount> = cluster
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Mount::with(Options {
                node: Some(format!("c{i}")),
                nats: vec![s.url()],
                policies: Some(SHORT.into()),
                config: Some("nats:\n  kv:\n    replicas: 3\n".into()),
                ..Default::default()
            })
        })
        .collect();
    claim_race(&mounts, 3, 4);
}

#[test]
fn noclobber_is_a_cluster_wide_lock() {
    let server = NatsServer::start();
    let ns = nodes(&server, 2);
    ns[0].sh_ok("set -o noclobber; echo me > fast/claims/lock");
    // The other node has not necessarily seen it yet: the create still fails cluster-wide.
    let out = ns[1].sh("set -o noclobber; echo you > fast/claims/lock");
    assert!(!out.status.success());
    assert!(text(&out).contains("exists") || text(&out).contains("cannot overwrite"), "{}", text(&out));
    assert!(wait_content(&ns[1].path("fast/claims/lock"), "me\n"));
    // Releasing it lets the other node take it.
    ns[0].sh_ok("rm fast/claims/lock");
    assert!(wait_gone(&ns[1].path("fast/claims/lock")));
    ns[1].sh_ok("set -o noclobber; echo you > fast/claims/lock");
    assert!(wait_content(&ns[0].path("fast/claims/lock"), "you\n"));
}

#[test]
fn stale_cas_updates_fail_and_leave_the_value() {
    let server = NatsServer::start();
    let ns = nodes(&server, 2);
    let (a, b) = (&ns[0], &ns[1]);
    a.sh_ok("echo 1 > fast/critical/v");
    assert!(wait_content(&b.path("fast/critical/v"), "1\n"));
    // B opens (base = revision of "1"), A writes meanwhile, B's close fails with ESTALE.
    let mut writer = OpenOptions::new().write(true).truncate(true).open(b.path("fast/critical/v")).unwrap();
    a.sh_ok("echo 2 > fast/critical/v");
    // B's own readers see B's open write; wait until B has heard of A's revision.
    let rev = xattr(&a.path("fast/critical/v"), "user.syncfs.rev").unwrap();
    assert!(wait_for(Duration::from_secs(10), || xattr(&b.path("fast/critical/v"), "user.syncfs.rev") == Some(rev.clone())));
    writer.write_all(b"3\n").unwrap();
    let err = writer.sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(writer);
    for m in [a, b] {
        assert!(wait_content(&m.path("fast/critical/v"), "2\n"));
    }
    // A write from a fresh open succeeds.
    b.sh_ok("echo 4 > fast/critical/v");
    assert!(wait_content(&a.path("fast/critical/v"), "4\n"));
}

#[test]
fn a_new_cas_key_reaches_other_nodes_only_with_its_content() {
    let server = NatsServer::start();
    let ns = nodes(&server, 2);
    let (a, b) = (&ns[0], &ns[1]);
    // `echo x > f` on a new key, held open: B never sees an empty value nobody wrote. The
    // writer is its own process: any close of a copy of its fd (a fork of this test binary
    // exec'ing) is a flush that commits.
    let path = "fast/critical/new";
    let script = format!(
        "import os, time\nfd = os.open('{}', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\nos.write(fd, b'hello\\n')\ntime.sleep(2.5)\nos.close(fd)\n",
        a.path(path).display()
    );
    let mut writer = std::process::Command::new("python3").arg("-c").arg(&script).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(5), || a.path(path).exists()), "A made the file");
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        match std::fs::read(b.path(path)) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
            Ok(v) => panic!("B read {:?} before A's close", String::from_utf8_lossy(&v)),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(writer.wait().unwrap().success());
    assert!(wait_content(&b.path(path), "hello\n"));
    // Two nodes making the same new key without O_EXCL: the first fsync wins, the other gets
    // ESTALE, and both nodes keep the winner's content.
    let race = "fast/critical/race";
    let script = format!(
        "import os\nfa = os.open('{a}', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\nfb = os.open('{b}', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n\
         os.write(fa, b'from a\\n'); os.write(fb, b'from b\\n')\nos.fsync(fa)\n\
         try:\n    os.fsync(fb); print('b won too')\nexcept OSError as e:\n    print(e.errno)\n",
        a = a.path(race).display(),
        b = b.path(race).display()
    );
    let out = std::process::Command::new("python3").arg("-c").arg(&script).output().unwrap();
    assert_eq!(text(&out).trim(), libc::ESTALE.to_string(), "{}", String::from_utf8_lossy(&out.stderr));
    for m in [a, b] {
        assert!(wait_content(&m.path(race), "from a\n"));
    }
    // A deleted key is new again.
    a.sh_ok(&format!("rm {race}"));
    assert!(wait_for(Duration::from_secs(10), || !b.path(race).exists()));
    b.sh_ok(&format!("echo again > {race}"));
    assert!(wait_content(&a.path(race), "again\n"));
}

#[test]
fn rename_over_with_a_revision_is_compare_and_swap() {
    let server = NatsServer::start();
    let ns = nodes(&server, 2);
    let (a, b) = (&ns[0], &ns[1]);
    a.sh_ok("echo 1 > fast/critical/cfg");
    assert!(wait_content(&b.path("fast/critical/cfg"), "1\n"));
    // The idiom: copy with the revision, edit, move over the target.
    b.sh_ok("cp --preserve=xattr fast/critical/cfg fast/critical/cfg.tmp && echo 2 > fast/critical/cfg.tmp.new && cat fast/critical/cfg.tmp.new > fast/critical/cfg.tmp");
    assert_eq!(b.sh_ok("getfattr -n user.syncfs.tier --only-values fast/critical/cfg.tmp"), "local");
    let rev = xattr(&b.path("fast/critical/cfg"), "user.syncfs.rev").unwrap();
    assert_eq!(xattr(&b.path("fast/critical/cfg.tmp"), "user.syncfs.rev"), Some(rev.clone()));
    b.sh_ok("rm fast/critical/cfg.tmp.new && mv fast/critical/cfg.tmp fast/critical/cfg");
    assert!(wait_content(&a.path("fast/critical/cfg"), "2\n"));
    assert!(!b.path("fast/critical/cfg.tmp").exists());
    // With a stale revision the rename fails with ESTALE and the temporary file stays.
    b.sh_ok(&format!("echo 3 > fast/critical/t.tmp && setfattr -n user.syncfs.rev -v {rev} fast/critical/t.tmp"));
    let err = std::fs::rename(b.path("fast/critical/t.tmp"), b.path("fast/critical/cfg")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE));
    assert!(b.path("fast/critical/t.tmp").exists());
    assert_eq!(std::fs::read_to_string(a.path("fast/critical/cfg")).unwrap(), "2\n");
    // Other renames between tiers are EXDEV, so mv copies.
    let err = std::fs::rename(b.path("fast/critical/cfg"), b.path("plain")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
}

#[test]
fn ttl_expires_entries_on_every_node() {
    let server = NatsServer::start();
    let ns = nodes(&server, 2);
    ns[0].sh_ok("echo hb > fast/short/heartbeat");
    assert!(wait_content(&ns[1].path("fast/short/heartbeat"), "hb\n"));
    assert!(xattr(&ns[1].path("fast/short/heartbeat"), "user.syncfs.expires").is_some());
    for m in &ns {
        assert!(wait_gone(&m.path("fast/short/heartbeat")), "still there after the TTL");
    }
}

#[test]
fn ephemeral_claims_live_with_their_mount() {
    let server = NatsServer::start();
    let mut ns = nodes(&server, 3);
    ns[0].sh_ok("set -o noclobber; echo holder > fast/eph/job");
    assert!(wait_content(&ns[1].path("fast/eph/job"), "holder\n"));
    // Two TTLs later it is still held: the mount refreshes it.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(std::fs::read_to_string(ns[1].path("fast/eph/job")).unwrap(), "holder\n");
    assert!(ns[1].sh("set -o noclobber; echo taker > fast/eph/job").status.code() != Some(0));
    // The holder dies: within about one TTL another node can claim it.
    let pid = ns[0].pid();
    // SAFETY: killing our own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    ns[0].forget_mounted();
    let claimed = wait_for(Duration::from_secs(8), || {
        ns[1].sh("set -o noclobber; echo taker > fast/eph/job").status.success()
    });
    assert!(claimed, "no other node could claim after the holder died");
    assert!(wait_content(&ns[2].path("fast/eph/job"), "taker\n"));
    // A clean unmount releases at once.
    ns[2].sh_ok("set -o noclobber; echo c > fast/eph/other");
    assert!(wait_content(&ns[1].path("fast/eph/other"), "c\n"));
    ns[2].umount();
    assert!(wait_gone(&ns[1].path("fast/eph/other")));
    ns[1].sh_ok("set -o noclobber; echo b > fast/eph/other");
    let _ = std::process::Command::new("umount").arg("-l").arg(&ns[0].mnt).status();
}

#[test]
fn offline_lww_writes_queue_and_strong_writes_fail_fast() {
    let mut server = NatsServer::start();
    let ns = nodes(&server, 2);
    let (a, b) = (&ns[0], &ns[1]);
    a.sh_ok("echo before > fast/casual/seen");
    assert!(wait_content(&b.path("fast/casual/seen"), "before\n"));
    server.stop();
    assert!(wait_for(Duration::from_secs(10), || a.status()["nats"]["state"] == "disconnected"));
    // lww writes are accepted and queued.
    a.sh_ok("for i in 1 2 3; do echo q$i > fast/casual/q$i; done; echo after > fast/casual/seen");
    assert_eq!(a.status()["pending_writes"], 4);
    // Strongly consistent operations fail at once with EAGAIN, and change nothing.
    let started = std::time::Instant::now();
    let err = OpenOptions::new().write(true).create_new(true).open(a.path("fast/critical/x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
    let err = OpenOptions::new().write(true).create_new(true).open(a.path("fast/claims/x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
    assert!(started.elapsed() < Duration::from_secs(2), "EAGAIN must be fast");
    assert!(!a.path("fast/critical/x").exists());
    // Reads serve the last known state.
    assert_eq!(std::fs::read_to_string(b.path("fast/casual/seen")).unwrap(), "before\n");
    assert_eq!(std::fs::read_to_string(a.path("fast/casual/seen")).unwrap(), "after\n");
    server.restart();
    for i in 1..=3 {
        assert!(wait_content(&b.path(&format!("fast/casual/q{i}")), &format!("q{i}\n")));
    }
    assert!(wait_content(&b.path("fast/casual/seen"), "after\n"));
    assert!(wait_for(Duration::from_secs(10), || a.status()["pending_writes"] == 0));
    assert_eq!(a.status()["nats"]["state"], "connected");
}

#[test]
fn kill9_with_a_queue_then_remount_drains_it() {
    let mut server = NatsServer::start();
    let mut a = node("a", vec![server.url()]);
    let b = node("b", vec![server.url()]);
    server.stop();
    assert!(wait_for(Duration::from_secs(10), || a.status()["nats"]["state"] == "disconnected"));
    a.sh_ok("echo survived > fast/casual/k9");
    let pid = a.pid();
    // SAFETY: killing our own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(10), || !syncfs::daemon::process_alive(pid)));
    let out = syncfs(&["umount", &a.mnt.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    server.restart();
    let out = a.try_mount(&Options {
        node: Some("a".into()),
        nats: vec![server.url()],
        policies: Some(SHORT.into()),
        ..Default::default()
    });
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_content(&b.path("fast/casual/k9"), "survived\n"));
    assert!(wait_for(Duration::from_secs(10), || a.status()["pending_writes"] == 0));
}

#[test]
fn keys_that_vanished_while_disconnected_are_removed() {
    let mut server = NatsServer::start();
    let ns = nodes(&server, 2);
    ns[0].sh_ok("echo x > fast/casual/doomed && echo y > fast/casual/kept");
    assert!(wait_content(&ns[1].path("fast/casual/doomed"), "x\n"));
    // Another client purges one key outright: no delete marker reaches the watches.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream(format!("KV_{}", syncfs::tier::kv::bucket_name("fast/casual/**")))
            .await
            .unwrap();
        let bucket = syncfs::tier::kv::bucket_name("fast/casual/**");
        stream.purge().filter(format!("$KV.{bucket}.fast.casual.doomed")).await.unwrap();
        let kv = js.get_key_value(bucket).await.unwrap();
        assert_eq!(kv.get("fast.casual.doomed").await.unwrap(), None, "purged");
        assert!(kv.get("fast.casual.kept").await.unwrap().is_some());
    });
    // The nodes learn on reconnect, when their views are rebuilt.
    server.restart();
    for m in &ns {
        assert!(wait_gone(&m.path("fast/casual/doomed")));
        assert_eq!(std::fs::read_to_string(m.path("fast/casual/kept")).unwrap(), "y\n");
    }
}

#[test]
fn values_over_the_server_limit_get_efbig_and_long_names_enametoolong() {
    let server = NatsServer::start();
    let ns = nodes(&server, 1);
    // A copy of the descriptor closed first (as a forked child's exit does) hears the
    // refusal, and so does every later fsync and close of the writer's own. The writer is a
    // process of its own: a copy of its descriptor in a child another test thread forks
    // would flush half-written content in the middle (the fork hazard of any FUSE file).
    let script = r#"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
data = b"x" * (2 << 20)
n = 0
while n < len(data):
    n += os.write(fd, data[n:])
def refused(f, *args):
    try:
        f(*args)
    except OSError as e:
        return e.errno
    return 0
print(refused(os.close, os.dup(fd)), refused(os.fsync, fd), refused(os.close, fd))
"#;
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(ns[0].path("fast/casual/big")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let efbig = libc::EFBIG.to_string();
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), [efbig.as_str(); 3], "the copy's close, fsync, the writer's close");
    assert_eq!(std::fs::metadata(ns[0].path("fast/casual/big")).unwrap().len(), 0, "nothing stored");
    // A name whose key (every `.` is escaped to three bytes) is longer than syncfs allows.
    let dots = ".".repeat(200);
    let long = format!("fast/casual/a{dots}/b{dots}");
    std::fs::create_dir(ns[0].path(&format!("fast/casual/a{dots}"))).unwrap();
    let c = CString::new(ns[0].path(&long).as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    let r = unsafe { libc::mkdir(c.as_ptr(), 0o755) };
    assert_eq!((r, last_errno()), (-1, libc::ENAMETOOLONG));
}

#[test]
fn servers_older_than_2_10_are_refused() {
    let old = OldServer::start();
    let mut m = Mount::prepare();
    let out = m.try_mount(&Options {
        nats: vec![format!("nats://127.0.0.1:{}", old.port)],
        ..Default::default()
    });
    assert!(!out.status.success());
    assert!(text(&out).contains("2.9.10") && text(&out).contains("too old"), "{}", text(&out));
    assert!(!crate::harness::is_mounted(&m.mnt));
}

#[test]
fn status_shows_the_embedded_server_for_other_nodes_to_join() {
    let a = Mount::start();
    let s = a.status();
    assert_eq!(s["nats"]["embedded"], true);
    assert_eq!(s["nats"]["state"], "connected");
    let url = s["nats"]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    let b = Mount::with(Options {
        nats: vec![url],
        node: Some("joiner".into()),
        ..Default::default()
    });
    a.sh_ok("echo hi > fast/casual/greeting");
    assert!(wait_content(&b.path("fast/casual/greeting"), "hi\n"));
    assert_eq!(b.status()["nats"]["embedded"], false);
}

#[test]
fn kv_paths_refuse_what_kv_cannot_store() {
    let server = NatsServer::start();
    let ns = nodes(&server, 1);
    let m = &ns[0];
    m.sh_ok("echo v > fast/casual/f && mkdir fast/casual/d && echo w > fast/casual/d/g");
    let err = std::os::unix::fs::symlink("f", m.path("fast/casual/l")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let err = std::fs::hard_link(m.path("fast/casual/f"), m.path("fast/casual/h")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    // A directory rename is not atomic in KV: EXDEV, and mv copies instead.
    let err = std::fs::rename(m.path("fast/casual/d"), m.path("fast/casual/e")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
    m.sh_ok("mv fast/casual/d fast/casual/e");
    assert_eq!(m.sh_ok("cat fast/casual/e/g"), "w\n");
    assert!(!m.path("fast/casual/d").exists());
}

#[test]
fn credentials_come_from_config_environment_or_url_and_never_reach_the_log() {
    const PASSWORD: &str = "s3cret-pw-7391";
    let server = NatsServer::start_with(&["--user", "syncfs", "--pass", PASSWORD]);
    let with = |config: Option<String>, env: Vec<(String, String)>, url: String| Options {
        nats: vec![url],
        config,
        env,
        policies: Some(SHORT.into()),
        ..Default::default()
    };
    let a = Mount::with(with(
        Some(format!("nats:\n  user: syncfs\n  password: {PASSWORD}\n")),
        vec![],
        server.url(),
    ));
    let b = Mount::with(with(
        None,
        vec![
            ("SYNCFS_NATS_USER".into(), "syncfs".into()),
            ("SYNCFS_NATS_PASSWORD".into(), PASSWORD.into()),
        ],
        server.url(),
    ));
    let c = Mount::with(with(None, vec![], format!("nats://syncfs:{PASSWORD}@127.0.0.1:{}", server.port)));
    a.sh_ok("echo authenticated > fast/casual/who");
    assert!(wait_content(&b.path("fast/casual/who"), "authenticated\n"));
    assert!(wait_content(&c.path("fast/casual/who"), "authenticated\n"));
    assert_eq!(c.status()["nats"]["url"], server.url(), "the status URL is redacted");
    // Wrong credentials stop the mount with a reason, and nothing stays mounted.
    let mut wrong = Mount::prepare();
    let out = wrong.try_mount(&with(
        Some("nats:\n  user: syncfs\n  password: not-it\n".into()),
        vec![],
        server.url(),
    ));
    assert!(!out.status.success());
    assert!(text(&out).contains("refused the credentials"), "{}", text(&out));
    assert!(!crate::harness::is_mounted(&wrong.mnt));
    // No log and no status shows the password.
    for m in [&a, &b, &c] {
        let log = std::fs::read_to_string(m.state.join("syncfs.log")).unwrap();
        assert!(!log.contains(PASSWORD), "password in {}", m.state.display());
        assert!(!m.status().to_string().contains(PASSWORD));
    }
}
