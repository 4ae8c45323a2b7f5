//! Table-driven tests of parsing, validation and matching.

use std::path::Path;
use std::time::Duration;

use super::*;

const SEED: &str = r#"
policies:
  - pattern: "durable/issues/*.yml"
    tier: git
    consistency: merge
    merge_rules: { id: immutable, title: lww, labels: union, updated_at: max }
  - pattern: "durable/**"
    tier: git
    consistency: merge
  - pattern: "fast/claims/**"
    tier: nats-kv
    consistency: cas-create
    ttl: 300
    ephemeral: true
  - pattern: "fast/status/**"
    tier: nats-kv
    consistency: lww
    ttl: 30
  - pattern: "fast/messages/**"
    tier: nats-stream
    consistency: append
    retention:
      max_age_days: 30
  - pattern: "blobs/**"
    tier: object-store
    consistency: content-addressed
  - pattern: "scratch/**"
    tier: local
"#;

fn table(text: &str) -> PolicyTable {
    PolicyTable::parse(text, Path::new("policies.yml")).unwrap()
}

fn error(text: &str) -> PolicyError {
    PolicyTable::parse(text, Path::new("policies.yml")).unwrap_err()
}

#[test]
fn first_match_wins() {
    let t = table(SEED);
    let cases: &[(&str, &str, TierKind, Consistency)] = &[
        ("durable/issues/1.yml", "durable/issues/*.yml", TierKind::Git, Consistency::Merge),
        // `*` does not cross directories, so this falls to the next rule.
        ("durable/issues/old/1.yml", "durable/**", TierKind::Git, Consistency::Merge),
        ("durable/readme.md", "durable/**", TierKind::Git, Consistency::Merge),
        ("fast/claims/x", "fast/claims/**", TierKind::NatsKv, Consistency::CasCreate),
        ("fast/claims/a/b c", "fast/claims/**", TierKind::NatsKv, Consistency::CasCreate),
        ("fast/status/n1", "fast/status/**", TierKind::NatsKv, Consistency::Lww),
        ("fast/messages/t1.log", "fast/messages/**", TierKind::NatsStream, Consistency::Append),
        ("blobs/big.bin", "blobs/**", TierKind::ObjectStore, Consistency::ContentAddressed),
        ("scratch/x", "scratch/**", TierKind::Local, Consistency::None),
        // Temp files are local before any rule, in every directory.
        ("durable/issues/1.yml.swp", TEMP, TierKind::Local, Consistency::None),
        ("durable/x~", TEMP, TierKind::Local, Consistency::None),
        ("fast/claims/.#lock", TEMP, TierKind::Local, Consistency::None),
        ("x.tmp", TEMP, TierKind::Local, Consistency::None),
        // Anything else goes to the catch-all.
        ("notes.txt", "**", CATCH_ALL.0, CATCH_ALL.1),
        ("", "**", CATCH_ALL.0, CATCH_ALL.1),
        ("durable", "**", CATCH_ALL.0, CATCH_ALL.1),
    ];
    for (path, pattern, tier, consistency) in cases {
        let p = t.resolve(path);
        assert_eq!((&p.pattern[..], p.tier, p.consistency), (*pattern, *tier, *consistency), "{path}");
    }
}

#[test]
fn seed_values_are_kept() {
    let t = table(SEED);
    let claims = t.resolve("fast/claims/x");
    assert_eq!(claims.ttl, Some(Duration::from_secs(300)));
    assert!(claims.ephemeral);
    assert_eq!(claims.origin, Origin::File { line: 10 });
    let issues = t.resolve("durable/issues/1.yml");
    assert_eq!(issues.merge_rules.get("labels"), Some(&MergeRule::Union));
    assert_eq!(issues.merge_rules.len(), 4);
    let messages = t.resolve("fast/messages/t");
    assert_eq!(messages.max_age, Some(Duration::from_secs(30 * 86_400)));
    // Consistency defaults per tier.
    assert_eq!(t.resolve("scratch/x").consistency, Consistency::None);
}

#[test]
fn min_union_and_merge_by_parse_in_flow_and_block_style() {
    let flow = "policies:\n  - pattern: \"issues/*.md\"\n    tier: git\n    consistency: merge\n    merge_rules: { created_at: min, labels: union, dependencies: { merge_by: target } }\n";
    let block = "policies:\n  - pattern: \"issues/*.md\"\n    tier: git\n    consistency: merge\n    merge_rules:\n      created_at: min\n      labels: union\n      dependencies:\n        merge_by: target\n";
    for text in [flow, block] {
        let t = table(text);
        let rules = &t.resolve("issues/a.md").merge_rules;
        assert_eq!(rules.get("created_at"), Some(&MergeRule::Min), "{text}");
        assert_eq!(rules.get("labels"), Some(&MergeRule::Union), "{text}");
        assert_eq!(rules.get("dependencies"), Some(&MergeRule::MergeBy("target".into())), "{text}");
    }
    // `name()` writes what the file says, so `policy explain` output pastes back into a table.
    assert_eq!(MergeRule::MergeBy("target".into()).name(), "{ merge_by: target }");
    assert_eq!(MergeRule::MergeBy("a b".into()).to_string(), "{ merge_by: \"a b\" }");
    assert_eq!(MergeRule::from_name("min"), Some(MergeRule::Min));
    assert_eq!(MergeRule::from_name("merge_by"), None, "merge_by needs its field");
}

/// The built-in temp rule's pattern, as `policy explain` shows it.
const TEMP: &str = "*.swp | *.swo | *.swx | 4913 | *~ | .#* | #*# | *.tmp | *.tmp-* | *.part | sedXXXXXX | tmpXXXXXXXX | .NAME.XXXXXX | *.crdownload";

#[test]
fn temp_names_of_the_common_idioms_stay_local() {
    let t = table(SEED);
    let temp = [
        "durable/ids.yml.tmp-1733140000123a1b2c3", // atomically (tbd), write-file-atomic
        "durable/.x.yml.swp",                      // vim
        "durable/.x.yml.swo",
        "durable/4913",                            // vim's write test
        "durable/.x.yml.Ab3xQz",                   // rsync
        "durable/.x.yml.Q9w8e7",
        "durable/sedA1b2C3",                       // sed -i
        "durable/sedqWerty",
        "durable/tmpk3j_9x2a",                     // Python tempfile
        "durable/big.iso.part",                    // downloads
        "durable/#notes.md#",                      // emacs autosave
        "durable/x.yml.tmp",
        "durable/x.crdownload",
    ];
    for path in temp {
        assert_eq!(t.resolve(path).tier, TierKind::Local, "{path} is a temp file");
    }
    let real = [
        "durable/.env.sample", // a dotfile: no digit or capital in its extension
        "durable/.gitignore",
        "durable/tmp",
        "durable/tmpfile.yml",
        "durable/tmp-notes.md",
        "durable/x.tmpl",
        "durable/.tmp-notes",
        "durable/49130",
        "durable/ids.yml",
        "durable/movie.swf",
        "durable/sedentary",
        "durable/seduction",
        "durable/tmpl_header",
        "durable/.babelrc.node14",
        "durable/.x.yml.q9w8e7",
    ];
    for path in real {
        assert_eq!(t.resolve(path).tier, TierKind::Git, "{path} is not a temp file");
    }
}

#[test]
fn temp_rule_can_be_replaced_by_a_list_of_globs() {
    let t = table("local_temp_files: [\"*.bak\", \"~$*\"]\npolicies:\n  - pattern: \"a/**\"\n    tier: git\n");
    assert_eq!(t.resolve("a/x.bak").tier, TierKind::Local);
    assert_eq!(t.resolve("a/b/~$report.docx").tier, TierKind::Local);
    assert_eq!(t.resolve("a/x.swp").tier, TierKind::Git, "the list replaces the built-in one");
    let err = PolicyTable::parse("local_temp_files: [\"a/*.bak\"]\npolicies: []\n", Path::new("p.yml")).unwrap_err();
    assert_eq!((err.line, err.col), (1, 20));
    assert!(err.reason.contains("cannot contain `/`"), "{}", err.reason);
    let err = PolicyTable::parse("local_temp_files: maybe\npolicies: []\n", Path::new("p.yml")).unwrap_err();
    assert!(err.reason.contains("true, false, or a list"), "{}", err.reason);
}

#[test]
fn temp_rule_can_be_turned_off() {
    let t = table("local_temp_files: false\npolicies:\n  - pattern: \"a/**\"\n    tier: local\n");
    assert_eq!(t.resolve("a/x.swp").pattern, "a/**");
    assert_eq!(t.resolve("x.swp").origin, Origin::Builtin("catch-all"));
}

#[test]
fn errors_name_line_and_reason() {
    let cases: &[(&str, usize, &str)] = &[
        ("policies:\n  - pattern: x\n    tier: gti\n", 3, "unknown tier `gti`"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: cas-create\n", 4, "tier git cannot serve consistency cas-create"),
        ("policies:\n  - pattern: x\n    tier: nats-kv\n    consistency: merge\n", 4, "tier nats-kv cannot serve consistency merge"),
        ("policies:\n  - pattern: x\n    tier: local\n    consistency: lww\n", 4, "tier local cannot serve consistency lww"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: sometimes\n", 4, "unknown consistency `sometimes`"),
        ("policies:\n  - tier: git\n", 2, "policy without a `pattern`"),
        ("policies:\n  - pattern: x\n", 2, "policy without a `tier`"),
        ("policies:\n  - pattern: \"a/[b\"\n    tier: git\n", 2, "invalid pattern `a/[b`"),
        ("policies:\n  - pattern: /abs/**\n    tier: git\n", 2, "is absolute"),
        ("policies:\n  - pattern: a/../b\n    tier: git\n", 2, "contains `..`"),
        ("policies:\n  - pattern: x\n    tier: git\n    ttl: 30\n", 4, "`ttl` applies to nats-kv paths"),
        ("policies:\n  - pattern: x\n    tier: nats-kv\n    ttl: 0\n", 4, "greater than 0"),
        ("policies:\n  - pattern: x\n    tier: nats-kv\n    ttl: soon\n", 4, "greater than 0"),
        ("policies:\n  - pattern: x\n    tier: nats-kv\n    ephemeral: true\n", 4, "needs tier nats-kv and a `ttl`"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: lww\n    merge_rules: {a: union}\n", 5, "needs `consistency: merge`"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules: {a: biggest}\n", 5, "unknown merge rule `biggest`"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules:\n      deps: merge_by\n", 6, "`merge_by` names its key field"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules: {deps: {merge_by: }}\n", 5, "needs the name of the field"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules:\n      deps:\n        merge_by: [a, b]\n", 7, "needs the name of the field"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules:\n      deps: {}\n", 6, "empty mapping"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules:\n      deps: {merge_by: target, order: asc}\n", 6, "unknown key `order` in the merge rule of field `deps`"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules:\n      deps: {merge_on: target}\n", 6, "unknown key `merge_on`"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules:\n      labels: [union]\n", 6, "must be one of immutable, lww, union, max, min"),
        ("policies:\n  - pattern: x\n    tier: git\n    consistency: merge\n    merge_rules:\n      created_at: minimum\n", 6, "unknown merge rule `minimum` for field `created_at`"),
        ("policies:\n  - pattern: x\n    tier: git\n    retention: {max_age_days: 3}\n", 4, "`retention` applies to nats-stream"),
        ("policies:\n  - pattern: x\n    tier: nats-stream\n    retention: {max_days: 3}\n", 4, "unknown key `max_days`"),
        ("policies:\n  - pattern: x\n    tier: git\n    schema: ../etc/passwd\n", 4, "inside the sync root"),
        ("policies:\n  - pattern: x\n    tier: git\n    consitency: merge\n", 4, "unknown key `consitency`"),
        ("policies:\n  - pattern: x\n    tier: git\n    tier: local\n", 4, "duplicate key `tier`"),
        ("polices: []\n", 1, "unknown key `polices`"),
        ("local_temp_files: true\n", 1, "missing `policies:` list"),
        ("policies: {}\n", 1, "`policies` must be a list"),
        ("policies:\n  - just a string\n", 2, "each policy must be a mapping"),
        ("", 1, "the file is empty"),
        ("policies:\n  - pattern: [unclosed\n", 3, "invalid YAML"),
    ];
    for (text, line, reason) in cases {
        let e = error(text);
        assert_eq!(e.line, *line, "{text:?} -> {e}");
        assert!(e.reason.contains(reason), "{text:?} -> {e}");
        assert!(e.to_string().starts_with(&format!("policies.yml:{line}:")), "{e}");
    }
}

#[test]
fn stream_and_blob_keys_belong_to_their_tiers() {
    let t = table("policies:\n  - pattern: \"log/**\"\n    tier: nats-stream\n    purge: true\n  - pattern: \"audit/**\"\n    tier: nats-stream\n");
    assert!(t.resolve("log/x").purge);
    assert!(!t.resolve("audit/x").purge, "purging is off unless the policy says so");
    assert_eq!(t.resolve("audit/x").consistency, Consistency::Append);
    let cases: &[(&str, usize, &str)] = &[
        ("policies:\n  - pattern: x\n    tier: git\n    purge: true\n", 4, "`purge` applies to nats-stream paths, not git"),
        ("policies:\n  - pattern: x\n    tier: nats-stream\n    purge: maybe\n", 4, "`purge` must be true or false"),
        ("policies:\n  - pattern: x\n    tier: object-store\n    schema: s.json\n", 4, "`schema` applies to git, nats-kv and local paths, not object-store"),
        ("policies:\n  - pattern: x\n    tier: nats-stream\n    schema: s.json\n", 4, "not nats-stream"),
        ("policies:\n  - pattern: x\n    tier: object-store\n    consistency: lww\n", 4, "tier object-store cannot serve consistency lww"),
    ];
    for (text, line, reason) in cases {
        let e = error(text);
        assert_eq!(e.line, *line, "{text:?} -> {e}");
        assert!(e.reason.contains(reason), "{text:?} -> {e}");
    }
}

#[test]
fn default_table_has_every_tier() {
    let t = PolicyTable::default_table();
    for tier in TierKind::ALL {
        assert!(t.policies().iter().any(|p| p.tier == tier), "{tier} missing from the default table");
    }
    let messages = t.resolve("fast/messages/t1.log");
    assert_eq!((messages.tier, messages.consistency), (TierKind::NatsStream, Consistency::Append));
    assert_eq!(messages.max_age, Some(Duration::from_secs(30 * 86_400)));
    let blob = t.resolve("blobs/transcripts/a.bin");
    assert_eq!((blob.tier, blob.consistency), (TierKind::ObjectStore, Consistency::ContentAddressed));
    assert_eq!(t.resolve("anything/at/all").tier, TierKind::Git);
    assert_eq!(t.resolve("anything/at/all").consistency, Consistency::Lww);
    let issue = t.resolve("durable/issues/1.yml");
    assert_eq!((issue.tier, issue.consistency), (TierKind::Git, Consistency::Merge));
    assert_eq!(issue.merge_rules.get("labels"), Some(&MergeRule::Union));
    assert_eq!(t.resolve(".syncfs/policies.yml").consistency, Consistency::Lww);
    assert_eq!(t.resolve("fast/claims/x").tier, TierKind::NatsKv);
}

#[test]
fn every_pairing_is_decided() {
    // Each tier serves at least its default consistency, and exactly the SPEC's rows.
    for tier in TierKind::ALL {
        assert!(tier.supports(tier.default_consistency()), "{tier}");
    }
    let served: usize = TierKind::ALL
        .iter()
        .map(|t| Consistency::ALL.iter().filter(|c| t.supports(**c)).count())
        .sum();
    assert_eq!(served, 8);
}

#[test]
fn check_file_takes_what_a_write_takes_and_says_where() {
    assert!(PolicyTable::check_file(DEFAULT_POLICY_FILE.as_bytes()).is_ok());
    for (bytes, reason) in [
        (&b"policies: [oops\n"[..], "line 2"),
        (b"", "line"),
        (b"policies:\n  - pattern: x\n    tier: gti\n", "unknown tier `gti`"),
        (b"\xff\xfe", "not UTF-8"),
    ] {
        let e = PolicyTable::check_file(bytes).unwrap_err();
        assert!(e.contains(reason), "{bytes:?}: {e}");
    }
}

// Bad input (issue 10, fault suite 6): the table arrives from every node and the remote, so no
// text may crash a parse, and every refusal must point into the text.

use proptest::prelude::*;

/// One rule of a generated table, as the file would say it.
#[derive(Debug, Clone)]
struct Spec {
    pattern: String,
    tier: TierKind,
    consistency: Option<Consistency>,
    ttl: Option<u64>,
    ephemeral: Option<bool>,
    merge_rules: Vec<(String, MergeRule)>,
    schema: Option<String>,
    max_age_days: Option<u64>,
    purge: Option<bool>,
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_][a-z0-9_.-]{0,5}",
        Just("*".to_string()),
        Just("**".to_string()),
        Just("*.yml".to_string()),
        Just("{a,b}".to_string()),
        Just("x[0-9]".to_string()),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    let rule = prop_oneof![
        Just(MergeRule::Immutable),
        Just(MergeRule::Lww),
        Just(MergeRule::Union),
        Just(MergeRule::Max),
        Just(MergeRule::Min),
        // Plain names, and names YAML would misread unquoted (`name()` quotes them).
        prop_oneof!["[a-z_]{1,8}", "[a-z :#,{}\\[\\]'\"-]{1,6}"].prop_map(MergeRule::MergeBy),
    ];
    (
        prop::collection::vec(segment(), 1..4),
        prop::sample::select(TierKind::ALL.to_vec()),
        any::<bool>(),
        0usize..8,
        any::<(bool, bool, bool)>(),
        1u64..1_000_000,
        prop::collection::btree_map("[a-z_]{1,8}".prop_filter("YAML's null", |f| f != "null"), rule, 0..4),
        "[a-z]{1,6}/[a-z]{1,6}\\.json",
    )
        .prop_map(|(segments, tier, name_it, pick, (with_ttl, with_extra, flag), n, rules, schema)| {
            let served: Vec<Consistency> = Consistency::ALL.into_iter().filter(|c| tier.supports(*c)).collect();
            let consistency = served[pick % served.len()];
            let mut s = Spec {
                pattern: segments.join("/"),
                tier,
                consistency: (name_it || consistency != tier.default_consistency()).then_some(consistency),
                ttl: None,
                ephemeral: None,
                merge_rules: Vec::new(),
                schema: None,
                max_age_days: None,
                purge: None,
            };
            match tier {
                TierKind::NatsKv => {
                    s.ttl = with_ttl.then_some(n);
                    s.ephemeral = (with_extra && (s.ttl.is_some() || !flag)).then_some(flag);
                }
                TierKind::NatsStream => {
                    s.max_age_days = with_ttl.then_some(n % 3650 + 1);
                    s.purge = with_extra.then_some(flag);
                }
                _ => {}
            }
            if consistency == Consistency::Merge {
                s.merge_rules = rules.into_iter().collect();
            }
            if matches!(tier, TierKind::Git | TierKind::NatsKv | TierKind::Local) && with_extra {
                s.schema = Some(schema);
            }
            s
        })
}

/// Writes a table in one of the styles people use: block mappings, or a flow mapping per rule.
fn render_table(specs: &[Spec], temp: Option<bool>, flow: bool) -> String {
    let mut out = String::from("# generated\n");
    if let Some(on) = temp {
        out.push_str(&format!("local_temp_files: {on}\n"));
    }
    out.push_str("policies:\n");
    for s in specs {
        let mut fields = vec![format!("pattern: {}", serde_json::to_string(&s.pattern).unwrap()), format!("tier: {}", s.tier)];
        if let Some(c) = s.consistency {
            fields.push(format!("consistency: {c}"));
        }
        if let Some(t) = s.ttl {
            fields.push(format!("ttl: {t}"));
        }
        if let Some(e) = s.ephemeral {
            fields.push(format!("ephemeral: {e}"));
        }
        if !s.merge_rules.is_empty() {
            let rules: Vec<String> = s.merge_rules.iter().map(|(f, r)| format!("{f}: {}", r.name())).collect();
            fields.push(format!("merge_rules: {{ {} }}", rules.join(", ")));
        }
        if let Some(p) = &s.schema {
            fields.push(format!("schema: '{p}'"));
        }
        if let Some(d) = s.max_age_days {
            fields.push(format!("retention: {{ max_age_days: {d} }}"));
        }
        if let Some(p) = s.purge {
            fields.push(format!("purge: {p}"));
        }
        if flow {
            out.push_str(&format!("  - {{ {} }}\n", fields.join(", ")));
        } else {
            out.push_str(&format!("  - {}\n", fields.join("\n    ")));
        }
    }
    out
}

/// Where a 1-based (line, col) points: inside the text, or just past the end of a line. Lines
/// are YAML's: `\r\n`, `\r` and `\n` each end one.
fn within(text: &str, line: usize, col: usize) -> bool {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<&str> = text.split('\n').collect();
    line >= 1 && col >= 1 && line <= lines.len() && col <= lines[line - 1].chars().count() + 1
}

/// Pieces of YAML syntax (and of what breaks it) to splice into valid tables.
const SHARDS: &[&str] = &[
    ":", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "*b", "&a [1, 2]", "\"", "'", "\\", "\t", "\n", "\n  ", "#",
    "---\n", "...\n", "? ", "!!str ", "!!map ", "%YAML 1.2\n", "|\n", ">-\n", "é", "\u{feff}", "\0", "\r",
    "policies:", "pattern: ", "tier: nats-kv", "ttl: -1", "ttl: 99999999999999999999999", "consistency: ",
    "merge_rules: {a: union}", "<<: *a", "~", "null", "0x10", "1e9", "\u{2028}",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_valid_table_round_trips(specs in prop::collection::vec(spec(), 0..6), temp in prop::option::of(any::<bool>()), flow: bool) {
        let text = render_table(&specs, temp, flow);
        let t = PolicyTable::parse(&text, Path::new("p.yml")).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(t.source(), text.as_str());
        let file: Vec<&Arc<Policy>> = t.policies().iter().filter(|p| matches!(p.origin, Origin::File { .. })).collect();
        prop_assert_eq!(file.len(), specs.len());
        for (p, s) in file.iter().zip(&specs) {
            prop_assert_eq!(&p.pattern, &s.pattern);
            prop_assert_eq!(p.tier, s.tier);
            prop_assert_eq!(p.consistency, s.consistency.unwrap_or(s.tier.default_consistency()));
            prop_assert_eq!(p.ttl, s.ttl.map(Duration::from_secs));
            prop_assert_eq!(p.ephemeral, s.ephemeral.unwrap_or(false));
            prop_assert_eq!(p.merge_rules.iter().map(|(f, r)| (f.clone(), r.clone())).collect::<Vec<_>>(), s.merge_rules.clone());
            prop_assert_eq!(&p.schema, &s.schema);
            prop_assert_eq!(p.max_age, s.max_age_days.map(|d| Duration::from_secs(d * 86_400)));
            prop_assert_eq!(p.purge, s.purge.unwrap_or(false));
            prop_assert!(!p.read_only);
            prop_assert!(within(&text, p.positions.tier.0, p.positions.tier.1));
        }
        // What a node installs from the remote is what it parsed itself.
        let again = PolicyTable::check_file(t.source().as_bytes()).map_err(TestCaseError::fail)?;
        prop_assert_eq!(again.policies(), t.policies());
        // The table still resolves every path, and the history view stays syncfs's own.
        prop_assert!(t.resolve(".syncfs/history/x").read_only);
        let _ = t.resolve("a/b/c.yml");
    }

    #[test]
    fn broken_tables_are_refused_at_a_place_inside_the_text(
        specs in prop::collection::vec(spec(), 1..4),
        flow: bool,
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..4, prop::sample::select(SHARDS)), 1..5),
    ) {
        let mut text = render_table(&specs, None, flow);
        for (at, cut, shard) in edits {
            let chars: Vec<char> = text.chars().collect();
            let i = at.index(chars.len() + 1);
            let end = (i + cut).min(chars.len());
            text = chars[..i].iter().chain(shard.chars().collect::<Vec<_>>().iter()).chain(&chars[end..]).collect();
        }
        if let Err(e) = PolicyTable::parse(&text, Path::new("p.yml")) {
            prop_assert!(within(&text, e.line, e.col), "{} is outside the text:\n{}", e, text);
            prop_assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn arbitrary_text_never_panics_and_errors_point_inside_it(text in "(?s).{0,200}") {
        if let Err(e) = PolicyTable::parse(&text, Path::new("p.yml")) {
            prop_assert!(within(&text, e.line, e.col), "{} is outside {:?}", e, text);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = PolicyTable::check_file(&bytes) {
            prop_assert!(!e.is_empty());
        }
    }
}

#[test]
fn nested_aliases_are_refused_rather_than_expanded() {
    // Ten levels of ten aliases each would expand to 10^10 nodes (a "billion laughs"): a table
    // pushed to the remote would take every node's memory. It must be refused, at a place.
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        text.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
    }
    text.push_str("policies: []\n");
    let e = PolicyTable::parse(&text, Path::new("p.yml")).unwrap_err();
    assert!(e.reason.contains("alias"), "{e}");
    assert!(within(&text, e.line, e.col), "{e}");
}

#[test]
fn deeply_nested_documents_are_refused_without_exhausting_the_stack() {
    // Flow collections (the parser stops at 255 levels) and block sequences on one line
    // (`- - - x`), which only indentation limits.
    for (open, close) in [("[", "]"), ("{a: ", "}"), ("- ", "x"), ("a: ", "x")] {
        let depth = 100_000;
        let text = if close == "x" {
            format!("{}x\n", open.repeat(depth))
        } else {
            format!("policies: {}{}\n", open.repeat(depth), close.repeat(depth))
        };
        // Run on a thread with the small stack FUSE and tokio workers have.
        let result = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || PolicyTable::parse(&text, Path::new("p.yml")).map(|_| ()).map_err(|e| (e.line, e.col, e.reason)))
            .unwrap()
            .join()
            .expect("parsing a deep document must not crash");
        assert!(result.is_err(), "{open}: {result:?}");
    }
}

#[test]
fn git_repositories_anywhere_stay_local_and_their_work_trees_sync() {
    let t = table(SEED);
    for path in [".git", ".git/config", "durable/proj/.git", "durable/proj/.git/index.lock", "fast/claims/x/.git/HEAD", "a/b/c/.git/objects/ab/cdef"] {
        assert_eq!(t.resolve(path).tier, TierKind::Local, "{path} is in a git repository");
    }
    // Only the exact name: the work tree, and names that merely contain it, follow the table.
    for (path, tier) in [("durable/proj/README.md", TierKind::Git), ("durable/.gitignore", TierKind::Git), ("durable/x.git", TierKind::Git), ("fast/claims/.github", TierKind::NatsKv)] {
        assert_eq!(t.resolve(path).tier, tier, "{path}");
    }
}
