//! The read-only history view: `.syncfs/history/<path>/` holds every version of the durable
//! file `<path>` as a file of its own, oldest first, named
//! `NNNN-<UTC time>-<commit>-<node><.ext>`, so `ls` lists versions in order and
//! `diff .syncfs/history/f.yml/0001-* .syncfs/history/f.yml/0002-*` compares two of them.
//! Directories of the view mirror the branch's directories.
//!
//! The view is built in the node's tree when a program looks into it (the core asks before a
//! lookup or listing there) and rebuilt when the branch has moved since; nothing else writes
//! it, and the core refuses every change to it (`EROFS`). A version is a commit that gave the
//! file content none of its parents had; a file's view shows its last [`MAX_VERSIONS`].

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use git2::{ObjectType, Oid, Sort};

use super::repo::{is_file_mode, Repo, MAIN};
use super::Shared;
use crate::fs::tree::{self, SetTime};
use crate::policy::HISTORY_DIR;

/// Versions a file's view shows (the newest).
pub const MAX_VERSIONS: usize = 1000;
/// Commits looked at for one file's versions.
const WALK_LIMIT: usize = 20_000;

/// What one entry of a view directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A directory of the branch, or a file's versions.
    Dir,
    /// One version of a file: its blob and the commit's time.
    Version { blob: Oid, secs: i64 },
}

fn io_err(e: git2::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Opens `rel` below `root`, creating missing directories (read-only to programs).
fn ensure_dirs(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let mut dir = tree::open_at(root, c".", flags, 0)?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let cname = tree::cname(name)?;
        dir = match tree::open_at(dir.as_fd(), &cname, flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                match tree::mkdir_at(dir.as_fd(), &cname, 0o555) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                tree::open_at(dir.as_fd(), &cname, flags, 0)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(dir)
}

/// Removes an entry of the view and everything below it.
fn remove_all(dir: BorrowedFd<'_>, name: &CString) -> io::Result<()> {
    let st = tree::lstat_at(dir, name)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let sub = tree::open_at(dir, name, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
        for entry in tree::read_dir(sub.as_fd())? {
            if entry.name == "." || entry.name == ".." {
                continue;
            }
            remove_all(sub.as_fd(), &tree::cname(&entry.name)?)?;
        }
        tree::unlink_at(dir, name, true)
    } else {
        tree::unlink_at(dir, name, false)
    }
}

/// Makes the directory `dir` hold exactly `want`.
fn sync_dir(repo: &Repo, dir: BorrowedFd<'_>, want: &BTreeMap<OsString, Entry>) -> io::Result<()> {
    let mut have: BTreeMap<OsString, bool> = BTreeMap::new();
    for entry in tree::read_dir(dir)? {
        if entry.name == "." || entry.name == ".." {
            continue;
        }
        let is_dir = entry.d_type == libc::DT_DIR;
        let keep = match want.get(&entry.name) {
            Some(Entry::Dir) => is_dir,
            Some(Entry::Version { .. }) => !is_dir,
            None => false,
        };
        if keep {
            have.insert(entry.name.clone(), is_dir);
        } else {
            remove_all(dir, &tree::cname(&entry.name)?)?;
        }
    }
    for (name, entry) in want {
        if have.contains_key(name) {
            continue;
        }
        let cname = tree::cname(name)?;
        match entry {
            Entry::Dir => match tree::mkdir_at(dir, &cname, 0o555) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                _ => {}
            },
            Entry::Version { blob, secs } => {
                // Written under a temporary name and renamed: a reader never sees half a file.
                let mut tmp = b".tmp-".to_vec();
                tmp.extend_from_slice(name.as_bytes());
                let ctmp = tree::cname(OsStr::from_bytes(&tmp))?;
                let fd = tree::open_at(dir, &ctmp, libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY | libc::O_NOFOLLOW, 0o444)?;
                let mut file = std::fs::File::from(fd);
                file.write_all(repo.git.find_blob(*blob).map_err(io_err)?.content())?;
                tree::chmod_fd(file.as_fd(), 0o444)?;
                let time = SetTime::At(std::time::UNIX_EPOCH + std::time::Duration::from_secs((*secs).max(0) as u64));
                tree::utimens_fd(file.as_fd(), time, time)?;
                drop(file);
                tree::rename_at(dir, &ctmp, dir, &cname, 0)?;
            }
        }
    }
    Ok(())
}

/// The versions of `path` on the branch, oldest first: (commit, blob, commit time, node).
fn versions(repo: &Repo, main: Oid, path: &Path) -> Result<Vec<(Oid, Oid, i64, String)>, git2::Error> {
    let mut walk = repo.git.revwalk()?;
    walk.set_sorting(Sort::TOPOLOGICAL | Sort::TIME | Sort::REVERSE)?;
    walk.push(main)?;
    let mut out = Vec::new();
    for id in walk.take(WALK_LIMIT) {
        let id = id?;
        let commit = repo.git.find_commit(id)?;
        let tree = commit.tree()?;
        let Some(blob) = Repo::blob_at(Some(&tree), path) else { continue };
        let inherited = commit
            .parents()
            .any(|p| p.tree().ok().and_then(|t| Repo::blob_at(Some(&t), path)) == Some(blob));
        if inherited {
            continue;
        }
        let stamp = Repo::stamp_of(&commit);
        out.push((id, blob, (stamp.wall_ms / 1000) as i64, stamp.node));
    }
    if out.len() > MAX_VERSIONS {
        out.drain(..out.len() - MAX_VERSIONS);
    }
    Ok(out)
}

/// `20261124T173012Z`
fn compact_time(secs: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

fn safe_node(node: &str) -> String {
    node.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect()
}

/// What the view directory `rel` (relative to the view's root) should hold.
fn wanted(repo: &Repo, main: Oid, rel: &Path) -> Result<BTreeMap<OsString, Entry>, git2::Error> {
    let tree = repo.git.find_commit(main)?.tree()?;
    let mut want = BTreeMap::new();
    let subtree = if rel.as_os_str().is_empty() {
        Some(tree)
    } else {
        match tree.get_path(rel) {
            Ok(entry) if entry.kind() == Some(ObjectType::Tree) => Some(repo.git.find_tree(entry.id())?),
            Ok(entry) if entry.kind() == Some(ObjectType::Blob) && is_file_mode(entry.filemode()) => {
                let ext = rel.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
                for (n, (commit, blob, secs, node)) in versions(repo, main, rel)?.into_iter().enumerate() {
                    let name = format!("{:04}-{}-{}-{}{ext}", n + 1, compact_time(secs), &commit.to_string()[..12], safe_node(&node));
                    want.insert(OsString::from(name), Entry::Version { blob, secs });
                }
                None
            }
            _ => None,
        }
    };
    if let Some(subtree) = subtree {
        for entry in subtree.iter() {
            let is_dir = entry.kind() == Some(ObjectType::Tree);
            let is_file = entry.kind() == Some(ObjectType::Blob) && is_file_mode(entry.filemode());
            if is_dir || is_file {
                want.insert(OsStr::from_bytes(entry.name_bytes()).to_os_string(), Entry::Dir);
            }
        }
    }
    Ok(want)
}

/// Brings the view directory `dir` (relative to the sync root) up to date; for `.syncfs`, makes
/// sure the view's root exists.
pub(super) fn prepare(shared: &Shared, root: BorrowedFd<'_>, dir: &Path) -> io::Result<()> {
    let history = Path::new(HISTORY_DIR);
    if Some(dir) == history.parent() {
        ensure_dirs(root, history)?;
        return Ok(());
    }
    let Ok(rel) = dir.strip_prefix(history) else { return Ok(()) };
    let repo = shared.history.lock();
    let main = repo.target(MAIN);
    let fd = ensure_dirs(root, dir)?;
    if shared.views.lock().get(dir) == Some(&main) {
        return Ok(());
    }
    let want = match main {
        Some(main) => wanted(&repo, main, rel).map_err(io_err)?,
        None => BTreeMap::new(),
    };
    sync_dir(&repo, fd.as_fd(), &want)?;
    shared.views.lock().insert(dir.to_path_buf(), main);
    Ok(())
}
