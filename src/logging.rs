//! The daemon's log, and where a panic's text goes, on a disk that may be full.
//!
//! The log is the daemon's stderr (`--state/syncfs.log` for a background mount), and the
//! state directory's disk can fill up. A log line that cannot be written is dropped and
//! counted, never an error: `tracing-subscriber` reports a failed write with `eprintln!`,
//! which panics when stderr fails, and a panic on a FUSE or runtime thread took the whole
//! daemon down (SIGABRT). Once a write succeeds again the log says how many lines it lost.
//!
//! A panic's text goes to stderr (the log) and to `--state/panic.log`, whose space is
//! reserved when the daemon starts ([`PANIC_RESERVE`] bytes, `fallocate` beyond the end of
//! the file), so writing into it needs no free block: the text survives a full disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Bytes reserved in `panic.log` for the text of panics of one run.
pub const PANIC_RESERVE: u64 = 64 << 10;
/// A `panic.log` larger than this at startup is moved to `panic.log.old` first.
const PANIC_KEEP: u64 = 1 << 20;

/// Log lines dropped since the last line that was written.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The last errno a dropped line got.
static DROP_ERRNO: AtomicU64 = AtomicU64::new(0);
/// Log lines dropped in this run (for `status`).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// `panic.log`, and where the next panic's text goes in it.
static PANIC_FILE: OnceLock<Mutex<(File, u64)>> = OnceLock::new();

/// Sets up the log on stderr with `filter` (`SYNCFS_LOG` wins), and the panic hook.
pub fn init(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNCFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    // At debug level every FUSE request's span is logged as it opens: one line per request.
    let _ = tracing_subscriber::fmt()
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::NEW)
        .with_env_filter(filter)
        .with_writer(|| Stderr)
        .log_internal_errors(false)
        .with_ansi(false)
        .try_init();
    install_panic_hook();
}

/// Keeps the text of later panics in `state_dir/panic.log` too, reserving its space now.
pub fn keep_panics_in(state_dir: &Path) {
    if let Err(e) = reserve_panic_file(&state_dir.join("panic.log")) {
        tracing::warn!(error = %e, "cannot reserve space for panic.log; a panic's text goes to the log only");
    }
}

/// Log lines this run could not write (a full disk).
pub fn dropped_lines() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

fn reserve_panic_file(path: &Path) -> io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > PANIC_KEEP) {
        std::fs::rename(path, path.with_extension("log.old"))?;
    }
    let file = OpenOptions::new().create(true).write(true).truncate(false).mode(0o600).open(path)?;
    let end = file.metadata()?.len();
    // SAFETY: valid fd; KEEP_SIZE allocates blocks past the end without changing the size.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, end as libc::off_t, PANIC_RESERVE as libc::off_t) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = PANIC_FILE.set(Mutex::new((file, end)));
    Ok(())
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            let text = format!(
                "{} thread '{}' panicked at {}:\n{}\n",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                thread.name().unwrap_or("<unnamed>"),
                info.location().map(|l| l.to_string()).unwrap_or_default(),
                payload_text(info.payload()),
            );
            // Both, best effort: the log may be on a full disk; panic.log has room reserved.
            let _ = write_fd(2, text.as_bytes());
            if let Some(file) = PANIC_FILE.get() {
                if let Ok(mut guard) = file.lock() {
                    let (file, at) = &mut *guard;
                    if file.write_all_at(text.as_bytes(), *at).is_ok() {
                        *at += text.len() as u64;
                        let _ = file.sync_data();
                    }
                }
            }
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "Box<dyn Any>"
    }
}

/// Writes all of `buf` to `fd`, retrying short writes and EINTR.
fn write_fd(fd: i32, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: valid buffer; fd 2 is ours for the life of the process.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// The log's writer: stderr, dropping (and counting) what cannot be written.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // std's lock keeps lines whole and in order, as the default writer does.
        let mut err = io::stderr().lock();
        let dropped = DROPPED.load(Ordering::Relaxed);
        if dropped > 0 {
            let errno = DROP_ERRNO.load(Ordering::Relaxed) as i32;
            let note = format!(
                "syncfs: {dropped} log lines were dropped: {}\n",
                io::Error::from_raw_os_error(errno)
            );
            if err.write_all(note.as_bytes()).is_ok() {
                DROPPED.fetch_sub(dropped, Ordering::Relaxed);
            }
        }
        if let Err(e) = err.write_all(buf) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
            DROP_ERRNO.store(e.raw_os_error().unwrap_or(libc::EIO) as u64, Ordering::Relaxed);
        }
        // Never an error: the caller would report it by panicking.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_panic_file_has_its_space_reserved_and_keeps_older_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("panic.log");
        std::fs::write(&path, b"earlier\n").unwrap();
        reserve_panic_file(&path).unwrap();
        let (file, at) = &*PANIC_FILE.get().unwrap().lock().unwrap();
        assert_eq!(*at, 8);
        // SAFETY: valid fd and out pointer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut st) }, 0);
        assert!(st.st_blocks as u64 * 512 >= PANIC_RESERVE, "blocks are allocated past the end");
        assert_eq!(st.st_size, 8, "the size is unchanged");
    }
}
