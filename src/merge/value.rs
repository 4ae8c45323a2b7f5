//! Three-way merge of document values (SPEC 3.2), field by field.
//!
//! The two sides are not "ours" and "theirs" but the *newer* and the *older* change (ordered by
//! their hybrid-clock stamps): every node that merges the same two changes assigns them the
//! same way, so every node decides the same. Each decision also says where the value came from
//! ([`Source`]), so the renderer can copy that side's text instead of re-writing it.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::policy::MergeRule;

/// Where a merged value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Unchanged from the base.
    Base,
    /// The newer change's value.
    Newer,
    /// The older change's value.
    Older,
    /// Computed by the merge (a union, a nested merge): rendered afresh.
    Fresh,
}

/// The merge of one top-level field: its value (`None`: absent) and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The key.
    pub key: String,
    /// The merged value, or `None` when the field is gone.
    pub value: Option<Value>,
    /// Where it came from.
    pub source: Source,
}

/// The merge of a whole document.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The fields in their final order.
    pub fields: Vec<Field>,
    /// Dotted paths of fields both sides changed differently with no rule to decide; the
    /// newer change's value was taken for them.
    pub conflicts: Vec<String>,
}

/// Merges top-level maps. `base` is `None` when both sides created the document.
pub fn merge_maps(
    base: Option<&Map<String, Value>>,
    newer: &Map<String, Value>,
    older: &Map<String, Value>,
    rules: &BTreeMap<String, MergeRule>,
) -> Merged {
    let empty = Map::new();
    let b = base.unwrap_or(&empty);
    let mut conflicts = Vec::new();
    let mut fields = Vec::new();
    for key in key_order(b, newer, older) {
        let (value, source) = merge_field(
            &key,
            b.get(&key),
            newer.get(&key),
            older.get(&key),
            rules.get(&key),
            &mut conflicts,
        );
        fields.push(Field { key, value, source });
    }
    Merged { fields, conflicts }
}

/// The order of keys in a merged map: the base's, then each key only a side has, placed right
/// after the key that precedes it on that side (the newer side's first). It depends only on
/// the three maps and on which change is newer, not on which node merges.
pub fn key_order(base: &Map<String, Value>, newer: &Map<String, Value>, older: &Map<String, Value>) -> Vec<String> {
    let mut order: Vec<String> = base.keys().cloned().collect();
    for side in [newer, older] {
        let mut previous: Option<&String> = None;
        for key in side.keys() {
            if !order.contains(key) {
                let at = previous
                    .and_then(|p| order.iter().position(|k| k == p))
                    .map(|i| i + 1)
                    .unwrap_or(0);
                order.insert(at, key.clone());
            }
            previous = Some(key);
        }
    }
    order
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn merge_field(
    path: &str,
    base: Option<&Value>,
    newer: Option<&Value>,
    older: Option<&Value>,
    rule: Option<&MergeRule>,
    conflicts: &mut Vec<String>,
) -> (Option<Value>, Source) {
    let newer_changed = newer != base;
    let older_changed = older != base;
    match (newer_changed, older_changed) {
        (false, false) => return (base.cloned(), Source::Base),
        (true, false) => return (newer.cloned(), Source::Newer),
        (false, true) => return (older.cloned(), Source::Older),
        (true, true) if newer == older => return (newer.cloned(), Source::Newer),
        (true, true) => {}
    }
    // Both sides changed it, differently. An edit beats a delete.
    let (n, o) = match (newer, older) {
        (Some(n), Some(o)) => (n, o),
        (Some(_), None) => return (newer.cloned(), Source::Newer),
        (None, Some(_)) => return (older.cloned(), Source::Older),
        (None, None) => return (None, Source::Newer),
    };
    // What no rule can decide: the newer value stays, and the field is named in the conflict.
    let dispute = |conflicts: &mut Vec<String>| {
        conflicts.push(path.to_string());
        (Some(n.clone()), Source::Newer)
    };
    match rule {
        Some(MergeRule::Immutable) => match base {
            // A change of an immutable field loses.
            Some(b) => (Some(b.clone()), Source::Base),
            // Set by both at once: the first one set stays.
            None => (Some(o.clone()), Source::Older),
        },
        Some(MergeRule::Lww) => (Some(n.clone()), Source::Newer),
        Some(MergeRule::Union) => match (map_or_absent(base), n, o) {
            (Some(bm), Value::Object(nm), Value::Object(om)) => {
                label(Value::Object(merge_nested(path, bm, nm, om, rule, conflicts)), n, o)
            }
            _ => match union(base, n, o) {
                Some(v) => label(v, n, o),
                None => dispute(conflicts),
            },
        },
        Some(MergeRule::Max) => match compare_max(n, o) {
            Some(Ordering::Less) => (Some(o.clone()), Source::Older),
            Some(_) => (Some(n.clone()), Source::Newer),
            None => dispute(conflicts),
        },
        Some(MergeRule::Min) => match compare_max(n, o) {
            Some(Ordering::Greater) => (Some(o.clone()), Source::Older),
            Some(_) => (Some(n.clone()), Source::Newer),
            None => dispute(conflicts),
        },
        Some(MergeRule::MergeBy(key)) => match merge_by(path, key, base, n, o, conflicts) {
            Some(v) => label(v, n, o),
            None => dispute(conflicts),
        },
        None => match (map_or_absent(base), n, o) {
            (Some(bm), Value::Object(nm), Value::Object(om)) if base.is_none_or(Value::is_object) => {
                label(Value::Object(merge_nested(path, bm, nm, om, None, conflicts)), n, o)
            }
            _ => dispute(conflicts),
        },
    }
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// A base that is a map, or absent (or null: a field written `labels:` with no value), as a map.
fn map_or_absent(base: Option<&Value>) -> Option<&Map<String, Value>> {
    match base {
        None | Some(Value::Null) => Some(&EMPTY),
        Some(Value::Object(m)) => Some(m),
        Some(_) => None,
    }
}

/// Merges nested maps key by key, each key with `rule` (`None` for unruled maps, `union` for
/// the keys of a union map).
fn merge_nested(
    path: &str,
    base: &Map<String, Value>,
    newer: &Map<String, Value>,
    older: &Map<String, Value>,
    rule: Option<&MergeRule>,
    conflicts: &mut Vec<String>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for key in key_order(base, newer, older) {
        let (v, _) = merge_field(&join(path, &key), base.get(&key), newer.get(&key), older.get(&key), rule, conflicts);
        if let Some(v) = v {
            out.insert(key, v);
        }
    }
    out
}

/// A list of maps as a map from each element's key (JSON-encoded, so any scalar can be a key)
/// to the element, in list order. `None` when the value is not such a list, or two elements
/// share a key: then elements cannot be matched, and the field is a conflict.
fn keyed(list: Option<&Value>, key: &str) -> Option<Map<String, Value>> {
    let items = match list {
        None | Some(Value::Null) => return Some(Map::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return None,
    };
    let mut out = Map::new();
    for item in items {
        let id = item.as_object()?.get(key)?;
        if out.insert(serde_json::to_string(id).ok()?, item.clone()).is_some() {
            return None;
        }
    }
    Some(out)
}

/// `merge_by: KEY`: elements matched by their key, each merged like an unruled map (added on
/// either side kept, removed on one side and untouched on the other removed, fields changed on
/// both sides differently in dispute as `path[KEY=value].field`). Order: the base's, then each
/// addition after its predecessor, as for the keys of a map.
fn merge_by(path: &str, key: &str, base: Option<&Value>, newer: &Value, older: &Value, conflicts: &mut Vec<String>) -> Option<Value> {
    let b = keyed(base, key)?;
    let n = keyed(Some(newer), key)?;
    let o = keyed(Some(older), key)?;
    let mut out = Vec::new();
    for id in key_order(&b, &n, &o) {
        let shown = match serde_json::from_str::<Value>(&id) {
            Ok(Value::String(s)) => s,
            _ => id.clone(),
        };
        let at = format!("{path}[{key}={shown}]");
        let (v, _) = merge_field(&at, b.get(&id), n.get(&id), o.get(&id), None, conflicts);
        out.extend(v);
    }
    Some(Value::Array(out))
}

/// A computed value, labelled with the side it equals (so that side's text can be kept).
fn label(value: Value, newer: &Value, older: &Value) -> (Option<Value>, Source) {
    let source = if &value == newer {
        Source::Newer
    } else if &value == older {
        Source::Older
    } else {
        Source::Fresh
    };
    (Some(value), source)
}

/// Set union with removals: R = (O∩T) ∪ (O∖B) ∪ (T∖B). Kept elements stay in the base's order;
/// additions follow, the newer side's first. `None` when a value is not a list.
fn union(base: Option<&Value>, newer: &Value, older: &Value) -> Option<Value> {
    let empty = Vec::new();
    let b = match base {
        None | Some(Value::Null) => &empty,
        Some(Value::Array(b)) => b,
        Some(_) => return None,
    };
    let (Value::Array(n), Value::Array(o)) = (newer, older) else {
        return None;
    };
    let mut out: Vec<Value> = Vec::new();
    for x in b {
        if n.contains(x) && o.contains(x) && !out.contains(x) {
            out.push(x.clone());
        }
    }
    for side in [n, o] {
        for x in side {
            if !b.contains(x) && !out.contains(x) {
                out.push(x.clone());
            }
        }
    }
    Some(Value::Array(out))
}

/// Orders two values for `max`: numbers as numbers, RFC 3339 times as times, versions
/// (`1.2.10`, `v2.0`) component by component, other strings as text. `None` when they cannot be
/// compared (a number and a list, say).
pub fn compare_max(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                return Some(x.cmp(&y));
            }
            if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                return Some(x.cmp(&y));
            }
            x.as_f64()?.partial_cmp(&y.as_f64()?)
        }
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::String(x), Value::String(y)) => {
            if let (Some(x), Some(y)) = (time(x), time(y)) {
                return Some(x.cmp(&y));
            }
            if let (Some(x), Some(y)) = (version(x), version(y)) {
                return Some(x.cmp(&y));
            }
            Some(x.cmp(y))
        }
        _ => None,
    }
}

fn time(s: &str) -> Option<SystemTime> {
    // RFC 3339 with a date, a `T` (or space) and a zone.
    if s.len() < 20 || !s.as_bytes()[4].eq(&b'-') {
        return None;
    }
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z').trim_end_matches("+00:00"))
        .ok()
        .filter(|_| s.ends_with('Z') || s.ends_with("+00:00"))
        .or_else(|| humantime::parse_rfc3339(s).ok())
}

/// `1.2.10` -> [1, 2, 10]; a release sorts after its pre-releases (`1.0.0-rc1` < `1.0.0`).
fn version(s: &str) -> Option<(Vec<u64>, bool)> {
    let s = s.strip_prefix('v').unwrap_or(s);
    let (core, pre) = match s.split_once('-') {
        Some((c, _)) => (c, true),
        None => (s, false),
    };
    if !core.contains('.') {
        return None;
    }
    let parts: Option<Vec<u64>> = core.split('.').map(|p| p.parse().ok()).collect();
    let mut parts = parts?;
    while parts.len() > 1 && parts.last() == Some(&0) {
        parts.pop();
    }
    Some((parts, !pre))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn rules() -> BTreeMap<String, MergeRule> {
        [
            ("id", MergeRule::Immutable),
            ("title", MergeRule::Lww),
            ("labels", MergeRule::Union),
            ("updated_at", MergeRule::Max),
            ("version", MergeRule::Max),
        ]
        .into_iter()
        .map(|(k, r)| (k.to_string(), r))
        .collect()
    }

    fn merged(base: Value, newer: Value, older: Value) -> (Value, Vec<String>) {
        let m = merge_maps(Some(&obj(base)), &obj(newer), &obj(older), &rules());
        let map: Map<String, Value> = m.fields.into_iter().filter_map(|f| f.value.map(|v| (f.key, v))).collect();
        (Value::Object(map), m.conflicts)
    }

    #[test]
    fn different_fields_both_survive() {
        let (v, c) = merged(
            json!({"id": 1, "title": "a", "body": "x", "owner": "ann"}),
            json!({"id": 1, "title": "b", "body": "x", "owner": "ann"}),
            json!({"id": 1, "title": "a", "body": "y", "owner": "ann"}),
        );
        assert_eq!(v, json!({"id": 1, "title": "b", "body": "y", "owner": "ann"}));
        assert!(c.is_empty());
    }

    #[test]
    fn union_keeps_additions_and_honours_removals() {
        // Newer adds x; older removes y: x is in, y is out.
        let (v, c) = merged(
            json!({"labels": ["y", "z"]}),
            json!({"labels": ["y", "z", "x"]}),
            json!({"labels": ["z"]}),
        );
        assert_eq!(v, json!({"labels": ["z", "x"]}));
        assert!(c.is_empty());
    }

    #[test]
    fn max_lww_and_immutable() {
        let (v, c) = merged(
            json!({"id": 7, "title": "t", "updated_at": "2026-01-01T00:00:00Z", "version": "1.2.9"}),
            json!({"id": 8, "title": "newer", "updated_at": "2026-01-01T00:00:01Z", "version": "1.2.10"}),
            json!({"id": 9, "title": "older", "updated_at": "2026-03-01T00:00:00Z", "version": "1.10"}),
        );
        assert_eq!(v["id"], 7, "immutable: changes lose");
        assert_eq!(v["title"], "newer", "lww: the newer change wins");
        assert_eq!(v["updated_at"], "2026-03-01T00:00:00Z", "max compares times");
        assert_eq!(v["version"], "1.10", "max compares versions, not text");
        assert!(c.is_empty());
    }

    #[test]
    fn unruled_fields_conflict_only_when_both_changed_differently() {
        let (v, c) = merged(json!({"a": 1, "b": 1}), json!({"a": 2, "b": 3}), json!({"a": 2, "b": 4}));
        assert_eq!(v, json!({"a": 2, "b": 3}));
        assert_eq!(c, vec!["b"]);
    }

    #[test]
    fn nested_maps_recurse_and_edit_beats_delete() {
        let (v, c) = merged(
            json!({"meta": {"a": 1, "b": 1}, "gone": 1, "kept": 1}),
            json!({"meta": {"a": 2, "b": 1}, "kept": 2}),
            json!({"meta": {"a": 1, "b": 2}, "gone": 1}),
        );
        // `gone`: deleted by newer, untouched by older -> deleted. `kept`: edited by newer,
        // deleted by older -> edited.
        assert_eq!(v, json!({"meta": {"a": 2, "b": 2}, "kept": 2}));
        assert!(c.is_empty());
        let (_, c) = merged(json!({"m": {"x": 1}}), json!({"m": {"x": 2}}), json!({"m": {"x": 3}}));
        assert_eq!(c, vec!["m.x"]);
    }

    #[test]
    fn immutable_set_by_both_at_once_keeps_the_first() {
        let m = merge_maps(None, &obj(json!({"id": "new"})), &obj(json!({"id": "old"})), &rules());
        assert_eq!(m.fields[0].value, Some(json!("old")));
    }

    #[test]
    fn key_order_is_base_then_insertions_after_their_predecessor() {
        let order = key_order(
            &obj(json!({"a": 1, "c": 1})),
            &obj(json!({"a": 1, "b": 1, "c": 1})),
            &obj(json!({"a": 1, "c": 1, "d": 1})),
        );
        assert_eq!(order, vec!["a", "b", "c", "d"]);
    }
}
