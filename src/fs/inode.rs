//! The inode table: what the kernel's node ids stand for.
//!
//! Node ids are allocated from a counter and never reused within a mount, so a stale id held
//! by the kernel can never name a different file. Each node remembers the backing inode it
//! stands for ([`Ident`]) and every name the kernel has used for it (`links`): a hard-linked
//! file stays reachable through any remaining name after one is removed. A backing identity
//! maps to at most one node; when a name's last link goes away the mapping is dropped at once,
//! because the backing filesystem may give the same inode number to the next file.
//!
//! A node lives while the kernel holds lookups on it or files are open on it (`forget` and
//! `release` both end in [`InodeTable::maybe_drop`]).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::Arc;

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
    /// The fd shared by the node's in-place handles while any is open.
    pub file: Option<Arc<std::fs::File>>,
    /// The write stage of a staged file while it has open handles.
    pub stage: Option<Arc<Stage>>,
    /// The buffered appends of a file of an append tier while it has writers.
    pub appender: Option<Arc<Appender>>,
    /// A directory of the history view (built when looked up or listed).
    pub view: bool,
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
                file: None,
                stage: None,
                appender: None,
                view: false,
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
                }
                return ino;
            }
            // The backing inode number was reused for a file of another type: the old node
            // is gone from the tree, whatever the kernel still holds.
            self.by_ident.remove(&ident);
            node.links.clear();
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
                file: None,
                stage: None,
                appender: None,
                view: false,
            },
        );
        self.by_ident.insert(ident, ino);
        ino
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

    /// Removes a node nobody references any more.
    pub fn maybe_drop(&mut self, ino: Ino) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.nodes.get(&ino) else {
            return;
        };
        if node.lookups == 0 && node.opens == 0 {
            let ident = node.ident;
            self.nodes.remove(&ino);
            if self.by_ident.get(&ident) == Some(&ino) {
                self.by_ident.remove(&ident);
            }
        }
    }

    /// The name `name` in `parent` no longer refers to `ino`. `last_link` says the backing
    /// inode lost its last name, so its identity may be reused by the next file.
    pub fn unlink(&mut self, ino: Ino, parent: Ino, name: &OsStr, last_link: bool) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.links.retain(|(p, n)| !(*p == parent && n == name));
        if last_link || node.kind == Kind::Dir {
            node.links.clear();
            let ident = node.ident;
            if self.by_ident.get(&ident) == Some(&ino) {
                self.by_ident.remove(&ident);
            }
        }
    }

    /// The name (`parent`, `name`) of `ino` became (`new_parent`, `new_name`).
    pub fn relink(&mut self, ino: Ino, parent: Ino, name: &OsStr, new_parent: Ino, new_name: &OsStr) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            for link in node.links.iter_mut() {
                if link.0 == parent && link.1 == name {
                    *link = (new_parent, new_name.to_os_string());
                    return;
                }
            }
            node.links.insert(0, (new_parent, new_name.to_os_string()));
        }
    }

    /// Adds a name to a node (a new hard link), taking one lookup for the kernel's new entry.
    pub fn add_link(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups += 1;
            node.links.push((parent, name.to_os_string()));
        }
    }

    /// The backing inode of `ino` was replaced (a staged file was installed).
    pub fn set_ident(&mut self, ino: Ino, ident: Ident) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let old = std::mem::replace(&mut node.ident, ident);
            if self.by_ident.get(&old) == Some(&ino) {
                self.by_ident.remove(&old);
            }
            self.by_ident.insert(ident, ino);
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
