//! The durable tier: nodes sharing a real bare git repository (and a NATS server for push
//! notices), edited with ordinary tools.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{last_errno, syncfs, wait_content, wait_for, Mount, Options};
use crate::nats::NatsServer;

/// Short timings so tests take seconds; the defaults are measured in benches.
pub(crate) const QUICK: &str = "git:\n  quiet_ms: 200\n  fetch_interval_ms: 1000\n";

/// A shared bare remote in a temporary directory.
pub(crate) struct Remote {
    _dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
}

impl Remote {
    pub(crate) fn new() -> Remote {
        let dir = tempfile::Builder::new().prefix("syncfs-remote-").tempdir().unwrap();
        let path = dir.path().join("shared.git");
        git(&["init", "--quiet", "--bare", "-b", "main", &path.display().to_string()]);
        Remote { _dir: dir, path }
    }

    /// Makes the remote unreachable (as a network outage would).
    pub(crate) fn away(&self) {
        std::fs::rename(&self.path, self.path.with_extension("away")).unwrap();
    }

    pub(crate) fn back(&self) {
        std::fs::rename(self.path.with_extension("away"), &self.path).unwrap();
    }

    /// `git show main:PATH` in the remote.
    pub(crate) fn show(&self, path: &str) -> Option<String> {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(&self.path)
            .args(["show", &format!("main:{path}")])
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every version of every file the remote's history holds, as text.
    pub(crate) fn all_history(&self) -> String {
        git(&["--git-dir", &self.path.display().to_string(), "log", "-p", "--all"])
    }
}

fn git(args: &[&str]) -> String {
    let out = Command::new("git").args(args).output().expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn node(name: &str, remote: &Remote, nats: &NatsServer) -> Mount {
    Mount::with(Options {
        node: Some(name.into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        ..Default::default()
    })
}

fn git_status(m: &Mount) -> Value {
    m.status()["git"].clone()
}

/// Waits until the node committed everything and the remote has it.
pub(crate) fn wait_pushed(m: &Mount) {
    let ok = wait_for(Duration::from_secs(30), || {
        let g = git_status(m);
        g["uncommitted"] == 0 && g["unpushed"] == 0 && g["error"].is_null() && !g["head"].is_null()
    });
    assert!(ok, "not pushed: {}", git_status(m));
}

/// Waits until the node committed its changes (the remote may be away).
fn wait_committed(m: &Mount) {
    let ok = wait_for(Duration::from_secs(30), || git_status(m)["uncommitted"] == 0);
    assert!(ok, "not committed: {}", git_status(m));
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    let out = Command::new("getfattr").args(["--only-values", "-n", name]).arg(path).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn yaml(text: &str) -> Value {
    yaml_serde::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

const ISSUE: &str = "# Issue 1: keep this comment\nid: 1\ntitle: Crash on start\nlabels: [bug, y]\nbody: |\n  It crashes.\nupdated_at: 2026-01-01T00:00:00Z\n";

/// Two nodes with the same issue, both synced.
fn two_nodes_with_issue(remote: &Remote, nats: &NatsServer) -> (Mount, Mount) {
    let a = node("a", remote, nats);
    let b = node("b", remote, nats);
    a.sh_ok(&format!("mkdir -p durable/issues && cat > durable/issues/1.yml <<'EOF'\n{ISSUE}EOF"));
    assert!(wait_content(&b.path("durable/issues/1.yml"), ISSUE), "B never saw A's issue");
    wait_pushed(&a);
    wait_pushed(&b);
    (a, b)
}

/// Rewrites the issue on a node, replacing `from` by `to` in its current text.
fn edit(m: &Mount, edits: &[(&str, &str)]) {
    let path = m.path("durable/issues/1.yml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} not in:\n{text}");
        text = text.replace(from, to);
    }
    std::fs::write(&path, text).unwrap();
}

/// Waits until both nodes hold the same bytes at `rel` and returns them.
pub(crate) fn converged(a: &Mount, b: &Mount, rel: &str) -> String {
    let mut last = (String::new(), String::new());
    let same = wait_for(Duration::from_secs(40), || {
        let x = std::fs::read_to_string(a.path(rel)).unwrap_or_default();
        let y = std::fs::read_to_string(b.path(rel)).unwrap_or_default();
        last = (x.clone(), y.clone());
        x == y && !x.is_empty()
    });
    assert!(same, "{rel} differs:\n--- a\n{}\n--- b\n{}\n--- a status {}\n--- b status {}", last.0, last.1, git_status(a), git_status(b));
    last.0
}

#[test]
fn concurrent_edits_of_different_fields_merge_on_every_node() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let (a, b) = two_nodes_with_issue(&remote, &nats);
    // Both edit while neither can see the other: a real concurrent change.
    remote.away();
    edit(&a, &[("title: Crash on start", "title: Crash on start (macOS)"), ("[bug, y]", "[bug, y, x]"), ("2026-01-01", "2026-03-01")]);
    edit(&b, &[("It crashes.", "It crashes at boot."), ("[bug, y]", "[bug]"), ("2026-01-01", "2026-02-01")]);
    wait_committed(&a);
    wait_committed(&b);
    assert!(git_status(&a)["unpushed"].as_u64().unwrap() >= 1);
    remote.back();
    wait_pushed(&a);
    wait_pushed(&b);
    let text = converged(&a, &b, "durable/issues/1.yml");
    let doc = yaml(&text);
    assert_eq!(doc["title"], "Crash on start (macOS)", "{text}");
    assert_eq!(doc["body"], "It crashes at boot.\n", "{text}");
    // union with removals: A added x, B removed y.
    assert_eq!(doc["labels"], serde_json::json!(["bug", "x"]), "{text}");
    // max, compared as times.
    assert_eq!(doc["updated_at"], "2026-03-01T00:00:00Z", "{text}");
    // An edit, not a reformat: the comment and the key order stay.
    assert!(text.starts_with("# Issue 1: keep this comment\nid: 1\ntitle:"), "{text}");
    assert_eq!(remote.show("durable/issues/1.yml").as_deref(), Some(text.as_str()));
    assert!(!a.path("durable/issues").read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("conflict")));
    assert!(a.status()["conflicts"].as_array().unwrap().is_empty());
}

#[test]
fn lww_fields_take_the_later_write_by_the_cluster_clock() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let (a, b) = two_nodes_with_issue(&remote, &nats);
    remote.away();
    edit(&a, &[("title: Crash on start", "title: first")]);
    wait_committed(&a);
    std::thread::sleep(Duration::from_millis(50));
    edit(&b, &[("title: Crash on start", "title: second")]);
    wait_committed(&b);
    remote.back();
    let text = converged(&a, &b, "durable/issues/1.yml");
    assert_eq!(yaml(&text)["title"], "second", "{text}");
    // No conflict: lww decides.
    assert!(a.status()["conflicts"].as_array().unwrap().is_empty());
}

#[test]
fn unruled_field_changed_on_both_nodes_keeps_both_versions() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let (a, b) = two_nodes_with_issue(&remote, &nats);
    remote.away();
    edit(&a, &[("It crashes.", "A says: a null pointer."), ("[bug, y]", "[bug, y, from-a]")]);
    wait_committed(&a);
    std::thread::sleep(Duration::from_millis(50));
    edit(&b, &[("It crashes.", "B says: out of memory.")]);
    wait_committed(&b);
    remote.back();
    wait_pushed(&a);
    wait_pushed(&b);
    let text = converged(&a, &b, "durable/issues/1.yml");
    // The later change stays in place, with every field that did merge.
    let doc = yaml(&text);
    assert_eq!(doc["body"], "B says: out of memory.\n", "{text}");
    assert_eq!(doc["labels"], serde_json::json!(["bug", "y", "from-a"]), "{text}");
    // The loser is beside it, under the same name with the same bytes on both nodes.
    let names = |m: &Mount| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(m.path("durable/issues"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".conflict-"))
            .collect();
        v.sort();
        v
    };
    assert!(wait_for(Duration::from_secs(20), || !names(&a).is_empty() && names(&a) == names(&b)), "{:?} vs {:?}", names(&a), names(&b));
    let conflict = names(&a).remove(0);
    assert!(conflict.starts_with("1.yml.conflict-") && conflict.ends_with("-a"), "{conflict}");
    let rel = format!("durable/issues/{conflict}");
    let kept = converged(&a, &b, &rel);
    assert!(kept.contains("A says: a null pointer."), "{kept}");
    assert!(kept.starts_with("# syncfs conflict"), "{kept}");
    assert!(kept.contains("In dispute: body"), "{kept}");
    // Status and the file's attribute name it.
    let listed: Vec<String> = a.status()["conflicts"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(listed, vec![rel.clone()]);
    assert_eq!(xattr(&b.path("durable/issues/1.yml"), "user.syncfs.conflicts").as_deref(), Some(conflict.as_str()));
    let human = String::from_utf8_lossy(&syncfs(&["status", &b.mnt.display().to_string()]).stdout).into_owned();
    assert!(human.contains(&rel), "{human}");
    // Nothing lost: every version is in the remote's history.
    let history = remote.all_history();
    for text in ["A says: a null pointer.", "B says: out of memory.", "It crashes."] {
        assert!(history.contains(text), "{text} missing from the history");
    }
}

#[test]
fn a_file_open_during_a_merge_merges_in_the_next_cycle() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let (a, b) = two_nodes_with_issue(&remote, &nats);
    // B opens the file for writing, A's change arrives, B writes what it read at open.
    let path = b.path("durable/issues/1.yml");
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).unwrap();
    edit(&a, &[("title: Crash on start", "title: from A")]);
    assert!(wait_for(Duration::from_secs(20), || std::fs::read_to_string(&path).unwrap().contains("from A")));
    let mine = text.replace("It crashes.", "B's body");
    std::os::unix::fs::FileExt::write_all_at(&file, mine.as_bytes(), 0).unwrap();
    file.set_len(mine.len() as u64).unwrap();
    drop(file);
    let merged = converged(&a, &b, "durable/issues/1.yml");
    assert!(wait_for(Duration::from_secs(20), || {
        let t = std::fs::read_to_string(a.path("durable/issues/1.yml")).unwrap();
        t.contains("from A") && t.contains("B's body")
    }), "{merged}");
}

#[test]
fn immutable_field_change_is_eperm_and_leaves_the_file() {
    let remote = Remote::new();
    let nats = NatsServer::start();
    let a = node("a", &remote, &nats);
    a.sh_ok(&format!("mkdir -p durable/issues && cat > durable/issues/1.yml <<'EOF'\n{ISSUE}EOF"));
    let changed = ISSUE.replace("id: 1", "id: 2");
    let out = a.sh(&format!("python3 -c \"f = open('durable/issues/1.yml', 'w'); f.write('''{changed}'''); f.close()\""));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Errno 1"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(a.path("durable/issues/1.yml")).unwrap(), ISSUE);
    let reason = xattr(&a.path("durable/issues/1.yml"), "user.syncfs.error").unwrap_or_default();
    assert!(reason.contains("immutable") && reason.contains("id"), "{reason}");
    // Other fields still change; the error goes away.
    a.sh_ok("sed -i 's/Crash on start/Crash/' durable/issues/1.yml");
    assert!(std::fs::read_to_string(a.path("durable/issues/1.yml")).unwrap().contains("title: Crash\n"));
    assert_eq!(xattr(&a.path("durable/issues/1.yml"), "user.syncfs.error"), None);
    wait_pushed(&a);
    assert!(remote.show("durable/issues/1.yml").unwrap().contains("id: 1\n"));
}

#[test]
fn schema_violations_are_einval_and_leave_the_file() {
    let table = r#"
policies:
  - pattern: "durable/issues/*.yml"
    tier: git
    consistency: merge
    merge_rules: { id: immutable, title: lww }
    schema: .syncfs/schemas/issue.json
  - pattern: "kv/**"
    tier: nats-kv
    consistency: lww
    schema: .syncfs/schemas/issue.json
"#;
    let m = Mount::with(Options {
        policies: Some(table.into()),
        config: Some(QUICK.into()),
        ..Default::default()
    });
    m.sh_ok(
        r#"mkdir -p .syncfs/schemas durable/issues kv
cat > .syncfs/schemas/issue.json <<'EOF'
{"type": "object", "required": ["id", "title"], "properties": {"id": {"type": "integer"}, "title": {"type": "string"}}}
EOF
printf 'id: 1\ntitle: ok\n' > durable/issues/1.yml
printf 'id: 1\ntitle: ok\n' > kv/1.yml"#,
    );
    for rel in ["durable/issues/1.yml", "kv/1.yml"] {
        let path = m.path(rel);
        // A document missing a required field: close() fails with EINVAL, nothing changes.
        let out = m.sh(&format!("python3 -c \"f = open('{rel}', 'w'); f.write('id: 1\\n'); f.close()\""));
        assert!(String::from_utf8_lossy(&out.stderr).contains("Errno 22"), "{rel}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "id: 1\ntitle: ok\n", "{rel}");
        let reason = xattr(&path, "user.syncfs.error").unwrap_or_default();
        assert!(reason.contains("title"), "{rel}: {reason}");
        // Not YAML at all: EINVAL too, and the reason says so.
        let out = m.sh(&format!("python3 -c \"f = open('{rel}', 'w'); f.write('id: [1\\n'); f.close()\""));
        assert!(String::from_utf8_lossy(&out.stderr).contains("Errno 22"), "{rel}");
        assert!(xattr(&path, "user.syncfs.error").unwrap_or_default().contains("invalid YAML"), "{rel}");
        // A valid one goes through and clears the error.
        m.sh_ok(&format!("printf 'id: 1\\ntitle: better\\n' > {rel}"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "id: 1\ntitle: better\n");
        assert_eq!(xattr(&path, "user.syncfs.error"), None, "{rel}");
    }
    let log = std::fs::read_to_string(m.state.join("syncfs.log")).unwrap();
    assert!(log.contains("does not satisfy .syncfs/schemas/issue.json"), "{log}");
}

#[test]
fn remote_unreachable_then_back_loses_nothing() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    let b = node("b", &remote, &nats);
    remote.away();
    for i in 0..3 {
        a.sh_ok(&format!("mkdir -p notes && echo {i} > notes/n{i}.txt"));
        wait_committed(&a);
    }
    assert!(wait_for(Duration::from_secs(20), || {
        let g = git_status(&a);
        g["unpushed"].as_u64().unwrap_or(0) >= 3 && !g["error"].is_null()
    }), "{}", git_status(&a));
    let human = String::from_utf8_lossy(&syncfs(&["status", &a.mnt.display().to_string()]).stdout).into_owned();
    assert!(human.contains("commits unpushed"), "{human}");
    // Writes go on while the remote is away.
    a.sh_ok("echo still > notes/later.txt");
    remote.back();
    wait_pushed(&a);
    for i in 0..3 {
        assert!(wait_content(&b.path(&format!("notes/n{i}.txt")), &format!("{i}\n")), "n{i} never reached B");
    }
    assert!(wait_content(&b.path("notes/later.txt"), "still\n"));
    assert_eq!(remote.show("notes/later.txt").as_deref(), Some("still\n"));
}

#[test]
fn concurrent_pushes_are_retried_until_both_land() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let nodes: Vec<Mount> = ["a", "b", "c"].iter().map(|n| node(n, &remote, &nats)).collect();
    // Every node writes its own files at once: pushes race, the losers fetch, merge, retry.
    std::thread::scope(|s| {
        for (i, m) in nodes.iter().enumerate() {
            s.spawn(move || {
                for j in 0..5 {
                    m.sh_ok(&format!("mkdir -p durable/log && echo {i}-{j} > durable/log/{i}-{j}.txt"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    for m in &nodes {
        wait_pushed(m);
    }
    for m in &nodes {
        let all = wait_for(Duration::from_secs(30), || {
            (0..3).all(|i| (0..5).all(|j| m.path(&format!("durable/log/{i}-{j}.txt")).exists()))
        });
        assert!(all, "a node lacks files: {}", git_status(m));
    }
    for i in 0..3 {
        for j in 0..5 {
            assert_eq!(remote.show(&format!("durable/log/{i}-{j}.txt")), Some(format!("{i}-{j}\n")));
        }
    }
    // Never forced: the history has every node's commits.
    let log = git(&["--git-dir", &remote.path.display().to_string(), "log", "--format=%an", "main"]);
    for n in ["a", "b", "c"] {
        assert!(log.lines().any(|l| l == n), "no commit by {n}:\n{log}");
    }
}

#[test]
fn kill_9_after_close_is_committed_after_remount() {
    let remote = Remote::new();
    let nats = NatsServer::start();
    let opts = Options {
        node: Some("k".into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        // Long enough that the kill surely comes first.
        config: Some("git:\n  quiet_ms: 60000\n  max_delay_ms: 60000\n".into()),
        ..Default::default()
    };
    let mut m = Mount::with(opts.clone());
    m.sh_ok("mkdir -p durable && echo survived > durable/k.txt");
    assert!(git_status(&m)["uncommitted"].as_u64().unwrap() >= 1);
    let pid = m.pid();
    // SAFETY: killing our own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(10), || !crate::harness::process_alive(pid)));
    let out = syncfs(&["umount", &m.mnt.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    m.forget_mounted();
    assert!(remote.show("durable/k.txt").is_none());
    let out = m.try_mount(&opts);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(m.sh_ok("cat durable/k.txt"), "survived\n");
    wait_pushed(&m);
    assert_eq!(remote.show("durable/k.txt").as_deref(), Some("survived\n"));
}

#[test]
fn revisions_are_blob_ids_and_a_new_node_takes_the_shared_policy_table() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    a.sh_ok("mkdir -p durable && printf 'hello\\n' > durable/h.txt");
    let rev = xattr(&a.path("durable/h.txt"), "user.syncfs.rev").unwrap();
    let hashed = git(&["hash-object", &a.path("durable/h.txt").display().to_string()]);
    assert_eq!(rev, hashed.trim());
    assert_eq!(xattr(&a.path("durable/h.txt"), "user.syncfs.node").as_deref(), Some("a"));
    // A's table gains a rule; a node mounted later uses it from the start.
    a.sh_ok("printf '  - pattern: \"scratch/**\"\\n    tier: local\\n' >> .syncfs/policies.yml");
    wait_pushed(&a);
    let b = node("b", &remote, &nats);
    assert_eq!(xattr(&b.path("durable/h.txt"), "user.syncfs.rev").as_deref(), Some(rev.as_str()));
    assert_eq!(xattr(&b.path("durable/h.txt"), "user.syncfs.node").as_deref(), Some("a"));
    b.sh_ok("mkdir -p scratch && echo x > scratch/x");
    assert_eq!(xattr(&b.path("scratch/x"), "user.syncfs.tier").as_deref(), Some("local"));
    // Deletes and renames propagate; hard links are refused on git paths (git stores names).
    a.sh_ok("mv durable/h.txt durable/h2.txt");
    assert!(wait_content(&b.path("durable/h2.txt"), "hello\n"));
    assert!(wait_for(Duration::from_secs(10), || !b.path("durable/h.txt").exists()));
    let err = std::fs::hard_link(a.path("durable/h2.txt"), a.path("durable/h3.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    a.sh_ok("rm durable/h2.txt");
    assert!(wait_for(Duration::from_secs(10), || !b.path("durable/h2.txt").exists()));
    let _ = last_errno();
}

#[test]
fn history_view_lists_every_version_read_only_and_diffable() {
    let m = Mount::with(Options {
        node: Some("h".into()),
        config: Some(QUICK.into()),
        ..Default::default()
    });
    for v in 1..=3 {
        m.sh_ok(&format!("mkdir -p durable && printf 'id: 7\\nversion: {v}\\n' > durable/h.yml"));
        wait_committed(&m);
    }
    let out = m.sh_ok(
        r#"ls .syncfs | grep -x history
ls .syncfs/history/durable
cd .syncfs/history/durable/h.yml
ls
cat $(ls | head -1)
cat $(ls | tail -1)
if diff $(ls | head -1) $(ls | tail -1) > /dev/null; then echo same; else echo differ; fi"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "history");
    assert!(lines.contains(&"h.yml"), "{out}");
    let versions: Vec<&&str> = lines.iter().filter(|l| l.len() > 20 && l.ends_with("-h.yml")).collect();
    assert_eq!(versions.len(), 3, "{out}");
    assert!(versions[0].starts_with("0001-") && versions[2].starts_with("0003-"), "{out}");
    assert!(out.contains("id: 7\nversion: 1\nid: 7\nversion: 3\ndiffer\n"), "{out}");
    // Read-only: nothing can change the view.
    for script in [
        "touch .syncfs/history/x",
        "echo x > .syncfs/history/durable/h.yml/new",
        "rm -f .syncfs/history/durable/h.yml/0001-*",
        "echo x >> \"$(ls -d .syncfs/history/durable/h.yml/0001-*)\"",
        "mkdir .syncfs/history/d",
        "setfattr -n user.x -v 1 .syncfs/history/durable",
        "mv .syncfs/history/durable moved",
    ] {
        let out = m.sh(script);
        assert!(!out.status.success(), "{script} succeeded");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A new version shows up the next time the directory is listed.
    m.sh_ok("printf 'id: 7\\nversion: 4\\n' > durable/h.yml");
    wait_committed(&m);
    let listed = m.sh_ok("ls .syncfs/history/durable/h.yml | wc -l");
    assert_eq!(listed.trim(), "4");
    // The view is never committed.
    let out = git(&["--git-dir", &m.state.join("git").display().to_string(), "ls-tree", "-r", "--name-only", "main"]);
    assert!(!out.contains("history"), "{out}");
}

#[test]
fn fsync_and_unmount_commit_without_waiting_for_quiet() {
    let opts = Options {
        config: Some("git:\n  quiet_ms: 60000\n  max_delay_ms: 60000\n".into()),
        ..Default::default()
    };
    let mut m = Mount::with(opts);
    let show = |m: &Mount, rel: &str| {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(m.state.join("git"))
            .args(["show", &format!("main:{rel}")])
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // fsync returns once the change is in a commit.
    m.sh_ok("mkdir -p durable && python3 -c \"import os; fd = os.open('durable/f.txt', os.O_CREAT | os.O_WRONLY, 0o644); os.write(fd, b'synced\\n'); os.fsync(fd); os.close(fd)\"");
    assert_eq!(show(&m, "durable/f.txt").as_deref(), Some("synced\n"));
    // A plain close waits for the quiet period; unmounting commits it.
    m.sh_ok("echo closed > durable/g.txt");
    assert_eq!(show(&m, "durable/g.txt"), None);
    m.umount();
    assert_eq!(show(&m, "durable/g.txt").as_deref(), Some("closed\n"));
}

fn readlink(m: &Mount, rel: &str) -> Option<String> {
    std::fs::read_link(m.path(rel)).ok().map(|t| t.display().to_string())
}

fn executable(m: &Mount, rel: &str) -> Option<bool> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(m.path(rel)).ok().map(|md| md.is_file() && md.permissions().mode() & 0o111 != 0)
}

/// `git ls-tree -r main` of a repository: "mode path" lines.
fn modes(git_dir: &Path) -> String {
    let listing = git(&["--git-dir", &git_dir.display().to_string(), "ls-tree", "-r", "main"]);
    listing
        .lines()
        .map(|l| {
            let (meta, path) = l.split_once('\t').unwrap();
            format!("{} {path}", meta.split(' ').next().unwrap())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn symlinks_and_the_executable_bit_are_committed_and_synced_as_git_stores_them() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    let b = node("b", &remote, &nats);
    a.sh_ok(
        "mkdir -p durable/bin && printf '#!/bin/sh\\necho ran\\n' > durable/bin/run.sh && chmod 755 durable/bin/run.sh \
         && printf 'doc\\n' > durable/doc.txt && ln -s doc.txt durable/latest && ln -s ../doc.txt durable/bin/up \
         && ln -s /nowhere/at/all durable/dangling",
    );
    assert!(wait_for(Duration::from_secs(30), || readlink(&b, "durable/dangling").as_deref() == Some("/nowhere/at/all")), "B never saw A's links");
    assert_eq!(readlink(&b, "durable/latest").as_deref(), Some("doc.txt"));
    assert_eq!(readlink(&b, "durable/bin/up").as_deref(), Some("../doc.txt"));
    assert_eq!(std::fs::read_to_string(b.path("durable/latest")).unwrap(), "doc\n", "the link resolves inside B's mount");
    assert!(wait_for(Duration::from_secs(30), || executable(&b, "durable/bin/run.sh") == Some(true)), "run.sh is not executable on B");
    assert_eq!(b.sh_ok("durable/bin/run.sh"), "ran\n");
    assert_eq!(executable(&b, "durable/doc.txt"), Some(false));
    wait_pushed(&a);
    let tree = modes(&remote.path);
    for line in ["120000 durable/latest", "120000 durable/bin/up", "120000 durable/dangling", "100755 durable/bin/run.sh", "100644 durable/doc.txt"] {
        assert!(tree.lines().any(|l| l == line), "{line} not in the remote:\n{tree}");
    }
    assert_eq!(remote.show("durable/latest").as_deref(), Some("doc.txt"), "a link's blob is its target");

    // B takes the bit away, points the link elsewhere (ln -sfn replaces it by rename), removes one.
    b.sh_ok("chmod -x durable/bin/run.sh && ln -sfn bin/run.sh durable/latest && rm durable/dangling && mv durable/bin/up durable/up");
    assert!(wait_for(Duration::from_secs(30), || executable(&a, "durable/bin/run.sh") == Some(false)), "A kept the executable bit");
    assert!(wait_for(Duration::from_secs(30), || readlink(&a, "durable/latest").as_deref() == Some("bin/run.sh")), "A's link was not retargeted");
    assert!(wait_for(Duration::from_secs(30), || std::fs::symlink_metadata(a.path("durable/dangling")).is_err()), "A kept the removed link");
    assert!(wait_for(Duration::from_secs(30), || readlink(&a, "durable/up").as_deref() == Some("../doc.txt")), "the moved link did not arrive");
    assert!(std::fs::symlink_metadata(a.path("durable/bin/up")).is_err());
    assert_eq!(std::fs::read_to_string(a.path("durable/bin/run.sh")).unwrap(), "#!/bin/sh\necho ran\n", "a mode change keeps the content");
    wait_pushed(&b);
    let tree = modes(&remote.path);
    for line in ["100644 durable/bin/run.sh", "120000 durable/latest", "120000 durable/up"] {
        assert!(tree.lines().any(|l| l == line), "{line} not in the remote:\n{tree}");
    }
    assert!(!tree.contains("durable/dangling") && !tree.contains("durable/bin/up"), "{tree}");

    // A link replaced by a file, and a file by a link, on the other node.
    a.sh_ok("rm durable/up && echo file > durable/up && rm durable/doc.txt && ln -s bin durable/doc.txt");
    assert!(wait_content(&b.path("durable/up"), "file\n"));
    assert!(wait_for(Duration::from_secs(30), || readlink(&b, "durable/doc.txt").as_deref() == Some("bin")), "B kept the file");

    // A node that joins later, and a remount that finds nothing new to commit.
    wait_pushed(&a);
    let c = node("c", &remote, &nats);
    assert_eq!(readlink(&c, "durable/latest").as_deref(), Some("bin/run.sh"));
    assert_eq!(executable(&c, "durable/bin/run.sh"), Some(false));
    let mut b = b;
    b.umount();
    assert!(b.try_mount(&Options { node: Some("b".into()), nats: vec![nats.url()], git_remote: Some(remote.path.display().to_string()), config: Some(QUICK.into()), ..Default::default() }).status.success());
    assert_eq!(readlink(&b, "durable/doc.txt").as_deref(), Some("bin"));
    assert_eq!(git_status(&b)["uncommitted"], 0, "{}", git_status(&b));
    let head = git_status(&b)["head"].clone();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(git_status(&b)["head"], head, "the remount committed something: {}", remote.all_history());
}

#[test]
fn git_repositories_inside_the_mount_stay_local_while_their_work_trees_sync() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    let b = node("b", &remote, &nats);
    // A repository outside the mount, with a program and a link.
    let src = tempfile::tempdir().unwrap();
    crate::harness::sh_ok_in(
        src.path(),
        "git init -q -b main && echo readme > README.md && mkdir bin && printf '#!/bin/sh\\necho tool\\n' > bin/tool \
         && chmod +x bin/tool && ln -s README.md link && git add -A && git -c user.name=t -c user.email=t@t commit -qm init",
    );
    let cloned = a.sh_ok(&format!(
        "git clone -q {} work/clone && cd work/clone && git status --porcelain && git log --oneline | wc -l",
        src.path().display()
    ));
    assert_eq!(cloned.trim(), "1", "git clone into the mount: {cloned}");
    let made = a.sh_ok(
        "mkdir -p durable/proj && cd durable/proj && git init -q -b main && echo hi > f.txt && git add f.txt \
         && git -c user.name=t -c user.email=t@t commit -qm one && echo more >> f.txt \
         && git -c user.name=t -c user.email=t@t commit -qam two && git status --porcelain && git log --oneline | wc -l",
    );
    assert_eq!(made.trim(), "2", "git init and commit in the mount: {made}");
    // The work trees reach B, the repositories do not.
    assert!(wait_content(&b.path("work/clone/README.md"), "readme\n"));
    assert!(wait_content(&b.path("durable/proj/f.txt"), "hi\nmore\n"));
    assert!(wait_for(Duration::from_secs(30), || executable(&b, "work/clone/bin/tool") == Some(true)));
    assert!(wait_for(Duration::from_secs(30), || readlink(&b, "work/clone/link").as_deref() == Some("README.md")));
    assert!(!b.path("work/clone/.git").exists() && !b.path("durable/proj/.git").exists(), "a .git directory was synced");
    wait_pushed(&a);
    let tree = modes(&remote.path);
    assert!(!tree.contains(".git/"), "the remote holds a repository's files:\n{tree}");
    assert!(tree.lines().any(|l| l == "100755 work/clone/bin/tool") && tree.lines().any(|l| l == "120000 work/clone/link"), "{tree}");
    // The clone is still a working repository on A: clean, and it sees B's edit as a change.
    assert_eq!(a.sh_ok("cd work/clone && git status --porcelain"), "");
    b.sh_ok("echo from-b >> work/clone/README.md");
    assert!(wait_content(&a.path("work/clone/README.md"), "readme\nfrom-b\n"));
    assert_eq!(a.sh_ok("cd work/clone && git status --porcelain"), " M README.md\n");
    a.sh_ok("cd work/clone && git -c user.name=t -c user.email=t@t commit -qam 'from b' && git status --porcelain && git fsck --no-progress 2>&1");
    // A repository's files are local on every tier, also in KV paths.
    a.sh_ok("mkdir -p fast/casual/r && cd fast/casual/r && git init -q && echo x > x && git add x");
    assert_eq!(a.sh_ok("getfattr --only-values -n user.syncfs.tier fast/casual/r/.git/index"), "local");
}
