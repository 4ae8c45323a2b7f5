//! The command line: mount, umount, status, policy check/explain, signals, stale mounts.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{bin, is_mounted, process_alive, sh_ok_in, syncfs, wait_for, Mount, Options};

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn mount_returns_when_serving_and_umount_waits_for_the_daemon() {
    let mut m = Mount::start();
    // No sleep: the filesystem answers as soon as mount returned.
    assert!(is_mounted(&m.mnt));
    m.sh_ok("echo a > f && cat f >/dev/null");
    let pid = m.pid();
    m.umount();
    assert!(!is_mounted(&m.mnt));
    assert!(!process_alive(pid), "daemon still running");
    // What was written is in the state dir and back on the next mount.
    let out = m.try_mount(&Options::default());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(m.sh_ok("cat f"), "a\n");
}

#[test]
fn status_json_is_stable() {
    let m = Mount::with(Options {
        node: Some("n-status".into()),
        ..Default::default()
    });
    let s = m.status();
    for key in [
        "version", "node", "pid", "mountpoint", "state_dir", "log_file", "started_at", "fuse", "nats",
        "git", "tiers", "pending_writes", "conflicts", "policies", "inodes", "open_files",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    assert_eq!(s["version"], 1);
    assert_eq!(s["node"], "n-status");
    assert_eq!(s["mountpoint"], m.mnt.display().to_string());
    assert_eq!(s["nats"]["state"], "connected");
    assert_eq!(s["nats"]["embedded"], true);
    let human = syncfs(&["status", &m.mnt.display().to_string()]);
    let human = text(&human);
    assert!(human.contains("node:         n-status"), "{human}");
    assert!(human.contains("conflicts:    none"), "{human}");
}

#[test]
fn mount_failures_explain_and_leave_nothing_mounted() {
    let mut m = Mount::prepare();
    // A policy file that does not parse.
    let policies = m.state.join("tree/.syncfs");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("policies.yml"), "policies:\n  - pattern: x\n    tier: gti\n").unwrap();
    let out = m.try_mount(&Options::default());
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("policies.yml:3:11: unknown tier `gti`"), "{msg}");
    assert!(!is_mounted(&m.mnt));

    // A policy pairing a tier with a consistency it cannot serve.
    std::fs::write(
        policies.join("policies.yml"),
        "policies:\n  - pattern: \"log/**\"\n    tier: git\n    consistency: append\n",
    )
    .unwrap();
    let out = m.try_mount(&Options::default());
    assert!(!out.status.success());
    assert!(text(&out).contains("policies.yml:4:18: tier git cannot serve consistency append"), "{}", text(&out));
    assert!(!is_mounted(&m.mnt));

    // A bad config key, with its line.
    std::fs::write(policies.join("policies.yml"), "policies: []\n").unwrap();
    let out = m.try_mount(&Options {
        config: Some("node: x\nfuse:\n  treads: 3\n".into()),
        ..Default::default()
    });
    assert!(!out.status.success());
    assert!(text(&out).contains("config.yml:3:3: unknown key `fuse.treads`"), "{}", text(&out));

    // A mount point that does not exist.
    let out = syncfs(&["mount", "/nonexistent/syncfs-mnt", "--state", &m.state.display().to_string()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
    assert!(!is_mounted(&m.mnt));
}

#[test]
fn second_mount_on_the_same_point_or_state_is_refused() {
    let m = Mount::start();
    let out = syncfs(&["mount", &m.mnt.display().to_string(), "--state", "/tmp/other-state-dir-x"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("already a syncfs mount"), "{}", text(&out));

    let other = m.base.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let out = syncfs(&["mount", &other.display().to_string(), "--state", &m.state.display().to_string()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("in use by another syncfs daemon"), "{}", text(&out));
    assert!(!is_mounted(&other));
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut m = Mount::start();
        m.sh_ok("echo before > f");
        let pid = m.pid();
        // SAFETY: sending a signal to our own daemon.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
        assert!(wait_for(Duration::from_secs(10), || !is_mounted(&m.mnt)), "still mounted after signal {signal}");
        assert!(wait_for(Duration::from_secs(10), || !process_alive(pid)));
        m.forget_mounted();
        assert_eq!(std::fs::read_to_string(m.tree("f")).unwrap(), "before\n");
    }
}

#[test]
fn stale_mount_is_explained_and_cleaned() {
    let mut m = Mount::start();
    m.sh_ok("echo survived > f");
    let pid = m.pid();
    // SAFETY: killing our own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // statfs always reaches the filesystem; stat may be answered from the kernel's cache.
    let c = std::ffi::CString::new(m.mnt.as_os_str().as_encoded_bytes()).unwrap();
    assert!(wait_for(Duration::from_secs(10), || {
        let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: valid C string and buffer.
        let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
        r != 0 && crate::harness::last_errno() == libc::ENOTCONN
    }));
    let mp = m.mnt.display().to_string();
    let status = syncfs(&["status", &mp]);
    assert!(!status.status.success());
    assert!(text(&status).contains("stale mount"), "{}", text(&status));
    assert!(text(&status).contains("syncfs umount"), "{}", text(&status));
    let again = m.try_mount(&Options::default());
    assert!(!again.status.success());
    assert!(text(&again).contains("Transport endpoint is not connected"), "{}", text(&again));
    let umount = syncfs(&["umount", &mp]);
    assert!(umount.status.success(), "{}", text(&umount));
    assert!(text(&umount).contains("stale"), "{}", text(&umount));
    assert!(!is_mounted(&m.mnt));
    // The write whose close returned is there after remounting.
    let out = m.try_mount(&Options::default());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(m.sh_ok("cat f"), "survived\n");
}

/// The daemon's guard processes (`syncfs guard PID ...`).
fn guards_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.len() > 2 && args[1] == b"guard" && args[2] == pid.to_string().as_bytes() {
            found.extend(entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()));
        }
    }
    found
}

/// A daemon killed while one of its threads waits in the kernel (an entry invalidation behind
/// a directory lock) cannot finish dying and programs on the mount would wait forever (seen in
/// the kill -9 soak run): its guard aborts the FUSE connection. Here the kill is a plain one;
/// the guard must notice it and abort, and a clean unmount must stop the guard without one.
#[test]
fn a_guard_aborts_the_connection_of_a_killed_daemon_and_leaves_a_clean_one() {
    let mut m = Mount::start();
    let pid = m.pid();
    assert_eq!(guards_of(pid).len(), 1, "one guard beside the daemon");
    m.umount();
    assert!(wait_for(Duration::from_secs(5), || guards_of(pid).is_empty()), "the guard ends with a clean unmount");
    let log = std::fs::read_to_string(m.state.join("syncfs.log")).unwrap();
    assert!(!log.contains("aborted its FUSE connection"), "{log}");

    let mut m = Mount::start();
    m.sh_ok("echo kept > f");
    let pid = m.pid();
    assert_eq!(guards_of(pid).len(), 1);
    // SAFETY: killing our own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let log = || std::fs::read_to_string(m.state.join("syncfs.log")).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(5), || log().contains("aborted its FUSE connection")), "{}", log());
    assert!(wait_for(Duration::from_secs(5), || guards_of(pid).is_empty()));
    let mp = m.mnt.display().to_string();
    let umount = syncfs(&["umount", &mp]);
    assert!(umount.status.success(), "{}", text(&umount));
    m.forget_mounted();
    let out = m.try_mount(&Options::default());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(m.sh_ok("cat f"), "kept\n");
}

#[test]
fn umount_of_a_busy_mount_says_so() {
    let mut m = Mount::start();
    let mut holder = Command::new("bash")
        .arg("-c")
        .arg("exec 3<.syncfs/policies.yml; echo open; sleep 30")
        .current_dir(&m.mnt)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()), &mut line).unwrap();
    let out = syncfs(&["umount", &m.mnt.display().to_string()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is busy"), "{}", text(&out));
    assert!(is_mounted(&m.mnt));
    holder.kill().unwrap();
    holder.wait().unwrap();
    m.umount();
}

#[test]
fn foreground_mount_serves_until_interrupted() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(bin())
        .args(["mount", &mnt.display().to_string(), "--foreground", "--state"])
        .arg(base.path().join("state"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || is_mounted(&mnt)));
    sh_ok_in(&mnt, "echo fg > f && cat f");
    // SAFETY: signalling our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn policy_check_and_explain() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "policies:\n  - pattern: \"durable/**\"\n    tier: git\n    consistency: cas-create\n").unwrap();
    let out = syncfs(&["policy", "check", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains(&format!("{}:4:18: tier git cannot serve consistency cas-create", bad.display())),
        "{}",
        text(&out)
    );

    let good = dir.path().join("good.yml");
    std::fs::write(&good, "policies:\n  - pattern: \"scratch/**\"\n    tier: local\n").unwrap();
    let out = syncfs(&["policy", "check", &good.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ok (1 rules)"));

    let out = syncfs(&["policy", "explain", "scratch/a.txt", "--config", &good.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("rule:        \"scratch/**\""), "{t}");
    assert!(t.contains("line 2"), "{t}");
    assert!(t.contains("tier:        local"), "{t}");

    let out = syncfs(&["policy", "explain", "x.swp"]);
    assert!(text(&out).contains("built-in temp files rule"), "{}", text(&out));

    let m = Mount::start();
    let out = syncfs(&["policy", "explain", "--mount", &m.mnt.display().to_string(), &m.path("durable/a/b.yml").display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("path:        durable/a/b.yml"), "{}", text(&out));
    assert!(text(&out).contains("labels=union"), "{}", text(&out));
    assert!(text(&out).contains("(as mounted)"), "{}", text(&out));
}

#[test]
fn a_new_valid_policy_table_applies_from_the_next_mount() {
    let mut m = Mount::start();
    m.sh_ok(
        r#"cat > .syncfs/policies.yml <<'EOF'
policies:
  - pattern: "notes/**"
    tier: local
    consistency: none
EOF"#,
    );
    // The running mount keeps the table it loaded.
    assert_eq!(m.sh_ok("mkdir notes && touch notes/a && getfattr -n user.syncfs.policy --only-values notes/a"), "**");
    m.umount();
    let out = m.try_mount(&Options::default());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(m.sh_ok("getfattr -n user.syncfs.policy --only-values notes/a"), "notes/**");
}
