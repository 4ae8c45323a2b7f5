//! Reading a policy file: YAML with positions, then one check per key, each naming its line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobSetBuilder};

use super::{
    Consistency, MergeRule, Origin, Policy, PolicyTable, Positions, TierKind, CATCH_ALL, GIT_DIR, HISTORY_DIR,
    TEMP_FILE_NAMES,
};
use crate::yaml::{self, Node, Value};

/// The policy file's path inside the sync root.
pub const POLICY_FILE: &str = ".syncfs/policies.yml";

/// A policy file that cannot be used, with the place and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// The file as the user knows it.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong, in one sentence.
    pub reason: String,
}

impl PolicyError {
    pub(crate) fn at(file: &Path, line: usize, col: usize, reason: String) -> PolicyError {
        PolicyError {
            file: file.to_path_buf(),
            line,
            col,
            reason,
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.reason
        )
    }
}

struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, node: &Node, reason: impl Into<String>) -> PolicyError {
        PolicyError::at(self.file, node.line, node.col, reason.into())
    }

    fn string<'n>(&self, node: &'n Node, key: &str) -> Result<&'n str, PolicyError> {
        match &node.value {
            Value::Scalar { text, .. } if !text.is_empty() => Ok(text),
            _ => Err(self.err(node, format!("`{key}` must be a non-empty string"))),
        }
    }

    fn positive(&self, node: &Node, key: &str) -> Result<u64, PolicyError> {
        match node.as_u64() {
            Some(n) if n > 0 => Ok(n),
            _ => Err(self.err(node, format!("`{key}` must be a whole number greater than 0"))),
        }
    }

    fn boolean(&self, node: &Node, key: &str) -> Result<bool, PolicyError> {
        node.as_bool()
            .ok_or_else(|| self.err(node, format!("`{key}` must be true or false")))
    }

    fn map<'n>(&self, node: &'n Node, what: &str) -> Result<&'n [(Node, Node)], PolicyError> {
        node.as_map()
            .ok_or_else(|| self.err(node, format!("{what} must be a mapping, found a {}", node.kind_name())))
    }
}

/// A path inside the sync root: relative, `/`-separated, no `.` or `..` components.
fn is_root_relative(path: &str) -> bool {
    !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn compile_glob(pattern: &str) -> Result<globset::Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .empty_alternates(true)
        .build()
}

pub(super) fn parse(text: &str, file: &Path) -> Result<PolicyTable, PolicyError> {
    let cx = Ctx { file };
    let root = yaml::parse(text)
        .map_err(|e| PolicyError::at(file, e.line, e.col, format!("invalid YAML: {}", e.message)))?
        .ok_or_else(|| {
            PolicyError::at(file, 1, 1, "the file is empty; expected a `policies:` list".into())
        })?;
    let entries = cx.map(&root, "the policy file")?;

    // None: the built-in list; Some(empty): off; Some(globs): the file's own list.
    let mut temp_globs: Option<Vec<String>> = None;
    let mut policies_node = None;
    for (key, value) in entries {
        match key.as_str().unwrap_or("") {
            "policies" => policies_node = Some(value),
            "local_temp_files" => temp_globs = temp_files(&cx, value)?,
            other => {
                return Err(cx.err(
                    key,
                    format!("unknown key `{other}` (expected `policies` or `local_temp_files`)"),
                ))
            }
        }
    }
    let policies_node = policies_node
        .ok_or_else(|| cx.err(&root, "missing `policies:` list"))?;
    let items: &[Node] = match &policies_node.value {
        Value::Seq(items) => items,
        Value::Null => &[],
        _ => {
            return Err(cx.err(
                policies_node,
                format!("`policies` must be a list, found a {}", policies_node.kind_name()),
            ))
        }
    };

    let mut policies = Vec::new();
    let mut globs = GlobSetBuilder::new();
    let mut owners = Vec::new();
    // The history view is syncfs's own: no table can sync or write it.
    for glob in [HISTORY_DIR.to_string(), format!("{HISTORY_DIR}/**")] {
        globs.add(compile_glob(&glob).expect("built-in globs compile"));
        owners.push(policies.len());
    }
    let mut history = Policy::builtin("history view", &format!("{HISTORY_DIR}/**"), TierKind::Local, Consistency::None);
    history.read_only = true;
    policies.push(Arc::new(history));
    // The event feed and the status document are syncfs's own too, written by the daemon.
    for glob in [crate::events::EVENTS_FILE, crate::status::STATUS_FILE] {
        globs.add(compile_glob(glob).expect("built-in globs compile"));
        owners.push(policies.len());
    }
    let mut own = Policy::builtin(
        "syncfs files",
        &format!("{} | {}", crate::events::EVENTS_FILE, crate::status::STATUS_FILE),
        TierKind::Local,
        Consistency::None,
    );
    own.read_only = true;
    policies.push(Arc::new(own));
    // Git's own repositories (`git init`, `git clone` anywhere in the mount) stay on this node:
    // their object files and lock files are no shared content, and a git path cannot hold
    // `.git` at all. The work tree around them syncs by the table.
    for glob in [format!("**/{GIT_DIR}"), format!("**/{GIT_DIR}/**")] {
        globs.add(compile_glob(&glob).expect("built-in globs compile"));
        owners.push(policies.len());
    }
    policies.push(Arc::new(Policy::builtin(
        "git repositories",
        &format!("**/{GIT_DIR} | **/{GIT_DIR}/**"),
        TierKind::Local,
        Consistency::None,
    )));
    let mut builtin_temp = None;
    match &temp_globs {
        None => {
            builtin_temp = Some(policies.len());
            policies.push(Arc::new(Policy::builtin(
                "temp files",
                &TEMP_FILE_NAMES.join(" | "),
                TierKind::Local,
                Consistency::None,
            )));
        }
        Some(list) if !list.is_empty() => {
            for glob in list {
                globs.add(compile_glob(&format!("**/{glob}")).expect("checked in temp_files"));
                owners.push(policies.len());
            }
            policies.push(Arc::new(Policy::builtin("temp files", &list.join(" | "), TierKind::Local, Consistency::None)));
        }
        Some(_) => {}
    }
    for item in items {
        let policy = parse_policy(&cx, item)?;
        globs.add(compile_glob(&policy.pattern).expect("checked in parse_policy"));
        owners.push(policies.len());
        policies.push(Arc::new(policy));
    }
    policies.push(Arc::new(Policy::builtin("catch-all", "**", CATCH_ALL.0, CATCH_ALL.1)));
    let set = globs
        .build()
        .map_err(|e| PolicyError::at(file, 1, 1, format!("cannot compile the patterns: {e}")))?;
    Ok(PolicyTable {
        policies,
        set,
        owners,
        source: text.to_string(),
        builtin_temp,
    })
}

/// `local_temp_files:` true (the built-in list), false (none), or a list of file-name globs
/// that replaces the built-in list.
fn temp_files(cx: &Ctx<'_>, value: &Node) -> Result<Option<Vec<String>>, PolicyError> {
    if let Value::Seq(items) = &value.value {
        let mut list = Vec::new();
        for item in items {
            let glob = cx.string(item, "local_temp_files")?;
            if glob.contains('/') {
                return Err(cx.err(item, format!("`{glob}`: temp-file globs match file names, so they cannot contain `/`")));
            }
            compile_glob(&format!("**/{glob}")).map_err(|e| cx.err(item, format!("invalid glob `{glob}`: {e}")))?;
            list.push(glob.to_string());
        }
        return Ok(Some(list));
    }
    let on = value
        .as_bool()
        .ok_or_else(|| cx.err(value, "`local_temp_files` must be true, false, or a list of file-name globs"))?;
    Ok(if on { None } else { Some(Vec::new()) })
}

const MERGE_RULES: &str = "immutable, lww, union, max, min, or { merge_by: FIELD }";

/// One field's rule: a bare name, or the mapping `{ merge_by: FIELD }`.
fn merge_rule(cx: &Ctx<'_>, field: &str, rule: &Node) -> Result<MergeRule, PolicyError> {
    match &rule.value {
        Value::Scalar { text, .. } => MergeRule::from_name(text).ok_or_else(|| {
            let hint = if text == "merge_by" { " (`merge_by` names its key field: { merge_by: FIELD })" } else { "" };
            cx.err(rule, format!("unknown merge rule `{text}` for field `{field}` (expected {MERGE_RULES}){hint}"))
        }),
        Value::Map(entries) => {
            let mut by = None;
            for (key, value) in entries {
                match key.as_str().unwrap_or("") {
                    "merge_by" => by = Some(value),
                    other => {
                        return Err(cx.err(
                            key,
                            format!("unknown key `{other}` in the merge rule of field `{field}` (expected merge_by)"),
                        ))
                    }
                }
            }
            let by = by.ok_or_else(|| {
                cx.err(rule, format!("the merge rule of field `{field}` is an empty mapping (expected {{ merge_by: FIELD }})"))
            })?;
            match &by.value {
                Value::Scalar { text, .. } if !text.is_empty() => Ok(MergeRule::MergeBy(text.clone())),
                _ => Err(cx.err(
                    by,
                    format!(
                        "`merge_by` of field `{field}` needs the name of the field that identifies a list element, \
                         like {{ merge_by: target }}"
                    ),
                )),
            }
        }
        Value::Null | Value::Seq(_) => Err(cx.err(
            rule,
            format!("the merge rule of field `{field}` must be one of {MERGE_RULES}, found a {}", rule.kind_name()),
        )),
    }
}

fn parse_policy(cx: &Ctx<'_>, item: &Node) -> Result<Policy, PolicyError> {
    let entries = cx.map(item, "each policy")?;
    let mut pattern = None;
    let mut tier = None;
    let mut consistency = None;
    let mut ttl = None;
    let mut ephemeral = None;
    let mut merge_rules = None;
    let mut schema = None;
    let mut retention = None;
    let mut purge = None;
    for (key, value) in entries {
        let slot = match key.as_str().unwrap_or("") {
            "pattern" => &mut pattern,
            "tier" => &mut tier,
            "consistency" => &mut consistency,
            "ttl" => &mut ttl,
            "ephemeral" => &mut ephemeral,
            "merge_rules" => &mut merge_rules,
            "schema" => &mut schema,
            "retention" => &mut retention,
            "purge" => &mut purge,
            other => {
                return Err(cx.err(
                    key,
                    format!(
                        "unknown key `{other}` (a policy has pattern, tier, consistency, ttl, \
                         ephemeral, merge_rules, schema, retention, purge)"
                    ),
                ))
            }
        };
        *slot = Some(value);
    }

    let pattern_node = pattern.ok_or_else(|| cx.err(item, "policy without a `pattern`"))?;
    let pattern = cx.string(pattern_node, "pattern")?;
    if pattern.starts_with('/') {
        return Err(cx.err(
            pattern_node,
            format!("pattern `{pattern}` is absolute; patterns are relative to the sync root"),
        ));
    }
    if pattern.split('/').any(|c| c == "..") {
        return Err(cx.err(pattern_node, format!("pattern `{pattern}` contains `..`")));
    }
    compile_glob(pattern)
        .map_err(|e| cx.err(pattern_node, format!("invalid pattern `{pattern}`: {}", e.kind())))?;

    let tier_node = tier.ok_or_else(|| cx.err(item, "policy without a `tier`"))?;
    let tier_name = cx.string(tier_node, "tier")?;
    let tier = TierKind::from_name(tier_name).ok_or_else(|| {
        cx.err(
            tier_node,
            format!(
                "unknown tier `{tier_name}` (expected one of: {})",
                TierKind::ALL.map(TierKind::name).join(", ")
            ),
        )
    })?;

    let consistency = match consistency {
        None => tier.default_consistency(),
        Some(node) => {
            let name = cx.string(node, "consistency")?;
            let c = Consistency::from_name(name).ok_or_else(|| {
                cx.err(
                    node,
                    format!(
                        "unknown consistency `{name}` (expected one of: {})",
                        Consistency::ALL.map(Consistency::name).join(", ")
                    ),
                )
            })?;
            if !tier.supports(c) {
                let supported: Vec<_> = Consistency::ALL
                    .into_iter()
                    .filter(|c| tier.supports(*c))
                    .map(Consistency::name)
                    .collect();
                return Err(cx.err(
                    node,
                    format!(
                        "tier {tier} cannot serve consistency {c} (it serves: {})",
                        supported.join(", ")
                    ),
                ));
            }
            c
        }
    };

    let ttl = match ttl {
        None => None,
        Some(node) => {
            if tier != TierKind::NatsKv {
                return Err(cx.err(node, format!("`ttl` applies to nats-kv paths, not {tier}")));
            }
            Some(Duration::from_secs(cx.positive(node, "ttl")?))
        }
    };

    let ephemeral = match ephemeral {
        None => false,
        Some(node) => {
            let value = cx.boolean(node, "ephemeral")?;
            if value && (tier != TierKind::NatsKv || ttl.is_none()) {
                return Err(cx.err(
                    node,
                    "`ephemeral: true` needs tier nats-kv and a `ttl` (entries expire one TTL \
                     after their mount dies)",
                ));
            }
            value
        }
    };

    let merge_rules = match merge_rules {
        None => BTreeMap::new(),
        Some(node) => {
            if consistency != Consistency::Merge {
                return Err(cx.err(node, "`merge_rules` needs `consistency: merge`"));
            }
            let mut rules = BTreeMap::new();
            for (field, rule) in cx.map(node, "`merge_rules`")? {
                let field_name = cx.string(field, "merge_rules field")?;
                rules.insert(field_name.to_string(), merge_rule(cx, field_name, rule)?);
            }
            rules
        }
    };

    let schema_at = schema.map(|n| (n.line, n.col)).unwrap_or_default();
    let schema = match schema {
        None => None,
        Some(node) => {
            let path = cx.string(node, "schema")?;
            if matches!(tier, TierKind::NatsStream | TierKind::ObjectStore) {
                // Appends are fragments of a document and blobs are not parsed at all.
                return Err(cx.err(node, format!("`schema` applies to git, nats-kv and local paths, not {tier}")));
            }
            if !is_root_relative(path) {
                return Err(cx.err(
                    node,
                    format!("schema `{path}` must be a path inside the sync root, like .syncfs/schemas/x.json"),
                ));
            }
            Some(path.to_string())
        }
    };

    let max_age = match retention {
        None => None,
        Some(node) => {
            if tier != TierKind::NatsStream {
                return Err(cx.err(node, format!("`retention` applies to nats-stream paths, not {tier}")));
            }
            let mut days = None;
            for (key, value) in cx.map(node, "`retention`")? {
                match key.as_str().unwrap_or("") {
                    "max_age_days" => days = Some(cx.positive(value, "max_age_days")?),
                    other => {
                        return Err(cx.err(
                            key,
                            format!("unknown key `{other}` in retention (expected max_age_days)"),
                        ))
                    }
                }
            }
            days.map(|d| Duration::from_secs(d * 86_400))
        }
    };

    let purge = match purge {
        None => false,
        Some(node) => {
            if tier != TierKind::NatsStream {
                return Err(cx.err(node, format!("`purge` applies to nats-stream paths, not {tier}")));
            }
            cx.boolean(node, "purge")?
        }
    };

    Ok(Policy {
        pattern: pattern.to_string(),
        tier,
        consistency,
        ttl,
        ephemeral,
        merge_rules,
        schema,
        max_age,
        purge,
        origin: Origin::File {
            line: item.line,
        },
        read_only: false,
        positions: Positions {
            tier: (tier_node.line, tier_node.col),
            schema: schema_at,
        },
    })
}
