//! What a log's messages make of its files: the pure part of the append tier.
//!
//! A [`LogState`] takes the messages of one stream in stream order and says what each does
//! to the tree ([`Action`]), keeping per file its length, the sequence of its first and last
//! message, and its last writer. Every node runs the same messages through the same state, so
//! every node's files hold the same bytes.
//!
//! An append larger than the server's payload limit arrives as parts `1/n .. n/n` that share
//! an append id; the parts are gathered ([`Gather`], memory then a spool file) and the whole
//! append lands at the position of its *last* part, so it is contiguous in the file even when
//! other nodes' appends were published between its parts. Parts that arrive out of order (a
//! gap) are dropped, a part 1 of an id starts it over (a writer's retry after the
//! de-duplication window), and an unfinished append is dropped when its writer starts another
//! append on the same file, or when the file is truncated or removed: a writer publishes one
//! append of a file at a time, so an unfinished older one can never complete.
//!
//! The state is saved as JSON (see [`Saved`]) with a *resume point*: the last sequence whose
//! effects are all in the saved files, held back before the first part of any unfinished
//! append so that a restart gathers it again.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Parts beyond this many bytes are gathered in a file instead of memory.
const GATHER_IN_MEMORY: u64 = 4 << 20;

/// One part of an append split across messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The append's id (the writer's message-id prefix and a counter).
    pub id: String,
    /// This part's number, from 1.
    pub k: u32,
    /// How many parts the append has.
    pub n: u32,
}

/// What a message does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Appends its payload (or a part of an append).
    Append(Option<Part>),
    /// Empties the file (the message is a rollup: earlier ones are gone from the stream).
    Truncate,
    /// Removes the file (a rollup too).
    Delete,
}

/// A message of the log, decoded.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Stream sequence.
    pub seq: u64,
    /// The file it concerns.
    pub path: PathBuf,
    /// What it does.
    pub op: Op,
    /// Who wrote it.
    pub node: Option<String>,
    /// The appended bytes.
    pub payload: Bytes,
    /// The writer's message-id prefix, for dropping its unfinished appends.
    pub writer: Option<String>,
}

/// What a message makes the tree do.
#[derive(Debug)]
pub enum Action {
    /// Append `data` to `path`, which holds `at` bytes before it.
    Append {
        /// The file.
        path: PathBuf,
        /// Its length before.
        at: u64,
        /// The bytes.
        data: Gathered,
    },
    /// Empty `path` (creating it if needed).
    Truncate(PathBuf),
    /// Remove `path`.
    Delete(PathBuf),
}

/// Bytes of an append: a payload, or gathered parts.
#[derive(Debug)]
pub enum Gathered {
    /// One message's payload.
    Bytes(Bytes),
    /// Parts gathered into memory or a file.
    Parts(Gather),
}

impl Gathered {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Gathered::Bytes(b) => b.len() as u64,
            Gathered::Parts(g) => g.len,
        }
    }

    /// Up to `max` bytes from `offset`.
    pub fn chunk(&self, offset: u64, max: usize) -> io::Result<Vec<u8>> {
        let end = self.len().min(offset + max as u64);
        if offset >= end {
            return Ok(Vec::new());
        }
        match self {
            Gathered::Bytes(b) => Ok(b[offset as usize..end as usize].to_vec()),
            Gathered::Parts(g) => g.read(offset, (end - offset) as usize),
        }
    }
}

/// Parts of one append, gathered in order.
#[derive(Debug)]
pub struct Gather {
    path: PathBuf,
    first: u64,
    next: u32,
    n: u32,
    mem: Vec<u8>,
    file: Option<(File, PathBuf)>,
    len: u64,
}

impl Gather {
    fn push(&mut self, dir: &Path, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.len + data.len() as u64 > GATHER_IN_MEMORY {
            std::fs::create_dir_all(dir)?;
            let name = dir.join(format!("part-{}-{}", std::process::id(), self.first));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&name)?;
            file.write_all_at(&self.mem, 0)?;
            self.mem = Vec::new();
            self.file = Some((file, name));
        }
        match &self.file {
            Some((file, _)) => file.write_all_at(data, self.len)?,
            None => self.mem.extend_from_slice(data),
        }
        self.len += data.len() as u64;
        Ok(())
    }

    fn read(&self, offset: u64, n: usize) -> io::Result<Vec<u8>> {
        match &self.file {
            Some((file, _)) => {
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            }
            None => Ok(self.mem[offset as usize..offset as usize + n].to_vec()),
        }
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        if let Some((_, name)) = &self.file {
            let _ = std::fs::remove_file(name);
        }
    }
}

/// What a node knows of one file of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// Bytes in the file.
    pub len: u64,
    /// Sequence of the oldest message its content depends on: when the stream no longer holds
    /// it (retention), the file is rebuilt from what the stream still has.
    pub first: u64,
    /// Sequence of its last message (`user.syncfs.rev`).
    pub last: u64,
    /// Writer of its last message.
    pub node: Option<String>,
}

/// The saved form of a log's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// Every message up to this sequence is reflected in `files`.
    pub resume: u64,
    /// The files.
    #[serde(with = "path_keys")]
    pub files: BTreeMap<PathBuf, FileState>,
}

/// File names are bytes, JSON keys are text: a name that is not UTF-8 (or starts like an
/// encoded one) is stored as `%x:` and its bytes in hex, so every name can be saved.
mod path_keys {
    use std::collections::BTreeMap;
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    const HEX: &str = "%x:";

    pub(super) fn encode(path: &std::path::Path) -> String {
        match path.to_str() {
            Some(text) if !text.starts_with(HEX) => text.to_string(),
            _ => {
                let hex: String = path.as_os_str().as_bytes().iter().map(|b| format!("{b:02x}")).collect();
                format!("{HEX}{hex}")
            }
        }
    }

    pub(super) fn decode(key: &str) -> Option<PathBuf> {
        let Some(hex) = key.strip_prefix(HEX) else { return Some(PathBuf::from(key)) };
        if hex.len() % 2 != 0 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
        Some(PathBuf::from(OsString::from_vec(bytes?)))
    }

    pub fn serialize<S: Serializer, V: Serialize>(files: &BTreeMap<PathBuf, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(files.iter().map(|(p, v)| (encode(p), v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(d: D) -> Result<BTreeMap<PathBuf, V>, D::Error> {
        let raw = BTreeMap::<String, V>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| decode(&k).map(|p| (p, v)).ok_or_else(|| serde::de::Error::custom(format!("not a file name: {k}"))))
            .collect()
    }
}

/// A log's files and the appends still being gathered.
#[derive(Debug, Default)]
pub struct LogState {
    /// The files, by path.
    pub files: BTreeMap<PathBuf, FileState>,
    /// The last sequence handled.
    pub applied: u64,
    gathering: HashMap<String, Gather>,
    /// Where gathers spill to.
    pub spill_dir: PathBuf,
    /// Changed since the last save.
    pub dirty: bool,
}

impl LogState {
    /// A state restored from `saved`, spilling gathered parts into `spill_dir`.
    pub fn restore(saved: Saved, spill_dir: PathBuf) -> LogState {
        LogState {
            files: saved.files,
            applied: saved.resume,
            gathering: HashMap::new(),
            spill_dir,
            dirty: false,
        }
    }

    /// What to save now.
    pub fn saved(&self) -> Saved {
        let held = self.gathering.values().map(|g| g.first.saturating_sub(1)).min();
        Saved {
            resume: held.map_or(self.applied, |h| h.min(self.applied)),
            files: self.files.clone(),
        }
    }

    fn drop_gathers(&mut self, path: &Path, writer: Option<&str>) {
        self.gathering
            .retain(|id, g| !(g.path == path && writer.is_none_or(|w| id.starts_with(w))));
    }

    /// Takes one message (in stream order) and returns what it does to the tree. A message at
    /// or below a file's last sequence was applied already (a replay after a restart).
    pub fn handle(&mut self, msg: Msg) -> io::Result<Option<Action>> {
        self.applied = self.applied.max(msg.seq);
        self.dirty = true;
        if self.files.get(&msg.path).is_some_and(|f| msg.seq <= f.last) {
            return Ok(None);
        }
        let data = match msg.op {
            Op::Truncate => {
                self.drop_gathers(&msg.path, None);
                self.files.insert(
                    msg.path.clone(),
                    FileState {
                        len: 0,
                        first: msg.seq,
                        last: msg.seq,
                        node: msg.node,
                    },
                );
                return Ok(Some(Action::Truncate(msg.path)));
            }
            Op::Delete => {
                self.drop_gathers(&msg.path, None);
                self.files.remove(&msg.path);
                return Ok(Some(Action::Delete(msg.path)));
            }
            Op::Append(None) => {
                self.drop_gathers(&msg.path, msg.writer.as_deref());
                (msg.seq, Gathered::Bytes(msg.payload))
            }
            Op::Append(Some(part)) => {
                if part.k == 1 {
                    self.drop_gathers(&msg.path, msg.writer.as_deref());
                    self.gathering.insert(
                        part.id.clone(),
                        Gather {
                            path: msg.path.clone(),
                            first: msg.seq,
                            next: 1,
                            n: part.n,
                            mem: Vec::new(),
                            file: None,
                            len: 0,
                        },
                    );
                }
                let Some(gather) = self.gathering.get_mut(&part.id) else {
                    return Ok(None);
                };
                if gather.next != part.k || gather.n != part.n || gather.path != msg.path {
                    // A gap: this append can never be whole.
                    self.gathering.remove(&part.id);
                    return Ok(None);
                }
                gather.push(&self.spill_dir, &msg.payload)?;
                gather.next += 1;
                if part.k < part.n {
                    return Ok(None);
                }
                let gather = self.gathering.remove(&part.id).expect("present");
                (gather.first, Gathered::Parts(gather))
            }
        };
        let (first, data) = data;
        let entry = self.files.entry(msg.path.clone()).or_insert(FileState {
            len: 0,
            first,
            last: 0,
            node: None,
        });
        let at = entry.len;
        entry.len += data.len();
        entry.last = msg.seq;
        entry.node = msg.node;
        Ok(Some(Action::Append {
            path: msg.path,
            at,
            data,
        }))
    }

    /// Replaces what is known of `path` (after a rebuild from the stream). Appends being
    /// gathered for it stay: their parts came from the stream in order, and they land at the
    /// rebuilt file's end.
    pub fn set_file(&mut self, path: &Path, state: Option<FileState>) {
        match state {
            Some(s) => {
                self.files.insert(path.to_path_buf(), s);
            }
            None => {
                self.files.remove(path);
            }
        }
        self.dirty = true;
    }
}

/// The state file: the state and a CRC-32 of its JSON, so that damage which leaves valid
/// JSON (a resume point or a length off by some) is found; a wrong state would skip or double
/// appends for good, a state found damaged only costs a rebuild from the stream.
#[derive(Serialize)]
struct StoredRef<'a> {
    #[serde(flatten)]
    saved: &'a Saved,
    crc32: u32,
}

#[derive(Deserialize)]
struct Stored {
    #[serde(flatten)]
    saved: Saved,
    /// Absent in state files written before the checksum (accepted once, then rewritten).
    crc32: Option<u32>,
}

fn checksum(saved: &Saved) -> io::Result<u32> {
    Ok(crc32fast::hash(&serde_json::to_vec(saved)?))
}

/// Reads a saved state; a missing file is an empty state, a damaged one (unreadable, or not
/// matching its checksum) is an error of kind `InvalidData`.
pub fn load(file: &Path) -> io::Result<Option<Saved>> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let damaged = |why: String| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", file.display()));
    let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
    if let Some(stored_crc) = stored.crc32 {
        let crc = checksum(&stored.saved)?;
        if crc != stored_crc {
            return Err(damaged(format!("checksum {crc:08x} does not match the saved {stored_crc:08x}")));
        }
    }
    Ok(Some(stored.saved))
}

/// Writes a state atomically (a temporary file renamed over the old one). No fsync: the state
/// must survive a crash of the daemon, not of the machine, and a lost state is rebuilt.
pub fn store(file: &Path, saved: &Saved) -> io::Result<()> {
    let tmp = file.with_extension("json.tmp");
    let stored = StoredRef {
        saved,
        crc32: checksum(saved)?,
    };
    std::fs::write(&tmp, serde_json::to_vec(&stored)?)?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_name_is_saved_and_read_back() {
        use std::os::unix::ffi::OsStrExt;
        let names = [&b"plain.log"[..], b"\xff\xfe bytes", b"%x:looks-encoded", b"caf\xc3\xa9"];
        let mut saved = Saved { resume: 7, files: BTreeMap::new() };
        for n in names {
            let state = FileState { len: 1, first: 1, last: 2, node: None };
            saved.files.insert(PathBuf::from(std::ffi::OsStr::from_bytes(n)), state);
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        store(&file, &saved).unwrap();
        assert_eq!(load(&file).unwrap(), Some(saved));
        assert_eq!(path_keys::decode("plain.log"), Some(PathBuf::from("plain.log")));
    }

    fn msg(seq: u64, path: &str, op: Op, payload: &str, writer: &str) -> Msg {
        Msg {
            seq,
            path: PathBuf::from(path),
            op,
            node: Some(writer.into()),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            writer: Some(format!("{writer}-")),
        }
    }

    fn part(id: &str, k: u32, n: u32) -> Op {
        Op::Append(Some(Part { id: id.into(), k, n }))
    }

    /// Runs messages through a state and returns each file's content.
    fn run(state: &mut LogState, msgs: Vec<Msg>, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for m in msgs {
            match state.handle(m).unwrap() {
                None => {}
                Some(Action::Append { path, at, data }) => {
                    let f = files.entry(path).or_default();
                    assert_eq!(f.len() as u64, at, "appends land at the end");
                    f.extend(data.chunk(0, usize::MAX).unwrap());
                }
                Some(Action::Truncate(path)) => {
                    files.insert(path, Vec::new());
                }
                Some(Action::Delete(path)) => {
                    files.remove(&path);
                }
            }
        }
    }

    fn text(files: &BTreeMap<PathBuf, Vec<u8>>, path: &str) -> String {
        String::from_utf8(files[Path::new(path)].clone()).unwrap()
    }

    #[test]
    fn parts_land_whole_at_their_last_part() {
        let mut s = LogState::default();
        let mut files = BTreeMap::new();
        run(
            &mut s,
            vec![
                msg(1, "t", Op::Append(None), "a1\n", "a"),
                msg(2, "t", part("b-7", 1, 3), "BIG", "b"),
                msg(3, "t", Op::Append(None), "a2\n", "a"),
                msg(4, "t", part("b-7", 2, 3), "GER", "b"),
                msg(5, "u", Op::Append(None), "u1\n", "a"),
                msg(6, "t", part("b-7", 3, 3), "\n", "b"),
                msg(7, "t", Op::Append(None), "a3\n", "a"),
            ],
            &mut files,
        );
        assert_eq!(text(&files, "t"), "a1\na2\nBIGGER\na3\n");
        assert_eq!(text(&files, "u"), "u1\n");
        let t = &s.files[Path::new("t")];
        assert_eq!((t.len, t.first, t.last), (16, 1, 7));
        assert_eq!(s.saved().resume, 7);
    }

    #[test]
    fn unfinished_appends_hold_the_resume_point_and_are_dropped_by_their_writer() {
        let mut s = LogState::default();
        let mut files = BTreeMap::new();
        run(
            &mut s,
            vec![msg(1, "t", Op::Append(None), "x", "a"), msg(2, "t", part("b-1", 1, 2), "half", "b")],
            &mut files,
        );
        assert_eq!(s.saved().resume, 1, "a restart must see part 1 again");
        // The same writer's next append of the file means the first can never complete.
        run(&mut s, vec![msg(3, "t", Op::Append(None), "y", "b")], &mut files);
        assert_eq!(s.saved().resume, 3);
        run(&mut s, vec![msg(4, "t", part("b-1", 2, 2), "late", "b")], &mut files);
        assert_eq!(text(&files, "t"), "xy");
    }

    #[test]
    fn gaps_and_restarts_of_parts() {
        let mut s = LogState::default();
        let mut files = BTreeMap::new();
        run(
            &mut s,
            vec![
                msg(1, "t", part("a-1", 1, 3), "1", "a"),
                msg(2, "t", part("a-1", 3, 3), "3", "a"),
                // Retried from the start after the de-duplication window: whole again.
                msg(3, "t", part("a-2", 1, 2), "p", "a"),
                msg(4, "t", part("a-2", 1, 2), "p", "a"),
                msg(5, "t", part("a-2", 2, 2), "q", "a"),
            ],
            &mut files,
        );
        assert_eq!(text(&files, "t"), "pq");
    }

    #[test]
    fn truncate_and_delete_are_ordered_with_appends() {
        let mut s = LogState::default();
        let mut files = BTreeMap::new();
        run(
            &mut s,
            vec![
                msg(1, "t", Op::Append(None), "old", "a"),
                msg(2, "t", part("b-1", 1, 2), "lost", "b"),
                msg(3, "t", Op::Truncate, "", "a"),
                msg(4, "t", part("b-1", 2, 2), "parts", "b"),
                msg(5, "t", Op::Append(None), "new", "b"),
                msg(6, "u", Op::Append(None), "u", "a"),
                msg(7, "u", Op::Delete, "", "a"),
            ],
            &mut files,
        );
        assert_eq!(text(&files, "t"), "new");
        assert!(!files.contains_key(Path::new("u")));
        assert_eq!(s.files[Path::new("t")].first, 3, "the truncation is where the content starts");
        assert!(!s.files.contains_key(Path::new("u")));
    }

    #[test]
    fn a_replay_after_restart_applies_nothing_twice() {
        let mut s = LogState::default();
        let mut files = BTreeMap::new();
        let all = [
            msg(1, "t", Op::Append(None), "a", "a"),
            msg(2, "u", part("b-1", 1, 2), "b", "b"),
            msg(3, "t", Op::Append(None), "c", "a"),
            msg(4, "u", part("b-1", 2, 2), "d", "b"),
            msg(5, "t", Op::Append(None), "e", "a"),
        ];
        run(&mut s, all[..3].to_vec(), &mut files);
        let saved = s.saved();
        assert_eq!(saved.resume, 1);
        // A restart from the saved state replays from resume + 1.
        let mut again = LogState::restore(saved, PathBuf::new());
        run(&mut again, all[1..].to_vec(), &mut files);
        assert_eq!(text(&files, "t"), "ace");
        assert_eq!(text(&files, "u"), "bd");
    }

    #[test]
    fn large_gathers_spill_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogState::restore(Saved::default(), dir.path().to_path_buf());
        let chunk = "x".repeat(3 << 20);
        let mut files = BTreeMap::new();
        run(
            &mut s,
            vec![
                msg(1, "t", part("a-1", 1, 3), &chunk, "a"),
                msg(2, "t", part("a-1", 2, 3), &chunk, "a"),
            ],
            &mut files,
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "parts beyond 4 MiB go to a file");
        run(&mut s, vec![msg(3, "t", part("a-1", 3, 3), "end", "a")], &mut files);
        assert_eq!(files[Path::new("t")].len(), (6 << 20) + 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the spill file goes with the gather");
    }

    #[test]
    fn saved_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log.json");
        assert_eq!(load(&file).unwrap(), None);
        let mut s = LogState::default();
        s.handle(msg(4, "a/b c", Op::Append(None), "x", "n")).unwrap();
        store(&file, &s.saved()).unwrap();
        assert_eq!(load(&file).unwrap(), Some(s.saved()));
        std::fs::write(&file, "{").unwrap();
        assert!(load(&file).is_err());
    }

    #[test]
    fn a_state_edited_into_other_valid_json_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log.json");
        let mut s = LogState::default();
        s.handle(msg(4, "t", Op::Append(None), "x", "n")).unwrap();
        store(&file, &s.saved()).unwrap();
        type Edit = fn(&mut serde_json::Value);
        let edits: [Edit; 3] = [
            |v| v["resume"] = (v["resume"].as_u64().unwrap() + 15).into(),
            |v| v["files"]["t"]["len"] = 101.into(),
            |v| v["files"]["t"]["last"] = 3.into(),
        ];
        for edit in edits {
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            edit(&mut v);
            let path = dir.path().join("edited.json");
            std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
            let e = load(&path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
        // A state written before the checksum is read as it is.
        let old = serde_json::to_vec(&s.saved()).unwrap();
        std::fs::write(&file, old).unwrap();
        assert_eq!(load(&file).unwrap(), Some(s.saved()));
    }
}
