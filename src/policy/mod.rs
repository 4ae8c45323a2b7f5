//! The policy table: which tier owns a path, and with what consistency.
//!
//! Pure and synchronous: parsing, validation and matching do no I/O, so they are tested with
//! tables of cases and can be called on any thread, including FUSE callbacks.
//!
//! Matching order is part of the user-facing contract (SPEC section 2):
//! 0. the built-in history rule: `.syncfs/history/**` is a read-only view syncfs makes, the
//!    read-only `.syncfs/events` and `.syncfs/status` are syncfs's own (local) files, and
//!    the built-in git rule: every `.git` directory and what is below it stays `local`;
//! 1. the built-in temp-file rule ([`TEMP_FILE_NAMES`] stay `local`), unless the file says
//!    `local_temp_files: false` (or gives a list of globs of its own instead);
//! 2. the file's policies, first match wins;
//! 3. the built-in catch-all.
//!
//! Patterns are globset globs matched against the path relative to the sync root, with
//! `literal_separator` on: `*` stays within one directory, `**` crosses directories.

mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use globset::{Candidate, GlobSet};

pub use parse::{PolicyError, POLICY_FILE};

/// The backend that owns a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    /// A git repository per node, pushed to a shared remote.
    Git,
    /// NATS JetStream key-value buckets.
    NatsKv,
    /// NATS JetStream streams.
    NatsStream,
    /// The NATS object store.
    ObjectStore,
    /// Kept on this node only, never synced.
    Local,
}

impl TierKind {
    /// Every tier, in the order the policy file documents them.
    pub const ALL: [TierKind; 5] = [
        TierKind::Git,
        TierKind::NatsKv,
        TierKind::NatsStream,
        TierKind::ObjectStore,
        TierKind::Local,
    ];

    /// The name used in policy files and xattrs.
    pub fn name(self) -> &'static str {
        match self {
            TierKind::Git => "git",
            TierKind::NatsKv => "nats-kv",
            TierKind::NatsStream => "nats-stream",
            TierKind::ObjectStore => "object-store",
            TierKind::Local => "local",
        }
    }

    /// Parses a tier name as written in a policy file.
    pub fn from_name(name: &str) -> Option<TierKind> {
        TierKind::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The consistency a policy gets when it names this tier but no consistency.
    pub fn default_consistency(self) -> Consistency {
        match self {
            TierKind::Git => Consistency::Lww,
            TierKind::NatsKv => Consistency::Lww,
            TierKind::NatsStream => Consistency::Append,
            TierKind::ObjectStore => Consistency::ContentAddressed,
            TierKind::Local => Consistency::None,
        }
    }

    /// Whether this tier can serve a consistency mode (SPEC section 3, the table's rows).
    pub fn supports(self, consistency: Consistency) -> bool {
        use Consistency as C;
        matches!(
            (self, consistency),
            (TierKind::Git, C::Merge | C::Lww)
                | (TierKind::NatsKv, C::Lww | C::Cas | C::CasCreate)
                | (TierKind::NatsStream, C::Append)
                | (TierKind::ObjectStore, C::ContentAddressed)
                | (TierKind::Local, C::None)
        )
    }
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a program can rely on when it writes a path (SPEC section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// Field-by-field three-way merge of concurrent edits (git).
    Merge,
    /// Last write wins.
    Lww,
    /// Compare-and-swap against the revision the writer started from.
    Cas,
    /// Exclusive creation, then compare-and-swap.
    CasCreate,
    /// Appends only, one order on every node.
    Append,
    /// Whole objects, stored once per content.
    ContentAddressed,
    /// Not synced.
    None,
}

impl Consistency {
    const ALL: [Consistency; 7] = [
        Consistency::Merge,
        Consistency::Lww,
        Consistency::Cas,
        Consistency::CasCreate,
        Consistency::Append,
        Consistency::ContentAddressed,
        Consistency::None,
    ];

    /// The name used in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Merge => "merge",
            Consistency::Lww => "lww",
            Consistency::Cas => "cas",
            Consistency::CasCreate => "cas-create",
            Consistency::Append => "append",
            Consistency::ContentAddressed => "content-addressed",
            Consistency::None => "none",
        }
    }

    /// Parses a consistency name as written in a policy file.
    pub fn from_name(name: &str) -> Option<Consistency> {
        Consistency::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one field of a structured document merges (SPEC section 3.2).
///
/// Rules decide only fields both sides changed differently: a field one side left alone takes
/// the other side's change whatever its rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MergeRule {
    /// Set once; later changes are refused and lose in a merge.
    Immutable,
    /// The later write wins, by the cluster's clock.
    Lww,
    /// Lists: set union with removals. Maps: keys added on either side kept, keys removed on
    /// one side and untouched on the other removed, keys both changed merged the same way.
    Union,
    /// The larger value wins.
    Max,
    /// The smaller value wins (a creation time: the first one set stays).
    Min,
    /// A list of maps whose elements are matched by the value of this key field (tbd's
    /// `dependencies`, keyed by `target`), then merged element by element.
    MergeBy(String),
}

impl MergeRule {
    /// The rules written as a bare name in a policy file.
    pub const NAMED: [MergeRule; 5] = [
        MergeRule::Immutable,
        MergeRule::Lww,
        MergeRule::Union,
        MergeRule::Max,
        MergeRule::Min,
    ];

    /// The rule as a policy file writes it: a name, or `{ merge_by: FIELD }`.
    pub fn name(&self) -> std::borrow::Cow<'static, str> {
        match self {
            MergeRule::Immutable => "immutable".into(),
            MergeRule::Lww => "lww".into(),
            MergeRule::Union => "union".into(),
            MergeRule::Max => "max".into(),
            MergeRule::Min => "min".into(),
            // A flow mapping, so the text pastes back into a `merge_rules: { ... }` line; a
            // field YAML would misread is quoted (a JSON string is a YAML one).
            MergeRule::MergeBy(field) => {
                let plain = field.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                    && field.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
                let field = if plain { field.clone() } else { serde_json::to_string(field).unwrap_or_default() };
                format!("{{ merge_by: {field} }}").into()
            }
        }
    }

    /// Parses a rule written as a bare name (`merge_by` is a mapping, see the parser).
    pub fn from_name(name: &str) -> Option<MergeRule> {
        MergeRule::NAMED.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for MergeRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Where a policy came from, for `policy explain` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Written in the policy file, at this 1-based line.
    File {
        /// Line of the policy's first key.
        line: usize,
    },
    /// A built-in rule.
    Builtin(&'static str),
}

/// One rule of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The glob, as written (built-ins list their globs joined by ` | `).
    pub pattern: String,
    /// The tier that owns matching paths.
    pub tier: TierKind,
    /// The consistency mode.
    pub consistency: Consistency,
    /// Time to live of entries (nats-kv only).
    pub ttl: Option<Duration>,
    /// The creating mount keeps entries alive; they expire one TTL after it dies.
    pub ephemeral: bool,
    /// Field rules for `merge` (top-level field names; nested maps recurse).
    pub merge_rules: BTreeMap<String, MergeRule>,
    /// A JSON Schema, as a path in the sync root, that writes must satisfy.
    pub schema: Option<String>,
    /// How long a stream keeps messages (nats-stream only).
    pub max_age: Option<Duration>,
    /// Programs may purge a file's messages by truncating it to zero or unlinking it
    /// (nats-stream only; otherwise both are `EPERM`).
    pub purge: bool,
    /// Where the rule is written.
    pub origin: Origin,
    /// Line and column of the `tier:` value and of the `schema:` value, for errors that
    /// concern them after parsing.
    pub positions: Positions,
    /// Nothing may change these paths through the mount (the history view): `EROFS`.
    pub read_only: bool,
}

/// Positions of values inside a policy, 1-based (zero for built-in rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Positions {
    /// The `tier:` value.
    pub tier: (usize, usize),
    /// The `schema:` value.
    pub schema: (usize, usize),
}

impl Policy {
    fn builtin(name: &'static str, pattern: &str, tier: TierKind, consistency: Consistency) -> Policy {
        Policy {
            pattern: pattern.to_string(),
            tier,
            consistency,
            ttl: None,
            ephemeral: false,
            merge_rules: BTreeMap::new(),
            schema: None,
            max_age: None,
            purge: false,
            origin: Origin::Builtin(name),
            positions: Positions::default(),
            read_only: false,
        }
    }
}

/// The read-only view of durable files' past versions (`.syncfs/history/<path>/`).
pub const HISTORY_DIR: &str = ".syncfs/history";

/// The name of git's repository directory: any directory of this name, anywhere in the mount,
/// is kept local with everything below it (a built-in rule before the file's own).
pub const GIT_DIR: &str = ".git";

/// The names the built-in temp-file rule keeps local, in every directory: the temporary files
/// of the idioms programs use to replace a file atomically or to edit it, which must never
/// reach a tier (git would commit them, fsync would push them). `local_temp_files:` in the
/// policy file turns the rule off (`false`) or replaces this list with globs of its own.
/// Written as globs for people; [`is_temp_name`] is the exact test.
pub const TEMP_FILE_NAMES: [&str; 14] = [
    "*.swp",             // vim's swap files (.NAME.swp), and .swo, .swx
    "*.swo",
    "*.swx",
    "4913",              // vim checks that it may write a directory with this file
    "*~",                // backups (emacs, vim, nano)
    ".#*",               // emacs lock files
    "#*#",               // emacs autosaves
    "*.tmp",             // many programs
    "*.tmp-*",           // npm's write-file-atomic and atomically (tbd): NAME.tmp-<stamp><hex>
    "*.part",            // downloads, rsync --partial, KDE
    "sedXXXXXX",         // GNU sed -i (six letters or digits, a digit or capital among them)
    "tmpXXXXXXXX",       // Python's tempfile (eight of a-z, 0-9, _, a digit among them)
    ".NAME.XXXXXX",      // rsync (six letters or digits, capitals and small letters among them)
    "*.crdownload",      // browsers
];

/// Whether a file name is one of [`TEMP_FILE_NAMES`].
pub fn is_temp_name(name: &[u8]) -> bool {
    // The random parts below come from mkstemp (letters of both cases and digits) and
    // Python's tempfile (lower-case letters, digits, `_`). A real name almost never mixes like
    // that, so each rule also asks for the mix: `sediments`, `tmpl_header`, `.env.sample` and
    // `.babelrc.node14` stay real files, at the price of missing the rare temporary name
    // without it (0.5% of sed's, 8% of Python's and of rsync's).
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    let ends = |suffix: &[u8]| name.len() > suffix.len() && name.ends_with(suffix);
    let mkstemp = |x: &[u8]| x.len() == 6 && x.iter().all(alnum);
    let sed = |x: &[u8]| mkstemp(x) && x.iter().any(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
    let python = |x: &[u8]| {
        x.len() == 8
            && x.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            && x.iter().any(u8::is_ascii_digit)
    };
    let rsync = || {
        // `.` NAME `.` XXXXXX
        name.len() >= 9 && name[0] == b'.' && name[name.len() - 7] == b'.' && {
            let x = &name[name.len() - 6..];
            mkstemp(x) && x.iter().any(u8::is_ascii_uppercase) && x.iter().any(u8::is_ascii_lowercase)
        }
    };
    ends(b".swp")
        || ends(b".swo")
        || ends(b".swx")
        || name == b"4913"
        || ends(b"~")
        || name.starts_with(b".#")
        || (name.len() > 2 && name.starts_with(b"#") && name.ends_with(b"#"))
        || ends(b".tmp")
        || name.windows(5).skip(1).any(|w| w == b".tmp-")
        || ends(b".part")
        || ends(b".crdownload")
        || name.strip_prefix(b"sed").is_some_and(sed)
        || name.strip_prefix(b"tmp").is_some_and(python)
        || rsync()
}

/// Tier and consistency of the built-in last rule (SPEC section 2): durable, last write wins.
pub const CATCH_ALL: (TierKind, Consistency) = (TierKind::Git, Consistency::Lww);

/// The policy file written into a new sync root on its first mount.
pub const DEFAULT_POLICY_FILE: &str = include_str!("default.yml");

/// A compiled policy table.
#[derive(Debug, Clone)]
pub struct PolicyTable {
    /// Built-in temp rule (if enabled), the file's rules, the catch-all, in matching order.
    policies: Vec<Arc<Policy>>,
    /// One glob per entry of `owners`, in the same order.
    set: GlobSet,
    /// For each glob in `set`, the index of the policy it belongs to.
    owners: Vec<usize>,
    /// The text the table was parsed from.
    source: String,
    /// The index of the built-in temp-file rule when it uses [`is_temp_name`] (a list of the
    /// file's own is in `set` instead).
    builtin_temp: Option<usize>,
}

impl PolicyTable {
    /// Parses and validates a policy file. `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<PolicyTable, PolicyError> {
        parse::parse(text, file)
    }

    /// The built-in default table (the parsed [`DEFAULT_POLICY_FILE`]).
    pub fn default_table() -> PolicyTable {
        PolicyTable::parse(DEFAULT_POLICY_FILE, Path::new("<built-in default>"))
            .expect("the built-in default policy file is valid")
    }

    /// The policy that governs `path` (relative to the sync root, `/`-separated, no leading
    /// slash; the root itself is the empty string). Never fails: the catch-all matches all.
    pub fn resolve(&self, path: impl AsRef<Path>) -> &Arc<Policy> {
        let candidate = Candidate::new(path.as_ref());
        MATCHES.with(|buf| {
            let mut buf = buf.borrow_mut();
            self.set.matches_candidate_into(&candidate, &mut buf);
            let first = buf.iter().map(|&glob| self.owners[glob]).min();
            if let Some(temp) = self.builtin_temp.filter(|t| first.is_none_or(|f| f > *t)) {
                let name = path.as_ref().file_name().map(|n| n.as_encoded_bytes());
                if name.is_some_and(is_temp_name) {
                    return &self.policies[temp];
                }
            }
            &self.policies[first.unwrap_or(self.policies.len() - 1)]
        })
    }

    /// All rules in matching order, built-ins included.
    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// The rules some path can match: all of them up to the first `**` (the rules after it,
    /// the built-in catch-all included, are shadowed). A mount needs the tiers of these only.
    pub fn reachable(&self) -> &[Arc<Policy>] {
        match self.policies.iter().position(|p| p.pattern == "**") {
            Some(i) => &self.policies[..=i],
            None => &self.policies,
        }
    }

    /// The policy file text this table was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Checks the bytes of a [`POLICY_FILE`] as a write of it is checked, for content that
    /// arrives by other ways (the git remote): UTF-8 text and a table this build can apply.
    /// The reason names the line and column.
    pub fn check_file(bytes: &[u8]) -> Result<PolicyTable, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
        PolicyTable::parse(text, Path::new(POLICY_FILE))
            .map_err(|e| format!("line {}, column {}: {}", e.line, e.col, e.reason))
    }
}

thread_local! {
    static MATCHES: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests;
