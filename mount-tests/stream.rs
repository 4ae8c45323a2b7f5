//! The append tier (NATS streams): several mounts on real NATS servers.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{syncfs, wait_for, wait_gone, Mount, Options};
use crate::nats::NatsServer;

/// `log/**` may be purged (truncated, removed); `audit/**` may not.
const TABLE: &str = r#"
policies:
  - pattern: "log/**"
    tier: nats-stream
    consistency: append
    purge: true
  - pattern: "audit/**"
    tier: nats-stream
    consistency: append
"#;

fn node_with(name: &str, server: &NatsServer, config: Option<&str>) -> Mount {
    crate::harness::node_on(&server.url(), name, TABLE, config)
}

fn node(name: &str, server: &NatsServer) -> Mount {
    node_with(name, server, None)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    let out = Command::new("getfattr").args(["--only-values", "-n", name]).arg(path).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until both paths hold the same content and it satisfies `done`.
fn wait_same(a: &Path, b: &Path, done: impl Fn(&str) -> bool) -> bool {
    wait_for(Duration::from_secs(20), || {
        let (x, y) = (read(a), read(b));
        x == y && done(&x)
    })
}

/// Two nodes append hundreds of lines each at the same time: both read the same bytes, with
/// every line exactly once, each node's lines in the order it wrote them.
#[test]
fn concurrent_appends_from_two_nodes_read_the_same_everywhere() {
    let server = NatsServer::start();
    let (a, b) = (node("a", &server), node("b", &server));
    let n = 300;
    let writers: Vec<_> = [("a", &a), ("b", &b)]
        .into_iter()
        .map(|(name, m)| {
            let mnt = m.mnt.clone();
            std::thread::spawn(move || {
                crate::harness::sh_ok_in(&mnt, &format!("for i in $(seq {n}); do echo \"{name} $i\" >> log/t1.log; done"))
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let (pa, pb) = (a.path("log/t1.log"), b.path("log/t1.log"));
    assert!(wait_same(&pa, &pb, |t| t.lines().count() == 2 * n), "a:\n{}\nb:\n{}", read(&pa).len(), read(&pb).len());
    let text = read(&pa);
    for name in ["a", "b"] {
        let mine: Vec<usize> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(mine, (1..=n).collect::<Vec<_>>(), "{name}'s lines, once each and in order");
    }
    // The revision is the last sequence, the same on both nodes.
    let rev = xattr(&pa, "user.syncfs.rev").unwrap();
    assert!(rev.parse::<u64>().unwrap() >= 2 * n as u64);
    assert!(wait_for(Duration::from_secs(5), || xattr(&pb, "user.syncfs.rev") == Some(rev.clone())));
}

/// `>>` from bash, `tee -a` and python's 'a' mode append; a write elsewhere than the end and a
/// truncation to a non-zero size are EPERM and change nothing; without `purge`, emptying and
/// removing are EPERM too.
#[test]
fn only_appends_are_taken() {
    let server = NatsServer::start();
    let (a, b) = (node("a", &server), node("b", &server));
    a.sh_ok(
        "echo one >> audit/x.log\n\
         echo two | tee -a audit/x.log >/dev/null\n\
         python3 -c \"f = open('audit/x.log', 'a'); f.write('three\\n'); f.close()\"\n\
         printf 'four\\n' | dd of=audit/x.log oflag=append conv=notrunc status=none",
    );
    let want = "one\ntwo\nthree\nfour\n";
    assert_eq!(read(&a.path("audit/x.log")), want);
    assert!(wait_same(&a.path("audit/x.log"), &b.path("audit/x.log"), |t| t == want));

    // A write at offset 0 of a non-empty file.
    let f = OpenOptions::new().write(true).open(a.path("audit/x.log")).unwrap();
    let e = f.write_all_at(b"XX", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    drop(f);
    let why = xattr(&a.path("audit/x.log"), "user.syncfs.error").unwrap();
    assert!(why.contains("takes appends only"), "{why}");
    // Writing at the end without O_APPEND is an append.
    let f = OpenOptions::new().write(true).open(a.path("audit/x.log")).unwrap();
    f.write_all_at(b"five\n", want.len() as u64).unwrap();
    drop(f);
    let want = format!("{want}five\n");
    assert_eq!(read(&a.path("audit/x.log")), want);

    for script in ["truncate -s 3 audit/x.log", ": > audit/x.log", "echo new > audit/x.log", "rm audit/x.log"] {
        let out = a.sh(script);
        assert!(!out.status.success(), "{script} must fail");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"), "{script}: {:?}", out);
        assert_eq!(read(&a.path("audit/x.log")), want, "after {script}");
    }
    assert!(wait_same(&a.path("audit/x.log"), &b.path("audit/x.log"), |t| t == want));
    // A rename would rewrite the stream: EXDEV, which mv turns into copy and (refused) delete.
    let err = std::fs::rename(a.path("audit/x.log"), a.path("audit/y.log")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
}

/// With `purge: true`, truncation to zero empties the file on every node and `rm` removes it;
/// later appends start the file again.
#[test]
fn purging_empties_and_removes_on_every_node() {
    let server = NatsServer::start();
    let (a, b) = (node("a", &server), node("b", &server));
    a.sh_ok("mkdir -p log/threads && for i in 1 2 3; do echo m$i >> log/threads/t.log; done");
    let (pa, pb) = (a.path("log/threads/t.log"), b.path("log/threads/t.log"));
    assert!(wait_same(&pa, &pb, |t| t == "m1\nm2\nm3\n"));
    b.sh_ok(": > log/threads/t.log");
    assert_eq!(read(&pb), "");
    assert!(wait_for(Duration::from_secs(10), || pa.exists() && read(&pa).is_empty()));
    a.sh_ok("echo again >> log/threads/t.log");
    assert!(wait_same(&pa, &pb, |t| t == "again\n"));
    // `>` empties and writes: a purge, then an append.
    a.sh_ok("echo replaced > log/threads/t.log");
    assert!(wait_same(&pa, &pb, |t| t == "replaced\n"));
    b.sh_ok("rm log/threads/t.log");
    assert!(!pb.exists());
    assert!(wait_gone(&pa));
    // An empty file made with touch exists everywhere.
    a.sh_ok("touch log/threads/empty.log");
    assert!(wait_for(Duration::from_secs(10), || b.path("log/threads/empty.log").exists()));
    assert_eq!(read(&b.path("log/threads/empty.log")), "");
}

/// An append larger than the server's payload limit (1 MiB) is split into parts and still
/// reads back as one contiguous block on every node, even with another node appending at
/// the same time.
#[test]
fn large_appends_are_split_and_read_back_whole() {
    let server = NatsServer::start();
    let (a, b) = (node("a", &server), node("b", &server));
    let block: String = (0..60_000).map(|i| format!("big line {i:05} ------------------------------------------\n")).collect();
    assert!(block.len() > 3 << 20);
    let src = a.base.path().join("block.txt");
    std::fs::write(&src, &block).unwrap();
    let bmnt = b.mnt.clone();
    let small = std::thread::spawn(move || crate::harness::sh_ok_in(&bmnt, "for i in $(seq 100); do echo \"small $i\" >> log/big.log; done"));
    a.sh_ok(&format!("cat {} >> log/big.log", src.display()));
    small.join().unwrap();
    let (pa, pb) = (a.path("log/big.log"), b.path("log/big.log"));
    assert!(wait_same(&pa, &pb, |t| t.len() == block.len() + (1..=100).map(|i| format!("small {i}\n").len()).sum::<usize>()));
    let text = read(&pa);
    let start = text.find("big line 00000").expect("the block is there");
    assert_eq!(&text[start..start + block.len()], block, "the block is contiguous");
    let smalls = text.lines().filter(|l| l.starts_with("small ")).count();
    assert_eq!(smalls, 100);
}

/// `tail -f` on one node shows another node's appends as they come.
#[test]
fn tail_f_on_another_node_follows_appends() {
    let server = NatsServer::start();
    let (a, b) = (node("a", &server), node("b", &server));
    a.sh_ok("echo first >> log/follow.log");
    assert!(wait_for(Duration::from_secs(10), || read(&b.path("log/follow.log")) == "first\n"));
    let out = b.base.path().join("tail.out");
    let mut tail = Command::new("tail")
        .args(["-n", "+1", "-f"])
        .arg(b.path("log/follow.log"))
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || read(&out) == "first\n"));
    for line in ["second", "third"] {
        a.sh_ok(&format!("echo {line} >> log/follow.log"));
    }
    let seen = wait_for(Duration::from_secs(15), || read(&out) == "first\nsecond\nthird\n");
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(seen, "tail -f showed {:?}", read(&out));
}

/// While NATS is unreachable, appends fail at once with EAGAIN and change nothing; reads serve
/// what the node has; once it is back, appends work again.
#[test]
fn offline_appends_fail_fast() {
    let mut server = NatsServer::start();
    let (a, b) = (node("a", &server), node("b", &server));
    a.sh_ok("echo online >> log/o.log");
    assert!(wait_for(Duration::from_secs(10), || read(&b.path("log/o.log")) == "online\n"));
    server.stop();
    assert!(wait_for(Duration::from_secs(10), || a.status()["nats"]["state"] == "disconnected"));
    let started = std::time::Instant::now();
    let mut f = OpenOptions::new().append(true).open(a.path("log/o.log")).unwrap();
    let e = f.write_all(b"offline\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
    drop(f);
    assert!(started.elapsed() < Duration::from_secs(2), "EAGAIN must be fast");
    let out = a.sh("echo offline >> log/o.log");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Resource temporarily unavailable"), "{out:?}");
    assert_eq!(read(&a.path("log/o.log")), "online\n");
    // A new file is refused at open: no empty file only this node has is left behind.
    let out = a.sh("echo new >> log/new.log");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Resource temporarily unavailable"), "{out:?}");
    assert!(!a.path("log/new.log").exists());
    server.restart();
    assert!(wait_for(Duration::from_secs(15), || a.status()["nats"]["state"] == "connected"));
    assert!(wait_for(Duration::from_secs(15), || a.sh("echo back >> log/o.log").status.success()));
    assert!(wait_same(&a.path("log/o.log"), &b.path("log/o.log"), |t| t == "online\nback\n"));
}

/// A daemon killed with -9 while other nodes keep appending neither loses nor doubles a
/// line: its remount replays the stream from its saved state.
#[test]
fn kill9_then_remount_neither_loses_nor_doubles() {
    let server = NatsServer::start();
    let mut a = node("a", &server);
    let b = node("b", &server);
    a.sh_ok("for i in $(seq 50); do echo \"a $i\" >> log/k.log; done");
    let pid = a.pid();
    // SAFETY: killing our own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(10), || !syncfs::daemon::process_alive(pid)));
    let out = syncfs(&["umount", &a.mnt.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    a.forget_mounted();
    b.sh_ok("for i in $(seq 20); do echo \"b $i\" >> log/k.log; done");
    let out = a.try_mount(&Options {
        node: Some("a".into()),
        nats: vec![server.url()],
        policies: Some(TABLE.into()),
        ..Default::default()
    });
    assert!(out.status.success(), "{out:?}");
    let (pa, pb) = (a.path("log/k.log"), b.path("log/k.log"));
    assert!(wait_same(&pa, &pb, |t| t.lines().count() == 70), "a: {:?}", read(&pa).lines().count());
    a.sh_ok("echo after >> log/k.log");
    assert!(wait_same(&pa, &pb, |t| t.ends_with("b 20\nafter\n") && t.lines().count() == 71));
}

/// Messages the stream no longer keeps (here a limit of 5 messages) leave every node's files
/// alike: a node that had them drops them, and a node that joins later never sees them.
#[test]
fn retention_limits_drop_the_oldest_lines_on_every_node() {
    let server = NatsServer::start();
    let config = "nats:\n  stream:\n    max_msgs: 5\n    check_interval_ms: 200\n";
    let (a, b) = (node_with("a", &server, Some(config)), node_with("b", &server, Some(config)));
    a.sh_ok("for i in 1 2 3 4 5 6 7 8; do echo l$i >> log/r.log; done");
    let want = "l4\nl5\nl6\nl7\nl8\n";
    assert!(wait_same(&a.path("log/r.log"), &b.path("log/r.log"), |t| t == want), "a: {:?}", read(&a.path("log/r.log")));
    let c = node_with("c", &server, Some(config));
    assert_eq!(read(&c.path("log/r.log")), want);
}

/// One write(2) reaches the tier as one append, also when it starts in a page the kernel has
/// not read: through the page cache the kernel sent such a write as two requests, and a commit
/// of another handle between them made two messages, with another node's append between them
/// in every node's file (seen once in `checker::concurrent_appends_have_one_order_on_three_nodes`).
#[test]
fn a_write_across_a_page_boundary_arrives_as_one_request() {
    let server = NatsServer::start();
    let a = node("a", &server);
    a.sh_ok("mkdir -p log");
    let path = a.path("log/pages.log");
    let mut f = OpenOptions::new().append(true).create(true).open(&path).unwrap();
    f.write_all(&vec![b'x'; 4000]).unwrap();
    f.sync_all().unwrap();
    let requests = || a.status()["fuse"]["write_requests"].as_u64().unwrap();
    let before = requests();
    // Bytes 4000..4200: the end of the first page and the start of the second.
    f.write_all(&[b'y'; 200]).unwrap();
    let after = requests();
    assert_eq!(after - before, 1, "a 200-byte write across a page boundary took {} requests", after - before);
    drop(f);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4200);
}
