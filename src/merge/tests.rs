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
            3 => prop_oneof![Just("id"), Just("title"), Just("labels"), Just("updated_at"), Just("owner")].prop_map(String::from),
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
        for rules in [issue_rules(), BTreeMap::new()] {
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
