//! The inode table: what the kernel's node ids stand for.
//!
//! Node ids are allocated from a counter and never reused within a mount, so a stale id held
//! by the kernel can never name a different file. Each node remembers the backing inode it
//! stands for ([`Ident`]) and every name the kernel has used for it (`links`): a hard-linked
//! file stays reachable through any remaining name after one is removed. A backing identity
//! maps to at most one node; when a name's last link goes away the mapping is dropped at once,
//! because the backing filesystem may give the same inode number to the next file.
//!
//! A node lives while the kernel holds lookups on it, files are open on it, or a live node
//! names it as a parent (`forget` and `release` both end in [`InodeTable::maybe_drop`]). The
//! last keeps a directory the kernel forgot resolvable while it still holds a child (an
//! inotify watch, a shell's cwd): the child's path goes through its parent's name.
//!
//! A node that loses its last name while something still references it becomes an
//! [`Orphan`]: it keeps an fd of its backing inode, so open files, `fstat`, `ftruncate`,
//! `fchmod` and reads through a kernel entry that is not invalidated yet all reach the content
//! they started with. Another node's change never rewrites a node's content behind the
//! kernel: it gives the path a new backing inode and so, at the next lookup, a new node, and
//! the old node lives on as an orphan until the kernel forgets it. The kernel's cached size
//! and pages of a node therefore always describe content that node served.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::handle::{Appender, Stage};
use super::tree::Ident;
use super::Kind;

/// A kernel node id.
pub type Ino = u64;

/// The root's node id, fixed by FUSE.
pub const ROOT: Ino = 1;

/// What the core knows about one node.
#[derive(Debug)]
pub struct Node {
    /// File type, fixed for the node's life.
    pub kind: Kind,
    /// The backing inode. Changes when a staged file's shadow replaces the tree's file.
    pub ident: Ident,
    /// Names (parent, name) the node is known by; the first decides its path and policy.
    pub links: Vec<(Ino, OsString)>,
    /// Lookups the kernel holds.
    pub lookups: u64,
    /// Open file handles.
    pub opens: u32,
    /// Of those, handles that opened the file to execute it.
    pub execs: u32,
    /// The fd shared by the node's in-place handles while any is open.
    pub file: Option<Arc<std::fs::File>>,
    /// The write stage of a staged file while it has open handles.
    pub stage: Option<Arc<Stage>>,
    /// The buffered appends of a file of an append tier while it has writers.
    pub appender: Option<Arc<Appender>>,
    /// A directory of the history view (built when looked up or listed).
    pub view: bool,
    /// Live nodes' links that name this node as their parent.
    children: u32,
    /// Set while the node has no name but is still referenced.
    pub orphan: Option<Orphan>,
    /// When a program created the file on this node: the version of a path it replaces by a
    /// rename is the one current then (the program read it before writing its copy).
    pub born: Option<Instant>,
    /// What the node's readers read while no writer stages it, shared so that an install of
    /// this node's own commit moves every reader to the committed content (the kernel's size
    /// for the node is the committed one).
    pub current: Option<Arc<super::handle::Current>>,
}

/// A node without a name that the kernel or open files still reference.
#[derive(Debug, Clone)]
pub struct Orphan {
    /// Its backing inode (`O_PATH`).
    pub fd: Arc<OwnedFd>,
    /// The path it had: its policy, and where its writers commit when `remote`.
    pub path: PathBuf,
    /// Another node's change took the name, behind the kernel's back: writers that have the
    /// node open still commit to `path`, against the version they started from. (A name a
    /// program on this node removed takes its open files' later writes nowhere, as on any
    /// filesystem.)
    pub remote: bool,
}

/// All nodes of a mount.
#[derive(Debug)]
pub struct InodeTable {
    nodes: HashMap<Ino, Node>,
    by_ident: HashMap<Ident, Ino>,
    next: Ino,
}

impl InodeTable {
    /// A table holding only the root.
    pub fn new(root: Ident) -> InodeTable {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir,
                ident: root,
                links: Vec::new(),
                lookups: 1,
                opens: 0,
                execs: 0,
                file: None,
                stage: None,
                appender: None,
                view: false,
                children: 0,
                orphan: None,
                born: None,
                current: None,
            },
        );
        InodeTable {
            nodes,
            by_ident: HashMap::from([(root, ROOT)]),
            next: ROOT + 1,
        }
    }

    /// The node with this id.
    pub fn get(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    /// The node with this id, mutably.
    pub fn get_mut(&mut self, ino: Ino) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    /// Records that the kernel looked up `name` in `parent` and found the backing inode
    /// `ident`: takes one lookup on the existing node or creates one. Returns the node id.
    pub fn lookup(&mut self, parent: Ino, name: &OsStr, ident: Ident, kind: Kind) -> Ino {
        if let Some(&ino) = self.by_ident.get(&ident) {
            let node = self.nodes.get_mut(&ino).expect("by_ident points at live nodes");
            if node.kind == kind {
                node.lookups += 1;
                if !node.links.iter().any(|(p, n)| *p == parent && n == name) {
                    node.links.push((parent, name.to_os_string()));
                    // Named again (its own commit took the name back): no longer an orphan.
                    node.orphan = None;
                    self.adopt(parent);
                }
                return ino;
            }
            // The backing inode number was reused for a file of another type: the old node
            // is gone from the tree, whatever the kernel still holds.
            self.by_ident.remove(&ident);
            self.clear_links(ino);
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                ident,
                links: vec![(parent, name.to_os_string())],
                lookups: 1,
                opens: 0,
                execs: 0,
                file: None,
                stage: None,
                appender: None,
                view: false,
                children: 0,
                orphan: None,
                born: None,
                current: None,
            },
        );
        self.adopt(parent);
        self.by_ident.insert(ident, ino);
        ino
    }

    /// A link naming `parent` appeared.
    fn adopt(&mut self, parent: Ino) {
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children += 1;
        }
    }

    /// A link naming `parent` went away; the parent may now be unreferenced.
    fn release_parent(&mut self, parent: Ino) {
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children = p.children.saturating_sub(1);
        }
        self.maybe_drop(parent);
    }

    /// Removes every name of a node.
    fn clear_links(&mut self, ino: Ino) {
        let links = match self.nodes.get_mut(&ino) {
            Some(node) => std::mem::take(&mut node.links),
            None => return,
        };
        for (parent, _) in links {
            self.release_parent(parent);
        }
    }

    /// The node a backing inode stands for, if any.
    pub fn by_ident(&self, ident: Ident) -> Option<Ino> {
        self.by_ident.get(&ident).copied()
    }

    /// Drops `n` kernel lookups.
    pub fn forget(&mut self, ino: Ino, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.maybe_drop(ino);
    }

    /// Removes a node nobody references any more, and then any parent only it kept alive.
    pub fn maybe_drop(&mut self, ino: Ino) {
        let mut next = Some(ino);
        while let Some(ino) = next.take() {
            if ino == ROOT {
                return;
            }
            let Some(node) = self.nodes.get(&ino) else {
                return;
            };
            if node.lookups != 0 || node.opens != 0 || node.children != 0 {
                return;
            }
            let node = self.nodes.remove(&ino).expect("checked above");
            if self.by_ident.get(&node.ident) == Some(&ino) {
                self.by_ident.remove(&node.ident);
            }
            // Parents were kept for this node's path; each may go now. (Almost always one.)
            let mut parents = node.links.into_iter().map(|(p, _)| p);
            next = parents.next();
            for parent in parents {
                self.release_parent(parent);
            }
            if let Some(parent) = next {
                if let Some(p) = self.nodes.get_mut(&parent) {
                    p.children = p.children.saturating_sub(1);
                }
            }
        }
    }

    /// The name `name` in `parent` no longer refers to `ino`. `last_link` says the backing
    /// inode lost its last name, so its identity may be reused by the next file. Returns
    /// whether the node has no name left.
    pub fn unlink(&mut self, ino: Ino, parent: Ino, name: &OsStr, last_link: bool) -> bool {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return false;
        };
        let before = node.links.len();
        node.links.retain(|(p, n)| !(*p == parent && n == name));
        let removed = before != node.links.len();
        let nameless = last_link || node.kind == Kind::Dir;
        if nameless {
            let ident = node.ident;
            if self.by_ident.get(&ident) == Some(&ino) {
                self.by_ident.remove(&ident);
            }
        }
        if removed {
            self.release_parent(parent);
        }
        if nameless {
            self.clear_links(ino);
        }
        self.nodes.get(&ino).is_some_and(|n| n.links.is_empty())
    }

    /// Records what a nameless node still reaches (see [`Orphan`]).
    pub fn set_orphan(&mut self, ino: Ino, orphan: Orphan) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            if node.links.is_empty() {
                node.orphan = Some(orphan);
            }
        }
    }

    /// The name (`parent`, `name`) of `ino` became (`new_parent`, `new_name`).
    pub fn relink(&mut self, ino: Ino, parent: Ino, name: &OsStr, new_parent: Ino, new_name: &OsStr) {
        let Some(node) = self.nodes.get_mut(&ino) else { return };
        let at = node.links.iter().position(|(p, n)| *p == parent && n == name);
        match at {
            Some(i) => node.links[i] = (new_parent, new_name.to_os_string()),
            None => node.links.insert(0, (new_parent, new_name.to_os_string())),
        }
        node.orphan = None;
        self.adopt(new_parent);
        if at.is_some() {
            self.release_parent(parent);
        }
    }

    /// Adds a name to a node (a new hard link), taking one lookup for the kernel's new entry.
    pub fn add_link(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups += 1;
            node.links.push((parent, name.to_os_string()));
            self.adopt(parent);
        }
    }

    /// The backing inode of `ino` was replaced (a staged file was installed).
    pub fn set_ident(&mut self, ino: Ino, ident: Ident) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let old = std::mem::replace(&mut node.ident, ident);
            if self.by_ident.get(&old) == Some(&ino) {
                self.by_ident.remove(&old);
            }
            // A node standing for this inode before (a reused inode number) no longer does.
            if let Some(previous) = self.by_ident.insert(ident, ino).filter(|p| *p != ino) {
                self.clear_links(previous);
            }
        }
    }

    /// The path of a node relative to the root, following first links; `None` when the node
    /// or one of its ancestors has no name left.
    pub fn path(&self, mut ino: Ino) -> Option<PathBuf> {
        let mut parts: Vec<&OsStr> = Vec::new();
        while ino != ROOT {
            let node = self.nodes.get(&ino)?;
            let (parent, name) = node.links.first()?;
            parts.push(name);
            ino = *parent;
            if parts.len() > 4096 {
                return None; // a cycle would be a bug; do not loop forever on it
            }
        }
        let mut path = PathBuf::new();
        for part in parts.iter().rev() {
            path.push(part);
        }
        Some(path)
    }

    /// The first link of a node: its parent and name.
    pub fn first_link(&self, ino: Ino) -> Option<(Ino, OsString)> {
        self.nodes.get(&ino)?.links.first().cloned()
    }

    /// How many nodes are alive (for status).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether only the root is alive.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64) -> Ident {
        Ident { dev: 1, ino }
    }

    #[test]
    fn lookups_reuse_nodes_and_forget_drops_them() {
        let mut t = InodeTable::new(id(2));
        let a = t.lookup(ROOT, OsStr::new("a"), id(10), Kind::File);
        assert_eq!(t.lookup(ROOT, OsStr::new("a"), id(10), Kind::File), a);
        assert_eq!(t.get(a).unwrap().lookups, 2);
        t.forget(a, 2);
        assert!(t.get(a).is_none());
        // A new lookup of the same backing inode gets a new node id.
        let b = t.lookup(ROOT, OsStr::new("a"), id(10), Kind::File);
        assert_ne!(a, b);
    }

    #[test]
    fn hard_links_survive_removal_of_the_first_name() {
        let mut t = InodeTable::new(id(2));
        let dir = t.lookup(ROOT, OsStr::new("d"), id(3), Kind::Dir);
        let f = t.lookup(ROOT, OsStr::new("a"), id(10), Kind::File);
        t.add_link(f, dir, OsStr::new("b"));
        assert_eq!(t.path(f).unwrap(), PathBuf::from("a"));
        t.unlink(f, ROOT, OsStr::new("a"), false);
        assert_eq!(t.path(f).unwrap(), PathBuf::from("d/b"));
        t.unlink(f, dir, OsStr::new("b"), true);
        assert_eq!(t.path(f), None);
        assert_eq!(t.by_ident(id(10)), None);
    }

    #[test]
    fn paths_follow_renames_of_ancestors() {
        let mut t = InodeTable::new(id(2));
        let d = t.lookup(ROOT, OsStr::new("d"), id(3), Kind::Dir);
        let f = t.lookup(d, OsStr::new("f"), id(4), Kind::File);
        assert_eq!(t.path(f).unwrap(), PathBuf::from("d/f"));
        t.relink(d, ROOT, OsStr::new("d"), ROOT, OsStr::new("e"));
        assert_eq!(t.path(f).unwrap(), PathBuf::from("e/f"));
    }

    #[test]
    fn reused_backing_inode_of_another_type_is_a_new_node() {
        let mut t = InodeTable::new(id(2));
        let f = t.lookup(ROOT, OsStr::new("x"), id(9), Kind::File);
        let d = t.lookup(ROOT, OsStr::new("x"), id(9), Kind::Dir);
        assert_ne!(f, d);
        assert_eq!(t.by_ident(id(9)), Some(d));
    }

    #[test]
    fn a_forgotten_directory_lives_while_a_child_names_it() {
        let mut t = InodeTable::new(id(2));
        let a = t.lookup(ROOT, OsStr::new("a"), id(3), Kind::Dir);
        let b = t.lookup(a, OsStr::new("b"), id(4), Kind::Dir);
        // The kernel evicts `a` (memory pressure) while `b` is watched.
        t.forget(a, 1);
        assert!(t.get(a).is_some(), "b's path goes through a");
        assert_eq!(t.path(b).unwrap(), PathBuf::from("a/b"));
        // Looked up again, `a` is the same node.
        assert_eq!(t.lookup(ROOT, OsStr::new("a"), id(3), Kind::Dir), a);
        t.forget(a, 1);
        t.forget(b, 1);
        assert!(t.get(b).is_none());
        assert!(t.get(a).is_none(), "dropping the child releases the parent");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn renames_and_unlinks_move_parent_references() {
        let mut t = InodeTable::new(id(2));
        let d = t.lookup(ROOT, OsStr::new("d"), id(3), Kind::Dir);
        let e = t.lookup(ROOT, OsStr::new("e"), id(5), Kind::Dir);
        let f = t.lookup(d, OsStr::new("f"), id(4), Kind::File);
        t.forget(d, 1);
        t.forget(e, 1);
        assert!(t.get(d).is_some() && t.get(e).is_none());
        let e = t.lookup(ROOT, OsStr::new("e"), id(5), Kind::Dir);
        t.relink(f, d, OsStr::new("f"), e, OsStr::new("f"));
        assert!(t.get(d).is_none(), "d lost its only child");
        t.forget(e, 1);
        assert!(t.get(e).is_some(), "f is in e now");
        t.lookup(e, OsStr::new("x"), id(9), Kind::File);
        assert!(t.unlink(f, e, OsStr::new("f"), true), "no name left");
        t.forget(f, 1);
        assert_eq!(t.path(t.by_ident(id(9)).unwrap()).unwrap(), PathBuf::from("e/x"));
    }

    #[test]
    fn open_nodes_outlive_forget() {
        let mut t = InodeTable::new(id(2));
        let f = t.lookup(ROOT, OsStr::new("x"), id(9), Kind::File);
        t.get_mut(f).unwrap().opens = 1;
        t.forget(f, 1);
        assert!(t.get(f).is_some());
        t.get_mut(f).unwrap().opens = 0;
        t.maybe_drop(f);
        assert!(t.get(f).is_none());
    }
}
