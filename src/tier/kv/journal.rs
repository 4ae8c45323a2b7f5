//! The offline journal: last-write-wins changes accepted while NATS was unreachable.
//!
//! A change is appended and fsync'ed before the program's `close()` returns, so it survives
//! `kill -9` of the daemon; it is replayed in order when the connection comes back, with its
//! original message id, so a replay whose acknowledgement was lost is de-duplicated by
//! JetStream. Each record is framed as `magic, meta length, meta (JSON), value length, value,
//! CRC-32`; a torn record at the end (a crash in the middle of an append, whose `close()` never
//! returned) is detected by length or checksum and dropped when the journal is opened.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"SJR1";

/// What a record does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalOp {
    /// Store the value.
    Put,
    /// Delete the key.
    Delete,
}

/// One queued change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// Put or delete.
    pub op: JournalOp,
    /// The message id it was first published with (JetStream de-duplicates on it).
    pub msg_id: String,
    /// The value of a put.
    #[serde(skip)]
    pub value: Vec<u8>,
}

/// The journal file and the records not yet replayed.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    records: VecDeque<Record>,
}

fn frame(record: &Record) -> Vec<u8> {
    let meta = serde_json::to_vec(record).expect("records serialize");
    let mut out = Vec::with_capacity(16 + meta.len() + record.value.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
    out.extend_from_slice(&record.value);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&meta);
    crc.update(&record.value);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out
}

/// Parses records from the start of `data`; returns them and the length of the valid prefix.
fn parse(data: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    let u32_at = |d: &[u8], i: usize| -> Option<usize> {
        d.get(i..i + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    loop {
        let start = at;
        if data.get(at..at + 4) != Some(MAGIC.as_slice()) {
            return (records, start);
        }
        let Some(meta_len) = u32_at(data, at + 4) else { return (records, start) };
        let meta_at = at + 8;
        let Some(meta) = data.get(meta_at..meta_at + meta_len) else { return (records, start) };
        let Some(value_len) = u32_at(data, meta_at + meta_len) else { return (records, start) };
        let value_at = meta_at + meta_len + 4;
        let Some(value) = data.get(value_at..value_at + value_len) else { return (records, start) };
        let Some(crc) = u32_at(data, value_at + value_len) else { return (records, start) };
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(meta);
        hasher.update(value);
        if hasher.finalize() as usize != crc {
            return (records, start);
        }
        let Ok(mut record) = serde_json::from_slice::<Record>(meta) else { return (records, start) };
        record.value = value.to_vec();
        records.push(record);
        at = value_at + value_len + 4;
    }
}

impl Journal {
    /// Opens (creating) the journal at `path`, dropping a torn tail.
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (records, valid) = parse(&data);
        if valid < data.len() {
            tracing::warn!(
                path = %path.display(),
                dropped = data.len() - valid,
                "dropping a torn record at the end of the journal (its close() never returned)"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            records: records.into(),
        })
    }

    /// Appends a record and syncs it to disk before returning.
    pub fn append(&mut self, record: Record) -> std::io::Result<()> {
        self.file.write_all(&frame(&record))?;
        self.file.sync_data()?;
        self.records.push_back(record);
        Ok(())
    }

    /// The oldest record not yet replayed.
    pub fn front(&self) -> Option<&Record> {
        self.records.front()
    }

    /// Marks the oldest record replayed; the file shrinks when the journal empties (see
    /// [`Journal::compact`]).
    pub fn pop_front(&mut self) -> std::io::Result<()> {
        self.records.pop_front();
        if self.records.is_empty() {
            self.file.set_len(0)?;
            self.file.seek(SeekFrom::Start(0))?;
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// Rewrites the file with only the records not yet replayed (after a partial replay).
    pub fn compact(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("compact");
        let mut out = File::create(&tmp)?;
        for record in &self.records {
            out.write_all(&frame(record))?;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.file.seek(SeekFrom::End(0))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether a record for this bucket and key waits (its file must not be swept away).
    pub fn has(&self, bucket: &str, key: &str) -> bool {
        self.records.iter().any(|r| r.bucket == bucket && r.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, value: &[u8]) -> Record {
        Record {
            bucket: "b".into(),
            key: key.into(),
            op: JournalOp::Put,
            msg_id: format!("id-{key}"),
            value: value.to_vec(),
        }
    }

    #[test]
    fn records_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(rec("a", b"1")).unwrap();
        j.append(rec("b", b"")).unwrap();
        j.append(Record { op: JournalOp::Delete, ..rec("a", b"") }).unwrap();
        drop(j);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 3);
        assert_eq!(j.front().unwrap().value, b"1");
        assert!(j.has("b", "b"));
        j.pop_front().unwrap();
        j.compact().unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j.front().unwrap().key, "b");
    }

    #[test]
    fn a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(rec("a", b"kept")).unwrap();
        j.append(rec("b", b"torn")).unwrap();
        drop(j);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 1);
        // Appends after the repair land after the valid prefix.
        j.append(rec("c", b"new")).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 2);
    }

    #[test]
    fn a_corrupt_record_stops_the_replay_there() {
        let data = [frame(&rec("a", b"1")), frame(&rec("b", b"2"))].concat();
        let mut bad = data.clone();
        let last = bad.len() - 6;
        bad[last] ^= 0xff;
        let (records, valid) = parse(&bad);
        assert_eq!(records.len(), 1);
        assert_eq!(valid, frame(&rec("a", b"1")).len());
        assert_eq!(parse(&data).0.len(), 2);
    }

    #[test]
    fn emptying_the_journal_truncates_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(rec("a", b"1")).unwrap();
        j.pop_front().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        j.append(rec("b", b"2")).unwrap();
        drop(j);
        assert_eq!(Journal::open(&path).unwrap().len(), 1);
    }
}
