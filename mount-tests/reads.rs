//! Reads return what was written: one regression test per defect of that issue that a
//! scenario pins down exactly (the history checker in `checker.rs` drives the rest with random
//! operations). Each runs real programs on real mounts, several nodes where the defect needs
//! them, and asserts what a program must see, not how syncfs gets there.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::git::{self, Remote};
use crate::harness::{bin, node_on, wait_content, wait_for, Mount, Options};
use crate::nats::NatsServer;

/// A policy table with a short TTL under a directory tree, and a plain lww path.
const TTL_TABLE: &str = "policies:
  - pattern: \"fast/status/**\"
    tier: nats-kv
    consistency: lww
    ttl: 2
  - pattern: \"fast/casual/**\"
    tier: nats-kv
    consistency: lww
";

/// Runs `script` in the mount and waits up to `secs` for it. A program waiting on a hung
/// daemon cannot even be killed (the kernel waits for the answer to a request the daemon
/// took), so a hung daemon is killed instead, which fails the request and frees the program,
/// and the test fails rather than hang.
fn sh_or_hung(m: &mut Mount, script: &str, secs: u64) {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(&m.mnt)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let done = wait_for(Duration::from_secs(secs), || child.try_wait().unwrap().is_some());
    if !done {
        let pid = std::fs::read_to_string(m.state.join("lock")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: signalling the test's own daemon.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("umount").arg("-l").arg(&m.mnt).status();
        m.forget_mounted();
        let _ = child.wait();
        panic!("the mount hung on: {script}");
    }
    assert!(child.wait().unwrap().success(), "failed: {script}");
}

#[test]
fn an_entry_expiring_in_a_subdirectory_leaves_every_node_responsive() {
    let nats = NatsServer::start();
    let mut a = node_on(&nats.url(), "a", TTL_TABLE, None);
    let mut b = node_on(&nats.url(), "b", TTL_TABLE, None);
    a.sh_ok("mkdir -p fast/status/host1 fast/casual && echo alive > fast/status/host1/hb");
    assert!(wait_content(&b.path("fast/status/host1/hb"), "alive\n"), "B never saw the heartbeat");
    for m in [&mut a, &mut b] {
        sh_or_hung(m, "while [ -e fast/status/host1/hb ]; do sleep 0.1; done", 20);
    }
    // Expiry looked at the directory's marker (mkdir made one, so it stays) under the lock
    // that used to deadlock: everything else must still answer.
    std::thread::sleep(Duration::from_millis(300));
    for m in [&mut a, &mut b] {
        let status = format!("{} status {} >/dev/null", bin(), m.mnt.display());
        sh_or_hung(m, &status, 10);
        sh_or_hung(m, "echo x > fast/casual/after && cat fast/casual/after && ls fast/status/host1", 10);
    }
}

/// Runs a python script with `args`, line-driven: it prints `ready` when it reached its
/// waiting point, and continues when it reads a line.
struct Program {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Program {
    fn start(dir: &Path, script: &str) -> Program {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut p = Program { child, out };
        p.expect("ready");
        p
    }

    fn expect(&mut self, word: &str) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert!(line.starts_with(word), "the program said {line:?}, expected {word:?}");
        line.trim_end().to_string()
    }

    /// Lets it go on and waits for it to finish; returns what it printed then.
    fn go(mut self) -> String {
        writeln!(self.child.stdin.as_mut().unwrap()).unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the program failed: {rest}");
        rest
    }
}

#[test]
fn a_copy_renamed_over_a_merge_path_keeps_what_another_node_changed_meanwhile() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = git::node("a", &remote, &nats);
    let b = git::node("b", &remote, &nats);
    a.sh_ok("mkdir -p durable && printf 'id: 1\\nowner: a\\n' > durable/x.yml && printf 'id: 2\\n' > durable/y.yml");
    assert!(wait_content(&b.path("durable/y.yml"), "id: 2\n"));
    git::wait_pushed(&a);
    // Three ways programs replace a file: atomically's NAME.tmp-<stamp><hex> (tbd), Python's
    // tempfile + os.replace, and a name no temp rule knows (a git path renamed onto another).
    for (file, tmp) in [
        ("x.yml", "x.yml.tmp-1733140000123a1b2c3"),
        ("y.yml", "tmpk3j_9x2a"),
        ("x.yml", "x.yml.new"),
    ] {
        let key = tmp.replace(['.', '-'], "_");
        // The program reads the file and writes its copy...
        let p = Program::start(
            &a.path("durable"),
            &format!(
                "import os\ntext = open('{file}').read()\nfd = os.open('{tmp}', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n\
                 os.write(fd, (text + 'a_{key}: 1\\n').encode())\nprint('ready', flush=True)\ninput()\n\
                 os.fsync(fd)\nos.close(fd)\nos.replace('{tmp}', '{file}')\n"
            ),
        );
        // ...while another node changes another key, and this node receives it...
        let theirs = format!("b_{key}: 2\n");
        let text = std::fs::read_to_string(b.path(&format!("durable/{file}"))).unwrap();
        std::fs::write(b.path(&format!("durable/{file}")), format!("{text}{theirs}")).unwrap();
        let arrived = wait_for(Duration::from_secs(20), || {
            std::fs::read_to_string(a.path(&format!("durable/{file}"))).is_ok_and(|t| t.contains(&theirs))
        });
        assert!(arrived, "A never received B's change");
        // ...then renames its copy over the file: B's change must survive, on both nodes.
        p.go();
        let merged = wait_for(Duration::from_secs(30), || {
            [&a, &b].iter().all(|m| {
                let t = std::fs::read_to_string(m.path(&format!("durable/{file}"))).unwrap_or_default();
                t.contains(&theirs) && t.contains(&format!("a_{key}: 1\n"))
            })
        });
        let show = |m: &Mount| std::fs::read_to_string(m.path(&format!("durable/{file}"))).unwrap_or_default();
        assert!(merged, "a change was lost by {tmp}:\n--- a\n{}--- b\n{}", show(&a), show(&b));
        assert_eq!(git::converged(&a, &b, &format!("durable/{file}")), show(&a));
    }
}

#[test]
fn an_in_place_rewrite_keeps_what_another_node_changed_while_it_was_open() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = git::node("a", &remote, &nats);
    let b = git::node("b", &remote, &nats);
    a.sh_ok("mkdir -p durable && printf 'id: 1\\n' > durable/z.yml");
    assert!(wait_content(&b.path("durable/z.yml"), "id: 1\n"));
    git::wait_pushed(&a);
    // Open, read, a long think (meanwhile B's change arrives), write, close.
    let p = Program::start(
        &a.path("durable"),
        "f = open('z.yml', 'r+')\ntext = f.read()\nprint('ready', flush=True)\ninput()\n\
         f.seek(0)\nf.write(text + 'from_a: 1\\n')\nf.truncate()\nf.close()\n",
    );
    std::fs::write(b.path("durable/z.yml"), "id: 1\nfrom_b: 2\n").unwrap();
    assert!(wait_content(&a.path("durable/z.yml"), "id: 1\nfrom_b: 2\n"), "A never received B's change");
    p.go();
    let text = git::converged(&a, &b, "durable/z.yml");
    let ok = wait_for(Duration::from_secs(30), || {
        let t = git::converged(&a, &b, "durable/z.yml");
        t.contains("from_a: 1\n") && t.contains("from_b: 2\n")
    });
    assert!(ok, "a change was lost:\n{text}");
    // The same with two opens, as `Path.read_text()` then `write_text()` do: read and close,
    // think, then open with O_TRUNC and write. The base is what this program read.
    let p = Program::start(
        &a.path("durable"),
        "text = open('z.yml').read()\nprint('ready', flush=True)\ninput()\nopen('z.yml', 'w').write(text + 'again_a: 3\\n')\n",
    );
    let now = std::fs::read_to_string(b.path("durable/z.yml")).unwrap();
    std::fs::write(b.path("durable/z.yml"), format!("{now}again_b: 4\n")).unwrap();
    let arrived = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(a.path("durable/z.yml")).is_ok_and(|t| t.contains("again_b: 4"))
    });
    assert!(arrived, "A never received B's second change");
    p.go();
    let ok = wait_for(Duration::from_secs(30), || {
        let t = git::converged(&a, &b, "durable/z.yml");
        ["from_a: 1", "from_b: 2", "again_a: 3", "again_b: 4"].iter().all(|k| t.contains(k))
    });
    assert!(ok, "a change was lost:\n{}", git::converged(&a, &b, "durable/z.yml"));
}

#[test]
fn temporary_files_of_atomic_write_idioms_never_reach_history() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = git::node("a", &remote, &nats);
    a.sh_ok("mkdir -p durable && echo 'v: 1' > durable/ids.yml");
    // Each idiom writes its temporary file, fsyncs it (which commits a durable file at once),
    // and renames or removes it.
    a.sh_ok(
        "cd durable
         python3 - <<'EOF'
import os
def atomic(tmp, text):
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, text.encode()); os.fsync(fd); os.close(fd)
    os.replace(tmp, 'ids.yml')
atomic('ids.yml.tmp-1733140000123a1b2c3', 'v: 2\\n')   # atomically / write-file-atomic (tbd)
atomic('.ids.yml.Ab3xQz', 'v: 3\\n')                   # rsync
atomic('ids.yml.part', 'v: 4\\n')                      # downloads
atomic('tmpk3j_9x2a', 'v: 5\\n')                       # Python's tempfile (a name it makes)
for name in ['4913', '.ids.yml.swp', 'ids.yml~', '#ids.yml#', '.#ids.yml']:   # editors
    fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644); os.write(fd, b'x'); os.fsync(fd); os.close(fd)
    os.unlink(name)
EOF
         sed -i 's/5/6/' ids.yml",
    );
    assert_eq!(std::fs::read_to_string(a.path("durable/ids.yml")).unwrap(), "v: 6\n");
    git::wait_pushed(&a);
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(&remote.path)
        .args(["log", "--all", "--name-only", "--format="])
        .output()
        .unwrap();
    let names: std::collections::BTreeSet<String> =
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(String::from).collect();
    let expected: std::collections::BTreeSet<String> =
        [".syncfs/policies.yml", "durable/ids.yml"].iter().map(|s| s.to_string()).collect();
    assert_eq!(names, expected, "temporary files reached the history");
}

#[test]
fn a_watched_directory_survives_cache_eviction_on_every_tier() {
    let nats = NatsServer::start();
    let m = Mount::with(Options { nats: vec![nats.url()], ..Options::default() });
    let dirs = ["local/w/sub", "fast/casual/w/sub", "durable/w/sub"];
    for d in dirs {
        m.sh_ok(&format!("mkdir -p {d} && echo 1 > {d}/f"));
    }
    // An inotify watch on each directory (what editors, IDEs and `tail -f` hold), kept until
    // told to stop.
    let watch = Program::start(
        &m.mnt,
        &format!(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.inotify_init()\n\
             for d in {dirs:?}:\n    assert libc.inotify_add_watch(fd, d.encode(), 0xfff) >= 0, os.strerror(ctypes.get_errno())\n\
             print('ready', flush=True)\ninput()\n"
        ),
    );
    let evict = || {
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    };
    let check = |when: &str| {
        for d in dirs {
            let out = m.sh(&format!("timeout -k 2 10 bash -c 'cat {d}/f && echo 2 > {d}/g && ls {d} && rm {d}/g'"));
            assert!(
                out.status.success(),
                "{d} {when}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    Command::new("sync").status().unwrap();
    for _ in 0..3 {
        evict();
    }
    check("while watched, after the kernel evicted its parents");
    watch.go();
    evict();
    check("after the watch ended");
}

/// Every operation a program may do on a descriptor whose file it unlinked; prints `ok`.
const UNLINKED: &str = "
import os, sys
p = sys.argv[1]
with open(p, 'w') as f:
    f.write('hello')
fd = os.open(p, os.O_RDWR)
os.unlink(p)
assert os.fstat(fd).st_size == 5
os.ftruncate(fd, 3)
os.fchmod(fd, 0o600)
os.fchown(fd, 1000, 1000)
os.pwrite(fd, b'XY', 1)
assert os.pread(fd, 10, 0) == b'hXY', os.pread(fd, 10, 0)
os.posix_fallocate(fd, 0, 10)
os.fsync(fd)
os.utime(fd, (1, 2))
st = os.fstat(fd)
assert (st.st_size, st.st_mode & 0o777, st.st_uid, st.st_mtime) == (10, 0o600, 1000, 2), st
os.close(fd)
assert not os.path.exists(p)
print('ok')
";

#[test]
fn an_open_descriptor_stays_usable_after_its_file_is_unlinked_on_every_tier() {
    let nats = NatsServer::start();
    let a = Mount::with(Options { nats: vec![nats.url()], node: Some("a".into()), ..Options::default() });
    let b = Mount::with(Options { nats: vec![nats.url()], node: Some("b".into()), ..Options::default() });
    let script = a.base.path().join("unlinked.py");
    std::fs::write(&script, UNLINKED).unwrap();
    for dir in ["local", "fast/casual", "durable"] {
        let path = format!("{dir}/unlinked");
        a.sh_ok(&format!("mkdir -p {dir}"));
        let out = a.sh_ok(&format!("python3 {} {path}", script.display()));
        assert_eq!(out.trim(), "ok", "{dir}");
        // What the descriptor wrote after the unlink reached no node.
        std::thread::sleep(Duration::from_millis(500));
        assert!(!b.path(&path).exists(), "{path} came back on another node");
        assert!(!a.path(&path).exists(), "{path} came back");
    }
}

#[test]
fn sizes_a_tier_cannot_store_are_refused_with_efbig_and_change_nothing() {
    let nats = NatsServer::start();
    let m = Mount::with(Options { nats: vec![nats.url()], ..Options::default() });
    m.sh_ok("mkdir -p fast/casual durable && echo old > fast/casual/s && echo old > durable/s");
    // A size past the tier's limit is refused when it is set, on a path and on a descriptor.
    let out = m.sh("truncate -s 999999999999999 durable/s");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("File too large"), "{}", String::from_utf8_lossy(&out.stderr));
    m.sh_ok(
        "python3 - <<'EOF'
import errno, os
fd = os.open('fast/casual/s', os.O_RDWR)
try:
    os.ftruncate(fd, 1234567)
    raise SystemExit('ftruncate past the KV limit succeeded')
except OSError as e:
    assert e.errno == errno.EFBIG, e
os.close(fd)
EOF",
    );
    // Content past the limit is refused at close; right after it the file is what it was.
    m.sh_ok(
        "python3 - <<'EOF'
import errno, os
f = open('fast/casual/s', 'w')
f.write('x' * 1200000)
try:
    f.close()
    raise SystemExit('close of a value past the KV limit succeeded')
except OSError as e:
    assert e.errno == errno.EFBIG, e
st = os.stat('fast/casual/s')
assert st.st_size == 4, st.st_size
assert open('fast/casual/s').read() == 'old\\n'
EOF",
    );
    for f in ["fast/casual/s", "durable/s"] {
        assert_eq!(std::fs::read_to_string(m.path(f)).unwrap(), "old\n", "{f}");
        assert_eq!(std::fs::metadata(m.path(f)).unwrap().len(), 4, "{f}");
    }
}

#[test]
fn a_reader_open_across_a_local_rewrite_leaves_later_opens_the_new_content() {
    // The claim idiom on the winner's node: the file exists empty (the exclusive create),
    // a reader opens it, the winner writes its name and closes, the reader reads and closes.
    // From then on every open must read the name.
    let nats = NatsServer::start();
    let m = Mount::with(Options { nats: vec![nats.url()], ..Options::default() });
    // The name is longer than a page: the kernel caches the page it wrote whole and asks the
    // daemon for the rest, through the handle that opened the old content.
    let name = format!("claimed by a {}\n", "x".repeat(6000));
    for (i, first) in ["", "short", "a much longer first value than the second"].iter().enumerate() {
        let path = format!("fast/casual/claim{i}");
        m.sh_ok(&format!("mkdir -p fast/casual && printf '%s' '{first}' > {path}"));
        let reader = Program::start(
            &m.mnt,
            &format!("import os\nfd = os.open('{path}', os.O_RDONLY)\nprint('ready', flush=True)\ninput()\nprint('read', len(os.read(fd, 100000)))\nos.close(fd)\n"),
        );
        std::fs::write(m.path(&path), &name).unwrap();
        reader.go();
        for _ in 0..3 {
            let read = std::fs::read_to_string(m.path(&path)).unwrap();
            assert!(read == name, "{path}: read {} bytes of {}", read.len(), name.len());
            assert_eq!(std::fs::metadata(m.path(&path)).unwrap().len(), name.len() as u64);
        }
    }
}

#[test]
fn device_nodes_are_made_on_the_local_tier() {
    let m = Mount::local();
    m.sh_ok("mknod c c 1 3 && mknod b b 7 200 && mkfifo p");
    let c = std::fs::symlink_metadata(m.path("c")).unwrap();
    assert!(c.file_type().is_char_device());
    assert_eq!(c.rdev(), libc::makedev(1, 3));
    let b = std::fs::symlink_metadata(m.path("b")).unwrap();
    assert!(b.file_type().is_block_device());
    assert_eq!(b.rdev(), libc::makedev(7, 200));
    // The mount is nodev: a device node cannot be opened through it.
    assert!(m.sh("head -c1 c").status.code() != Some(0));
    m.sh_ok("rm c b p");
}
