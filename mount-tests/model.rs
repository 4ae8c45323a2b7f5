//! Reference-model property test: random sequences of file operations run on the mount and on
//! a plain directory of the host side by side. Every step must give the same outcome (the same
//! value or the same errno), and the two trees must be identical at the end.
//!
//! The namespace is tiny on purpose (a few names, two levels of directories) so that random
//! steps collide: renames over existing files, unlinks of open files, names that are
//! directories in one step and files in the next.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::harness::{Mount, Options};

const PATHS: [&str; 8] = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a", "e"];
const TARGETS: [&str; 4] = ["a", "../a", "d/a", "missing"];
const SLOTS: usize = 3;

#[derive(Debug, Clone, Copy)]
enum WriteMode {
    Truncate,
    Exclusive,
    Append,
    InPlace,
}

#[derive(Debug, Clone)]
enum Step {
    Write { path: usize, mode: WriteMode, offset: u16, data: Vec<u8> },
    Truncate { path: usize, len: u16 },
    Read { path: usize },
    Stat { path: usize },
    Unlink { path: usize },
    Mkdir { path: usize },
    Rmdir { path: usize },
    Rename { from: usize, to: usize, flags: u32 },
    Link { from: usize, to: usize },
    Symlink { target: usize, path: usize },
    Readlink { path: usize },
    Chmod { path: usize, mode: u32 },
    SetXattr { path: usize, value: u8 },
    GetXattr { path: usize },
    List { path: usize },
    Open { slot: usize, path: usize, write: bool },
    SlotWrite { slot: usize, offset: u16, data: Vec<u8> },
    SlotRead { slot: usize },
    Close { slot: usize },
}

fn path() -> impl Strategy<Value = usize> {
    0..PATHS.len()
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..200)
}

fn step() -> impl Strategy<Value = Step> {
    let mode = prop_oneof![
        Just(WriteMode::Truncate),
        Just(WriteMode::Exclusive),
        Just(WriteMode::Append),
        Just(WriteMode::InPlace)
    ];
    let flags = prop_oneof![Just(0u32), Just(libc::RENAME_NOREPLACE), Just(libc::RENAME_EXCHANGE)];
    prop_oneof![
        4 => (path(), mode, 0u16..300, data()).prop_map(|(path, mode, offset, data)| Step::Write { path, mode, offset, data }),
        1 => (path(), 0u16..400).prop_map(|(path, len)| Step::Truncate { path, len }),
        2 => path().prop_map(|path| Step::Read { path }),
        2 => path().prop_map(|path| Step::Stat { path }),
        2 => path().prop_map(|path| Step::Unlink { path }),
        2 => path().prop_map(|path| Step::Mkdir { path }),
        1 => path().prop_map(|path| Step::Rmdir { path }),
        3 => (path(), path(), flags).prop_map(|(from, to, flags)| Step::Rename { from, to, flags }),
        1 => (path(), path()).prop_map(|(from, to)| Step::Link { from, to }),
        1 => (0..TARGETS.len(), path()).prop_map(|(target, path)| Step::Symlink { target, path }),
        1 => path().prop_map(|path| Step::Readlink { path }),
        1 => (path(), prop_oneof![Just(0o600u32), Just(0o644), Just(0o755), Just(0o4711)]).prop_map(|(path, mode)| Step::Chmod { path, mode }),
        1 => (path(), any::<u8>()).prop_map(|(path, value)| Step::SetXattr { path, value }),
        1 => path().prop_map(|path| Step::GetXattr { path }),
        1 => path().prop_map(|path| Step::List { path }),
        2 => (0..SLOTS, path(), any::<bool>()).prop_map(|(slot, path, write)| Step::Open { slot, path, write }),
        2 => (0..SLOTS, 0u16..300, data()).prop_map(|(slot, offset, data)| Step::SlotWrite { slot, offset, data }),
        1 => (0..SLOTS).prop_map(|slot| Step::SlotRead { slot }),
        1 => (0..SLOTS).prop_map(|slot| Step::Close { slot }),
    ]
}

type Outcome = Result<String, i32>;

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Closes a file and reports close()'s error, which `drop` would hide.
fn close(file: File) -> Result<(), i32> {
    let fd = file.into_raw_fd();
    // SAFETY: we own the fd.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(errno(std::io::Error::last_os_error()))
    }
}

fn describe(meta: &std::fs::Metadata) -> String {
    let kind = if meta.is_dir() {
        "dir"
    } else if meta.file_type().is_symlink() {
        "symlink"
    } else {
        "file"
    };
    let size = if meta.is_dir() { 0 } else { meta.len() };
    format!("{kind} {size} {:o} {}", meta.mode() & 0o7777, meta.nlink())
}

struct World {
    root: PathBuf,
    slots: Vec<Option<File>>,
}

impl World {
    fn p(&self, i: usize) -> PathBuf {
        self.root.join(PATHS[i])
    }

    fn apply(&mut self, step: &Step) -> Outcome {
        match step {
            Step::Write { path, mode, offset, data } => {
                let mut o = OpenOptions::new();
                o.write(true).create(true).mode(0o644);
                match mode {
                    WriteMode::Truncate => {
                        o.truncate(true);
                    }
                    WriteMode::Exclusive => {
                        o.create_new(true);
                    }
                    WriteMode::Append => {
                        o.append(true);
                    }
                    WriteMode::InPlace => {}
                }
                let file = o.open(self.p(*path)).map_err(errno)?;
                match mode {
                    WriteMode::Append => std::io::Write::write_all(&mut &file, data).map_err(errno)?,
                    _ => file.write_all_at(data, *offset as u64).map_err(errno)?,
                }
                close(file)?;
                Ok(String::new())
            }
            Step::Truncate { path, len } => {
                let c = cstr(&self.p(*path));
                // SAFETY: valid C string.
                if unsafe { libc::truncate(c.as_ptr(), *len as libc::off_t) } != 0 {
                    return Err(errno(std::io::Error::last_os_error()));
                }
                Ok(String::new())
            }
            Step::Read { path } => std::fs::read(self.p(*path))
                .map(|d| format!("{d:?}"))
                .map_err(errno),
            Step::Stat { path } => std::fs::symlink_metadata(self.p(*path))
                .map(|m| describe(&m))
                .map_err(errno),
            Step::Unlink { path } => std::fs::remove_file(self.p(*path)).map(|()| String::new()).map_err(errno),
            Step::Mkdir { path } => std::fs::create_dir(self.p(*path)).map(|()| String::new()).map_err(errno),
            Step::Rmdir { path } => std::fs::remove_dir(self.p(*path)).map(|()| String::new()).map_err(errno),
            Step::Rename { from, to, flags } => {
                let (f, t) = (cstr(&self.p(*from)), cstr(&self.p(*to)));
                // SAFETY: valid C strings.
                let r = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), *flags) };
                if r != 0 {
                    return Err(errno(std::io::Error::last_os_error()));
                }
                Ok(String::new())
            }
            Step::Link { from, to } => std::fs::hard_link(self.p(*from), self.p(*to)).map(|()| String::new()).map_err(errno),
            Step::Symlink { target, path } => std::os::unix::fs::symlink(TARGETS[*target], self.p(*path))
                .map(|()| String::new())
                .map_err(errno),
            Step::Readlink { path } => std::fs::read_link(self.p(*path))
                .map(|t| t.display().to_string())
                .map_err(errno),
            Step::Chmod { path, mode } => std::fs::set_permissions(self.p(*path), std::fs::Permissions::from_mode(*mode))
                .map(|()| String::new())
                .map_err(errno),
            Step::SetXattr { path, value } => {
                let (p, n) = (cstr(&self.p(*path)), CString::new("user.model").unwrap());
                // SAFETY: valid C strings and a one-byte buffer.
                let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), (value as *const u8).cast(), 1, 0) };
                if r != 0 {
                    return Err(errno(std::io::Error::last_os_error()));
                }
                Ok(String::new())
            }
            Step::GetXattr { path } => {
                let (p, n) = (cstr(&self.p(*path)), CString::new("user.model").unwrap());
                let mut buf = [0u8; 16];
                // SAFETY: buffer of the given length.
                let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
                if r < 0 {
                    return Err(errno(std::io::Error::last_os_error()));
                }
                Ok(format!("{:?}", &buf[..r as usize]))
            }
            Step::List { path } => {
                let mut names: Vec<String> = std::fs::read_dir(self.p(*path))
                    .map_err(errno)?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(errno)?;
                names.sort();
                Ok(names.join(","))
            }
            Step::Open { slot, path, write } => {
                if let Some(old) = self.slots[*slot].take() {
                    close(old)?;
                }
                let file = OpenOptions::new().read(true).write(*write).open(self.p(*path)).map_err(errno)?;
                self.slots[*slot] = Some(file);
                Ok(String::new())
            }
            Step::SlotWrite { slot, offset, data } => match &self.slots[*slot] {
                None => Ok("closed".into()),
                Some(file) => file.write_all_at(data, *offset as u64).map(|()| String::new()).map_err(errno),
            },
            Step::SlotRead { slot } => match &self.slots[*slot] {
                None => Ok("closed".into()),
                Some(file) => {
                    let mut buf = vec![0u8; 4096];
                    let n = file.read_at(&mut buf, 0).map_err(errno)?;
                    Ok(format!("{:?}", &buf[..n]))
                }
            },
            Step::Close { slot } => match self.slots[*slot].take() {
                None => Ok("closed".into()),
                Some(file) => close(file).map(|()| String::new()),
            },
        }
    }

    fn close_all(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(f) = slot.take() {
                let _ = close(f);
            }
        }
    }
}

/// Everything observable about a tree: per path, its description, content or target, xattr.
fn snapshot(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let extra = if meta.file_type().is_symlink() {
                std::fs::read_link(&path).unwrap().display().to_string()
            } else if meta.is_file() {
                format!("{:?}", std::fs::read(&path).unwrap())
            } else {
                String::new()
            };
            let xattr = {
                let (p, n) = (cstr(&path), CString::new("user.model").unwrap());
                let mut buf = [0u8; 16];
                // SAFETY: buffer of the given length.
                let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
                if r < 0 { String::new() } else { format!("{:?}", &buf[..r as usize]) }
            };
            out.push(format!("{rel}: {} {extra} {xattr}", describe(&meta)));
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

fn run_model(mount: &Mount, cases: u32) {
    let plain = mount.base.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    });
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&prop::collection::vec(step(), 1..40), |steps| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("case-{n}");
        let mut real = World { root: mount.path(&name), slots: (0..SLOTS).map(|_| None).collect() };
        let mut model = World { root: plain.join(&name), slots: (0..SLOTS).map(|_| None).collect() };
        std::fs::create_dir(&real.root).unwrap();
        std::fs::create_dir(&model.root).unwrap();
        for (i, step) in steps.iter().enumerate() {
            let got = real.apply(step);
            let want = model.apply(step);
            prop_assert_eq!(&got, &want, "step {} {:?}", i, step);
        }
        real.close_all();
        model.close_all();
        prop_assert_eq!(snapshot(&real.root), snapshot(&model.root));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn model_passthrough_mount() {
    let m = Mount::local();
    run_model(&m, 250);
}

#[test]
fn model_mount_without_passthrough() {
    let m = Mount::with(Options {
        config: Some("fuse:\n  passthrough: false\n".into()),
        ..Options::local()
    });
    run_model(&m, 120);
}
