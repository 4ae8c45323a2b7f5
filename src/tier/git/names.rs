//! The names git refuses as tree entries.
//!
//! libgit2 validates every entry it inserts into a tree (`valid_entry_name` in `tree.c`, with
//! `git_path_is_valid` of `path.c`): a name that fails makes the whole tree update fail, so one
//! such file would stop every later commit of the node. The durable tier therefore refuses
//! these names itself, at create, close and rename (`EPERM`), and keeps any that still reach it
//! (an older tree, another node's push made with plain git) out of its tree updates.
//!
//! The rules are libgit2's for a tree entry, with both of its `.git` protections on:
//! `core.protectNTFS` (libgit2's default everywhere) and `core.protectHFS` (its default on
//! macOS, where a clone of the shared remote could not check such a name out):
//! - empty names, `.`, `..`, names with `/` or NUL;
//! - `.git` in any case;
//! - NTFS: `.git` or its 8.3 short name `GIT~1` (any case) followed only by spaces and dots,
//!   or by `:` (an alternate data stream) or `\`;
//! - HFS+: `.git` once the code points HFS+ ignores (zero-width joiners, direction marks,
//!   U+FEFF, ...) are dropped. libgit2 compares the low byte of each code point, ASCII-lowered,
//!   so a few non-ASCII look-alikes (U+0147 for `G`) are refused too; this module does the
//!   same, so that what it accepts, libgit2 accepts.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Why git refuses `path` as a path of tree entries, if it does.
pub(crate) fn refusal(path: &Path) -> Option<String> {
    let mut any = false;
    for c in path.components() {
        any = true;
        let Component::Normal(name) = c else {
            return Some(format!("git refuses the path {}: not a plain relative path", path.display()));
        };
        if let Some(why) = refused_entry(name.as_bytes()) {
            return Some(format!("git refuses the name {:?} ({why})", name.to_string_lossy()));
        }
    }
    (!any).then(|| "git refuses an empty path".to_string())
}

/// Why git refuses one tree entry name, if it does.
fn refused_entry(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty");
    }
    if name.contains(&0) || name.contains(&b'/') {
        return Some("a NUL or `/` in a name");
    }
    if name == b"." || name == b".." {
        return Some("`.` and `..` name no entry");
    }
    if name.eq_ignore_ascii_case(b".git") {
        return Some("the repository's own directory");
    }
    if ntfs_dotgit(name) {
        return Some("`.git` or its NTFS short name GIT~1, as Windows reads it");
    }
    if hfs_dotgit(name) {
        return Some("`.git` with characters HFS+ ignores");
    }
    None
}

/// `.git` or `GIT~1` (any case), then only spaces and dots, or a `:` or `\` (libgit2's
/// `validate_dotgit_ntfs` with the reserved names of a repository without a work tree).
fn ntfs_dotgit(name: &[u8]) -> bool {
    let Some(rest) = [&b".git"[..], b"GIT~1"]
        .iter()
        .find(|r| name.len() >= r.len() && name[..r.len()].eq_ignore_ascii_case(r))
        .map(|r| &name[r.len()..])
    else {
        return false;
    };
    matches!(rest.first(), Some(b'\\' | b':')) || rest.iter().all(|b| matches!(b, b' ' | b'.'))
}

/// Code points HFS+ leaves out of a name when comparing it.
const HFS_IGNORED: [u32; 16] = [
    0x200c, 0x200d, 0x200e, 0x200f, 0x202a, 0x202b, 0x202c, 0x202d, 0x202e, 0x206a, 0x206b, 0x206c, 0x206d,
    0x206e, 0x206f, 0xfeff,
];

/// The next character as libgit2's `next_hfs_char` sees it: ignored code points skipped, the
/// low byte of the code point, ASCII-lowered; `Some(0)` at the end, `None` for bytes that are
/// not UTF-8 as libgit2 decodes it.
fn next_hfs_char(name: &mut &[u8]) -> Option<u8> {
    while !name.is_empty() {
        let (cp, len) = utf8_next(name)?;
        *name = &name[len..];
        if HFS_IGNORED.contains(&cp) {
            continue;
        }
        return Some(((cp & 0xff) as u8).to_ascii_lowercase());
    }
    Some(0)
}

/// One code point as libgit2's `git_utf8_iterate` decodes it (it refuses overlong forms,
/// surrogates and noncharacters).
fn utf8_next(s: &[u8]) -> Option<(u32, usize)> {
    let len = match s[0] {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => return None,
    };
    if s.len() < len || s[1..len].iter().any(|b| b & 0xc0 != 0x80) {
        return None;
    }
    let tail = |i: usize| (s[i] & 0x3f) as u32;
    let cp = match len {
        1 => s[0] as u32,
        2 => Some(((s[0] & 0x1f) as u32) << 6 | tail(1)).filter(|c| *c >= 0x80)?,
        3 => Some(((s[0] & 0x0f) as u32) << 12 | tail(1) << 6 | tail(2))
            .filter(|c| *c >= 0x800 && !(0xd800..0xe000).contains(c) && !(0xfdd0..0xfdf0).contains(c))?,
        _ => Some(((s[0] & 0x07) as u32) << 18 | tail(1) << 12 | tail(2) << 6 | tail(3))
            .filter(|c| (0x10000..0x110000).contains(c))?,
    };
    ((cp & 0xffff) < 0xfffe).then_some((cp, len))
}

/// `.git` once HFS+'s ignored code points are dropped (libgit2's `validate_dotgit_hfs`).
fn hfs_dotgit(mut name: &[u8]) -> bool {
    let name = &mut name;
    next_hfs_char(name) == Some(b'.')
        && b"git".iter().all(|c| next_hfs_char(name) == Some(*c))
        && next_hfs_char(name) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, refused)
    const NAMES: &[(&str, bool)] = &[
        ("", true),
        (".", true),
        ("..", true),
        (".git", true),
        (".GIT", true),
        (".Git", true),
        (".git ", true),
        (".git.", true),
        (".git...", true),
        (".git . .", true),
        (".git:", true),
        (".git:stream", true),
        (".git\\x", true),
        ("GIT~1", true),
        ("git~1", true),
        ("Git~1 .", true),
        ("GIT~1:x", true),
        (".g\u{200c}it", true),
        (".gi\u{feff}t", true),
        ("\u{200e}.GIT", true),
        (".git\u{206f}", true),
        (".\u{147}it", true),
        ("a\0b", true),
        ("a/b", true),
        // Look-alikes git takes.
        ("git", false),
        ("git~2", false),
        ("GIT~10", false),
        ("GIT~1x", false),
        (".gitx", false),
        (".git-x", false),
        (".gitignore", false),
        (".gitmodules", false),
        (".gitattributes", false),
        ("x.git", false),
        (" .git", false),
        (".g.it", false),
        (".git\u{e9}", false),
        (".gi\u{200b}t", false),
        (".git\u{ff}", false),
        ("CON", false),
        ("aux.txt", false),
        ("trailing. ", false),
        ("\u{200c}", false),
    ];

    fn refused(name: &str) -> bool {
        refused_entry(name.as_bytes()).is_some()
    }

    #[test]
    fn the_table_of_names() {
        for (name, expect) in NAMES {
            assert_eq!(refused(name), *expect, "{name:?}");
        }
        assert!(refused_entry(b".g\xffit").is_none(), "bytes that are not UTF-8 are names like others");
    }

    #[test]
    fn paths_are_refused_by_any_component() {
        for (path, expect) in [
            ("durable/a.yml", false),
            ("durable/GIT~1", true),
            ("durable/.git./x.yml", true),
            ("a/.git/config", true),
            ("/abs", true),
            ("../up", true),
            ("", true),
            (".syncfs/policies.yml", false),
        ] {
            assert_eq!(refusal(Path::new(path)).is_some(), expect, "{path:?}");
        }
        let why = refusal(Path::new("durable/GIT~1")).unwrap();
        assert!(why.contains("\"GIT~1\"") && why.contains("short name"), "{why}");
    }

    /// Every name made of a few pieces: what this module accepts, libgit2 inserts into a tree
    /// with both protections on, and what it refuses, libgit2 refuses.
    #[test]
    fn agrees_with_libgit2() {
        let dir = tempfile::tempdir().unwrap();
        {
            let repo = git2::Repository::init_bare(dir.path()).unwrap();
            let mut cfg = repo.config().unwrap();
            cfg.set_bool("core.protectHFS", true).unwrap();
            cfg.set_bool("core.protectNTFS", true).unwrap();
        }
        let repo = git2::Repository::open_bare(dir.path()).unwrap();
        let blob = repo.blob(b"x").unwrap();
        let pieces = [
            "", ".", "git", "GIT", "gIt", "~1", "~2", " ", ":", "\\", "x", "\u{200c}", "\u{feff}", "\u{206a}", "\u{147}",
            "\u{100}", "\u{12e}", "\u{e9}",
        ];
        let mut names: Vec<String> = NAMES.iter().map(|(n, _)| n.to_string()).filter(|n| !n.contains('\0')).collect();
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    names.push(format!("{a}{b}{c}"));
                    names.push(format!(".{a}{b}{c}"));
                }
            }
        }
        let mut checked = 0;
        for name in &names {
            let mut tb = repo.treebuilder(None).unwrap();
            let libgit2_takes = tb.insert(name, blob, 0o100644).is_ok();
            assert_eq!(!refused(name), libgit2_takes, "{name:?}: ours refuses {}, libgit2 takes {libgit2_takes}", refused(name));
            checked += 1;
        }
        assert!(checked > 10_000);
    }
}
