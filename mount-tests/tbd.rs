//! tbd 0.2.3 (npm `get-tbd`, installed by scripts/install-deps.sh) end to end on two nodes
//! (issue 11, item 6), with the policy docs/tbd.md documents: each node has a repository of
//! its own whose issue store (`.git/tbd/data-sync-worktree/.tbd/data-sync`) is a bind mount of
//! the same directory of syncfs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::git::{Remote, QUICK};
use crate::harness::{wait_for, Mount, Options};
use crate::nats::NatsServer;

/// The table of docs/tbd.md, as written there.
pub const TBD_TABLE: &str = r#"policies:
  # tbd's id-map lock: a directory made with mkdir, broken by rename when stale.
  - pattern: "tbd/mappings/ids.yml.lock*"
    tier: nats-kv
    consistency: cas-create
    ttl: 60
  # Issues: Markdown with YAML front matter, merged field by field.
  - pattern: "tbd/issues/**"
    tier: git
    consistency: merge
    merge_rules: { id: immutable, title: lww, labels: union, created_at: min, updated_at: max, closed_at: max, dependencies: { merge_by: target } }
  # The id map (short id -> ULID) and the rest of the store.
  - pattern: "tbd/**"
    tier: git
    consistency: merge
"#;

const TBD: &str = "/var/lib/syncfs/tools/tbd/node_modules/.bin/tbd";
const STORE: &str = ".git/tbd/data-sync-worktree/.tbd/data-sync";

/// A node's repository with its store bind-mounted from the node's syncfs.
struct Repo {
    dir: PathBuf,
    _base: tempfile::TempDir,
}

impl Repo {
    fn new(name: &str, m: &Mount) -> Repo {
        let base = tempfile::Builder::new().prefix("syncfs-tbd-").tempdir().unwrap();
        let dir = base.path().join(format!("repo-{name}"));
        std::fs::create_dir(&dir).unwrap();
        let repo = Repo { dir, _base: base };
        repo.run_ok(&format!(
            "git init -q -b main && git -c user.name={name} -c user.email={name}@x commit -q --allow-empty -m init \
             && git config user.name {name} && git config user.email {name}@x && {TBD} init --prefix=tst >/dev/null"
        ));
        let store = repo.dir.join(STORE);
        if !m.path("tbd/meta.yml").exists() {
            // The first node brings the store its init made.
            repo.run_ok(&format!("mkdir -p {0} && cp -a {STORE}/. {0}/", m.path("tbd").display()));
        }
        // Empty directories are not synced (git): tbd's own conflict attic, made on each node.
        std::fs::create_dir_all(m.path("tbd/attic/conflicts")).unwrap();
        let status = Command::new("mount").arg("--bind").arg(m.path("tbd")).arg(&store).status().unwrap();
        assert!(status.success(), "bind mount of the store");
        repo
    }

    fn run(&self, script: &str) -> Output {
        Command::new("bash").arg("-c").arg(script).current_dir(&self.dir).output().unwrap()
    }

    fn run_ok(&self, script: &str) -> String {
        let out = self.run(script);
        assert!(out.status.success(), "{script}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tbd(&self, args: &str) -> String {
        self.run_ok(&format!("{TBD} {args} --no-sync"))
    }

    /// `tbd ARGS --json` as JSON.
    fn json(&self, args: &str) -> serde_json::Value {
        let out = self.tbd(&format!("{args} --json"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("tbd {args}: not JSON ({e}): {out}"))
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.join(STORE)).status();
    }
}

fn node(name: &str, server: &NatsServer, remote: &Remote) -> Mount {
    Mount::with(Options {
        node: Some(name.into()),
        nats: vec![server.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        policies: Some(TBD_TABLE.into()),
        ..Default::default()
    })
}

fn titles(v: &serde_json::Value) -> Vec<String> {
    let mut t: Vec<String> = v.as_array().unwrap().iter().map(|i| i["title"].as_str().unwrap_or("?").to_string()).collect();
    t.sort();
    t
}

fn both_agree(repos: &[&Repo], args: &str) -> serde_json::Value {
    let mut last = (serde_json::Value::Null, serde_json::Value::Null);
    let same = wait_for(Duration::from_secs(20), || {
        last = (repos[0].json(args), repos[1].json(args));
        titles(&last.0) == titles(&last.1)
    });
    assert!(same, "tbd {args} differs:\n{}\n{}", last.0, last.1);
    last.0
}

#[test]
fn tbd_on_two_nodes_creates_edits_locks_and_agrees() {
    assert!(Path::new(TBD).exists(), "{TBD} missing: scripts/install-deps.sh installs it");
    let (server, remote) = (NatsServer::start(), Remote::new());
    let (a, b) = (node("a", &server, &remote), node("b", &server, &remote));
    let ra = Repo::new("a", &a);
    assert!(wait_for(Duration::from_secs(30), || b.path("tbd/meta.yml").exists()), "B never got the store");
    let rb = Repo::new("b", &b);

    // 5 + 5 concurrent creates: every issue listed on both nodes, every printed id resolves.
    let creates: Vec<_> = [(&ra, "a"), (&rb, "b")]
        .into_iter()
        .map(|(r, n)| {
            let script = format!("for i in 1 2 3 4 5; do {TBD} create \"issue {n}$i\" --no-sync | grep -o 'tst-[a-z0-9]*' | head -1; done");
            let dir = r.dir.clone();
            std::thread::spawn(move || Command::new("bash").arg("-c").arg(script).current_dir(dir).output().unwrap())
        })
        .collect();
    let mut ids = Vec::new();
    for c in creates {
        let out = c.join().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ids.extend(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string));
    }
    assert_eq!(ids.len(), 10, "{ids:?}");
    let listed = both_agree(&[&ra, &rb], "list");
    let want: Vec<String> = (1..=5).flat_map(|i| [format!("issue a{i}"), format!("issue b{i}")]).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(titles(&listed), want);
    for id in &ids {
        for r in [&ra, &rb] {
            assert!(wait_for(Duration::from_secs(20), || r.run(&format!("{TBD} show {id} --no-sync")).status.success()), "{id} does not resolve");
        }
    }

    // The same issue edited on both nodes at once: a label on one, a priority on the other.
    let id = ids[0].clone();
    let edits: Vec<_> = [(&ra, "--add-label urgent"), (&rb, "--priority 0")]
        .into_iter()
        .map(|(r, args)| {
            let (dir, script) = (r.dir.clone(), format!("{TBD} update {id} {args} --no-sync"));
            std::thread::spawn(move || Command::new("bash").arg("-c").arg(script).current_dir(dir).output().unwrap())
        })
        .collect();
    for e in edits {
        assert!(e.join().unwrap().status.success());
    }
    let both_kept = wait_for(Duration::from_secs(20), || {
        [&ra, &rb].iter().all(|r| {
            let v = r.json(&format!("show {id}"));
            v["priority"] == 0 && v["labels"].as_array().is_some_and(|l| l.iter().any(|x| x == "urgent"))
        })
    });
    assert!(both_kept, "an edit was lost:\n{}\n{}", ra.json(&format!("show {id}")), rb.json(&format!("show {id}")));
    let conflicts = std::fs::read_dir(a.path("tbd/issues")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".conflict-")).count();
    assert_eq!(conflicts, 0, "different fields made a conflict file");

    // A lock directory left behind is broken by tbd after its 5 s stale time.
    std::fs::create_dir(a.path("tbd/mappings/ids.yml.lock")).unwrap();
    assert!(wait_for(Duration::from_secs(10), || b.path("tbd/mappings/ids.yml.lock").is_dir()));
    let t = Instant::now();
    let made = rb.tbd("create 'after a stale lock'");
    assert!(made.contains("Created"), "{made}");
    assert!(t.elapsed() < Duration::from_secs(15), "tbd waited {:?} for a 5 s stale lock", t.elapsed());
    assert!(wait_for(Duration::from_secs(10), || !a.path("tbd/mappings/ids.yml.lock").exists()), "the broken lock stayed");

    // Dependencies, ready, blocked, close and doctor agree on both nodes.
    let (blocker, blocked) = (ids[1].clone(), ids[2].clone());
    ra.tbd(&format!("dep add {blocked} {blocker}"));
    let b_blocked = both_agree(&[&ra, &rb], "blocked");
    assert_eq!(b_blocked.as_array().unwrap().len(), 1, "{b_blocked}");
    let ready = both_agree(&[&ra, &rb], "ready");
    assert!(!titles(&ready).is_empty());
    rb.tbd(&format!("close {blocker}"));
    let none = both_agree(&[&ra, &rb], "blocked");
    assert!(none.as_array().unwrap().is_empty(), "still blocked after its blocker closed: {none}");
    for r in [&ra, &rb] {
        let out = r.run(&format!("{TBD} doctor --no-sync"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Sync consistency") && !text.contains("✗"), "doctor: {text}");
    }
    drop((ra, rb));
}
