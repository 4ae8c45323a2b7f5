//! The guard: a small process beside each daemon that aborts the daemon's FUSE connection when
//! the daemon dies without unmounting.
//!
//! Why: a daemon killed (`kill -9`, OOM) while one of its threads sends the kernel an entry
//! invalidation can never finish dying. That thread waits, uninterruptibly, for the directory's
//! lock, held by a program's lookup that waits for an answer from the daemon's (dead) workers;
//! `/dev/fuse` stays open, so the kernel never aborts the connection, and every program that
//! touches the mount hangs for good (seen in the kill -9 soak run). Aborting the connection
//! through fusectl (`/sys/fs/fuse/connections/N/abort`) ends every waiting request with
//! `ENOTCONN`, and the dying daemon with it. `syncfs umount` then cleans the stale mount as
//! usual; nothing acknowledged is lost (what close() acknowledged is on disk or on the server).
//!
//! The guard learns of the death from `PR_SET_PDEATHSIG`, which the kernel sends when the
//! daemon's main thread exits — also while another thread is stuck — and aborts only the
//! connection of the mount it was started for (same mount id and device in mountinfo).

use std::io;
use std::path::Path;

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// One FUSE mount, as `/proc/self/mountinfo` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountId {
    /// The mount's id (first field).
    pub id: u64,
    /// The device minor: the fusectl connection number.
    pub minor: u32,
}

/// The newest FUSE mount on `mountpoint` in `mountinfo` (text of `/proc/self/mountinfo`).
pub fn find_mount(mountinfo: &str, mountpoint: &Path) -> Option<MountId> {
    let want = escape(&mountpoint.to_string_lossy());
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            if fields.get(4) != Some(&want.as_str()) || !fstype.starts_with("fuse") {
                return None;
            }
            let (_, minor) = fields.get(2)?.split_once(':')?;
            Some(MountId { id: fields[0].parse().ok()?, minor: minor.parse().ok()? })
        })
        .last()
}

/// mountinfo's escaping of a path (octal for space, tab, newline and backslash).
fn escape(path: &str) -> String {
    let mut out = String::new();
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Starts the guard of this process's mount at `mountpoint`. Must be called from the thread
/// that lives as long as the mount (the one running the FUSE session): the death signal
/// follows that thread.
pub fn start(mountpoint: &Path) -> io::Result<std::process::Child> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = find_mount(&mountinfo, mountpoint)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the new mount is not in mountinfo"))?;
    std::process::Command::new(std::env::current_exe()?)
        .args(["guard", &std::process::id().to_string(), &mount.id.to_string(), &mount.minor.to_string()])
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
}

/// `syncfs guard PID MOUNT_ID MINOR MOUNTPOINT`: waits for the daemon `pid` to die, then
/// aborts its connection if its mount is still there.
pub fn run(pid: u32, mount: MountId, mountpoint: &Path) -> io::Result<()> {
    // SAFETY: plain libc calls on this process's own descriptors and signal state.
    unsafe {
        // Inherited descriptors (the daemon's readiness pipe) must not outlive the daemon.
        for fd in 3..1024 {
            libc::close(fd);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1 as libc::c_ulong);
        loop {
            // The parent may have died before the death signal was asked for.
            if libc::getppid() as u32 != pid {
                break;
            }
            let timeout = libc::timespec { tv_sec: 1, tv_nsec: 0 };
            if libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) == libc::SIGUSR1 {
                break;
            }
            if !still_mounted(mount, mountpoint) {
                return Ok(());
            }
        }
    }
    // A clean exit stops the guard before it unmounts; here the daemon died.
    if !still_mounted(mount, mountpoint) {
        return Ok(());
    }
    abort(mount.minor)?;
    eprintln!(
        "syncfs guard: the daemon (pid {pid}) died without unmounting {}; aborted its FUSE connection {} so that no program waits for it; run `syncfs umount` to clean up",
        mountpoint.display(),
        mount.minor
    );
    Ok(())
}

fn still_mounted(mount: MountId, mountpoint: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| find_mount(&m, mountpoint) == Some(mount))
}

/// Aborts FUSE connection `minor`, mounting fusectl first where it is not.
pub fn abort(minor: u32) -> io::Result<()> {
    let dir = Path::new(FUSECTL);
    if !dir.join(minor.to_string()).exists() {
        let (src, target, fstype) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
        // SAFETY: valid C strings; mounting fusectl where the kernel expects it.
        unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    }
    std::fs::write(dir.join(minor.to_string()).join("abort"), "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_fuse_mount_on_the_mount_point_is_found() {
        let info = "\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
36 22 0:41 / /tmp/a\\040b/mnt rw,nosuid - fuse syncfs rw,user_id=0
37 22 0:44 / /tmp/other rw - fuse syncfs rw
41 36 0:47 / /tmp/a\\040b/mnt rw,nosuid - fuse syncfs rw,user_id=0
";
        assert_eq!(find_mount(info, Path::new("/tmp/a b/mnt")), Some(MountId { id: 41, minor: 47 }));
        assert_eq!(find_mount(info, Path::new("/tmp/a")), None);
        assert_eq!(find_mount(info, Path::new("/")), None, "not a FUSE mount");
    }
}
