//! System calls on the node's materialized tree (`--state/tree`), made safe to call as root.
//!
//! The daemon runs as root and serves other users, so no call here may follow a symlink a user
//! planted: names are resolved with `*at()` calls relative to a directory fd and `O_NOFOLLOW` /
//! `AT_SYMLINK_NOFOLLOW`; directories are opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, so the kernel itself refuses
//! any path that would leave the tree. Calls that have no `*at()` form with a no-follow flag
//! (chmod, utimens, truncate, xattrs) go through `/proc/self/fd/N` of an `O_PATH` fd whose
//! identity was checked first: that magic link names exactly one inode and cannot be swapped.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::time::SystemTime;

/// The identity of a backing inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ident {
    /// Device of the backing filesystem.
    pub dev: u64,
    /// Inode number on that device.
    pub ino: u64,
}

impl Ident {
    /// The identity of a stat result.
    pub fn of(st: &libc::stat) -> Ident {
        Ident {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct RawDirEntry {
    /// The entry's name.
    pub name: OsString,
    /// `d_type`, `DT_UNKNOWN` when the filesystem does not say.
    pub d_type: u8,
    /// The backing inode number.
    pub ino: u64,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_fd(ret: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a non-negative return of an open call is a new fd that we own.
    cvt(ret).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A name as a C string; names with NUL bytes cannot exist.
pub fn cname(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The `/proc/self/fd/N` path of an fd.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd and C string; stat is written on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `fstat` of any fd, `O_PATH` ones included.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: AT_EMPTY_PATH stats the fd itself; stat is written on success.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub fn open_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and C string.
    cvt_fd(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })
}

/// [`open_at`] of a regular file whose content the daemon reads: with `O_NOATIME`, so its own
/// reads (commits, hashes) never move an atime `utimensat` set. Without it where the kernel
/// refuses it (neither owner nor CAP_FOWNER).
pub fn open_content_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    match open_at(dir, name, flags | libc::O_NOATIME, mode) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open_at(dir, name, flags, mode),
        other => other,
    }
}

/// An `O_PATH` fd of the entry `name` in `dir`, never following a symlink.
pub fn open_path_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_PATH, 0)
}

/// Opens the directory `rel` (a relative path, `/`-separated) below `root` as `O_PATH`, with the
/// kernel refusing `..`, symlinks, magic links and mount crossings on the way.
pub fn resolve_dir(root: BorrowedFd<'_>, rel: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zero is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    // SAFETY: valid fd, C string and open_how of the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    cvt_fd(ret as libc::c_int)
}

/// Opens the inode behind an `O_PATH` fd for I/O, through its `/proc/self/fd` magic link.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<File> {
    let path = proc_path(fd);
    // SAFETY: valid C string. The magic link resolves to exactly the inode of `fd`.
    cvt_fd(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) }).map(File::from)
}

/// `mkdirat`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `mknodat`.
pub fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

/// `symlinkat`.
pub fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let target = cname(target)?;
    // SAFETY: valid fd and C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Links the inode behind `fd` (any fd, `O_PATH` included) as `name` in `dir`.
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fds and C string; AT_EMPTY_PATH links the fd itself (needs
    // CAP_DAC_READ_SEARCH, which the root daemon has).
    cvt(unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// `unlinkat`, with `AT_REMOVEDIR` for directories.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat2`.
pub fn rename_at(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid fds and C strings.
    cvt(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// The target of the symlink behind an `O_PATH | O_NOFOLLOW` fd.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid fd, empty path (the fd itself), buffer of the length given.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

/// Changes the owner of the inode behind `fd` (`None` keeps that id). Never follows a symlink.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    // SAFETY: valid fd; AT_EMPTY_PATH applies to the fd itself.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Changes the mode of the (non-symlink) inode behind `fd`.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid C string; the magic link names the checked inode.
    cvt(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

/// A time to set: a specific instant, now, or left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// Leave unchanged.
    Omit,
    /// The current time.
    Now,
    /// This instant.
    At(SystemTime),
}

fn timespec(t: SetTime) -> libc::timespec {
    match t {
        SetTime::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        SetTime::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        SetTime::At(t) => {
            let (secs, nanos) = match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    if d.subsec_nanos() == 0 {
                        (-(d.as_secs() as i64), 0)
                    } else {
                        (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos() as i64)
                    }
                }
            };
            libc::timespec {
                tv_sec: secs as libc::time_t,
                tv_nsec: nanos as libc::c_long,
            }
        }
    }
}

/// Sets access and modification times of the inode behind `fd`; works on symlinks too.
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: SetTime, mtime: SetTime) -> io::Result<()> {
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: valid fd, AT_EMPTY_PATH applies to the fd itself (O_PATH fds allowed since 5.8
    // only via the path form, so use the magic link when the direct form is refused).
    let ret = unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let path = proc_path(fd);
    // SAFETY: valid C string and times array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

/// Gives `to` (an open file) the owner, mode and `user.*` attributes of the inode behind `from`
/// (any fd), changing only what differs.
pub fn copy_metadata(from: BorrowedFd<'_>, to: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsFd;
    let src = fstat(from)?;
    let dst = fstat(to.as_fd())?;
    let fd = to.as_raw_fd();
    if (src.st_uid, src.st_gid) != (dst.st_uid, dst.st_gid) {
        // SAFETY: valid fd.
        cvt(unsafe { libc::fchown(fd, src.st_uid, src.st_gid) })?;
    }
    if src.st_mode & 0o7777 != dst.st_mode & 0o7777 {
        // SAFETY: valid fd.
        cvt(unsafe { libc::fchmod(fd, src.st_mode & 0o7777) })?;
    }
    copy_user_xattrs(from, to.as_fd())
}

/// `getxattr` on the inode behind `fd`. `None` when the attribute does not exist.
pub fn get_xattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let path = proc_path(fd);
    loop {
        // SAFETY: size query with a null buffer.
        let size = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENODATA) => Ok(None),
                _ => Err(e),
            };
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buffer of the given length.
        let n = unsafe {
            libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => continue, // grew in between
                Some(libc::ENODATA) => return Ok(None),
                _ => return Err(e),
            }
        }
        buf.truncate(n as usize);
        return Ok(Some(buf));
    }
}

/// `setxattr` on the inode behind `fd`.
pub fn set_xattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid C strings and buffer.
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `removexattr` on the inode behind `fd`.
pub fn remove_xattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// The attribute names of the inode behind `fd`.
pub fn list_xattr(fd: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let path = proc_path(fd);
    // Most files have few attributes: try a stack buffer before asking for the size.
    let mut small = [0u8; 1024];
    // SAFETY: buffer of the given length.
    let n = unsafe { libc::listxattr(path.as_ptr(), small.as_mut_ptr().cast(), small.len()) };
    if n >= 0 {
        return Ok(small[..n as usize]
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsString::from_vec(n.to_vec()))
            .collect());
    }
    loop {
        // SAFETY: size query.
        let size = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buffer of the given length.
        let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(n as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsString::from_vec(n.to_vec()))
            .collect());
    }
}

/// `fstatvfs`.
pub fn statvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid fd; written on success.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `fstatfs` (for the filesystem type).
pub fn statfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid fd; written on success.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: succeeded.
    Ok(unsafe { st.assume_init() })
}

/// Lists a directory given as an `O_PATH` fd.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<RawDirEntry>> {
    let fd = open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: fdopendir takes ownership of the fd on success.
    let stream = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd);
    let mut entries = Vec::new();
    let result = loop {
        // readdir64 reports errors only through errno, so clear it first.
        // SAFETY: errno is thread-local.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: valid stream.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            let errno = unsafe { *libc::__errno_location() };
            break if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(errno))
            };
        }
        // SAFETY: readdir64 returned a valid entry with a NUL-terminated name.
        let (name, d_type, ino) = unsafe {
            let ent = &*ent;
            (
                CStr::from_ptr(ent.d_name.as_ptr()).to_bytes().to_vec(),
                ent.d_type,
                ent.d_ino,
            )
        };
        entries.push(RawDirEntry {
            name: OsString::from_vec(name),
            d_type,
            ino,
        });
    };
    // SAFETY: the stream is ours and closed once.
    unsafe { libc::closedir(stream) };
    result.map(|()| entries)
}

/// Copies the `user.*` attributes of one inode to another (both given as fds).
pub fn copy_user_xattrs(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<()> {
    for name in list_xattr(from)? {
        if !name.as_bytes().starts_with(b"user.") {
            continue;
        }
        let cname = cname(&name)?;
        if let Some(value) = get_xattr(from, &cname)? {
            set_xattr(to, &cname, &value, 0)?;
        }
    }
    Ok(())
}

/// Reads the regular file at `rel` (relative to `root`) without following any symlink on the
/// way; `None` when it does not exist. Also returns its permission bits.
pub fn read_file(root: BorrowedFd<'_>, rel: &std::path::Path) -> io::Result<Option<(Vec<u8>, u32)>> {
    use std::io::Read;
    let parent = rel.parent().unwrap_or(std::path::Path::new(""));
    let Some(name) = rel.file_name() else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let dir = if parent.as_os_str().is_empty() {
        None
    } else {
        match resolve_dir(root, &cname(parent.as_os_str())?) {
            Ok(fd) => Some(fd),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    let dir_fd = dir.as_ref().map(|d| { use std::os::fd::AsFd; d.as_fd() }).unwrap_or(root);
    let fd = match open_at(dir_fd, &cname(name)?, libc::O_RDONLY, 0) {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ELOOP)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut file = std::fs::File::from(fd);
    let st = { use std::os::fd::AsFd; fstat(file.as_fd())? };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(st.st_size as usize);
    file.read_to_end(&mut data)?;
    Ok(Some((data, st.st_mode & 0o7777)))
}

/// A reader of a whole file by positional reads. The files syncfs reads whole (a stage's
/// content, a commit in flight) are shared by several handles and tasks at once; a `dup` of one
/// shares its offset, so a seek and read there could race with another and read from the
/// middle, or nothing.
pub struct ReadAt<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl<'a> ReadAt<'a> {
    /// Reads `file` from its start.
    pub fn new(file: &'a std::fs::File) -> ReadAt<'a> {
        ReadAt { file, pos: 0 }
    }
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
