//! Merges of whole files: formatting kept, conflicts, symmetry.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

fn stamp(ms: u64, node: &str) -> Stamp {
    Stamp {
        wall_ms: ms,
        counter: 0,
        node: node.into(),
    }
}

fn issue_rules() -> BTreeMap<String, MergeRule> {
    [
        ("id", MergeRule::Immutable),
        ("title", MergeRule::Lww),
        ("labels", MergeRule::Union),
        ("updated_at", MergeRule::Max),
    ]
    .into_iter()
    .map(|(k, r)| (k.to_string(), r))
    .collect()
}

fn merge3(path: &str, base: &str, a: &str, b: &str) -> Outcome {
    let (sa, sb) = (stamp(2000, "a"), stamp(1000, "b"));
    merge_file(
        Path::new(path),
        Consistency::Merge,
        &issue_rules(),
        Some(base.as_bytes()),
        Side { content: Some(a.as_bytes()), stamp: &sa, commit: "ca" },
        Side { content: Some(b.as_bytes()), stamp: &sb, commit: "cb" },
    )
}

fn text(o: &Outcome) -> String {
    String::from_utf8(o.content.clone().unwrap()).unwrap()
}

#[test]
fn yaml_merge_keeps_comments_order_and_untouched_lines() {
    let base = "# issue 12\nid: 12\ntitle: Crash on start   # keep this comment\nlabels: [bug]\n# the body follows\nbody: |\n  It crashes.\nupdated_at: 2026-01-01T00:00:00Z\n";
    let a = base.replace("Crash on start", "Crash on start (macOS)");
    let b = base.replace("labels: [bug]", "labels: [bug, p1]").replace("2026-01-01", "2026-02-01");
    let out = merge3("i.yml", base, &a, &b);
    assert_eq!(out.conflict, None);
    let expected = "# issue 12\nid: 12\ntitle: Crash on start (macOS)   # keep this comment\nlabels: [bug, p1]\n# the body follows\nbody: |\n  It crashes.\nupdated_at: 2026-02-01T00:00:00Z\n";
    assert_eq!(text(&out), expected);
}

#[test]
fn yaml_union_writes_only_the_merged_field_afresh() {
    let base = "id: 1\nlabels:\n  - a\n  - b\n# trailing comment\n";
    let a = "id: 1\nlabels:\n  - a\n  - b\n  - c\n# trailing comment\n";
    let b = "id: 1\nlabels:\n  - b\n# trailing comment\n";
    let out = merge3("i.yaml", base, a, b);
    assert_eq!(text(&out), "id: 1\nlabels:\n- b\n- c\n# trailing comment\n");
}

#[test]
fn toml_merge_keeps_comments_and_order() {
    let base = "# config\nname = \"svc\" # the name\nport = 80\n\n[limits]\ncpu = 1\n";
    let a = base.replace("port = 80", "port = 8080");
    let b = base.replace("cpu = 1", "cpu = 2");
    let out = merge3("c.toml", base, &a, &b);
    assert_eq!(out.conflict, None);
    assert_eq!(text(&out), "# config\nname = \"svc\" # the name\nport = 8080\n\n[limits]\ncpu = 2\n");
}

#[test]
fn json_merge_keeps_key_order_and_indentation() {
    let base = "{\n    \"z\": 1,\n    \"a\": 1,\n    \"m\": 1\n}\n";
    let a = "{\n    \"z\": 2,\n    \"a\": 1,\n    \"m\": 1\n}\n";
    let b = "{\n    \"z\": 1,\n    \"a\": 1,\n    \"m\": 3,\n    \"new\": true\n}\n";
    let out = merge3("d.json", base, a, b);
    assert_eq!(text(&out), "{\n    \"z\": 2,\n    \"a\": 1,\n    \"m\": 3,\n    \"new\": true\n}\n");
}

#[test]
fn unruled_field_conflict_keeps_the_newer_in_place_and_the_older_beside_it() {
    let base = "id: 1\nowner: ann\nbody: x\n";
    let a = "id: 1\nowner: bob\nbody: x\n";
    let b = "id: 1\nowner: cid\nbody: y\n";
    let out = merge3("i.yml", base, a, b);
    // body merged (only b changed it); owner: the newer (a) stays.
    assert_eq!(text(&out), "id: 1\nowner: bob\nbody: y\n");
    let c = out.conflict.unwrap();
    assert_eq!(c.fields, vec!["owner"]);
    assert_eq!(c.loser, b.as_bytes());
    assert_eq!(c.loser_stamp.node, "b");
    let name = conflict_path(Path::new("durable/i.yml"), &c.loser_stamp);
    assert_eq!(name, Path::new("durable/i.yml.conflict-19700101T000001.000Z.0-b"));
    let content = String::from_utf8(conflict_content(Path::new("i.yml"), &c)).unwrap();
    assert!(content.starts_with("# syncfs conflict:"), "{content}");
    assert!(content.contains("commit cb") && content.contains("commit ca") && content.contains("owner"));
    assert!(content.ends_with(b));
}

#[test]
fn overlapping_text_and_unparseable_documents_conflict_and_lww_paths_take_the_newer() {
    let out = merge3("notes.md", "x\n", "a\n", "b\n");
    assert_eq!(text(&out), "a\n");
    assert!(out.conflict.unwrap().fields.is_empty());
    let out = merge3("bad.yml", "a: 1\n", "a: [\n", "a: 3\n");
    assert!(out.conflict.is_some());
    let (sa, sb) = (stamp(1, "a"), stamp(2, "b"));
    let lww = merge_file(
        Path::new("x.yml"),
        Consistency::Lww,
        &BTreeMap::new(),
        Some(b"v: 0\n"),
        Side { content: Some(b"v: 1\n"), stamp: &sa, commit: "ca" },
        Side { content: Some(b"v: 2\n"), stamp: &sb, commit: "cb" },
    );
    assert_eq!(lww.content.as_deref(), Some(b"v: 2\n".as_slice()));
    assert_eq!(lww.conflict, None);
}

#[test]
fn an_edit_beats_a_delete() {
    let (sa, sb) = (stamp(1, "a"), stamp(2, "b"));
    let out = merge_file(
        Path::new("x.yml"),
        Consistency::Merge,
        &BTreeMap::new(),
        Some(b"v: 0\n"),
        Side { content: Some(b"v: 1\n"), stamp: &sa, commit: "ca" },
        Side { content: None, stamp: &sb, commit: "cb" },
    );
    assert_eq!(out.content.as_deref(), Some(b"v: 1\n".as_slice()));
    let out = merge_file(
        Path::new("x.yml"),
        Consistency::Merge,
        &BTreeMap::new(),
        Some(b"v: 0\n"),
        Side { content: Some(b"v: 0\n"), stamp: &sa, commit: "ca" },
        Side { content: None, stamp: &sb, commit: "cb" },
    );
    assert_eq!(out.content, None);
}

#[test]
fn a_byte_order_mark_stays_at_the_start_of_the_merged_document() {
    // Found by any_three_documents_merge_symmetrically_without_panicking: the mark went with the
    // first field of its side and ended up mid-document, which no YAML parser reads.
    let (sa, sb) = (stamp(1, "a"), stamp(2, "b"));
    for (a, b) in [("id: 1\n", "\u{feff}title: x\n"), ("\u{feff}id: 1\n", "title: x\n")] {
        let out = merge_file(
            Path::new("i.yml"),
            Consistency::Merge,
            &issue_rules(),
            None,
            Side { content: Some(a.as_bytes()), stamp: &sa, commit: "ca" },
            Side { content: Some(b.as_bytes()), stamp: &sb, commit: "cb" },
        );
        let merged = text(&out);
        assert_eq!(parse_value(Format::Yaml, &merged).ok(), Some(json!({"id": 1, "title": "x"})), "{merged:?}");
        assert!(!merged.trim_start_matches('\u{feff}').contains('\u{feff}'), "{merged:?}");
    }
}

#[test]
fn immutable_changes_are_found() {
    let rules = issue_rules();
    let p = Path::new("i.yml");
    assert_eq!(immutable_changes(p, &rules, b"id: 1\ntitle: a\n", b"id: 2\ntitle: a\n"), vec!["id"]);
    assert_eq!(immutable_changes(p, &rules, b"id: 1\n", b"title: a\n"), vec!["id"]);
    assert!(immutable_changes(p, &rules, b"id: 1\ntitle: a\n", b"id: 1\ntitle: b\n").is_empty());
    assert!(immutable_changes(p, &rules, b"title: a\n", b"id: 5\n").is_empty(), "setting it the first time is fine");
}

// Markdown, text and the rules for the files tools write (issue 11, item 3).

/// tbd's issue front matter, with the rules its policy gives it.
fn tbd_rules() -> BTreeMap<String, MergeRule> {
    let mut rules = issue_rules();
    rules.insert("created_at".into(), MergeRule::Min);
    rules.insert("extensions".into(), MergeRule::Union);
    rules.insert("dependencies".into(), MergeRule::MergeBy("target".into()));
    rules
}

fn merge_with(rules: &BTreeMap<String, MergeRule>, path: &str, base: Option<&str>, newer: &str, older: &str) -> Outcome {
    let (sa, sb) = (stamp(2000, "a"), stamp(1000, "b"));
    merge_file(
        Path::new(path),
        Consistency::Merge,
        rules,
        base.map(str::as_bytes),
        Side { content: Some(newer.as_bytes()), stamp: &sa, commit: "ca" },
        Side { content: Some(older.as_bytes()), stamp: &sb, commit: "cb" },
    )
}

const MD: &str = "---\n# tbd issue\nid: is-01\ntitle: Crash\nlabels: [bug]\npriority: 2\ncreated_at: 2026-01-01T00:00:00Z\n---\n# Crash\n\nIt crashes at start.\n\nSteps:\n1. run it\n";

#[test]
fn markdown_front_matter_merges_by_field_and_the_body_as_text() {
    let a = MD.replace("[bug]", "[bug, p1]").replace("1. run it\n", "1. run it\n2. see it crash\n");
    let b = MD.replace("priority: 2", "priority: 1").replace("# Crash\n\n", "# Crash on boot\n\n");
    let out = merge_with(&tbd_rules(), "issues/is-01.md", Some(MD), &a, &b);
    assert_eq!(out.conflict, None);
    // The front matter is edited, not rewritten: its comment, order and flow list stay.
    let expected = "---\n# tbd issue\nid: is-01\ntitle: Crash\nlabels: [bug, p1]\npriority: 1\ncreated_at: 2026-01-01T00:00:00Z\n---\n# Crash on boot\n\nIt crashes at start.\n\nSteps:\n1. run it\n2. see it crash\n";
    assert_eq!(text(&out), expected);
    // The other order of the same two changes gives the same bytes.
    let swapped = merge_with(&tbd_rules(), "issues/is-01.md", Some(MD), &b, &a);
    assert_eq!(text(&swapped), expected);
    // `.markdown` too; both sides adding the same label and line is one change.
    let both = MD.replace("[bug]", "[bug, p1]").replace("1. run it\n", "1. run it\n2. see it crash\n");
    let out = merge_with(&tbd_rules(), "x.markdown", Some(MD), &a, &both.replace("priority: 2", "priority: 3"));
    assert_eq!(out.conflict, None);
    assert_eq!(text(&out), both.replace("priority: 2", "priority: 3"));
}

#[test]
fn markdown_conflicts_name_fields_and_the_body_and_keep_what_merged() {
    let a = MD.replace("title: Crash", "title: A's").replace("It crashes at start.", "A: a null pointer.").replace("[bug]", "[bug, a]");
    let b = MD.replace("priority: 2", "priority: 5").replace("It crashes at start.", "B: out of memory.");
    let mut rules = tbd_rules();
    rules.remove("title");
    let b = b.replace("title: Crash", "title: B's");
    let out = merge_with(&rules, "i.md", Some(MD), &a, &b);
    let c = out.conflict.clone().unwrap();
    assert_eq!(c.fields, vec!["title".to_string(), BODY.to_string()]);
    assert_eq!(c.loser, b.as_bytes());
    // In place: the newer title and body, and every field that did merge.
    let merged = text(&out);
    assert!(merged.contains("title: A's\n") && merged.contains("A: a null pointer.") && merged.contains("priority: 5\n"), "{merged}");
    assert!(merged.contains("labels: [bug, a]\n"), "{merged}");
    let header = String::from_utf8(conflict_content(Path::new("i.md"), &c)).unwrap();
    assert!(header.contains("In dispute: title, the body."), "{header}");
}

#[test]
fn markdown_without_front_matter_everywhere_merges_as_text() {
    let base = "# Notes\n\none\ntwo\nthree\n";
    let a = "# Notes\n\none\ntwo\nthree\nfour\n";
    let b = "---\ntitle: notes\n---\n# Notes\n\none\ntwo\nthree\n";
    let out = merge_with(&tbd_rules(), "n.md", Some(base), a, b);
    assert_eq!(out.conflict, None);
    assert_eq!(text(&out), "---\ntitle: notes\n---\n# Notes\n\none\ntwo\nthree\nfour\n");
    // Front matter that is not a YAML map: the whole file merges as text.
    let base = "---\n[a\n---\nx\ny\nz\n";
    let out = merge_with(&tbd_rules(), "n.md", Some(base), "---\n[a\n---\nX\ny\nz\n", "---\n[a\n---\nx\ny\nZ\n");
    assert_eq!(text(&out), "---\n[a\n---\nX\ny\nZ\n");
}

#[test]
fn text_changes_to_different_lines_merge_like_git_merge_file() {
    let base = "line 1\nline 2\nline 3\nline 4\nline 5\n";
    let a = "line 1 (A)\nline 2\nline 3\nline 4\nline 5\n";
    let b = "line 1\nline 2\nline 3\nline 4\nline 5 (B)\nline 6\n";
    let out = merge_with(&BTreeMap::new(), "notes.txt", Some(base), a, b);
    assert_eq!(out.conflict, None);
    assert_eq!(text(&out), "line 1 (A)\nline 2\nline 3\nline 4\nline 5 (B)\nline 6\n");
    // The same change on both sides, next to a change of one side only.
    let a = "line 1\nline 2 (both)\nline 3\nline 4\nline 5\n";
    let b = "line 1\nline 2 (both)\nline 3\nline 4 (B)\nline 5\n";
    let out = merge_with(&BTreeMap::new(), "notes", Some(base), a, b);
    assert_eq!(text(&out), "line 1\nline 2 (both)\nline 3\nline 4 (B)\nline 5\n");
    // No final newline on one side; a deletion on the other.
    let out = merge_with(&BTreeMap::new(), "n.txt", Some(base), "line 1\nline 2\nline 3\nline 4\nline 5\nend", "line 2\nline 3\nline 4\nline 5\n");
    assert_eq!(text(&out), "line 2\nline 3\nline 4\nline 5\nend");
}

#[test]
fn text_changes_to_the_same_lines_conflict_and_nothing_is_lost() {
    let base = "alpha\nbeta\ngamma\n";
    let a = "alpha\nbeta from A\ngamma\n";
    let b = "alpha\nbeta from B\ngamma\n";
    let out = merge_with(&BTreeMap::new(), "notes.txt", Some(base), a, b);
    assert_eq!(text(&out), a, "the newer change stays in place, whole");
    let c = out.conflict.unwrap();
    assert_eq!(c.loser, b.as_bytes());
    assert!(c.fields.is_empty(), "the whole file");
    // Adjacent lines, insertions at the same place, and binary files conflict too.
    for (a, b) in [("ALPHA\nbeta\ngamma\n", "alpha\nBETA\ngamma\n"), ("alpha\nA\nbeta\ngamma\n", "alpha\nB\nbeta\ngamma\n")] {
        assert!(merge_with(&BTreeMap::new(), "t", Some(base), a, b).conflict.is_some(), "{a:?} {b:?}");
    }
    let out = merge_with(&BTreeMap::new(), "t.bin", Some("a\0\nb\nc\nd\n"), "A\0\nb\nc\nd\n", "a\0\nb\nc\nD\n");
    assert!(out.conflict.is_some());
    // Created on both sides with different text: no base, so it all overlaps.
    assert!(merge_with(&BTreeMap::new(), "t", None, "x\n", "y\n").conflict.is_some());
}

#[test]
fn min_keeps_the_smallest() {
    let base = "created_at: 2026-01-02T00:00:00Z\nn: 5\n";
    let a = "created_at: 2026-01-03T00:00:00Z\nn: 7\n";
    let b = "created_at: 2026-01-01T00:00:00Z\nn: 3\n";
    let mut rules = BTreeMap::new();
    rules.insert("created_at".to_string(), MergeRule::Min);
    rules.insert("n".to_string(), MergeRule::Min);
    let out = merge_with(&rules, "x.yml", Some(base), a, b);
    assert_eq!(out.conflict, None);
    assert_eq!(text(&out), b);
    // Both created it: the first creation time stays, whichever change is newer.
    let out = merge_with(&rules, "x.yml", None, b, a);
    assert_eq!(text(&out), b);
    // Only one side changed it: that change, even upwards.
    let out = merge_with(&rules, "x.yml", Some(base), a, base);
    assert_eq!(text(&out), a);
}

#[test]
fn union_of_maps_keeps_additions_and_honours_removals() {
    let base = "extensions:\n  keep: 1\n  drop: 1\n  both: {x: 1}\n";
    let a = "extensions:\n  keep: 1\n  both: {x: 1, y: 1}\n  from_a: 1\n";
    let b = "extensions:\n  keep: 1\n  drop: 1\n  both: {x: 1, z: 1}\n  from_b: [1]\n";
    let out = merge_with(&tbd_rules(), "x.yml", Some(base), a, b);
    assert_eq!(out.conflict, None);
    let v = parse_value(Format::Yaml, &text(&out)).unwrap();
    // `drop`: removed on A, untouched on B -> removed; `both` changed on both -> recursed.
    assert_eq!(v, json!({"extensions": {"keep": 1, "both": {"x": 1, "y": 1, "z": 1}, "from_a": 1, "from_b": [1]}}));
    // A key both sides set differently to scalars is in dispute.
    let out = merge_with(&tbd_rules(), "x.yml", Some(base), &a.replace("from_a", "k"), &b.replace("from_b: [1]", "k: 2"));
    assert_eq!(out.conflict.unwrap().fields, vec!["extensions.k"]);
}

const DEPS: &str = "dependencies:\n- type: blocks\n  target: is-1\n- type: blocks\n  target: is-2\n- type: blocks\n  target: is-3\n";

fn deps(out: &Outcome) -> Value {
    parse_value(Format::Yaml, &text(out)).unwrap()["dependencies"].clone()
}

#[test]
fn merge_by_matches_list_elements_by_their_key() {
    let rules = tbd_rules();
    // Added on both sides: both kept, each after the element before it on its side.
    let a = format!("{DEPS}- type: blocks\n  target: is-a\n");
    let b = format!("{DEPS}- type: related\n  target: is-b\n");
    let out = merge_with(&rules, "i.yml", Some(DEPS), &a, &b);
    assert_eq!(out.conflict, None);
    let targets: Vec<Value> = deps(&out).as_array().unwrap().iter().map(|d| d["target"].clone()).collect();
    assert_eq!(targets, vec![json!("is-1"), json!("is-2"), json!("is-3"), json!("is-b"), json!("is-a")]);
    // Removed on one side, untouched on the other: removed; changed on one side: the change.
    let a = DEPS.replace("- type: blocks\n  target: is-2\n", "");
    let b = DEPS.replace("type: blocks\n  target: is-3", "type: related\n  target: is-3");
    let out = merge_with(&rules, "i.yml", Some(DEPS), &a, &b);
    assert_eq!(out.conflict, None);
    assert_eq!(deps(&out), json!([{"type": "blocks", "target": "is-1"}, {"type": "related", "target": "is-3"}]));
    // Removed on one side, changed on the other: the edit wins, as for fields.
    let out = merge_with(&rules, "i.yml", Some(DEPS), &b, &DEPS.replace("- type: blocks\n  target: is-3\n", ""));
    assert_eq!(deps(&out)[2], json!({"type": "related", "target": "is-3"}));
}

#[test]
fn merge_by_changes_that_differ_on_both_sides_are_a_conflict_on_that_field() {
    let rules = tbd_rules();
    let a = DEPS.replace("type: blocks\n  target: is-2", "type: related\n  target: is-2");
    let b = DEPS.replace("type: blocks\n  target: is-2", "type: parent\n  target: is-2").replace("target: is-1\n", "target: is-1\n  note: b\n");
    let out = merge_with(&rules, "i.yml", Some(DEPS), &a, &b);
    let c = out.conflict.clone().unwrap();
    assert_eq!(c.fields, vec!["dependencies[target=is-2].type"]);
    // The newer value in place, and B's change of another element merged.
    assert_eq!(deps(&out)[0], json!({"type": "blocks", "target": "is-1", "note": "b"}));
    assert_eq!(deps(&out)[1], json!({"type": "related", "target": "is-2"}));
    // Elements that cannot be matched (no key, a duplicate key) make the whole field a dispute.
    let dup = format!("{DEPS}- type: other\n  target: is-1\n");
    let out = merge_with(&rules, "i.yml", Some(DEPS), &dup, &b);
    assert_eq!(out.conflict.unwrap().fields, vec!["dependencies"]);
    let out = merge_with(&rules, "i.yml", Some(DEPS), &format!("{DEPS}- just a string\n"), &b);
    assert_eq!(out.conflict.unwrap().fields, vec!["dependencies"]);
}

#[test]
fn immutable_fields_of_markdown_front_matter_are_found() {
    let rules = issue_rules();
    let p = Path::new("i.md");
    assert_eq!(immutable_changes(p, &rules, b"---\nid: 1\n---\nx\n", b"---\nid: 2\n---\nx\n"), vec!["id"]);
    assert!(immutable_changes(p, &rules, b"---\nid: 1\n---\nx\n", b"---\nid: 1\n---\ny\n").is_empty());
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0i64..5).prop_map(Value::from),
        "[a-c]{1,2}".prop_map(Value::from),
        prop::collection::vec("[a-d]", 0..4).prop_map(|v| json!(v)),
    ]
}

fn doc() -> impl Strategy<Value = BTreeMap<String, Value>> {
    prop::collection::btree_map(
        prop_oneof![Just("id"), Just("title"), Just("labels"), Just("updated_at"), Just("owner"), Just("x")]
            .prop_map(String::from),
        scalar(),
        0..6,
    )
}

fn write(format: Format, doc: &BTreeMap<String, Value>) -> String {
    let value = Value::Object(doc.clone().into_iter().collect());
    match format {
        Format::Yaml => yaml_serde::to_string(&value).unwrap(),
        Format::Json => serde_json::to_string_pretty(&value).unwrap() + "\n",
        Format::Toml => {
            let mut t = toml_edit::DocumentMut::new();
            for (k, v) in doc {
                t.insert(k, toml_edit::Item::Value(render_toml(v)));
            }
            t.to_string()
        }
    }
}

fn render_toml(v: &Value) -> toml_edit::Value {
    match v {
        Value::Number(n) => n.as_i64().unwrap().into(),
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => {
            let mut arr = toml_edit::Array::new();
            for x in a {
                arr.push(render_toml(x));
            }
            toml_edit::Value::Array(arr)
        }
        _ => unreachable!(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn merging_is_symmetric(
        base in doc(),
        a in doc(),
        b in doc(),
        which in 0usize..3,
        ta in 0u64..3,
        tb in 0u64..3,
    ) {
        let format = [Format::Yaml, Format::Json, Format::Toml][which];
        let path = Path::new(["d.yml", "d.json", "d.toml"][which]);
        let (base, a, b) = (write(format, &base), write(format, &a), write(format, &b));
        let (sa, sb) = (stamp(ta, "a"), stamp(tb, "b"));
        let side_a = Side { content: Some(a.as_bytes()), stamp: &sa, commit: "ca" };
        let side_b = Side { content: Some(b.as_bytes()), stamp: &sb, commit: "cb" };
        let ab = merge_file(path, Consistency::Merge, &issue_rules(), Some(base.as_bytes()), side_a, side_b);
        let ba = merge_file(path, Consistency::Merge, &issue_rules(), Some(base.as_bytes()), side_b, side_a);
        prop_assert_eq!(&ab, &ba);
        // The result is a valid document of the same format.
        let merged = String::from_utf8(ab.content.clone().unwrap()).unwrap();
        prop_assert!(parse_value(format, &merged).is_ok(), "{}", merged);
    }
}

// Bad input (issue 10, fault suite 6): whatever two nodes wrote, the merge decides without
// panicking, the same way on both, and a side it cannot read is a conflict.

/// Nested values of every JSON kind, with keys and strings that stress the writers.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        "(?s).{0,8}".prop_map(Value::from),
        prop::sample::select(vec!["", "~", "null", "true", "1e3", "0x1F", "- x", "a: b", "#", "'\"", "\n", "2026-01-01"])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_ .#:\"-]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn any_doc() -> impl Strategy<Value = BTreeMap<String, Value>> {
    prop::collection::btree_map(
        prop_oneof![
            3 => prop_oneof![
                Just("id"), Just("title"), Just("labels"), Just("updated_at"), Just("owner"),
                Just("created_at"), Just("extensions"), Just("dependencies"),
            ].prop_map(String::from),
            1 => "[a-z_ .#:\"-]{1,4}",
        ],
        any_value(),
        0..5,
    )
}

/// A document as a person might write it, or not: well-formed in its format, the same with a
/// few bytes spliced in or cut out, or arbitrary bytes.
fn any_text(format: Format) -> impl Strategy<Value = Vec<u8>> {
    let shards = prop::sample::select(vec![
        "{", "}", "[", "]", ":", ",", "\"", "'", "=", "\n", "\t", "- ", "&a ", "*a", "#", "---\n", "[[t]]\n", "\\", "\u{0}", "é",
        "\u{feff}",
    ]);
    prop_oneof![
        3 => any_doc().prop_map(move |d| write_any(format, &d).into_bytes()),
        2 => (any_doc(), prop::collection::vec((any::<prop::sample::Index>(), 0usize..3, shards), 1..4)).prop_map(move |(d, edits)| {
            let mut bytes = write_any(format, &d).into_bytes();
            for (at, cut, shard) in edits {
                let i = at.index(bytes.len() + 1);
                let end = (i + cut).min(bytes.len());
                bytes.splice(i..end, shard.bytes());
            }
            bytes
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// Writes any value tree in `format` (TOML has no null: written as an empty string, as the
/// merge itself does).
fn write_any(format: Format, doc: &BTreeMap<String, Value>) -> String {
    let value = Value::Object(doc.clone().into_iter().collect());
    match format {
        Format::Yaml => yaml_serde::to_string(&value).unwrap(),
        Format::Json => serde_json::to_string_pretty(&value).unwrap() + "\n",
        Format::Toml => {
            let mut t = toml_edit::DocumentMut::new();
            for (k, v) in doc {
                t.insert(k, toml_edit::Item::Value(toml_any(v)));
            }
            t.to_string()
        }
    }
}

fn toml_any(v: &Value) -> toml_edit::Value {
    match v {
        Value::Null => "".into(),
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => n.as_i64().map(toml_edit::Value::from).unwrap_or_else(|| n.as_f64().unwrap().into()),
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => toml_edit::Value::Array(a.iter().map(toml_any).collect()),
        Value::Object(m) => {
            let mut t = toml_edit::InlineTable::new();
            for (k, v) in m {
                t.insert(k, toml_any(v));
            }
            toml_edit::Value::InlineTable(t)
        }
    }
}

fn parses(format: Format, bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|t| render::parse(format, t).is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn any_three_documents_merge_symmetrically_without_panicking(
        texts in (0usize..3).prop_flat_map(|w| {
            let f = [Format::Yaml, Format::Json, Format::Toml][w];
            (Just(w), prop::option::of(any_text(f)), prop::option::of(any_text(f)), prop::option::of(any_text(f)))
        }),
        ta in 0u64..3,
        tb in 0u64..3,
    ) {
        let (w, base, a, b) = texts;
        let format = [Format::Yaml, Format::Json, Format::Toml][w];
        let path = Path::new(["d.yml", "d.json", "d.toml"][w]);
        let (sa, sb) = (stamp(ta, "a"), stamp(tb, "b"));
        let side_a = Side { content: a.as_deref(), stamp: &sa, commit: "ca" };
        let side_b = Side { content: b.as_deref(), stamp: &sb, commit: "cb" };
        for rules in [issue_rules(), tbd_rules(), BTreeMap::new()] {
            let ab = merge_file(path, Consistency::Merge, &rules, base.as_deref(), side_a, side_b);
            let ba = merge_file(path, Consistency::Merge, &rules, base.as_deref(), side_b, side_a);
            prop_assert_eq!(&ab, &ba);
            let lww = merge_file(path, Consistency::Lww, &rules, base.as_deref(), side_a, side_b);
            prop_assert_eq!(lww.conflict, None, "lww paths never conflict");
            // Both changed it, both kept it, differently, and one side cannot be read: that is a
            // conflict with the newer in place, never a silent pick.
            let changed = |s: &Option<Vec<u8>>| s.is_some() && s != &base;
            let readable = |s: &Option<Vec<u8>>| s.as_deref().is_none_or(|t| parses(format, t));
            if changed(&a) && changed(&b) && a != b && (!readable(&a) || !readable(&b) || !readable(&base)) {
                let newer = if (ta, "ca") >= (tb, "cb") { &a } else { &b };
                let c = ab.conflict.as_ref();
                prop_assert!(c.is_some_and(|c| c.fields.is_empty()), "{:?}", ab);
                prop_assert_eq!(&ab.content, newer);
            }
            // A merge of readable documents is readable.
            if let (Some(out), None) = (&ab.content, &ab.conflict) {
                if readable(&a) && readable(&b) && readable(&base) && a.is_some() && b.is_some() {
                    prop_assert!(parses(format, out), "{}", String::from_utf8_lossy(out));
                }
            }
        }
        // Neither helper that reads documents at write time panics either.
        if let (Some(a), Some(b)) = (&a, &b) {
            let _ = immutable_changes(path, &issue_rules(), a, b);
        }
        if let Some(t) = a.as_deref().and_then(|t| std::str::from_utf8(t).ok()) {
            let _ = parse_value(format, t);
        }
    }
}

/// A Markdown file as tools write it: front matter (sometimes) and a few body lines, some
/// shared between versions so that merges find common lines.
fn any_markdown() -> impl Strategy<Value = Vec<u8>> {
    let line = prop::sample::select(vec!["# T\n", "a\n", "b\n", "c\n", "\n", "- x\n", "---\n", "d", "é\n"]);
    (prop::option::of(any_doc()), prop::collection::vec(line, 0..8), any::<bool>()).prop_map(|(fm, body, bytes)| {
        let mut out = match fm {
            Some(d) => format!("---\n{}---\n", write_any(Format::Yaml, &d)),
            None => String::new(),
        };
        out.extend(body);
        let mut out = out.into_bytes();
        if bytes {
            out.push(0xff);
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn markdown_and_text_merge_symmetrically_without_panicking(
        base in prop::option::of(any_markdown()),
        a in prop::option::of(any_markdown()),
        b in prop::option::of(any_markdown()),
        ta in 0u64..3,
        tb in 0u64..3,
        md: bool,
    ) {
        let path = Path::new(if md { "i.md" } else { "i.txt" });
        let (sa, sb) = (stamp(ta, "a"), stamp(tb, "b"));
        let side_a = Side { content: a.as_deref(), stamp: &sa, commit: "ca" };
        let side_b = Side { content: b.as_deref(), stamp: &sb, commit: "cb" };
        let ab = merge_file(path, Consistency::Merge, &tbd_rules(), base.as_deref(), side_a, side_b);
        let ba = merge_file(path, Consistency::Merge, &tbd_rules(), base.as_deref(), side_b, side_a);
        prop_assert_eq!(&ab, &ba);
        // A conflict keeps the losing version whole: nothing is lost.
        if let Some(c) = &ab.conflict {
            prop_assert!(Some(c.loser.as_slice()) == a.as_deref() || Some(c.loser.as_slice()) == b.as_deref());
        }
    }
}

/// A `dependencies` list: some of six targets, in some order, each once.
fn dependency_list() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::subsequence((0..6).collect::<Vec<u8>>(), 0..=6).prop_shuffle()
}

fn dependencies_doc(targets: &[u8]) -> String {
    let mut out = String::from("id: 1\ndependencies:\n");
    for t in targets {
        out.push_str(&format!("- type: blocks\n  target: is-{t}\n"));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn merge_by_keeps_additions_and_removals_of_either_side(
        base in dependency_list(),
        a in dependency_list(),
        b in dependency_list(),
    ) {
        let (bt, at, btt) = (dependencies_doc(&base), dependencies_doc(&a), dependencies_doc(&b));
        let out = merge_with(&tbd_rules(), "i.yml", Some(&bt), &at, &btt);
        prop_assert_eq!(&out.conflict, &None);
        let merged = parse_value(Format::Yaml, &text(&out)).unwrap();
        let mut got: Vec<String> = merged["dependencies"].as_array().cloned().unwrap_or_default()
            .iter().map(|d| d["target"].as_str().unwrap().to_string()).collect();
        got.sort();
        // (A∩B) ∪ (A∖Base) ∪ (B∖Base), as for union.
        let mut want: Vec<String> = (0..6u8)
            .filter(|t| (a.contains(t) && b.contains(t)) || (!base.contains(t) && (a.contains(t) || b.contains(t))))
            .map(|t| format!("is-{t}"))
            .collect();
        want.sort();
        prop_assert_eq!(got, want);
    }
}
