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
fn unstructured_and_unparseable_files_conflict_and_lww_paths_take_the_newer() {
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
fn immutable_changes_are_found() {
    let rules = issue_rules();
    let p = Path::new("i.yml");
    assert_eq!(immutable_changes(p, &rules, b"id: 1\ntitle: a\n", b"id: 2\ntitle: a\n"), vec!["id"]);
    assert_eq!(immutable_changes(p, &rules, b"id: 1\n", b"title: a\n"), vec!["id"]);
    assert!(immutable_changes(p, &rules, b"id: 1\ntitle: a\n", b"id: 1\ntitle: b\n").is_empty());
    assert!(immutable_changes(p, &rules, b"title: a\n", b"id: 5\n").is_empty(), "setting it the first time is fine");
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
