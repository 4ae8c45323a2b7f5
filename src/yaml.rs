//! A YAML document tree that remembers where every node came from.
//!
//! Configuration and policy files are small and read once, but a mistake in them must be
//! reported as `file:line:col: reason`. serde's error locations only cover syntax and type
//! errors; semantic checks (an unknown tier, a tier paired with the wrong consistency) happen
//! after deserialization, when positions are gone. So these files are read into this tree,
//! built from saphyr-parser's event stream, and validated by hand with every position at hand.

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// One node of a YAML document and its position (1-based line, 1-based column).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// What the node holds.
    pub value: Value,
    /// Line where the node starts, 1-based.
    pub line: usize,
    /// Column where the node starts, 1-based.
    pub col: usize,
}

/// The content of a [`Node`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `~`, `null`, or an empty value.
    Null,
    /// A scalar as written; `quoted` scalars are always strings.
    Scalar {
        /// The scalar's text after YAML unescaping.
        text: String,
        /// Whether the scalar was quoted or a block scalar (never a number or bool).
        quoted: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order. Keys are nodes too, so duplicates can be reported.
    Map(Vec<(Node, Node)>),
}

/// A syntax error, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What the parser said.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.col, self.message)
    }
}

impl Node {
    /// A short name of the node's kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "scalar",
            Value::Seq(_) => "list",
            Value::Map(_) => "mapping",
        }
    }

    /// The node as a string, if it is a scalar (numbers and booleans give their text).
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The node as a boolean, if it is an unquoted `true` or `false`.
    pub fn as_bool(&self) -> Option<bool> {
        match &self.value {
            Value::Scalar { text, quoted: false } => match text.as_str() {
                "true" | "True" | "TRUE" => Some(true),
                "false" | "False" | "FALSE" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    /// The node as a non-negative integer, if it is an unquoted decimal number.
    pub fn as_u64(&self) -> Option<u64> {
        match &self.value {
            Value::Scalar { text, quoted: false } => text.replace('_', "").parse().ok(),
            _ => None,
        }
    }

    /// The entries of a mapping node.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The items of a sequence node.
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// Looks up a key in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }
}

/// How many nodes a document may hold once its aliases are expanded. Each alias is a copy, so
/// ten levels of ten aliases are 10^10 nodes (a "billion laughs") in a few hundred bytes.
pub const MAX_NODES: usize = 100_000;

/// Parses a single YAML document. An empty document gives `None`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder {
        stack: Vec::new(),
        anchors: Vec::new(),
        root: None,
        documents: 0,
        nodes: 0,
        lines: text
            .replace("\r\n", "\n")
            .replace('\r', "\n")
            .split('\n')
            .map(|l| l.chars().count())
            .collect(),
    };
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            let (line, col) = builder.inside(e.marker().line(), e.marker().col() + 1);
            SyntaxError {
                line,
                col,
                message: e.info().to_string(),
            }
        })?;
        builder.event(event, span)?;
    }
    Ok(builder.root)
}

struct Builder {
    /// Open collections: the node being filled and, for mappings, a key waiting for its value.
    stack: Vec<(Node, Option<Node>, usize)>,
    /// Anchored nodes, with the number of nodes each holds.
    anchors: Vec<(usize, Node, usize)>,
    root: Option<Node>,
    documents: usize,
    /// Nodes made so far, aliases counted as the copies they are.
    nodes: usize,
    /// The length in characters of each line of the text (YAML's lines: `\r\n`, `\r` and
    /// `\n` each end one).
    lines: Vec<usize>,
}

fn size(node: &Node) -> usize {
    1 + match &node.value {
        Value::Seq(items) => items.iter().map(size).sum(),
        Value::Map(entries) => entries.iter().map(|(k, v)| size(k) + size(v)).sum(),
        Value::Null | Value::Scalar { .. } => 0,
    }
}

impl Builder {
    /// A position moved inside the text: the parser places some errors, and the empty values
    /// it implies at the end (`? ` as the last line), past the end (line 2 of a one-line
    /// file); they are shown at the end of the last line, where a person looks.
    fn inside(&self, line: usize, col: usize) -> (usize, usize) {
        let (line, col) = if line == 0 || line > self.lines.len() { (self.lines.len(), usize::MAX) } else { (line, col) };
        (line, col.clamp(1, self.lines[line - 1] + 1))
    }

    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let (line, col) = self.inside(span.start.line(), span.start.col() + 1);
        match &event {
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..) => self.nodes += 1,
            Event::Alias(id) => {
                let copied = self.anchors.iter().rev().find(|(a, ..)| a == id).map_or(0, |(.., n)| *n);
                self.nodes = self.nodes.saturating_add(copied);
            }
            _ => {}
        }
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                line,
                col,
                message: format!("more than {MAX_NODES} values once aliases are expanded"),
            });
        }
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(SyntaxError {
                        line,
                        col,
                        message: "expected a single YAML document, found a second one".into(),
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = style != ScalarStyle::Plain;
                let value = if !quoted && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        quoted,
                    }
                };
                self.push(Node { value, line, col }, anchor)?;
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .iter()
                    .rev()
                    .find(|(a, ..)| *a == id)
                    .map(|(_, n, _)| n.clone())
                    .ok_or_else(|| SyntaxError {
                        line,
                        col,
                        message: "alias to an unknown anchor".into(),
                    })?;
                self.push(node, 0)?;
            }
            Event::SequenceStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Seq(Vec::new()),
                    line,
                    col,
                },
                None,
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push((
                Node {
                    value: Value::Map(Vec::new()),
                    line,
                    col,
                },
                None,
                anchor,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, _, anchor) = self.stack.pop().expect("parser balances collections");
                self.push(node, anchor)?;
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        Ok(())
    }

    fn push(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            let n = size(&node);
            self.anchors.push((anchor, node.clone(), n));
        }
        let Some((parent, pending_key, _)) = self.stack.last_mut() else {
            self.root = Some(node);
            return Ok(());
        };
        match &mut parent.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match pending_key.take() {
                None => {
                    if !matches!(node.value, Value::Scalar { .. } | Value::Null) {
                        return Err(SyntaxError {
                            line: node.line,
                            col: node.col,
                            message: "mapping keys must be plain scalars".into(),
                        });
                    }
                    *pending_key = Some(node);
                }
                Some(key) => {
                    if let Some((dup, _)) = entries.iter().find(|(k, _)| k.value == key.value) {
                        return Err(SyntaxError {
                            line: key.line,
                            col: key.col,
                            message: format!(
                                "duplicate key `{}` (first at line {})",
                                key.as_str().unwrap_or(""),
                                dup.line
                            ),
                        });
                    }
                    entries.push((key, node));
                }
            },
            _ => unreachable!("only collections are on the stack"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let doc = parse("a: 1\nb:\n  - x\n  - {c: d}\n").unwrap().unwrap();
        let b = doc.get("b").unwrap();
        assert_eq!((b.line, b.col), (3, 3));
        let items = b.as_seq().unwrap();
        assert_eq!(items[0].as_str(), Some("x"));
        assert_eq!(items[1].get("c").unwrap().line, 4);
        assert_eq!(doc.get("a").unwrap().as_u64(), Some(1));
    }

    #[test]
    fn quoted_scalars_are_strings() {
        let doc = parse("a: \"true\"\nb: true\nc: ~\nd: '12'\n").unwrap().unwrap();
        assert_eq!(doc.get("a").unwrap().as_bool(), None);
        assert_eq!(doc.get("b").unwrap().as_bool(), Some(true));
        assert_eq!(doc.get("c").unwrap().value, Value::Null);
        assert_eq!(doc.get("d").unwrap().as_u64(), None);
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.line >= 1, "{err}");
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.message.contains("duplicate key"), "{err}");
    }

    #[test]
    fn empty_document_is_none() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }

    #[test]
    fn anchors_and_aliases_resolve() {
        let doc = parse("base: &b {x: 1}\nother: *b\n").unwrap().unwrap();
        assert_eq!(doc.get("other").unwrap().get("x").unwrap().as_u64(), Some(1));
    }

    #[test]
    fn second_document_is_refused() {
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }
}
