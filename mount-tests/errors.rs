//! One test per row of docs/errors.md: the errno a program sees, and that nothing changed.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::harness::{last_errno, Mount};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn setxattr(p: &Path, name: &str, value: &[u8]) -> i32 {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    if unsafe { libc::setxattr(c(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) } == 0 {
        0
    } else {
        last_errno()
    }
}

fn getxattr(p: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: buffer of the given length.
    let r = unsafe { libc::getxattr(c(p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(last_errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

#[test]
fn einval_invalid_policy_file_close_and_rename() {
    let m = Mount::start();
    let before = std::fs::read(m.path(".syncfs/policies.yml")).unwrap();
    // close() reports the refusal; cp says so and exits 1.
    let out = m.sh("printf 'policies:\\n  - pattern: x\\n    tier: gti\\n' > ../bad.yml; cp ../bad.yml .syncfs/policies.yml");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Invalid argument"));
    assert_eq!(std::fs::read(m.path(".syncfs/policies.yml")).unwrap(), before);
    // fsync() reports it too.
    let out = m.sh("python3 -c \"import os; fd=os.open('.syncfs/policies.yml', os.O_WRONLY|os.O_TRUNC); os.write(fd, b'policies: ['); os.fsync(fd)\"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Errno 22"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(m.path(".syncfs/policies.yml")).unwrap(), before);
    // Renaming an invalid file over it fails and the temporary file stays.
    std::fs::copy(m.base.path().join("bad.yml"), m.path(".syncfs/new.yml")).unwrap();
    let err = std::fs::rename(m.path(".syncfs/new.yml"), m.path(".syncfs/policies.yml")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    assert!(m.path(".syncfs/new.yml").exists());
    assert_eq!(std::fs::read(m.path(".syncfs/policies.yml")).unwrap(), before);
    // The reason is in the log.
    let log = std::fs::read_to_string(m.state.join("syncfs.log")).unwrap();
    assert!(log.contains("unknown tier `gti`"), "{log}");
}

#[test]
fn eperm_read_only_syncfs_attributes() {
    let m = Mount::start();
    m.sh_ok("echo x > f");
    let f = m.path("f");
    for name in ["user.syncfs.tier", "user.syncfs.policy", "user.syncfs.node"] {
        assert_eq!(setxattr(&f, name, b"v"), libc::EPERM, "{name}");
    }
    let n = CString::new("user.syncfs.tier").unwrap();
    // SAFETY: valid C strings.
    assert_ne!(unsafe { libc::removexattr(c(&f).as_ptr(), n.as_ptr()) }, 0);
    assert_eq!(last_errno(), libc::EPERM);
    assert_eq!(getxattr(&f, "user.syncfs.tier", 64).unwrap(), b"git");
}

#[test]
fn eperm_hard_link_to_a_validated_file_and_device_nodes() {
    let m = Mount::start();
    let err = std::fs::hard_link(m.path(".syncfs/policies.yml"), m.path("p")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert!(!m.path("p").exists());
    let dev = c(&m.path("dev"));
    // SAFETY: valid C string; a character device node (1, 3 is /dev/null's number).
    let r = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    assert_eq!((r, last_errno()), (-1, libc::EPERM));
}

#[test]
fn eopnotsupp_attributes_outside_user() {
    let m = Mount::start();
    m.sh_ok("echo x > f");
    assert_eq!(setxattr(&m.path("f"), "trusted.syncfs-test", b"v"), libc::EOPNOTSUPP);
}

#[test]
fn enodata_and_erange_attributes() {
    let m = Mount::start();
    m.sh_ok("echo x > f && setfattr -n user.long -v 0123456789 f");
    assert_eq!(getxattr(&m.path("f"), "user.missing", 64), Err(libc::ENODATA));
    assert_eq!(getxattr(&m.path("f"), "security.capability", 64), Err(libc::ENODATA));
    assert_eq!(getxattr(&m.path("f"), "user.long", 4), Err(libc::ERANGE));
    assert_eq!(getxattr(&m.path("f"), "user.long", 64).unwrap(), b"0123456789");
}

#[test]
fn enametoolong_names() {
    let m = Mount::start();
    let name = "n".repeat(300);
    let err = std::fs::write(m.path(&name), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG));
}

#[test]
fn eexist_exclusive_create_and_noreplace_rename() {
    let m = Mount::start();
    m.sh_ok("echo first > f && echo other > g");
    let out = m.sh("set -o noclobber; echo second > f");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot overwrite existing file"));
    assert_eq!(m.sh_ok("cat f"), "first\n");
    let (from, to) = (c(&m.path("g")), c(&m.path("f")));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE)
    };
    assert_eq!((r, last_errno()), (-1, libc::EEXIST));
    assert_eq!(m.sh_ok("cat f g"), "first\nother\n");
}

#[test]
fn tree_errors_pass_through_unchanged() {
    let m = Mount::start();
    m.sh_ok("mkdir -p d/e && echo x > f");
    let cases: Vec<(std::io::Error, i32)> = vec![
        (std::fs::read(m.path("missing")).unwrap_err(), libc::ENOENT),
        (std::fs::remove_dir(m.path("d")).unwrap_err(), libc::ENOTEMPTY),
        (std::fs::read_dir(m.path("f")).unwrap_err(), libc::ENOTDIR),
        (std::fs::remove_dir(m.path("f")).unwrap_err(), libc::ENOTDIR),
    ];
    for (err, errno) in cases {
        assert_eq!(err.raw_os_error(), Some(errno), "{err}");
    }
    // Moving a directory into itself is the tree's EINVAL.
    let err = std::fs::rename(m.path("d"), m.path("d/e/d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
}
