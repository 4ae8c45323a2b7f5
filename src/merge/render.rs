//! Writing a merged document back as an *edit* of the files it came from.
//!
//! The skeleton is the base (or, when both sides created the file, the newer side). For every
//! top-level field the merge kept from a side, that side's own text for the field is copied
//! verbatim: its lines, the comments just above it, its quoting. Only values the merge computed
//! (a union, a nested merge) are written afresh. So lines the merge did not change keep their
//! bytes, and since the choice of text depends only on the base and the two changes, every
//! node writes the same bytes.

use serde_json::{Map, Value};

use super::value::{Field, Source};
use super::Format;

/// A parsed document: its value and, per format, what is needed to copy its text.
pub struct Doc<'a> {
    /// The document's text.
    pub text: &'a str,
    /// Its value (a map at the top).
    pub value: Map<String, Value>,
    yaml: Option<YamlBlocks<'a>>,
    toml: Option<toml_edit::DocumentMut>,
}

/// A YAML document cut into top-level blocks.
struct YamlBlocks<'a> {
    /// Lines before the first key (comments, `---`).
    header: String,
    /// Per key: its lines, with the comment lines right above it.
    blocks: Vec<(String, String)>,
    /// Comment lines after the last key.
    trailer: String,
    _text: &'a str,
}

/// Parses a document of `format` whose top level is a map.
pub fn parse<'a>(format: Format, text: &'a str) -> Result<Doc<'a>, String> {
    let value = super::parse_value(format, text)?;
    let Value::Object(map) = value else {
        return Err("the top level is not a map".into());
    };
    let (yaml, toml) = match format {
        Format::Yaml => (yaml_blocks(text, &map), None),
        Format::Toml => (None, Some(text.parse::<toml_edit::DocumentMut>().map_err(|e| e.to_string())?)),
        Format::Json => (None, None),
    };
    Ok(Doc {
        text,
        value: map,
        yaml,
        toml,
    })
}

fn is_trailing_line(line: &str) -> bool {
    let t = line.trim_end();
    t.is_empty() || t.starts_with('#')
}

/// Cuts a block-style YAML mapping into per-key blocks, or `None` when the document is not one
/// (flow style, keys not at column 0): it is then written afresh.
fn yaml_blocks<'a>(text: &'a str, map: &Map<String, Value>) -> Option<YamlBlocks<'a>> {
    use saphyr_parser::{Event, Parser};
    // Every node takes the next slot of its parent; a map's slots alternate key and value.
    enum Ctx {
        Map { key_next: bool },
        Seq,
    }
    let mut stack: Vec<Ctx> = Vec::new();
    let mut starts: Vec<(String, usize)> = Vec::new();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.ok()?;
        let node = matches!(
            event,
            Event::Scalar(..) | Event::Alias(..) | Event::MappingStart(..) | Event::SequenceStart(..)
        );
        if node {
            let is_key = match stack.last_mut() {
                Some(Ctx::Map { key_next }) => {
                    let k = *key_next;
                    *key_next = !k;
                    k
                }
                _ => false,
            };
            if is_key && stack.len() == 1 {
                let Event::Scalar(key, ..) = &event else {
                    return None; // a complex key
                };
                if span.start.col() != 0 {
                    return None; // flow style or an indented root
                }
                starts.push((key.to_string(), span.start.line() - 1));
            }
        }
        match event {
            Event::MappingStart(..) => {
                // A flow-style root (`{a: 1}`, `{}`) has no lines to copy.
                if stack.is_empty() && text.chars().nth(span.start.index()) == Some('{') {
                    return None;
                }
                stack.push(Ctx::Map { key_next: true })
            }
            Event::SequenceStart(..) => stack.push(Ctx::Seq),
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
    if starts.len() != map.len() {
        return None;
    }
    // A byte-order mark (editors on Windows write one) belongs to the document, not to its first
    // field: copied with that field into another document it would sit mid-text, where YAML
    // refuses it.
    let (bom, body) = match text.strip_prefix('\u{feff}') {
        Some(rest) => ("\u{feff}", rest),
        None => ("", text),
    };
    let lines: Vec<&str> = body.split_inclusive('\n').collect();
    let mut header = bom.to_string();
    let first = starts.first().map(|s| s.1).unwrap_or(lines.len());
    for line in &lines[..first.min(lines.len())] {
        header.push_str(line);
    }
    let mut blocks = Vec::new();
    let mut carry = String::new();
    for (i, (key, start)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map(|s| s.1).unwrap_or(lines.len());
        if end <= *start || end > lines.len() {
            return None;
        }
        let mut body: Vec<&str> = lines[*start..end].to_vec();
        let mut trailing = Vec::new();
        while body.len() > 1 && is_trailing_line(body[body.len() - 1]) {
            trailing.push(body.pop().unwrap());
        }
        let mut block = std::mem::take(&mut carry);
        for line in &body {
            block.push_str(line);
        }
        if !block.ends_with('\n') {
            block.push('\n');
        }
        for line in trailing.iter().rev() {
            carry.push_str(line);
        }
        blocks.push((key.clone(), block));
    }
    Some(YamlBlocks {
        header,
        blocks,
        trailer: carry,
        _text: text,
    })
}

fn fresh_yaml(key: &str, value: &Value) -> String {
    let mut one = Map::new();
    one.insert(key.to_string(), value.clone());
    let text = yaml_serde::to_string(&Value::Object(one)).unwrap_or_default();
    text.strip_prefix("---\n").unwrap_or(&text).to_string()
}

/// The indentation of a pretty-printed JSON text, or `None` for compact JSON.
fn json_indent(text: &str) -> Option<String> {
    let mut lines = text.lines();
    lines.next()?;
    let line = lines.find(|l| !l.trim().is_empty())?;
    let indent: String = line.chars().take_while(|c| *c == ' ' || *c == '\t').collect();
    (!indent.is_empty()).then_some(indent)
}

fn value_to_toml(value: &Value) -> toml_edit::Value {
    match value {
        Value::Null => toml_edit::Value::from(""),
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(0.0).into(),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(items) => {
            let mut a = toml_edit::Array::new();
            for item in items {
                a.push(value_to_toml(item));
            }
            toml_edit::Value::Array(a)
        }
        Value::Object(map) => {
            let mut t = toml_edit::InlineTable::new();
            for (k, v) in map {
                t.insert(k, value_to_toml(v));
            }
            toml_edit::Value::InlineTable(t)
        }
    }
}

/// Writes the merged fields, copying text from the documents the values came from.
pub fn render(format: Format, skeleton: &Doc<'_>, newer: &Doc<'_>, older: Option<&Doc<'_>>, base: Option<&Doc<'_>>, fields: &[Field]) -> Vec<u8> {
    let doc_of = |source: Source| -> Option<&Doc<'_>> {
        match source {
            Source::Base => base.or(Some(skeleton)),
            Source::Newer => Some(newer),
            Source::Older => older,
            Source::Fresh => None,
        }
    };
    match format {
        Format::Json => {
            let mut map = Map::new();
            for f in fields {
                if let Some(v) = &f.value {
                    map.insert(f.key.clone(), v.clone());
                }
            }
            let value = Value::Object(map);
            let mut out = match json_indent(skeleton.text) {
                Some(indent) => {
                    let mut buf = Vec::new();
                    let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
                    let mut ser = serde_json::Serializer::with_formatter(&mut buf, formatter);
                    serde::Serialize::serialize(&value, &mut ser).expect("JSON values serialize");
                    buf
                }
                None => serde_json::to_vec(&value).expect("JSON values serialize"),
            };
            if skeleton.text.ends_with('\n') {
                out.push(b'\n');
            }
            out
        }
        Format::Yaml => {
            let Some(skel) = &skeleton.yaml else {
                return fresh_document(format, fields);
            };
            let mut out = skel.header.clone();
            for f in fields {
                let Some(value) = &f.value else { continue };
                let block = doc_of(f.source)
                    .and_then(|d| d.yaml.as_ref())
                    .and_then(|y| y.blocks.iter().find(|(k, _)| k == &f.key))
                    .map(|(_, b)| b.clone());
                out.push_str(&block.unwrap_or_else(|| fresh_yaml(&f.key, value)));
            }
            out.push_str(&skel.trailer);
            out.into_bytes()
        }
        Format::Toml => {
            let Some(mut doc) = skeleton.toml.clone() else {
                return fresh_document(format, fields);
            };
            let keep: Vec<&str> = fields.iter().filter(|f| f.value.is_some()).map(|f| f.key.as_str()).collect();
            let existing: Vec<String> = doc.iter().map(|(k, _)| k.to_string()).collect();
            for key in existing {
                if !keep.contains(&key.as_str()) {
                    doc.remove(&key);
                }
            }
            for f in fields {
                let Some(value) = &f.value else { continue };
                if f.source == Source::Base && base.is_some() {
                    continue;
                }
                let item = doc_of(f.source)
                    .and_then(|d| d.toml.as_ref())
                    .and_then(|t| t.get(&f.key))
                    .cloned()
                    .unwrap_or_else(|| toml_edit::Item::Value(value_to_toml(value)));
                doc.insert(&f.key, item);
            }
            doc.to_string().into_bytes()
        }
    }
}

/// A document written from the values alone (when the skeleton cannot be cut into fields).
fn fresh_document(format: Format, fields: &[Field]) -> Vec<u8> {
    let mut map = Map::new();
    for f in fields {
        if let Some(v) = &f.value {
            map.insert(f.key.clone(), v.clone());
        }
    }
    let value = Value::Object(map);
    match format {
        Format::Yaml => {
            let text = yaml_serde::to_string(&value).unwrap_or_default();
            text.strip_prefix("---\n").unwrap_or(&text).as_bytes().to_vec()
        }
        Format::Json => {
            let mut v = serde_json::to_vec_pretty(&value).unwrap_or_default();
            v.push(b'\n');
            v
        }
        Format::Toml => {
            let mut doc = toml_edit::DocumentMut::new();
            for (k, v) in value.as_object().into_iter().flatten() {
                doc.insert(k, toml_edit::Item::Value(value_to_toml(v)));
            }
            doc.to_string().into_bytes()
        }
    }
}
