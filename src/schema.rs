//! Schema validation on write, for any tier (the policy key `schema:`).
//!
//! A policy may name a JSON Schema file in the sync root. A YAML, JSON or TOML file under that
//! policy must parse and satisfy the schema when it is committed (close, fsync, rename onto it,
//! or a merge); otherwise the write is refused with EINVAL and the stored version stays. The
//! schema is read from the node's tree (so it is itself a synced file) and compiled once per
//! version of the file. A schema that is missing or does not compile refuses every write it
//! governs: silently accepting them would break the promise the policy makes.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::fs::tree;
use crate::merge::{format_of, parse_value};

/// A schema file's bytes and what they compiled to.
type Compiled = (Vec<u8>, Arc<jsonschema::Validator>);

/// Compiled schemas of a mount, by path in the sync root.
pub struct Schemas {
    root: Arc<OwnedFd>,
    cache: Mutex<HashMap<String, Compiled>>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schemas").finish_non_exhaustive()
    }
}

impl Schemas {
    /// Schemas read from the tree whose root fd is `root`.
    pub fn new(root: Arc<OwnedFd>) -> Schemas {
        Schemas {
            root,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn validator(&self, schema: &str) -> Result<Arc<jsonschema::Validator>, String> {
        let (text, _) = tree::read_file(self.root.as_fd(), Path::new(schema))
            .map_err(|e| format!("schema {schema} cannot be read: {e}"))?
            .ok_or_else(|| format!("schema {schema} does not exist"))?;
        if let Some((cached, v)) = self.cache.lock().get(schema) {
            if *cached == text {
                return Ok(v.clone());
            }
        }
        let format = format_of(Path::new(schema)).unwrap_or(crate::merge::Format::Json);
        let value = std::str::from_utf8(&text)
            .map_err(|_| format!("schema {schema} is not UTF-8"))
            .and_then(|t| parse_value(format, t).map_err(|e| format!("schema {schema}: {e}")))?;
        let validator = Arc::new(
            jsonschema::validator_for(&value).map_err(|e| format!("schema {schema} does not compile: {e}"))?,
        );
        self.cache.lock().insert(schema.to_string(), (text, validator.clone()));
        Ok(validator)
    }

    /// Checks `content` of the file at `path` against `schema`. Files that are not YAML, JSON
    /// or TOML are not checked.
    pub fn check(&self, schema: &str, path: &Path, content: &[u8]) -> Result<(), String> {
        let Some(format) = format_of(path) else {
            return Ok(());
        };
        let text = std::str::from_utf8(content).map_err(|_| "not UTF-8 text".to_string())?;
        let value = parse_value(format, text)?;
        let validator = self.validator(schema)?;
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("does not satisfy {schema}: {}", errors.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_checked_against_a_schema_in_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".syncfs/schemas")).unwrap();
        std::fs::write(
            dir.path().join(".syncfs/schemas/issue.json"),
            r#"{"type": "object", "required": ["id", "title"], "properties": {"id": {"type": "integer"}}}"#,
        )
        .unwrap();
        let root = std::fs::File::open(dir.path()).unwrap();
        let schemas = Schemas::new(Arc::new(OwnedFd::from(root)));
        let schema = ".syncfs/schemas/issue.json";
        let p = Path::new("durable/issues/1.yml");
        schemas.check(schema, p, b"id: 1\ntitle: x\n").unwrap();
        let e = schemas.check(schema, p, b"id: 1\n").unwrap_err();
        assert!(e.contains("title"), "{e}");
        let e = schemas.check(schema, p, b"id: one\ntitle: x\n").unwrap_err();
        assert!(e.contains("/id"), "{e}");
        assert!(schemas.check(schema, p, b"id: [\n").unwrap_err().contains("invalid YAML"));
        schemas.check(schema, Path::new("notes.md"), b"anything").unwrap();
        assert!(schemas.check("missing.json", p, b"id: 1\n").unwrap_err().contains("does not exist"));
    }
}
