//! Merges of the files tools actually write (issue 11, item 3): Markdown issues with YAML front
//! matter, plain text, and tbd's `dependencies` list, edited on two nodes at once.
//!
//! "At once" is made certain the way `git.rs` does it: the shared remote goes away, both nodes
//! edit and commit without seeing each other, then it comes back and both merge.

use std::time::Duration;

use serde_json::{json, Value};

use crate::git::{converged, wait_pushed, Remote, QUICK};
use crate::harness::{wait_content, wait_for, Mount, Options};
use crate::nats::NatsServer;

/// tbd's layout: issues as Markdown with front matter, merged field by field; notes as text.
const TABLE: &str = r#"policies:
  - pattern: "issues/**"
    tier: git
    consistency: merge
    merge_rules: { id: immutable, title: lww, labels: union, created_at: min, updated_at: max, dependencies: { merge_by: target } }
  - pattern: "notes/**"
    tier: git
    consistency: merge
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

fn git_status(m: &Mount) -> Value {
    m.status()["git"].clone()
}

fn wait_committed(m: &Mount) {
    let ok = wait_for(Duration::from_secs(30), || git_status(m)["uncommitted"] == 0);
    assert!(ok, "not committed: {}", git_status(m));
}

/// Two nodes that both hold `content` at `rel`, written on A and pushed.
fn two_nodes_with(remote: &Remote, nats: &NatsServer, rel: &str, content: &str) -> (Mount, Mount) {
    let a = node("a", remote, nats);
    let b = node("b", remote, nats);
    let dir = std::path::Path::new(rel).parent().unwrap().display().to_string();
    a.sh_ok(&format!("mkdir -p {dir} && cat > {rel} <<'EOF'\n{content}EOF"));
    assert!(wait_content(&b.path(rel), content), "B never saw A's {rel}");
    wait_pushed(&a);
    wait_pushed(&b);
    (a, b)
}

/// Rewrites `rel` on a node, replacing each `from` by its `to` in its current text.
fn edit(m: &Mount, rel: &str, edits: &[(&str, &str)]) {
    let path = m.path(rel);
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} not in:\n{text}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&path, text).unwrap();
}

/// Both nodes edit while the remote is away, then it comes back and both push.
fn concurrently(remote: &Remote, a: &Mount, b: &Mount, on_a: impl FnOnce(&Mount), on_b: impl FnOnce(&Mount)) {
    remote.away();
    on_a(a);
    wait_committed(a);
    // B's change is the later one, so it is the one a conflict keeps in place.
    std::thread::sleep(Duration::from_millis(50));
    on_b(b);
    wait_committed(b);
    remote.back();
    wait_pushed(a);
    wait_pushed(b);
}

/// The conflict files in `dir` on a node, sorted.
fn conflicts(m: &Mount, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(m.path(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".conflict-"))
        .collect();
    v.sort();
    v
}

/// The front matter of a Markdown text, as a value.
fn front_matter(text: &str) -> Value {
    let rest = text.strip_prefix("---\n").unwrap_or_else(|| panic!("no front matter:\n{text}"));
    let end = rest.find("\n---\n").unwrap_or_else(|| panic!("front matter not closed:\n{text}"));
    yaml_serde::from_str(&rest[..end + 1]).unwrap_or_else(|e| panic!("front matter is not YAML ({e}):\n{text}"))
}

const ISSUE: &str = "---
type: is
id: is-01
title: Crash on start
status: open
priority: 2
labels:
  - bug
dependencies: []
created_at: 2026-01-01T00:00:00Z
updated_at: 2026-01-01T00:00:00Z
---
Crash on start

It crashes when started from the menu.

Steps:
1. run it
";

#[test]
fn markdown_front_matter_and_body_edited_on_both_nodes_merge_without_conflict() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let rel = "issues/is-01.md";
    let (a, b) = two_nodes_with(&remote, &nats, rel, ISSUE);
    concurrently(
        &remote,
        &a,
        &b,
        // A: a label, and a line appended at the end of the body.
        |a| edit(a, rel, &[("  - bug\n", "  - bug\n  - p1\n"), ("1. run it\n", "1. run it\n2. see it crash\n")]),
        // B: the priority, and the body's first line.
        |b| edit(b, rel, &[("priority: 2", "priority: 1"), ("---\nCrash on start\n", "---\nCrash on start (at boot)\n")]),
    );
    let text = converged(&a, &b, rel);
    let expected = ISSUE
        .replace("  - bug\n", "  - bug\n  - p1\n")
        .replace("priority: 2", "priority: 1")
        .replace("---\nCrash on start\n", "---\nCrash on start (at boot)\n")
        .replace("1. run it\n", "1. run it\n2. see it crash\n");
    // Every change, and the front matter's formatting and field order as they were.
    assert_eq!(text, expected);
    let fm = front_matter(&text);
    assert_eq!(fm["labels"], json!(["bug", "p1"]));
    assert_eq!(fm["priority"], 1);
    assert_eq!(remote.show(rel).as_deref(), Some(text.as_str()));
    for m in [&a, &b] {
        assert!(conflicts(m, "issues").is_empty(), "{:?}", conflicts(m, "issues"));
        assert!(m.status()["conflicts"].as_array().unwrap().is_empty());
    }
}

#[test]
fn overlapping_text_edits_keep_both_versions_on_both_nodes() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let rel = "notes/todo.txt";
    let base = "buy milk\ncall the bank\nwater the plants\n";
    let (a, b) = two_nodes_with(&remote, &nats, rel, base);
    concurrently(
        &remote,
        &a,
        &b,
        |a| edit(a, rel, &[("call the bank", "call the bank about the card")]),
        |b| edit(b, rel, &[("call the bank", "call the bank on Monday")]),
    );
    let text = converged(&a, &b, rel);
    // The later change stays in place, whole: no conflict markers in the file.
    assert_eq!(text, base.replace("call the bank", "call the bank on Monday"));
    // The other is beside it, under the same name with the same bytes on both nodes.
    assert!(
        wait_for(Duration::from_secs(20), || !conflicts(&a, "notes").is_empty() && conflicts(&a, "notes") == conflicts(&b, "notes")),
        "{:?} vs {:?}",
        conflicts(&a, "notes"),
        conflicts(&b, "notes")
    );
    let names = conflicts(&a, "notes");
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("todo.txt.conflict-") && names[0].ends_with("-a"), "{names:?}");
    let kept = converged(&a, &b, &format!("notes/{}", names[0]));
    assert!(kept.starts_with("# syncfs conflict"), "{kept}");
    assert!(kept.ends_with(&base.replace("call the bank", "call the bank about the card")), "{kept}");
    // Nothing lost: every version is in the remote's history too.
    let history = remote.all_history();
    for line in ["call the bank about the card", "call the bank on Monday", "call the bank\n"] {
        assert!(history.contains(line), "{line:?} missing from the history");
    }
}

#[test]
fn dependencies_added_on_both_nodes_are_both_kept() {
    let (remote, nats) = (Remote::new(), NatsServer::start());
    let rel = "issues/is-02.md";
    let issue = ISSUE
        .replace("id: is-01", "id: is-02")
        .replace("dependencies: []\n", "dependencies:\n  - type: blocks\n    target: is-00\n");
    let (a, b) = two_nodes_with(&remote, &nats, rel, &issue);
    let dep = |target: &str| format!("    target: is-00\n  - type: blocks\n    target: {target}\n");
    concurrently(
        &remote,
        &a,
        &b,
        |a| edit(a, rel, &[("    target: is-00\n", &dep("is-0a")), ("updated_at: 2026-01-01", "updated_at: 2026-01-02")]),
        |b| edit(b, rel, &[("    target: is-00\n", &dep("is-0b")), ("updated_at: 2026-01-01", "updated_at: 2026-01-03")]),
    );
    let text = converged(&a, &b, rel);
    let fm = front_matter(&text);
    let mut targets: Vec<String> = fm["dependencies"]
        .as_array()
        .unwrap_or_else(|| panic!("no dependencies:\n{text}"))
        .iter()
        .map(|d| {
            assert_eq!(d["type"], "blocks", "{text}");
            d["target"].as_str().unwrap().to_string()
        })
        .collect();
    targets.sort();
    assert_eq!(targets, vec!["is-00", "is-0a", "is-0b"], "{text}");
    assert_eq!(fm["updated_at"], "2026-01-03T00:00:00Z", "max: {text}");
    assert!(text.ends_with("Steps:\n1. run it\n"), "the body is untouched:\n{text}");
    for m in [&a, &b] {
        assert!(conflicts(m, "issues").is_empty(), "{:?}", conflicts(m, "issues"));
    }
}

#[test]
fn an_immutable_front_matter_field_is_eperm_at_close() {
    let remote = Remote::new();
    let nats = NatsServer::start();
    let a = node("a", &remote, &nats);
    let issue = "---\nid: is-1\ntitle: First\n---\nBody.\n";
    a.sh_ok(&format!("mkdir -p issues && cat > issues/is-1.md <<'EOF'\n{issue}EOF"));
    wait_committed(&a);
    // Changing the id is refused at close; the stored version stays.
    let changed = issue.replace("is-1", "is-2");
    let out = a.sh(&format!("python3 -c \"f = open('issues/is-1.md', 'w'); f.write('''{changed}'''); f.close()\""));
    assert!(!out.status.success(), "the id changed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Errno 1"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(a.path("issues/is-1.md")).unwrap(), issue);
    // Other fields, and the body, change as usual.
    a.sh_ok("printf -- '---\\nid: is-1\\ntitle: Second\\n---\\nBody, longer.\\n' > issues/is-1.md");
    assert!(std::fs::read_to_string(a.path("issues/is-1.md")).unwrap().contains("Second"));
}
