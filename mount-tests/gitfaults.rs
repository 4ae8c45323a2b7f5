//! What the durable tier does with content git itself refuses: names that git's tree-entry
//! validation rejects (`.git ` and its look-alikes), and a broken policy table pushed to the
//! remote with plain git. Neither may stop a node's commits or its next mount.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::git::{converged, node, wait_pushed, Remote, QUICK};
use crate::harness::{wait_content, wait_for, Mount, Options};
use crate::nats::NatsServer;

const POLICIES: &str = ".syncfs/policies.yml";

fn run_git(dir: Option<&Path>, args: &[&str], input: Option<&[u8]>) -> Output {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.args(["-c", "user.name=human", "-c", "user.email=human@example.com"]).args(args);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("git");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        if let Some(bytes) = input {
            stdin.write_all(bytes).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

/// The id of git's empty tree.
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

fn git_ok(dir: Option<&Path>, args: &[&str], input: Option<&[u8]>) -> String {
    let out = run_git(dir, args, input);
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare clone of the remote where a human commits with plain git and pushes to `push_to`
/// (the remote's path, or where it is while "away").
struct Human {
    _dir: tempfile::TempDir,
    git: PathBuf,
}

impl Human {
    fn clone(remote: &Path) -> Human {
        let dir = tempfile::Builder::new().prefix("syncfs-human-").tempdir().unwrap();
        let git = dir.path().join("clone.git");
        git_ok(None, &["clone", "--quiet", "--bare", &remote.display().to_string(), &git.display().to_string()], None);
        Human { _dir: dir, git }
    }

    fn git(&self, args: &[&str], input: Option<&[u8]>) -> String {
        let mut all = vec!["--git-dir", self.git.to_str().unwrap()];
        all.extend_from_slice(args);
        git_ok(None, &all, input)
    }

    /// `tree` with `path` set to `blob` (`None`: removed), built with `mktree`, which, unlike
    /// `git add`, takes any name.
    fn tree_with(&self, tree: Option<&str>, path: &[&str], blob: Option<&str>) -> String {
        let listing = tree.map(|t| self.git(&["ls-tree", "-z", t], None)).unwrap_or_default();
        let mut entries: Vec<String> = Vec::new();
        let mut sub = None;
        for entry in listing.split('\0').filter(|e| !e.is_empty()) {
            let (meta, name) = entry.split_once('\t').unwrap();
            if name == path[0] {
                sub = Some(meta.split(' ').nth(2).unwrap().to_string());
            } else {
                entries.push(entry.to_string());
            }
        }
        if path.len() == 1 {
            if let Some(b) = blob {
                entries.push(format!("100644 blob {b}\t{}", path[0]));
            }
        } else {
            let inner = self.tree_with(sub.as_deref(), &path[1..], blob);
            // git keeps no empty directories: an emptied subtree goes.
            if inner != EMPTY_TREE {
                entries.push(format!("040000 tree {inner}\t{}", path[0]));
            }
        }
        let mut input = entries.join("\0");
        if !input.is_empty() {
            input.push('\0');
        }
        self.git(&["mktree", "-z"], Some(input.as_bytes()))
    }

    /// Fetches `from`, commits `path` = `content` (`None`: removes it) on its main with plumbing,
    /// and pushes the commit to `to`. Returns the commit.
    fn commit(&self, from: &Path, to: &Path, path: &str, content: Option<&str>, message: &str) -> String {
        self.git(&["fetch", "--quiet", &from.display().to_string(), "+main:main"], None);
        let parent = self.git(&["rev-parse", "main"], None);
        let tree = self.git(&["rev-parse", "main^{tree}"], None);
        let blob = content.map(|c| self.git(&["hash-object", "-w", "--stdin"], Some(c.as_bytes())));
        let parts: Vec<&str> = path.split('/').collect();
        let new_tree = self.tree_with(Some(&tree), &parts, blob.as_deref());
        let commit = self.git(&["commit-tree", &new_tree, "-p", &parent, "-m", message], None);
        self.git(&["update-ref", "refs/heads/main", &commit, &parent], None);
        self.git(&["push", "--quiet", &to.display().to_string(), "main:main"], None);
        commit
    }
}

fn git_status(m: &Mount) -> Value {
    m.status()["git"].clone()
}

/// Waits until the node's branch contains the remote's commit `commit`.
fn wait_has(m: &Mount, commit: &str) {
    let git_dir = m.state.join("git");
    let ok = wait_for(Duration::from_secs(30), || {
        run_git(None, &["--git-dir", git_dir.to_str().unwrap(), "merge-base", "--is-ancestor", commit, "main"], None)
            .status
            .success()
    });
    assert!(ok, "the node never took {commit}: {}", git_status(m));
}

/// Waits until the node's tree holds the branch up to `commit` (what it installs, it has).
fn wait_installed(m: &Mount, commit: &str) {
    let git_dir = m.state.join("git");
    let ok = wait_for(Duration::from_secs(30), || {
        run_git(None, &["--git-dir", git_dir.to_str().unwrap(), "merge-base", "--is-ancestor", commit, "refs/syncfs/tree"], None)
            .status
            .success()
    });
    assert!(ok, "the node never installed {commit}: {}", git_status(m));
}

fn quarantined(m: &Mount) -> Vec<String> {
    git_status(m)["quarantined"]
        .as_array()
        .map(|a| a.iter().map(|q| q["path"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every name git refuses as a tree entry, by the rule that refuses it.
/// (`.git` itself is kept local by a built-in rule, for git's own repositories.)
const HOSTILE: &[&str] = &[
    ".GIT",
    ".git ",
    ".git.",
    ".git. .",
    ".Git:stream",
    "GIT~1",
    "git~1",
    "Git~1 .",
    ".g\u{200c}it",
    ".gi\u{feff}t",
    "\u{200e}.GIT",
];

#[test]
fn names_git_refuses_are_eperm_at_create_on_git_paths() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    a.sh_ok("mkdir -p durable");
    for name in HOSTILE {
        let path = a.path(&format!("durable/{name}"));
        let err = std::fs::write(&path, "x\n").expect_err(&format!("{name:?} was created"));
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{name:?}: {err}");
        assert!(!path.exists(), "{name:?} exists after EPERM");
        let err = std::fs::create_dir(&path).expect_err(&format!("directory {name:?} was created"));
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "directory {name:?}: {err}");
        // Nor can a file be renamed to such a name.
        std::fs::write(a.path("durable/ok.txt"), "ok\n").unwrap();
        let err = std::fs::rename(a.path("durable/ok.txt"), &path).expect_err(&format!("renamed onto {name:?}"));
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "rename onto {name:?}: {err}");
    }
    // Names that only look alike are ordinary names.
    for name in ["git~2", ".gitignore", ".git-x", "x.git", ".gitx", "GIT~10", ".g.it"] {
        a.sh_ok(&format!("echo fine > 'durable/{name}'"));
    }
    // The loop was never stopped: everything else is committed and pushed.
    a.sh_ok("echo later > durable/later.txt");
    wait_pushed(&a);
    assert_eq!(remote.show("durable/later.txt").as_deref(), Some("later\n"));
    assert_eq!(remote.show("durable/git~2").as_deref(), Some("fine\n"));
    assert!(quarantined(&a).is_empty(), "{}", git_status(&a));
}

#[test]
fn a_refused_name_in_the_branch_stops_no_node_and_shows_in_status() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    let b = node("b", &remote, &nats);
    a.sh_ok("mkdir -p durable && echo one > durable/one.txt");
    assert!(wait_content(&b.path("durable/one.txt"), "one\n"));
    wait_pushed(&a);
    wait_pushed(&b);
    // B commits while the remote is away; meanwhile a human pushes a name git refuses there
    // (with plumbing: `git add` refuses it too). B must merge that branch with its own.
    let human = Human::clone(&remote.path);
    remote.away();
    b.sh_ok("echo from-b > durable/b1.txt");
    assert!(wait_for(Duration::from_secs(20), || git_status(&b)["unpushed"].as_u64().unwrap_or(0) >= 1), "{}", git_status(&b));
    let away = remote.path.with_extension("away");
    let bad = human.commit(&away, &away, "durable/GIT~1", Some("hostile\n"), "a name git refuses");
    human.commit(&away, &away, "durable/.git./x", Some("nested\n"), "a directory name git refuses");
    remote.back();
    // B merged and pushed; A took both; neither stopped committing.
    wait_pushed(&b);
    assert_eq!(remote.show("durable/b1.txt").as_deref(), Some("from-b\n"), "{}", git_status(&b));
    assert!(wait_content(&a.path("durable/b1.txt"), "from-b\n"), "{}", git_status(&a));
    wait_has(&a, &bad);
    a.sh_ok("echo from-a > durable/a2.txt");
    assert_eq!(converged(&a, &b, "durable/a2.txt"), "from-a\n");
    b.sh_ok("echo again > durable/b3.txt");
    assert_eq!(converged(&a, &b, "durable/b3.txt"), "again\n");
    wait_pushed(&a);
    wait_pushed(&b);
    // The refused entries stay in the branch (no node deletes what a human pushed), are not
    // installed, and every node lists them.
    assert_eq!(remote.show("durable/GIT~1").as_deref(), Some("hostile\n"));
    assert_eq!(remote.show("durable/.git./x").as_deref(), Some("nested\n"));
    for m in [&a, &b] {
        assert!(!m.path("durable/GIT~1").exists() && !m.path("durable/.git.").exists());
        let listed = quarantined(m);
        assert!(listed.contains(&"durable/GIT~1".to_string()) && listed.contains(&"durable/.git./x".to_string()), "{}", git_status(m));
        let reasons = git_status(m)["quarantined"].to_string();
        assert!(reasons.contains("git refuses"), "{reasons}");
        let human_status = String::from_utf8_lossy(&crate::harness::syncfs(&["status", &m.mnt.display().to_string()]).stdout).into_owned();
        assert!(human_status.contains("durable/GIT~1"), "{human_status}");
    }
    // A node's remount does not turn the entries it never installed into deletions.
    let mut a = a;
    a.umount();
    let out = a.try_mount(&Options {
        node: Some("a".into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        ..Default::default()
    });
    assert!(out.status.success(), "{}", stderr(&out));
    a.sh_ok("echo after-remount > durable/a4.txt");
    wait_pushed(&a);
    assert_eq!(remote.show("durable/a4.txt").as_deref(), Some("after-remount\n"));
    assert_eq!(remote.show("durable/GIT~1").as_deref(), Some("hostile\n"));
    // The human removes them; the lists empty.
    human.commit(&remote.path, &remote.path, "durable/GIT~1", None, "fix");
    human.commit(&remote.path, &remote.path, "durable/.git./x", None, "fix");
    for m in [&a, &b] {
        assert!(wait_for(Duration::from_secs(30), || quarantined(m).is_empty()), "{}", git_status(m));
    }
}

#[test]
fn the_policy_table_is_root_owned_0755_0644_on_a_node_that_adopted_the_remotes() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let a = node("a", &remote, &nats);
    wait_pushed(&a);
    let b = Mount::with(Options {
        node: Some("b".into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        allow_other: true,
        ..Default::default()
    });
    for m in [&a, &b] {
        for (rel, mode) in [(".syncfs", 0o755), (POLICIES, 0o644)] {
            for path in [m.path(rel), m.tree(rel)] {
                let meta = std::fs::metadata(&path).unwrap();
                assert_eq!(meta.mode() & 0o7777, mode, "{}: {:o}", path.display(), meta.mode() & 0o7777);
                assert_eq!((meta.uid(), meta.gid()), (0, 0), "{}", path.display());
            }
        }
    }
    // With allow_other, another local user can neither rewrite nor add to the table.
    let before = std::fs::read(b.path(POLICIES)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c"])
        .arg("echo 'policies: []' > .syncfs/policies.yml || echo refused; echo x > .syncfs/new.yml || echo refused")
        .current_dir(&b.mnt)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "refused\nrefused\n", "{}", stderr(&out));
    assert_eq!(std::fs::read(b.path(POLICIES)).unwrap(), before);
}

#[test]
fn a_broken_table_from_the_remote_is_not_installed_and_every_node_keeps_mounting() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let opts = |name: &str| Options {
        node: Some(name.into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        ..Default::default()
    };
    let mut a = Mount::with(opts("a"));
    wait_pushed(&a);
    let good = std::fs::read_to_string(a.path(POLICIES)).unwrap();
    // A human pushes a table that does not parse.
    let human = Human::clone(&remote.path);
    let broken = "policies: [oops\n";
    let bad = human.commit(&remote.path, &remote.path, POLICIES, Some(broken), "broken table");
    wait_installed(&a, &bad);
    assert_eq!(std::fs::read_to_string(a.path(POLICIES)).unwrap(), good, "the broken table was installed");
    assert!(wait_for(Duration::from_secs(20), || !git_status(&a)["policy_error"].is_null()), "{}", git_status(&a));
    assert!(git_status(&a)["policy_error"].as_str().unwrap().contains("policies.yml"), "{}", git_status(&a));
    // The node mounts again, with its last valid table, and does not push it over the remote's.
    a.umount();
    let out = a.try_mount(&opts("a"));
    assert!(out.status.success(), "remount: {}", stderr(&out));
    assert_eq!(std::fs::read_to_string(a.path(POLICIES)).unwrap(), good);
    // A new node mounts too, with the last valid table in the history.
    let b = Mount::with(opts("b"));
    assert_eq!(std::fs::read_to_string(b.path(POLICIES)).unwrap(), good);
    assert!(wait_for(Duration::from_secs(20), || !git_status(&b)["policy_error"].is_null()), "{}", git_status(&b));
    let human_status = String::from_utf8_lossy(&crate::harness::syncfs(&["status", &b.mnt.display().to_string()]).stdout).into_owned();
    assert!(human_status.contains("policies.yml"), "{human_status}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(remote.show(POLICIES).as_deref(), Some(broken), "a node overwrote the remote's table");
    // The human fixes the remote: every node takes the fixed table, the errors go.
    let fixed = format!("{good}  - pattern: \"scratch/**\"\n    tier: local\n");
    human.commit(&remote.path, &remote.path, POLICIES, Some(&fixed), "fixed table");
    for m in [&a, &b] {
        assert!(wait_content(&m.path(POLICIES), &fixed), "{}", git_status(m));
        assert!(wait_for(Duration::from_secs(20), || git_status(m)["policy_error"].is_null()), "{}", git_status(m));
    }
    let c = Mount::with(opts("c"));
    assert_eq!(std::fs::read_to_string(c.path(POLICIES)).unwrap(), fixed);
    c.sh_ok("mkdir -p scratch && touch scratch/x");
    assert_eq!(c.sh_ok("getfattr --only-values -n user.syncfs.tier scratch/x"), "local");
}

#[test]
fn emptying_the_policy_table_by_truncating_open_is_einval_and_changes_nothing() {
    let m = Mount::with(Options {
        config: Some(QUICK.into()),
        ..Default::default()
    });
    let before = std::fs::read(m.path(POLICIES)).unwrap();
    // An open with O_TRUNC and a close with nothing written: close() fails, as `truncate -s 0`
    // does. (Shells ignore close() errors: `: > file` leaves the table too, but exits 0.)
    let out = m.sh("python3 -c \"open('.syncfs/policies.yml', 'w').close()\"");
    assert!(stderr(&out).contains("Errno 22"), "{}", stderr(&out));
    assert!(wait_content(&m.path(POLICIES), std::str::from_utf8(&before).unwrap()), "the refused truncation stayed");
    let out = m.sh("cp /dev/null .syncfs/policies.yml");
    assert!(!out.status.success() && stderr(&out).contains("Invalid argument"), "{}", stderr(&out));
    assert_eq!(std::fs::read(m.path(POLICIES)).unwrap(), before);
    let out = m.sh("truncate -s 0 .syncfs/policies.yml");
    assert!(!out.status.success() && stderr(&out).contains("Invalid argument"), "{}", stderr(&out));
    m.sh(": > .syncfs/policies.yml");
    // The refused truncation is undone by the release, which the kernel sends after close()
    // returned: until then this node's readers see the file as the open left it (POSIX).
    let table = String::from_utf8(before.clone()).unwrap();
    assert!(wait_content(&m.path(POLICIES), &table), "the refused truncation stayed");
    // The shell idiom that writes after the truncating open still works, on this file and others.
    let text = String::from_utf8(before.clone()).unwrap();
    m.sh_ok(&format!("cat > .syncfs/policies.yml <<'EOF'\n{text}# checked\nEOF"));
    assert_eq!(std::fs::read_to_string(m.path(POLICIES)).unwrap(), format!("{text}# checked\n"));
    m.sh_ok("mkdir -p durable local && echo x > durable/x.txt && : > durable/x.txt && echo y > local/y && : > local/y");
    assert!(wait_content(&m.path("durable/x.txt"), ""));
    assert!(wait_content(&m.path("local/y"), ""));
}
