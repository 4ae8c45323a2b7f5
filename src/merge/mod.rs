//! Three-way merge of durable files (SPEC 3.2). Pure functions over bytes.
//!
//! [`merge_file`] decides one path changed by two sides since their common base:
//! - a side that did not change it gives way to the one that did; a change beats a delete;
//! - `lww` paths keep the newer change (by hybrid-clock stamp, ties by node);
//! - `merge` paths merge by file kind: YAML, JSON and TOML field by field ([`value`]), written
//!   as an edit of the original text ([`render`]); Markdown with YAML front matter, the front
//!   matter like a YAML file and the body as text; everything else as text, line by line
//!   ([`text`]);
//! - changes both sides made to the same field, or to the same lines, that no rule decides,
//!   and structured documents that do not parse, make a *conflict*: the newer change stays in
//!   place (with everything that did merge), the older one is kept beside it as
//!   `NAME.conflict-<stamp>-<node>` of the losing change.
//!
//! Every decision depends only on the base and the two changes, with the sides ordered by
//! stamp, so `merge(A, B)` and `merge(B, A)` give the same bytes on every node.

pub mod render;
pub mod text;
pub mod value;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::hlc::Stamp;
use crate::policy::{Consistency, MergeRule};

/// Structured formats, by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.yml`, `.yaml`
    Yaml,
    /// `.json`
    Json,
    /// `.toml`
    Toml,
}

/// The structured format of a path, if it has one.
pub fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "yml" | "yaml" => Some(Format::Yaml),
        "json" => Some(Format::Json),
        "toml" => Some(Format::Toml),
        _ => None,
    }
}

fn toml_value(v: &toml_edit::Value) -> Value {
    use toml_edit::Value as T;
    match v {
        T::String(s) => Value::String(s.value().clone()),
        T::Integer(i) => Value::from(*i.value()),
        T::Float(f) => serde_json::Number::from_f64(*f.value())
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.value().to_string())),
        T::Boolean(b) => Value::Bool(*b.value()),
        T::Datetime(d) => Value::String(d.value().to_string()),
        T::Array(a) => Value::Array(a.iter().map(toml_value).collect()),
        T::InlineTable(t) => Value::Object(t.iter().map(|(k, v)| (k.to_string(), toml_value(v))).collect()),
    }
}

fn toml_item(item: &toml_edit::Item) -> Option<Value> {
    match item {
        toml_edit::Item::None => None,
        toml_edit::Item::Value(v) => Some(toml_value(v)),
        toml_edit::Item::Table(t) => Some(Value::Object(
            t.iter().filter_map(|(k, i)| toml_item(i).map(|v| (k.to_string(), v))).collect(),
        )),
        toml_edit::Item::ArrayOfTables(a) => Some(Value::Array(
            a.iter()
                .map(|t| Value::Object(t.iter().filter_map(|(k, i)| toml_item(i).map(|v| (k.to_string(), v))).collect()))
                .collect(),
        )),
    }
}

/// Parses a document into a value (used for merges, schemas and immutable fields).
pub fn parse_value(format: Format, text: &str) -> Result<Value, String> {
    match format {
        Format::Json => serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}")),
        Format::Yaml => {
            // YAML allows a byte-order mark at the start; yaml_serde reads one followed by two
            // keys as two documents.
            let text = text.strip_prefix('\u{feff}').unwrap_or(text);
            if text.trim().is_empty() {
                return Ok(Value::Object(Map::new()));
            }
            yaml_serde::from_str(text).map_err(|e| format!("invalid YAML: {e}"))
        }
        Format::Toml => {
            let doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("invalid TOML: {e}"))?;
            Ok(toml_item(doc.as_item()).unwrap_or(Value::Object(Map::new())))
        }
    }
}

/// One side of a merge: its content (`None`: deleted) and the change that made it.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    /// The content, or `None` when the side deleted the path.
    pub content: Option<&'a [u8]>,
    /// The stamp of the side's last change of the path.
    pub stamp: &'a Stamp,
    /// The commit of that change (for conflict headers).
    pub commit: &'a str,
}

/// A conflict: the losing change, kept beside the winner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The losing content.
    pub loser: Vec<u8>,
    /// The losing change's stamp (names the conflict file).
    pub loser_stamp: Stamp,
    /// The losing change's commit.
    pub loser_commit: String,
    /// The winning change's commit.
    pub winner_commit: String,
    /// The fields in dispute (empty: the whole file).
    pub fields: Vec<String>,
}

/// The outcome of merging one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The merged content, or `None`: the path is deleted.
    pub content: Option<Vec<u8>>,
    /// A conflict to keep beside it.
    pub conflict: Option<Conflict>,
}

/// Merges one path. `consistency` is the path's policy (`merge` or `lww`); `rules` its field
/// rules. See the module docs.
pub fn merge_file(
    path: &Path,
    consistency: Consistency,
    rules: &BTreeMap<String, MergeRule>,
    base: Option<&[u8]>,
    a: Side<'_>,
    b: Side<'_>,
) -> Outcome {
    let (newer, older) = if (a.stamp, a.commit) >= (b.stamp, b.commit) { (a, b) } else { (b, a) };
    let take = |side: Side<'_>| Outcome {
        content: side.content.map(<[u8]>::to_vec),
        conflict: None,
    };
    if newer.content == older.content {
        return take(newer);
    }
    if newer.content == base {
        return take(older);
    }
    if older.content == base {
        return take(newer);
    }
    // Both changed it, differently. A change beats a delete.
    let (Some(n), Some(o)) = (newer.content, older.content) else {
        return take(if newer.content.is_some() { newer } else { older });
    };
    let conflict = |fields: Vec<String>, content: Vec<u8>| Outcome {
        content: Some(content),
        conflict: Some(Conflict {
            loser: o.to_vec(),
            loser_stamp: older.stamp.clone(),
            loser_commit: older.commit.to_string(),
            winner_commit: newer.commit.to_string(),
            fields,
        }),
    };
    if consistency != Consistency::Merge {
        return take(newer);
    }
    let (Ok(nt), Ok(ot), Ok(bt)) = (
        std::str::from_utf8(n),
        std::str::from_utf8(o),
        base.map(std::str::from_utf8).transpose(),
    ) else {
        // Not UTF-8: a structured document cannot be read; text still merges by lines.
        return match format_of(path).is_none().then(|| text::merge(base, n, o)).flatten() {
            Some(merged) => clean(merged),
            None => conflict(Vec::new(), n.to_vec()),
        };
    };
    if let Some(format) = format_of(path) {
        return match structured(format, bt, nt, ot, rules) {
            Some((merged, fields)) if fields.is_empty() => clean(merged),
            Some((merged, fields)) => conflict(fields, merged),
            None => conflict(Vec::new(), n.to_vec()),
        };
    }
    if text::is_markdown(path) {
        if let Some((merged, fields)) = markdown(bt, nt, ot, rules) {
            return if fields.is_empty() { clean(merged) } else { conflict(fields, merged) };
        }
    }
    match text::merge(base, n, o) {
        Some(merged) => clean(merged),
        None => conflict(Vec::new(), n.to_vec()),
    }
}

fn clean(content: Vec<u8>) -> Outcome {
    Outcome {
        content: Some(content),
        conflict: None,
    }
}

/// Merges a YAML, JSON or TOML document field by field: the merged bytes and the fields in
/// dispute. `None` when a version does not parse (or is not a map at the top).
fn structured(
    format: Format,
    base: Option<&str>,
    newer: &str,
    older: &str,
    rules: &BTreeMap<String, MergeRule>,
) -> Option<(Vec<u8>, Vec<String>)> {
    let nd = render::parse(format, newer).ok()?;
    let od = render::parse(format, older).ok()?;
    let bd = base.map(|t| render::parse(format, t)).transpose().ok()?;
    let merged = value::merge_maps(bd.as_ref().map(|d| &d.value), &nd.value, &od.value, rules);
    let skeleton = bd.as_ref().unwrap_or(&nd);
    let bytes = render::render(format, skeleton, &nd, Some(&od), bd.as_ref(), &merged.fields);
    Some((bytes, merged.conflicts))
}

/// What a conflict file's header calls a Markdown body both sides changed on the same lines.
pub const BODY: &str = "the body";

/// Merges Markdown with front matter: the front matter as a YAML document (the path's rules,
/// its text kept as for `.yml` files), the body as text. `None` when the versions do not all
/// have front matter that reads as a YAML map: the whole file then merges as text.
fn markdown(
    base: Option<&str>,
    newer: &str,
    older: &str,
    rules: &BTreeMap<String, MergeRule>,
) -> Option<(Vec<u8>, Vec<String>)> {
    let nf = text::front_matter(newer)?;
    let of = text::front_matter(older)?;
    // A base without front matter (it was added on both sides since) is all body; its fields
    // count as created by both.
    let (bf, base_body) = match base.map(|b| (b, text::front_matter(b))) {
        None => (None, None),
        Some((_, Some(f))) => (Some(f), Some(f.body)),
        Some((b, None)) => (None, Some(b)),
    };
    let (mut out, mut fields) = structured(Format::Yaml, bf.map(|f| f.yaml), nf.yaml, of.yaml, rules)?;
    let skeleton = bf.unwrap_or(nf);
    let mut merged = skeleton.open.as_bytes().to_vec();
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    merged.extend_from_slice(&out);
    let body = match text::merge(base_body.map(str::as_bytes), nf.body.as_bytes(), of.body.as_bytes()) {
        Some(body) => body,
        None => {
            fields.push(BODY.to_string());
            nf.body.as_bytes().to_vec()
        }
    };
    merged.extend_from_slice(skeleton.close.as_bytes());
    if !skeleton.close.ends_with('\n') && !body.is_empty() {
        merged.push(b'\n');
    }
    merged.extend_from_slice(&body);
    Some((merged, fields))
}

/// A conflict over the whole file without merging: the newer side stays in place, the older is
/// kept beside it. Used when a merge result breaks the path's schema. `reason` names the
/// dispute in the conflict file's header.
pub fn keep_newer(a: Side<'_>, b: Side<'_>, reason: &str) -> Outcome {
    let (newer, older) = if (a.stamp, a.commit) >= (b.stamp, b.commit) { (a, b) } else { (b, a) };
    match older.content {
        None => Outcome {
            content: newer.content.map(<[u8]>::to_vec),
            conflict: None,
        },
        Some(loser) => Outcome {
            content: newer.content.map(<[u8]>::to_vec),
            conflict: Some(Conflict {
                loser: loser.to_vec(),
                loser_stamp: older.stamp.clone(),
                loser_commit: older.commit.to_string(),
                winner_commit: newer.commit.to_string(),
                fields: vec![reason.to_string()],
            }),
        },
    }
}

/// Where a conflict's losing version is kept: `NAME.conflict-<stamp>-<node>` beside the file.
pub fn conflict_path(path: &Path, stamp: &Stamp) -> PathBuf {
    let node: String = stamp
        .node
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".conflict-{}-{node}", stamp.file_stamp()));
    path.with_file_name(name)
}

/// Whether a path is a conflict file.
pub fn is_conflict_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains(".conflict-"))
}

/// The content of a conflict file: a header naming both commits and the disputed fields, then
/// the losing version's bytes.
pub fn conflict_content(path: &Path, c: &Conflict) -> Vec<u8> {
    let comment = match format_of(path) {
        Some(Format::Json) => "//",
        _ => "#",
    };
    let fields = if c.fields.is_empty() {
        "the whole file".to_string()
    } else {
        c.fields.join(", ")
    };
    let mut out = format!(
        "{comment} syncfs conflict: this is the losing version of {}, from {} ({}, commit {}).\n\
         {comment} The version in place is from commit {}. In dispute: {fields}.\n\
         {comment} Resolve by editing the file in place, then delete this one.\n",
        path.file_name().unwrap_or_default().to_string_lossy(),
        c.loser_stamp.node,
        c.loser_stamp,
        c.loser_commit,
        c.winner_commit,
    )
    .into_bytes();
    out.extend_from_slice(&c.loser);
    out
}

/// The `immutable` fields of a document that a new version changes or removes (for the
/// write-time EPERM). Markdown is read by its front matter. Unparseable versions change
/// nothing here: validation reports them.
pub fn immutable_changes(path: &Path, rules: &BTreeMap<String, MergeRule>, old: &[u8], new: &[u8]) -> Vec<String> {
    let parse = |b: &[u8]| -> Option<Value> {
        let t = std::str::from_utf8(b).ok()?;
        match format_of(path) {
            Some(format) => parse_value(format, t).ok(),
            None if text::is_markdown(path) => parse_value(Format::Yaml, text::front_matter(t)?.yaml).ok(),
            None => None,
        }
    };
    let (Some(Value::Object(old)), Some(Value::Object(new))) = (parse(old), parse(new)) else {
        return Vec::new();
    };
    rules
        .iter()
        .filter(|(_, r)| **r == MergeRule::Immutable)
        .filter_map(|(field, _)| match (old.get(field), new.get(field)) {
            (Some(o), n) if n != Some(o) => Some(field.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
