//! Operating syncfs (issue "Operating syncfs"): the event feed followed with `tail -f` and
//! `syncfs watch` on another node, `.syncfs/status` and the exit codes of `syncfs status`,
//! and a log that ordinary programs do not fill.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::git::{Remote, QUICK};
use crate::harness::{bin, syncfs, Mount, Options};
use crate::nats::NatsServer;

const TABLE: &str = r#"policies:
  - pattern: "fast/**"
    tier: nats-kv
    consistency: lww
  - pattern: "docs/**"
    tier: git
    consistency: lww
  - pattern: "logs/**"
    tier: nats-stream
    consistency: append
"#;

fn node(name: &str, remote: &Remote, nats: &NatsServer) -> Mount {
    Mount::with(Options {
        node: Some(name.into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        policies: Some(TABLE.into()),
        ..Default::default()
    })
}

/// A process whose stdout lines arrive on a channel; killed on drop.
struct Follower {
    child: Child,
    lines: Receiver<String>,
}

impl Follower {
    fn start(cmd: &mut Command) -> Follower {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start follower");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// Lines until one satisfies `want` (returned), or `None` after `timeout`.
    fn until(&self, timeout: Duration, mut want: impl FnMut(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON event ({e}): {line}"))
}

fn is(line: &str, path: &str, op: &str) -> bool {
    serde_json::from_str::<Value>(line).is_ok_and(|v| v["path"] == path && v["op"] == op)
}

#[test]
fn tail_f_of_the_event_feed_on_node_b_shows_node_a_writes_as_they_happen() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    let b = node("b", &remote, &nats);
    // Empty directories are not synced (git stores none): each node makes its own.
    a.sh_ok("mkdir -p docs fast logs");
    b.sh_ok("mkdir -p docs fast logs");
    // Opened before the writes, from the feed's end: what it prints happens after it started.
    let tail = Follower::start(Command::new("tail").arg("-n0").arg("-f").arg(b.path(".syncfs/events")));
    let watch = Follower::start(Command::new(bin()).args(["watch", "--json", "--mount"]).arg(&b.mnt).arg("fast/**"));
    std::thread::sleep(Duration::from_millis(300));

    a.sh_ok("echo up > fast/k");
    let line = tail.until(Duration::from_secs(10), |l| is(l, "fast/k", "create")).expect("tail -f on B never showed A's create of fast/k");
    let e = json(&line);
    assert_eq!((e["node"].as_str(), e["origin"].as_str(), e["tier"].as_str()), (Some("a"), Some("remote"), Some("nats-kv")), "{line}");
    assert!(e["rev"].as_str().is_some_and(|r| r.parse::<u64>().is_ok()), "a KV event carries the revision: {line}");
    let rev = b.sh_ok("getfattr --only-values -n user.syncfs.rev fast/k");
    assert_eq!(e["rev"].as_str(), Some(rev.trim()), "the event's revision is the file's");
    assert!(chrono_like(e["time"].as_str().unwrap()), "{line}");

    a.sh_ok("echo down > fast/k");
    tail.until(Duration::from_secs(10), |l| is(l, "fast/k", "write")).expect("A's second write");
    a.sh_ok("echo doc > docs/readme.md");
    let line = tail.until(Duration::from_secs(20), |l| is(l, "docs/readme.md", "create")).expect("A's git file on B");
    assert_eq!(json(&line)["tier"], "git");
    a.sh_ok("echo line >> logs/run.log");
    tail.until(Duration::from_secs(10), |l| is(l, "logs/run.log", "append") || is(l, "logs/run.log", "create"))
        .expect("A's append on B");
    a.sh_ok("rm fast/k");
    tail.until(Duration::from_secs(10), |l| is(l, "fast/k", "delete")).expect("A's delete of fast/k");

    // B's own changes are in its feed too, as local ones.
    b.sh_ok("echo mine > fast/b");
    let line = tail.until(Duration::from_secs(10), |l| is(l, "fast/b", "write")).expect("B's own write");
    assert_eq!((json(&line)["node"].as_str(), json(&line)["origin"].as_str()), (Some("b"), Some("local")));

    // `syncfs watch fast/**` printed the fast/ events, and only those.
    let mut seen = Vec::new();
    while let Some(l) = watch.until(Duration::from_secs(5), |_| true) {
        let e = json(&l);
        seen.push(format!("{} {}", e["op"].as_str().unwrap(), e["path"].as_str().unwrap()));
        if e["path"] == "fast/b" && e["op"] == "write" {
            break;
        }
    }
    assert!(seen.iter().all(|s| s.ends_with("fast/k") || s.ends_with("fast/b")), "{seen:?}");
    for want in ["create fast/k", "write fast/k", "delete fast/k", "write fast/b"] {
        assert!(seen.iter().any(|s| s == want), "syncfs watch missed {want}: {seen:?}");
    }

    // A late reader reads the feed from its start; the feed cannot be written.
    let all = std::fs::read_to_string(b.path(".syncfs/events")).unwrap();
    assert!(all.lines().any(|l| is(l, "fast/k", "create")), "{all}");
    assert!(all.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "every line is JSON");
    let out = b.sh("echo x >> .syncfs/events");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Read-only"), "{out:?}");
    assert_eq!(std::fs::read_to_string(b.path(".syncfs/events")).unwrap().len() >= all.len(), true);
    a.assert_no_panic();
    b.assert_no_panic();
}

/// RFC 3339 with milliseconds, UTC.
fn chrono_like(t: &str) -> bool {
    t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.'
}

#[test]
fn the_status_file_is_the_status_json_and_status_exits_by_health() {
    let nats = NatsServer::start();
    let m = Mount::with(Options { node: Some("s1".into()), nats: vec![nats.url()], ..Default::default() });
    let text = std::fs::read_to_string(m.path(".syncfs/status")).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let cli = m.status();
    assert_eq!(file["node"], "s1");
    assert_eq!(file["pid"], cli["pid"]);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&file), keys(&cli), "the same document as status --json");
    // Fresh at every open: a change shows at once.
    m.sh_ok("echo 1 > fast/status/x");
    let again: Value = serde_json::from_str(&std::fs::read_to_string(m.path(".syncfs/status")).unwrap()).unwrap();
    assert!(again["events"]["written"].as_u64() > file["events"]["written"].as_u64(), "{again}");
    assert!(!m.sh("echo x > .syncfs/status").status.success(), "the status file is read-only");

    let exit = |mp: &std::path::Path| syncfs(&["status", mp.to_str().unwrap()]).status.code();
    assert_eq!(exit(&m.mnt), Some(0), "healthy");
    drop(nats);
    // The connection's loss is noticed within a few seconds (issue 10): then degraded.
    let degraded = crate::harness::wait_for(Duration::from_secs(20), || exit(&m.mnt) == Some(1));
    assert!(degraded, "status did not exit 1 with NATS gone: {}", String::from_utf8_lossy(&syncfs(&["status", m.mnt.to_str().unwrap()]).stdout));
    let out = syncfs(&["status", m.mnt.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("health:       degraded: NATS is disconnected"));
    let other = tempfile::tempdir().unwrap();
    assert_eq!(exit(other.path()), Some(2), "not mounted");
}

#[test]
fn python_open_read_close_and_unmount_write_no_warning() {
    let mut m = Mount::start();
    m.sh_ok("mkdir -p durable && echo 'a: 1' > durable/x.yml && echo hi > notes.txt");
    let log = m.state.join("syncfs.log");
    let before = std::fs::read_to_string(&log).unwrap().len();
    m.sh_ok(
        "python3 - <<'EOF'\nfor _ in range(50):\n    for p in ('durable/x.yml', 'notes.txt', '.syncfs/events'):\n        with open(p) as f: f.read()\n    with open('notes.txt', 'rb') as f: f.read()\nEOF",
    );
    // A retrying program cannot flood the log: 500 refused writes of a read-only file.
    m.sh("for i in $(seq 500); do echo x 2>/dev/null > .syncfs/status; mv notes.txt .syncfs/history/n 2>/dev/null; done; true");
    let mnt = m.mnt.clone();
    m.umount();
    assert!(!crate::harness::is_mounted(&mnt));
    let text = std::fs::read_to_string(&log).unwrap();
    let after = &text[before..];
    let warnings: Vec<&str> = after.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    assert!(warnings.len() <= 2, "warnings written by ordinary programs and an unmount:\n{}", warnings.join("\n"));
    assert!(!after.contains("Failed to umount"), "{after}");
    assert!(!after.contains("Not Implemented"), "{after}");
}

/// This machine's first address that is not loopback, if it has one.
fn outside_address() -> Option<String> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().find(|a| a.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback())).map(str::to_string)
}

#[test]
fn the_embedded_server_listens_where_asked_and_only_with_credentials() {
    let Some(ip) = outside_address() else {
        eprintln!("SKIPPED: this machine has no IPv4 address beyond loopback");
        return;
    };
    // Off loopback without credentials: refused, nothing mounted.
    let mut bare = Mount::prepare();
    let out = bare.try_mount(&Options { extra: vec!["--listen".into(), "0.0.0.0".into()], policies: Some(TABLE.into()), ..Default::default() });
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("give it credentials"), "{text}");
    assert!(!crate::harness::is_mounted(&bare.mnt));

    let creds = "nats:\n  user: syncfs\n  password: s3cret-pw\n";
    let port = {
        let l = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let a = Mount::with(Options {
        node: Some("a".into()),
        extra: vec!["--listen".into(), format!("0.0.0.0:{port}")],
        config: Some(creds.into()),
        policies: Some(TABLE.into()),
        ..Default::default()
    });
    assert_eq!(a.status()["nats"]["embedded"], true);
    // Node b joins through the machine's outside address, as a node on another machine would.
    let url = format!("nats://{ip}:{port}");
    let b = Mount::with(Options {
        node: Some("b".into()),
        nats: vec![url.clone()],
        config: Some(creds.into()),
        policies: Some(TABLE.into()),
        ..Default::default()
    });
    a.sh_ok("mkdir -p fast && echo from-a > fast/x");
    assert!(crate::harness::wait_content(&b.path("fast/x"), "from-a\n"), "b never saw a's write through {url}");
    b.sh_ok("echo from-b > fast/y");
    assert!(crate::harness::wait_content(&a.path("fast/y"), "from-b\n"));
    // The password is the server's: a client without it is refused, and no log shows it.
    let mut c = Mount::prepare();
    let out = c.try_mount(&Options { nats: vec![url], policies: Some(TABLE.into()), ..Default::default() });
    assert!(!out.status.success(), "a node without the credentials joined");
    for m in [&a, &b] {
        let log = std::fs::read_to_string(m.state.join("syncfs.log")).unwrap();
        assert!(!log.contains("s3cret-pw"), "the password is in a log");
    }
    let conf = a.state.join("nats/server.conf");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&conf).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "server.conf holds the password: only its owner reads it");
}
