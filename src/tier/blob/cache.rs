//! The node's cache of blob content: files named by their SHA-256 in `--state/blobs/`,
//! least recently used first out once they hold more than `cache.max_bytes`.
//!
//! Content is verified when it enters the cache (its hash is computed while it is fetched or
//! committed). An entry's *fingerprint* (inode, size, modification and change times) is
//! recorded then; an entry whose fingerprint differs when it is next used, or that has none
//! (the first use after a restart), is hashed again before it is served, so a cache file
//! changed behind syncfs's back is detected and fetched again. Eviction only unlinks: a
//! program reading an evicted blob keeps its open file.
//!
//! The cache also honours the disk's free space, whatever `cache.max_bytes` says: it holds
//! at most half of its filesystem, keeps a reserve free ([`reserve`]) and makes room for a fetch before it starts, evicting content
//! only it holds, and the tier drops the content no path of this node names any more (see
//! `Inner::release`), so deleted blobs do not fill the state disk.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::tier::space;

/// What identifies a cache file's state on disk; any write changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Fingerprint {
    fn of(file: &File) -> io::Result<Fingerprint> {
        let m = file.metadata()?;
        Ok(Fingerprint {
            ino: m.ino(),
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        })
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    checked: Option<Fingerprint>,
}

/// A cache entry as [`Cache::lookup`] finds it.
#[derive(Debug)]
pub enum Lookup {
    /// Verified and unchanged since: serve it.
    Verified(File),
    /// Present, but not verified in this run or changed since: hash it first.
    Unchecked(File),
    /// Not cached.
    Missing,
}

/// The blob cache of a mount.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    /// `cache.max_bytes`, or half the filesystem if less.
    max_bytes: u64,
    inner: Mutex<(LruCache<String, Entry>, u64)>,
    next_tmp: AtomicU64,
}

/// Free space the cache leaves on its filesystem: an eighth of it, at most 1 GiB, for the
/// node's other state (spool shadows of writes, the tree, journals) and for the next fetch.
pub fn reserve(fs_size: u64) -> u64 {
    (fs_size / 8).min(1 << 30)
}

/// Whether `name` is a cache file's name (64 lower-case hex digits).
fn is_digest(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The SHA-256 of a whole file, as lower-case hex.
pub fn hash_file(file: &File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    loop {
        let n = file.read_at(&mut buf, offset)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
}

/// Bytes as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cache {
    /// Opens the cache in `dir`, keeping what an earlier run left (oldest first out) and
    /// dropping unfinished fetches.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Cache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_digest(&name) {
                let m = entry.metadata()?;
                found.push((m.mtime(), name, m.len()));
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        found.sort();
        let mut lru = LruCache::unbounded();
        let mut total = 0;
        for (_, name, size) in found {
            total += size;
            lru.put(name, Entry { size, checked: None });
        }
        let cache = Cache {
            dir: dir.to_path_buf(),
            // Half the disk at most: the node's writes need room too.
            max_bytes: match space::usage(dir) {
                Ok((size, _)) => max_bytes.min(size / 2),
                Err(_) => max_bytes,
            },
            inner: Mutex::new((lru, total)),
            next_tmp: AtomicU64::new(1),
        };
        cache.evict(None);
        Ok(cache)
    }

    fn path(&self, hex: &str) -> PathBuf {
        self.dir.join(hex)
    }

    /// Finds content by its hex digest (and marks it recently used).
    pub fn lookup(&self, hex: &str) -> Lookup {
        let checked = {
            let mut inner = self.inner.lock();
            match inner.0.get(hex) {
                Some(e) => e.checked,
                None => return Lookup::Missing,
            }
        };
        match File::open(self.path(hex)) {
            Ok(file) => match Fingerprint::of(&file) {
                Ok(fp) if Some(fp) == checked => Lookup::Verified(file),
                Ok(_) => Lookup::Unchecked(file),
                Err(_) => Lookup::Missing,
            },
            Err(_) => {
                self.forget(hex);
                Lookup::Missing
            }
        }
    }

    /// Records that `file` (the cache file of `hex`) was just verified.
    pub fn checked(&self, hex: &str, file: &File) {
        if let Ok(fp) = Fingerprint::of(file) {
            if let Some(e) = self.inner.lock().0.peek_mut(hex) {
                e.checked = Some(fp);
            }
        }
    }

    /// Removes an entry whose content is wrong.
    pub fn discard(&self, hex: &str) {
        let _ = std::fs::remove_file(self.path(hex));
        self.forget(hex);
    }

    fn forget(&self, hex: &str) {
        let mut inner = self.inner.lock();
        if let Some(e) = inner.0.pop(hex) {
            inner.1 -= e.size;
        }
    }

    /// A new temporary file in the cache directory, for content being fetched.
    pub fn temp(&self) -> io::Result<(File, PathBuf)> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("tmp-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Moves a verified temporary file into the cache as `hex`; returns it opened.
    pub fn insert(&self, hex: &str, temp: &Path) -> io::Result<File> {
        let path = self.path(hex);
        std::fs::rename(temp, &path)?;
        let file = File::open(&path)?;
        self.add(hex, &file)?;
        Ok(file)
    }

    /// Takes a just-committed file (already hashed) into the cache without copying it: a new
    /// name for its inode. A file of the same content already there stays.
    pub fn adopt(&self, hex: &str, file: &File) -> io::Result<()> {
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
        let to = std::ffi::CString::new(self.path(hex).into_os_string().into_encoded_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: valid C strings; linkat with AT_SYMLINK_FOLLOW names the fd's inode.
        let ret = unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
            if self.inner.lock().0.contains(hex) {
                return Ok(());
            }
        }
        let cached = File::open(self.path(hex))?;
        self.add(hex, &cached)
    }

    fn add(&self, hex: &str, file: &File) -> io::Result<()> {
        let fp = Fingerprint::of(file)?;
        if fp.size > self.max_bytes {
            // Larger than the whole cache: served from the open file, never kept.
            let _ = std::fs::remove_file(self.path(hex));
            self.forget(hex);
            return Ok(());
        }
        {
            let mut inner = self.inner.lock();
            if let Some(old) = inner.0.put(hex.to_string(), Entry { size: fp.size, checked: Some(fp) }) {
                inner.1 -= old.size;
            }
            inner.1 += fp.size;
        }
        self.evict(Some(hex));
        Ok(())
    }

    /// Drops least recently used entries, of those only the cache holds (a committed blob's
    /// entry is also the tree's file: dropping it frees nothing), until the filesystem has
    /// `need` bytes free besides its reserve ([`reserve`]). Returns whether it has.
    pub fn make_room(&self, need: u64) -> bool {
        let Ok((size, free)) = space::usage(&self.dir) else { return true };
        let want = need.saturating_add(reserve(size));
        if free >= want {
            return true;
        }
        // Oldest first.
        let candidates: Vec<(String, u64)> = self.inner.lock().0.iter().rev().map(|(h, e)| (h.clone(), e.size)).collect();
        let mut freed = 0;
        for (hex, size) in candidates {
            if free + freed >= want {
                break;
            }
            let path = self.path(&hex);
            if std::fs::metadata(&path).is_ok_and(|m| m.nlink() > 1) {
                continue;
            }
            tracing::debug!(digest = %hex, "evicted from the blob cache: the disk is short of space");
            let _ = std::fs::remove_file(&path);
            self.forget(&hex);
            freed += size;
        }
        space::free_bytes(&self.dir).is_ok_and(|f| f >= want)
    }

    /// Drops least recently used entries until the cache fits, `keep` last of all, and
    /// keeps the filesystem's reserve free.
    fn evict(&self, keep: Option<&str>) {
        self.evict_to_bound(keep);
        self.make_room(0);
    }

    fn evict_to_bound(&self, keep: Option<&str>) {
        let mut gone = Vec::new();
        {
            let mut inner = self.inner.lock();
            let mut kept = None;
            while inner.1 > self.max_bytes {
                match inner.0.pop_lru() {
                    Some((hex, e)) if Some(hex.as_str()) == keep => kept = Some((hex, e)),
                    Some((hex, e)) => {
                        inner.1 -= e.size;
                        gone.push(hex);
                    }
                    None => break,
                }
            }
            if let Some((hex, e)) = kept {
                inner.0.put(hex, e);
            }
        }
        for hex in gone {
            tracing::debug!(digest = %hex, "evicted from the blob cache");
            let _ = std::fs::remove_file(self.path(&hex));
        }
    }

    /// Entries and bytes cached.
    pub fn usage(&self) -> (usize, u64) {
        let inner = self.inner.lock();
        (inner.0.len(), inner.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cache: &Cache, content: &[u8]) -> String {
        let (mut file, path) = cache.temp().unwrap();
        std::io::Write::write_all(&mut file, content).unwrap();
        let hex = hash_file(&file).unwrap();
        cache.insert(&hex, &path).unwrap();
        hex
    }

    #[test]
    fn least_recently_used_goes_first_and_the_bound_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 10).unwrap();
        let a = put(&cache, b"aaaa");
        let b = put(&cache, b"bbbb");
        assert!(matches!(cache.lookup(&a), Lookup::Verified(_)));
        let c = put(&cache, b"cccc");
        // a was used after b: b goes.
        assert!(matches!(cache.lookup(&b), Lookup::Missing));
        assert!(matches!(cache.lookup(&a), Lookup::Verified(_)));
        assert!(matches!(cache.lookup(&c), Lookup::Verified(_)));
        assert_eq!(cache.usage(), (2, 8));
        // Larger than the whole cache: it does not stay, and costs the others nothing.
        let big = put(&cache, b"0123456789abcdef");
        assert!(matches!(cache.lookup(&big), Lookup::Missing));
        assert!(!dir.path().join(&big).exists());
        assert_eq!(cache.usage(), (2, 8));
    }

    #[test]
    fn changed_entries_are_unchecked_and_a_restart_checks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let a = put(&cache, b"content");
        std::thread::sleep(std::time::Duration::from_millis(10));
        let f = std::fs::OpenOptions::new().write(true).open(dir.path().join(&a)).unwrap();
        f.write_all_at(b"X", 0).unwrap();
        match cache.lookup(&a) {
            Lookup::Unchecked(file) => assert_ne!(hash_file(&file).unwrap(), a),
            other => panic!("a changed entry must be checked: {other:?}"),
        }
        cache.discard(&a);
        assert!(matches!(cache.lookup(&a), Lookup::Missing));
        let b = put(&cache, b"other");
        std::fs::write(dir.path().join("tmp-1-1"), b"half a fetch").unwrap();
        let again = Cache::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(again.lookup(&b), Lookup::Unchecked(_)));
        assert!(!dir.path().join("tmp-1-1").exists());
    }

    #[test]
    fn adopting_links_without_copying() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c"), 1 << 20).unwrap();
        let path = dir.path().join("shadow");
        std::fs::write(&path, b"shadow content").unwrap();
        let file = File::open(&path).unwrap();
        let hex = hash_file(&file).unwrap();
        cache.adopt(&hex, &file).unwrap();
        cache.adopt(&hex, &file).unwrap();
        let Lookup::Verified(cached) = cache.lookup(&hex) else { panic!("adopted content is verified") };
        assert_eq!(cached.metadata().unwrap().ino(), file.metadata().unwrap().ino());
        assert_eq!(cache.usage(), (1, 14));
    }
}
