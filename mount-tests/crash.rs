//! `kill -9` of the daemon in the middle of a create or of a durable fsync (issue 10, defect 7):
//! what no close acknowledged must not reach another node as an empty file, and the next mount
//! must not take the tree's older copy for a change of its own.

use std::time::Duration;

use crate::git::{wait_pushed, Remote, QUICK};
use crate::harness::{syncfs, wait_for, Mount, Options};
use crate::nats::NatsServer;

const TABLE: &str = "policies:\n  - pattern: \"durable/**\"\n    tier: git\n    consistency: lww\n";

fn opts(name: &str, remote: &Remote, nats: &NatsServer) -> Options {
    Options {
        node: Some(name.into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        policies: Some(TABLE.into()),
        ..Default::default()
    }
}

fn kill9_and_remount(m: &mut Mount, o: &Options) {
    let pid: i32 = std::fs::read_to_string(m.state.join("lock")).unwrap().trim().parse().unwrap();
    // SAFETY: killing this test's own daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(10), || !syncfs::daemon::process_alive(pid as u32)));
    m.forget_mounted();
    let out = syncfs(&["umount", &m.mnt.display().to_string()]);
    assert!(out.status.success(), "umount of the stale mount: {}", String::from_utf8_lossy(&out.stderr));
    let out = m.try_mount(o);
    assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
}

/// `open(O_CREAT)` on a git path, then `kill -9` of the daemon before any close: after the
/// remount the file is gone on the node, and neither the remote nor the other node ever gets
/// the empty file.
#[test]
fn a_git_create_no_close_acknowledged_is_not_committed_after_kill9() {
    let nats = NatsServer::start();
    let remote = Remote::new();
    let (oa, ob) = (opts("node-a", &remote, &nats), opts("node-b", &remote, &nats));
    let mut a = Mount::with(oa.clone());
    let b = Mount::with(ob);
    a.sh_ok("mkdir -p durable && echo kept > durable/kept.yml");
    wait_pushed(&a);
    let file = a.path("durable/new.yml");
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!("import os,time\nfd=os.open({:?}, os.O_CREAT|os.O_WRONLY, 0o644)\ntime.sleep(60)", file.display().to_string()))
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || file.exists()));
    // Longer than the quiet period: a commit of it would have been made by now.
    std::thread::sleep(Duration::from_secs(1));
    kill9_and_remount(&mut a, &oa);
    let _ = holder.kill();
    let _ = holder.wait();
    wait_pushed(&a);
    assert!(!a.path("durable/new.yml").exists(), "the never-closed create is still on node A");
    assert_eq!(remote.show("durable/new.yml"), None, "the never-closed create was committed");
    assert_eq!(remote.show("durable/kept.yml").as_deref(), Some("kept\n"));
    b.sh_ok("sleep 2");
    assert!(!b.path("durable/new.yml").exists(), "the never-closed create reached node B");
    assert!(a.status()["conflicts"].as_array().is_none_or(|c| c.is_empty()));
}

/// Creates, writes and fsyncs git files in a loop and kills the daemon at varied moments:
/// after each remount every file is absent or holds its whole content (never empty, never a
/// conflict of the node with itself), on this node, on the remote and on another node.
#[test]
fn git_creates_and_fsyncs_killed_at_varied_moments_leave_whole_files_or_none() {
    let nats = NatsServer::start();
    let remote = Remote::new();
    let (oa, ob) = (opts("node-a", &remote, &nats), opts("node-b", &remote, &nats));
    let mut a = Mount::with(oa.clone());
    let b = Mount::with(ob);
    a.sh_ok("mkdir -p durable");
    for round in 0..6u64 {
        let dir = a.path("durable");
        let script = format!(
            "import os\nfor i in range(100000):\n    p=os.path.join({:?}, 'r{round}-%d.yml' % i)\n    fd=os.open(p, os.O_CREAT|os.O_WRONLY, 0o644)\n    os.write(fd, b'value: %d\\n' % i)\n    os.fsync(fd)\n    os.close(fd)\n",
            dir.display().to_string()
        );
        let mut writer = std::process::Command::new("python3").arg("-c").arg(script).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300 + 170 * round));
        kill9_and_remount(&mut a, &oa);
        let _ = writer.kill();
        let _ = writer.wait();
    }
    // A push the kill interrupted can leave the *remote's* ref lock: with a path as remote the
    // daemon's libgit2 writes the remote repository itself (a git server would drop the lock
    // with its receive-pack). The remote's administrator removes it; this node's own locks are
    // removed by the mount.
    for lock in ["refs/heads/main.lock", "packed-refs.lock"] {
        let _ = std::fs::remove_file(remote.path.join(lock));
    }
    wait_pushed(&a);
    let bad = |m: &Mount| -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(m.path("durable")).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let body = std::fs::read_to_string(m.path(&format!("durable/{name}"))).unwrap_or_default();
            let i = name.split('-').nth(1).and_then(|s| s.strip_suffix(".yml")).unwrap_or("?");
            if name.contains(".conflict-") || body != format!("value: {i}\n") {
                out.push(format!("{name}: {body:?}"));
            }
        }
        out
    };
    assert_eq!(bad(&a), Vec::<String>::new(), "node A holds files no close acknowledged, or conflicts");
    assert!(a.status()["conflicts"].as_array().is_none_or(|c| c.is_empty()), "{}", a.status()["conflicts"]);
    let names = std::fs::read_dir(a.path("durable")).unwrap().count();
    assert!(wait_for(Duration::from_secs(20), || std::fs::read_dir(b.path("durable")).map(|d| d.count()).unwrap_or(0) == names));
    assert_eq!(bad(&b), Vec::<String>::new(), "node B holds files no close acknowledged, or conflicts");
}
