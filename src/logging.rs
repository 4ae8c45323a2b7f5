//! The daemon's log, and where a panic's text goes, on a disk that may be full.
//!
//! The log is the daemon's stderr (`--state/syncfs.log` for a background mount), and the
//! state directory's disk can fill up. A log line that cannot be written is dropped and
//! counted, never an error: `tracing-subscriber` reports a failed write with `eprintln!`,
//! which panics when stderr fails, and a panic on a FUSE or runtime thread took the whole
//! daemon down (SIGABRT). Once a write succeeds again the log says how many lines it lost.
//!
//! Warnings are bounded: at most [`BURST`] lines a minute from any one place in the code (a
//! program retrying a refused operation, a flood of remote changes); the next line says how
//! many were left out and from where. A background mount's log file is rotated at
//! `log_max_bytes` (one previous file kept, `syncfs.log.1`).
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
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter))
        // fuser's session tries a second unmount after ours (its "still mounted" test reads
        // POLLERR the wrong way round) and warns "Failed to umount filesystem: Invalid
        // argument" at every unmount; the daemon unmounts and reports failures itself.
        .add_directive("fuser::session=error".parse().expect("a valid directive"));
    // At debug level every FUSE request's span is logged as it opens: one line per request.
    let fmt = tracing_subscriber::fmt::layer()
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::NEW)
        .with_writer(|| Stderr)
        .log_internal_errors(false)
        .with_ansi(false);
    let _ = tracing_subscriber::registry().with(Bounded).with(filter).with(fmt).try_init();
    install_panic_hook();
}

/// Lines a minute one place in the code may log at WARN or ERROR before it is left out.
pub const BURST: u32 = 20;
const WINDOW: Duration = Duration::from_secs(60);

/// Per call site: the current window's start, lines logged in it, lines left out.
/// Keyed by source file and line: one place in the code.
static SITES: Mutex<Option<HashMap<(&'static str, u32), (Instant, u32, u64)>>> = Mutex::new(None);
/// Notes of left-out lines, written before the next line.
static LEFT_OUT: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Lines left out in this run (for `status`).
static LEFT_OUT_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Leaves out WARN and ERROR lines past [`BURST`] a minute from one call site.
struct Bounded;

impl<S: Subscriber> Layer<S> for Bounded {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::WARN {
            return true;
        }
        admit(meta.file().unwrap_or("?"), meta.line().unwrap_or(0), Instant::now())
    }
}

fn admit(file: &'static str, line: u32, now: Instant) -> bool {
    let mut sites = SITES.lock().unwrap_or_else(|e| e.into_inner());
    let entry = sites.get_or_insert_with(HashMap::new).entry((file, line)).or_insert((now, 0, 0));
    if now.duration_since(entry.0) >= WINDOW {
        if entry.2 > 0 {
            let note = format!("syncfs: {} warnings from {file}:{line} were left out in the last minute\n", entry.2);
            LEFT_OUT.lock().unwrap_or_else(|e| e.into_inner()).push(note);
        }
        *entry = (now, 0, 0);
    }
    if entry.1 < BURST {
        entry.1 += 1;
        true
    } else {
        entry.2 += 1;
        LEFT_OUT_TOTAL.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// Warning lines left out in this run.
pub fn left_out_lines() -> u64 {
    LEFT_OUT_TOTAL.load(Ordering::Relaxed)
}

/// The log file behind stderr, and the size at which it is rotated.
static ROTATE: OnceLock<(PathBuf, u64)> = OnceLock::new();
/// Bytes in the current log file.
static WRITTEN: AtomicU64 = AtomicU64::new(0);

/// Rotates `path`, the file stderr and stdout write to, when it grows past `max_bytes`.
pub fn rotate_at(path: &Path, max_bytes: u64) {
    WRITTEN.store(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0), Ordering::Relaxed);
    let _ = ROTATE.set((path.to_path_buf(), max_bytes.max(4096)));
}

/// Moves the log to `NAME.1` and points stderr and stdout at a new one. Called with the
/// stderr lock held, so no line is split between the files.
fn rotate(path: &Path) -> io::Result<()> {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::rename(path, &old)?;
    let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    // SAFETY: dup2 onto the process's own stdio fds; the new file stays open through them.
    unsafe {
        libc::dup2(file.as_raw_fd(), 2);
        libc::dup2(file.as_raw_fd(), 1);
    }
    WRITTEN.store(0, Ordering::Relaxed);
    Ok(())
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
        let notes = std::mem::take(&mut *LEFT_OUT.lock().unwrap_or_else(|e| e.into_inner()));
        for note in notes {
            let _ = err.write_all(note.as_bytes());
        }
        if let Some((path, max)) = ROTATE.get() {
            if WRITTEN.fetch_add(buf.len() as u64, Ordering::Relaxed) + buf.len() as u64 > *max && rotate(path).is_err() {
                // Try again after another log's worth rather than at every line.
                WRITTEN.store(0, Ordering::Relaxed);
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
    fn a_call_site_logs_a_burst_a_minute_and_then_says_what_it_left_out() {
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| admit("x.rs", 7, t0)).count();
        assert_eq!(admitted, BURST as usize);
        assert!(LEFT_OUT.lock().unwrap().is_empty(), "no note inside the window");
        assert!(admit("x.rs", 7, t0 + WINDOW));
        let notes = LEFT_OUT.lock().unwrap().clone();
        assert!(notes.iter().any(|n| n.contains("80 warnings from x.rs:7")), "{notes:?}");
    }

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
