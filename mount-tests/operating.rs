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
    let warnings = |from: usize| -> (usize, Vec<String>) {
        let text = std::fs::read_to_string(&log).unwrap();
        let lines = text[from..].lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).map(str::to_string).collect();
        (text.len(), lines)
    };
    let (after_python, lines) = warnings(before);
    assert!(lines.is_empty(), "Python's open/read/close logged:\n{}", lines.join("\n"));
    // A retrying program cannot flood the log: 500 refused writes of a read-only file.
    m.sh("for i in $(seq 500); do echo x 2>/dev/null > .syncfs/status; mv notes.txt .syncfs/history/n 2>/dev/null; done; true");
    let (after_retries, lines) = warnings(after_python);
    assert!(lines.len() <= 2, "a retrying program wrote:\n{}", lines.join("\n"));
    let mnt = m.mnt.clone();
    m.umount();
    assert!(!crate::harness::is_mounted(&mnt));
    let (_, lines) = warnings(after_retries);
    assert!(lines.is_empty(), "the unmount logged:\n{}", lines.join("\n"));
    let text = std::fs::read_to_string(&log).unwrap();
    let after = &text[before..];
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

#[test]
fn fstab_lines_mount_with_mount_t_fuse_syncfs() {
    // mount(8) runs /sbin/mount.fuse.syncfs for `-t fuse.syncfs`: the binary under that name.
    let helper = std::path::Path::new("/sbin/mount.fuse.syncfs");
    // Pointed at this build (a helper of another checkout would test that one).
    let ours = std::fs::read_link(helper).is_ok_and(|t| t == std::path::Path::new(bin()));
    if !ours {
        let _ = std::fs::remove_file(helper);
        std::os::unix::fs::symlink(bin(), helper).expect("install the mount helper (root)");
    }
    let base = tempfile::tempdir().unwrap();
    let (mnt, state, cfg) = (base.path().join("mnt"), base.path().join("state"), base.path().join("node.yml"));
    std::fs::create_dir(&mnt).unwrap();
    std::fs::write(&cfg, "node: fstab-node\n").unwrap();
    let fstab = base.path().join("fstab");
    std::fs::write(
        &fstab,
        format!("{} {} fuse.syncfs defaults,noauto,_netdev,x-systemd.automount,state={} 0 0\n", cfg.display(), mnt.display(), state.display()),
    )
    .unwrap();
    let out = Command::new("mount").arg("-T").arg(&fstab).arg(&mnt).output().unwrap();
    assert!(out.status.success(), "mount -T fstab: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(crate::harness::is_mounted(&mnt));
    let status = syncfs(&["status", mnt.to_str().unwrap(), "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["node"], "fstab-node", "the config named as the fstab source applies");
    assert_eq!(status["state_dir"], state.display().to_string());
    std::fs::write(mnt.join("x.txt"), "via fstab\n").unwrap();
    // An option syncfs does not know fails the mount, in mount(8)'s words.
    let bad = tempfile::tempdir().unwrap();
    let out = Command::new("mount").args(["-t", "fuse.syncfs", "-o", "colour=blue", "syncfs"]).arg(bad.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option `colour"), "{}", String::from_utf8_lossy(&out.stderr));
    // umount(8) unmounts; the daemon finishes and exits.
    let out = syncfs(&["umount", mnt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!crate::harness::is_mounted(&mnt));
}

#[test]
fn the_systemd_unit_verifies_and_its_commands_run_a_mount() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/systemd/syncfs@.service")).unwrap();
    let base = tempfile::tempdir().unwrap();
    let root = base.path();
    // The unit's paths, moved under a temporary root, and this build's binary.
    let local = unit
        .replace("/usr/local/bin/syncfs", bin())
        .replace("/srv/syncfs", &root.join("srv").display().to_string())
        .replace("/etc/syncfs", &root.join("etc").display().to_string())
        .replace("/var/lib/syncfs", &root.join("var").display().to_string());
    let dir = root.join("units");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("syncfs@.service"), &local).unwrap();
    if Command::new("systemd-analyze").arg("--version").output().is_ok() {
        let out = Command::new("systemd-analyze").arg("verify").arg(dir.join("syncfs@t1.service")).output().unwrap();
        assert!(out.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));
    } else {
        eprintln!("systemd-analyze is not installed: the unit is not verified");
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/t1.yml"), "").unwrap();
    // Run the Exec lines as systemd would for instance t1 (%I = t1, %H = the host name).
    let host = syncfs::config::hostname();
    let exec = |key: &str| -> Vec<String> {
        local
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|c| c.trim_start_matches('-').replace("%I", "t1").replace("%H", &host))
            .collect()
    };
    for pre in exec("ExecStartPre") {
        let _ = Command::new("sh").arg("-c").arg(&pre).output().unwrap();
    }
    let start = exec("ExecStart").pop().unwrap();
    let mut daemon = Command::new("sh").arg("-c").arg(format!("exec {start}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mnt = root.join("srv/t1");
    assert!(crate::harness::wait_for(Duration::from_secs(20), || syncfs(&["status", mnt.to_str().unwrap()]).status.code() == Some(0)), "the service's mount never answered");
    let status: Value = serde_json::from_slice(&syncfs(&["status", mnt.to_str().unwrap(), "--json"]).stdout).unwrap();
    assert_eq!(status["node"], format!("{host}-t1"));
    std::fs::write(mnt.join("hello.txt"), "from the service\n").unwrap();
    for stop in exec("ExecStop") {
        let out = Command::new("sh").arg("-c").arg(&stop).output().unwrap();
        assert!(out.status.success(), "{stop}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let exited = crate::harness::wait_for(Duration::from_secs(30), || daemon.try_wait().ok().flatten().is_some());
    assert!(exited, "the daemon did not exit after ExecStop");
    assert!(daemon.wait().unwrap().success(), "the foreground daemon exits 0 after a clean stop");
    assert!(!crate::harness::is_mounted(&mnt));
}

/// `GET /metrics` on `addr`: the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text}"));
    assert!(head.starts_with("HTTP/1.0 200") && head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn prometheus_metrics_on_a_loopback_address_follow_the_status() {
    let nats = NatsServer::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let m = Mount::with(Options {
        node: Some("m1".into()),
        nats: vec![nats.url()],
        config: Some(format!("metrics:\n  listen: {addr}\n")),
        ..Default::default()
    });
    let body = scrape(&addr);
    assert_eq!(sample(&body, "syncfs_up{node=\"m1\"}"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "syncfs_nats_connected{node=\"m1\"}"), Some(1.0));
    assert!(body.contains("# TYPE syncfs_commits_total counter"), "{body}");
    let commits = |b: &str| sample(b, "syncfs_commits_total{node=\"m1\",tier=\"nats-kv\"}").unwrap_or(0.0);
    let before = commits(&body);
    m.sh_ok("echo 1 > fast/status/a && echo 2 > fast/status/b");
    let after = scrape(&addr);
    assert_eq!(commits(&after), before + 2.0, "{after}");
    assert!(sample(&after, "syncfs_committed_bytes_total{node=\"m1\",tier=\"nats-kv\"}").unwrap() >= 4.0);
    assert!(sample(&after, "syncfs_commit_seconds_total{node=\"m1\",tier=\"nats-kv\"}").unwrap() > 0.0);
    // A lock held shows while it is held.
    let mut holder = Command::new("flock").args(["-x", "fast/casual/lock", "sleep", "3"]).current_dir(&m.mnt).spawn().unwrap();
    assert!(crate::harness::wait_for(Duration::from_secs(5), || sample(&scrape(&addr), "syncfs_locks_held{node=\"m1\"}") == Some(1.0)));
    holder.wait().unwrap();
    // A bad address stops the mount with the key's line.
    let mut bad = Mount::prepare();
    let out = bad.try_mount(&Options { config: Some("metrics:\n  listen: localhost\n".into()), ..Default::default() });
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("metrics.listen"), "{out:?}");
}
