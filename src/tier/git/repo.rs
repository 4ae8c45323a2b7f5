//! The node's bare repository: its refs, objects, and the stamps commits carry.
//!
//! Three refs matter, and only the git thread moves them, each by compare-and-swap:
//! - [`MAIN`]: this node's branch, local commits and merges;
//! - [`ORIGIN`]: the remote's branch as last fetched;
//! - [`TREE`]: the commit whose content the materialized tree holds for every path without
//!   an uncommitted local change. Comparing the tree with it tells, after a crash, which
//!   changes were never committed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use git2::{Commit, DiffOptions, ObjectType, Oid, Repository, Signature, Sort, Tree, TreeWalkMode, TreeWalkResult};

use crate::hlc::Stamp;

/// This node's branch.
pub const MAIN: &str = "refs/heads/main";
/// The remote's branch as last fetched.
pub const ORIGIN: &str = "refs/remotes/origin/main";
/// What the materialized tree holds.
pub const TREE: &str = "refs/syncfs/tree";
/// The trailer naming the node that made a commit.
pub const NODE_TRAILER: &str = "Syncfs-Node";
/// The trailer with the commit's hybrid-clock stamp.
pub const HLC_TRAILER: &str = "Syncfs-HLC";
/// How many commits a search for a path's last change looks at before giving up.
const WALK_LIMIT: usize = 10_000;

/// The repository of one node.
pub struct Repo {
    /// The libgit2 handle.
    pub git: Repository,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo").field("path", &self.git.path()).finish()
    }
}

/// Whether a tree entry mode is a regular file (plain or executable).
pub fn is_file_mode(mode: i32) -> bool {
    mode == i32::from(git2::FileMode::Blob) || mode == i32::from(git2::FileMode::BlobExecutable)
}

/// How git stores a path's blob: the three kinds of tree entry syncfs syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A regular file (100644).
    File,
    /// A regular file with the executable bit (100755).
    Exec,
    /// A symbolic link (120000); the blob holds its target.
    Link,
}

impl EntryKind {
    /// The tree entry mode.
    pub fn mode(self) -> git2::FileMode {
        match self {
            EntryKind::File => git2::FileMode::Blob,
            EntryKind::Exec => git2::FileMode::BlobExecutable,
            EntryKind::Link => git2::FileMode::Link,
        }
    }

    /// The kind of a tree entry mode, if syncfs syncs it (not trees or submodules).
    pub fn of_mode(mode: i32) -> Option<EntryKind> {
        match mode {
            m if m == i32::from(git2::FileMode::Blob) => Some(EntryKind::File),
            m if m == i32::from(git2::FileMode::BlobExecutable) => Some(EntryKind::Exec),
            m if m == i32::from(git2::FileMode::Link) => Some(EntryKind::Link),
            _ => None,
        }
    }

    /// The kind of a regular file with permission bits `mode`: executable when its owner may
    /// execute it, as git decides.
    pub fn of_file(mode: u32) -> EntryKind {
        if mode & 0o100 != 0 {
            EntryKind::Exec
        } else {
            EntryKind::File
        }
    }

    /// A regular file (plain or executable).
    pub fn is_file(self) -> bool {
        self != EntryKind::Link
    }
}

/// What a tree holds for a path: a blob, and whether it is a file, a program or a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The content (a link's target).
    pub blob: Oid,
    /// How it is stored.
    pub kind: EntryKind,
}

impl Entry {
    /// A plain regular file.
    pub fn file(blob: Oid) -> Entry {
        Entry { blob, kind: EntryKind::File }
    }
}

impl Repo {
    /// Opens the bare repository at `dir`, creating it on first use.
    pub fn open(dir: &Path) -> Result<Repo, git2::Error> {
        let git = match Repository::open_bare(dir) {
            Ok(git) => git,
            Err(e) if e.code() == git2::ErrorCode::NotFound => {
                let mut opts = git2::RepositoryInitOptions::new();
                opts.bare(true).initial_head("main").mkpath(true);
                Repository::init_opts(dir, &opts)?
            }
            Err(e) => return Err(e),
        };
        Ok(Repo { git })
    }

    /// Where a ref points, if it exists.
    pub fn target(&self, name: &str) -> Option<Oid> {
        self.git.find_reference(name).ok().and_then(|r| r.target())
    }

    /// Moves `name` from `old` (`None`: must not exist) to `new`.
    pub fn set_ref(&self, name: &str, new: Oid, old: Option<Oid>, why: &str) -> Result<(), git2::Error> {
        match old {
            Some(old) => self.git.reference_matching(name, new, true, old, why).map(drop),
            None => self.git.reference(name, new, false, why).map(drop),
        }
    }

    /// The tree of a commit.
    pub fn tree_of(&self, commit: Option<Oid>) -> Result<Option<Tree<'_>>, git2::Error> {
        match commit {
            None => Ok(None),
            Some(id) => Ok(Some(self.git.find_commit(id)?.tree()?)),
        }
    }

    /// An empty tree (the base of a first commit).
    pub fn empty_tree(&self) -> Result<Tree<'_>, git2::Error> {
        let id = self.git.treebuilder(None)?.write()?;
        self.git.find_tree(id)
    }

    /// The blob of a regular file at `path` in `tree`.
    pub fn blob_at(tree: Option<&Tree<'_>>, path: &Path) -> Option<Oid> {
        let entry = tree?.get_path(path).ok()?;
        (entry.kind() == Some(ObjectType::Blob) && is_file_mode(entry.filemode())).then(|| entry.id())
    }

    /// The entry at `path` in `tree`: a regular file or a symlink.
    pub fn entry_at(tree: Option<&Tree<'_>>, path: &Path) -> Option<Entry> {
        let entry = tree?.get_path(path).ok()?;
        let kind = EntryKind::of_mode(entry.filemode()).filter(|_| entry.kind() == Some(ObjectType::Blob))?;
        Some(Entry { blob: entry.id(), kind })
    }

    /// A blob's bytes.
    pub fn read_blob(&self, id: Oid) -> Result<Vec<u8>, git2::Error> {
        Ok(self.git.find_blob(id)?.content().to_vec())
    }

    /// Every regular file and symlink of a tree, by path.
    pub fn files(tree: &Tree<'_>) -> HashMap<PathBuf, Entry> {
        let mut out = HashMap::new();
        let _ = tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
            if entry.kind() == Some(ObjectType::Blob) {
                if let Some(kind) = EntryKind::of_mode(entry.filemode()) {
                    use std::os::unix::ffi::OsStrExt;
                    let name = std::ffi::OsStr::from_bytes(entry.name_bytes());
                    out.insert(Path::new(dir).join(name), Entry { blob: entry.id(), kind });
                }
            }
            TreeWalkResult::Ok
        });
        out
    }

    /// The files and symlinks that differ between two trees (content or kind): path and new
    /// entry (`None`: gone).
    pub fn changes(&self, old: Option<&Tree<'_>>, new: Option<&Tree<'_>>) -> Result<Vec<(PathBuf, Option<Entry>)>, git2::Error> {
        let mut opts = DiffOptions::new();
        opts.include_typechange(true);
        let diff = self.git.diff_tree_to_tree(old, new, Some(&mut opts))?;
        let mut out = Vec::new();
        for delta in diff.deltas() {
            let new_file = delta.new_file();
            let old_file = delta.old_file();
            let now = EntryKind::of_mode(i32::from(new_file.mode())).filter(|_| delta.status() != git2::Delta::Deleted);
            let path = new_file.path().or(old_file.path());
            let Some(path) = path else { continue };
            let was = delta.status() != git2::Delta::Added && EntryKind::of_mode(i32::from(old_file.mode())).is_some();
            if let Some(kind) = now {
                out.push((path.to_path_buf(), Some(Entry { blob: new_file.id(), kind })));
            } else if was {
                out.push((path.to_path_buf(), None));
            }
        }
        Ok(out)
    }

    /// The stamp of a commit: its `Syncfs-HLC` trailer, else (a commit made with plain git)
    /// its committer time and the node trailer or the committer's email.
    pub fn stamp_of(commit: &Commit<'_>) -> Stamp {
        let message = commit.message_raw().unwrap_or("");
        let mut node = None;
        let mut hlc = None;
        if let Ok(trailers) = git2::message_trailers_strs(message) {
            for (key, value) in trailers.iter() {
                if key == HLC_TRAILER {
                    hlc = value.parse::<Stamp>().ok();
                } else if key == NODE_TRAILER {
                    node = Some(value.to_string());
                }
            }
        }
        hlc.unwrap_or_else(|| Stamp {
            wall_ms: (commit.committer().when().seconds().max(0) as u64) * 1000,
            counter: 0,
            node: node.unwrap_or_else(|| commit.committer().email().unwrap_or("unknown").to_string()),
        })
    }

    /// The node that made a commit.
    pub fn node_of(commit: &Commit<'_>) -> String {
        Repo::stamp_of(commit).node
    }

    /// Writes a commit (no ref moves).
    pub fn write_commit(&self, tree: Oid, parents: &[Oid], summary: &str, body: &str, stamp: &Stamp) -> Result<Oid, git2::Error> {
        let tree = self.git.find_tree(tree)?;
        let parents: Vec<Commit<'_>> = parents.iter().map(|p| self.git.find_commit(*p)).collect::<Result<_, _>>()?;
        let parent_refs: Vec<&Commit<'_>> = parents.iter().collect();
        let time = git2::Time::new((stamp.wall_ms / 1000) as i64, 0);
        let email = format!("{}@syncfs", sanitize_ident(&stamp.node));
        let sig = Signature::new(&stamp.node, &email, &time)?;
        let mut message = String::from(summary);
        message.push_str("\n\n");
        if !body.is_empty() {
            message.push_str(body.trim_end());
            message.push_str("\n\n");
        }
        message.push_str(&format!("{NODE_TRAILER}: {}\n{HLC_TRAILER}: {stamp}\n", stamp.node));
        self.git.commit(None, &sig, &sig, &message, &tree, &parent_refs)
    }

    /// Whether `commit` has `ancestor` in its history (or is it).
    pub fn contains(&self, commit: Oid, ancestor: Oid) -> bool {
        commit == ancestor || self.git.graph_descendant_of(commit, ancestor).unwrap_or(false)
    }

    /// Commits reachable from `tip` but not from `hide`.
    pub fn commits_between(&self, tip: Oid, hide: Option<Oid>) -> Result<Vec<Oid>, git2::Error> {
        let mut walk = self.git.revwalk()?;
        walk.push(tip)?;
        if let Some(h) = hide {
            walk.hide(h)?;
        }
        walk.collect()
    }

    /// For each of `paths`, the stamp and commit of its latest change reachable from `tip`
    /// and not from `hide` (merge commits are skipped: their changes come from their sides).
    /// Paths with no such change get `tip`'s own stamp.
    pub fn last_changes(&self, tip: Oid, hide: Option<Oid>, paths: &HashSet<PathBuf>) -> Result<HashMap<PathBuf, (Stamp, Oid)>, git2::Error> {
        let mut out: HashMap<PathBuf, (Stamp, Oid)> = HashMap::new();
        if paths.is_empty() {
            return Ok(out);
        }
        let mut walk = self.git.revwalk()?;
        walk.set_sorting(Sort::TOPOLOGICAL | Sort::TIME)?;
        walk.push(tip)?;
        if let Some(h) = hide {
            walk.hide(h)?;
        }
        for id in walk.take(WALK_LIMIT) {
            let id = id?;
            let commit = self.git.find_commit(id)?;
            if commit.parent_count() > 1 {
                continue;
            }
            let parent_tree = match commit.parent_count() {
                0 => None,
                _ => Some(commit.parent(0)?.tree()?),
            };
            let mut opts = DiffOptions::new();
            opts.disable_pathspec_match(true);
            for p in paths {
                opts.pathspec(p);
            }
            let diff = self.git.diff_tree_to_tree(parent_tree.as_ref(), Some(&commit.tree()?), Some(&mut opts))?;
            let stamp = Repo::stamp_of(&commit);
            for delta in diff.deltas() {
                let Some(path) = delta.new_file().path().or(delta.old_file().path()) else { continue };
                if !paths.contains(path) {
                    continue;
                }
                let better = out.get(path).is_none_or(|(s, _)| stamp > *s);
                if better {
                    out.insert(path.to_path_buf(), (stamp.clone(), id));
                }
            }
            if out.len() == paths.len() && hide.is_none() {
                // Newest first: without a boundary, the first hit per path is its last change.
                break;
            }
        }
        let tip_commit = self.git.find_commit(tip)?;
        let tip_stamp = Repo::stamp_of(&tip_commit);
        for p in paths {
            out.entry(p.clone()).or_insert_with(|| (tip_stamp.clone(), tip));
        }
        Ok(out)
    }
}

/// A node id made safe for an email address.
fn sanitize_ident(node: &str) -> String {
    node.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_files(repo: &Repo, parent: Option<Oid>, files: &[(&str, &str)], stamp: &Stamp) -> Oid {
        let base = repo.tree_of(parent).unwrap();
        let empty = repo.empty_tree().unwrap();
        let mut update = git2::build::TreeUpdateBuilder::new();
        for (p, c) in files {
            let blob = repo.git.blob(c.as_bytes()).unwrap();
            update.upsert(*p, blob, git2::FileMode::Blob);
        }
        let tree = update.create_updated(&repo.git, base.as_ref().unwrap_or(&empty)).unwrap();
        let parents: Vec<Oid> = parent.into_iter().collect();
        repo.write_commit(tree, &parents, "test", "", stamp).unwrap()
    }

    #[test]
    fn stamps_round_trip_through_commits_and_last_changes_find_them() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::open(&dir.path().join("r")).unwrap();
        let s1 = Stamp { wall_ms: 1_000_000, counter: 0, node: "a".into() };
        let s2 = Stamp { wall_ms: 2_000_000, counter: 3, node: "b".into() };
        let c1 = commit_files(&repo, None, &[("d/x.yml", "a: 1\n"), ("y", "1")], &s1);
        let c2 = commit_files(&repo, Some(c1), &[("y", "2")], &s2);
        assert_eq!(Repo::stamp_of(&repo.git.find_commit(c2).unwrap()), s2);
        let paths: HashSet<PathBuf> = ["d/x.yml", "y"].into_iter().map(PathBuf::from).collect();
        let last = repo.last_changes(c2, None, &paths).unwrap();
        assert_eq!(last[Path::new("d/x.yml")], (s1.clone(), c1));
        assert_eq!(last[Path::new("y")], (s2.clone(), c2));
        // With a boundary, unchanged paths get the tip's stamp.
        let last = repo.last_changes(c2, Some(c1), &paths).unwrap();
        assert_eq!(last[Path::new("d/x.yml")].1, c2);
        let changes = repo
            .changes(repo.tree_of(Some(c1)).unwrap().as_ref(), repo.tree_of(Some(c2)).unwrap().as_ref())
            .unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, PathBuf::from("y"));
        let files = Repo::files(&repo.tree_of(Some(c2)).unwrap().unwrap());
        assert_eq!(files.len(), 2);
        assert!(repo.contains(c2, c1) && !repo.contains(c1, c2));
        repo.set_ref(MAIN, c1, None, "t").unwrap();
        assert!(repo.set_ref(MAIN, c2, Some(c2), "t").is_err(), "compare-and-swap must fail");
        repo.set_ref(MAIN, c2, Some(c1), "t").unwrap();
        assert_eq!(repo.target(MAIN), Some(c2));
    }
}
