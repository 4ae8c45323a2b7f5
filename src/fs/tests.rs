//! Tests of the core without FUSE: the calls the adapter makes, against a real tree on disk.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::policy::PolicyTable;
use crate::tier::local::LocalTier;

struct Fixture {
    _dir: tempfile::TempDir,
    tree: PathBuf,
    core: Arc<Core>,
    rt: tokio::runtime::Runtime,
}

const ME: Caller = Caller { uid: 0, gid: 0, pid: 1 };

/// These tests drive the core with the local tier only.
const LOCAL_TABLE: &str = "policies:\n  - pattern: \"**\"\n    tier: local\n";

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(tree.join(".syncfs")).unwrap();
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::write(tree.join(POLICY_FILE), LOCAL_TABLE).unwrap();
        let mut tiers = Tiers::default();
        tiers.add(Arc::new(LocalTier));
        let core = Core::new(
            &tree,
            &spool,
            Arc::new(PolicyTable::parse(LOCAL_TABLE, Path::new("t")).unwrap()),
            tiers,
            CoreConfig::default(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Fixture {
            _dir: dir,
            tree,
            core: Arc::new(core),
            rt,
        }
    }

    fn run<T: Send + 'static>(&self, op: FsOp<T>) -> Result<T, FsError> {
        self.rt.block_on(op.into_future())
    }

    /// Looks up a `/`-separated path from the root.
    fn ino(&self, path: &str) -> Result<Ino, FsError> {
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.core.lookup(ino, OsStr::new(part))?.ino;
        }
        Ok(ino)
    }

    fn create(&self, parent: Ino, name: &str, data: &[u8]) -> Ino {
        let (attr, opened) = self
            .run(self.core.create(ME, parent, OsStr::new(name), 0o644, libc::O_WRONLY | libc::O_EXCL))
            .unwrap();
        self.core.write(opened.fh, 0, data).unwrap();
        self.run(self.core.flush(opened.fh)).unwrap();
        self.run(self.core.release(opened.fh)).unwrap();
        attr.ino
    }

    fn read_all(&self, ino: Ino) -> Vec<u8> {
        let opened = self.run(self.core.open(ME, ino, libc::O_RDONLY)).unwrap();
        let data = self.run(self.core.read(opened.fh, 0, 1 << 20)).unwrap();
        self.run(self.core.release(opened.fh)).unwrap();
        data
    }

    fn write_file(&self, ino: Ino, flags: i32, data: &[u8]) -> Result<(), FsError> {
        let opened = self.run(self.core.open(ME, ino, flags))?;
        self.core.write(opened.fh, 0, data)?;
        let flushed = self.run(self.core.flush(opened.fh));
        self.run(self.core.release(opened.fh))?;
        flushed
    }
}

fn errno<T: std::fmt::Debug>(r: Result<T, FsError>) -> i32 {
    r.unwrap_err().errno()
}

#[test]
fn create_write_read_round_trip() {
    let f = Fixture::new();
    let ino = f.create(ROOT, "a.txt", b"hello");
    assert_eq!(f.read_all(ino), b"hello");
    assert_eq!(f.core.getattr(ino).unwrap().size, 5);
    assert_eq!(std::fs::read(f.tree.join("a.txt")).unwrap(), b"hello");
    // O_EXCL on an existing name fails; the content stays.
    let again = f.run(f.core.create(ME, ROOT, OsStr::new("a.txt"), 0o644, libc::O_WRONLY | libc::O_EXCL));
    assert_eq!(errno(again), libc::EEXIST);
    assert_eq!(f.read_all(ino), b"hello");
}

#[test]
fn append_and_truncate() {
    let f = Fixture::new();
    let ino = f.create(ROOT, "log", b"one\n");
    let opened = f.run(f.core.open(ME, ino, libc::O_WRONLY | libc::O_APPEND)).unwrap();
    f.core.write(opened.fh, 0, b"two\n").unwrap();
    f.run(f.core.release(opened.fh)).unwrap();
    assert_eq!(f.read_all(ino), b"one\ntwo\n");
    f.write_file(ino, libc::O_WRONLY | libc::O_TRUNC, b"x").unwrap();
    assert_eq!(f.read_all(ino), b"x");
    let set = SetAttr {
        mode: None,
        uid: None,
        gid: None,
        size: Some(3),
        atime: SetTime::Omit,
        mtime: SetTime::Omit,
    };
    assert_eq!(f.run(f.core.setattr(ino, set, None)).unwrap().size, 3);
    assert_eq!(f.read_all(ino), b"x\0\0");
}

#[test]
fn rename_replace_noreplace_and_exchange() {
    let f = Fixture::new();
    let a = f.create(ROOT, "a", b"A");
    let b = f.create(ROOT, "b", b"B");
    let noreplace = f.run(f.core.rename(ME, ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), libc::RENAME_NOREPLACE));
    assert_eq!(errno(noreplace), libc::EEXIST);
    f.run(f.core.rename(ME, ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), libc::RENAME_EXCHANGE)).unwrap();
    assert_eq!(f.read_all(f.ino("a").unwrap()), b"B");
    assert_eq!(f.ino("a").unwrap(), b);
    f.run(f.core.rename(ME, ROOT, OsStr::new("a"), ROOT, OsStr::new("b"), 0)).unwrap();
    assert_eq!(errno(f.ino("a")), libc::ENOENT);
    let now_b = f.ino("b").unwrap();
    assert_eq!(now_b, b);
    assert_eq!(f.read_all(now_b), b"B");
    // The replaced node has no name left.
    assert!(f.core.inodes.lock().path(a).is_none());
}

#[test]
fn directories_and_renames_of_ancestors() {
    let f = Fixture::new();
    let d = f.run(f.core.mkdir(ME, ROOT, OsStr::new("d"), 0o755)).unwrap().ino;
    let x = f.create(d, "x", b"1");
    assert_eq!(errno(f.run(f.core.remove(ROOT, OsStr::new("d"), true))), libc::ENOTEMPTY);
    f.run(f.core.rename(ME, ROOT, OsStr::new("d"), ROOT, OsStr::new("e"), 0)).unwrap();
    assert_eq!(f.core.target_of(x).unwrap().path, Path::new("e/x"));
    assert_eq!(f.read_all(x), b"1");
    f.run(f.core.remove(d, OsStr::new("x"), false)).unwrap();
    f.run(f.core.remove(ROOT, OsStr::new("e"), true)).unwrap();
    assert_eq!(errno(f.ino("e")), libc::ENOENT);
}

#[test]
fn hard_links_and_symlinks() {
    let f = Fixture::new();
    let a = f.create(ROOT, "a", b"data");
    let attr = f.core.link(a, ROOT, OsStr::new("b")).unwrap();
    assert_eq!((attr.ino, attr.nlink), (a, 2));
    f.run(f.core.remove(ROOT, OsStr::new("a"), false)).unwrap();
    // Still reachable through the other name, by the same node.
    assert_eq!(f.read_all(a), b"data");
    assert_eq!(f.core.getattr(a).unwrap().nlink, 1);
    let l = f.run(f.core.symlink(ME, ROOT, OsStr::new("l"), Path::new("../outside"))).unwrap();
    assert_eq!(f.core.readlink(l.ino).unwrap(), b"../outside");
    assert_eq!(l.kind, Kind::Symlink);
}

#[test]
fn names_that_could_escape_are_refused() {
    let f = Fixture::new();
    for name in ["..", ".", "a/b", ""] {
        assert_eq!(errno(f.core.lookup(ROOT, OsStr::new(name))), libc::EINVAL, "{name:?}");
        let create = f.run(f.core.create(ME, ROOT, OsStr::new(name), 0o644, libc::O_WRONLY));
        assert_eq!(errno(create), libc::EINVAL, "{name:?}");
    }
    let long = "x".repeat(256);
    assert_eq!(errno(f.core.lookup(ROOT, OsStr::new(&long))), libc::ENAMETOOLONG);
}

#[test]
fn open_unlinked_file_stays_usable() {
    let f = Fixture::new();
    let a = f.create(ROOT, "a", b"keep");
    let opened = f.run(f.core.open(ME, a, libc::O_RDWR)).unwrap();
    f.run(f.core.remove(ROOT, OsStr::new("a"), false)).unwrap();
    f.core.write(opened.fh, 4, b"!").unwrap();
    assert_eq!(f.run(f.core.read(opened.fh, 0, 10)).unwrap(), b"keep!");
    assert_eq!(f.core.getattr(a).unwrap().size, 5);
    f.run(f.core.release(opened.fh)).unwrap();
}

#[test]
fn invalid_policy_file_is_refused_and_the_old_one_kept() {
    let f = Fixture::new();
    let ino = f.ino(POLICY_FILE).unwrap();
    let before = std::fs::read(f.tree.join(POLICY_FILE)).unwrap();

    let refused = f.write_file(ino, libc::O_WRONLY | libc::O_TRUNC, b"policies:\n  - pattern: x\n    tier: gti\n");
    let e = refused.unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("line 3"), "{e}");
    assert_eq!(std::fs::read(f.tree.join(POLICY_FILE)).unwrap(), before);
    assert_eq!(f.read_all(ino), before);

    // So is a table that pairs keys wrongly: the next mount would not start.
    let stream = f.write_file(ino, libc::O_WRONLY | libc::O_TRUNC, b"policies:\n  - pattern: x\n    tier: git\n    purge: true\n");
    assert!(stream.unwrap_err().to_string().contains("`purge` applies to nats-stream paths"));

    let good = b"policies:\n  - pattern: \"notes/**\"\n    tier: local\n";
    f.write_file(ino, libc::O_WRONLY | libc::O_TRUNC, good).unwrap();
    assert_eq!(std::fs::read(f.tree.join(POLICY_FILE)).unwrap(), good);
    assert_eq!(f.read_all(ino), good);
}

#[test]
fn staged_writes_are_visible_to_the_writer_only_after_commit_in_the_tree() {
    let f = Fixture::new();
    let ino = f.ino(POLICY_FILE).unwrap();
    let before = std::fs::read(f.tree.join(POLICY_FILE)).unwrap();
    let good = b"policies: []\n";
    let opened = f.run(f.core.open(ME, ino, libc::O_RDWR | libc::O_TRUNC)).unwrap();
    f.core.write(opened.fh, 0, good).unwrap();
    assert_eq!(f.run(f.core.read(opened.fh, 0, 100)).unwrap(), good);
    assert_eq!(f.core.getattr(ino).unwrap().size, good.len() as u64);
    assert_eq!(std::fs::read(f.tree.join(POLICY_FILE)).unwrap(), before);
    f.run(f.core.fsync(opened.fh, false)).unwrap();
    assert_eq!(std::fs::read(f.tree.join(POLICY_FILE)).unwrap(), good);
    // Writing after the commit copies the installed content first.
    f.core.write(opened.fh, good.len() as u64, b"# more\n").unwrap();
    assert_eq!(std::fs::read(f.tree.join(POLICY_FILE)).unwrap(), good);
    f.run(f.core.flush(opened.fh)).unwrap();
    f.run(f.core.release(opened.fh)).unwrap();
    assert_eq!(std::fs::read(f.tree.join(POLICY_FILE)).unwrap(), b"policies: []\n# more\n");
    assert_eq!(f.core.counters[&TierKind::Local].commits.load(Ordering::Relaxed), 2);
}

#[test]
fn renaming_an_invalid_file_onto_the_policy_file_is_refused() {
    let f = Fixture::new();
    let syncfs = f.ino(".syncfs").unwrap();
    f.create(syncfs, "new.yml", b"policies: nope\n");
    let r = f.run(f.core.rename(ME, syncfs, OsStr::new("new.yml"), syncfs, OsStr::new("policies.yml"), 0));
    assert_eq!(errno(r), libc::EINVAL);
    assert!(f.tree.join(".syncfs/new.yml").exists());
    assert!(std::fs::read_to_string(f.tree.join(POLICY_FILE)).unwrap().contains("policies:\n"));
    // Hard links to a validated file would bypass validation.
    let ino = f.ino(POLICY_FILE).unwrap();
    assert_eq!(errno(f.core.link(ino, ROOT, OsStr::new("p"))), libc::EPERM);
}

#[test]
fn xattrs_user_and_virtual() {
    let f = Fixture::new();
    let a = f.create(ROOT, "a", b"");
    f.core.setxattr(a, OsStr::new("user.color"), b"blue", 0).unwrap();
    assert_eq!(f.core.getxattr(a, OsStr::new("user.color")).unwrap(), b"blue");
    assert_eq!(f.core.getxattr(a, OsStr::new("user.syncfs.tier")).unwrap(), b"local");
    assert_eq!(f.core.getxattr(a, OsStr::new("user.syncfs.policy")).unwrap(), b"**");
    assert_eq!(errno(f.core.setxattr(a, OsStr::new("user.syncfs.tier"), b"git", 0)), libc::EPERM);
    assert_eq!(errno(f.core.setxattr(a, OsStr::new("trusted.x"), b"1", 0)), libc::EOPNOTSUPP);
    assert_eq!(errno(f.core.getxattr(a, OsStr::new("security.capability"))), libc::ENODATA);
    // The revision of the compare-and-swap idiom can be set on local files.
    f.core.setxattr(a, OsStr::new("user.syncfs.rev"), b"7", 0).unwrap();
    assert_eq!(f.core.getxattr(a, OsStr::new("user.syncfs.rev")).unwrap(), b"7");
    let names = f.core.listxattr(a).unwrap();
    assert!(names.contains(&"user.color".into()));
    assert!(!names.contains(&"user.syncfs.tier".into()));
    f.core.removexattr(a, OsStr::new("user.color")).unwrap();
    assert_eq!(errno(f.core.getxattr(a, OsStr::new("user.color"))), libc::ENODATA);
    assert_eq!(errno(f.core.removexattr(a, OsStr::new("user.color"))), libc::ENODATA);
}

#[test]
fn forget_releases_nodes() {
    let f = Fixture::new();
    let a = f.create(ROOT, "a", b"");
    let (before, _) = f.core.usage();
    f.core.forget(a, 1);
    let (after, _) = f.core.usage();
    assert_eq!(after, before - 1);
    // A later lookup gets a fresh node id.
    assert_ne!(f.ino("a").unwrap(), a);
}
