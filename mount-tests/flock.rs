//! `flock(2)` and `fcntl(2)` record locks across nodes (issue 11, item 2), taken with the
//! ordinary tools: util-linux `flock` and Python's `fcntl`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::git::Remote;
use crate::harness::{wait_for, Mount, Options};
use crate::nats::NatsServer;

const TABLE: &str = r#"
policies:
  - pattern: "fast/**"
    tier: nats-kv
    consistency: lww
  - pattern: "scratch/**"
    tier: local
"#;

/// A short lease, so a dead mount's locks go within the test.
const CONFIG: &str = "locks:\n  lease_ms: 3000\ngit:\n  quiet_ms: 200\n";

fn node(name: &str, server: &NatsServer, remote: &Remote) -> Mount {
    Mount::with(Options {
        node: Some(name.into()),
        nats: vec![server.url()],
        git_remote: Some(remote.path.display().to_string()),
        policies: Some(TABLE.into()),
        config: Some(CONFIG.into()),
        ..Default::default()
    })
}

/// Two nodes sharing a NATS server and a git remote (kept alive by the caller).
fn two_nodes(server: &NatsServer, remote: &Remote) -> (Mount, Mount) {
    let (a, b) = (node("a", server, remote), node("b", server, remote));
    a.sh_ok("mkdir -p fast/casual durable scratch && echo 0 > fast/casual/lock && echo 0 > durable/lock && echo x > scratch/lock");
    b.sh_ok("mkdir -p scratch && echo x > scratch/lock");
    assert!(wait_for(Duration::from_secs(30), || b.path("fast/casual/lock").exists() && b.path("durable/lock").exists()));
    (a, b)
}

/// Starts `script` in the mount and waits until it prints its first line (`held`).
fn hold(m: &Mount, script: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(m.path(""))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "held", "{script}");
    (child, out)
}

fn nanos(s: &str) -> u128 {
    s.trim().parse().unwrap_or_else(|_| panic!("not a time: {s:?}"))
}

#[test]
fn flock_excludes_across_nodes_and_a_waiter_gets_the_lock_at_its_release() {
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = two_nodes(&server, &remote);
    for file in ["fast/casual/lock", "durable/lock"] {
        // A holds an exclusive lock for two seconds, then says when it lets go.
        let (mut holder, mut out) = hold(&a, &format!("flock -x {file} -c 'echo held; sleep 2; date +%s%N'"));
        for mode in ["-x", "-s"] {
            let tried = b.sh(&format!("flock -n {mode} {file} -c true"));
            assert_eq!(tried.status.code(), Some(1), "{file}: B took a {mode} lock A holds exclusively");
        }
        // A blocking flock on B waits for A's release.
        let got = b.sh_ok(&format!("flock -x {file} -c 'date +%s%N'"));
        let mut released = String::new();
        out.read_line(&mut released).unwrap();
        assert!(holder.wait().unwrap().success());
        assert!(nanos(&got) > nanos(&released), "{file}: B got the lock at {got} before A released it at {released}");

        // Shared locks share across nodes, and keep writers out.
        let (mut reader, _out) = hold(&a, &format!("flock -s {file} -c 'echo held; sleep 2'"));
        b.sh_ok(&format!("flock -n -s {file} -c true"));
        assert_eq!(b.sh(&format!("flock -n -x {file} -c true")).status.code(), Some(1), "{file}: a writer got in beside a reader");
        reader.wait().unwrap();
        // Released with the process (the kernel sends the release after its exit, and a git
        // path pushes first): taken within moments.
        b.sh_ok(&format!("flock -w 10 -x {file} -c true"));
    }
}

const FCNTL: &str = r#"
import fcntl, os, struct, sys, time
path, role = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
def getlk(start, length):
    r = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack('hhqqi', fcntl.F_WRLCK, 0, start, length, 0))
    typ, _, s, l, pid = struct.unpack('hhqqi', r[:struct.calcsize('hhqqi')])
    return typ, s, l, pid
if role == 'hold':
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0, 0)
    print('held', flush=True)
    sys.stdin.read()
    print('%d' % time.time_ns(), flush=True)
    os.close(fd)
else:
    typ, s, l, pid = getlk(0, 10)
    print('getlk', typ == fcntl.F_WRLCK, s, l, pid)
    print('getlk-free', getlk(10, 10)[0] == fcntl.F_UNLCK)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 10, 0)
    print('beside ok')
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 5, 0)
        print('overlap granted')
    except OSError as e:
        print('overlap', e.errno)
    print('waiting', flush=True)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0, 0)
    print('%d' % time.time_ns(), flush=True)
"#;

#[test]
fn fcntl_record_locks_conflict_by_range_report_their_holder_and_wake_waiters() {
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = two_nodes(&server, &remote);
    for file in ["fast/casual/lock", "durable/lock"] {
        let mut holder = Command::new("python3")
            .args(["-c", FCNTL, file, "hold"])
            .current_dir(a.path(""))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut held = BufReader::new(holder.stdout.take().unwrap());
        let mut line = String::new();
        held.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "held");
        let mut tester = Command::new("python3")
            .args(["-c", FCNTL, file, "test"])
            .current_dir(b.path(""))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(tester.stdout.take().unwrap());
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            assert!(out.read_line(&mut l).unwrap() > 0, "{file}: the tester stopped: {lines:?}");
            if l.trim() == "waiting" {
                break;
            }
            lines.push(l.trim().to_string());
        }
        assert_eq!(
            lines,
            [format!("getlk True 0 10 {}", holder.id()), "getlk-free True".into(), "beside ok".into(), format!("overlap {}", libc::EAGAIN)],
            "{file}"
        );
        // B waits on bytes 0-9 until A's process lets go (it closes the file).
        std::thread::sleep(Duration::from_millis(500));
        assert!(tester.try_wait().unwrap().is_none(), "{file}: B's F_SETLKW returned while A held the range");
        drop(holder.stdin.take());
        let mut released = String::new();
        held.read_line(&mut released).unwrap();
        let mut got = String::new();
        out.read_line(&mut got).unwrap();
        assert!(tester.wait().unwrap().success() && holder.wait().unwrap().success());
        assert!(nanos(&got) > nanos(&released), "{file}: B got the range at {got}, A released it at {released}");
    }
}

#[test]
fn increments_under_flock_on_two_nodes_lose_nothing() {
    // Release-acquire: what a holder closed before unlocking is what the next holder reads,
    // on another node at once. A lost increment would be a stale read or two holders.
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = two_nodes(&server, &remote);
    a.sh_ok("echo 0 > fast/casual/counter");
    assert!(wait_for(Duration::from_secs(10), || std::fs::read_to_string(b.path("fast/casual/counter")).is_ok_and(|c| c == "0\n")));
    const ROUNDS: usize = 15;
    let script = format!(
        "for i in $(seq {ROUNDS}); do flock -x fast/casual/lock -c 'n=$(cat fast/casual/counter); echo $((n+1)) > fast/casual/counter'; done"
    );
    let runners: Vec<Child> = [&a, &b]
        .iter()
        .map(|m| Command::new("bash").arg("-c").arg(&script).current_dir(m.path("")).spawn().unwrap())
        .collect();
    for mut r in runners {
        assert!(r.wait().unwrap().success());
    }
    let want = format!("{}\n", 2 * ROUNDS);
    for m in [&a, &b] {
        assert!(
            wait_for(Duration::from_secs(10), || std::fs::read_to_string(m.path("fast/casual/counter")).is_ok_and(|c| c == want)),
            "counter: {:?}, want {want:?}",
            std::fs::read_to_string(m.path("fast/casual/counter"))
        );
    }
}

#[test]
fn increments_under_flock_on_a_git_path_lose_nothing() {
    // Git paths too: a release pushes what the holder committed, a grant fetches first.
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = two_nodes(&server, &remote);
    a.sh_ok("mkdir -p work && echo 0 > work/counter");
    assert!(wait_for(Duration::from_secs(20), || std::fs::read_to_string(b.path("work/counter")).is_ok_and(|c| c == "0\n")));
    const ROUNDS: usize = 8;
    let script = format!("for i in $(seq {ROUNDS}); do flock -x durable/lock -c 'n=$(cat work/counter); echo $((n+1)) > work/counter'; done");
    let runners: Vec<Child> = [&a, &b]
        .iter()
        .map(|m| Command::new("bash").arg("-c").arg(&script).current_dir(m.path("")).spawn().unwrap())
        .collect();
    for mut r in runners {
        assert!(r.wait().unwrap().success());
    }
    let want = format!("{}\n", 2 * ROUNDS);
    for m in [&a, &b] {
        assert!(
            wait_for(Duration::from_secs(20), || std::fs::read_to_string(m.path("work/counter")).is_ok_and(|c| c == want)),
            "counter: {:?}, want {want:?}",
            std::fs::read_to_string(m.path("work/counter"))
        );
    }
}

#[test]
fn the_fencing_revision_grows_with_each_acquisition_and_only_holders_see_it() {
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = two_nodes(&server, &remote);
    let fence = |m: &Mount| -> u64 {
        let out = m.sh_ok("flock -x fast/casual/lock -c 'getfattr --only-values -n user.syncfs.lock fast/casual/lock'");
        out.trim().parse().unwrap_or_else(|_| panic!("not a fencing revision: {out:?}"))
    };
    let first = fence(&a);
    let second = fence(&b);
    let third = fence(&a);
    assert!(first < second && second < third, "{first} {second} {third}");
    // The kernel sends the release after close returns: the token goes with it.
    let gone = wait_for(Duration::from_secs(5), || !a.sh("getfattr --only-values -n user.syncfs.lock fast/casual/lock").status.success());
    assert!(gone, "a fencing revision without a lock");
}

#[test]
fn a_dead_mounts_locks_expire_after_the_lease_and_local_paths_lock_per_node() {
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (mut a, b) = two_nodes(&server, &remote);
    // Local paths: the kernel's rules, on this node only.
    let (mut local, _out) = hold(&a, "flock -x scratch/lock -c 'echo held; sleep 2'");
    assert_eq!(a.sh("flock -n -x scratch/lock -c true").status.code(), Some(1), "a local lock did not exclude on its node");
    b.sh_ok("flock -n -x scratch/lock -c true");
    local.wait().unwrap();

    // A's daemon dies holding a lock: B gets it once the lease (3 s) is over, not before.
    let (mut holder, _out) = hold(&a, "exec flock -o -x fast/casual/lock -c 'echo held; exec sleep 30'");
    let pid: i32 = std::fs::read_to_string(a.state.join("lock")).unwrap().trim().parse().unwrap();
    // SAFETY: killing this test's own daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = Instant::now();
    assert_eq!(b.sh("flock -n -x fast/casual/lock -c true").status.code(), Some(1), "the lock went with the daemon at once");
    b.sh_ok("flock -w 30 -x fast/casual/lock -c true");
    let waited = killed.elapsed();
    assert!(waited >= Duration::from_secs(2), "B got the lock {waited:?} after the kill: before the lease ended");
    assert!(wait_for(Duration::from_secs(10), || !syncfs::daemon::process_alive(pid as u32)));
    let _ = holder.kill();
    let _ = holder.wait();
    a.forget_mounted();
    let _ = Command::new(crate::harness::bin()).args(["umount", &a.mnt.display().to_string()]).output();
}

#[test]
fn sqlite3_on_two_nodes_keeps_every_row_it_reported_stored() {
    // The real sqlite3 with its rollback journal, one small database on a KV path, two nodes
    // inserting 20 rows each in separate transactions at the same time. SQLite's fcntl locks
    // are the cluster's, so its transactions take turns; a transaction whose descriptor reads
    // a version another node replaced gets ESTALE ("disk I/O error") and is retried, as a
    // program does with an error it is told about. Nothing it was told is stored may be lost.
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = two_nodes(&server, &remote);
    a.sh_ok("sqlite3 fast/casual/t.db 'PRAGMA journal_mode=DELETE; CREATE TABLE t(node TEXT, i INTEGER)' >/dev/null");
    assert!(wait_for(Duration::from_secs(10), || std::fs::metadata(b.path("fast/casual/t.db")).is_ok_and(|m| m.len() > 0)));
    let script = |node: &str| {
        format!(
            "for i in $(seq 20); do ok=; for try in $(seq 30); do \
               if sqlite3 -cmd '.timeout 10000' fast/casual/t.db \"INSERT INTO t VALUES('{node}', $i)\" 2>>../sqlite-{node}.err; then ok=1; break; fi; sleep 0.1; \
             done; [ -n \"$ok\" ] || {{ echo \"row $i never stored\"; exit 1; }}; done"
        )
    };
    let runners: Vec<(Child, String)> = [(&a, "a"), (&b, "b")]
        .iter()
        .map(|(m, n)| (Command::new("bash").arg("-c").arg(script(n)).current_dir(m.path("")).spawn().unwrap(), n.to_string()))
        .collect();
    for (mut r, n) in runners {
        assert!(r.wait().unwrap().success(), "node {n} could not store its rows");
    }
    for m in [&a, &b] {
        let query = "SELECT count(*), count(DISTINCT node || i) FROM t; PRAGMA integrity_check;";
        let mut last = String::new();
        let all = wait_for(Duration::from_secs(15), || {
            last = m.sh(&format!("sqlite3 fast/casual/t.db '{query}'")).stdout.iter().map(|&c| c as char).collect();
            last == "40|40\nok\n"
        });
        assert!(all, "{}: {last:?}", m.path("").display());
    }
    // What the retries met: only the documented errors.
    for n in ["a", "b"] {
        let errors = std::fs::read_to_string(a.path("").parent().unwrap().join(format!("sqlite-{n}.err"))).unwrap_or_default();
        let errors = errors + &std::fs::read_to_string(b.path("").parent().unwrap().join(format!("sqlite-{n}.err"))).unwrap_or_default();
        for line in errors.lines() {
            assert!(line.contains("disk I/O error") || line.contains("database is locked"), "sqlite3 on {n}: {line}");
        }
        eprintln!("sqlite: node {n}: {} retried transactions", errors.lines().count());
    }
}

const CRITICAL: &str = r#"
import fcntl, json, os, random, sys, time
lock, value, node, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
random.seed(node)
fd = os.open(lock, os.O_RDWR)
for i in range(rounds):
    fcntl.lockf(fd, fcntl.LOCK_EX)
    t0 = time.time_ns()
    with open(value) as f:
        seen = f.read().strip()
    wrote = '%s-%d' % (node, i)
    with open(value, 'w') as f:
        f.write(wrote + '\n')
    t1 = time.time_ns()
    fcntl.lockf(fd, fcntl.LOCK_UN)
    print(json.dumps([t0, t1, seen, wrote]), flush=True)
    time.sleep(random.random() * 0.05)
"#;

#[test]
fn lock_histories_of_three_nodes_show_one_holder_at_a_time_and_each_reads_the_last_write() {
    // A checker, not a scenario: every holder records when it held the lock (inside the
    // critical section, by one machine's clock), what it read and what it wrote. Sorted by
    // start, no two sections overlap, and each reads what the previous holder wrote.
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = two_nodes(&server, &remote);
    let c = node("c", &server, &remote);
    a.sh_ok("echo init > fast/casual/value");
    for m in [&b, &c] {
        assert!(wait_for(Duration::from_secs(20), || m.path("fast/casual/lock").exists()
            && std::fs::read_to_string(m.path("fast/casual/value")).is_ok_and(|v| v == "init\n")));
    }
    const ROUNDS: usize = 12;
    let runners: Vec<(String, Child)> = [("a", &a), ("b", &b), ("c", &c)]
        .iter()
        .map(|(n, m)| {
            let child = Command::new("python3")
                .args(["-c", CRITICAL, "fast/casual/lock", "fast/casual/value", n, &ROUNDS.to_string()])
                .current_dir(m.path(""))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            (n.to_string(), child)
        })
        .collect();
    let mut sections: Vec<(u128, u128, String, String, String)> = Vec::new();
    for (n, child) in runners {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "node {n}'s holder failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let (t0, t1, seen, wrote): (u128, u128, String, String) = serde_json::from_str(line).unwrap();
            sections.push((t0, t1, seen, wrote, n.clone()));
        }
    }
    assert_eq!(sections.len(), 3 * ROUNDS);
    sections.sort();
    let mut violations = Vec::new();
    let mut last = "init".to_string();
    for (i, (t0, t1, seen, wrote, n)) in sections.iter().enumerate() {
        if let Some(next) = sections.get(i + 1) {
            if next.0 < *t1 {
                violations.push(format!("two holders: {n} held {t0}..{t1}, {} took it at {}", next.4, next.0));
            }
        }
        if *seen != last {
            violations.push(format!("{n} read {seen:?} under the lock at {t0}; the last holder wrote {last:?}"));
        }
        last = wrote.clone();
    }
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
}
